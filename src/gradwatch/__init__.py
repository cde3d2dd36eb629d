"""gradwatch: find, explain and fix vanishing and exploding gradients in neural-network training.

    import gradwatch as gw
    with gw.watch(model, optimizer, out="runs/exp1") as w:
        for x, y in loader:
            loss = loss_fn(model(x), y)
            optimizer.zero_grad(); loss.backward(); optimizer.step()
            w.log(loss=loss)
    run = gw.load_run("runs/exp1")
"""

from .errors import GradwatchError, RunDirError
from .store import LAYER_METRICS, STEP_METRICS, LayerInfo, Run, load_run
from .diagnose import Finding, Remedy, diagnose
from .watch import Watch, watch
from . import guards, surgery

__version__ = "0.1.0"

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
