#!/usr/bin/env python
"""What does gradwatch cost under data parallelism: per step, and per flush (its one all_reduce)?

Two gloo processes on this machine's CPU (one thread each) train one MLP (DEPTH x Linear(WIDTH,
WIDTH) + ReLU, Adam, each rank BATCH rows of every step), four ways, each with and without
gradwatch:

  ddp            DistributedDataParallel
  ddp+clip       the same with guards=[ClipNorm(1.0)]: one extra all_reduce of the per-layer norms per step
  fsdp2          fully_shard on every Linear and the root (DTensor gradients: statistics of the shards)
  fsdp2+clip     the same with ClipNorm(1.0)

Per row: median step time without and with gradwatch (over REPEATS interleaved timed blocks), the
time of the flush's all_reduce (the window summed over the ranks, float64, one call), its size in
bytes, and the number of all_reduce calls gradwatch made per step.

    .venv/bin/python benchmarks/distributed.py            # about a minute on 2 CPU cores
    .venv/bin/python benchmarks/distributed.py --quick    # smoke run; numbers meaningless
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import gradwatch as gw  # noqa: E402

CASES = ("ddp", "ddp+clip", "fsdp2", "fsdp2+clip")


def sizes(quick: bool) -> dict[str, int]:
    if quick:
        return {"depth": 2, "width": 32, "batch": 16, "steps": 20, "warmup": 5, "repeats": 1, "flush": 10}
    return {"depth": 8, "width": 256, "batch": 64, "steps": 200, "warmup": 20, "repeats": 3, "flush": 50}


def build(case: str, s: dict[str, int]) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(s["depth"]):
        layers += [nn.Linear(s["width"], s["width"]), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(s["width"], 10))
    if case.startswith("fsdp2"):
        from torch.distributed.fsdp import fully_shard

        for m in model:
            if isinstance(m, nn.Linear):
                fully_shard(m)
        return fully_shard(model)
    return nn.parallel.DistributedDataParallel(model)


def timed_steps(case: str, s: dict[str, int], watched: bool, tmp: Path) -> tuple[float, dict[str, float]]:
    model = build(case, s)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(dist.get_rank())
    x = torch.randn(s["batch"], s["width"], generator=gen)
    y = torch.randint(0, 10, (s["batch"],), generator=gen)
    w = None
    flush_times: list[float] = []
    if watched:
        guards = [gw.guards.ClipNorm(1.0)] if case.endswith("+clip") else None
        w = gw.watch(model, opt, out=tmp / f"{case}-{time.monotonic_ns()}", quiet=True, report=False,
                     flush_every=s["flush"], guards=guards)
    step_times = []
    try:
        for i in range(s["warmup"] + s["steps"]):
            dist.barrier()
            t0 = time.perf_counter()
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            if w is not None:
                w.log(loss=loss)
            step_times.append(time.perf_counter() - t0)
            if i == 0 and w is not None:
                reducer = w.stream(opt).probe.reducer
                original = reducer.reduce_window

                def timed(*a, _original=original, **k):  # type: ignore[no-untyped-def]
                    t = time.perf_counter()
                    out = _original(*a, **k)
                    flush_times.append(time.perf_counter() - t)
                    return out

                reducer.reduce_window = timed
        extra: dict[str, float] = {}
        if w is not None:
            reducer = w.stream(opt).probe.reducer
            steps_seen = s["warmup"] + s["steps"]
            extra = {"flush_ms": 1e3 * statistics.median(flush_times) if flush_times else float("nan"),
                     "bytes": float(reducer.last_bytes),
                     "per_step_collectives": (reducer.collectives - len(flush_times)) / steps_seen}
    finally:
        if w is not None:
            w.close()
    return statistics.median(step_times[s["warmup"]:]), extra


def worker(rank: int, world: int, port: int, quick: bool, result: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    s = sizes(quick)
    rows = {}
    with tempfile.TemporaryDirectory() as d:
        for case in CASES:
            plain, watched, extras = [], [], {}
            for _ in range(s["repeats"]):  # interleaved, so drift hits both columns alike
                plain.append(timed_steps(case, s, False, Path(d))[0])
                t, extras = timed_steps(case, s, True, Path(d))
                watched.append(t)
            rows[case] = {"plain_ms": 1e3 * statistics.median(plain), "watched_ms": 1e3 * statistics.median(watched), **extras}
    if rank == 0:
        Path(result).write_text(json.dumps(rows))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps: checks that it runs")
    ns = parser.parse_args()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    s = sizes(ns.quick)
    with tempfile.TemporaryDirectory() as d:
        result = Path(d) / "rows.json"
        mp.start_processes(worker, args=(2, port, ns.quick, str(result)), nprocs=2, start_method="spawn")
        rows = json.loads(result.read_text())
    print(f"2 gloo ranks x 1 CPU thread; MLP {s['depth']}x{s['width']}, batch {s['batch']} per rank, Adam; "
          f"{s['steps']} timed steps, flush_every {s['flush']}, median of {s['repeats']}")
    print(f"{'case':<12} {'plain ms/step':>14} {'gradwatch ms/step':>18} {'ratio':>6} {'flush all_reduce ms':>20} "
          f"{'bytes/flush':>12} {'all_reduce/step':>16}")
    for case, r in rows.items():
        print(f"{case:<12} {r['plain_ms']:>14.2f} {r['watched_ms']:>18.2f} {r['watched_ms'] / r['plain_ms']:>6.2f} "
              f"{r['flush_ms']:>20.2f} {int(r['bytes']):>12,} {r['per_step_collectives']:>16.2f}")


if __name__ == "__main__":
    main()
