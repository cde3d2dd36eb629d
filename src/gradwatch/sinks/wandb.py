"""Weights & Biases, live: every recorded step as a row of the run, each finding as an alert.

Logs into the sink's ``run`` option, else the active run (``wandb.run`` when the first window is
stored: the script's own, the HF Trainer's or Lightning's ``WandbLogger``'s); with none, starts one (project ``WANDB_PROJECT`` or
``gradwatch``, named after the run directory), offline when ``WANDB_MODE`` says so or when there
is no W&B login or no route to its server, and finishes it at the end. Charts are ``gradwatch/...``
(:mod:`gradwatch.sinks_window`) against the x-axis ``gradwatch/step``, the optimizer step, so they
do not disturb the run's own step. Findings: one ``run.alert`` each, at its severity, and the list
in the run summary (``gradwatch/findings``). At the end ``report.html`` and ``findings.json`` are
saved with the run as ``<run directory name>/report.html`` and ``.../findings.json``.
"""

from __future__ import annotations

import netrc
import os
import socket
import sys
from typing import Any
from urllib.parse import urlparse

from ..findings import Finding
from ..report.tensorboard import finite_histogram
from ..sinks_hub import RunContext, RunEnd, Sink
from ..sinks_window import Window, finding_text, hist_tag

PREFIX = "gradwatch/"
LEVELS = {"info": "INFO", "warning": "WARN", "error": "ERROR"}


def offline_reason() -> str | None:
    """Why a new run must be offline (no login, no route to the server), or None."""
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    if not os.environ.get("WANDB_API_KEY"):
        try:
            if netrc.netrc(os.environ.get("NETRC")).authenticators(host) is None:
                return "no W&B login found (WANDB_API_KEY or `wandb login`)"
        except (OSError, netrc.NetrcParseError):
            return "no W&B login found (WANDB_API_KEY or `wandb login`)"
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError:
        return f"no route to {host}"
    return None


def summary_of(findings: list[Finding]) -> list[dict[str, Any]]:
    return [{"kind": f.kind, "severity": f.severity, "first_step": f.first_step, "last_step": f.last_step,
             "layers": list(f.layers[:20]), "summary": f.summary} for f in findings]


class WandbSink(Sink):
    label = "W&B"

    def __init__(self, layers: object = "key", project: str | None = None, entity: str | None = None,
                 name: str | None = None, mode: str | None = None, run: Any = None):
        super().__init__(layers)
        self.project, self.entity, self.name, self.mode = project, entity, name, mode
        self.run: Any = None
        self.own = False
        self._given: Any = run  # a run to log into, else the active one
        self._known: dict[str, Finding] = {}

    def capture(self) -> None:
        wandb = sys.modules.get("wandb")
        if self._given is None and wandb is not None:
            self._given = getattr(wandb, "run", None)

    def open(self, run: RunContext) -> None:
        import wandb

        self._wandb = wandb
        self.run = self._given or wandb.run
        if self.run is None:
            mode, why = self.mode, None
            if mode is None and not os.environ.get("WANDB_MODE"):
                why = offline_reason()
                mode = "offline" if why else None
            self.run = wandb.init(project=self.project or os.environ.get("WANDB_PROJECT") or "gradwatch",
                                  entity=self.entity, name=self.name or run.out.name, mode=mode,
                                  config={"gradwatch_run_dir": str(run.out)})
            self.own = True
            if why:
                print(f"gradwatch: {why}; logging to W&B offline in {self.run.dir} (`wandb sync` uploads it later).",
                      file=sys.stderr)
        self.run.define_metric(PREFIX + "step")
        self.run.define_metric(PREFIX + "*", step_metric=PREFIX + "step")

    def write(self, window: Window) -> None:
        idx = self.layers.pick(window.layers, window.named)
        names = [window.layers[i].name for i in idx]
        hist_row = {s: k for k, s in enumerate(window.hist_steps.tolist())}
        for _, step, values in window.scalars(idx):
            data: dict[str, Any] = {PREFIX + "step": step}
            data.update({PREFIX + tag: v for tag, v in values.items()})
            k = hist_row.get(step)
            if k is not None:
                for n, i in zip(names, idx):
                    h = finite_histogram(window.hist[k, i], window.edges)
                    if h is not None:
                        data[PREFIX + hist_tag(n)] = self._wandb.Histogram(np_histogram=(h[0].tolist(), h[1].tolist()))
            self.run.log(data)

    def findings(self, new: list[Finding], step: int) -> None:
        for f in new:
            self._known[f.kind] = f
            self.run.alert(title=f"gradwatch: {f.kind}", text=finding_text(f, step),
                           level=getattr(self._wandb.AlertLevel, LEVELS[f.severity]))
        self.run.summary[PREFIX + "findings"] = summary_of(list(self._known.values()))

    def close(self, end: RunEnd) -> None:
        self.run.summary[PREFIX + "findings"] = summary_of(end.findings)
        self.run.summary[PREFIX + "status"] = end.status
        for path in (end.report, end.findings_file):
            if path is not None:
                self.run.save(str(path), base_path=str(path.parent.parent), policy="now")
        if self.own:
            self.run.finish(exit_code=0 if end.status in ("finished", "stopped") else 1)

    def abort(self) -> None:
        if self.own and self.run is not None:
            self.run.finish(exit_code=1, quiet=True)
