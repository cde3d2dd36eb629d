"""A scenario variant's outcome, shared by the PyTorch scenarios and the Keras ones (no framework)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class VariantResult:
    label: str
    metric: str
    score: float
    final_loss: float
    first_nonfinite_step: int | None
    flow: float  # first weight layer's gradient RMS over the last one's (median, first 100 steps)
    findings: list[str]  # "kind (severity)", warnings and errors
    steps: int
    seconds: float
    out: str
    published: str
