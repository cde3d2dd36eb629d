"""``gradwatch demo``: the seeds' experiments, trained, diagnosed, fixed and compared.

Each scenario trains its variants (the seed's failing model and its fixes) with a progress bar,
prints a table with the seed's published figure beside ours, checks the seed's qualitative result
on ours, and writes ``compare.html``; the first scenario's baseline is then diagnosed in full and
gets its ``report.html``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..errors import GradwatchError
from .base import Scenario, VariantResult, check, epochs_of, run_scenario, total_steps, variants_of
from .seeds import SCENARIOS


def results_table(scenario: Scenario, results: Sequence[VariantResult], epochs: int) -> Table:
    metric = results[0].metric if results else "accuracy"
    ours = "accuracy" if metric == "accuracy" else ("test MSE" if scenario.name == "regression" else "MSE")
    t = Table(title=f"seed {scenario.seed_article} · {scenario.name} · {epochs} epochs", title_justify="left")
    t.add_column("variant")
    t.add_column(ours, justify="right")
    t.add_column("seed's result")
    t.add_column("first/last\ngrad RMS", justify="right")
    t.add_column("gradwatch found")
    t.add_column("time", justify="right")
    for r in results:
        score = "NaN" if math.isnan(r.score) else f"{r.score:.3f}" if metric == "accuracy" else f"{r.score:.4g}"
        if r.first_nonfinite_step is not None:
            score += f" (NaN at step {r.first_nonfinite_step})"
        t.add_row(r.label, score, r.published, f"{r.flow:.3g}", ", ".join(r.findings) or "nothing", f"{r.seconds:.1f} s")
    return t


def list_scenarios(console: Console) -> None:
    t = Table(title="scenarios (gradwatch demo NAME ...)", title_justify="left")
    for col in ("name", "seed", "experiment", "variants (quick / --full)"):
        t.add_column(col)
    for sc in SCENARIOS.values():
        t.add_row(sc.name, sc.seed_article, sc.title, f"{len(variants_of(sc, False))} / {len(variants_of(sc, True))}")
    console.print(t)


def run_demo(
    names: Sequence[str],
    out: str | os.PathLike[str],
    *,
    full: bool = False,
    epochs: int | None = None,
    console: Console,
    **watch_options: Any,
) -> list[tuple[Scenario, list[VariantResult]]]:
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise GradwatchError(f"no scenario named {unknown[0]!r}; scenarios are: {', '.join(SCENARIOS)} (gradwatch demo --list).")
    scenarios = [SCENARIOS[n] for n in names] if names else list(SCENARIOS.values())
    root = Path(out)
    done = []
    for sc in scenarios:
        n_epochs = epochs_of(sc, full, epochs)
        console.print(f"\n[bold]seed {sc.seed_article} · {sc.name}[/bold] — {sc.title}")
        if sc.note:
            console.print(f"[dim]{sc.note}[/dim]")
        columns = (TextColumn("  training"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=True) as bar:
            task = bar.add_task("train", total=total_steps(sc, full, epochs))
            results = run_scenario(sc, root / sc.name, full=full, epochs=epochs,
                                   progress=lambda k: bar.advance(task, k), **watch_options)
        console.print(results_table(sc, results, n_epochs))
        for text, ok in check(sc, results):
            mark = "[green]reproduced[/green]" if ok else "[red]not reproduced[/red]"
            console.print(f"  {mark}: {text}")
        console.print(f"  side by side: [bold]{root / sc.name / 'compare.html'}[/bold]")
        if sc.reports:
            console.print(f"  per-layer weight and gradient plots: [bold]{root / sc.name}/*/report.html[/bold]")
        done.append((sc, results))
    return done
