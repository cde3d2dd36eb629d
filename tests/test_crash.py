"""Never lose the record: a run killed, interrupted, crashed or torn still reads back.

The kill tests start a child that trains under ``gradwatch.watch(..., flush_every=10)``, prints
READY after its 36th optimizer step (step 35) and goes on computing; the parent reads that line
from the child's stdout and only then sends the signal, so no test waits on a clock. A third test
sweeps SIGTERM over every other line gradwatch executes during a step that flushes.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from torch import nn

import gradwatch

TIMEOUT = 120  # a bound on a hung child, never reached by a passing run

# argv: OUT. After step 35 the child prints READY and goes on computing gradients forever without
# stepping the optimizer (think of a long evaluation pass): CPU-busy, with steps 30..35 buffered and
# not yet flushed, so what the store must hold at a kill is known exactly.
CHILD = """\
import sys

import torch
from torch import nn

import gradwatch

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
x, y = torch.randn(64, 8), torch.randn(64, 1)

with gradwatch.watch(model, opt, out=sys.argv[1], flush_every=10) as w:
    for _ in range(36):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        w.log(loss=loss)
    print("READY", flush=True)
    while True:
        nn.functional.mse_loss(model(x), y).backward()
"""


EVERY_STEP = ("grad_norm", "grad_rms", "grad_nonfinite")  # the rest are sampled: NaN between samples


def assert_series_sound(run) -> None:
    """Every-step metrics finite at every step; sampled ones finite wherever they were computed."""
    for metric in gradwatch.LAYER_METRICS:
        values = run.layer_series(metric)
        assert values.shape == (len(run.steps), len(run.layers))
        if metric in EVERY_STEP:
            assert np.isfinite(values).all(), metric
        elif metric.startswith("act_"):
            # Per module (on its weight's column), and saturation only before sigmoid/tanh.
            weights = [i for i, layer in enumerate(run.layers) if layer.name.endswith("weight")]
            if metric == "act_dead_frac":
                computed = ~np.isnan(values[:, weights]).all(axis=1)
                assert computed[0] and np.isfinite(values[computed][:, weights]).all(), metric
        else:
            computed = ~np.isnan(values).all(axis=1)
            assert computed[0], f"{metric} was not computed at step 0"
            assert np.isfinite(values[computed]).all(), metric
    np.testing.assert_array_equal(run.layer_series("grad_nonfinite"), 0)


def start_child(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    out = tmp_path / "run"
    child = subprocess.Popen(
        [sys.executable, str(script), str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    watchdog = threading.Timer(TIMEOUT, child.kill)  # only fires if the child never says READY
    watchdog.start()
    try:
        line = child.stdout.readline()
    finally:
        watchdog.cancel()
    if line != "READY\n":
        child.kill()
        _, err = child.communicate(timeout=TIMEOUT)
        pytest.fail(f"child did not get ready (said {line!r}):\n{err}")
    return child, out


def test_sigkill_leaves_every_flushed_step(tmp_path):
    child, out = start_child(tmp_path)
    child.send_signal(signal.SIGKILL)
    child.communicate(timeout=TIMEOUT)
    assert child.returncode == -signal.SIGKILL

    run = gradwatch.load_run(out)
    # Flushes ran at the start of steps 10, 20 and 30; steps 30..35 were still on the device.
    np.testing.assert_array_equal(run.steps, np.arange(30))
    assert [layer.name for layer in run.layers] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert_series_sound(run)
    assert np.isfinite(run.step_series("loss")).all()
    assert run.status == "running"  # nobody got to say otherwise


def test_sigterm_flushes_the_last_partial_window(tmp_path):
    child, out = start_child(tmp_path)
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=TIMEOUT)
    assert child.returncode == 128 + signal.SIGTERM, err

    run = gradwatch.load_run(out)
    assert run.status not in ("running", "finished"), run.status
    # Everything up to the kill: the unflushed window 30..35 was written on the way out.
    np.testing.assert_array_equal(run.steps, np.arange(36))
    assert_series_sound(run)
    assert np.isfinite(run.step_series("loss")).all()
    assert "recorded 36 steps" in err


# The child runs many short recordings (flush_every=2, three steps). In each, during the third
# optimizer step (whose pre-step hook flushes steps 0..1), it sends itself SIGTERM at the k-th line
# that gradwatch's own code executes, for k = 1, 3, 5, ... until the step completes before the k-th
# line. SystemExit(143) leaves the `with` block and the child goes on to k + 2.
SWEEP_CHILD = """\
import os
import signal
import sys

import torch
from torch import nn

import gradwatch

PKG = os.path.dirname(gradwatch.__file__)
root = sys.argv[1]
state = {"armed": False, "left": 0, "fired": False}


def line_counter(frame, event, arg):
    if event == "line" and state["armed"]:
        state["left"] -= 1
        if state["left"] == 0:
            state["armed"] = False
            state["fired"] = True
            os.kill(os.getpid(), signal.SIGTERM)
    return line_counter


def only_gradwatch(frame, event, arg):
    return line_counter if frame.f_code.co_filename.startswith(PKG) else None


torch.manual_seed(0)
x, y = torch.randn(32, 4), torch.randn(32, 1)
k = 1
while True:
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    state.update(armed=False, fired=False, left=k)
    try:
        with gradwatch.watch(model, opt, out=f"{root}/k{k}", flush_every=2, quiet=True) as w:
            for i in range(3):
                loss = nn.functional.mse_loss(model(x), y)
                opt.zero_grad()
                loss.backward()
                if i == 2:
                    sys.settrace(only_gradwatch)
                    state["armed"] = True
                opt.step()
                state["armed"] = False
                sys.settrace(None)
                w.log(loss=loss)
    except SystemExit as e:
        sys.settrace(None)
        assert e.code == 143, e.code
    if not state["fired"]:
        break
    print(k, flush=True)
    k += 2
"""


def test_sigterm_at_any_line_of_a_flushing_step_loses_no_step(tmp_path):
    (tmp_path / "sweep.py").write_text(SWEEP_CHILD)
    res = subprocess.run(
        [sys.executable, "sweep.py", str(tmp_path / "runs")], cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert res.returncode == 0, res.stderr[-2000:]
    ks = [int(k) for k in res.stdout.split()]
    assert len(ks) > 20, "the flushing step ran fewer gradwatch lines than expected"

    broken = []
    for k in ks:
        run = gradwatch.load_run(tmp_path / "runs" / f"k{k}")
        n = len(run.steps)
        grad_norm = run.layer_series("grad_norm")
        sound = (
            n in (2, 3)  # steps 0 and 1 completed; step 2 may or may not have
            and np.array_equal(run.steps, np.arange(n))
            and np.isfinite(grad_norm).all()
            and run.status not in ("running", "finished")
        )
        if not sound:
            broken.append(f"k={k}: {n} steps, {int(np.isfinite(grad_norm).all(axis=1).sum())} whole, status {run.status}")
    assert not broken, (f"{len(broken)} of {len(ks)} kill points lost or blanked steps:\n"
                        + "\n".join(broken[:3] + ["..."] + broken[-3:]))


# ------------------------------------------------------------------------------- in-process


def tiny_model(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    return model, torch.optim.SGD(model.parameters(), lr=0.05), torch.randn(32, 4), torch.randn(32, 1)


class DataError(Exception):
    pass


def test_exception_inside_watch_propagates_and_keeps_the_steps(tmp_path):
    model, opt, x, y = tiny_model()
    error = DataError("batch 13 is corrupt")
    with pytest.raises(DataError) as caught:
        with gradwatch.watch(model, opt, out=tmp_path / "run", flush_every=5, quiet=True) as w:
            for i in range(20):
                if i == 13:
                    raise error
                loss = nn.functional.mse_loss(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                w.log(loss=loss)
    assert caught.value is error  # the user's own exception object, not wrapped
    assert caught.value.__cause__ is None and caught.value.__context__ is None

    run = gradwatch.load_run(tmp_path / "run")
    assert run.status == "crashed"
    np.testing.assert_array_equal(run.steps, np.arange(13))  # 10 flushed + 3 flushed on the way out
    assert np.isfinite(run.step_series("loss")).all()
    assert np.isfinite(run.layer_series("grad_norm")).all()


def test_all_nan_gradient_step_is_recorded_not_dropped(tmp_path):
    model, opt, x, y = tiny_model()
    bad = 6
    with gradwatch.watch(model, opt, out=tmp_path / "run", flush_every=4, quiet=True) as w:
        for i in range(8):
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            if i == bad:
                for p in model.parameters():
                    p.grad.fill_(float("nan"))
            opt.step()
            w.log(loss=loss)

    run = gradwatch.load_run(tmp_path / "run")
    np.testing.assert_array_equal(run.steps, np.arange(8))
    row = int(np.flatnonzero(run.steps == bad)[0])
    nonfinite = run.layer_series("grad_nonfinite")
    assert nonfinite.shape == (8, 4)
    np.testing.assert_array_equal(nonfinite[row], np.ones(4, np.float32))
    np.testing.assert_array_equal(nonfinite[:row], np.zeros((row, 4), np.float32))
    assert np.isnan(run.layer_series("grad_norm")[row]).all()
    assert np.isfinite(run.step_series("loss")[row])  # the forward pass was fine


def _message_offsets(path: Path) -> list[tuple[int, str]]:
    """(byte offset, type) of every message of an Arrow IPC stream file."""
    found = []
    with pa.OSFile(str(path)) as f:
        while True:
            pos = f.tell()
            try:
                msg = pa.ipc.read_message(f)
            except EOFError:
                return found
            found.append((pos, msg.type))


def test_series_torn_mid_batch_reads_up_to_the_last_whole_batch(tmp_path):
    model, opt, x, y = tiny_model()
    with gradwatch.watch(model, opt, out=tmp_path / "run", flush_every=10, quiet=True) as w:
        for _ in range(25):
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.log(loss=loss)
    whole = gradwatch.load_run(tmp_path / "run")
    assert len(whole.steps) == 25 and not whole.torn

    torn_dir = tmp_path / "torn"
    shutil.copytree(tmp_path / "run", torn_dir)
    series = torn_dir / "series-0.arrow"
    offsets = _message_offsets(series)
    assert [t for _, t in offsets] == ["schema", "record batch", "record batch", "record batch"]  # 10 + 10 + 5
    last = offsets[-1][0]
    size = series.stat().st_size
    with open(series, "r+b") as f:
        f.truncate(last + (size - last) // 2)  # half of the last batch is gone

    run = gradwatch.load_run(torn_dir)
    assert run.torn
    np.testing.assert_array_equal(run.steps, np.arange(20))
    np.testing.assert_array_equal(run.layer_series("grad_norm"), whole.layer_series("grad_norm")[:20])
    np.testing.assert_array_equal(run.step_series("loss"), whole.step_series("loss")[:20])


def test_signal_handlers_are_restored_when_the_last_watch_closes(tmp_path):
    import signal

    before = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT))
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, opt, out=tmp_path / "run", quiet=True):
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        if before[0] == signal.SIG_DFL:  # installed over the default only
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
