"""Never lose the record: a run killed, interrupted, crashed or torn still reads back.

The kill tests start a child that trains under ``gradwatch.watch(..., flush_every=10)``, prints
READY after its 36th optimizer step (step 35) and goes on; the parent reads that line from the
child's stdout and only then sends the signal, so no test waits on a clock.
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

# argv: OUT AFTER. After step 35 the child prints READY, then forever either
#   AFTER == "step": keeps training (forward, backward, optimizer step), or
#   AFTER == "grad": keeps computing gradients without stepping (a long evaluation, say),
# so that with "grad" the steps the store holds at a kill are known exactly.
CHILD = """\
import sys

import torch
from torch import nn

import gradwatch

out, after = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
x, y = torch.randn(64, 8), torch.randn(64, 1)


def step():
    loss = nn.functional.mse_loss(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss


with gradwatch.watch(model, opt, out=out, flush_every=10) as w:
    for _ in range(36):
        w.log(loss=step())
    print("READY", flush=True)
    while True:
        if after == "step":
            w.log(loss=step())
        else:
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
        else:
            computed = ~np.isnan(values).all(axis=1)
            assert computed[0], f"{metric} was not computed at step 0"
            assert np.isfinite(values[computed]).all(), metric
    np.testing.assert_array_equal(run.layer_series("grad_nonfinite"), 0)


def start_child(tmp_path: Path, after: str) -> tuple[subprocess.Popen, Path]:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    out = tmp_path / "run"
    child = subprocess.Popen(
        [sys.executable, str(script), str(out), after],
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
    child, out = start_child(tmp_path, after="grad")
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
    child, out = start_child(tmp_path, after="step")
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=TIMEOUT)
    assert child.returncode == 128 + signal.SIGTERM, err

    run = gradwatch.load_run(out)
    assert run.status not in ("running", "finished"), run.status
    n = len(run.steps)
    assert n >= 36  # everything up to the kill, the unflushed window 30..35 (and later) included
    np.testing.assert_array_equal(run.steps, np.arange(n))
    assert_series_sound(run)
    assert np.isfinite(run.step_series("loss")[:36]).all()
    assert f"recorded {n} steps" in err


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
