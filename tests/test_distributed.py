"""Data parallel (DDP, FSDP2) with 2 gloo processes on CPU: the numbers equal one process's, rank 0
alone writes, guard decisions are the same on every rank, and nothing waits forever."""

from __future__ import annotations

import json
import shutil
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import gradwatch as gw
from gradwatch.diagnose import diagnose
from gradwatch.watch import claimed_by

sys.path.insert(0, str(Path(__file__).parent))
import dist_worker  # noqa: E402
from scenarios import deep_sigmoid_mlp  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")

WORLD = 2
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(case: str, tmp: Path, attempts: int = 3) -> list[dict]:
    """Run ``case`` on WORLD spawned ranks; fail (never hang) if they do not finish in time. A port
    taken between choosing it and rank 0 binding it (other tests open sockets too) is retried."""
    for attempt in range(attempts):
        ctx = mp.start_processes(dist_worker.worker, args=(WORLD, _free_port(), case, str(tmp)), nprocs=WORLD,
                                 join=False, start_method="spawn")
        deadline = time.monotonic() + TIMEOUT_S
        try:
            while not ctx.join(timeout=2):
                if time.monotonic() > deadline:
                    for p in ctx.processes:
                        p.kill()
                    pytest.fail(f"{case}: the ranks did not finish in {TIMEOUT_S} s (a rank waits forever)")
            break
        except mp.ProcessRaisedException as e:
            if "address already in use" not in str(e).lower() or attempt == attempts - 1:
                raise
        except mp.ProcessExitedException as e:
            # Killed by a signal rather than by an exception of its own: a rank aborted inside gloo
            # (a joinable thread destroyed). Not gradwatch's doing; a fault of gradwatch's raises.
            if e.signal_name != "SIGABRT" or attempt == attempts - 1:
                raise
            for child in tmp.iterdir():  # the next attempt starts from an empty directory
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    infos = []
    for r in range(WORLD):
        path = tmp / f"info-{r}.json"
        infos.append(json.loads(path.read_text()) if path.exists() else {})
    return infos


def reference(tmp: Path, steps: int = dist_worker.STEPS, guards=None, lr: float = 0.1):  # type: ignore[no-untyped-def]
    """The same training in this one process, on whole batches."""
    model = deep_sigmoid_mlp().double()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with gw.watch(model, opt, out=tmp / "ref", quiet=True, report=False, flush_every=dist_worker.FLUSH,
                      sample_every=dist_worker.SAMPLE, guards=guards) as w:
            dist_worker.train(model, opt, w, 0, 1, steps=steps)
    finally:
        torch.set_num_threads(threads)
    return model


def assert_same_numbers(ref_dir: Path, run_dir: Path) -> None:
    ref, run = gw.load_run(ref_dir), gw.load_run(run_dir)
    assert [li.name for li in run.layers] == [li.name for li in ref.layers]  # original module paths
    assert [li.shape for li in run.layers] == [li.shape for li in ref.layers]  # unsharded shapes
    np.testing.assert_array_equal(run.steps, ref.steps)
    for metric in ("grad_norm", "grad_rms", "grad_std", "grad_maxabs", "weight_norm", "weight_std",
                   "weight_mean", "update_ratio"):
        a, b = run.layer_series(metric), ref.layer_series(metric)
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=metric)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=0, equal_nan=True, err_msg=metric)
    # A gradient's mean can be a cancellation (~0): compare it on the scale of its RMS.
    mean, rms = run.layer_series("grad_mean"), ref.layer_series("grad_rms")
    np.testing.assert_allclose(mean, ref.layer_series("grad_mean"), rtol=1e-5, atol=float(np.nanmax(rms)) * 1e-5,
                               equal_nan=True)
    np.testing.assert_allclose(run.layer_series("grad_zero_frac"), ref.layer_series("grad_zero_frac"), equal_nan=True)
    _, h_run, _ = run.histograms()
    _, h_ref, _ = ref.histograms()
    # Histogram counts of |g| by power of two: a value at a bin edge may land one bin over.
    assert np.abs(h_run - h_ref).sum() <= 0.01 * h_ref.sum()
    for name in ("loss", "grad_norm", "lr"):
        np.testing.assert_allclose(run.step_series(name), ref.step_series(name), rtol=1e-5, err_msg=name)
    f_run = [(f.kind, f.severity, f.layers, f.first_step) for f in diagnose(run)]
    f_ref = [(f.kind, f.severity, f.layers, f.first_step) for f in diagnose(ref)]
    assert f_run == f_ref
    assert any(k == "vanishing_gradients" for k, *_ in f_ref)  # the comparison has something to compare


@pytest.mark.parametrize("case", ["ddp", "fsdp"])
def test_per_layer_numbers_equal_one_process(case: str, tmp_path: Path) -> None:
    infos = run_ranks(case, tmp_path)
    ref_model = reference(tmp_path)
    assert_same_numbers(tmp_path / "ref", tmp_path / "run")
    # Only rank 0 wrote; rank 1 touched no file of its run directory.
    assert infos[0]["writes"] and not infos[1]["writes"]
    assert not (tmp_path / "run-rank1").exists()
    assert infos[0]["steps"] == infos[1]["steps"] == dist_worker.STEPS
    # One all_reduce per flush (no guards): 60 steps / flush_every 10 = 6 windows.
    assert infos[0]["collectives"] == infos[1]["collectives"] == dist_worker.STEPS // dist_worker.FLUSH
    if case == "fsdp":
        assert infos[0]["full_tensor"] == infos[1]["full_tensor"] == 0
    weights = torch.load(tmp_path / "weights.pt")
    for name, p in ref_model.named_parameters():
        torch.testing.assert_close(weights[name], p.detach(), rtol=1e-5, atol=1e-6)
    assert gw.load_run(tmp_path / "run").status == "finished"


def test_ddp_gradient_accumulation_records_the_accumulated_gradient(tmp_path: Path) -> None:
    """Two micro-batches per rank (no_sync on the first): one record per optimizer step, equal to the
    single-process whole-batch step."""
    infos = run_ranks("ddp_accum", tmp_path)
    reference(tmp_path)
    assert infos[0]["steps"] == dist_worker.STEPS
    assert_same_numbers(tmp_path / "ref", tmp_path / "run")


def test_fsdp_clip_norm_uses_the_global_norm(tmp_path: Path) -> None:
    """ClipNorm under FSDP2 scales every shard by one coefficient from the unsharded norm, so the
    run follows the single-process ClipNorm run (a per-shard norm would clip differently)."""
    run_ranks("fsdp_clip", tmp_path)
    ref_model = reference(tmp_path, steps=20, guards=[gw.guards.ClipNorm(0.05)], lr=0.5)
    weights = torch.load(tmp_path / "weights.pt")
    for name, p in ref_model.named_parameters():
        torch.testing.assert_close(weights[name], p.detach(), rtol=1e-5, atol=1e-6)
    run, ref = gw.load_run(tmp_path / "run"), gw.load_run(tmp_path / "ref")
    clipped = ref.step_series("clip_coef") < 1
    assert clipped.sum() >= 5  # the threshold bites
    np.testing.assert_allclose(run.step_series("clip_coef"), ref.step_series("clip_coef"), rtol=1e-5)
    np.testing.assert_allclose(run.step_series("grad_norm_clipped"), ref.step_series("grad_norm_clipped"), rtol=1e-5)


@pytest.mark.parametrize("case", ["nan_rank1", "nan_rank1_fsdp"])
def test_nan_on_one_rank_makes_every_rank_skip(case: str, tmp_path: Path) -> None:
    infos = run_ranks(case, tmp_path)
    assert infos[0]["skipped"] == infos[1]["skipped"] == [5, 12, 13]
    assert infos[0]["identical"] and infos[1]["identical"]  # the weights never diverged
    assert infos[0]["finite"] and infos[1]["finite"]
    assert infos[0]["steps"] == infos[1]["steps"] == 30
    run = gw.load_run(tmp_path / "run")
    assert np.flatnonzero(run.step_series("skipped")).tolist() == [5, 12, 13]
    assert not (tmp_path / "run-rank1").exists()


TORCHRUN_SCRIPT = """\
import sys
import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, {tests!r})
from scenarios import circles, deep_sigmoid_mlp

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.set_num_threads(1)
model = nn.parallel.DistributedDataParallel(deep_sigmoid_mlp().double())
opt = torch.optim.SGD(model.parameters(), lr=0.1)
x, y = circles()
x, y = x.double(), y.double()
gen = torch.Generator().manual_seed(0)
for step in range(25):
    idx = torch.randperm(len(x), generator=gen)[:64].chunk(world)[rank]
    opt.zero_grad()
    nn.functional.binary_cross_entropy_with_logits(model(x[idx]), y[idx]).backward()
    opt.step()
print("rank", rank, "done")
dist.destroy_process_group()
"""


def _torchrun(nproc: int, script: Path, out: Path, cwd: Path):  # type: ignore[no-untyped-def]
    import os
    import subprocess

    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), f"--nproc-per-node={nproc}", f"--master-port={_free_port()}", "-m", "gradwatch", "run",
           "--out", str(out), str(script)]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S,
                          env={**os.environ, "GRADWATCH_REPORT": "0", "OMP_NUM_THREADS": "1"})


def test_gradwatch_run_under_torchrun(tmp_path: Path) -> None:
    """`torchrun --nproc-per-node=2 -m gradwatch run script.py`: an unmodified DDP script; rank 0 writes
    one run (flushed when the script destroys its process group) equal to the one-process run, and
    speaks once."""
    script = tmp_path / "train_ddp.py"
    script.write_text(TORCHRUN_SCRIPT.format(tests=str(Path(__file__).parent)))
    two = _torchrun(2, script, tmp_path / "two", tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    one = _torchrun(1, script, tmp_path / "one", tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    run_two, run_one = gw.load_run(tmp_path / "two"), gw.load_run(tmp_path / "one")
    assert run_two.status == "finished" and run_two.steps.tolist() == list(range(25))
    np.testing.assert_allclose(run_two.layer_series("grad_norm"), run_one.layer_series("grad_norm"), rtol=1e-5)
    np.testing.assert_allclose(run_two.step_series("loss"), run_one.step_series("loss"), rtol=1e-5)
    assert [li.name for li in run_two.layers][:2] == ["0.weight", "0.bias"]  # not module.0.weight
    assert two.stderr.count("recorded 25 steps") == 1  # rank 0 alone reports
    assert "process group ended before" not in two.stderr


@pytest.mark.parametrize("crash_rank", [0, 1])
def test_a_crash_on_one_rank_raises_its_own_error_at_once(crash_rank: int, tmp_path: Path) -> None:
    """The crashing rank's watch closes without a reduction (the other rank is inside DDP's backward and
    would never join it): its own ValueError comes out, promptly, not a collective error or a hang.
    Rank 0's run is kept, its last partial window marked as rank 0's own numbers."""
    t0 = time.monotonic()
    with pytest.raises(mp.ProcessRaisedException, match=f"ValueError: boom on rank {crash_rank}"):
        run_ranks(f"crash_rank{crash_rank}", tmp_path, attempts=1)
    assert time.monotonic() - t0 < 60
    if crash_rank == 0:
        import json

        run = gw.load_run(tmp_path / "run")
        assert run.status == "crashed" and run.steps.tolist() == list(range(7))
        meta = json.loads((tmp_path / "run" / "meta.json").read_text())
        assert meta["streams"][0]["local_statistics"].startswith("steps 0-6: rank 0's own statistics")


def test_an_unclosed_watch_on_a_crashing_rank_exits_at_once(tmp_path: Path) -> None:
    """No `with`, no close(): the crashing rank's watch is closed at interpreter exit, where nothing
    says the other ranks are exiting too, so it does not reduce (it would wait for rank 0, which is
    inside DDP's backward)."""
    t0 = time.monotonic()
    with pytest.raises(mp.ProcessRaisedException, match="ValueError: boom without with"):
        run_ranks("crash_without_with", tmp_path, attempts=1)
    assert time.monotonic() - t0 < 60


def test_a_snapshot_that_cannot_be_written_stays_in_memory(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Rollback(storage=DIR) on a full disk keeps its snapshots in host memory and still restores
    (under data parallelism a failing guard would leave this rank out of the next reduction)."""
    def full_disk(*a, **k):  # type: ignore[no-untyped-def]
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    model = deep_sigmoid_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rb = gw.guards.Rollback(every=5, storage=str(tmp_path / "snaps"))
    x, y = dist_worker.circles()
    with gw.watch(model, opt, out=tmp_path / "r", quiet=True, report=False, flush_every=5, guards=[rb]) as w:
        for step in range(30):
            opt.zero_grad()
            loss = nn.functional.binary_cross_entropy_with_logits(model(x[:64]), y[:64]) * (1e30 if step == 17 else 1.0)
            loss.backward()
            opt.step()
            w.log(loss=loss)
    assert w.run.status == "finished"
    assert len(rb.events) == 1  # the blow-up at step 17 was undone from the in-memory snapshot
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_store_failure_on_rank_0_leaves_no_rank_waiting(tmp_path: Path) -> None:
    infos = run_ranks("store_fails_rank0", tmp_path)
    assert infos[0]["steps"] == infos[1]["steps"] == 41
    assert "No space left" in infos[0]["store_failed"] and infos[1]["store_failed"] is None
    assert not infos[0]["failed"] and not infos[1]["failed"]
    # The same collectives on both ranks: one per guarded step, one per flush.
    assert infos[0]["collectives"] == infos[1]["collectives"] == 41 + 5
    run = gw.load_run(tmp_path / "run")
    assert run.steps.tolist() == list(range(10))  # the first window, written before the disk filled


@pytest.mark.parametrize("env, writes", [({"RANK": "1"}, True), ({"RANK": "1", "WORLD_SIZE": "2"}, False),
                                         ({"RANK": "0", "WORLD_SIZE": "2"}, True)])
def test_rank_from_the_environment(env: dict, writes: bool, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Before a process group exists, torchrun's RANK decides who writes, but only when WORLD_SIZE
    says there are several processes (some launchers set RANK=... for one-process jobs)."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    model = deep_sigmoid_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gw.watch(model, opt, out=tmp_path / "r", quiet=True, report=False) as w:
        dist_worker.train(model, opt, w, 0, 1, steps=3)
    assert w.writes is writes
    assert (tmp_path / "r" / "meta.json").exists() is writes


def test_framework_callbacks_refuse_guards_with_several_processes() -> None:
    """The Lightning and Hugging Face callbacks record on rank 0 only: guards there would clip rank 0's
    gradients alone. With several processes they say so instead."""
    from types import SimpleNamespace

    from gradwatch import GradwatchError
    from gradwatch.lightning import GradWatch
    from gradwatch.transformers import GradWatchCallback

    model = deep_sigmoid_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = SimpleNamespace(world_size=2, global_rank=1, gradient_clip_val=None, optimizers=[opt])
    with pytest.raises(GradwatchError, match="replicas would drift apart"):
        GradWatch(guards=[gw.guards.ClipNorm(1.0)]).on_fit_start(trainer, model)
    with pytest.raises(GradwatchError, match="replicas would drift apart"):
        GradWatchCallback(guards=[gw.guards.ClipNorm(1.0)]).on_train_begin(
            SimpleNamespace(world_size=2), SimpleNamespace(is_world_process_zero=False), SimpleNamespace())
    # Without guards, a rank other than 0 records nothing, but claims the optimizer, so that
    # `gradwatch run`'s global hooks do not record it there (and start a reduction rank 0 never joins).
    cb = GradWatch()
    cb.on_fit_start(trainer, model)
    assert cb.watch is None and claimed_by(opt) is cb
    cb.teardown(trainer, model, "fit")
    assert claimed_by(opt) is None
