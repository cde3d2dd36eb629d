"""Model surgery: the offline fixes of the seeds, applied to a live model, PyTorch or Keras 3.

    report = gradwatch.surgery.reinit(model, "he_uniform")
    report = gradwatch.surgery.swap_activations(model, "sigmoid", "relu")
    report = gradwatch.surgery.insert_norm(model, "batch", optimizer=optimizer)
    print(report)

Each function changes the model in place and returns a :class:`SurgeryReport` of what it changed
and what it left alone, and why. What it cannot do safely it refuses with a
:class:`~gradwatch.GradwatchError` that says so. A ``torch.nn.Module`` goes to
:mod:`gradwatch.surgery.torch`; a Keras model (Sequential, functional or subclassed, on any
backend) to :mod:`gradwatch.surgery.keras`. Both use Keras' initialiser formulas, which the seeds
use. This module itself imports neither framework.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import GradwatchError

#: Initialisation schemes, by their Keras names.
SCHEMES = ("glorot_uniform", "glorot_normal", "he_uniform", "he_normal", "lecun_uniform", "lecun_normal", "orthogonal")


@dataclass
class SurgeryReport:
    """What a surgery changed (``changed``), what it left alone and why (``skipped``), and the
    parameters or variables it created (``new_parameters``: with PyTorch they must join an
    optimizer to be trained; a Keras model's optimizer learns of them by itself)."""

    action: str
    changed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    new_parameters: list[Any] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{self.action}: changed {len(self.changed)}"]
        lines += [f"  changed  {c}" for c in self.changed]
        lines += [f"  skipped  {s}" for s in self.skipped]
        return "\n".join(lines)


def is_keras_model(model: Any) -> bool:
    """Whether ``model`` is a Keras layer or model (checked by class, without importing Keras: a
    Keras model on the torch backend is a ``torch.nn.Module`` too)."""
    return any(c.__module__.split(".")[0] == "keras" and c.__name__ in ("Layer", "Model")
               for c in type(model).__mro__)


def _side(model: Any) -> Any:
    if is_keras_model(model):
        from . import keras as side
    else:
        from ..frameworks import torch_error

        if torch_error() is not None:
            raise GradwatchError(f"surgery works on a torch.nn.Module or a Keras model; got {type(model).__name__} "
                                 f"(and PyTorch cannot be imported here: {torch_error()}).")
        from . import torch as side  # type: ignore[no-redef]
    return side


def reinit(model: Any, scheme: str = "glorot_uniform", **options: Any) -> SurgeryReport:
    """Re-initialise every dense and convolution layer's weights (or those named in ``layers=``)
    with ``scheme``, biases to ``bias=`` (0). ``seed=`` makes the draw reproducible. See
    :func:`gradwatch.surgery.torch.reinit` and :func:`gradwatch.surgery.keras.reinit`."""
    return _side(model).reinit(model, scheme, **options)


def swap_activations(model: Any, old: Any = "sigmoid", new: Any = "relu", **options: Any) -> SurgeryReport:
    """Replace the activation ``old`` with ``new`` everywhere but at the output (``keep_output=``).
    See :func:`gradwatch.surgery.torch.swap_activations` and :func:`gradwatch.surgery.keras.swap_activations`."""
    return _side(model).swap_activations(model, old, new, **options)


def insert_norm(model: Any, kind: str = "batch", **options: Any) -> SurgeryReport:
    """Put a normalisation (``"batch"`` or ``"layer"``) after every hidden dense and convolution
    layer, before its activation. See :func:`gradwatch.surgery.torch.insert_norm` and
    :func:`gradwatch.surgery.keras.insert_norm`."""
    return _side(model).insert_norm(model, kind, **options)


__all__ = ["SCHEMES", "SurgeryReport", "insert_norm", "is_keras_model", "reinit", "swap_activations"]
