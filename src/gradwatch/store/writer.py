"""The writing side of a run directory: a :class:`Chunk` per flush, appended by each optimizer's
:class:`StreamWriter` to its Arrow stream files, and the :class:`RunWriter` that creates the directory
and keeps ``meta.json`` current."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa

from ..errors import RunDirError
from ..files import FINDINGS_FILE, FORMAT_VERSION, META_FILE, write_json_atomic
from .schema import (
    HIST_BINS,
    HIST_EXP_MAX,
    HIST_EXP_MIN,
    LAYER_METRICS,
    STEP_METRICS,
    LayerInfo,
    _hist_schema,
    _series_schema,
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

