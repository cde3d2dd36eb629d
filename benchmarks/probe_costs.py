#!/usr/bin/env python
"""Where gradwatch's time goes: the cost of each probe entry point inside a real training loop.

Times, on the 24x512 ReLU MLP of overhead.py (batch 256, Adam), every call of

  on_before_optimizer_step   split into ordinary steps and sampled steps (flushes excluded)
  on_after_optimizer_step    the ‖Δw‖ of sampled steps
  flush                      one device->host copy, the float64 derivations, the Arrow append

and prints a table of medians next to the plain training step, so a change to the probe can be
judged by the part it touches. Run from the repository root:

    .venv/bin/python benchmarks/probe_costs.py [--steps 300] [--batch 256]
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

try:
    import gradwatch as gw
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
    import gradwatch as gw


def mlp() -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(24):
        layers += [nn.Linear(512, 512), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(512, 10))


def timed(log: list[tuple[int, float]], fn, probe, offset: int = 0):  # type: ignore[no-untyped-def]
    """Wrap a probe method; log (the step it worked for, seconds)."""

    def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
        step = probe.step + offset
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        log.append((step, time.perf_counter() - start))
        return result

    return wrapper


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="timed steps (after 2*sample_every warm-up steps)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--sample-every", type=int, default=50)
    args = p.parse_args(argv)

    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(args.batch, 512), torch.randint(0, 10, (args.batch,))
    w = gw.watch(model, opt, out=Path(tempfile.mkdtemp()) / "run", sample_every=args.sample_every, quiet=True)
    probe = w.stream(opt).probe

    def step() -> None:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        w.log(loss=loss)

    for _ in range(2 * args.sample_every):  # past the denser sampling of the first steps
        step()
    before: list[tuple[int, float]] = []
    after: list[tuple[int, float]] = []
    flushes: list[tuple[int, float]] = []
    probe.flush = timed(flushes, probe.flush, probe)
    probe.on_before_optimizer_step = timed(before, probe.on_before_optimizer_step, probe)
    probe.on_after_optimizer_step = timed(after, probe.on_after_optimizer_step, probe, offset=-1)
    steps: list[float] = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        steps.append(time.perf_counter() - start)
    w.close()

    sampled = probe.config.is_sampled
    nested = dict(flushes)  # a flush runs inside the before-step hook of the step it happens at
    before = [(s, t - nested.get(s, 0.0)) for s, t in before]
    rows = [
        ("training step, gradwatch attached", [t for t in steps]),
        ("before step, ordinary", [t for s, t in before if not sampled(s)]),
        ("before step, sampled", [t for s, t in before if sampled(s)]),
        ("after step, sampled (update norm)", [t for s, t in after if sampled(s)]),
        ("flush (one copy, derive, append; inside a before step)", [t for _, t in flushes]),
    ]
    step_ms = statistics.median(steps) * 1e3
    print(f"command: {' '.join(sys.argv)}")
    print(f"model: 24x Linear(512,512)+ReLU, batch {args.batch}, Adam; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; sample_every {args.sample_every}, flush_every {probe.config.flush_every}")
    print()
    print("| part | calls | median ms | per step, amortised ms | share of a step |")
    print("|---|---:|---:|---:|---:|")
    for name, times in rows:
        if not times:
            continue
        med = statistics.median(times) * 1e3
        amortised = sum(times) * 1e3 / len(steps) if not name.startswith("training") else med
        share = "" if name.startswith("training") else f"{amortised / step_ms:.1%}"
        print(f"| {name} | {len(times)} | {med:.2f} | {amortised:.2f} | {share} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
