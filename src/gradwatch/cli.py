"""The ``gradwatch`` command line.

    gradwatch run [options] SCRIPT [ARGS...]   run a training script with every optimizer watched
    gradwatch run [options] -m MODULE [ARGS...]
    gradwatch demo [--out DIR] [--backend torch|tensorflow|jax]   the seeds: train, diagnose, fix, report

Errors in what the user gave (a missing script, a bad option value, a broken run directory) are
one sentence on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from rich.console import Console

from . import __version__
from .errors import GradwatchError

_err = Console(file=sys.stderr, highlight=False)


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _add_watch_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("recording")
    g.add_argument("--out", metavar="DIR", help="run directory (default: gradwatch-runs/NAME-TIME)")
    g.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    g.add_argument("--no-report", action="store_true", help="do not write report.html at the end")
    g.add_argument("--tensorboard", metavar="DIR", help="also write TensorBoard event files into DIR at the end")
    g.add_argument("--flush-every", type=_positive_int, default=50, metavar="N", help="steps per device->host copy (default 50)")
    g.add_argument("--sample-every", type=_positive_int, default=50, metavar="N",
                   help="steps between full statistics; the gradient norm is recorded every step (default 50)")
    g.add_argument("--log-to", metavar="SINKS",
                   help="also log live, at every flush, to tensorboard, wandb and/or mlflow (comma-separated; "
                        "extras: tensorboard, wandb, mlflow; docs/integrations.md)")
    g.add_argument("--forensics", action=argparse.BooleanOptionalAction, default=None,
                   help="replay the first non-finite step to find the module, op and samples it came from "
                        "(PyTorch; on by default; docs/nan.md)")


def _non_negative_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {v}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return v


def _add_guard_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("guards (fixes applied between backward and the optimizer step; see docs/guards.md)")
    g.add_argument("--clip-norm", type=_positive_float, metavar="MAX",
                   help="clip the global gradient norm to MAX (clip_grad_norm_)")
    g.add_argument("--clip-norm-per-layer", type=_positive_float, metavar="MAX",
                   help="clip each gradient tensor's norm to MAX (Keras clipnorm)")
    g.add_argument("--clip-value", type=_positive_float, metavar="V", help="clamp every gradient element to [-V, V]")
    g.add_argument("--agc", type=_positive_float, metavar="CLIP",
                   help="adaptive unit-wise clipping, |g_unit|/|w_unit| <= CLIP (NFNets use 0.01)")
    g.add_argument("--zclip", action="store_true", help="clip gradient-norm spikes by their z-score (ZClip)")
    g.add_argument("--autoclip", type=float, metavar="P",
                   help="clip to the P-th percentile of the norms so far (AutoClip; the paper uses 10)")
    g.add_argument("--skip-nonfinite", action="store_true",
                   help="skip steps with NaN/Inf gradients, leaving weights and optimizer state untouched")
    g.add_argument("--rollback", action="store_true",
                   help="snapshot every 100 steps; on a blow-up restore the last good one and halve the lr")


def _guards(ns: argparse.Namespace) -> list:
    from . import guards as G

    out: list = []
    if getattr(ns, "clip_value", None):
        out.append(G.ClipValue(ns.clip_value))
    if getattr(ns, "clip_norm_per_layer", None):
        out.append(G.ClipNormPerLayer(ns.clip_norm_per_layer))
    if getattr(ns, "agc", None):
        out.append(G.AGC(ns.agc))
    if getattr(ns, "zclip", False):
        out.append(G.ZClip())
    if getattr(ns, "autoclip", None) is not None:
        out.append(G.AutoClip(ns.autoclip))
    if getattr(ns, "clip_norm", None):
        out.append(G.ClipNorm(ns.clip_norm))
    if getattr(ns, "skip_nonfinite", False):
        out.append(G.SkipNonFinite())
    if getattr(ns, "rollback", False):
        out.append(G.Rollback())
    return out


def _watch_options(ns: argparse.Namespace) -> dict:
    guards = _guards(ns)
    return {
        **({"guards": guards} if guards else {}),
        "flush_every": ns.flush_every,
        "sample_every": ns.sample_every,
        "overwrite": ns.overwrite,
        **({"report": False} if ns.no_report else {}),
        **({"tensorboard": ns.tensorboard} if ns.tensorboard else {}),
        **({"forensics": ns.forensics} if ns.forensics is not None else {}),
        **({"log_to": ns.log_to} if ns.log_to else {}),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradwatch",
        description="Find, explain and fix vanishing and exploding gradients in neural-network training.",
    )
    parser.add_argument("--version", action="version", version=f"gradwatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # allow_abbrev=False: a script option such as --clip must reach the script, not match --clip-norm.
    run = sub.add_parser("run", allow_abbrev=False,
                         help="run a training script with monitoring attached to every optimizer it creates")
    _add_watch_options(run)
    _add_guard_options(run)
    # For gradwatch doctor's trial runs (kept out of --help): stop after N steps, seed, remedies as JSON.
    run.add_argument("--max-steps", type=_positive_int, default=None, help=argparse.SUPPRESS)
    run.add_argument("--seed", type=_non_negative_int, default=None, help=argparse.SUPPRESS)
    run.add_argument("--treatment", default=None, help=argparse.SUPPRESS)
    run.add_argument("-m", dest="module", action="store_true", help="TARGET is a module name, as in python -m")
    run.add_argument("target", metavar="SCRIPT", help="the training script (or module with -m)")
    run.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS", help="arguments passed to the script")

    diag = sub.add_parser("diagnose", help="diagnose a stored run (also after a crash, on another machine)")
    diag.add_argument("run_dir", metavar="DIR", help="a run directory written by gradwatch")
    diag.add_argument("--json", action="store_true", help="print findings.json's format on stdout instead of the summary")

    rep = sub.add_parser("report", help="write the self-contained HTML report of a stored run")
    rep.add_argument("run_dir", metavar="DIR", help="a run directory written by gradwatch")
    rep.add_argument("--out", metavar="FILE", help="where to write it (default DIR/report.html)")

    cmp_ = sub.add_parser("compare", help="compare runs: a table here and their heatmaps side by side in one HTML page")
    cmp_.add_argument("run_dirs", metavar="DIR", nargs="+", help="run directories written by gradwatch")
    cmp_.add_argument("--out", metavar="FILE", default="gradwatch-compare.html",
                      help="the page to write (default gradwatch-compare.html)")

    doc = sub.add_parser("doctor", allow_abbrev=False,
                         help="diagnose a training script, try the remedies on it, and prove the best one")
    doc.add_argument("--out", metavar="DIR", help="where the runs go (default: gradwatch-runs/doctor-NAME-TIME)")
    doc.add_argument("--steps", type=_positive_int, default=None, metavar="N",
                     help="optimizer steps per trial (default: the whole script)")
    doc.add_argument("--trials", type=_positive_int, default=6, metavar="K", help="remedies to try at most (default 6)")
    doc.add_argument("--budget", type=_positive_float, default=600.0, metavar="SECONDS", help="time for all runs (default 600)")
    doc.add_argument("--metric", default="loss", metavar="NAME",
                     help="what the script prints to rank by, e.g. accuracy (default loss; acc/accuracy/auc/f1 are maximised)")
    doc.add_argument("--seed", type=_non_negative_int, default=0, help="seed for every run (default 0)")
    doc.add_argument("-m", dest="module", action="store_true", help="SCRIPT is a module name, as in python -m")
    doc.add_argument("target", metavar="SCRIPT", help="the training script")
    doc.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS", help="arguments passed to the script")

    demo = sub.add_parser("demo", help="the seed articles' experiments: train, diagnose, fix, compare (see --list)")
    demo.add_argument("--out", metavar="DIR", help="where the runs go (default: gradwatch-runs/demo-TIME)")
    demo.add_argument("--no-report", action="store_true", help="do not write the baseline's report.html")
    demo.add_argument("--flush-every", type=_positive_int, default=50, metavar="N",
                      help="steps per device->host copy (default 50)")
    demo.add_argument("--sample-every", type=_positive_int, default=50, metavar="N",
                      help="steps between full statistics (default 50)")
    demo.add_argument("scenarios", nargs="*", metavar="SCENARIO", help="scenarios to run (default: all; see --list)")
    demo.add_argument("--full", action="store_true", help="the seeds' own epochs and complete grids (minutes to hours)")
    demo.add_argument("--epochs", type=_positive_int, default=None, help="epochs for every scenario (overrides the defaults)")
    demo.add_argument("--list", action="store_true", help="list the scenarios and exit")
    demo.add_argument("--backend", choices=("torch", "tensorflow", "jax"), default="torch",
                      help="torch (default): the PyTorch scenarios; tensorflow or jax: seeds 000, 001 and 004 also as "
                           "Keras 3 programs on that backend, each table beside the PyTorch one")
    return parser


def _cmd_run(ns: argparse.Namespace) -> int:
    from .report.terminal import print_findings, print_summary
    from .runner import run_script

    if not ns.module and not os.path.isfile(ns.target):
        raise GradwatchError(f"no such script: {ns.target}; give the path of a Python training script (or -m MODULE).")
    treatment = None
    if ns.treatment:
        import json

        from .treatment import Treatment

        try:
            treatment = Treatment(json.loads(ns.treatment))
        except (ValueError, TypeError, KeyError) as e:
            raise GradwatchError(f"--treatment takes a JSON list of remedies ({e}).") from None
    code, w = run_script(ns.target, ns.args, module=ns.module, out=ns.out, max_steps=ns.max_steps, seed=ns.seed,
                         treatment=treatment, **_watch_options(ns))
    if treatment is not None and treatment.log:
        for line in treatment.log:
            print(f"gradwatch: applied {line}", file=sys.stderr)
    if w.layers and w.writes:  # under torchrun, rank 0 speaks for the job
        print_summary(w.run, _err)
        print_findings(w.findings, _err)
    return code


def _cmd_diagnose(ns: argparse.Namespace) -> int:
    import json

    from .diagnose import diagnose, findings_json, write_findings
    from .report.terminal import print_findings
    from .store import load_run

    run = load_run(ns.run_dir)
    findings = diagnose(run)
    try:
        write_findings(run.path, findings)
    except OSError as e:  # a read-only copy of a run is still diagnosed
        print(f"gradwatch: could not update {run.path}/findings.json ({e.strerror}); showing the result only.", file=sys.stderr)
    if ns.json:
        print(json.dumps(findings_json(findings), indent=1))
    else:
        print_findings(findings, Console(highlight=False))
    return 0


def _cmd_report(ns: argparse.Namespace) -> int:
    from .report.html import write_report

    path = write_report(ns.run_dir, ns.out)
    print(f"gradwatch: report written to {path} ({path.stat().st_size / 1e6:.2f} MB)", file=sys.stderr)
    return 0


def _cmd_compare(ns: argparse.Namespace) -> int:
    from .report.compare import table, write_compare

    path, rows = write_compare(ns.run_dirs, ns.out)
    Console(highlight=False).print(table(rows))
    print(f"gradwatch: comparison written to {path}", file=sys.stderr)
    return 0


def _fmt(x: float) -> str:
    return "-" if x != x else f"{x:.4g}"


def _cmd_doctor(ns: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from .doctor import doctor
    from .session import default_out

    name = ns.target.rsplit(".", 1)[-1] if ns.module else Path(ns.target).stem
    out = Path(ns.out) if ns.out else default_out(f"doctor-{name}")
    _err.print(f"[bold]gradwatch doctor[/bold] {ns.target}: baseline, then up to {ns.trials} remedies "
               f"({'the whole script' if not ns.steps else f'{ns.steps} steps'} each, seed {ns.seed}, budget {ns.budget:.0f} s)")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=_err, transient=True) as bar:
        task = bar.add_task("baseline", total=None)

        def progress(label: str, done: int, total: int) -> None:
            bar.update(task, description=f"running {label}", completed=done, total=total)

        rep = doctor(ns.target, ns.args, out=out, steps=ns.steps, trials=ns.trials, budget=ns.budget, metric=ns.metric,
                     seed=ns.seed, module=ns.module, say=lambda s: _err.print(f"gradwatch: {s}"), progress=progress)
    base = rep.baseline
    _err.print(f"baseline: {', '.join(base.problems) or 'no problem'}; printed {ns.metric} {_fmt(base.metric)}, "
               f"recorded loss {_fmt(base.loss)} over {base.steps} steps")
    if not rep.trials:
        if not base.problems:
            _err.print("[green]Healthy[/green]: no warning or error, so nothing was changed.")
            return 0
        _err.print("No remedy for these problems can be applied from outside the script; what to change in it:")
        for line in rep.advice:
            _err.print(f"  needs a code change: {line}")
        return 0
    t = Table(title=f"remedies tried on {ns.target} (from the same seed)", title_justify="left")
    for col in ("remedy", "problems left", f"printed {ns.metric}", "recorded loss (last 10%)", "steps", "time"):
        t.add_column(col, justify="right" if col not in ("remedy", "problems left") else "left")
    for r in [base, *rep.trials]:
        left = "failed: " + r.error if r.error else ", ".join(r.problems) or "none"
        mark = " [bold green]<- best[/bold green]" if r is rep.best else ""
        t.add_row(r.label + mark, left, _fmt(r.metric), _fmt(r.loss), str(r.steps), f"{r.seconds:.1f} s")
    _err.print(t)
    for line in rep.advice:
        _err.print(f"  needs a code change: {line}")
    if rep.best is None:
        _err.print("[red]No remedy removed the problems and kept the run finite.[/red] See the table and the findings.")
    else:
        conf, bf = rep.confirmed, rep.baseline_full
        if conf is not None and bf is not None:
            which = "the trial ran the whole script" if conf is rep.best else "by a run of the whole script"
            _err.print(f"[bold]Best: {rep.best.label}[/bold] — confirmed ({which}): printed {ns.metric} {_fmt(bf.metric)} -> "
                       f"{_fmt(conf.metric)}, recorded loss {_fmt(bf.loss)} -> {_fmt(conf.loss)}, problems left: "
                       f"{', '.join(conf.problems) or 'none'}.")
            for line in conf.applied:
                _err.print(f"  applied {line}")
        else:
            _err.print(f"[bold]Best: {rep.best.label}[/bold] (not confirmed by a run of the whole script: no time was left, "
                       "or it failed; see above).")
    if rep.compare is not None:
        _err.print(f"Side by side: [bold]{rep.compare}[/bold]")
    return 0


def _cmd_demo(ns: argparse.Namespace) -> int:
    from .diagnose import read_findings
    from .report.terminal import print_findings, print_summary
    from .scenarios.base import check
    from .scenarios.demo import list_scenarios, run_demo
    from .store import load_run
    from .session import default_out

    if ns.list:
        list_scenarios(Console(highlight=False))
        return 0
    if ns.backend != "torch":
        return _cmd_demo_backend(ns)
    out = Path(ns.out) if ns.out else default_out("demo")
    if out.exists() and not out.is_dir():
        raise GradwatchError(f"{out} exists and is not a directory; give --out a directory for the runs.")
    _err.print(
        "[bold]gradwatch demo[/bold]: the seed articles' experiments in PyTorch. Each scenario trains the "
        "seed's failing model and its fixes, diagnoses every run and compares them"
        + (" (the seeds' full budgets)." if ns.full else " (short budgets; --full for the seeds' own).")
    )
    opts = {"flush_every": ns.flush_every, "sample_every": ns.sample_every}
    done = run_demo(ns.scenarios, out, full=ns.full, epochs=ns.epochs, console=_err, **opts)
    scenario, results = done[0]
    base = results[0]
    _err.print(f"\n[bold]Diagnosis of {scenario.name} / {base.label}[/bold] (seed {scenario.seed_article}'s failing run):")
    print_summary(load_run(base.out), _err)
    print_findings(read_findings(base.out), _err)
    if not ns.no_report:
        from .report.html import write_report

        _err.print(f"Report: [bold]{write_report(base.out)}[/bold]  (open it in a browser)")
    checks = [ok for sc, res in done for _, ok in check(sc, res)]
    _err.print(f"Seed results reproduced: {sum(checks)} of {len(checks)}. Runs: [bold]{out}[/bold]")
    return 0


def _cmd_demo_backend(ns: argparse.Namespace) -> int:
    """``gradwatch demo --backend tensorflow|jax``: the Keras programs of seeds 000, 001, 004 beside PyTorch's."""
    from .scenarios import keras_seeds
    from .scenarios.demo import FRAMEWORK_NAMES, run_backend_demo
    from .session import default_out

    problem = keras_seeds.backend_error(ns.backend)
    if problem is not None:
        raise GradwatchError(problem)
    keras_seeds.check_names(ns.scenarios)
    out = Path(ns.out) if ns.out else default_out(f"demo-{ns.backend}")
    if out.exists() and not out.is_dir():
        raise GradwatchError(f"{out} exists and is not a directory; give --out a directory for the runs.")
    _err.print(
        f"[bold]gradwatch demo --backend {ns.backend}[/bold]: seeds 000, 001 and 004 written as the seeds write them, "
        f"in {FRAMEWORK_NAMES[ns.backend]} under gradwatch.keras.GradWatch, and in PyTorch; each seed's two tables side "
        "by side and whether both reach the same conclusions"
        + (" (the seeds' full budgets)." if ns.full else " (short budgets; --full for the seeds' own).")
    )
    opts = {"flush_every": ns.flush_every, "sample_every": ns.sample_every}
    done = run_backend_demo(ns.backend, ns.scenarios, out, full=ns.full, epochs=ns.epochs, console=_err, **opts)
    same = sum(c.same_conclusions for c in done)
    _err.print(f"\nSame conclusions on PyTorch and {FRAMEWORK_NAMES[ns.backend]}: {same} of {len(done)} seeds. "
               f"Runs: [bold]{out}[/bold]")
    return 0


def _need_torch(command: str) -> None:
    """Training commands need PyTorch; the commands on stored runs do not."""
    from .frameworks import torch_error

    if torch_error() is not None:
        raise GradwatchError(
            f"gradwatch {command} trains with PyTorch, which this Python cannot import ({torch_error()}); "
            "install it with `pip install gradwatch[torch]`. `gradwatch diagnose`, `report` and `compare` work "
            "on stored runs without it.")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        if ns.command in ("run", "demo", "doctor"):
            _need_torch(ns.command)
        if ns.command == "run":
            return _cmd_run(ns)
        if ns.command == "demo":
            return _cmd_demo(ns)
        if ns.command == "doctor":
            return _cmd_doctor(ns)
        if ns.command == "diagnose":
            return _cmd_diagnose(ns)
        if ns.command == "report":
            return _cmd_report(ns)
        if ns.command == "compare":
            return _cmd_compare(ns)
    except GradwatchError as e:
        print(f"gradwatch: error: {e}", file=sys.stderr)  # one line, never wrapped
        return 2
    parser.error(f"unknown command {ns.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
