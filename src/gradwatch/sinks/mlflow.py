"""MLflow, live: every recorded step's metrics in batches, findings as tags and a JSON artifact.

Logs into the sink's ``run_id``, else the active run (``mlflow.active_run()`` on the training thread
when the first window is stored: the script's own, or the HF Trainer's ``MLflowCallback``'s), at the
tracking URI in force
(``MLFLOW_TRACKING_URI``, ``mlflow.set_tracking_uri``, or the sink's ``tracking_uri``); with none,
creates a run (experiment ``MLFLOW_EXPERIMENT_NAME``, the sink's ``experiment``, or MLflow's
default; named after the run directory) through ``MlflowClient`` — the script's own fluent
``mlflow.start_run`` is left free — and ends it at the end. A local store is ``sqlite:///mlflow.db``
(current MLflow refuses a bare ``./mlruns`` file store) or a tracking server.

Metrics are ``gradwatch/...`` (:mod:`gradwatch.sinks_window`), at the optimizer step, with the
step's wall time; characters MLflow does not take in a name (outside letters, digits, ``_-. /:``)
become ``_``. Tags: ``gradwatch.run_dir``, ``gradwatch.findings`` (the kinds), and
``gradwatch.finding.<kind>`` (severity and summary). Artifacts: ``gradwatch/findings.json``
(rewritten as findings come) and, at the end, ``gradwatch/report.html``.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys

from ..findings import Finding
from ..sinks_hub import RunContext, RunEnd, Sink
from ..sinks_window import Window, finding_text

PREFIX = "gradwatch/"
#: MLflow's limit of metrics in one log_batch call.
BATCH = 1000
_BAD = re.compile(r"[^\w\-. /:]")


@functools.lru_cache(maxsize=65536)  # the same few hundred chart names, every row of every window
def metric_name(tag: str) -> str:
    return _BAD.sub("_", PREFIX + tag)


class MlflowSink(Sink):
    label = "MLflow"

    def __init__(self, layers: object = "key", tracking_uri: str | None = None, experiment: str | None = None,
                 run_name: str | None = None, run_id: str | None = None):
        super().__init__(layers)
        self.tracking_uri, self.experiment, self.run_name = tracking_uri, experiment, run_name
        self.run_id: str | None = run_id  # a run to log into, else the active one
        self.own = False
        self._uri: str | None = None
        self._known: dict[str, Finding] = {}
        self._step = -1

    def capture(self) -> None:
        mlflow = sys.modules.get("mlflow")
        if mlflow is not None:
            active = mlflow.active_run()
            if active is not None and self.tracking_uri is None and self.run_id is None:
                self.run_id = active.info.run_id
            self._uri = mlflow.get_tracking_uri()

    def open(self, run: RunContext) -> None:
        import mlflow
        from mlflow.entities import Metric, RunTag
        from mlflow.tracking import MlflowClient

        self._Metric, self._RunTag = Metric, RunTag
        self.client = MlflowClient(tracking_uri=self.tracking_uri or self._uri or mlflow.get_tracking_uri())
        if self.run_id is None:
            created = self.client.create_run(self._experiment_id(), run_name=self.run_name or run.out.name)
            self.run_id, self.own = created.info.run_id, True
        self.client.set_tag(self.run_id, "gradwatch.run_dir", str(run.out))

    def _experiment_id(self) -> str:
        name = self.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME")
        if name:
            found = self.client.get_experiment_by_name(name)
            return found.experiment_id if found is not None else self.client.create_experiment(name)
        return os.environ.get("MLFLOW_EXPERIMENT_ID") or "0"

    def write(self, window: Window) -> None:
        Metric = self._Metric
        metrics = []
        for row, step, values in window.scalars(self.layers.pick(window.layers, window.named)):
            ms = int(window.walltime[row] * 1000)
            metrics += [Metric(metric_name(tag), v, ms, step) for tag, v in values.items()]
        for i in range(0, len(metrics), BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + BATCH], synchronous=True)
        self._step = int(window.steps[-1])

    def _tags(self, findings: list[Finding], step: int) -> None:
        RunTag = self._RunTag
        tags = [RunTag("gradwatch.findings", ", ".join(f.kind for f in findings) or "none")]
        tags += [RunTag(f"gradwatch.finding.{f.kind}", finding_text(f, step)[:5000]) for f in findings]
        self.client.log_batch(self.run_id, tags=tags, synchronous=True)
        doc = {"format": 1, "findings": [f.to_json() for f in findings]}
        self.client.log_text(self.run_id, json.dumps(doc, indent=1), "gradwatch/findings.json")

    def findings(self, new: list[Finding], step: int) -> None:
        self._known.update({f.kind: f for f in new})
        self._tags(list(self._known.values()), step)

    def close(self, end: RunEnd) -> None:
        self._tags(end.findings, self._step)
        if end.report is not None:
            self.client.log_artifact(self.run_id, str(end.report), "gradwatch")
        if self.own:
            status = {"finished": "FINISHED", "stopped": "FINISHED", "interrupted": "KILLED"}.get(end.status, "FAILED")
            self.client.set_terminated(self.run_id, status=status)

    def abort(self) -> None:
        if self.own and self.run_id is not None:
            self.client.set_terminated(self.run_id, status="FAILED")
