"""What a run's session does with what it stored: the online diagnosis while it records, and at
the end the findings, the report, the live sinks' end, TensorBoard's events and the terminal summary.

Each step reads the stored run, never the model, and fails alone: the record is safe by then, so
a failure is said in one line with the command that redoes it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from .store import load_run


def diagnose_so_far(out: Path, upto: int, several_streams: bool, announced: set[str], quiet: bool,
                    found: list[Any] | None = None) -> bool:
    """Diagnose what is stored up to step ``upto`` and print each problem not announced before (its
    kind is added to ``announced``); ``found`` receives every finding (for the live sinks). A
    multi-stream run is cut at ``upto``: a stream that has not flushed yet must not look as if it had
    stopped. Returns False if the diagnosis failed (it is then left off for the rest of the run)."""
    from .diagnose import diagnose

    try:
        run = load_run(out)
        findings = diagnose(run.until(upto) if several_streams else run)
    except Exception as e:  # diagnosis must never stop training
        print(f"gradwatch: online diagnosis failed ({type(e).__name__}: {e}); recording continues.", file=sys.stderr)
        return False
    if found is not None:
        found.extend(findings)
    for f in findings:
        if f.severity == "info" or f.kind in announced:
            continue
        announced.add(f.kind)
        if not quiet:
            tip = f" Try: {f.remedies[0].call()}." if f.remedies else ""
            print(f"gradwatch: {f.summary}{tip}", file=sys.stderr)
    return True


def final_diagnosis(out: Path) -> list[Any] | None:
    """Diagnose the finished run and write ``findings.json``; None if that failed."""
    from .diagnose import diagnose, write_findings

    try:
        findings = diagnose(load_run(out))
        write_findings(out, findings)
        return findings
    except Exception as e:  # the record is safe; say why the diagnosis is missing
        print(f"gradwatch: could not diagnose {out} ({type(e).__name__}: {e}); "
              f"run `gradwatch diagnose {out}` to retry.", file=sys.stderr)
        return None


def summarise(out: Path, findings: list[Any]) -> None:
    """The end-of-run terminal summary: sparklines of loss and norm, then each finding."""
    try:
        from .report.terminal import print_findings, print_summary

        print_summary(load_run(out), layers=False)
        print_findings(findings)
    except Exception as e:  # a summary is a convenience; the run is stored
        print(f"gradwatch: no summary ({type(e).__name__}: {e})", file=sys.stderr)


def end_of_run(out: Path, status: str, report: bool, tensorboard: Path | None, sinks: Any, quiet: bool) -> list[Any] | None:
    """The end of a run whose record is stored: findings.json, report.html, the live sinks' last
    windows, findings and files (``sinks``: a :class:`gradwatch.sinks_hub.SinkHub` or None), and the
    TensorBoard export (unless a live TensorBoard sink wrote the events already). Returns the findings."""
    findings = final_diagnosis(out)
    if report:
        write_report(out, quiet)
    if sinks is not None:
        sinks.close(status, findings, out, report)
    logdir = tensorboard if sinks is None else sinks.export_dir(tensorboard, out)
    if logdir is not None:
        write_tensorboard(out, logdir, quiet)
    return findings


def write_tensorboard(out: Path, logdir: Path, quiet: bool) -> None:
    try:
        from .report.tensorboard import export_tensorboard

        path = export_tensorboard(out, logdir, overwrite=True)
        if not quiet:
            print(f"gradwatch: TensorBoard events -> {path}", file=sys.stderr)
    except Exception as e:  # the run is stored; the export can be redone from it
        print(f"gradwatch: could not write TensorBoard events ({type(e).__name__}: {e})", file=sys.stderr)


def write_report(out: Path, quiet: bool) -> None:
    try:
        from .report.html import write_report as write_html

        path = write_html(out)
        if not quiet:
            print(f"gradwatch: report -> {path}", file=sys.stderr)
    except Exception as e:  # the run and its findings are stored; the picture can be redrawn
        print(f"gradwatch: could not write the report ({type(e).__name__}: {e}); "
              f"run `gradwatch report {out}` to retry.", file=sys.stderr)
