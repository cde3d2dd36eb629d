"""Several runs side by side — what the seeds do by hand for sigmoid vs tanh vs ReLU.

A table (final loss, first weight layer's gradient RMS relative to the last, findings) for the
terminal and one self-contained HTML page with the gradient-flow heatmaps next to each other.
"""

from __future__ import annotations

import html
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from rich.table import Table

from ..store import Run, load_run
from . import plots
from .page import CSS, png_base64


@dataclass
class RunRow:
    name: str
    steps: int
    final_loss: float
    first_layer_rel: float
    findings: list[str]


def _median_tail(x: np.ndarray, frac: float = 0.1) -> float:
    x = x[np.isfinite(x)]
    if x.size == 0:
        return math.nan
    return float(np.median(x[-max(1, int(len(x) * frac)) :]))


def summarize(run: Run) -> RunRow:
    ids = plots.weight_layer_ids(run)
    rms = run.layer_series("grad_rms")
    early = rms[: max(1, min(100, len(run.steps)))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        med = np.nanmedian(early, axis=0) if early.size else np.full(len(run.layers), np.nan)
    rel = float(med[ids[0]] / med[ids[-1]]) if len(ids) >= 2 and med[ids[-1]] > 0 else math.nan
    found = [f"{f.kind} ({f.severity})" for f in run.findings if f.severity != "info"]
    return RunRow(run.path.name, len(run.steps), _median_tail(run.step_series("loss")), rel, found)


def table(rows: Sequence[RunRow]) -> Table:
    t = Table(title="runs compared (loss: median of the last 10% of steps; first/last: first weight layer's "
                    "gradient RMS over the last one's, first 100 steps)", title_justify="left")
    for col in ("run", "steps", "final loss", "first/last grad RMS", "findings"):
        t.add_column(col, justify="right" if col in ("steps", "final loss", "first/last grad RMS") else "left")
    for r in rows:
        t.add_row(r.name, str(r.steps), f"{r.final_loss:.4g}", f"{r.first_layer_rel:.3g}", ", ".join(r.findings) or "none")
    return t


def write_compare(dirs: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str]) -> tuple[Path, list[RunRow]]:
    """Write the comparison page to ``out`` and return it with the table rows."""
    runs = [load_run(d) for d in dirs]
    rows = [summarize(r) for r in runs]
    if len({r.name for r in rows}) < len(rows):  # same folder names: show their parents too
        for r, run in zip(rows, runs):
            r.name = f"{run.path.parent.name}/{run.path.name}"
    e = lambda x: html.escape(str(x), quote=True)  # noqa: E731
    head = "".join(f"<th>{e(c)}</th>" for c in ("run", "steps", "final loss", "first/last grad RMS", "findings"))
    body = "".join(
        f"<tr><td>{e(r.name)}</td><td>{r.steps}</td><td>{r.final_loss:.4g}</td><td>{r.first_layer_rel:.3g}</td>"
        f"<td>{e(', '.join(r.findings) or 'none')}</td></tr>"
        for r in rows
    )
    cells = "".join(
        f"<div style='flex:1;min-width:300px'><h3>{e(row.name)}</h3>"
        + (f'<img alt="gradient flow of {e(run.path.name)}" '
           f'src="data:image/png;base64,{png_base64(plots.gradient_flow_heatmap(run))}">'
           if len(run.steps) else "<p>no steps recorded</p>")
        + "</div>"
        for run, row in zip(runs, rows)
    )
    page = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>gradwatch — compare</title>"
        f"<style>{CSS}</style></head><body><h1>gradwatch — {len(runs)} runs compared</h1>"
        f"<table><tr>{head}</tr>{body}</table><h2>Gradient flow</h2>"
        f"<div style='display:flex;flex-wrap:wrap;gap:1em'>{cells}</div></body></html>"
    )
    target = Path(out)
    target.write_text(page, encoding="utf-8")
    return target, rows
