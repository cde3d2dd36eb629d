"""The run's lifecycle, for any framework: one run directory, its streams, the windows they store,
the online diagnosis, and the end (findings, report, TensorBoard, summary).

A framework plugs in by subclassing :class:`RunSession` (the PyTorch one is
:class:`gradwatch.watch.Watch`): for each optimizer it opens a place in the run with
:meth:`RunSession._open_stream` and registers a :class:`Stream` of its own in ``_streams``, which
stores its flushed host windows and hands each to :meth:`RunSession._pass_window`. The session does
the rest through the :class:`Stream` protocol (flush, detach, notes, steps). Nothing here imports a
training framework.

Never lose the record: the final partial window is flushed on normal exit, on an exception leaving
a ``with`` block, at interpreter exit (``atexit``) and on SIGTERM (turned into ``SystemExit`` so the
same paths run). A SIGKILL loses at most the steps since the last flush.
"""

from __future__ import annotations

import atexit
import os
import sys
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from . import finish, shutdown
from .errors import GradwatchError
from .sinks_hub import SinkHub
from .store import Chunk, LayerInfo, RunWriter, StreamWriter, load_run

DEFAULT_ROOT = "gradwatch-runs"
#: Online diagnosis runs after each of the first windows, then after windows 2^k; after the first
#: two, only while its time so far is under ONLINE_TIME_SHARE of the run's, or ONLINE_MAX_WAIT_S
#: after the last one (a 24 ms step, diagnosed in ~9 ms every 50 steps, would pay 0.7%).
ONLINE_EVERY_WINDOW_UNTIL, ONLINE_TIME_SHARE, ONLINE_MAX_WAIT_S = 20, 0.003, 10.0
#: Whether a run writes report.html when it closes, unless told otherwise (GRADWATCH_REPORT=0: no).
REPORT_BY_DEFAULT = os.environ.get("GRADWATCH_REPORT", "1") != "0"


def default_out(name: str = "run") -> Path:
    """``gradwatch-runs/NAME-YYYYmmdd-HHMMSS`` (with a suffix if that exists already)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(DEFAULT_ROOT) / f"{name}-{stamp}"
    path, k = base, 1
    while path.exists():
        k += 1
        path = base.with_name(f"{base.name}-{k}")
    return path


def status_for(exc: BaseException | None) -> str:
    """The run's status when a ``with`` block ends with ``exc`` (None: normally)."""
    if exc is None:
        return "finished"
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    if isinstance(exc, SystemExit):
        return "finished" if exc.code in (0, None) else "interrupted"
    return "crashed"


class _NullStream:
    """A stream on a rank that does not write (data parallel: rank 0 writes the run)."""

    def __init__(self, index: int):
        self.index = index
        self.rows_written = 0

    def append(self, chunk: Chunk) -> None:
        self.rows_written += len(chunk)


class _NullWriter:
    """RunWriter's interface for ranks other than 0: the layer table in memory, no file touched."""

    def __init__(self) -> None:
        self.layers: list[LayerInfo] = []
        self.streams: list[dict[str, Any]] = []
        self.meta: dict[str, Any] = {}

    def add_stream(self, layers: Sequence[LayerInfo], info: dict[str, Any], label: str | None = None) -> _NullStream:
        index = len(self.streams)
        first = len(self.layers)
        self.layers.extend(layers)
        self.streams.append({"index": index, "label": label or f"opt{index}",
                             "layers": list(range(first, len(self.layers))), **info})
        return _NullStream(index)

    def update_meta(self, **fields: Any) -> None:
        self.meta.update(fields)

    def finish(self, status: str = "finished") -> None:
        self.meta["status"] = status


class Stream(Protocol):
    """What a framework's stream (one optimizer's record) answers to its session."""

    failed: bool
    #: The last step this stream has stored (-1: none yet).
    stored_through: int

    @property
    def index(self) -> int:
        """Its number in the run (meta.json's ``streams``)."""

    @property
    def steps(self) -> int:
        """Steps taken so far."""

    @property
    def reduces(self) -> bool:
        """Whether its windows are summed over data-parallel ranks (then a flush needs every rank)."""

    def flush(self, reduce: bool) -> None:
        """Store the buffered steps now (``reduce``: summed over the ranks)."""

    def detach(self) -> None:
        """Take its hooks off."""

    def notes(self, rank: int) -> tuple[dict[str, Any], list[str]]:
        """At the end: fields for its meta.json entry and lines to print."""


class RunSession:
    """One run directory, from the first stream to the findings.

    Args:
        out: the run directory (default ``gradwatch-runs/run-TIME``).
        overwrite: replace a run already in ``out`` instead of refusing.
        quiet: print nothing.
        diagnose_online: diagnose the stored windows during the run and print each new problem once.
        report: write ``report.html`` at the end (default: yes, unless ``GRADWATCH_REPORT=0``).
        tensorboard: also write TensorBoard event files into this directory at the end (with ``log_to``'s
            ``"tensorboard"``: as the run goes).
        log_to: also log each flushed window and each finding, live, to ``"tensorboard"``, ``"wandb"``,
            ``"mlflow"`` (names, a list, a dict of names to options, or :class:`gradwatch.sinks.Sink`
            objects; :mod:`gradwatch.sinks_hub`).
        summary: print the end-of-run summary (sparklines and findings) when closing.
        options: the recording options stored in meta.json.
        framework: returns what meta.json says about the framework (called when the run starts).
        rank: returns this process's rank (only rank 0 writes, prints, diagnoses and reports).
    """

    #: What is said when a session closes without any stream.
    nothing_recorded = "gradwatch: nothing was recorded."

    def __init__(
        self,
        out: str | os.PathLike[str] | None = None,
        *,
        overwrite: bool = False,
        quiet: bool = False,
        diagnose_online: bool = True,
        report: bool | None = None,
        tensorboard: str | os.PathLike[str] | None = None,
        summary: bool = True,
        log_to: Any = None,
        options: dict[str, Any] | None = None,
        framework: Callable[[], dict[str, Any]] | None = None,
        rank: Callable[[], int] | None = None,
    ):
        self.out = Path(out) if out is not None else default_out()
        self.quiet = quiet
        self._overwrite = overwrite
        self._options = dict(options or {})
        self._framework = framework or dict
        self._rank_of = rank or (lambda: 0)
        #: This process's rank: only rank 0 writes the run, prints, diagnoses and reports; the others
        #: compute the same statistics (they take part in the reductions) and touch no file.
        self.rank = self._rank_of()
        self._writer: RunWriter | _NullWriter | None = None
        self.diagnose_online = diagnose_online
        self.report = REPORT_BY_DEFAULT if report is None else report
        #: Print the end-of-run summary when closing.
        self.print_summary = summary
        self.tensorboard = Path(tensorboard) if tensorboard is not None else None
        #: Where the run is logged live (``log_to`` as given; checked now, started with the run directory).
        self.log_to = log_to
        self._sinks = SinkHub.of(log_to, self.tensorboard)
        #: The run's streams (see :class:`Stream`), by the id of what each was started for.
        self._streams: dict[int, Stream] = {}
        self._windows = 0
        self._started = self._online_last = time.perf_counter()  # _online_last: when the last diagnosis ended
        self._online_spent = 0.0  # seconds the online diagnoses took so far
        #: (stream key or None for every stream, listener): see add_window_listener.
        self._listeners: list[tuple[int | None, Any]] = []
        self._announced: set[str] = set()
        self._findings: list[Any] | None = None
        self._closed = False
        self._status = "running"
        #: Status if this run is still open when the interpreter exits (integrations whose framework
        #: reports no exception set it to "crashed": a normal end would have closed it).
        self.status_at_exit = "finished"

    # -- its streams -------------------------------------------------------------------------------

    @property
    def steps(self) -> int:
        """Optimizer steps taken so far (the most of any stream)."""
        return max((s.steps for s in self._streams.values()), default=0)

    def _flush_streams(self, reduce: bool, only: int | None = None) -> None:
        """Store every stream's buffered steps (``reduce``: summed over the data-parallel ranks); with
        ``only``, the stream of that key alone."""
        with shutdown.critical:
            for key, s in self._streams.items():
                if not s.failed and (only is None or key == only):
                    s.flush(reduce)

    def _detach(self) -> None:
        """Take the framework's hooks off: nothing is recorded after this."""
        for s in self._streams.values():
            s.detach()

    def _note_streams(self) -> None:
        """At the end, what each stream did or could not do: into meta.json, and on stderr unless quiet."""
        for s in self._streams.values():
            fields, lines = s.notes(self.rank)
            if fields and self._writer is not None:
                self._writer.streams[s.index].update(fields)
            if not self.quiet:
                for line in lines:
                    print(f"gradwatch: {line}", file=sys.stderr)

    def _stored_through(self) -> int:
        """The last step that every stream which has stepped has stored (-1: one has stored none): a
        GAN's two optimizers flush one after the other, and between the two flushes the second one's
        steps are not stored yet."""
        ends = [s.stored_through for s in self._streams.values() if s.steps > 0 and not s.failed]
        return min(ends, default=-1)

    def _several_streams(self) -> bool:
        return len(self._streams) > 1

    def _can_flush_alone(self) -> bool:
        """Whether this process may flush without the other ranks (no stream sums over them)."""
        return not any(s.reduces for s in self._streams.values())

    # -- the run directory ----------------------------------------------------------------------

    @property
    def writes(self) -> bool:
        """Whether this process writes the run (rank 0, or a single process)."""
        return self.rank == 0

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def overwrite(self) -> bool:
        """Whether this run replaces a run already in ``out``."""
        return self._overwrite

    def _ensure_writer(self) -> RunWriter | _NullWriter:
        if self._writer is None:
            self.rank = self._rank_of()  # a process group may have started since construction
            if not self.writes:
                self.quiet = True  # one voice per job: rank 0's
                self._writer = _NullWriter()
            else:
                self._writer = RunWriter(self.out, options=self._options, framework=self._framework(),
                                         overwrite=self._overwrite)
                if self._sinks is not None:
                    self._sinks.start(self.out, self._writer)
            _live.add(self)
            shutdown.acquire()
        return self._writer

    def _open_stream(self, layers: Sequence[LayerInfo], info: dict[str, Any], label: str | None = None
                     ) -> StreamWriter | _NullStream:
        """A new stream of ``layers`` in the run (the run directory is created with the first)."""
        return self._ensure_writer().add_stream(layers, info, label=label)

    def _stream_info(self, index: int) -> dict[str, Any] | None:
        """The meta.json entry of stream ``index`` (None before the run has started)."""
        return self._writer.streams[index] if self._writer is not None else None

    def _update_stream(self, index: int, fields: dict[str, Any]) -> None:
        """Add ``fields`` to stream ``index``'s meta.json entry and write meta.json."""
        if not self.writes or self._writer is None:
            return
        self._writer.streams[index].update(fields)
        self._writer.update_meta()

    @property
    def layers(self) -> list[LayerInfo]:
        return list(self._writer.layers) if self._writer else []

    # -- windows --------------------------------------------------------------------------------

    def add_window_listener(self, listener: Any, optimizer: Any = None) -> Any:
        """Call ``listener(chunk)`` with each window stored from now on: of the stream started for
        ``optimizer``, or of every stream. Host data only (integrations log from it; no device read).
        Returns a function that removes the listener again."""
        entry = (None if optimizer is None else id(optimizer), listener)
        self._listeners.append(entry)

        def remove() -> None:
            if entry in self._listeners:
                self._listeners.remove(entry)

        return remove

    def _pass_window(self, key: int, chunk: Chunk) -> None:
        """A window of stream ``key`` (the id of what it was started for) is stored: hand it to the
        listeners, then (on a thinning schedule) diagnose what is stored so far."""
        for wanted, listener in list(self._listeners):
            if wanted is not None and wanted != key:
                continue
            try:
                listener(chunk)
            except Exception as e:  # a logger must not cost the record
                print(f"gradwatch: could not pass a window on ({type(e).__name__}: {e}).", file=sys.stderr)
        if self._sinks is not None and self.writes and key in self._streams:
            self._sinks.window(self._streams[key].index, chunk, self._stored_through())
        self._windows += 1
        w = self._windows
        # Every window at first, then at powers of two: online diagnosis stays O(n log n) overall.
        # Quiet runs announce nothing, so they skip it unless sinks show it; the final diagnosis runs either way.
        if (self.diagnose_online and (not self.quiet or self._sinks is not None) and self.writes
                and (w <= ONLINE_EVERY_WINDOW_UNTIL or w & (w - 1) == 0) and self._online_due(w)):
            start = time.perf_counter()
            self._diagnose_online()
            self._online_last = time.perf_counter()
            self._online_spent += self._online_last - start

    def _online_due(self, window: int) -> bool:
        """Whether the online diagnosis fits its time budget now (ONLINE_TIME_SHARE, ONLINE_MAX_WAIT_S)."""
        if window <= 2:
            return True
        now = time.perf_counter()
        return (self._online_spent <= ONLINE_TIME_SHARE * (now - self._started)
                or now - self._online_last >= ONLINE_MAX_WAIT_S)

    def _diagnose_online(self) -> None:
        upto = self._stored_through()
        if upto < 0:
            return  # a stream has nothing stored yet: diagnose at the next window, when it has
        found: list[Any] = []
        self.diagnose_online = finish.diagnose_so_far(self.out, upto, self._several_streams(), self._announced,
                                                      self.quiet, found)
        if self._sinks is not None:  # the new ones, once each, to the live sinks
            self._sinks.findings(found, upto)

    # -- the end --------------------------------------------------------------------------------

    def close(self, status: str = "finished") -> None:
        """Stop recording, store what is buffered, and mark the run ``finished`` (or ``crashed``)."""
        # Every rank ends a finished (or guard-stopped) run at the same step; a crash or an interrupt
        # reaches one rank alone, which must not wait for the others in a reduction.
        self._close(status, reduce=status in ("finished", "stopped"))

    def _close(self, status: str, reduce: bool) -> None:
        if self._closed:
            return
        self._closed = True
        self._detach()
        if self._writer is None:
            if not self.quiet and self.writes:
                print(self.nothing_recorded, file=sys.stderr)
            return
        if self._sinks is not None:
            self._sinks.closing()  # the last windows wait for room in a sink's queue from here on
        with shutdown.critical:
            try:
                self._flush_streams(reduce)
            except Exception as e:  # training is over: say what is missing, do not fail the script now
                print(f"gradwatch: could not write the last steps to {self.out} ({type(e).__name__}: {e}); "
                      "the run holds what was written before.", file=sys.stderr)
            finally:
                self._note_streams()
                try:
                    self._writer.finish(status)
                except Exception as e:
                    print(f"gradwatch: could not mark {self.out} as {status} ({type(e).__name__}: {e}).", file=sys.stderr)
                self._status = status
                _live.discard(self)
                shutdown.release()
            if not self.writes:
                return  # rank 0 diagnoses, reports and prints
            self._findings = finish.end_of_run(self.out, status, self.report, self.tensorboard, self._sinks, self.quiet)
        if not self.quiet:
            print(f"gradwatch: recorded {self.steps} steps x {len(self._writer.layers)} layers -> {self.out}",
                  file=sys.stderr)
            if self.print_summary:
                finish.summarise(self.out, self._findings or [])

    # -- results --------------------------------------------------------------------------------

    def flush(self, optimizer: Any = None) -> None:
        """Store every buffered step now (one device->host copy per stream); with ``optimizer``, only
        the stream started for it. Under data parallelism every rank must call it (it sums the
        window over the ranks)."""
        self._flush_streams(reduce=True, only=None if optimizer is None else id(optimizer))

    @property
    def run(self):  # type: ignore[no-untyped-def]
        """The stored run, read back (flushes first if still recording; under data parallelism it
        reads what is stored, since a flush on one rank alone would wait for the others)."""
        if not self.writes:
            raise GradwatchError(f"rank {self.rank} does not write the run; "
                                 f"read it on rank 0 (or load_run({str(self.out)!r}) there).")
        if not self._closed and self._can_flush_alone():
            self.flush()
        return load_run(self.out)

    @property
    def sinks(self) -> SinkHub | None:
        """The live sinks (``log_to``): ``sinks.live`` those still logging, ``sinks.drain()`` waits for them."""
        return self._sinks

    @property
    def findings(self) -> list[Any]:
        """The :class:`~gradwatch.findings.Finding` list: final once closed, so far while recording."""
        if self._writer is None or not self.writes:
            return []  # under data parallelism, rank 0 holds the diagnosis
        if self._findings is not None:
            return list(self._findings)
        from .diagnose import diagnose

        return diagnose(self.run)


# ----------------------------------------------------------------------- never lose the record

_live: "weakref.WeakSet[RunSession]" = weakref.WeakSet()


def live_sessions() -> list[RunSession]:
    """The sessions of this process that are recording (started, not closed)."""
    return list(_live)


def _close_all(status: str) -> None:
    # An exception that ended the script reaches atexit as sys.last_value: the run crashed (and under
    # data parallelism this rank is alone now: its last window must not wait for a reduction).
    if status == "finished" and getattr(sys, "last_value", None) is not None:
        status = "crashed"
    for s in list(_live):
        try:
            # At interpreter exit nothing says the other ranks are exiting too (a wrapper may have
            # caught this rank's exception): the last window is this rank's own, never reduced.
            s._close(s.status_at_exit if status == "finished" else status, reduce=False)
        except Exception as e:  # the record is best effort at this point; say why it failed
            print(f"gradwatch: could not finish {s.out}: {e}", file=sys.stderr)


atexit.register(_close_all, "finished")
