"""Pictures and summaries drawn from a stored run (never from a model)."""
