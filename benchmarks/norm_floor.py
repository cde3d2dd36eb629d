#!/usr/bin/env python
"""The floor under every-step monitoring: what reading each gradient's L2 norm alone costs a step.

gradwatch's ordinary step is one ``_foreach_norm`` over every gradient (the per-layer norms every
step records; everything else derives from them). This times, on the 24x512 ReLU MLP with SGD and
batch 64 (the worst case of benchmarks/overhead.py's ``mlp-sgd64``), copies of one model that differ
only in how those norms are read, alternating single steps (order reversed every other round):

  plain              the training step alone
  foreach_norm       torch._foreach_norm of all gradients before optimizer.step() (gradwatch today)
  hot (post-acc)     each gradient's norm in a post-accumulate-grad hook, while backward has just
                     written it (still in cache), stacked before optimizer.step()
  dot                torch.dot(g, g) per gradient before optimizer.step(), then one sqrt

No gradwatch code runs here: it is the cost of the reduction itself, the part no bookkeeping can
remove. Each variant's norms are checked against a float64 recomputation.

    .venv/bin/python benchmarks/norm_floor.py               # ~1 min on 2 CPU cores
    .venv/bin/python benchmarks/norm_floor.py --rounds 20   # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn


def mlp() -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(24):
        layers += [nn.Linear(512, 512), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(512, 10))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=500)
    ap.add_argument("--batch", type=int, default=64)
    ns = ap.parse_args()
    torch.manual_seed(0)
    names = ["plain", "foreach_norm", "hot (post-acc)", "dot"]
    base = mlp()
    models = {k: mlp() for k in names}
    for m in models.values():
        m.load_state_dict(base.state_dict())
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.01) for k, m in models.items()}
    x, y = torch.randn(ns.batch, 512), torch.randint(0, 10, (ns.batch,))
    hot: dict[int, torch.Tensor] = {}
    for p in models["hot (post-acc)"].parameters():
        p.register_post_accumulate_grad_hook(lambda p: hot.__setitem__(id(p), torch.linalg.vector_norm(p.grad)))
    norms: dict[str, torch.Tensor] = {}

    def step(k: str) -> None:
        m, o = models[k], opts[k]
        o.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        grads = [p.grad for p in m.parameters()]
        if k == "foreach_norm":
            norms[k] = torch.stack(torch._foreach_norm(grads))
        elif k == "hot (post-acc)":
            norms[k] = torch.stack([hot[id(p)] for p in m.parameters()])
        elif k == "dot":
            norms[k] = torch.stack([torch.dot(g.view(-1), g.view(-1)) for g in grads]).sqrt()
        if k != "plain" and not hasattr(step, "checked_" + k.split()[0]):
            ref = torch.stack([torch.linalg.vector_norm(g.double()) for g in grads])
            setattr(step, "checked_" + k.split()[0], float(((norms[k].double() - ref).abs() / ref).max()))
        o.step()

    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(30 + ns.rounds):
        for k in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            step(k)
            if r >= 30:
                times[k].append(time.perf_counter() - t0)
    base_ms = statistics.median(times["plain"]) * 1e3
    print(f"24x512 ReLU MLP, SGD, batch {ns.batch}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{ns.rounds} alternating rounds")
    print()
    print("| variant | median ms/step | vs plain | mean ms/step | max rel. error vs float64 |")
    print("|---|---:|---:|---:|---:|")
    for k in names:
        med = statistics.median(times[k]) * 1e3
        err = getattr(step, "checked_" + k.split()[0], None)
        print(f"| {k} | {med:.2f} | {med / base_ms:.3f}x | {statistics.mean(times[k]) * 1e3:.2f} | "
              f"{'' if err is None else f'{err:.1e}'} |")


if __name__ == "__main__":
    main()
