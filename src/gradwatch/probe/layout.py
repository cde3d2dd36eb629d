"""Which column of a ring row holds which statistic, and when a step is sampled: the parts of the
device ring that every framework's probe shares (PyTorch's, TensorFlow's, JAX's). No framework here.

A row is STEP_SLOTS per-step values, then one block of one column per layer for each name in
BLOCKS, in that order. :class:`RingLayout` does all the column arithmetic; the probes, the host
derivation and the cross-rank reduction ask it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

import numpy as np

from ..errors import GradwatchError

#: Per-layer blocks of a row, in ring order.
BLOCKS = ("g_norm", "g_sum", "g_cnorm", "g_min", "g_max", "w_norm", "w_sum", "w_cnorm", "dw_norm", "a_dead", "a_sat", "a_const")
#: Ring blocks that scale with the gradients (divided by the loss scale where they carried it).
GRAD_BLOCKS = ("g_norm", "g_sum", "g_cnorm", "g_min", "g_max")
# Step slots: the loss and lr, what guards did (written by record_guards), the AMP loss scale and
# whether GradScaler skipped the step (record_amp); LOSS_GIVEN is 1 where a compiled step wrote its
# loss (a NaN loss is a loss; PyTorch's probe keeps this fact on the host instead); STEP_MARK is the
# step number (mod 2^24, exact in float32) a compiled step wrote its row for, so that a row no step
# of this record wrote (a function traced before the record started) is never taken for one.
LOSS, LR, NORM_AFTER, COEF, THRESHOLD, SKIPPED, AMP_SCALE, AMP_SKIPPED, LOSS_GIVEN, STEP_MARK = range(10)
STEP_SLOTS = 10
STEP_MARK_MOD = 1 << 24
#: The guards' slots, in record_guards' order: norm after, clip coefficient, threshold, skipped.
GUARD_SLOTS = slice(NORM_AFTER, SKIPPED + 1)
EXP_BINS = 256  # every value of a float32's 8-bit exponent field: the columns of a histogram row

_Rows = TypeVar("_Rows")


class RingLayout:
    """Where each statistic sits in a row of a ring for ``layers`` layers."""

    def __init__(self, layers: int):
        self.layers = layers
        self.width = STEP_SLOTS + len(BLOCKS) * layers
        self._columns = {name: slice(STEP_SLOTS + b * layers, STEP_SLOTS + (b + 1) * layers) for b, name in enumerate(BLOCKS)}

    def columns(self, block: str) -> slice:
        """The columns of ``block`` within one row, one per layer in layer order."""
        return self._columns[block]

    def block(self, rows: _Rows, block: str) -> _Rows:
        """``block`` of every row of ``rows`` (rows x width, numpy or torch): a view, rows x layers."""
        return rows[:, self._columns[block]]

    def column_ids(self, block: str, layer_ids: Sequence[int]) -> list[int]:
        """The columns of ``block`` that hold ``layer_ids``."""
        start = self._columns[block].start
        return [start + i for i in layer_ids]


#: The longest schedule :func:`max_sampled_in_window` walks step by step.
MAX_SCAN = 200_000


def max_sampled_in_window(is_sampled: Callable[[int], bool], window: int, horizon: int) -> int:
    """The most sampled steps among any ``window`` consecutive steps before ``horizon`` (past it the
    schedule is periodic): the histogram rows a window can need. Past ``MAX_SCAN`` steps (a huge
    ``sample_every``) the schedule is not walked: every step of a window, at most, is an upper bound."""
    if horizon > MAX_SCAN:
        return window
    marks = np.array([is_sampled(s) for s in range(horizon)], dtype=np.int64)
    return int(np.convolve(marks, np.ones(window, np.int64), mode="valid").max())


#: Steps at the start of a run that are sampled every other step: many real runs are 20-60 steps
#: long, and each rule needs a few sampled values (dead units: three) to decide.
SHORT_RUN_STEPS = 10


@dataclass(frozen=True)
class ProbeConfig:
    """How often each tier of statistics is computed and the buffer crosses to the host.

    Args:
        flush_every: steps per device->host copy (and per store append).
        sample_every: steps between full statistics (everything but the gradient norm). The first
            ``2 * sample_every`` steps are sampled five times as densely, and the first
            SHORT_RUN_STEPS every other step: problems show early, and a run of 20 steps still
            holds enough sampled steps to be diagnosed.
    """

    flush_every: int = 50
    sample_every: int = 50

    def __post_init__(self) -> None:
        for name in ("flush_every", "sample_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise GradwatchError(f"{name} must be a positive integer; got {v!r}.")

    def is_sampled(self, step: int) -> bool:
        if step % self.sample_every == 0:
            return True
        if step < SHORT_RUN_STEPS:
            return step % 2 == 0
        dense = max(1, self.sample_every // 5)
        return step < 2 * self.sample_every and step % dense == 0
