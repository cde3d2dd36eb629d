"""gradwatch: find, explain and fix vanishing and exploding gradients in neural-network training.

    import gradwatch as gw
    with gw.watch(model, optimizer, out="runs/exp1") as w:
        for x, y in loader:
            loss = loss_fn(model(x), y)
            optimizer.zero_grad(); loss.backward(); optimizer.step()
            w.log(loss=loss)
    run = gw.load_run("runs/exp1")
"""

from typing import Any

from .errors import GradwatchError, RunDirError
from .store import LAYER_METRICS, STEP_METRICS, LayerInfo, Run, load_run
from .diagnose import Finding, Remedy, diagnose
from .frameworks import torch_error

__version__ = "0.1.0"

if torch_error() is None:  # recording needs PyTorch; reading, diagnosing and reporting a stored run do not
    from .watch import Watch, watch
    from . import guards
from . import surgery  # PyTorch or Keras models; imports neither until it is given one

_TORCH_SIDE = ("Watch", "watch", "guards")


def __getattr__(name: str) -> Any:
    if name in _TORCH_SIDE and torch_error() is not None:
        raise GradwatchError(
            f"gradwatch.{name} records PyTorch training and needs PyTorch, which this Python cannot import "
            f"({torch_error()}); install it with `pip install gradwatch[torch]`. Reading, diagnosing and reporting "
            "stored runs work without it.")
    raise AttributeError(f"module 'gradwatch' has no attribute {name!r}")


__all__ = [
    "Finding",
    "GradwatchError",
    "LAYER_METRICS",
    "LayerInfo",
    "Run",
    "Remedy",
    "RunDirError",
    "STEP_METRICS",
    "Watch",
    "diagnose",
    "guards",
    "surgery",
    "load_run",
    "watch",
]
