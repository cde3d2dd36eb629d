"""Data-parallel training cases for tests/test_distributed.py, run in spawned gloo processes.

The models whose numbers are compared with one process's are float64: the gradients themselves then
agree to ~1e-12, so a 1e-5 comparison tests gradwatch, not training's rounding (in float32 the
cancelling output-bias gradient of a DDP half-batch average differs from the whole batch's by up to
4e-4 relative, and the trajectories drift apart from there).

Every case trains the same model on the same batches as a single-process reference: each step
takes one global batch and rank r trains on its r-th slice, so DDP's (and FSDP2's) averaged gradient
is the gradient of the whole batch's mean loss. Results go to JSON/pt files in ``results`` (the
parent compares them); rank 1 gets its own ``out`` path so the test can see that it wrote nothing.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from scenarios import circles, deep_sigmoid_mlp  # noqa: E402

STEPS = 60
BATCH = 64
FLUSH = 10
SAMPLE = 5


def batches(x: torch.Tensor, steps: int = STEPS) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randperm(len(x), generator=gen)[:BATCH] for _ in range(steps)]


def train(model: nn.Module, opt: torch.optim.Optimizer, w, rank: int, world: int, steps: int = STEPS,
          inject=None) -> None:  # type: ignore[no-untyped-def]
    """``world`` slices of each global batch; rank ``rank`` takes its own (world 1: the whole batch)."""
    x, y = circles()
    dtype = next(model.parameters()).dtype
    x, y = x.to(dtype), y.to(dtype)
    loss_fn = nn.BCEWithLogitsLoss()
    for idx in batches(x, steps):
        part = idx.chunk(world)[rank]
        opt.zero_grad()
        loss = loss_fn(model(x[part]), y[part])
        loss.backward()
        if inject is not None:
            inject()
        opt.step()
        if w is not None:
            w.log(loss=loss)


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        t = p.detach()
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        out[name] = t.clone()
    return out


def worker(rank: int, world: int, port: int, case: str, tmp: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        CASES[case](rank, world, Path(tmp))
        dist.barrier()  # both ranks tear down together (gloo aborts a rank whose peer left mid-exchange)
    finally:
        dist.destroy_process_group()
    # The case is done and its files are written: leave without the interpreter's teardown, where a
    # still-joinable C++ thread of the gloo backend can abort the process ("terminate called without
    # an active exception", seen once in CI on a loaded machine). A case that raised never gets here.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _watch(model, opt, out: Path, **kw):  # type: ignore[no-untyped-def]
    import gradwatch as gw

    return gw.watch(model, opt, out=out, quiet=True, report=False, flush_every=FLUSH, sample_every=SAMPLE, **kw)


def _out(tmp: Path, rank: int) -> Path:
    return tmp / ("run" if rank == 0 else f"run-rank{rank}")


def _save(tmp: Path, rank: int, name: str, obj) -> None:  # type: ignore[no-untyped-def]
    path = tmp / f"{name}-{rank}.json"
    path.write_text(json.dumps(obj))


def case_ddp(rank: int, world: int, tmp: Path) -> None:
    model = deep_sigmoid_mlp().double()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    with _watch(ddp, opt, _out(tmp, rank)) as w:
        train(ddp, opt, w, rank, world)
        probe = w.stream(opt).probe
    _save(tmp, rank, "info", {"collectives": probe.reducer.collectives, "writes": w.writes,
                              "steps": w.steps})
    if rank == 0:
        torch.save(full_state(model), tmp / "weights.pt")


def case_ddp_accum(rank: int, world: int, tmp: Path) -> None:
    """DDP with gradient accumulation: 2 micro-batches per rank, no_sync() on the first, so the
    all-reduce happens once per optimizer step; statistics are of the accumulated gradient."""
    model = deep_sigmoid_mlp().double()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    x, y = circles()
    x, y = x.double(), y.double()
    loss_fn = nn.BCEWithLogitsLoss()
    with _watch(ddp, opt, _out(tmp, rank)) as w:
        for idx in batches(x):
            micro = idx.chunk(world)[rank].chunk(2)
            opt.zero_grad()
            total = 0.0
            with ddp.no_sync():
                loss = loss_fn(ddp(x[micro[0]]), y[micro[0]]) / 2
                loss.backward()
                total = total + loss.detach()
            loss = loss_fn(ddp(x[micro[1]]), y[micro[1]]) / 2
            loss.backward()
            opt.step()
            w.log(loss=total + loss.detach())
    _save(tmp, rank, "info", {"writes": w.writes, "steps": w.steps})
    if rank == 0:
        torch.save(full_state(model), tmp / "weights.pt")


def _fsdp_model(dtype: torch.dtype = torch.float64) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = deep_sigmoid_mlp().to(dtype)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            fully_shard(m)
    fully_shard(model)
    return model


def case_fsdp(rank: int, world: int, tmp: Path) -> None:
    from torch.distributed.tensor import DTensor

    model = _fsdp_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    full_tensor_calls = []
    original = DTensor.full_tensor

    def spy(self, *a, **k):  # type: ignore[no-untyped-def]
        full_tensor_calls.append(1)
        return original(self, *a, **k)

    DTensor.full_tensor = spy  # gradwatch must never gather a whole gradient
    try:
        with _watch(model, opt, _out(tmp, rank)) as w:
            train(model, opt, w, rank, world)
            probe = w.stream(opt).probe
    finally:
        DTensor.full_tensor = original
    _save(tmp, rank, "info", {"collectives": probe.reducer.collectives, "full_tensor": len(full_tensor_calls),
                              "writes": w.writes, "steps": w.steps})
    state = full_state(model)
    if rank == 0:
        torch.save(state, tmp / "weights.pt")


def case_fsdp_clip(rank: int, world: int, tmp: Path) -> None:
    """FSDP2 + ClipNorm: the coefficient comes from the global norm, so updates equal one process's."""
    import gradwatch as gw

    model = _fsdp_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with _watch(model, opt, _out(tmp, rank), guards=[gw.guards.ClipNorm(0.05)]) as w:
        train(model, opt, w, rank, world, steps=20)
    state = full_state(model)
    if rank == 0:
        torch.save(state, tmp / "weights.pt")


def case_nan_rank1(rank: int, world: int, tmp: Path, fsdp: bool = False) -> None:
    """NaN or Inf in one gradient element on rank 1 only, written after the all-reduce (just before
    the optimizer step), so only rank 1's gradients are bad."""
    import gradwatch as gw
    from gradwatch.probe.distributed import local_tensor

    if fsdp:
        model = _fsdp_model(torch.float32)
        net = model
    else:
        model = deep_sigmoid_mlp()
        net = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    guard = gw.guards.SkipNonFinite()
    faults = {5: float("nan"), 12: float("inf"), 13: float("nan")} if rank == 1 else {}
    counter = [0]
    target = list(model.parameters())[2]

    def inject() -> None:
        value = faults.get(counter[0])
        counter[0] += 1
        if value is not None:
            local_tensor(target.grad).view(-1)[0] = value

    with _watch(net, opt, _out(tmp, rank), guards=[guard]) as w:
        train(net, opt, w, rank, world, steps=30, inject=inject)
    state = full_state(model)
    flat = torch.cat([t.reshape(-1) for t in state.values()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    _save(tmp, rank, "info", {
        "skipped": guard.skipped_steps,
        "identical": all(torch.equal(gathered[0], g) for g in gathered),
        "finite": bool(torch.isfinite(flat).all()),
        "steps": w.steps,
    })


def case_nan_rank1_fsdp(rank: int, world: int, tmp: Path) -> None:
    case_nan_rank1(rank, world, tmp, fsdp=True)


def _crash_on(crash_rank: int, rank: int, world: int, tmp: Path) -> None:
    """Rank ``crash_rank`` raises in the middle of a window (step 7 of flush_every 10)."""
    model = deep_sigmoid_mlp()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    x, y = circles()
    with _watch(ddp, opt, _out(tmp, rank)) as w:
        for step, idx in enumerate(batches(x)):
            if step == 7 and rank == crash_rank:
                raise ValueError(f"boom on rank {rank}")
            part = idx.chunk(world)[rank]
            opt.zero_grad()
            loss = nn.functional.binary_cross_entropy_with_logits(ddp(x[part]), y[part])
            loss.backward()
            opt.step()
            w.log(loss=loss)


def case_crash_rank1(rank: int, world: int, tmp: Path) -> None:
    _crash_on(1, rank, world, tmp)


def case_crash_rank0(rank: int, world: int, tmp: Path) -> None:
    _crash_on(0, rank, world, tmp)


def case_store_fails_rank0(rank: int, world: int, tmp: Path) -> None:
    """Rank 0 cannot write its second window (disk full): it stops writing but keeps taking part in
    the reductions, so no rank is left waiting and the guards stay the same on every rank."""
    import gradwatch as gw

    model = deep_sigmoid_mlp()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    guard = gw.guards.ClipNorm(0.01)
    with _watch(ddp, opt, _out(tmp, rank), guards=[guard]) as w:
        train(ddp, opt, w, rank, world, steps=1)
        att = w.stream(opt)
        if rank == 0:
            calls = [0]
            original = att.stream.append

            def append(chunk):  # type: ignore[no-untyped-def]
                calls[0] += 1
                if calls[0] >= 2:
                    raise OSError(28, "No space left on device")
                return original(chunk)

            att.stream.append = append
        train(ddp, opt, w, rank, world, steps=40)
    _save(tmp, rank, "info", {"steps": w.steps, "store_failed": att.store_failed, "failed": att.failed,
                              "collectives": att.probe.reducer.collectives})


def case_crash_without_with(rank: int, world: int, tmp: Path) -> None:
    """A watch that is never closed (no `with`) and rank 1 raising: its atexit close must not reduce."""
    model = deep_sigmoid_mlp()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    _watch(ddp, opt, _out(tmp, rank))
    x, y = circles()
    for step, idx in enumerate(batches(x)):
        if step == 5 and rank == 1:
            raise ValueError("boom without with")
        part = idx.chunk(world)[rank]
        opt.zero_grad()
        nn.functional.binary_cross_entropy_with_logits(ddp(x[part]), y[part]).backward()
        opt.step()


CASES = {
    "crash_without_with": case_crash_without_with,
    "store_fails_rank0": case_store_fails_rank0,
    "crash_rank0": case_crash_rank0,
    "crash_rank1": case_crash_rank1,
    "ddp": case_ddp,
    "ddp_accum": case_ddp_accum,
    "fsdp": case_fsdp,
    "fsdp_clip": case_fsdp_clip,
    "nan_rank1": case_nan_rank1,
    "nan_rank1_fsdp": case_nan_rank1_fsdp,
}
