"""A scenario: one seed experiment, as variants trained the same way and compared.

Each variant builds a :class:`Trial` (model, optimizer, data, loss, guards) from a seed; the runner
trains it under :class:`~gradwatch.watch.Watch` (one run directory per variant), scores it on the
held-out data (accuracy or MSE, as the seed reports), and keeps what diagnosis found. The
scenario's table puts the seed's published figure next to ours, and ``compare.html`` shows the
variants' gradient-flow heatmaps side by side.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import GradwatchError
from .results import VariantResult  # noqa: F401 - the result type, importable from here as before
from ..watch import Watch


@dataclass
class Trial:
    """Everything one training run needs."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor] | None  # None: scored on the training data, as the seed did
    metric: str  # "accuracy" (binary: sigmoid output > 0.5; multi-class: argmax) or "mse"
    batch_size: int = 32
    guards: list = field(default_factory=list)
    penalty: Callable[[nn.Module], torch.Tensor] | None = None  # added to the loss (L2 regularisation)


@dataclass
class Variant:
    label: str
    build: Callable[[int], Trial]  # seed -> trial
    published: str = ""  # the seed's figure or statement for this variant
    full_only: bool = False  # part of --full only


@dataclass
class Scenario:
    name: str
    seed_article: str  # "000".."004"
    title: str
    variants: list[Variant]
    epochs: int  # the default (quick) budget
    full_epochs: int  # the seed's own
    note: str = ""  # what differs from the seed (data stand-ins, budgets)
    reports: bool = False  # write each variant's report.html (the seed shows per-layer plots of each)
    #: The qualitative result the seed reports, checked on our results: (description, predicate).
    expectations: list[tuple[str, Callable[[dict[str, "VariantResult"]], bool]]] = field(default_factory=list)


def _score(model: nn.Module, x: torch.Tensor, y: torch.Tensor, metric: str) -> float:
    with torch.no_grad():
        pred = model(x)
        if not torch.isfinite(pred).all():
            return math.nan
        if metric == "mse":
            return float(nn.functional.mse_loss(pred, y))
        if pred.shape[-1] == 1:
            return float(((pred > 0.5).float() == y).float().mean())
        return float((pred.argmax(-1) == y).float().mean())


def train(
    trial: Trial,
    out: str | os.PathLike[str],
    *,
    epochs: int,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
    **watch_options: Any,
) -> tuple[float, float, int, Watch]:
    """Train ``trial`` for ``epochs`` under a watch; return (score, final loss, steps, watch)."""
    x, y = trial.train
    gen = torch.Generator().manual_seed(seed)
    opts = {"quiet": True, "report": False, "overwrite": True, **watch_options}
    w = Watch(trial.model, trial.optimizer, out, guards=trial.guards, **opts).attach()
    steps = 0
    try:
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x), trial.batch_size):
                idx = order[i : i + trial.batch_size]
                loss = trial.loss_fn(trial.model(x[idx]), y[idx])
                total = loss + trial.penalty(trial.model) if trial.penalty is not None else loss
                trial.optimizer.zero_grad()
                total.backward()
                trial.optimizer.step()
                w.log(loss)
                steps += 1
                if progress is not None:
                    progress(1)
    finally:
        w.close()
    tx, ty = trial.test if trial.test is not None else trial.train
    with torch.no_grad():
        final = float(trial.loss_fn(trial.model(x), y))
    return _score(trial.model, tx, ty, trial.metric), final, steps, w


def steps_per_epoch(trial: Trial) -> int:
    return -(-len(trial.train[0]) // trial.batch_size)


def run_variant(variant: Variant, out: Path, *, epochs: int, seed: int = 0,
                progress: Callable[[int], None] | None = None, **watch_options: Any) -> VariantResult:
    from ..report.compare import summarize
    from ..store import load_run

    trial = variant.build(seed)
    t0 = time.perf_counter()
    score, final, steps, w = train(trial, out, epochs=epochs, seed=seed, progress=progress, **watch_options)
    run = load_run(out)
    row = summarize(run)
    loss = run.step_series("loss")
    bad = ~np.isfinite(loss) & (run.step_series("loss_logged") > 0)
    return VariantResult(
        label=variant.label, metric=trial.metric, score=score, final_loss=final,
        first_nonfinite_step=int(run.steps[np.argmax(bad)]) if bad.any() else None,
        flow=row.first_layer_rel, findings=row.findings, steps=steps,
        seconds=time.perf_counter() - t0, out=str(out), published=variant.published,
    )


def variants_of(scenario: Scenario, full: bool) -> list[Variant]:
    return [v for v in scenario.variants if full or not v.full_only]


def epochs_of(scenario: Scenario, full: bool, epochs: int | None = None) -> int:
    return epochs if epochs is not None else scenario.full_epochs if full else scenario.epochs


def total_steps(scenario: Scenario, full: bool, epochs: int | None = None, seed: int = 0) -> int:
    n = epochs_of(scenario, full, epochs)
    return sum(n * steps_per_epoch(v.build(seed)) for v in variants_of(scenario, full))


def run_scenario(
    scenario: Scenario,
    out: str | os.PathLike[str],
    *,
    full: bool = False,
    epochs: int | None = None,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
    **watch_options: Any,
) -> list[VariantResult]:
    """Train every variant into ``out/<variant>`` and write ``out/compare.html``."""
    from ..report.compare import write_compare

    root = Path(out)
    epochs = epochs_of(scenario, full, epochs)
    results = []
    for v in variants_of(scenario, full):
        results.append(run_variant(v, root / slug(v.label), epochs=epochs, seed=seed, progress=progress, **watch_options))
        if scenario.reports:
            from ..report.html import write_report

            write_report(results[-1].out)
    write_compare([r.out for r in results], root / "compare.html")
    return results


def check(scenario: Scenario, results: Sequence[VariantResult]) -> list[tuple[str, bool]]:
    """The seed's qualitative result, checked on ours: (statement, holds?)."""
    by = {r.label: r for r in results}
    full_only = {v.label for v in scenario.variants if v.full_only}
    out = []
    for text, predicate in scenario.expectations:
        try:
            ok = bool(predicate(by))
        except KeyError as e:
            if e.args and e.args[0] in full_only and e.args[0] not in by:
                continue  # a claim about a variant of --full only
            raise
        out.append((text, ok))
    return out


def slug(label: str) -> str:
    s = "".join(c if c.isalnum() else "-" for c in label.lower())
    while "--" in s:
        s = s.replace("--", "-")
    return s.strip("-")


def require_sklearn() -> None:
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise GradwatchError("the seed scenarios need scikit-learn for their data; "
                             "install it with `pip install gradwatch[demo]`.") from None
