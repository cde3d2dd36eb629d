#!/usr/bin/env python
"""What does forensics cost a healthy step, and what does detect_anomaly cost?

On benchmarks/overhead.py's models, batches and step (Adam, cross-entropy), one process, interleaved:

  unmonitored                 zero_grad, forward, loss, backward, step
  gradwatch, forensics off    the same inside gradwatch.watch(..., forensics=False)
  gradwatch, forensics on     the same inside gradwatch.watch(...) (forensics armed, the default)
  detect_anomaly always on    the unmonitored step inside torch.autograd.detect_anomaly()

Method as in overhead.py: every method trains its own copy of one seeded model; methods take turns
in windows of K steps (round-robin, rotating the start); the figure is the median over repeats of
window time / K. Step-time ratios on this shared 2-core CPU move by a few percent from run to run,
more than forensics costs, so its own work is also timed directly: its hooks and its step call,
wrapped in a clock, on a copy of its own for --direct steps ("forensics' work"). Then one
non-finite step is injected into a fresh copy and the one-time cost of its replay is timed. After
the run every method's weights are compared bit for bit with the unmonitored copy.

    .venv/bin/python benchmarks/forensics.py            # a few minutes on 2 CPU cores
    .venv/bin/python benchmarks/forensics.py --quick    # smoke run, seconds; numbers meaningless
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import gradwatch as gw  # noqa: E402
from gradwatch import forensics as fx  # noqa: E402
from overhead import DEFAULT_MODELS, MODELS, Trainee, make_trainees, train_step  # noqa: E402

METHODS = ["unmonitored", "gradwatch, forensics off", "gradwatch, forensics on", "detect_anomaly always on"]


class Method:
    def __init__(self, name: str, t: Trainee, workdir: Path):
        self.name, self.t, self.w = name, t, None
        if name.startswith("gradwatch"):
            self.w = gw.watch(t.model, t.optimizer, out=workdir / name.split()[-1], overwrite=True, quiet=True,
                              report=False, diagnose_online=False, forensics=name.endswith("on"))
        self.anomaly = name.startswith("detect_anomaly")

    def steps(self, n: int) -> None:
        ctx = torch.autograd.detect_anomaly() if self.anomaly else contextlib.nullcontext()
        with ctx:
            for _ in range(n):
                loss = train_step(self.t)
                if self.w is not None:
                    self.w.log(loss=loss)

    def close(self) -> None:
        if self.w is not None:
            self.w.close()


def timed(owner: Any, name: str, clock: list[float]) -> None:
    """Wrap ``owner.name`` so that its time adds to ``clock[0]``."""
    original = getattr(owner, name)

    def call(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return original(*a, **k)
        finally:
            clock[0] += time.perf_counter() - t0

    setattr(owner, name, call)


def forensics_work(t: Trainee, steps: int, workdir: Path) -> float:
    """Microseconds per step spent in forensics' own code (hooks, gradient hook, step call)."""
    clock = [0.0]
    with gw.watch(t.model, t.optimizer, out=workdir / "direct", overwrite=True, quiet=True, report=False,
                  diagnose_online=False) as w:
        f = w.stream(t.optimizer).forensics
        assert f is not None, "forensics is not armed"
        for name in ("_pre", "_post", "at_step"):
            timed(f, name, clock)
        f._handles[0].remove()  # the hooks were registered before the wrapping: register the wrapped ones
        f._handles[1].remove()
        target = fx.capture_target(None, f.model)
        f._handles = [target.register_forward_pre_hook(f._pre, with_kwargs=True), target.register_forward_hook(f._post)]
        keep = fx.Capture.keep_grad
        fx.Capture.keep_grad = lambda self, *a: _clocked(clock, keep, self, *a)  # type: ignore[method-assign]
        try:
            for _ in range(steps):
                w.log(loss=train_step(t))
        finally:
            fx.Capture.keep_grad = keep  # type: ignore[method-assign]
    return clock[0] / steps * 1e6


def _clocked(clock: list[float], fn: Callable, *a: Any) -> Any:
    t0 = time.perf_counter()
    try:
        return fn(*a)
    finally:
        clock[0] += time.perf_counter() - t0


def replay_cost(t: Trainee, workdir: Path) -> tuple[float, float, str]:
    """(ms of the step that is replayed, ms of a plain watched step before it, the module named)."""
    with gw.watch(t.model, t.optimizer, out=workdir / "replay", overwrite=True, quiet=True, report=False,
                  diagnose_online=False) as w:
        times = []
        for i in range(6):
            if i == 5:
                t.inputs = t.inputs.clone()
                if t.inputs.is_floating_point():
                    t.inputs.view(-1)[0] = float("nan")
                else:  # token ids: a NaN in the embedding's row of the first token instead
                    emb = next(m for m in t.model.modules() if isinstance(m, torch.nn.Embedding))
                    with torch.no_grad():
                        emb.weight[t.inputs.view(-1)[0]] = float("nan")
            t0 = time.perf_counter()
            w.log(loss=train_step(t))
            times.append(time.perf_counter() - t0)
        result = w.stream(t.optimizer).forensics.result or {}
    return times[-1] * 1e3, statistics.median(times[1:-1]) * 1e3, str(result.get("module"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few steps: checks that it runs")
    ap.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated: " + ", ".join(MODELS))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=50, help="steps per timed window")
    ap.add_argument("--direct", type=int, default=200, help="steps for the direct timing of forensics' work")
    ns = ap.parse_args(argv)
    repeats, k, warmup, direct = (ns.repeats, ns.steps, 100, ns.direct) if not ns.quick else (2, 3, 2, 5)
    warnings.filterwarnings("ignore", message="Anomaly Detection has been enabled")
    device = torch.device("cpu")
    print(f"forensics cost per step: benchmarks/overhead.py's models, Adam; {repeats} windows of {k} steps after "
          f"{warmup} warm-up, interleaved; torch {torch.__version__}, {platform.machine()}, "
          f"{torch.get_num_threads()} threads")
    print()
    print("| model | method | ms/step | vs unmonitored | vs forensics off | same weights |")
    print("|---|---|---:|---:|---:|---|")
    extra = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in ns.models.split(","):
            spec = MODELS[name]
            trainees = make_trainees(spec, len(METHODS) + 2, 0, device)
            methods = {m: Method(m, t, Path(tmp) / name) for m, t in zip(METHODS, trainees)}
            for m in methods.values():
                m.steps(warmup)
            times: dict[str, list[float]] = {m: [] for m in METHODS}
            for r in range(repeats):
                for m in METHODS[r % len(METHODS):] + METHODS[: r % len(METHODS)]:
                    t0 = time.perf_counter()
                    methods[m].steps(k)
                    times[m].append((time.perf_counter() - t0) / k * 1e3)
            for m in methods.values():
                m.close()
            med = {m: statistics.median(v) for m, v in times.items()}
            ref = methods["unmonitored"].t.model.state_dict()
            for m in METHODS:
                same = all(torch.equal(a, methods[m].t.model.state_dict()[key]) for key, a in ref.items())
                vs_off = f"{med[m] / med['gradwatch, forensics off']:.3f}x" if m.startswith("gradwatch") else ""
                print(f"| {name} | {m} | {med[m]:.2f} | {med[m] / med['unmonitored']:.3f}x | {vs_off} | "
                      f"{'yes' if same else 'NO'} |")
            us = forensics_work(trainees[-2], direct, Path(tmp) / name)
            replay_ms, plain_ms, module = replay_cost(copy.deepcopy(trainees[-1]), Path(tmp) / name)
            extra.append((name, us, us / 1e3 / med["unmonitored"], replay_ms, plain_ms, module))
    print()
    print("| model | forensics' work per healthy step | share of an unmonitored step | the replayed step (once) | "
          "a watched step | module named |")
    print("|---|---:|---:|---:|---:|---|")
    for name, us, share, replay_ms, plain_ms, module in extra:
        print(f"| {name} | {us:.1f} µs | {share * 100:.3f}% | {replay_ms:.1f} ms | {plain_ms:.1f} ms | {module} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
