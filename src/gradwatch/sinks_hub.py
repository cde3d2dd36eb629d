"""Live logging: ``watch(..., log_to=["tensorboard", "wandb", "mlflow"])``.

At every flush the session hands the stored window to a :class:`SinkHub`, which merges the
streams' windows (:mod:`gradwatch.sinks_window`) and passes them to each sink on a thread of its
own: a slow or gone server never holds training up, and a sink that raises is said once, on
stderr, and turned off. The run directory is written before any sink sees a window, so it never
depends on them.

The sinks themselves (``gradwatch.sinks.tensorboard``, ``.wandb``, ``.mlflow``) import their
library, so they sit above the core: this module names them (:data:`KNOWN`) and loads the one
asked for with :func:`importlib.import_module` when a run asks for it; it imports none of them,
nor wandb or mlflow. A user's own :class:`Sink` object can be given in ``log_to`` too.
"""

from __future__ import annotations

import importlib
import importlib.util
import queue
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from .errors import GradwatchError
from .findings import Finding
from .sinks_window import LayerChoice, Merger, Window

#: name -> (module, class, the package it needs, the extra that installs it, its own options).
KNOWN: dict[str, tuple[str, str, str, str, tuple[str, ...]]] = {
    "tensorboard": ("gradwatch.sinks.tensorboard", "TensorBoardSink", "tensorboard", "tensorboard", ("logdir",)),
    "wandb": ("gradwatch.sinks.wandb", "WandbSink", "wandb", "wandb", ("project", "entity", "name", "mode", "run")),
    "mlflow": ("gradwatch.sinks.mlflow", "MlflowSink", "mlflow", "mlflow",
               ("tracking_uri", "experiment", "run_name", "run_id")),
}
#: Windows a sink may fall behind by before its next ones are dropped (the run directory has them).
MAX_BEHIND = 64
#: Seconds the end of a run waits for each sink to send what it holds and close.
CLOSE_TIMEOUT = 120.0
#: Layers of each finding that get charts of their own (a vanishing finding may name a hundred).
NAMED_PER_FINDING = 4


@dataclass(frozen=True)
class RunContext:
    """What a sink knows of the run when it opens."""

    out: Path  # the run directory
    tensorboard: Path | None  # the watch's tensorboard= directory, if any


@dataclass(frozen=True)
class RunEnd:
    """How the run ended: its status, the final findings, and the files to attach."""

    status: str  # finished, crashed, interrupted, stopped
    findings: list[Finding]
    report: Path | None  # report.html, if written
    findings_file: Path | None  # findings.json, if written


class Sink:
    """A place that shows the run while it goes. Every method runs on the sink's own thread except
    :meth:`capture`; an exception in any of them turns the sink off (said once), nothing else."""

    #: How messages name it.
    label = "sink"
    #: Whether it writes TensorBoard events (then the end-of-run export is left out, or redone if it failed).
    tensorboard = False
    logdir: Path | None = None

    def __init__(self, layers: Any = "key"):
        self.layers = LayerChoice(layers)

    def capture(self) -> None:
        """On the training thread, before :meth:`open`: note thread-local state (an active run)."""

    def open(self, run: RunContext) -> None:
        """Start (or join) the place to log to; called once, before the first window."""

    def write(self, window: Window) -> None:
        """Log the rows of ``window``."""

    def findings(self, new: list[Finding], step: int) -> None:
        """Findings not sent before (each is sent once), found with the run stored up to ``step``."""

    def close(self, end: RunEnd) -> None:
        """The run ended: attach files, close what :meth:`open` started."""

    def abort(self) -> None:
        """After a failure: release what can be released; must not raise."""


def parse_log_to(spec: Any) -> list[Sink]:
    """The sinks ``log_to`` asks for: a name (``"wandb"``, ``"wandb,mlflow"``), a dict of names to options
    (``{"wandb": {"layers": "all"}}``), or a list of names, such dicts and :class:`Sink` objects."""
    if spec is None or spec == "" or spec == [] or spec == {}:
        return []
    if isinstance(spec, str):
        items: Iterable[Any] = [(s.strip(), {}) for s in spec.split(",") if s.strip()]
    elif isinstance(spec, dict):
        items = list(spec.items())
    elif isinstance(spec, (list, tuple)):
        items = [kv for s in spec for kv in (s.items() if isinstance(s, dict) else [(s, {})])]
    elif isinstance(spec, Sink):
        items = [(spec, {})]
    else:
        raise GradwatchError(f"log_to takes sink names ({', '.join(KNOWN)}), a list of them or a dict of names to "
                             f"options; got {type(spec).__name__}.")
    sinks: list[Sink] = []
    seen: set[str] = set()
    for item, options in items:
        if isinstance(item, Sink):
            sinks.append(item)
            continue
        if not isinstance(item, str) or item not in KNOWN:
            raise GradwatchError(f"unknown sink {item!r} in log_to; known: {', '.join(KNOWN)} "
                                 "(or a gradwatch.sinks.Sink object).")
        if options is None:
            options = {}
        if not isinstance(options, dict):
            raise GradwatchError(f"log_to={{{item!r}: ...}} takes a dict of options; got {type(options).__name__}.")
        if item in seen:
            raise GradwatchError(f"log_to names {item!r} twice; name each sink once.")
        seen.add(item)
        module, cls, package, extra, own = KNOWN[item]
        unknown = sorted(set(options) - {"layers", *own})
        if unknown:
            raise GradwatchError(f"unknown option {unknown[0]!r} for log_to {item!r}; known: {', '.join(('layers', *own))}.")
        if importlib.util.find_spec(package) is None:
            raise GradwatchError(f"log_to {item!r} needs the {package} package; install it with "
                                 f"`pip install gradwatch[{extra}]`.")
        sinks.append(getattr(importlib.import_module(module), cls)(**options))
    return sinks


class _Lane:
    """One sink's thread and queue: jobs run in order; the first exception turns the sink off."""

    def __init__(self, sink: Sink, out: Path):
        self.sink = sink
        self.off = False
        self._out = out
        self._queue: queue.Queue = queue.Queue(maxsize=MAX_BEHIND)
        self._behind_said = False
        self._thread = threading.Thread(target=self._run, name=f"gradwatch-{sink.label}", daemon=True)
        self._thread.start()

    def call(self, what: str, step: int, fn: Callable[[], Any], deadline: float | None = None) -> None:
        """Run ``fn`` (about the run up to ``step``) on the sink's thread, after what it was given before.
        With a ``deadline`` (the end of the run: the last window, the findings, the close) it waits for
        room in the queue until then, rather than dropping ``fn``."""
        if self.off:
            return
        try:
            if deadline is None:
                self._queue.put_nowait((what, step, fn))
            else:
                self._queue.put((what, step, fn), timeout=max(0.0, deadline - time.monotonic()))
        except queue.Full:
            if deadline is not None:
                self.off = True
                print(f"gradwatch: {self.sink.label} did not catch up before the end of the run; left it "
                      f"({self._out} has the full record).", file=sys.stderr)
                return
            if not self._behind_said:
                self._behind_said = True
                print(f"gradwatch: {self.sink.label} is {MAX_BEHIND} windows behind; it gets no more windows until it "
                      f"catches up ({self._out} has them all).", file=sys.stderr)

    def _run(self) -> None:
        while True:
            what, step, fn = self._queue.get()
            try:
                if fn is None:
                    return
                if not self.off:
                    fn()
            except Exception as e:  # a logger must not cost training or the record
                self.fail(what, step, e)
            finally:
                self._queue.task_done()

    def fail(self, what: str, step: int, e: BaseException) -> None:
        if self.off:
            return
        self.off = True
        text = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        print(f"gradwatch: stopped logging to {self.sink.label} ({what} failed at step {step}: "
              f"{type(e).__name__}{': ' + text if text else ''}); training goes on and {self._out} keeps the full "
              "record.", file=sys.stderr)
        try:
            self.sink.abort()
        except Exception:
            pass

    def wait(self, deadline: float) -> bool:
        """Wait until every job given so far has run (or ``deadline``, a ``time.monotonic()``)."""
        q = self._queue
        with q.all_tasks_done:
            while q.unfinished_tasks:
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return False
                q.all_tasks_done.wait(min(left, 0.5))
        return True

    def stop(self, deadline: float | None = None) -> None:
        """Let the thread end once it has run what it holds (waiting for room until ``deadline``, else 1 s)."""
        wait = 1.0 if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            self._queue.put((None, -1, None), timeout=wait)
        except queue.Full:
            pass


class SinkHub:
    """The run's live sinks: started with the run directory (rank 0), fed at each flush, closed at the end."""

    def __init__(self, sinks: list[Sink], tensorboard: Path | None):
        self.sinks = sinks
        self._tensorboard = tensorboard
        self._lanes: list[_Lane] = []
        self._merger = Merger()
        self._writer: Any = None
        self._sent: set[str] = set()
        self._named: set[str] = set()
        self._upto = -1
        self._captured = False
        self._closed = False
        self._deadline: float | None = None  # set at the close: what is sent then waits for room

    @classmethod
    def of(cls, log_to: Any, tensorboard: Path | None) -> SinkHub | None:
        """The hub of the sinks ``log_to`` names (checked now: one sentence for a bad name), or None."""
        sinks = parse_log_to(log_to)
        return cls(sinks, tensorboard) if sinks else None

    def start(self, out: Path, writer: Any) -> None:
        """The run directory exists (``writer`` holds its layer table and meta): start each sink's thread."""
        self._writer = writer
        self._ctx = RunContext(out=Path(out), tensorboard=self._tensorboard)
        self._lanes = [_Lane(sink, Path(out)) for sink in self.sinks]

    @property
    def live(self) -> list[Sink]:
        """The sinks still logging (not turned off after a failure)."""
        return [lane.sink for lane in self._lanes if not lane.off]

    def window(self, index: int, chunk: Any, upto: int) -> None:
        """Stream ``index`` stored ``chunk``; every stream has stored up to step ``upto``. Training thread."""
        if self._writer is None or self._closed:
            return
        try:
            self._window(index, chunk, upto)
        except Exception as e:  # gradwatch's own bug here must not reach training: every sink goes off
            self._give_up(e)

    def _give_up(self, e: Exception) -> None:
        self._closed = True
        print(f"gradwatch: stopped the live sinks ({type(e).__name__}: {e}); the run directory keeps the full record.",
              file=sys.stderr)
        for lane in self._lanes:
            lane.off = True
            lane.stop()

    def _window(self, index: int, chunk: Any, upto: int) -> None:
        if not self._captured:  # the first window: the trainer's own loggers have started their runs by now
            self._captured = True
            for lane in self._lanes:
                try:
                    lane.sink.capture()
                except Exception as e:
                    lane.fail("capture", int(chunk.steps[-1]) if len(chunk) else 0, e)
                lane.call("open", int(chunk.steps[-1]) if len(chunk) else 0, lambda s=lane.sink: s.open(self._ctx))
        self._merger.add(index, self._writer.streams[index]["layers"], chunk)
        self._send(upto)

    def _send(self, upto: float) -> None:
        w = self._merger.take(self._writer.layers, self._writer.meta, upto, frozenset(self._named))
        if w is None:
            return
        self._upto = int(w.steps[-1])
        for lane in self._lanes:
            lane.call("write", self._upto, lambda s=lane.sink: s.write(w), self._deadline)

    def findings(self, findings: list[Finding] | None, step: int) -> None:
        """The findings of a diagnosis of the run stored up to ``step``: each new one goes to every sink once."""
        if self._closed:
            return
        new = [f for f in findings or [] if f.kind not in self._sent]
        for f in findings or []:
            self._named.update(f.layers[:NAMED_PER_FINDING])
        if not new:
            return
        self._sent.update(f.kind for f in new)
        for lane in self._lanes:
            lane.call("sending findings", step, lambda s=lane.sink: s.findings(new, step), self._deadline)

    def export_dir(self, given: Path | None, out: Path) -> Path | None:
        """Where the end-of-run TensorBoard export goes: ``given`` (the watch's ``tensorboard=``)
        without a TensorBoard sink or when it never opened; none while it logs; ``given`` or
        ``RUN/tensorboard`` if it was turned off (never a directory given to the sink alone)."""
        lanes = [lane for lane in self._lanes if lane.sink.tensorboard]
        if not lanes or not self._captured:  # no TensorBoard sink, or it never opened (no window came)
            return given
        # Never into a directory given to the sink alone: the export replaces the event files it finds.
        return (given or Path(out) / "tensorboard") if any(lane.off for lane in lanes) else None

    def drain(self, timeout: float = 30.0) -> bool:
        """Wait until every sink has handled what it was given (True), or ``timeout`` seconds passed."""
        deadline = time.monotonic() + timeout
        return all(lane.off or lane.wait(deadline) for lane in self._lanes)

    def closing(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """The run is closing: from now on what is sent (the last windows, the findings, the end) waits
        up to ``timeout`` seconds in all for room in a sink's queue, where a window mid-run is dropped."""
        if self._deadline is None:
            self._deadline = time.monotonic() + timeout

    def close(self, status: str, findings: list[Finding] | None, out: Path, report: bool,
              timeout: float = CLOSE_TIMEOUT) -> None:
        """Send what is held back, the findings not sent yet, and the end; wait for each sink to finish."""
        if self._closed or self._writer is None:
            return
        self.closing(timeout)
        deadline = self._deadline
        if self._captured:  # else no window came: the sinks were never opened
            try:
                self._send(float("inf"))
                self.findings(findings, self._upto)
            except Exception as e:
                return self._give_up(e)
            files = Path(out)
            end = RunEnd(status=status, findings=list(findings or []),
                         report=files / "report.html" if report and (files / "report.html").exists() else None,
                         findings_file=files / "findings.json" if (files / "findings.json").exists() else None)
            for lane in self._lanes:
                lane.call("close", self._upto, lambda s=lane.sink: s.close(end), deadline)
        self._closed = True
        for lane in self._lanes:
            lane.stop(deadline)
        for lane in self._lanes:
            if not lane.off and not lane.wait(deadline) and not lane.off:
                lane.off = True
                print(f"gradwatch: {lane.sink.label} did not finish within {timeout:.0f} s; left it.", file=sys.stderr)
