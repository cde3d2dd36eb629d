"""``gradwatch demo``: the seeds' experiments, trained, diagnosed, fixed and compared.

Each scenario trains its variants (the seed's failing model and its fixes) with a progress bar,
prints a table with the seed's published figure beside ours, checks the seed's qualitative result
on ours, and writes ``compare.html``; the first scenario's baseline is then diagnosed in full and
gets its ``report.html``.

``--backend tensorflow`` or ``jax`` (:func:`run_backend_demo`): seeds 000, 001 and 004 also as the
seeds write them, Keras 3 programs recorded by ``gradwatch.keras.GradWatch`` on that backend, in a
child process (Keras takes its backend once per process) that trains while the PyTorch variants
train here; each seed's two tables are printed side by side (one above the other on a narrow
terminal) with a table of what each side found and whether they agree.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from rich.columns import Columns
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..errors import GradwatchError
from . import keras_seeds
from .base import Scenario, VariantResult, check, epochs_of, run_scenario, total_steps, variants_of
from .seeds import SCENARIOS


def results_table(scenario: Scenario, results: Sequence[VariantResult], epochs: int, *, framework: str = "") -> Table:
    metric = results[0].metric if results else "accuracy"
    ours = "accuracy" if metric == "accuracy" else ("test MSE" if scenario.name == "regression" else "MSE")
    title = f"seed {scenario.seed_article} · {scenario.name} · {epochs} epochs" + (f" · {framework}" if framework else "")
    t = Table(title=title, title_justify="left")
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


def _train(sc: Scenario, out: Path, *, full: bool, epochs: int | None, console: Console,
           **watch_options: Any) -> list[VariantResult]:
    """Train a PyTorch scenario with a progress bar."""
    columns = (TextColumn("  training"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("train", total=total_steps(sc, full, epochs))
        return run_scenario(sc, out, full=full, epochs=epochs, progress=lambda k: bar.advance(task, k), **watch_options)


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
        results = _train(sc, root / sc.name, full=full, epochs=epochs, console=console, **watch_options)
        console.print(results_table(sc, results, n_epochs))
        for text, ok in check(sc, results):
            mark = "[green]reproduced[/green]" if ok else "[red]not reproduced[/red]"
            console.print(f"  {mark}: {text}")
        console.print(f"  side by side: [bold]{root / sc.name / 'compare.html'}[/bold]")
        if sc.reports:
            console.print(f"  per-layer weight and gradient plots: [bold]{root / sc.name}/*/report.html[/bold]")
        done.append((sc, results))
    return done


# ------------------------------------------------------------- --backend tensorflow / jax: Keras 3


FRAMEWORK_NAMES = {"tensorflow": "Keras 3 on TensorFlow", "jax": "Keras 3 on JAX"}


class KerasChild:
    """The Keras scenarios (:mod:`gradwatch.scenarios.keras_seeds`) running in a child process whose
    KERAS_BACKEND is ``backend`` (Keras takes its backend once per process). Started by
    :func:`start_keras_subprocess`; :meth:`wait` returns its JSON. Its stderr is kept in
    ``out/stderr.log``; stdout carries one line per finished variant (read by :meth:`wait`)."""

    def __init__(self, backend: str, proc: subprocess.Popen, out: Path, total: int, log: Any):
        self.backend, self.proc, self.out, self.total, self._log = backend, proc, out, total, log
        self.result_file, self.log_file = out / "results.json", out / "stderr.log"

    def wait(self, console: Console | None = None, timeout: float | None = None) -> dict[str, Any]:
        """Wait for the child (a progress bar of its variants on ``console``) and return its JSON;
        a GradwatchError with the child's own error, or its last line, when it fails."""
        columns = (TextColumn(f"  {FRAMEWORK_NAMES[self.backend]}: {{task.description}}"), BarColumn(),
                   MofNCompleteColumn(), TextColumn("variants"), TimeElapsedColumn())
        try:
            with Progress(*columns, console=console, transient=True, disable=console is None) as bar:
                task = bar.add_task("training", total=self.total)
                assert self.proc.stdout is not None
                for line in self.proc.stdout:
                    if line.startswith(keras_seeds.PROGRESS_PREFIX):
                        done = json.loads(line[len(keras_seeds.PROGRESS_PREFIX):])
                        bar.update(task, advance=1, description=f"{done['scenario']} / {done['label']} done")
                rc = self.proc.wait(timeout=timeout)
        except BaseException:
            self.kill()
            raise
        finally:
            self._log.close()
        if rc != 0 or not self.result_file.exists():
            lines = [x.strip() for x in self.log_file.read_text(errors="replace").splitlines() if x.strip()]
            said = next((x for x in reversed(lines) if x.startswith("gradwatch: error: ")), None)
            if said is not None:
                raise GradwatchError(said[len("gradwatch: error: "):])
            last = lines[-1] if lines else "no output"
            raise GradwatchError(f"the Keras scenarios on {self.backend} failed (exit code {rc}: {last}); "
                                 f"the child's output is in {self.log_file}.")
        return json.loads(self.result_file.read_text())

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._log.close()


def start_keras_subprocess(
    backend: str,
    names: Sequence[str],
    out: str | os.PathLike[str],
    *,
    full: bool = False,
    epochs: int | None = None,
    only: Sequence[str] | None = None,
    **watch_options: Any,
) -> KerasChild:
    """Start ``python -m gradwatch.scenarios.keras_seeds`` on ``backend`` for ``names`` (all when
    empty), its runs under ``out``; returns at once."""
    problem = keras_seeds.backend_error(backend)
    if problem is not None:
        raise GradwatchError(problem)
    scenarios = keras_seeds.check_names(names)
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    (root / "results.json").unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "gradwatch.scenarios.keras_seeds", "--backend", backend,
           "--json", str(root / "results.json"), "--out", str(root), *[sc.name for sc in scenarios]]
    if full:
        cmd.append("--full")
    if epochs is not None:
        cmd += ["--epochs", str(epochs)]
    for label in only or ():
        cmd += ["--variant", label]
    for key in ("flush_every", "sample_every"):
        if watch_options.get(key) is not None:
            cmd += [f"--{key.replace('_', '-')}", str(watch_options[key])]
    env = dict(os.environ, KERAS_BACKEND=backend)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    package_root = str(Path(__file__).resolve().parents[2])  # the directory holding gradwatch/
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    total = sum(len(keras_seeds.variants_of(sc, full, only)) for sc in scenarios)
    log = open(root / "stderr.log", "w")
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    except BaseException:
        log.close()
        raise
    return KerasChild(backend, proc, root, total, log)


def run_keras_subprocess(backend: str, names: Sequence[str], out: str | os.PathLike[str], *,
                         console: Console | None = None, timeout: float | None = None, **options: Any) -> dict[str, Any]:
    """:func:`start_keras_subprocess` then :meth:`KerasChild.wait`: the child's JSON."""
    return start_keras_subprocess(backend, names, out, **options).wait(console, timeout)


def finding_kinds(result: Any) -> frozenset[str]:
    """The kinds of a result's warnings and errors (``findings`` holds ``"kind (severity)"``)."""
    return frozenset(f.split(" (")[0] for f in result.findings)


@dataclass
class Agreement:
    label: str
    health: str  # what the seed says: "unhealthy", "healthy" or ""
    torch: frozenset[str] | None  # None: the variant has no PyTorch run here
    keras: frozenset[str] | None
    verdict: str  # "same", "differs", "not clean", "one side"

    @property
    def ok(self) -> bool:
        return self.verdict in ("same", "one side")


def compare_conclusions(name: str, torch_results: Sequence[Any], keras_results: Sequence[Any]) -> list[Agreement]:
    """Per variant: the finding kinds on each side, and whether they agree: the same kinds, a healthy
    run (as the seed calls it) clean on both, a failing one found failing on both."""
    health = {v.label: v.health for v in keras_seeds.SCENARIOS[name].variants}
    by_t = {r.label: r for r in torch_results}
    by_k = {r.label: r for r in keras_results}
    rows = []
    for label in [*by_t, *[k for k in by_k if k not in by_t]]:
        t = finding_kinds(by_t[label]) if label in by_t else None
        k = finding_kinds(by_k[label]) if label in by_k else None
        h = health.get(label, "")
        if t is None or k is None:
            verdict = "one side"
        elif t != k:
            verdict = "differs"
        elif (h == "healthy" and t) or (h == "unhealthy" and not t):
            verdict = "not as the seed"
        else:
            verdict = "same"
        rows.append(Agreement(label, h, t, k, verdict))
    return rows


def conclusions_table(agreements: Sequence[Agreement], framework: str) -> Table:
    t = Table(title=f"conclusions: PyTorch vs {framework}", title_justify="left")
    for col in ("variant", "seed says", "PyTorch found", f"{framework} found", "agree"):
        t.add_column(col)
    style = {"same": "green", "differs": "red", "not as the seed": "yellow", "one side": "dim"}
    says = {"unhealthy": "fails", "healthy": "a fix", "": ""}

    def kinds(k: frozenset[str] | None) -> str:
        return "(not run)" if k is None else ", ".join(sorted(k)) or "nothing"

    for a in agreements:
        t.add_row(a.label, says[a.health], kinds(a.torch), kinds(a.keras), f"[{style[a.verdict]}]{a.verdict}[/]")
    return t


@dataclass
class BackendComparison:
    scenario: Scenario
    torch: list[VariantResult]
    keras: list[keras_seeds.VariantResult]
    agreements: list[Agreement]

    @property
    def same_conclusions(self) -> bool:
        return all(a.ok for a in self.agreements)


def run_backend_demo(
    backend: str,
    names: Sequence[str],
    out: str | os.PathLike[str],
    *,
    full: bool = False,
    epochs: int | None = None,
    only: Sequence[str] | None = None,
    console: Console,
    keras_results: dict[str, Any] | None = None,
    **watch_options: Any,
) -> list[BackendComparison]:
    """``gradwatch demo --backend tensorflow|jax``: seeds 000, 001 and 004 as Keras programs on that
    backend, in a child process that runs while the PyTorch scenarios train here; then for each seed
    both tables side by side and whether both reach the same conclusions.

    Args:
        only: just these variants (label or ``scenario/label``), on both sides.
        keras_results: the child's JSON, when already at hand (no child is started).
    """
    framework = FRAMEWORK_NAMES.get(backend)
    if framework is None:
        raise GradwatchError(f"--backend is torch, tensorflow or jax, not {backend!r}.")
    keras_scenarios = keras_seeds.check_names(names)
    root = Path(out)
    child = None
    if keras_results is None:
        child = start_keras_subprocess(backend, [sc.name for sc in keras_scenarios], root / f"keras-{backend}",
                                       full=full, epochs=epochs, only=only, **watch_options)
        console.print(f"\n[bold]{framework}[/bold]: seeds {', '.join(sc.seed_article for sc in keras_scenarios)} as "
                      "the seeds write them (Sequential, compile, fit with gradwatch.keras.GradWatch), in a child "
                      f"process while the PyTorch scenarios train here")
    import torch

    threads = torch.get_num_threads()
    if child is not None:
        torch.set_num_threads(1)  # the child works on the other cores; these small MLPs lose nothing by it
    try:
        trained = []
        for ksc in keras_scenarios:
            # Per-variant report.html pages are the PyTorch demo's (gradwatch report DIR draws one for any run).
            sc = dataclasses.replace(SCENARIOS[ksc.name], reports=False)
            if only:
                sc = dataclasses.replace(sc, variants=[v for v in sc.variants
                                                       if keras_seeds.selected(sc.name, v.label, only)])
            console.print(f"  PyTorch: seed {sc.seed_article} · {sc.name}")
            trained.append((ksc, sc, _train(sc, root / "torch" / sc.name, full=full, epochs=epochs, console=console,
                                            **watch_options)))
        if child is not None:
            keras_results = child.wait(console)
    finally:
        torch.set_num_threads(threads)
        if child is not None:
            child.kill()  # no-op when it has finished
    assert keras_results is not None
    by_name = keras_seeds.results_from_json(keras_results)
    epochs_by_name = {s["name"]: s["epochs"] for s in keras_results["scenarios"]}
    done = []
    for ksc, sc, torch_results in trained:
        n_epochs = epochs_of(sc, full, epochs)
        console.print(f"\n[bold]seed {sc.seed_article} · {sc.name}[/bold]")
        console.print(f"  PyTorch: {sc.title}")
        console.print(f"  {framework}: {ksc.title}")
        if ksc.note:
            console.print(f"  [dim]{ksc.note}[/dim]")
        kres = by_name.get(sc.name, [])
        console.print(Columns([results_table(sc, torch_results, n_epochs, framework="PyTorch"),
                               results_table(sc, kres, epochs_by_name.get(sc.name, n_epochs), framework=framework)]))
        agreements = compare_conclusions(sc.name, torch_results, kres)
        console.print(conclusions_table(agreements, framework))
        cmp = BackendComparison(sc, torch_results, kres, agreements)
        if cmp.same_conclusions:
            console.print(f"  [green]same conclusions[/green] on PyTorch and {framework}")
        else:
            bad = [a.label for a in agreements if not a.ok]
            console.print(f"  [red]different conclusions[/red] on PyTorch and {framework}: {', '.join(bad)}")
        for side, res in (("PyTorch", torch_results), (framework, kres)):
            try:
                claims = check(sc, res)  # type: ignore[arg-type]  # the same fields
            except KeyError:
                claims = []  # a claim about a variant not run here (--variant)
            for text, ok in claims:
                mark = "[green]reproduced[/green]" if ok else "[red]not reproduced[/red]"
                console.print(f"  {side}: {mark}: {text}")
        keras_dir = Path(kres[0].out).parent if kres else root / f"keras-{backend}" / sc.name
        console.print(f"  runs: [bold]{root / 'torch' / sc.name}[/bold] and [bold]{keras_dir}[/bold]")
        done.append(cmp)
    return done
