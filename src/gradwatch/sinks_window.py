"""What a live sink is given at each flush, and what its charts are called.

A :class:`Window` is the rows that every stream of the run has stored since the last one, merged
the way the stored run merges them (:class:`gradwatch.store.Run`: the global norm over every
stream's layers, the first logged loss, ...), so that what TensorBoard, W&B or MLflow show equals
what ``load_run`` reads. It is built from the host windows the streams already stored: no device
read. :class:`LayerChoice` says which layers get charts of their own.

Chart names (the same in every sink; W&B and MLflow put ``gradwatch/`` in front):

=============================  ============================================================
``loss``, ``grad_norm``, ...   step metrics (:data:`gradwatch.store.STEP_METRICS`, without the
                               bookkeeping ``time``, ``sampled``, ``loss_logged``; what guards
                               and a GradScaler did only in runs that have them)
``<metric>/<layer>``           ``grad_norm``, ``grad_rms`` every step, ``update_ratio`` at
                               sampled steps, for the chosen layers
``layers/<metric>_<stat>``     ``grad_rms`` and ``update_ratio`` over all layers: ``min``,
                               ``median``, ``max``
``grad_log10_abs/<layer>``     histogram of log10|g| at sampled steps, chosen layers
``findings/<kind>``            a finding, as text (TensorBoard)
=============================  ============================================================
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .errors import GradwatchError
from .store import AMP_METRICS, GUARD_METRICS, STEP_METRICS, Chunk, LayerInfo, hist_edges
from .report.tensorboard import created_at
from .store.run import Run, _StreamData

#: Per-layer metrics that chosen layers get charts of.
LAYER_CHARTS: tuple[str, ...] = ("grad_norm", "grad_rms", "update_ratio")
#: Per-layer metrics summarised over all layers at each step, and the statistics taken.
OVER_LAYERS: tuple[str, ...] = ("grad_rms", "update_ratio")
OVER_STATS: tuple[str, ...] = ("min", "median", "max")
HIST_TAG = "grad_log10_abs"
#: Step series that describe the recording, not the training.
BOOKKEEPING = frozenset({"time", "sampled", "loss_logged"})


def layer_tag(metric: str, layer: str) -> str:
    return f"{metric}/{layer}"


def over_layers_tag(metric: str, stat: str) -> str:
    return f"layers/{metric}_{stat}"


def hist_tag(layer: str) -> str:
    return f"{HIST_TAG}/{layer}"


def finding_tag(kind: str) -> str:
    return f"findings/{kind}"


@dataclass
class Window:
    """Rows of the run, merged over its streams, in the stored run's units."""

    steps: np.ndarray  # int64 (n,)
    walltime: np.ndarray  # float64 (n,): seconds since the epoch
    step_values: dict[str, np.ndarray]  # step metric -> (n,); NaN where not recorded
    layers: list[LayerInfo]  # every layer of the run so far
    layer_values: dict[str, np.ndarray]  # LAYER_CHARTS metric -> (n, len(layers))
    over_layers: dict[str, np.ndarray]  # over_layers_tag -> (n,)
    hist_steps: np.ndarray  # int64 (m,)
    hist: np.ndarray  # (m, len(layers), bins): counts of log10|g|, NaN for layers not sampled then
    named: frozenset[str] = field(default_factory=frozenset)  # layers named in findings so far

    def __len__(self) -> int:
        return int(self.steps.shape[0])

    @property
    def edges(self) -> np.ndarray:
        return hist_edges()

    def scalars(self, idx: Sequence[int]) -> Iterator[tuple[int, int, dict[str, float]]]:
        """Per row: its index, its step and its recorded scalars by chart name (the step metrics, the
        over-layers summaries, the per-layer metrics of layers ``idx``); values not recorded left out."""
        names = [self.layers[i].name for i in idx]
        series = {**self.step_values, **self.over_layers}
        for row, step in enumerate(self.steps.tolist()):
            values = {m: float(v[row]) for m, v in series.items() if v[row] == v[row]}
            for m, v in self.layer_values.items():
                values.update({layer_tag(m, n): x for n, x in zip(names, v[row, idx].tolist()) if x == x})
            yield row, step, values

    def walltime_at(self, step: int) -> float | None:
        row = int(np.searchsorted(self.steps, step))
        return float(self.walltime[row]) if row < len(self.steps) and self.steps[row] == step else None


class LayerChoice:
    """Which layers get charts of their own: ``"key"`` (default: the first and the last weight
    layer, and the layers findings name — the first four of each — from the flush they are named
    on), ``"all"``, or a list of layer names and name prefixes (``["encoder.0.", "head.weight"]``),
    plus the named layers."""

    def __init__(self, spec: Any = "key"):
        if isinstance(spec, str) and spec in ("key", "all"):
            self.mode, self.prefixes = spec, ()
        elif isinstance(spec, (list, tuple)) and spec and all(isinstance(p, str) for p in spec):
            self.mode, self.prefixes = "list", tuple(spec)
        else:
            raise GradwatchError(f'layers= takes "key", "all" or a list of layer names or prefixes; got {spec!r}.')

    def pick(self, layers: Sequence[LayerInfo], named: frozenset[str] = frozenset()) -> list[int]:
        if self.mode == "all":
            return list(range(len(layers)))
        chosen = {i for i, layer in enumerate(layers) if layer.name in named}
        if self.mode == "list":
            chosen |= {i for i, layer in enumerate(layers) if layer.name.startswith(self.prefixes)}
        else:
            weights = [i for i, layer in enumerate(layers) if len(layer.shape) >= 2] or list(range(len(layers)))
            chosen |= {weights[0], weights[-1]} if weights else set()
        return sorted(chosen)


#: Rows a stream may hold back waiting for the other streams (an optimizer that steps far more often
#: than another, or one left idle after a phase); beyond it the stream's rows go out on their own.
MAX_WAITING_ROWS = 4096


class Merger:
    """Holds each stream's stored windows until every stream has stored their steps, then merges
    them into a :class:`Window` exactly as :class:`gradwatch.store.Run` merges the stored series.
    A stream holding more than :data:`MAX_WAITING_ROWS` rows sends them without waiting (bounded
    memory and copying; those steps may then reach a sink twice, once per stream)."""

    def __init__(self) -> None:
        self._pending: dict[int, tuple[list[int], list[Chunk]]] = {}
        self._scaled = False  # a GradScaler's scale was seen: its series are shown from then on

    def add(self, index: int, layer_ids: Sequence[int], chunk: Chunk) -> None:
        if len(chunk):
            self._pending.setdefault(index, (list(layer_ids), []))[1].append(chunk)

    def take(self, layers: Sequence[LayerInfo], meta: dict[str, Any], upto: float,
             named: frozenset[str] = frozenset()) -> Window | None:
        """The rows of steps up to ``upto`` (every stream has stored them), or None if there are none."""
        streams = []
        for index, (ids, chunks) in sorted(self._pending.items()):  # in the run's order, as the stored run merges
            waiting = sum(len(c) for c in chunks)
            data, rest = _split(index, ids, chunks, upto if waiting <= MAX_WAITING_ROWS else float("inf"))
            if data is not None:
                streams.append(data)
            if rest:
                self._pending[index] = (ids, rest)
            else:
                del self._pending[index]
        if not streams:
            return None
        infos = [{"name": x.name, "shape": list(x.shape), "numel": x.numel, "module_type": x.module_type}
                 for x in layers]
        run = Run(Path("."), {"layers": infos}, streams, torn=False)
        guarded = any(st.get("guards") for st in meta.get("streams", []))
        self._scaled = self._scaled or bool(np.isfinite(run.step_series("amp_scale")).any())
        step_values = {m: run.step_series(m) for m in STEP_METRICS
                       if m not in BOOKKEEPING and (guarded or m not in GUARD_METRICS)
                       and (self._scaled or m not in AMP_METRICS)}
        layer_values = {m: run.layer_series(m) for m in LAYER_CHARTS}
        over: dict[str, np.ndarray] = {}
        with warnings.catch_warnings():  # a row with no value at all (update ratios between samples) is NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            for m in OVER_LAYERS:
                v = layer_values[m]
                for stat, fn in zip(OVER_STATS, (np.nanmin, np.nanmedian, np.nanmax)):
                    over[over_layers_tag(m, stat)] = fn(v, axis=1) if v.shape[1] else np.full(len(v), np.nan)
        hsteps, hist, _ = run.histograms()
        t = np.nan_to_num(run.step_series("time").astype(np.float64), nan=0.0)
        start = created_at(meta)
        if start is None:  # the run is going on: its start is now less the time it has recorded
            start = time.time() - float(t.max(initial=0.0))
        return Window(steps=run.steps, walltime=start + t,
                      step_values=step_values, layers=list(run.layers), layer_values=layer_values,
                      over_layers=over, hist_steps=hsteps, hist=hist, named=named)


def _split(index: int, ids: list[int], chunks: list[Chunk], upto: float) -> tuple[_StreamData | None, list[Chunk]]:
    """One stream's pending chunks as stored data up to ``upto`` and the chunks (parts) after it."""
    steps = np.concatenate([c.steps for c in chunks])
    keep = steps <= upto
    hsteps = np.concatenate([c.hist_steps for c in chunks])
    hists = [c.hist for c in chunks if c.hist is not None and len(c.hist_steps)]
    hist = np.concatenate(hists) if hists else np.zeros((0, len(ids), len(hist_edges()) - 1), np.float32)
    hkeep = hsteps <= upto
    # float32, as the store writes them: then merged norms equal the stored run's to the bit
    step_values = {m: np.concatenate([c.step_values[m] for c in chunks]).astype(np.float32) for m in STEP_METRICS}
    layer_values = {m: np.concatenate([c.layer_values[m] for c in chunks]).astype(np.float32) for m in LAYER_CHARTS}
    rest = []
    if not keep.all():
        rest.append(Chunk(steps=steps[~keep], step_values={m: v[~keep] for m, v in step_values.items()},
                          layer_values={m: v[~keep] for m, v in layer_values.items()},
                          hist_steps=hsteps[~hkeep], hist=hist[~hkeep]))
    if not keep.any():
        return None, rest
    return _StreamData(index, ids, steps[keep], {m: v[keep] for m, v in step_values.items()},
                       {m: v[keep] for m, v in layer_values.items()}, hsteps[hkeep], hist[hkeep]), rest


def finding_text(f: Any, step: int) -> str:
    """A finding in a few sentences: what, where, when, the first remedy (a text summary, an alert)."""
    tip = f" Try: {f.remedies[0].call()}." if f.remedies else ""
    shown = ", ".join(f.layers[:6]) + (f" and {len(f.layers) - 6} more" if len(f.layers) > 6 else "")
    where = f" Layers: {shown}." if shown else ""
    return (f"{f.severity}: {f.summary}{tip}{where} Steps {f.first_step}-{f.last_step}; found with the run "
            f"stored up to step {step}.")
