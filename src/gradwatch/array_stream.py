"""The host side of a compiled-step framework's record (TensorFlow, JAX): a run whose streams keep
their ring on the device, in the framework's own state, and read it once per flush.

The step itself (inside ``tf.function`` or ``jax.jit``) writes each step's row at ``step % rows`` of
a ring and, on sampled steps, a histogram row at ``sampled % hist_rows`` (see
:mod:`gradwatch.probe.arrays`); it counts both on the device. The host never reads a value between
flushes: it is told that a step happened (:meth:`ArrayStream.host_step`: a Python counter and a
clock) and, every ``flush_every`` such calls, fetches the ring, the histograms and the two counters
in one transfer (the framework's ``fetch``). The device counter says which steps are new, so a
compiled loop that takes several steps per host call (``steps_per_execution``, a ``tf.while_loop``)
is stored right; steps that a too-rare flush let the ring overwrite are counted and said.

Nothing here imports a framework.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from . import shutdown
from .probe.arrays import NO_GRAD
from .probe.derive import HostRows, derive
from .probe.layout import EXP_BINS, LOSS, LOSS_GIVEN, STEP_MARK, STEP_MARK_MOD, ProbeConfig, RingLayout, max_sampled_in_window
from .session import RunSession
from .store import Chunk, LayerInfo


@dataclass
class Fetched:
    """What one flush read from the device, on the host."""

    ring: np.ndarray  # rows x width
    hist: np.ndarray  # hist_rows x layers x EXP_BINS
    steps: int  # steps the device has taken (its counter)
    sampled: int  # sampled steps the device has taken
    losses: np.ndarray | None = None  # losses the host handed over since the last flush, in order


def ring_shape(config: ProbeConfig, layers: int, slack: int = 2) -> tuple[int, int, int]:
    """(rows, width, hist_rows) of a ring that holds ``slack`` flush windows: a compiled loop may take
    a few more steps than the host counted before the flush reads it."""
    rows = slack * config.flush_every
    hist = max_sampled_in_window(config.is_sampled, rows, horizon=2 * config.sample_every + 2 * rows)
    return rows, RingLayout(layers).width, max(1, hist)


class ArrayStream:
    """One optimizer's record whose statistics live in a device ring it cannot read by itself: the
    framework gives ``fetch`` (one transfer of the ring, the histograms and the counters).

    Implements :class:`gradwatch.session.Stream`.
    """

    def __init__(self, session: "ArraySession", key: int, writer: Any, layers: Sequence[LayerInfo],
                 config: ProbeConfig, fetch: Callable[[], Fetched]):
        self.session = session
        self.key = key
        self.writer = writer
        self.config = config
        self.layout = RingLayout(len(layers))
        self.rows, _, self.hist_rows = ring_shape(config, len(layers))
        self.fetch = fetch
        self.numel = np.array([max(1, x.numel) for x in layers], np.float64)
        self.failed = False
        self.stored_through = -1
        self._stored = 0  # steps stored (the device counter at the last flush)
        self._host_steps = 0  # steps the host was told of
        self._since_flush = 0
        self._t0 = time.perf_counter()
        self._times: list[tuple[int, float]] = []  # (host step, seconds since start)
        self.lost = 0  # steps the ring overwrote before a flush read them
        self.unwritten = 0  # steps whose row no step of this record wrote (see _window)
        #: Host fetches so far (tests count them: one per flush, none per step).
        self.fetches = 0
        self.extra: dict[str, Any] = {}  # fields for meta.json's stream entry at the end

    # -- gradwatch.session.Stream --------------------------------------------------------------

    @property
    def index(self) -> int:
        return self.writer.index

    @property
    def steps(self) -> int:
        return max(self._stored, self._host_steps)

    @property
    def reduces(self) -> bool:
        return False

    def start_at(self, step: int) -> None:
        """The device counter stands at ``step`` before the first recorded step (an optimizer that has
        stepped before): steps before it are not this record's."""
        self._stored = self._host_steps = int(step)

    def host_step(self, n: int = 1) -> None:
        """``n`` steps ran (as far as the host can tell): note the time; flush every ``flush_every``."""
        if self.failed:
            return
        self._host_steps += n
        self._since_flush += n
        self._times.append((self._host_steps, time.perf_counter() - self._t0))
        if self._since_flush >= self.config.flush_every:
            self.flush(reduce=False)

    def flush(self, reduce: bool = False) -> None:
        if self.failed:
            return
        self._since_flush = 0
        try:
            with shutdown.critical:
                got = self.fetch()
                self.fetches += 1
                chunk = self._window(got)
                if chunk is None:
                    return
                self.writer.append(chunk)
                self.stored_through = int(chunk.steps[-1])
            self.session._pass_window(self.key, chunk)
        except Exception as e:  # a monitor must never stop training
            self.fail(e)

    def fail(self, error: BaseException) -> None:
        self.failed = True
        print(f"gradwatch: stopped recording at step {self._stored} after an internal error "
              f"({type(error).__name__}: {error}); training continues. Please report this.", file=sys.stderr)

    def detach(self) -> None:
        pass  # the framework's side takes its hooks off (see its own detach)

    def notes(self, rank: int) -> tuple[dict[str, Any], list[str]]:
        fields: dict[str, Any] = dict(self.extra)
        lines: list[str] = list(self.extra.get("guard_summary", []))
        if self.unwritten:
            fields["unrecorded_steps"] = self.unwritten
            lines.append(f"{self.unwritten} steps ran in a compiled function traced before gradwatch attached, so they "
                         "were not recorded; start the record before the step function is first called.")
        if self.lost:
            fields["lost_steps"] = self.lost
            lines.append(f"{self.lost} steps were overwritten on the device before a flush read them "
                         f"(more than {self.rows} steps between flushes); lower flush_every.")
        return fields, lines

    # -- a window -------------------------------------------------------------------------------

    def _window(self, got: Fetched) -> Chunk | None:
        first, end = self._stored, int(got.steps)
        if end <= first:
            return None
        if end - first > self.rows:
            self.lost += end - first - self.rows
            first = end - self.rows
        steps = np.arange(first, end, dtype=np.int64)
        ring = got.ring[steps % self.rows].astype(np.float64)
        written = ring[:, STEP_MARK] == steps % STEP_MARK_MOD
        if not written.all():
            # Steps of a compiled function traced before this record started: their rows are not
            # this record's (stale or empty); counted and said at the end, never stored.
            self.unwritten += int((~written).sum())
            steps, ring = steps[written], ring[written]
        n = len(steps)
        if n == 0:
            self._stored = end
            return None
        rows = HostRows(n, self.layout.layers)
        rows.steps[:] = steps
        sampled = np.array([self.config.is_sampled(int(s)) for s in steps])
        rows.sampled[:] = sampled
        rows.lr_tensor = True
        g = self.layout.block(ring, "g_norm")
        rows.present[:] = g != NO_GRAD
        rows.time[:] = self._step_times(steps)
        if got.losses is not None and len(got.losses):
            # Losses handed over by the host, one per host step since the last flush: the last n.
            k = min(n, len(got.losses))
            ring[n - k:, LOSS] = got.losses[-k:]
            rows.loss_logged[n - k:] = 1.0
        else:
            rows.loss_logged[:] = ring[:, LOSS_GIVEN] == 1.0  # the step wrote its loss (NaN included)
        # Histogram rows of this window's sampled steps: the device wrote sample k at k % hist_rows.
        n_sampled = int(sampled.sum())
        ordinals = np.arange(int(got.sampled) - n_sampled, int(got.sampled))
        usable = ordinals[ordinals >= max(0, int(got.sampled) - self.hist_rows)]
        hist_steps = steps[sampled][len(ordinals) - len(usable):]
        rows.hist_steps = [int(s) for s in hist_steps]
        counts = got.hist[usable % self.hist_rows] if len(usable) else np.zeros((0, self.layout.layers, EXP_BINS))
        self._stored = end
        return derive(ring, n, counts.astype(np.float64), rows, self.layout, self.numel)

    def _step_times(self, steps: np.ndarray) -> np.ndarray:
        """Seconds since the start at each step, from the host's notes (interpolated where a compiled
        loop took several steps per note)."""
        now = time.perf_counter() - self._t0
        if not self._times:
            return np.full(len(steps), now)
        known_steps = np.array([s for s, _ in self._times], np.float64) - 1
        known_times = np.array([t for _, t in self._times], np.float64)
        self._times = self._times[-1:]
        return np.interp(steps.astype(np.float64), known_steps, known_times)


class ArraySession(RunSession):
    """A run of a compiled-step framework: :class:`ArrayStream` streams, each fed by its framework."""

    def __init__(self, out: Any = None, *, config: ProbeConfig | None = None, framework: dict[str, Any] | None = None,
                 **options: Any):
        self.config = config or ProbeConfig()
        info = dict(framework or {})
        super().__init__(out, options={"flush_every": self.config.flush_every,
                                       "sample_every": self.config.sample_every,
                                       **options.pop("record_options", {})},
                         framework=lambda: info, **options)

    def open(self, key: int, layers: Sequence[LayerInfo], info: dict[str, Any], fetch: Callable[[], Fetched],
             label: str | None = None) -> ArrayStream:
        """A new stream of ``layers`` in the run, read through ``fetch`` (see :class:`ArrayStream`)."""
        writer = self._open_stream(layers, info, label=label)
        stream = ArrayStream(self, key, writer, layers, self.config, fetch)
        self._streams[key] = stream
        return stream

    def stream_for(self, key: int) -> ArrayStream | None:
        s = self._streams.get(key)
        return s if isinstance(s, ArrayStream) else None
