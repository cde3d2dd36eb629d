#!/usr/bin/env python
"""Forensics on a CUDA device: host syncs per healthy step, and what a GPU run learns of a bad step.

On a GPU forensics learns of a non-finite step one step late (a pinned flag and an event it polls
without waiting), after the update. This checks, on the 24x512 ReLU MLP of benchmarks/overhead.py
(batch 64, SGD):

1. the synchronising CUDA calls each step makes (``torch.cuda.set_sync_debug_mode("warn")``, counted
   per step between flushes), with forensics off and on, and the final weights of both runs against
   an unmonitored copy, bit for bit;
2. a NaN put into sample 13 of step 30's batch, with SkipNonFinite (the weights are kept: the step is
   replayed) and without a guard (the update happened: only the batch is checked);
3. ms per step, forensics off and on, interleaved windows (a rough figure; see benchmarks/forensics.py).

    python benchmarks/forensics_cuda_check.py      # needs a CUDA device; ~1 min
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import gradwatch as gw  # noqa: E402
from gradwatch.guards import SkipNonFinite  # noqa: E402


def mlp() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(24):
        layers += [nn.Linear(512, 512), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(512, 10)).cuda()


def batches(n: int, bad: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator(device="cuda").manual_seed(1)
    out = [(torch.randn(64, 512, device="cuda", generator=g), torch.randint(0, 10, (64,), device="cuda", generator=g))
           for _ in range(n)]
    if bad is not None:
        out[bad][0][13, 7] = float("nan")
    return out


def train(model: nn.Module, opt: torch.optim.Optimizer, data: list, w: object | None, syncs: list[int] | None) -> None:
    for i, (x, y) in enumerate(data):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if syncs is not None:
                torch.cuda.set_sync_debug_mode("warn")
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if w is not None:
                w.log(loss=loss)
            torch.cuda.set_sync_debug_mode("default")
        if syncs is not None:
            syncs.append(sum("synchroniz" in str(c.message) for c in caught))


def timed(fn, clock: list[float]):  # type: ignore[no-untyped-def]
    def call(*a, **k):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            clock[0] += time.perf_counter() - t0
    return call


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 1
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    tmp = Path(tempfile.mkdtemp())
    data = batches(120)
    ref = mlp()
    train(ref, torch.optim.SGD(ref.parameters(), lr=0.01), data, None, None)
    for on in (False, True):
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        syncs: list[int] = []
        with gw.watch(model, opt, out=tmp / f"h{on}", quiet=True, report=False, forensics=on) as w:
            train(model, opt, data, w, syncs)
        same = all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), model.state_dict().values()))
        busy = {i: n for i, n in enumerate(syncs) if n}
        print(f"forensics {'on ' if on else 'off'}: steps with syncing CUDA calls (step: calls) {busy}, of {len(syncs)}; "
              f"weights bit-identical: {same}")
        if on:
            w2 = gw.watch(model, opt, out=tmp / "direct", quiet=True, report=False)
            f = w2.stream(opt).forensics
            clock = {n: [0.0] for n in ("_pre", "_post", "at_step")}
            for name in clock:
                orig = getattr(f, name)
                setattr(f, name, timed(orig, clock[name]))
            for h in f._handles:
                h.remove()
            f._handles = [model.register_forward_pre_hook(f._pre, with_kwargs=True), model.register_forward_hook(f._post)]
            train(model, opt, data[:100], w2, None)
            w2.close()
            print("forensics' own calls, µs per step: " + ", ".join(f"{n} {c[0] / 100 * 1e6:.0f}" for n, c in clock.items()))
    for guard in (True, False):
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        out = tmp / f"bad{guard}"
        with gw.watch(model, opt, out=out, quiet=True, report=False, guards=[SkipNonFinite()] if guard else None) as w:
            train(model, opt, batches(60, bad=30), w, None)
        e = next(f for f in gw.load_run(out).findings if f.kind == "nonfinite").evidence
        print(f"NaN in sample 13 of step 30, {'SkipNonFinite' if guard else 'no guard    '}: module={e.get('module')!r} "
              f"samples={e.get('samples')} replayed={e.get('replayed')} note={e.get('replay_note')!r}")
    times: dict[bool, list[float]] = {False: [], True: []}
    runs = {}
    for on in (False, True):
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        runs[on] = (model, opt, gw.watch(model, opt, out=tmp / f"t{on}", quiet=True, report=False, forensics=on))
    for r in range(12):
        for on in ((False, True) if r % 2 == 0 else (True, False)):
            model, opt, w = runs[on]
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            train(model, opt, data[:50], w, None)
            torch.cuda.synchronize()
            if r >= 2:
                times[on].append((time.perf_counter() - t0) / 50 * 1e3)
    for on in (False, True):
        runs[on][2].close()
    off, on_ = statistics.median(times[False]), statistics.median(times[True])
    print(f"ms/step (median of 10 windows of 50): forensics off {off:.3f}, on {on_:.3f}, ratio {on_ / off:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
