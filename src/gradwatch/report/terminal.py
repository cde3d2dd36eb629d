"""What a run recorded, in the terminal (rich): steps, loss, and the gradient-flow profile per layer.

Reads a stored :class:`~gradwatch.store.Run`; never touches a model or torch.
"""

from __future__ import annotations

import math
import sys
import warnings

import numpy as np
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from ..diagnose.facts import fmt, streams as flow_streams
from ..store import Run
from .plots import amp_text, guard_counts, has_guards

_SPARK = "▁▂▃▄▅▆▇█"
MAX_ROWS = 24  # deeper models: first and last layers, the middle elided


def sparkline(values: np.ndarray, width: int = 40, log: bool = False) -> str:
    """A one-line picture of a series: ``▁▂▅█``, ``!`` where a value is non-finite."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return ""
    bins = np.array_split(np.arange(v.size), min(width, v.size))
    out = []
    finite = v[np.isfinite(v)]
    if log:
        finite = finite[finite > 0]
    if finite.size == 0:
        return "!" * len(bins)
    lo, hi = (np.log10(finite.min()), np.log10(finite.max())) if log else (finite.min(), finite.max())
    for idx in bins:
        chunk = v[idx]
        if not np.all(np.isfinite(chunk)):
            out.append("!")
            continue
        x = np.mean(np.log10(np.maximum(chunk, 1e-300))) if log else np.mean(chunk)
        level = 0 if hi == lo else int(round((x - lo) / (hi - lo) * (len(_SPARK) - 1)))
        out.append(_SPARK[min(max(level, 0), len(_SPARK) - 1)])
    return "".join(out)


def _window_median(series: np.ndarray, first: bool, frac: float = 0.1) -> np.ndarray:
    """Per-column median over the first (or last) ``frac`` of the rows where it was computed."""
    series = series[~np.all(np.isnan(series), axis=1)]  # sampled metrics: only their sampled rows
    n = series.shape[0]
    if n == 0:
        return np.full(series.shape[1], np.nan)
    k = max(1, int(math.ceil(n * frac)))
    part = series[:k] if first else series[-k:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: not computed there
        return np.nanmedian(part, axis=0)


def flow_profile(run: Run, frac: float = 0.1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Median grad RMS per layer over the first and last ``frac`` of steps, and each layer's reference.

    A layer's reference is the last weight matrix of its optimizer (as the diagnosis picks them) with a finite
    value: a profile ``rms / rms[ref]`` far below 1 at the input side is what vanishing looks like.
    """
    n = len(run.layers)
    rms = run.layer_series("grad_rms")
    if rms.shape[0] == 0:
        nan = np.full(n, np.nan)
        return nan, nan, np.full(n, n - 1)
    early, late = _window_median(rms, True, frac), _window_median(rms, False, frac)
    ref = np.zeros(n, dtype=int)
    # The same layers the diagnosis profiles, in the order they ran: the output layer is the last.
    position = {i: k for ids in flow_streams(run) for k, i in enumerate(ids)}
    for stream in sorted({layer.stream for layer in run.layers}):
        members = [i for i, layer in enumerate(run.layers) if layer.stream == stream]
        weights = sorted((i for i in members if i in position and np.isfinite(late[i])), key=position.__getitem__)
        ref[members] = weights[-1] if weights else members[-1]
    return early, late, ref


def layer_table(run: Run) -> Table:
    """Per-layer gradient RMS early and late, relative to the reference layer, and update ratio."""
    early, late, ref = flow_profile(run)
    upd_late = _window_median(run.layer_series("update_ratio"), False) if len(run.steps) else early
    refs = ", ".join(sorted({run.layers[r].name for r in ref}))
    table = Table(
        title=(f"gradient flow: grad RMS per layer, median of the first (early) and last (late) 10% of steps; "
               f"rel = relative to {refs}; upd = update ratio |dw|/|w| late"),
        title_justify="left",
    )
    table.add_column("layer", no_wrap=True)
    for col in ("shape", "act", "early", "rel", "late", "rel", "upd"):
        table.add_column(col, justify="left" if col == "act" else "right", no_wrap=True)
    rows: list[int] = list(range(len(run.layers)))
    if len(rows) > MAX_ROWS:
        rows = rows[: MAX_ROWS // 2] + [-1] + rows[-MAX_ROWS // 2 :]
    with np.errstate(all="ignore"):
        rel_early, rel_late = early / early[ref], late / late[ref]
    for i in rows:
        if i < 0:
            table.add_row("...", *[""] * 7)
            continue
        layer = run.layers[i]
        table.add_row(
            layer.name,
            "x".join(map(str, layer.shape)),
            layer.activation or "",
            fmt(float(early[i])),
            _rel(float(rel_early[i])),
            fmt(float(late[i])),
            _rel(float(rel_late[i])),
            fmt(float(upd_late[i])),
        )
    return table


def _rel(x: float) -> Text:
    # Below 1e-2 of the reference layer is the gradient-flow threshold used for vanishing.
    return Text(fmt(x), style="bold red" if math.isfinite(x) and x < 1e-2 else "")


def _after_guards(run: Run) -> np.ndarray:
    """The norm the optimizer stepped with: NaN at skipped steps (no step), rounded to 3 significant
    digits so that a norm clipped to a constant draws as a flat sparkline, not as float32 noise."""
    v = run.step_series("grad_norm_clipped").astype(np.float64)
    v[np.nan_to_num(run.step_series("skipped"), nan=0.0) > 0] = np.nan
    with np.errstate(all="ignore"):
        unit = 10.0 ** (np.floor(np.log10(np.abs(v))) - 2)
        return np.where(np.isfinite(unit) & (unit > 0), np.round(v / unit) * unit, v)


def _guard_counts_text(run: Run) -> Text:
    """How often the guards acted: steps clipped, skipped and rolled back (the last two in red)."""
    c = guard_counts(run)
    text = Text(f"{c['clipped']} of {len(run.steps)} steps clipped (clip_coef < 0.999), ")
    text.append(f"{c['skipped']} skipped", style="bold red" if c["skipped"] else "")
    text.append(", ")
    text.append(f"{c['rolled_back']} rolled back", style="bold red" if c["rolled_back"] else "")
    return text


def summary(run: Run, layers: bool = True) -> Group:
    """A rich renderable: header, step series (sparklines), and the per-layer gradient-flow table.

    With guards, the header also shows the norm after them and how often they clipped, skipped and
    rolled back.
    """
    steps = run.steps
    loss = run.step_series("loss")
    gnorm = run.step_series("grad_norm")
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    opts = ", ".join(s.get("optimizer", "?") for s in run.streams) or "none"
    head.add_row("run", str(run.path))
    head.add_row("status", run.status)
    head.add_row("recorded", f"{len(steps)} steps x {len(run.layers)} layers (optimizers: {opts})")
    guarded = has_guards(run)
    lines = [("loss", loss, False), ("grad norm" + (" (before guards)" if guarded else ""), gnorm, True)]
    if guarded:
        lines.append(("after guards", _after_guards(run), True))
    for label, series, log in lines:
        if np.isfinite(series).any():
            first = float(_window_median(series[:, None], True)[0])
            last = float(_window_median(series[:, None], False)[0])
            head.add_row(label, f"{fmt(first)} -> {fmt(last)} (median of first/last 10%)  {sparkline(series, log=log)}")
    if guarded:
        head.add_row("guards", _guard_counts_text(run))
    amp = amp_text(run)
    if amp:
        head.add_row("AMP", amp)
    nonfinite = run.layer_series("grad_nonfinite")
    caught = np.nan_to_num(run.step_series("amp_skipped"), nan=0.0) > 0  # GradScaler's own business
    bad_steps = np.flatnonzero((np.nan_to_num(nonfinite, nan=0.0).max(axis=1) > 0) & ~caught) if nonfinite.size else []
    if len(bad_steps):
        head.add_row("non-finite", Text(f"gradients non-finite at {len(bad_steps)} steps, first at step {steps[bad_steps[0]]}",
                                        style="bold red"))

    return Group(head, layer_table(run)) if layers else Group(head)


def print_summary(run: Run, console: Console | None = None, layers: bool = True) -> None:
    (console or Console(file=sys.stderr)).print(summary(run, layers=layers))


_SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


def findings_view(findings: list) -> Group | Text:  # type: ignore[type-arg]
    """Each finding: severity, kind and summary, its layers, and its ranked remedies."""
    if not findings:
        return Text("diagnosis: no problems found (no warning or error).", style="green")
    parts: list = []  # type: ignore[type-arg]
    for f in findings:
        table = Table(show_header=False, box=None, padding=(0, 1))
        table.add_column(style="bold", no_wrap=True)
        table.add_column()
        table.add_row(Text(f.severity.upper(), style=_SEVERITY_STYLE.get(f.severity, "")), Text(f.summary))
        if f.layers:
            shown = ", ".join(f.layers[:6]) + (f" (+{len(f.layers) - 6} more)" if len(f.layers) > 6 else "")
            table.add_row("layers", shown)
        table.add_row("steps", f"{f.first_step} .. {f.last_step}")
        for rank, r in enumerate(f.remedies[:4], 1):
            table.add_row(f"fix {rank}", Text(f"{r.call()} — {r.why}"))
        parts.append(table)
    return Group(*parts)


def print_findings(findings: list, console: Console | None = None) -> None:  # type: ignore[type-arg]
    (console or Console(file=sys.stderr)).print(findings_view(findings))
