"""Finding live objects of a type (the model behind an optimizer, Keras models, optimizers to treat)."""

from __future__ import annotations

import gc
import warnings
from typing import Any


def live_instances(kind: type) -> list[Any]:
    """Every object the garbage collector tracks whose type is ``kind`` or a subclass of it.

    ``issubclass(type(o), kind)`` rather than ``isinstance``: isinstance on a dead weakref proxy
    (torch.compile leaves some behind) raises ReferenceError, and on some lazily deprecated torch
    objects it warns.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [o for o in gc.get_objects() if issubclass(type(o), kind)]
