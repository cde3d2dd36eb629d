"""The run directory: its schema, a crash-safe appender, and the reader.

A run directory holds::

    meta.json        format version, layer table, streams, framework versions, options, status
    series-K.arrow   one row per optimizer step of stream K (an optimizer): step metrics as float32
                     columns, layer metrics as fixed-size-list<float32>[layers of K] columns
    hist-K.arrow     sampled steps of stream K: log10|g| histograms, (layers of K) x bins counts
    findings.json    {"format": 1, "findings": [...]}

Series files are Arrow IPC *streams*: a schema followed by one record batch per flush, appended and
flushed to the OS at once. A stream has no footer, so a process killed at any point leaves a file
whose complete batches are all readable; the reader stops quietly at a torn last batch.

This module never imports torch: a run is read and diagnosed on machines without it.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa

from .errors import RunDirError
from .files import FINDINGS_FILE, FORMAT_VERSION, META_FILE, write_json_atomic
from .findings import Finding, read_findings

#: Per-step series (one value per optimizer step).
STEP_METRICS: tuple[str, ...] = (
    "loss", "grad_norm", "lr", "time", "sampled", "loss_logged",
    # What guards did (gradwatch.guards); NaN (0 for the flags) in a run without guards:
    "grad_norm_clipped",  # global norm after every guard acted (grad_norm is the one before)
    "clip_coef",          # grad_norm_clipped / grad_norm
    "clip_threshold",     # the norm threshold in force (ClipNorm's max_norm, ZClip's and AutoClip's)
    "skipped",            # 1 where a guard made the optimizer step a no-op
    "rolled_back",        # 1 where Rollback restored a snapshot before this step
    # Mixed precision (torch.amp.GradScaler); NaN (0 for the flag) without one:
    "amp_scale",          # the loss scale in force at the step
    "amp_skipped",        # 1 where GradScaler skipped the step (inf/NaN in the scaled gradients)
)
#: Step metrics that only guards write.
GUARD_METRICS = ("grad_norm_clipped", "clip_coef", "clip_threshold", "skipped", "rolled_back")
#: Step metrics that only a GradScaler writes.
AMP_METRICS = ("amp_scale", "amp_skipped")
#: Step metrics that are flags: several streams combine them with "any".
_FLAG_METRICS = ("skipped", "rolled_back", "amp_skipped")
#: Step metrics that are global norms: several streams combine them as the norm over all layers.
_NORM_METRICS = ("grad_norm", "grad_norm_clipped")

#: Per-layer series (one value per layer per step; NaN where not computed at that step).
LAYER_METRICS: tuple[str, ...] = (
    "grad_norm",
    "grad_rms",
    "grad_mean",
    "grad_std",
    "grad_maxabs",
    "grad_nonfinite",
    "grad_zero_frac",
    "weight_norm",
    "weight_rms",
    "weight_mean",
    "weight_std",
    "update_ratio",
    "act_dead_frac",
    "act_sat_frac",
    "act_const_frac",
)

#: Gradient histograms have fixed log2 bins, read straight from the float32 exponent: bin k (for
#: 1 <= k <= HIST_EXP_MAX - HIST_EXP_MIN) holds 2^(HIST_EXP_MIN+k-1) <= |g| < 2^(HIST_EXP_MIN+k);
#: bin 0 holds zeros and anything smaller than 2^HIST_EXP_MIN (~9.1e-13); the last bin anything from
#: 2^HIST_EXP_MAX (16384) up, infinities and NaN included.
HIST_EXP_MIN = -40
HIST_EXP_MAX = 14
HIST_BINS = HIST_EXP_MAX - HIST_EXP_MIN + 2


def hist_edges() -> np.ndarray:
    """The log10|g| edges of the stored histogram bins (HIST_BINS + 1 values, the outer two infinite)."""
    inner = np.arange(HIST_EXP_MIN, HIST_EXP_MAX + 1) * np.log10(2.0)
    return np.concatenate([[-np.inf], inner, [np.inf]])


@dataclass(frozen=True)
class LayerInfo:
    """One parameter tensor, named by its owning module path (e.g. ``encoder.3.attn.q_proj.weight``)."""

    name: str
    shape: tuple[int, ...]
    numel: int
    module_type: str
    activation: str | None = None
    dtype: str = "float32"
    trainable: bool = True
    stream: int = 0

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "LayerInfo":
        return cls(
            name=str(d["name"]),
            shape=tuple(int(s) for s in d["shape"]),
            numel=int(d["numel"]),
            module_type=str(d["module_type"]),
            activation=d.get("activation"),
            dtype=str(d.get("dtype", "float32")),
            trainable=bool(d.get("trainable", True)),
            stream=int(d.get("stream", 0)),
        )


@dataclass
class Chunk:
    """One flush of one stream, already on the host: what the appender writes."""

    steps: np.ndarray  # int64 (n,)
    step_values: dict[str, np.ndarray]  # name -> float (n,)
    layer_values: dict[str, np.ndarray]  # name -> float (n, layers of the stream)
    hist_steps: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    hist: np.ndarray | None = None  # float (m, layers, HIST_BINS) at hist_steps

    def __len__(self) -> int:
        return int(self.steps.shape[0])


# --------------------------------------------------------------------------------------- writing


def _layer_col(metric: str) -> str:
    # Step and layer metrics share names ("grad_norm"): layer columns carry a prefix on disk.
    return f"layer/{metric}"


def _series_schema(n_layers: int) -> pa.Schema:
    fields = [pa.field("step", pa.int64())]
    fields += [pa.field(name, pa.float32()) for name in STEP_METRICS]
    fields += [pa.field(_layer_col(name), pa.list_(pa.float32(), n_layers)) for name in LAYER_METRICS]
    return pa.schema(fields)


def _hist_schema(n_layers: int) -> pa.Schema:
    return pa.schema(
        [pa.field("step", pa.int64()), pa.field("hist", pa.list_(pa.float32(), n_layers * HIST_BINS))]
    )


def _fixed_list(values: np.ndarray, width: int) -> pa.Array:
    flat = pa.array(np.ascontiguousarray(values, dtype=np.float32).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, width)


class _ArrowAppender:
    """An Arrow IPC stream file that grows by one record batch per call and is flushed each time."""

    def __init__(self, path: Path, schema: pa.Schema):
        self.path = path
        self.schema = schema
        self._file = open(path, "wb")
        self._writer = pa.ipc.new_stream(self._file, schema)
        self._file.flush()

    def append(self, batch: pa.RecordBatch) -> None:
        self._writer.write_batch(batch)
        # Hand the bytes to the OS now: a SIGKILL after this line loses nothing of this batch.
        self._file.flush()

    def close(self) -> None:
        if self._file.closed:
            return
        self._writer.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


class StreamWriter:
    """The series of one optimizer (a *stream*) in a run directory."""

    def __init__(self, run: "RunWriter", index: int, layer_ids: Sequence[int]):
        self.index = index
        self.layer_ids = list(layer_ids)
        n = len(self.layer_ids)
        self._series = _ArrowAppender(run.path / f"series-{index}.arrow", _series_schema(n))
        self._hist = _ArrowAppender(run.path / f"hist-{index}.arrow", _hist_schema(n))
        self.rows_written = 0

    def append(self, chunk: Chunk) -> None:
        n_layers = len(self.layer_ids)
        if len(chunk):
            cols: list[pa.Array] = [pa.array(np.asarray(chunk.steps, dtype=np.int64))]
            for name in STEP_METRICS:
                cols.append(pa.array(np.asarray(chunk.step_values[name], dtype=np.float32)))
            for name in LAYER_METRICS:
                cols.append(_fixed_list(chunk.layer_values[name], n_layers))
            self._series.append(pa.record_batch(cols, schema=self._series.schema))
            self.rows_written += len(chunk)
        if chunk.hist is not None and len(chunk.hist_steps):
            batch = pa.record_batch(
                [
                    pa.array(np.asarray(chunk.hist_steps, dtype=np.int64)),
                    _fixed_list(chunk.hist, n_layers * HIST_BINS),
                ],
                schema=self._hist.schema,
            )
            self._hist.append(batch)

    def close(self) -> None:
        self._series.close()
        self._hist.close()


class RunWriter:
    """Creates a run directory and keeps its ``meta.json`` current.

    Args:
        path: the run directory; created if missing. An existing run there is an error unless
            ``overwrite`` is true, so one run never silently mixes into another.
        options: the monitoring options, stored for the record.
        framework: framework name and versions, stored for the record.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        options: Mapping[str, Any] | None = None,
        framework: Mapping[str, Any] | None = None,
        overwrite: bool = False,
    ):
        self.path = Path(path)
        if (self.path / META_FILE).exists() and not overwrite:
            raise RunDirError(
                f"{self.path} already holds a gradwatch run; pass another output directory "
                "or overwrite=True (--overwrite) to replace it."
            )
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"{self.path} exists and is not a directory; choose another output path.")
        self.path.mkdir(parents=True, exist_ok=True)
        for old in list(self.path.glob("series-*.arrow")) + list(self.path.glob("hist-*.arrow")):
            old.unlink()
        self.layers: list[LayerInfo] = []
        self.streams: list[dict[str, Any]] = []
        self._writers: list[StreamWriter] = []
        self.meta: dict[str, Any] = {
            "format": FORMAT_VERSION,
            "tool": "gradwatch",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "status": "running",
            "framework": dict(framework or {}),
            "options": dict(options or {}),
            "step_metrics": list(STEP_METRICS),
            "layer_metrics": list(LAYER_METRICS),
            "hist": {"log2_min": HIST_EXP_MIN, "log2_max": HIST_EXP_MAX, "bins": HIST_BINS},
            "layers": [],
            "streams": [],
        }
        write_json_atomic(self.path / FINDINGS_FILE, {"format": FORMAT_VERSION, "findings": []})
        self._write_meta()

    def _write_meta(self) -> None:
        self.meta["layers"] = [dict(asdict(li), shape=list(li.shape)) for li in self.layers]
        self.meta["streams"] = self.streams
        write_json_atomic(self.path / META_FILE, self.meta)

    def add_stream(self, layers: Sequence[LayerInfo], info: Mapping[str, Any], label: str | None = None) -> StreamWriter:
        """Register the layers of one optimizer and open its series files.

        Layer names stay unique in a run: when a new stream's names collide with earlier ones (two
        ``Sequential`` models both have ``0.weight``), every stream's names get its label as a prefix
        (``G/0.weight``, ``D/0.weight``). Names live only in meta.json, so renaming costs nothing.
        """
        index = len(self.streams)
        first = len(self.layers)
        self.layers.extend(replace(li, shape=tuple(li.shape), stream=index) for li in layers)
        ids = list(range(first, len(self.layers)))
        label = label or f"opt{index}"
        if any(st["label"] == label for st in self.streams):
            label = f"{label}{index}"
        self.streams.append({"index": index, "label": label, "layers": ids, **dict(info)})
        names = [li.name for li in self.layers]
        if len(set(names)) < len(names):
            self._prefix_names()
        writer = StreamWriter(self, index, ids)
        self._writers.append(writer)
        self._write_meta()
        return writer

    def _prefix_names(self) -> None:
        for st in self.streams:
            prefix = f"{st['label']}/"
            for i in st["layers"]:
                li = self.layers[i]
                if not li.name.startswith(prefix):
                    self.layers[i] = replace(li, name=prefix + li.name)

    def update_meta(self, **fields: Any) -> None:
        self.meta.update(fields)
        self._write_meta()

    def finish(self, status: str = "finished") -> None:
        for w in self._writers:
            w.close()
        self.meta["status"] = status
        self.meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self._write_meta()


# --------------------------------------------------------------------------------------- reading


def _read_stream_file(path: Path) -> tuple[pa.Table | None, bool]:
    """All complete record batches of an Arrow stream file, and whether its tail was torn."""
    if not path.exists() or path.stat().st_size == 0:
        return None, False
    batches = []
    torn = False
    with pa.memory_map(str(path)) as source:
        try:
            reader = pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            return None, True
        schema = reader.schema
        while True:
            try:
                batches.append(reader.read_next_batch())
            except StopIteration:
                break
            except (pa.ArrowInvalid, OSError):
                torn = True  # killed mid-write: keep every batch before the torn one
                break
        table = pa.Table.from_batches(batches, schema=schema)
    return table, torn


@dataclass
class _StreamData:
    index: int
    layer_ids: list[int]
    steps: np.ndarray
    step_values: dict[str, np.ndarray]
    layer_values: dict[str, np.ndarray]
    hist_steps: np.ndarray
    hist: np.ndarray  # (m, layers, bins)


def _load_stream(path: Path, index: int, layer_ids: list[int]) -> tuple[_StreamData, bool]:
    n = len(layer_ids)
    table, torn = _read_stream_file(path / f"series-{index}.arrow")
    if table is None:
        steps = np.zeros(0, np.int64)
        step_values = {m: np.zeros(0, np.float32) for m in STEP_METRICS}
        layer_values = {m: np.zeros((0, n), np.float32) for m in LAYER_METRICS}
    else:
        steps = table.column("step").to_numpy().astype(np.int64)
        # A metric added to the format after the run was written reads as NaN (not computed).
        step_values = {
            m: table.column(m).to_numpy().astype(np.float32) if m in table.column_names
            else np.full(len(steps), np.nan, np.float32)
            for m in STEP_METRICS
        }
        layer_values = {}
        for m in LAYER_METRICS:
            if _layer_col(m) not in table.column_names:  # added to the format after this run
                layer_values[m] = np.full((len(steps), n), np.nan, np.float32)
                continue
            col = table.column(_layer_col(m)).combine_chunks()
            flat = col.flatten().to_numpy(zero_copy_only=False) if len(col) else np.zeros(0, np.float32)
            layer_values[m] = flat.astype(np.float32).reshape(len(steps), n)
    htable, htorn = _read_stream_file(path / f"hist-{index}.arrow")
    if htable is None or htable.num_rows == 0:
        hist_steps = np.zeros(0, np.int64)
        hist = np.zeros((0, n, HIST_BINS), np.float32)
    else:
        hist_steps = htable.column("step").to_numpy().astype(np.int64)
        flat = htable.column("hist").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        hist = flat.astype(np.float32).reshape(len(hist_steps), n, HIST_BINS)
    return _StreamData(index, layer_ids, steps, step_values, layer_values, hist_steps, hist), torn or htorn


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


def load_run(path: str | os.PathLike[str]) -> Run:
    """Read a run directory written by gradwatch, up to its last flush.

    Raises:
        RunDirError: with one sentence saying what is wrong, when the directory is missing, empty,
            not a gradwatch run, of a newer format, or its metadata is corrupt.
    """
    p = Path(path)
    if not p.exists():
        raise RunDirError(f"{p} does not exist; pass the directory a gradwatch run wrote (its --out).")
    if not p.is_dir():
        raise RunDirError(f"{p} is a file, not a run directory; pass the directory that holds meta.json.")
    meta_path = p / META_FILE
    if not meta_path.exists():
        if not any(p.iterdir()):
            raise RunDirError(f"{p} is empty: no gradwatch run was written there; pass the directory given as out= or --out.")
        raise RunDirError(
            f"{p} is not a gradwatch run directory (it has no {META_FILE}); pass the directory given as out= or --out."
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunDirError(
            f"{meta_path} is corrupt ({e.__class__.__name__} at byte {getattr(e, 'pos', '?')}), so the run cannot be "
            "read; restore the file or record the run again."
        ) from None
    if not isinstance(meta, dict) or meta.get("tool") != "gradwatch" or "layers" not in meta:
        raise RunDirError(f"{meta_path} was not written by gradwatch; pass a gradwatch run directory.")
    version = meta.get("format")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise RunDirError(
            f"{p} has run format {version!r}, newer than this gradwatch reads ({FORMAT_VERSION}); upgrade gradwatch."
        )
    streams: list[_StreamData] = []
    torn = False
    try:
        for s in meta.get("streams", []):
            data, t = _load_stream(p, int(s["index"]), [int(i) for i in s["layers"]])
            streams.append(data)
            torn = torn or t
    except (KeyError, ValueError, TypeError, pa.ArrowException):
        raise RunDirError(
            f"{p} has series files that do not match its {META_FILE} (files from different runs mixed up?); "
            "record the run again or restore the original files."
        ) from None
    return Run(p, meta, streams, torn)

