"""The reports of a guarded run: the norm before and after the guards, the threshold, skipped steps
and rollbacks in the plot; a Guards section in the HTML page; the counts in the terminal summary.
A run without guards shows none of it."""

from __future__ import annotations

import io
from html import escape
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from torch import nn

import gradwatch as gw
from gradwatch.guards import ClipNorm, Rollback, SkipNonFinite
from gradwatch.report import html, plots, terminal
from gradwatch.testing import FaultInjector


def record(out: Path, guards: list | None, faults: dict, steps: int) -> gw.store.Run:  # type: ignore[type-arg]
    """The brief's run: targets 50x too large, SGD with momentum, faults injected into the gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05 if guards else 0.001, momentum=0.9)
    x = torch.randn(64, 10)
    y = x.sum(1, keepdim=True) * (50 if guards else 1)
    with FaultInjector(model, opt, faults), gw.watch(model, opt, out=out, guards=guards, quiet=True, report=False) as w:
        for _ in range(steps):
            loss = ((model(x) - y) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.log(loss)
    return gw.load_run(out)


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> gw.store.Run:
    return record(tmp_path_factory.mktemp("guarded") / "run", [ClipNorm(1.0), SkipNonFinite()], {30: "nan", 70: "inf"}, 100)


@pytest.fixture(scope="module")
def rolled(tmp_path_factory: pytest.TempPathFactory) -> gw.store.Run:
    guards = [ClipNorm(5.0), Rollback(every=10, min_history=5, skip_batches=2)]
    return record(tmp_path_factory.mktemp("rolled") / "run", guards, {30: "nan"}, 60)


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> gw.store.Run:
    return record(tmp_path_factory.mktemp("plain") / "run", None, {}, 30)


def lines_by_label(fig) -> dict:  # type: ignore[no-untyped-def,type-arg]
    return {line.get_label(): line for line in fig.axes[0].lines if not line.get_label().startswith("_")}


def guards_section(page: str) -> str:
    """The Guards section of a rendered page: from its heading to the next one ("" without it)."""
    if "<h2 id='guards'>" not in page:
        return ""
    start = page.index("<h2 id='guards'>")
    return page[start:page.index("<h2 ", start + 1)]


def summary_text(run: gw.store.Run) -> str:
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(terminal.summary(run, layers=False))
    return console.file.getvalue()  # type: ignore[attr-defined]


def flagged(run: gw.store.Run, name: str) -> np.ndarray:
    return run.steps[np.nan_to_num(run.step_series(name)) > 0]


def test_norm_plot_shows_the_norm_before_and_after_the_guards(guarded: gw.store.Run) -> None:
    fig = plots.norm_plot(guarded)
    lines = lines_by_label(fig)
    before = next(line for k, line in lines.items() if k.startswith("before guards"))
    after = next(line for k, line in lines.items() if k.startswith("after guards"))
    threshold = lines["clip threshold"]
    assert threshold.get_linestyle() == "--" and np.allclose(threshold.get_ydata(), 1.0)
    raw, clipped = np.asarray(before.get_ydata(), float), np.asarray(after.get_ydata(), float)
    assert np.nanmax(raw) > 100 and np.nanmax(clipped) <= 1.0 + 1e-3  # huge before, at the threshold after
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any(t.startswith("before guards") for t in legend) and any(t.startswith("after guards") for t in legend)
    skipped = flagged(guarded, "skipped")
    assert len(skipped) == 2  # the NaN and the Inf
    marks = lines["skipped step (no update)"]
    assert marks.get_marker() == "x" and sorted(marks.get_xdata()) == sorted(skipped)
    assert "2 skipped" in fig.axes[0].get_title()
    assert not any(k.startswith("rollback") for k in lines)


def test_norm_plot_marks_rollbacks(rolled: gw.store.Run) -> None:
    events = rolled.streams[0].get("rollbacks", [])
    rb = flagged(rolled, "rolled_back")
    assert len(events) >= 1 and len(rb) == len(events)
    fig = plots.norm_plot(rolled)
    vlines = [line for line in fig.axes[0].lines if line.get_color() == "purple"]
    assert len(vlines) == len(rb) and sorted(line.get_xdata()[0] for line in vlines) == sorted(rb)
    assert "rollback (snapshot restored)" in lines_by_label(fig)


def test_html_report_has_a_guards_section(guarded: gw.store.Run) -> None:
    page = html.render(guarded)
    assert "<h2 id='guards'>Guards</h2>" in page
    assert page.index("id='guards'") < page.index("id='flow'")  # right after the findings
    assert "ClipNorm(max_norm=1.0)" in page and "SkipNonFinite(" in page
    summary = guarded.streams[0]["guard_summary"]
    assert len(summary) == 2 and all(escape(line) in page for line in summary)


def test_guards_section_lists_rollbacks_escaped(rolled: gw.store.Run) -> None:
    rolled.streams[0]["guard_summary"].append("<script>alert(1)</script>")  # text, never markup
    page = html.render(rolled)
    section = guards_section(page)
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in section
    assert "Rollback(" in section and "rolled back at step" in section
    for event in rolled.streams[0]["rollbacks"]:
        assert f"<td>{escape(event['reason'])}</td>" in section and f"<td>{event['at_step']}</td>" in section


def test_terminal_summary_shows_the_norm_after_the_guards(guarded: gw.store.Run, rolled: gw.store.Run) -> None:
    text = summary_text(guarded)
    assert "grad norm (before guards)" in text
    after = next(line for line in text.splitlines() if line.startswith("after guards"))
    assert "1 -> 1 (median of first/last 10%)" in after
    counts = plots.guard_counts(guarded)
    assert counts["skipped"] == 2 and counts["rolled_back"] == 0 and counts["clipped"] > 90
    assert f"{counts['clipped']} of {len(guarded.steps)} steps clipped" in text and "2 skipped, 0 rolled back" in text
    assert f"{len(flagged(rolled, 'rolled_back'))} rolled back" in summary_text(rolled)


def test_a_run_without_guards_looks_as_before(plain: gw.store.Run) -> None:
    assert not plots.has_guards(plain) and np.isnan(plain.step_series("grad_norm_clipped")).all()
    fig = plots.norm_plot(plain)
    assert list(lines_by_label(fig)) == ["global gradient norm (before any clipping)"]
    assert len(fig.axes[0].lines) == 1 and fig.axes[0].get_title() == "global gradient norm"
    page = html.render(plain)
    assert guards_section(page) == "" and "id='guards'" not in page
    text = summary_text(plain)
    assert "after guards" not in text and "before guards" not in text and "clipped" not in text
    assert any(line.startswith("grad norm ") for line in text.splitlines())
