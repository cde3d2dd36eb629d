"""A self-contained HTML report of a stored run: one file, images and data embedded, no network.

Top to bottom: the findings (each with evidence and remedies, linked to the plot that shows it),
what the guards did (if the run had any), the layer x step gradient-flow heatmap, the seeds'
gradient and weight plots, the global norm, the update ratios and activation fractions, then the
run's metadata. Every piece of user text (layer names, options, evidence) is escaped: it appears
as text, never as markup.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any, Callable

from ..store import Run, load_run
from . import plots
from .page import CSS, png_base64

REPORT_FILE = "report.html"

_KIND_TO_PLOT = {
    "vanishing_gradients": "flow",
    "exploding_gradients": "norm",
    "nonfinite": "norm",
    "dead_units": "activations",
    "saturated_units": "activations",
    "loss_spike": "gradients",
    "stalled_training": "updates",
}

def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _findings_html(findings: list) -> str:  # type: ignore[type-arg]
    if not findings:
        return '<p class="ok">No problems found: no warning or error.</p>'
    parts = []
    for f in findings:
        remedies = "".join(
            f"<li><code>{_e(r.call())}</code> — {_e(r.why)}</li>"
            for r in f.remedies
        )
        layers = ", ".join(_e(x) for x in f.layers[:12]) + (f" (+{len(f.layers) - 12} more)" if len(f.layers) > 12 else "")
        target = _KIND_TO_PLOT.get(f.kind, "flow")
        parts.append(
            f'<div class="finding {_e(f.severity)}"><span class="sev">{_e(f.severity)}</span> '
            f"{_e(f.summary)}"
            f"<br>steps {f.first_step}–{f.last_step}" + (f"; layers: {layers}" if layers else "")
            + f' — <a href="#{target}">see the plot</a>'
            f"<details><summary>evidence</summary><pre>{_e(json.dumps(f.to_json()['evidence'], indent=1))}</pre></details>"
            f"<ol>{remedies}</ol></div>"
        )
    return "".join(parts)


_ROLLBACK_COLUMNS = (("trigger_step", "blew up at step"), ("reason", "reason"), ("restored_step", "restored snapshot of step"),
                     ("at_step", "rolled back at step"), ("lr_factor", "lr factor"), ("skipped_batches", "batches skipped"))


def _guard_name(g: dict) -> str:  # type: ignore[type-arg]
    """``{"name": "ClipNorm", "max_norm": 1.0}`` as ``ClipNorm(max_norm=1.0)``, escaped."""
    args = ", ".join(f"{k}={v}" for k, v in g.items() if k != "name")
    return f"<code>{_e(g.get('name', '?'))}({_e(args)})</code>"


def _notes_html(run: Run) -> str:
    """Mixed precision and what was not recorded, one line each ("" when there is nothing to say)."""
    lines = []
    amp = plots.amp_text(run)
    if amp:
        lines.append(f"<li>AMP: {_e(amp)}</li>")
    for s in run.streams:
        if s.get("activation_stats"):
            lines.append(f"<li>{_e(s.get('label', ''))}: activation statistics {_e(str(s['activation_stats']))}</li>")
    return f"<h2 id='notes'>Recording notes</h2><ul>{''.join(lines)}</ul>" if lines else ""


def _guards_html(run: Run) -> str:
    """What each stream's guards were and did: their summary lines and the rollbacks ("" without guards)."""
    streams = [s for s in run.streams if s.get("guards") or s.get("guard_summary") or s.get("rollbacks")]
    if not streams:
        return ""
    c = plots.guard_counts(run)
    parts = ["<h2 id='guards'>Guards</h2>",
             (f"<p>{c['clipped']} of {len(run.steps)} steps clipped, {c['skipped']} skipped, {c['rolled_back']} rolled back "
              "— <a href='#norm'>see the norm before and after the guards</a></p>")]
    for s in streams:
        guards = ", ".join(_guard_name(g) for g in s.get("guards", []) if isinstance(g, dict)) or "?"
        parts.append(f"<p>{_e(s.get('label', ''))}: {guards}</p>")
        lines = "".join(f"<li>{_e(line)}</li>" for line in s.get("guard_summary", []))
        if lines:
            parts.append(f"<ul>{lines}</ul>")
        events = [e for e in s.get("rollbacks", []) if isinstance(e, dict)]
        if events:
            head = "".join(f"<th>{_e(title)}</th>" for _, title in _ROLLBACK_COLUMNS)
            rows = "".join("<tr>" + "".join(f"<td>{_e(e.get(k, ''))}</td>" for k, _ in _ROLLBACK_COLUMNS) + "</tr>"
                           for e in events)
            parts.append(f"<table><tr>{head}</tr>{rows}</table>")
    return "".join(parts)


def _meta_html(run: Run) -> str:
    rows = "".join(
        f"<tr><td>{i}</td><td>{_e(layer.name)}</td><td>{_e('x'.join(map(str, layer.shape)))}</td><td>{layer.numel}</td>"
        f"<td>{_e(layer.module_type)}</td><td>{_e(layer.activation or '')}</td><td>{_e(layer.dtype)}</td>"
        f"<td>{'yes' if layer.trainable else 'no'}</td></tr>"
        for i, layer in enumerate(run.layers)
    )
    streams = "".join(
        f"<li>{_e(s.get('label', ''))}: {_e(s.get('optimizer', '?'))} on {_e(s.get('model', '?'))} — "
        f"<code>{_e(json.dumps(s.get('defaults', {})))}</code></li>"
        for s in run.streams
    )
    return (
        f"<p>status: <b>{_e(run.status)}</b>; {len(run.steps)} steps recorded; created {_e(run.meta.get('created', '?'))}</p>"
        f"<ul>{streams}</ul>"
        f"<p>framework: <code>{_e(json.dumps(run.meta.get('framework', {})))}</code><br>"
        f"options: <code>{_e(json.dumps(run.meta.get('options', {})))}</code></p>"
        "<details><summary>layer table</summary><table><tr><th>#</th><th>layer</th><th>shape</th><th>numel</th>"
        f"<th>module</th><th>activation</th><th>dtype</th><th>trainable</th></tr>{rows}</table></details>"
    )


def render(run: Run) -> str:
    """The report of ``run`` as one HTML string."""
    findings = run.findings
    sections: list[tuple[str, str, Callable[[Run], Any]]] = [
        ("flow", "Gradient flow", plots.gradient_flow_heatmap),
        ("gradients", "Gradients and loss (seed 004's plot_gradient)", plots.gradient_plots),
        ("weights", "Weights (seed 004's plotweight)", plots.weight_plots),
        ("norm", "Global gradient norm", plots.norm_plot),
        ("updates", "Update ratio", plots.update_ratio_plot),
        ("activations", "Activations: dead and saturated units", plots.activation_plot),
    ]
    body = [f"<h1>gradwatch report — {_e(run.path.name)}</h1>", "<h2 id='findings'>Findings</h2>", _findings_html(findings),
            _guards_html(run), _notes_html(run)]
    if len(run.steps) == 0:
        body.append("<p>No optimizer step was recorded, so there is nothing to plot.</p>")
    else:
        for anchor, title, draw in sections:
            fig = draw(run)
            body.append(f"<h2 id='{anchor}'>{_e(title)}</h2>")
            if fig is None:
                body.append("<p>Not recorded in this run.</p>")
            else:
                body.append(f'<img alt="{_e(title)}" src="data:image/png;base64,{png_base64(fig)}">')
    body.append("<h2 id='meta'>Run</h2>" + _meta_html(run))
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>gradwatch — {_e(run.path.name)}</title><style>{CSS}</style></head><body>"
        + "".join(body)
        + "</body></html>"
    )


def write_report(run: Run | str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> Path:
    """Write the HTML report (default ``RUN/report.html``) and return its path."""
    if not isinstance(run, Run):
        run = load_run(run)
    target = Path(out) if out is not None else run.path / REPORT_FILE
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(render(run), encoding="utf-8")
    os.replace(tmp, target)
    return target
