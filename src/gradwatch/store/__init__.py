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

The modules: ``schema`` (metric names, histogram bins, :class:`LayerInfo`, the Arrow schemas),
``writer`` (:class:`Chunk`, :class:`StreamWriter`, :class:`RunWriter`), ``run`` (:class:`Run`, the
series merged over streams) and ``reader`` (:func:`load_run`).

This package never imports torch: a run is read and diagnosed on machines without it.
"""

from __future__ import annotations

from .reader import load_run
from .run import Run
from .schema import (
    AMP_METRICS,
    GUARD_METRICS,
    HIST_BINS,
    HIST_EXP_MAX,
    HIST_EXP_MIN,
    LAYER_METRICS,
    STEP_METRICS,
    LayerInfo,
    hist_edges,
)
from .writer import Chunk, RunWriter, StreamWriter

__all__ = [
    "AMP_METRICS",
    "GUARD_METRICS",
    "HIST_BINS",
    "HIST_EXP_MAX",
    "HIST_EXP_MIN",
    "LAYER_METRICS",
    "STEP_METRICS",
    "Chunk",
    "LayerInfo",
    "Run",
    "RunWriter",
    "StreamWriter",
    "hist_edges",
    "load_run",
]
