"""A stored run in memory: :class:`Run` merges the series of its streams (optimizers) into one step axis."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..errors import RunDirError
from ..findings import Finding, read_findings
from .schema import _FLAG_METRICS, _NORM_METRICS, HIST_BINS, LAYER_METRICS, STEP_METRICS, LayerInfo, hist_edges


@dataclass
class _StreamData:
    index: int
    layer_ids: list[int]
    steps: np.ndarray
    step_values: dict[str, np.ndarray]
    layer_values: dict[str, np.ndarray]
    hist_steps: np.ndarray
    hist: np.ndarray  # (m, layers, bins)



class Run:
    """A stored run, read back as numpy arrays. Use :func:`load_run` to get one.

    With several optimizers (streams, e.g. a GAN's generator and discriminator), ``steps`` is the
    union of their step numbers: row ``t`` holds each optimizer's ``t``-th step, and a layer's series
    is NaN at steps its optimizer did not take.
    """

    def __init__(self, path: Path, meta: dict[str, Any], streams: list[_StreamData], torn: bool):
        self.path = path
        self.meta = meta
        self.torn = torn
        self.layers: list[LayerInfo] = [LayerInfo.from_json(d) for d in meta["layers"]]
        self._streams = streams
        all_steps = [s.steps for s in streams]
        self.steps: np.ndarray = (
            np.unique(np.concatenate(all_steps)).astype(np.int64) if all_steps else np.zeros(0, np.int64)
        )

    # -- metadata
    @property
    def status(self) -> str:
        """``running`` (the writer was killed or is still going), ``finished``, or ``crashed``."""
        return str(self.meta.get("status", "unknown"))

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.meta.get("options", {}))

    @property
    def streams(self) -> list[dict[str, Any]]:
        return list(self.meta.get("streams", []))

    def layer_index(self, name: str) -> int:
        for i, layer in enumerate(self.layers):
            if layer.name == name:
                return i
        raise KeyError(f"no layer named {name!r} in {self.path}; layers are: {[layer.name for layer in self.layers]}")

    # -- series
    def _rows(self, stream: _StreamData) -> np.ndarray:
        return np.searchsorted(self.steps, stream.steps)

    def step_series(self, name: str) -> np.ndarray:
        """One value per entry of ``steps`` (float32).

        With several streams: ``grad_norm`` (and ``grad_norm_clipped``) is the global norm over all of
        their layers, ``skipped`` and ``rolled_back`` are 1 where any stream's are, ``clip_coef`` is
        the ratio of the two merged norms, ``loss`` the first logged value at that step, the rest
        stream 0's where it stepped.
        """
        if name not in STEP_METRICS:
            raise KeyError(f"unknown step metric {name!r}; known step metrics: {', '.join(STEP_METRICS)}")
        out = np.full(len(self.steps), np.nan, np.float64)
        if name == "clip_coef" and len(self._streams) > 1:
            with np.errstate(divide="ignore", invalid="ignore"):
                return (self.step_series("grad_norm_clipped") / self.step_series("grad_norm")).astype(np.float32)
        if name in _FLAG_METRICS:
            for s in self._streams:
                rows = self._rows(s)
                out[rows] = np.fmax(out[rows], s.step_values[name])
        elif name in _NORM_METRICS:
            sq = np.full(len(self.steps), np.nan, np.float64)
            for s in self._streams:
                rows = self._rows(s)
                v = s.step_values[name].astype(np.float64) ** 2
                sq[rows] = np.where(np.isnan(sq[rows]), v, sq[rows] + v)
            out = np.sqrt(sq)
        else:
            for s in self._streams:
                rows = self._rows(s)
                cur = out[rows]
                out[rows] = np.where(np.isnan(cur), s.step_values[name], cur)
        return out.astype(np.float32)

    def layer_series(self, name: str) -> np.ndarray:
        """Array of shape ``(len(steps), len(layers))`` (float32); NaN where not computed."""
        if name not in LAYER_METRICS:
            raise KeyError(f"unknown layer metric {name!r}; known layer metrics: {', '.join(LAYER_METRICS)}")
        out = np.full((len(self.steps), len(self.layers)), np.nan, np.float32)
        for s in self._streams:
            out[np.ix_(self._rows(s), s.layer_ids)] = s.layer_values[name]
        return out

    def histograms(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(steps, counts, edges)``: counts of log10|g| of shape ``(len(steps), len(layers), bins)``
        at the sampled steps (NaN for layers of streams not sampled then), and the log10 bin edges."""
        hsteps = np.unique(np.concatenate([s.hist_steps for s in self._streams])) if self._streams else np.zeros(0, np.int64)
        out = np.full((len(hsteps), len(self.layers), HIST_BINS), np.nan, np.float32)
        for s in self._streams:
            rows = np.searchsorted(hsteps, s.hist_steps)
            out[np.ix_(rows, s.layer_ids)] = s.hist
        return hsteps.astype(np.int64), out, hist_edges()

    @property
    def findings(self) -> list[Finding]:
        """The :class:`~gradwatch.findings.Finding` list of ``findings.json`` (empty until diagnosed)."""
        return read_findings(self.path)

    def until(self, step: int) -> "Run":
        """This run as it stood at ``step``: every stream's records up to it, nothing after.
        (The online diagnosis reads a run of several streams this way, up to the step that all of
        them have stored, so that one optimizer's window is not read before the other's arrived.)"""
        streams = []
        for sd in self._streams:
            keep, hkeep = sd.steps <= step, sd.hist_steps <= step
            streams.append(_StreamData(sd.index, sd.layer_ids, sd.steps[keep],
                                       {k: v[keep] for k, v in sd.step_values.items()},
                                       {k: v[keep] for k, v in sd.layer_values.items()},
                                       sd.hist_steps[hkeep], sd.hist[hkeep]))
        return Run(self.path, self.meta, streams, self.torn)

    def to_pandas(self, metrics: Iterable[str] | None = None):
        """A long table (step, layer, metric columns...), needs pandas (``pip install pandas``)."""
        try:
            import pandas as pd
        except ImportError:
            raise RunDirError("Run.to_pandas() needs pandas; install it with `pip install pandas`.") from None
        names = list(metrics) if metrics is not None else list(LAYER_METRICS)
        n_steps, n_layers = len(self.steps), len(self.layers)
        frame = {
            "step": np.repeat(self.steps, n_layers),
            "layer": np.tile(np.array([layer.name for layer in self.layers], dtype=object), n_steps),
        }
        for m in names:
            frame[m] = self.layer_series(m).reshape(-1)
        return pd.DataFrame(frame)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, layers={len(self.layers)}, steps={len(self.steps)}, status={self.status!r})"

