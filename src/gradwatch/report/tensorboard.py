"""TensorBoard export of a stored run: ``export_tensorboard(run, logdir)``.

What is written, into one event file in ``logdir`` (read it with ``tensorboard --logdir LOGDIR``):

* step scalars, one per recorded optimizer step: ``loss`` (where logged), ``grad_norm`` (the global
  gradient norm) and ``lr`` — and any further per-step series the run holds (clip coefficients,
  skipped steps), under their own names. The bookkeeping series ``time``, ``sampled`` and
  ``loss_logged`` are not exported; ``time`` gives each event its wall time instead.
* layer scalars, tagged ``<metric>/<layer name>`` with layer names as stored (dots and slashes
  kept): ``grad_norm/<layer>`` and ``grad_rms/<layer>`` at every step, ``update_ratio/<layer>``
  (‖Δw‖/‖w‖) at the sampled steps.
* histograms of log10|g| per layer, tagged ``grad_log10_abs/<layer>``, at the sampled steps, with
  gradwatch's own log2 bins and counts (no resampling). The two outer bins are open-ended in the
  run (zeros and |g| < 2^-40; |g| >= 2^14 and non-finite values): here they are one bin width wide.
  ``sum`` and ``sum_squares`` of a histogram are estimated from bin centres.

Values that were not computed (NaN) are skipped everywhere, so a sampled-only metric has events at
the sampled steps alone; a NaN loss or gradient norm is skipped too (the diagnosis reports those).
The step axis is the optimizer step. Needs the ``tensorboard`` package (``gradwatch[tensorboard]``);
the writer is that package's own ``RecordWriter`` and protobufs on a plain file (neither torch nor
tensorflow is imported). :class:`EventWriter` also writes the live sink's events
(``watch(..., log_to=["tensorboard"])``, ``gradwatch.sinks.tensorboard``) as each window is stored.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

import numpy as np

from ..errors import GradwatchError
from ..store import AMP_METRICS, GUARD_METRICS, LAYER_METRICS, STEP_METRICS, Run, load_run

#: Per-layer metrics exported by default: the every-step gradient scale and the sampled update ratio.
DEFAULT_LAYER_METRICS: tuple[str, ...] = ("grad_norm", "grad_rms", "update_ratio")

#: Step series that describe the recording rather than the training; not exported as scalars.
_BOOKKEEPING = frozenset({"time", "sampled", "loss_logged"})

HIST_TAG = "grad_log10_abs"

_uids = itertools.count()


_MISSING = (
    "TensorBoard export needs the tensorboard package; install it with `pip install gradwatch[tensorboard]`."
)


def created_at(meta: dict) -> float | None:
    """The run's start (``meta.json``'s ``created``) in seconds since the epoch, or None if unreadable."""
    try:
        return datetime.strptime(str(meta.get("created")), "%Y-%m-%dT%H:%M:%S%z").timestamp()
    except ValueError:
        return None


def _walltimes(run: Run) -> np.ndarray:
    """Seconds since the epoch for each recorded step: the run's start plus its ``time`` series."""
    base = created_at(run.meta)
    if base is None:
        base = (run.path / "meta.json").stat().st_mtime if (run.path / "meta.json").exists() else 0.0
    t = run.step_series("time").astype(np.float64)
    # Steps without a time (never, today) take the last known one; time never runs backwards.
    t = np.maximum.accumulate(np.where(np.isfinite(t), t, -np.inf)) if len(t) else t
    return base + np.where(np.isfinite(t), t, 0.0)


def finite_histogram(counts: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """One layer's stored counts without the empty bins at either end, and their edges with the open
    outer ones made one bin width wide (float64); None when there are no counts."""
    if not np.all(np.isfinite(counts)) or counts.sum() <= 0:
        return None
    nz = np.flatnonzero(counts > 0)
    lo, hi = int(nz[0]), int(nz[-1]) + 1
    e = edges.astype(np.float64).copy()
    width = e[2] - e[1]
    e[0], e[-1] = e[1] - width, e[-2] + width
    return counts[lo:hi].astype(np.float64), e[lo : hi + 1]


def _histogram(counts: np.ndarray, edges: np.ndarray) -> dict | None:
    """``HistogramProto`` fields for one layer's stored counts, or None when there are none.

    Empty bins at either end are dropped, so that TensorBoard, which takes a histogram's ``min`` as
    the left edge of its first bucket and ``max`` as the right edge of its last, draws every bucket
    exactly where gradwatch counted it.
    """
    h = finite_histogram(counts, edges)
    if h is None:
        return None
    c, e = h
    centres = (e[:-1] + e[1:]) / 2
    return dict(
        min=float(e[0]),
        max=float(e[-1]),
        num=float(c.sum()),
        sum=float((c * centres).sum()),
        sum_squares=float((c * centres**2).sum()),
        bucket_limit=[float(x) for x in e[1:]],
        bucket=[float(x) for x in c],
    )


def export_tensorboard(
    run: Run | str | os.PathLike[str],
    logdir: str | os.PathLike[str],
    *,
    layer_metrics: Sequence[str] = DEFAULT_LAYER_METRICS,
    histograms: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write a stored run as TensorBoard events into ``logdir``; returns ``logdir``.

    Args:
        run: a :class:`~gradwatch.Run` or the path of a run directory.
        logdir: the directory to write to (created if missing); point ``tensorboard --logdir`` at it
            or at a directory above it.
        layer_metrics: the per-layer metrics written as ``<metric>/<layer>`` scalars (names of
            ``gradwatch.LAYER_METRICS``).
        histograms: write the log10|g| histograms of the sampled steps.
        overwrite: replace the event files already in ``logdir``; without it, a ``logdir`` that
            already holds events is an error (TensorBoard would show both exports overlaid).

    Raises:
        GradwatchError: the tensorboard package is missing, a metric name is unknown, or ``logdir``
            already holds TensorBoard events and ``overwrite`` is false.
    """
    tb = EventWriter.protos()  # the package is there (or one sentence says it is not) before any file is touched
    if not isinstance(run, Run):
        run = load_run(run)
    unknown = [m for m in layer_metrics if m not in LAYER_METRICS]
    if unknown:
        raise GradwatchError(
            f"unknown layer metric {unknown[0]!r} for the TensorBoard export; known layer metrics: "
            f"{', '.join(LAYER_METRICS)}."
        )
    out = Path(logdir)
    if out.exists() and not out.is_dir():
        raise GradwatchError(f"{out} exists and is not a directory; pass a directory for the TensorBoard events.")
    old = sorted(out.glob("events.out.tfevents.*")) if out.is_dir() else []
    if old and not overwrite:
        raise GradwatchError(
            f"{out} already holds TensorBoard events ({old[0].name}); pass another logdir or overwrite=True."
        )
    for f in old:
        f.unlink()
    out.mkdir(parents=True, exist_ok=True)

    steps = run.steps
    walltime = _walltimes(run)
    names = [layer.name for layer in run.layers]
    guarded = any(st.get("guards") for st in run.streams)
    scaled = bool(np.isfinite(run.step_series("amp_scale")).any())  # a GradScaler was seen
    step_values = {
        m: run.step_series(m)
        for m in STEP_METRICS
        if m not in _BOOKKEEPING
        and (guarded or m not in GUARD_METRICS)  # no guards: nothing to show
        and (scaled or m not in AMP_METRICS)  # no GradScaler: nothing to show
    }
    layer_values = {m: run.layer_series(m) for m in layer_metrics}

    writer = EventWriter(out, tb)
    try:
        writer.scalars(steps, walltime, step_values, layer_values, names)
        if histograms:
            hsteps, counts, edges = run.histograms()
            rows = np.searchsorted(steps, hsteps)
            wt = [float(walltime[r]) if r < len(steps) and steps[r] == s else None
                  for r, s in zip(rows.tolist(), hsteps.tolist())]
            writer.histograms(hsteps, wt, counts, edges, names)
    finally:
        writer.close()
    return out


class EventWriter:
    """An event file in ``logdir``, written with the tensorboard package's own writer and protobufs:
    the export above writes a whole run with it, the live sink (``gradwatch.sinks.tensorboard``)
    each flushed window."""

    @staticmethod
    def protos() -> Any:
        """The tensorboard package's event protobufs and record writer (one sentence if it is missing)."""
        try:
            from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
            from tensorboard.summary.writer.record_writer import RecordWriter
        except ImportError:
            raise GradwatchError(_MISSING) from None
        return SimpleNamespace(Event=event_pb2.Event, Summary=summary_pb2.Summary, HistogramProto=summary_pb2.HistogramProto,
                               SummaryMetadata=summary_pb2.SummaryMetadata, TensorProto=tensor_pb2.TensorProto,
                               TensorShapeProto=tensor_shape_pb2.TensorShapeProto, DT_STRING=types_pb2.DT_STRING,
                               RecordWriter=RecordWriter)

    def __init__(self, logdir: Path, tb: Any = None, suffix: str = ""):
        # The tensorboard package's own EventFileWriter would import TensorFlow where it is installed (its
        # tf.io.gfile), seconds and a gigabyte in a training process; its RecordWriter on a plain file writes
        # the same records.
        self.tb = tb or self.protos()
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{next(_uids)}{suffix}"
        self.path = Path(logdir) / name
        self._records = self.tb.RecordWriter(open(self.path, "wb"))
        self._records.write(self.tb.Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString())
        self._records.flush()

    def _add(self, values: list, step: int, walltime: float | None) -> None:
        """One event holding ``values`` at ``step``; no wall time means now."""
        event = self.tb.Event(wall_time=time.time() if walltime is None else walltime, step=step,
                              summary=self.tb.Summary(value=values))
        self._records.write(event.SerializeToString())

    def scalars(self, steps: np.ndarray, walltime: np.ndarray, step_values: dict[str, np.ndarray],
                layer_values: dict[str, np.ndarray], names: Sequence[str], extra: dict[str, np.ndarray] | None = None) -> None:
        """Step scalars by name, ``<metric>/<layer>`` for the columns of ``layer_values`` (one per name of
        ``names``), and ``extra`` scalars; NaN values are left out. One event per step carrying all of that
        step's scalars: the same records TensorBoard reads from add_scalar, at a seventh of the cost."""
        Value = self.tb.Summary.Value
        series = {**step_values, **(extra or {})}
        for row, step in enumerate(np.asarray(steps).tolist()):
            values = [Value(tag=m, simple_value=float(v[row])) for m, v in series.items() if not np.isnan(v[row])]
            for m, v in layer_values.items():
                line = v[row]
                for i in np.flatnonzero(~np.isnan(line)).tolist():
                    values.append(Value(tag=f"{m}/{names[i]}", simple_value=float(line[i])))
            if values:
                self._add(values, int(step), float(walltime[row]))

    def histograms(self, hsteps: np.ndarray, walltime: Sequence[float | None], counts: np.ndarray, edges: np.ndarray,
                   names: Sequence[str]) -> None:
        """``grad_log10_abs/<layer>`` at each step of ``hsteps`` (``counts``: steps x layers x bins)."""
        for k, step in enumerate(np.asarray(hsteps).tolist()):
            for i, name in enumerate(names):
                h = _histogram(counts[k, i], edges)
                if h is not None:
                    value = self.tb.Summary.Value(tag=f"{HIST_TAG}/{name}", histo=self.tb.HistogramProto(**h))
                    self._add([value], int(step), walltime[k])

    def text(self, tag: str, text: str, step: int, walltime: float | None = None) -> None:
        """A text summary (TensorBoard's Text tab) at ``step``."""
        tb = self.tb
        meta = tb.SummaryMetadata(plugin_data=tb.SummaryMetadata.PluginData(plugin_name="text"))
        tensor = tb.TensorProto(dtype=tb.DT_STRING, string_val=[text.encode()],
                                tensor_shape=tb.TensorShapeProto(dim=[tb.TensorShapeProto.Dim(size=1)]))
        self._add([tb.Summary.Value(tag=tag, metadata=meta, tensor=tensor)], int(step), walltime)

    def flush(self) -> None:
        """Hand everything added so far to the file (a reader sees it after this)."""
        self._records.flush()

    def close(self) -> None:
        if not self._records.closed:
            try:
                self._records.flush()
            finally:
                self._records.close()
