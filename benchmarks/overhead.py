#!/usr/bin/env python
"""How much does gradient monitoring slow a training step down?

Compares, on the same models and data, one process, interleaved:

  unmonitored          zero_grad, forward, loss, backward, step
  gradwatch            the same step inside gradwatch.watch(...), w.log(loss=loss) after step
  naive .item()        per-parameter p.grad.norm().item() after backward (the hand-written way)
  lightning grad_norm  lightning.pytorch.utilities.grad_norm(model, norm_type=2) after backward
  wandb.watch          wandb.watch(model, log="all", log_freq=1) + wandb.log({"loss": ...}), offline

Run from the repository root:

    .venv/bin/python benchmarks/overhead.py            # full run, a few minutes on 2 CPU cores
    .venv/bin/python benchmarks/overhead.py --quick    # smoke run, seconds; numbers meaningless

Method of measurement (so the numbers can be trusted, or criticised precisely):

* Every method trains its own deep copy of one seeded model, with its own Adam, on the same
  fixed synthetic batch, so all of them do identical numerical work.
* Monitoring objects (gradwatch watcher, wandb run) are created once per model and live across
  all repeats, as in a real training loop; their setup and teardown are not timed.
* Each measurement times K consecutive steps of one method. Methods take turns (round-robin,
  starting one later each repeat) so that thermal/frequency drift and the after-effects of the
  previous method are spread over all methods equally.
* The reported figure is the median over repeats of (window time / K); the IQR and the mean
  are printed beside it. K defaults to a multiple of gradwatch's sample and flush periods so
  that every window contains the same share of gradwatch's periodic work.
* After the run the final weights of every method are compared with the unmonitored copy: a
  monitor must not change training.
* CPU time used by processes outside this benchmark's process tree is measured per model and
  reported; above 5% of the machine the affected rows get a warning.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

# wandb must never reach the network and must stay quiet. Forced (not setdefault) so that a
# WANDB_MODE=online in the caller's shell cannot turn the benchmark into an upload.
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ["WANDB_ERROR_REPORTING"] = "false"  # no crash reports to Sentry
os.environ["WANDB_DISABLE_GIT"] = "true"  # don't inspect this repo at init (untimed, but slow)
os.environ["WANDB_DISABLE_CODE"] = "true"

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parent.parent

# gradwatch settings used by the `gradwatch` method. The default window length is derived from
# them (see default_steps_per_repeat) so each timed window holds whole sample/flush periods.
GRADWATCH_SETTINGS = {"flush_every": 50, "sample_every": 50}  # gradwatch's defaults
# gradwatch samples 5x more densely in its first 2 * sample_every steps: warm up past them.
STEADY_WARMUP = 2 * GRADWATCH_SETTINGS["sample_every"]

BASELINE = "unmonitored"

# Above this share of the machine's CPU used by other processes, the results get a warning.
FOREIGN_CPU_WARN = 0.05

# Short CLI aliases for the method names (which contain spaces and dots).
METHOD_ALIASES = {
    "unmonitored": "unmonitored",
    "gradwatch": "gradwatch",
    "naive": "naive .item()",
    "item": "naive .item()",
    "lightning": "lightning grad_norm",
    "wandb": "wandb.watch",
}


# --------------------------------------------------------------------------------------------
# Models and data
# --------------------------------------------------------------------------------------------


def build_mlp() -> nn.Module:
    """24 hidden Linear(512, 512)+ReLU blocks: the deep case, 50 parameter tensors."""
    layers: list[nn.Module] = []
    for _ in range(24):
        layers += [nn.Linear(512, 512), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(512, 10))


def build_cnn() -> nn.Module:
    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU()]

    return nn.Sequential(
        *block(3, 32), nn.MaxPool2d(2),   # 32x32 -> 16x16
        *block(32, 64), nn.MaxPool2d(2),  # 16x16 -> 8x8
        *block(64, 128),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10),
    )  # fmt: skip


class TinyTransformer(nn.Module):
    """Token embedding -> 2-layer encoder -> mean-pool -> linear head (sequence classifier)."""

    def __init__(self, vocab: int = 1000, d_model: int = 128, layers: int = 2, classes: int = 10):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        # dropout=0 keeps every method's copy on an identical trajectory, which lets the run
        # check that monitoring leaves the weights unchanged. Timing is unaffected.
        layer = nn.TransformerEncoderLayer(
            d_model, nhead=4, dim_feedforward=4 * d_model, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(dim=1))


@dataclass(frozen=True)
class ModelSpec:
    name: str
    describe: str
    build: Callable[[], nn.Module]
    make_inputs: Callable[[torch.Generator], torch.Tensor]
    batch: int
    classes: int = 10
    #: The optimizer each copy trains with (Adam by default; SGD is where gradwatch's share is largest).
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] = torch.optim.Adam


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec(
            "mlp", "24x Linear(512,512)+ReLU, batch 256", build_mlp,
            lambda g: torch.randn(256, 512, generator=g), batch=256,
        ),
        ModelSpec(
            "mlp-sgd64", "24x Linear(512,512)+ReLU, SGD(lr 0.01), batch 64: the worst case of issue 18", build_mlp,
            lambda g: torch.randn(64, 512, generator=g), batch=64,
            optimizer=lambda params: torch.optim.SGD(params, lr=0.01),
        ),
        ModelSpec(
            "cnn", "3 conv layers, 3x32x32, batch 64", build_cnn,
            lambda g: torch.randn(64, 3, 32, 32, generator=g), batch=64,
        ),
        ModelSpec(
            "transformer", "emb + 2-layer encoder d128, seq 64, batch 32", TinyTransformer,
            lambda g: torch.randint(0, 1000, (32, 64), generator=g), batch=32,
        ),
    ]
}  # fmt: skip
#: The models a run without --models measures (mlp-sgd64 is asked for by name: docs/performance.md).
DEFAULT_MODELS = "mlp,cnn,transformer"


@dataclass
class Trainee:
    """One method's private model, optimizer and (shared, read-only) batch."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    inputs: torch.Tensor
    targets: torch.Tensor


def train_step(t: Trainee, after_backward: Callable[[], object] | None = None) -> torch.Tensor:
    """The step every method shares; methods differ only in what they add around it."""
    t.optimizer.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(t.model(t.inputs), t.targets)
    loss.backward()
    if after_backward is not None:
        after_backward()
    t.optimizer.step()
    return loss


# --------------------------------------------------------------------------------------------
# Methods. Each is constructed once per model (untimed), stepped many times, closed at the end.
# Constructors raise Unavailable when the library is missing, which becomes an "n/a" row.
# --------------------------------------------------------------------------------------------


class Unavailable(Exception):
    pass


class Unmonitored:
    def __init__(self, t: Trainee, workdir: Path):
        self.t = t

    def step(self) -> None:
        train_step(self.t)

    def close(self) -> None:
        pass


def import_gradwatch():
    """Import the installed package, or the repo's src/ when it is not installed yet."""
    try:
        import gradwatch
    except ImportError:
        sys.path.insert(0, str(REPO_ROOT / "src"))
        try:
            import gradwatch
        except Exception as e:  # a half-written package can fail with anything
            raise Unavailable(f"gradwatch not importable: {type(e).__name__}: {e}") from e
    if not hasattr(gradwatch, "watch"):
        raise Unavailable("gradwatch not importable: gradwatch has no attribute 'watch'")
    return gradwatch


class Gradwatch:
    def __init__(self, t: Trainee, workdir: Path):
        gw = import_gradwatch()
        self.t = t
        # Entered once and kept open across all repeats, exactly like `with gw.watch(...) as w:`
        # wrapped around a whole training loop.
        self._stack = contextlib.ExitStack()
        self.w = self._stack.enter_context(
            gw.watch(t.model, t.optimizer, out=workdir / "gradwatch", **GRADWATCH_SETTINGS)
        )

    def step(self) -> None:
        loss = train_step(self.t)
        self.w.log(loss=loss)

    def close(self) -> None:
        self._stack.close()


class NaiveItem:
    """What people write by hand: one norm and one host sync per parameter, every step."""

    def __init__(self, t: Trainee, workdir: Path):
        self.t = t
        self.history: list[list[float]] = []  # kept, as a hand-written logger would

    def step(self) -> None:
        stats: list[float] = []

        def record() -> None:
            for p in self.t.model.parameters():
                stats.append(p.grad.norm().item())

        train_step(self.t, after_backward=record)
        self.history.append(stats)

    def close(self) -> None:
        pass


class LightningGradNorm:
    """What Lightning users call in on_before_optimizer_step; the result is not converted."""

    def __init__(self, t: Trainee, workdir: Path):
        try:
            from lightning.pytorch.utilities import grad_norm
        except ImportError as e:
            raise Unavailable(f"lightning not importable: {e}") from e
        self.t = t
        self._grad_norm = grad_norm
        self.last: dict[str, torch.Tensor] = {}

    def step(self) -> None:
        def norms() -> None:
            self.last = self._grad_norm(self.t.model, norm_type=2)

        train_step(self.t, after_backward=norms)

    def close(self) -> None:
        pass


class WandbWatch:
    """One offline wandb run per model, so each run watches exactly one model."""

    def __init__(self, t: Trainee, workdir: Path):
        try:
            import wandb
        except ImportError as e:
            raise Unavailable(f"wandb not importable: {e}") from e
        self.t = t
        self._wandb = wandb
        workdir.mkdir(parents=True, exist_ok=True)
        wandb.init(
            mode="offline", dir=str(workdir), project="gradwatch-overhead", name=workdir.parent.name
        )
        # log_freq=1: the gradient and parameter hooks build histograms on every step (the other
        # methods also work every step); wandb.log then commits them to the offline run.
        wandb.watch(t.model, log="all", log_freq=1)

    def step(self) -> None:
        loss = train_step(self.t)
        self._wandb.log({"loss": loss.item()})

    def close(self) -> None:
        self._wandb.finish()


METHODS: dict[str, Callable[[Trainee, Path], object]] = {
    "unmonitored": Unmonitored,
    "gradwatch": Gradwatch,
    "naive .item()": NaiveItem,
    "lightning grad_norm": LightningGradNorm,
    "wandb.watch": WandbWatch,
}


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------


@dataclass
class Result:
    model: str
    method: str
    window_ms: list[float] = field(default_factory=list)  # per-step ms of each timed window
    problem: str | None = None  # set when there are no numbers: "n/a (...)" or "failed: ..."
    weight_diff: float | None = None  # max |w - w_unmonitored| after the run


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def device_sync(device: torch.device) -> Callable[[], None]:
    # On a GPU, work is queued asynchronously: without a sync the clock would stop before the
    # step has actually run. On CPU there is nothing to wait for.
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def make_trainees(spec: ModelSpec, n: int, seed: int, device: torch.device) -> list[Trainee]:
    """n identical (model, optimizer) pairs from one seeded init, sharing one synthetic batch."""
    torch.manual_seed(seed)
    base = spec.build().to(device)
    gen = torch.Generator().manual_seed(seed + 1)
    inputs = spec.make_inputs(gen).to(device)
    targets = torch.randint(0, spec.classes, (spec.batch,), generator=gen).to(device)
    trainees = []
    for _ in range(n):
        model = copy.deepcopy(base)
        trainees.append(Trainee(model, spec.optimizer(list(model.parameters())), inputs, targets))
    return trainees


def one_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".splitlines()[0]
    return text if len(text) <= 120 else text[:117] + "..."


def setup_methods(
    spec: ModelSpec, names: list[str], args: argparse.Namespace, workdir: Path
) -> tuple[dict[str, object], dict[str, Trainee], dict[str, Result]]:
    device = torch.device(args.device)
    trainees = dict(zip(names, make_trainees(spec, len(names), args.seed, device)))
    results = {name: Result(spec.name, name) for name in names}
    runners: dict[str, object] = {}
    for name in names:
        try:
            runners[name] = METHODS[name](trainees[name], workdir / spec.name / slug(name))
        except Unavailable as e:
            results[name].problem = f"n/a ({e})"
        except Exception as e:
            traceback.print_exc(file=sys.stderr)
            results[name].problem = f"failed at setup: {one_line(e)}"
    return runners, trainees, results


def run_steps(name: str, runner, steps: int, results: dict[str, Result], runners: dict) -> bool:
    """Step a method; on an exception drop it from the rotation instead of killing the run."""
    try:
        for _ in range(steps):
            runner.step()
        return True
    except Exception as e:
        traceback.print_exc(file=sys.stderr)
        results[name].problem = f"failed: {one_line(e)}"
        results[name].window_ms.clear()
        del runners[name]
        with contextlib.suppress(Exception):  # release files/hooks; the failure is already recorded
            runner.close()
        return False


def bench_model(spec: ModelSpec, names: list[str], args, workdir: Path, log) -> list[Result]:
    runners, trainees, results = setup_methods(spec, names, args, workdir)
    sync = device_sync(torch.device(args.device))
    try:
        # Warm-up, interleaved too: lets allocator caches, oneDNN kernels and lazy library
        # state settle for every method before anything is timed.
        for _ in range(args.warmup):
            for name in list(runners):
                run_steps(name, runners[name], 1, results, runners)

        for rep in range(args.repeats):
            active = list(runners)
            # Rotate the starting method each repeat, so no method always follows the same one.
            order = active[rep % len(active):] + active[: rep % len(active)] if active else []
            for name in order:
                sync()
                start = time.perf_counter()
                if not run_steps(name, runners[name], args.steps_per_repeat, results, runners):
                    continue
                sync()
                elapsed = time.perf_counter() - start
                results[name].window_ms.append(elapsed * 1000 / args.steps_per_repeat)
            log(f"  {spec.name}: repeat {rep + 1}/{args.repeats} done")
    finally:
        for name, runner in runners.items():
            try:
                runner.close()
            except Exception as e:
                traceback.print_exc(file=sys.stderr)
                results[name].problem = f"failed at close: {one_line(e)}"

    compare_weights(trainees, results)
    return [results[name] for name in names]


def compare_weights(trainees: dict[str, Trainee], results: dict[str, Result]) -> None:
    """Every method ran the same number of steps on the same data: weights must match."""
    if BASELINE not in trainees or results[BASELINE].problem:
        return
    ref = [p.detach() for p in trainees[BASELINE].model.parameters()]
    for name, t in trainees.items():
        if name == BASELINE or results[name].problem:
            continue
        params = [p.detach() for p in t.model.parameters()]
        results[name].weight_diff = max(
            (a - b).abs().max().item() for a, b in zip(params, ref)
        )


class ForeignCpuMeter:
    """CPU time used by processes outside this benchmark's own process tree (Linux only).

    Overhead ratios of a few percent are meaningless if something else is competing for the
    cores, and medians hide intermittent competition well enough that it would go unnoticed.
    Our tree includes wandb's wandb-core child, whose work is part of what is being measured.
    """

    def __init__(self) -> None:
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._start = self._sample()
        self._wall0 = time.perf_counter()

    def _sample(self) -> tuple[float, float] | None:
        try:
            fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
            machine_busy = user + nice + system + irq + softirq + steal
            return machine_busy / self._tick, self._own_tree_ticks() / self._tick
        except (OSError, ValueError):
            return None

    @staticmethod
    def _own_tree_ticks() -> int:
        procs: dict[int, tuple[int, int]] = {}  # pid -> (ppid, cpu ticks incl. reaped children)
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                # Fields after the ")" that closes the command name, which may contain spaces.
                rest = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue  # the process exited while we looked
            ppid = int(rest[1])
            utime, stime, cutime, cstime = map(int, rest[11:15])
            procs[int(entry.name)] = (ppid, utime + stime + cutime + cstime)
        tree, frontier = set(), {os.getpid()}
        while frontier:
            tree |= frontier
            frontier = {pid for pid, (ppid, _) in procs.items() if ppid in frontier} - tree
        return sum(procs[pid][1] for pid in tree if pid in procs)

    def foreign_share(self) -> float | None:
        """Fraction of the machine's total CPU capacity used by others since construction."""
        end = self._sample()
        if self._start is None or end is None:
            return None
        wall = time.perf_counter() - self._wall0
        foreign = (end[0] - self._start[0]) - (end[1] - self._start[1])
        return max(foreign, 0.0) / (wall * (os.cpu_count() or 1))


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def quartiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def table_rows(results: list[Result]) -> list[list[str]]:
    baselines = {
        r.model: statistics.median(r.window_ms)
        for r in results
        if r.method == BASELINE and r.window_ms and not r.problem
    }
    rows = []
    for r in results:
        if r.problem or not r.window_ms:
            problem = r.problem or "no data"
            status = "n/a" if problem.startswith("n/a") else "failed"
            rows.append([r.model, r.method, status, "", "", "", problem])
            continue
        med = statistics.median(r.window_ms)
        q1, q3 = quartiles(r.window_ms)
        base = baselines.get(r.model)
        ratio = f"{med / base:.2f}x" if base else "-"
        if r.method == BASELINE:
            note = "reference"
        elif r.weight_diff is None:
            note = ""
        elif r.weight_diff == 0:
            note = "same weights"
        else:
            note = f"WEIGHTS DIFFER (max {r.weight_diff:.1e})"
        rows.append([
            r.model, r.method, f"{med:.2f}", ratio, f"{q1:.2f}-{q3:.2f}",
            f"{statistics.fmean(r.window_ms):.2f}", note,
        ])  # fmt: skip
    return rows


HEADERS = [
    "model", "method", "median ms/step", "vs unmonitored", "IQR ms/step", "mean ms/step", "note",
]  # fmt: skip


def markdown_table(rows: list[list[str]]) -> str:
    rows = [[c.replace("|", "\\|") for c in r] for r in rows]  # a "|" in an error would split a cell
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(HEADERS)]
    numeric = {2, 3, 4, 5}

    def line(cells: list[str]) -> str:
        padded = [c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(
        "-" * (w + 1) + ":" if i in numeric else "-" * (w + 2) for i, w in enumerate(widths)
    ) + "|"
    return "\n".join([line(HEADERS), rule, *(line(r) for r in rows)])


def print_rich_table(rows: list[list[str]]) -> None:
    """A nicer view for a human at a terminal; stdout keeps only the pasteable markdown."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        return
    table = Table(title="gradient-monitoring overhead")
    for i, h in enumerate(HEADERS):
        table.add_column(h, justify="right" if 2 <= i <= 5 else "left")
    for r in rows:
        table.add_row(*r)
    Console(stderr=True).print(table)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def package_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_lines(args: argparse.Namespace) -> list[str]:
    return [
        f"command: {shlex.join(sys.orig_argv)}",
        f"cpu: {cpu_model()} ({os.cpu_count()} logical cores), device: {args.device}",
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"torch threads {torch.get_num_threads()}, {platform.platform()}",
        f"lightning {package_version('lightning')}, wandb {package_version('wandb')}, "
        f"gradwatch {package_version('gradwatch')} (settings {GRADWATCH_SETTINGS})",
        f"warmup {args.warmup} steps, {args.repeats} repeats x {args.steps_per_repeat} steps "
        f"per method per model, seed {args.seed}",
    ]


def notes(args: argparse.Namespace, foreign: dict[str, float | None]) -> list[str]:
    out = [
        "median/IQR/mean are over repeats of (time of K consecutive steps)/K; ratio uses medians.",
        "'same weights': after the run, the method's weights are bitwise equal to the unmonitored "
        "copy's (monitoring must not alter training).",
        "wandb.watch hands its histograms to a wandb-core child process; work it does after a "
        "wandb window ends is charged to the next method in the rotation, not to wandb.",
    ]
    period = math.lcm(*GRADWATCH_SETTINGS.values())
    if args.steps_per_repeat % period:
        out.append(
            f"K={args.steps_per_repeat} is not a multiple of {period} (gradwatch sample/flush "
            "periods): windows hold unequal shares of gradwatch's periodic work; trust the mean "
            "more than the median for gradwatch."
        )
    busy = [m for m, v in foreign.items() if v is not None and v > FOREIGN_CPU_WARN]
    if busy:
        out.append(
            f"WARNING: other processes used more than {FOREIGN_CPU_WARN:.0%} of the CPU while "
            f"benchmarking {', '.join(busy)}; those rows are contaminated. Rerun on a quiet machine."
        )
    if args.quick:
        out.append("QUICK SMOKE RUN: too few steps for the numbers to mean anything.")
    return out


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def default_steps_per_repeat() -> int:
    return math.lcm(*GRADWATCH_SETTINGS.values())


def parse_list(text: str, allowed: dict[str, str], what: str) -> list[str]:
    chosen = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        if item not in allowed:
            raise argparse.ArgumentTypeError(f"unknown {what} {item!r}; choose from {sorted(allowed)}")
        if allowed[item] not in chosen:
            chosen.append(allowed[item])
    if not chosen:
        raise argparse.ArgumentTypeError(f"no {what} given")
    return chosen


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=DEFAULT_MODELS,
                   type=lambda s: parse_list(s, {m: m for m in MODELS}, "model"),
                   help="comma-separated subset of: %(default)s")
    p.add_argument("--methods", default=",".join(METHODS),
                   type=lambda s: parse_list(s, {**{m: m for m in METHODS}, **METHOD_ALIASES}, "method"),
                   help="comma-separated subset of the method names, or the aliases "
                        + ", ".join(sorted(METHOD_ALIASES)))
    p.add_argument("--repeats", type=int, default=None,
                   help="timed windows per method per model (default 5; 3 with --quick)")
    p.add_argument("--warmup", type=int, default=None,
                   help=f"untimed steps per method before timing (default {STEADY_WARMUP}: past gradwatch's "
                        "denser sampling of the first steps, so windows measure the steady state; 2 with --quick)")
    p.add_argument("--steps-per-repeat", type=int, default=None, metavar="K",
                   help=f"consecutive steps per timed window (default {default_steps_per_repeat()}, "
                        "one gradwatch flush period; 2 with --quick)")
    p.add_argument("--quick", action="store_true", help="smoke run: few steps, numbers meaningless")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--json", type=Path, default=None, help="also write raw window times here")
    args = p.parse_args(argv)

    quick = args.quick
    for name, full, smoke in [("repeats", 5, 3), ("warmup", STEADY_WARMUP, 2),
                              ("steps_per_repeat", default_steps_per_repeat(), 2)]:
        if getattr(args, name) is None:
            setattr(args, name, smoke if quick else full)
    if args.repeats < 1 or args.steps_per_repeat < 1 or args.warmup < 0:
        p.error("--repeats and --steps-per-repeat must be >= 1, --warmup >= 0")
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        p.error(f"--device: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda requested but torch.cuda.is_available() is False")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    results: list[Result] = []
    foreign: dict[str, float | None] = {}  # model -> CPU share used by other processes
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gradwatch-bench-") as tmp:
        workdir = Path(tmp)
        # Keep wandb's caches and settings out of the user's home directory.
        for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR",
                    "WANDB_ARTIFACT_DIR"):
            os.environ[var] = str(workdir / "wandb-home")
        for model in args.models:
            log(f"benchmarking {model}: {MODELS[model].describe}")
            meter = ForeignCpuMeter()
            results += bench_model(MODELS[model], args.methods, args, workdir, log)
            foreign[model] = meter.foreign_share()
    wall = time.perf_counter() - started

    rows = table_rows(results)
    if sys.stderr.isatty():
        print_rich_table(rows)
    print("\n".join(f"- {line}" for line in machine_lines(args)))
    print(f"- wall time: {wall:.0f} s")
    if all(v is not None for v in foreign.values()):
        shares = ", ".join(f"{m} {v:.0%}" for m, v in foreign.items())
        print(f"- CPU used by other processes while benchmarking (share of the machine): {shares}")
    print()
    print(markdown_table(rows))
    print()
    print("\n".join(f"- {n}" for n in notes(args, foreign)))

    if args.json:
        args.json.write_text(json.dumps({
            "command": sys.orig_argv,
            "machine": machine_lines(args),
            "foreign_cpu_share": foreign,
            "results": [r.__dict__ for r in results],
        }, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
