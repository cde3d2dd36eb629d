"""The seeds' experiments as runnable, seeded scenarios."""
