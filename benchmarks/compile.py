#!/usr/bin/env python
"""What does gradwatch cost on a torch.compile'd model?

One MLP (DEPTH x Linear(WIDTH, WIDTH) + Tanh, batch BATCH, Adam) compiled with inductor, trained
three ways, each on its own seeded copy and its own compiled module:

  compiled             no gradwatch
  gradwatch            gradwatch.watch(compiled, ...): its activation hooks are traced into the graph
                       and stay there (the sticky tap), so they run at every step
  gradwatch, no tap    the same, with the activation tap turned off before the first forward

Blocks of K steps of each take turns (after a warm-up that includes compiling); the figure is the
median over repeats of the block time / K. The compiled-frame count of each is printed too.

    .venv/bin/python benchmarks/compile.py            # about a minute on 2 CPU cores (compiles included)
    .venv/bin/python benchmarks/compile.py --quick    # smoke run; numbers meaningless
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import gradwatch as gw  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps: checks that it runs")
    ns = parser.parse_args()
    depth, width, batch, k, repeats = (2, 32, 16, 5, 2) if ns.quick else (12, 512, 256, 50, 5)
    from torch._dynamo.testing import CompileCounterWithBackend

    x = torch.randn(batch, width, generator=torch.Generator().manual_seed(1))
    y = torch.randn(batch, 1, generator=torch.Generator().manual_seed(2))
    arms = {}
    with tempfile.TemporaryDirectory() as d:
        for name in ("compiled", "gradwatch", "gradwatch, no tap"):
            torch.manual_seed(0)
            layers: list[nn.Module] = []
            for _ in range(depth):
                layers += [nn.Linear(width, width), nn.Tanh()]
            model = nn.Sequential(*layers, nn.Linear(width, 1))
            counter = CompileCounterWithBackend("inductor")
            compiled = torch.compile(model, backend=counter)
            opt = torch.optim.Adam(model.parameters(), lr=1e-4)
            w = None
            if name != "compiled":
                w = gw.watch(compiled, opt, out=Path(d) / name.replace(", ", "-").replace(" ", "-"), quiet=True, report=False)
                if name.endswith("no tap"):
                    w.stream(opt).probe.turn_off_activations("benchmark arm without activation hooks")
            arms[name] = (model, compiled, opt, w, counter)

        def block(name: str, steps: int) -> float:
            model, compiled, opt, w, _ = arms[name]
            t0 = time.perf_counter()
            for _ in range(steps):
                opt.zero_grad()
                loss = nn.functional.mse_loss(compiled(x), y)
                loss.backward()
                opt.step()
                if w is not None:
                    w.log(loss=loss)
            return (time.perf_counter() - t0) / steps

        for name in arms:
            block(name, k)  # warm-up: compiles
        times: dict[str, list[float]] = {name: [] for name in arms}
        names = list(arms)
        for r in range(repeats):
            for name in names[r % len(names):] + names[: r % len(names)]:
                times[name].append(block(name, k))
        for _, _, _, w, _ in arms.values():
            if w is not None:
                w.close()
    base = statistics.median(times["compiled"])
    print(f"torch.compile (inductor), MLP {depth}x{width} + Tanh, batch {batch}, Adam, CPU threads {torch.get_num_threads()}; "
          f"{repeats} interleaved blocks of {k} steps")
    print(f"{'arm':<20} {'ms/step':>8} {'ratio':>6} {'compiled frames':>16}")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"{name:<20} {1e3 * m:>8.2f} {m / base:>6.2f} {arms[name][4].frame_count:>16}")


if __name__ == "__main__":
    main()
