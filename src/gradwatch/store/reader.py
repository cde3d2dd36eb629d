"""Reading a run directory back: :func:`load_run` checks ``meta.json`` and reads every complete record
batch of the series files, stopping quietly at a batch torn by a kill."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..errors import RunDirError
from ..files import FORMAT_VERSION, META_FILE
from .run import Run, _StreamData
from .schema import HIST_BINS, LAYER_METRICS, STEP_METRICS, _layer_col


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

