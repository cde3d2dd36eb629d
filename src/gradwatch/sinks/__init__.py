"""Live sinks: where a run's flushed windows and findings are logged while it trains.

``watch(..., log_to=["tensorboard", "wandb", "mlflow"])`` (or ``gradwatch run --log-to``) starts
them; :mod:`gradwatch.sinks_hub` runs each on a thread of its own and turns off one that fails.
Each module here imports its library (tensorboard, wandb, mlflow) only when the run opens it, so
importing it is cheap, and a process without the library never gets here (``log_to`` says which
extra to install). Subclass :class:`Sink` for a place of your own and pass the object in ``log_to``.
"""

from __future__ import annotations

from ..sinks_hub import KNOWN, RunContext, RunEnd, Sink
from ..sinks_window import LayerChoice, Window

__all__ = ["KNOWN", "LayerChoice", "RunContext", "RunEnd", "Sink", "Window"]
