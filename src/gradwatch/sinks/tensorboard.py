"""TensorBoard, live: each flushed window appended to an event file as the run goes.

The file is ``events.out.tfevents.*.gradwatch`` in ``logdir`` (the sink's option), else the
watch's ``tensorboard=`` directory, else ``<run directory>/tensorboard``. Tags are the export's
(:mod:`gradwatch.report.tensorboard`) for the chosen layers, plus ``layers/<metric>_<stat>`` over
all layers and each finding as a text summary ``findings/<kind>`` at its first step.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..findings import Finding
from ..report.tensorboard import EventWriter
from ..sinks_hub import RunContext, RunEnd, Sink
from ..sinks_window import Window, finding_tag, finding_text

SUFFIX = ".gradwatch"


class TensorBoardSink(Sink):
    label = "TensorBoard"
    tensorboard = True

    def __init__(self, layers: object = "key", logdir: str | os.PathLike[str] | None = None):
        super().__init__(layers)
        self.logdir = Path(logdir) if logdir is not None else None
        self.writer: EventWriter | None = None

    def open(self, run: RunContext) -> None:
        path = self.logdir or run.tensorboard or run.out / "tensorboard"
        path.mkdir(parents=True, exist_ok=True)
        for old in path.glob(f"events.out.tfevents.*{SUFFIX}"):  # this sink's file of an earlier run into path
            old.unlink()
        self.writer = EventWriter(path, suffix=SUFFIX)

    def write(self, window: Window) -> None:
        assert self.writer is not None
        idx = self.layers.pick(window.layers, window.named)
        names = [window.layers[i].name for i in idx]
        self.writer.scalars(window.steps, window.walltime, window.step_values,
                            {m: v[:, idx] for m, v in window.layer_values.items()}, names, extra=window.over_layers)
        wt = [window.walltime_at(s) for s in window.hist_steps.tolist()]
        self.writer.histograms(window.hist_steps, wt, window.hist[:, idx], window.edges, names)
        self.writer.flush()

    def findings(self, new: list[Finding], step: int) -> None:
        assert self.writer is not None
        for f in new:
            self.writer.text(finding_tag(f.kind), finding_text(f, step), f.first_step)
        self.writer.flush()

    def close(self, end: RunEnd) -> None:
        if self.writer is not None:
            self.writer.close()

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.close()
