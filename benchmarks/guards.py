#!/usr/bin/env python
"""What does each guard cost per training step?

Same model, data and method of measurement as benchmarks/overhead.py's MLP (24 x Linear(512, 512)
+ ReLU, batch 256, Adam): every method trains its own copy of one seeded model; methods take turns
in windows of K steps (round-robin, rotating the start); the figure is the median over repeats of
window time / K. Ratios are against the unmonitored step of the same optimizer, and against
gradwatch without guards (what the guard itself adds). torch's own clip_grad_norm_ in the loop is
measured beside them.

    .venv/bin/python benchmarks/guards.py            # a few minutes on 2 CPU cores
    .venv/bin/python benchmarks/guards.py --quick    # smoke run, seconds; numbers meaningless
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import gradwatch as gw  # noqa: E402
from gradwatch import guards as G  # noqa: E402


def build_mlp(depth: int, width: int) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


#: name -> (fused Adam?, guards or None for no watch, clip in the loop?)
METHODS: dict[str, tuple[bool, Callable[[], list] | None, bool]] = {
    "unmonitored": (False, None, False),
    "clip_grad_norm_ (torch, no watch)": (False, None, True),
    "gradwatch, no guards": (False, lambda: [], False),
    "ClipNorm(1.0)": (False, lambda: [G.ClipNorm(1.0)], False),
    "ClipValue(1.0)": (False, lambda: [G.ClipValue(1.0)], False),
    "ClipNormPerLayer(1.0)": (False, lambda: [G.ClipNormPerLayer(1.0)], False),
    "AGC(0.01)": (False, lambda: [G.AGC(0.01)], False),
    "ZClip()": (False, lambda: [G.ZClip()], False),
    "AutoClip(10)": (False, lambda: [G.AutoClip(10)], False),
    "SkipNonFinite() [copy + where]": (False, lambda: [G.SkipNonFinite()], False),
    "Rollback(every=100)": (False, lambda: [G.Rollback(every=100)], False),
    "unmonitored, fused Adam": (True, None, False),
    "gradwatch, fused Adam": (True, lambda: [], False),
    "SkipNonFinite() [fused found_inf]": (True, lambda: [G.SkipNonFinite()], False),
}


class Method:
    def __init__(self, name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, workdir: Path):
        fused, guards, clip = METHODS[name]
        self.model = model
        self.opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=fused)
        self.x, self.y, self.clip = x, y, clip
        self.w = None
        if guards is not None:
            out = workdir / name.split(" ")[0].replace("(", "").replace(")", "").replace(",", "")
            self.w = gw.watch(model, self.opt, out=out, overwrite=True, quiet=True, report=False,
                              diagnose_online=False, guards=guards())

    def steps(self, n: int) -> None:
        for _ in range(n):
            loss = nn.functional.cross_entropy(self.model(self.x), self.y)
            self.opt.zero_grad()
            loss.backward()
            if self.clip:
                nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            if self.w is not None:
                self.w.log(loss)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, few steps: checks that it runs")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=50, help="steps per timed window")
    ns = ap.parse_args(argv)
    depth, width, batch, warmup = (24, 512, 256, 100) if not ns.quick else (2, 32, 16, 5)
    repeats, k = (ns.repeats, ns.steps) if not ns.quick else (2, 5)
    torch.manual_seed(0)
    base = build_mlp(depth, width)
    x, y = torch.randn(batch, width), torch.randint(0, 10, (batch,))
    names = list(METHODS)
    with tempfile.TemporaryDirectory() as tmp:
        methods = {n: Method(n, copy.deepcopy(base), x, y, Path(tmp)) for n in names}
        for m in methods.values():
            m.steps(warmup)
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(repeats):
            order = names[r % len(names):] + names[: r % len(names)]
            for n in order:
                t0 = time.perf_counter()
                methods[n].steps(k)
                times[n].append((time.perf_counter() - t0) / k * 1e3)
        for m in methods.values():
            if m.w is not None:
                m.w.close()
    med = {n: statistics.median(v) for n, v in times.items()}
    print(f"guard cost per step: MLP {depth}x{width}, batch {batch}, Adam; {repeats} windows of {k} steps after "
          f"{warmup} warm-up; torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads")
    print()
    print("| method | ms/step | vs unmonitored | vs gradwatch without guards |")
    print("|---|---:|---:|---:|")
    for n in names:
        fused = METHODS[n][0]
        plain = med["unmonitored, fused Adam" if fused else "unmonitored"]
        watched = med["gradwatch, fused Adam" if fused else "gradwatch, no guards"]
        guarded = METHODS[n][1] is not None
        vs_watch = f"{med[n] / watched:.2f}x" if guarded else ""
        print(f"| {n} | {med[n]:.2f} | {med[n] / plain:.2f}x | {vs_watch} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
