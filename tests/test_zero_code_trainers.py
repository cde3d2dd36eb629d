"""`gradwatch run` on unmodified trainer scripts records the gradients of each step, at the right point.

The scripts in tests/trainer_scripts/ are plain user scripts — a Lightning module, a Hugging Face
Trainer, closure loops — that log, for themselves, what their framework says the gradient norm and
the loss of every optimizer step were. Each runs under ``python -m gradwatch run`` in a subprocess,
and the stored run must hold the same numbers: the script's own norms at Lightning's
``on_before_optimizer_step``, the Trainer's logged pre-clip ``grad_norm``, the closure's first
gradient; step 0 included; each loss at its own step; one record per optimizer step under gradient
accumulation. Before the runner attached the trainers' callbacks, Lightning's steps held the
previous step's gradients (NaN at step 0) and the Trainer's held norms of at most max_grad_norm.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch import runner
from gradwatch.diagnose import read_findings

SCRIPTS = Path(__file__).parent / "trainer_scripts"
TIMEOUT = 300  # a bound on a hung child, never reached by a passing run
RTOL = 1e-5  # the bar; float32 norms computed two ways agree to ~1e-7


def gradwatch_run(tmp_path: Path, script: str, *args: str, out: str = "run") -> tuple[subprocess.CompletedProcess, dict]:
    """Run ``gradwatch run --out tmp_path/out SCRIPT tmp_path/log.json ARGS``; the script's own log."""
    log = tmp_path / f"{out}.json"
    proc = subprocess.run(
        [sys.executable, "-m", "gradwatch", "run", "--no-report", "--out", str(tmp_path / out), str(SCRIPTS / script),
         str(log), *args],
        cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads(log.read_text())


def assert_same_steps(run: gw.Run, norms: list[float], losses: list[float]) -> None:
    """One record per optimizer step, from step 0, each with its own step's norm and loss."""
    np.testing.assert_array_equal(run.steps, np.arange(len(norms)))
    np.testing.assert_allclose(run.step_series("grad_norm"), norms, rtol=RTOL)
    np.testing.assert_allclose(run.step_series("loss"), losses, rtol=RTOL)


# ----------------------------------------------------------------------------------------- Lightning

pl = pytest.importorskip("lightning.pytorch")


def test_a_lightning_script_is_recorded_at_on_before_optimizer_step(tmp_path: Path) -> None:
    proc, log = gradwatch_run(tmp_path, "lightning_sigmoid.py", "--logdir", str(tmp_path / "logs"))
    run = gw.load_run(tmp_path / "run")
    assert len(log["norms"]) == 3 * 8 and log["user_callbacks"] == []
    assert np.isfinite(run.step_series("grad_norm")[0])  # step 0 is there, not NaN
    assert_same_steps(run, log["norms"], log["losses"])
    assert log["trainer_callbacks"].count("GradWatch") == 1  # added by the runner, once
    assert run.layers[0].name == "net.0.weight" and run.status == "finished"
    # The loss function, seen through Lightning's `loss / accumulate_grad_batches`.
    assert run.streams[0]["loss"] == "BinaryCrossEntropyWithLogitsBackward0"
    # The same logger keys as the callback added by hand, from the same numbers.
    rows = list(csv.DictReader(open(Path(log["log_dir"]) / "metrics.csv")))
    logged = [float(r["gradwatch/grad_norm"]) for r in rows if r.get("gradwatch/grad_norm")]
    np.testing.assert_allclose(logged, log["norms"], rtol=RTOL)
    # ... and the diagnosis of the right numbers: the 7-layer sigmoid net's gradients vanish.
    assert "vanishing_gradients" in {f.kind for f in read_findings(tmp_path / "run")}


def test_lightning_accumulation_and_clipping_give_one_record_per_step_before_the_clip(tmp_path: Path) -> None:
    """accumulate_grad_batches=2 and gradient_clip_val, with the standalone pytorch_lightning package."""
    pytest.importorskip("pytorch_lightning")
    _, log = gradwatch_run(tmp_path, "lightning_sigmoid.py", "--accumulate", "2", "--clip", "0.01", "--standalone")
    run = gw.load_run(tmp_path / "run")
    assert len(log["norms"]) == 3 * 4  # 8 batches an epoch, 2 per optimizer step
    assert_same_steps(run, log["norms"], log["losses"])
    assert (run.step_series("grad_norm") > 0.01).all()  # before Lightning's clipping ...
    np.testing.assert_allclose(run.step_series("grad_norm_clipped"), 0.01, rtol=1e-4)  # ... and after it
    np.testing.assert_allclose(run.step_series("clip_threshold"), 0.01, rtol=1e-6)


def test_a_lightning_callback_the_script_added_itself_is_not_doubled(tmp_path: Path) -> None:
    proc, log = gradwatch_run(tmp_path, "lightning_sigmoid.py", "--own-callback", str(tmp_path / "own"))
    assert log["user_callbacks"] == ["GradWatch"] and log["trainer_callbacks"].count("GradWatch") == 1
    assert_same_steps(gw.load_run(tmp_path / "own"), log["norms"], log["losses"])
    assert not (tmp_path / "run").exists()  # the global hooks stood down: nothing recorded twice
    assert "the script records its optimizers itself (GradWatch -> " in proc.stderr
    assert "nothing was recorded" not in proc.stderr


def test_the_runner_leaves_lightnings_trainer_as_it_found_it(tmp_path: Path) -> None:
    """In this process Lightning is imported already: the Trainer class is patched in place, then restored."""
    init = pl.Trainer.__init__
    finders = list(sys.meta_path)
    script = tmp_path / "build.py"
    script.write_text(textwrap.dedent("""\
        import lightning.pytorch as pl
        trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                             enable_checkpointing=False, callbacks=[])
        print("CALLBACKS", sorted(type(c).__name__ for c in trainer.callbacks))
        """))
    code, w = runner.run_script(str(script), out=tmp_path / "run", quiet=True, report=False)
    assert code == 0 and pl.Trainer.__init__ is init and sys.meta_path == finders


# ------------------------------------------------------------------------------ Hugging Face Trainer

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")


def _trainer_logs(log: dict) -> tuple[list[float], list[float]]:
    steps = [h for h in log["log_history"] if "loss" in h and "grad_norm" in h]
    assert [h["step"] for h in steps] == list(range(1, len(steps) + 1))  # logging_steps=1: every step
    return [h["grad_norm"] for h in steps], [h["loss"] for h in steps]


def test_a_trainer_script_is_recorded_before_the_trainers_clipping(tmp_path: Path) -> None:
    _, log = gradwatch_run(tmp_path, "hf_trainer.py")
    run = gw.load_run(tmp_path / "run")
    norms, losses = _trainer_logs(log)
    assert_same_steps(run, norms, losses)
    # The unscaled regression's norms are in the hundreds; max_grad_norm=1.0 clips them to 1.
    assert min(norms) > 100
    assert (run.step_series("grad_norm_clipped") <= 1.0 + 1e-5).all()
    assert log["callbacks"].count("GradWatchCallback") == 1
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["streams"][0]["trainer"]["recorded"].startswith("before clipping")


def test_trainer_accumulation_gives_one_record_per_optimizer_step(tmp_path: Path) -> None:
    _, log = gradwatch_run(tmp_path, "hf_trainer.py", "--accumulate", "2", "--steps", "8")
    norms, losses = _trainer_logs(log)
    assert len(norms) == 8
    assert_same_steps(gw.load_run(tmp_path / "run"), norms, losses)


def test_a_trainer_callback_the_script_added_itself_is_not_doubled(tmp_path: Path) -> None:
    proc, log = gradwatch_run(tmp_path, "hf_trainer.py", "--steps", "4", "--own-callback", str(tmp_path / "own"))
    assert log["callbacks"].count("GradWatchCallback") == 1
    norms, losses = _trainer_logs(log)
    assert_same_steps(gw.load_run(tmp_path / "own"), norms, losses)
    assert not (tmp_path / "run").exists()
    assert "the script records its optimizers itself (GradWatchCallback -> " in proc.stderr


# ---------------------------------------------------------------------------------- closure loops


@pytest.mark.parametrize("optimizer", ["lbfgs", "sgd"])
def test_a_closure_loop_is_recorded_at_the_closures_first_gradient(tmp_path: Path, optimizer: str) -> None:
    """LBFGS calls its closure several times a step; the step is taken from the first call's gradient."""
    _, log = gradwatch_run(tmp_path, "closure_loop.py", "--optimizer", optimizer)
    if optimizer == "lbfgs":
        assert min(log["calls"]) > 1  # the line search evaluated more than once: the first call is the one
    run = gw.load_run(tmp_path / "run")
    assert_same_steps(run, log["first_norms"], log["losses"])
    # The update is of the whole step (weights before the first call -> after the step).
    assert np.isfinite(run.layer_series("update_ratio")[0]).all()


def test_watch_records_a_closure_step_and_takes_the_closures_loss() -> None:
    """The explicit API has the same step hooks as the runner: step(closure) is recorded after the closure."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.LBFGS(model.parameters(), max_iter=3)
    x, y = torch.randn(64, 3), torch.randn(64, 1)
    first: list[float] = []

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        if len(first) < len(losses) + 1:
            first.append(float(torch.cat([p.grad.flatten() for p in model.parameters()]).norm()))
        return loss

    losses: list[float] = []
    with gw.watch(model, opt, out=None, quiet=True, report=False) as w:
        for _ in range(4):
            losses.append(float(opt.step(closure).detach()))
        run = w.run
    np.testing.assert_allclose(run.step_series("grad_norm"), first, rtol=RTOL)
    np.testing.assert_allclose(run.step_series("loss"), losses, rtol=RTOL)


def test_a_step_that_never_calls_its_closure_is_not_recorded_and_that_is_said(tmp_path: Path, capsys) -> None:
    class Lazy(torch.optim.SGD):
        """Takes a closure and ignores it (steps with whatever gradients are there)."""

        def step(self, closure=None):  # type: ignore[no-untyped-def, override]
            return super().step()

    model = nn.Linear(2, 1)
    opt = Lazy(model.parameters(), lr=0.1)
    model(torch.randn(4, 2)).sum().backward()
    with gw.watch(model, opt, out=tmp_path / "run", report=False) as w:
        opt.step(lambda: None)
        opt.step(lambda: None)
        assert w.steps == 0
    err = capsys.readouterr().err
    assert err.count("returned without calling its closure") == 1 and "not recorded" in err


# --------------------------------------------------------------------- the script's own clipping

CLIPPING_SCRIPT = """\
import torch
from torch import nn
from torch.nn.utils import clip_grad_norm_

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
x, y = torch.randn(64, 4), 100 * torch.randn(64, 1)
pre = []
for _ in range(12):
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    pre.append(float(clip_grad_norm_(model.parameters(), 1.0)))
    opt.step()
print("PRE", min(pre))
"""


def test_a_script_that_clips_before_step_is_told_its_norms_are_the_clipped_ones(tmp_path: Path, capsys) -> None:
    """What reaches optimizer.step() is recorded; when the script clipped it first, that is said and stored."""
    script = tmp_path / "clips.py"
    script.write_text(CLIPPING_SCRIPT)
    clip_before = torch.nn.utils.clip_grad_norm_
    code, w = runner.run_script(str(script), out=tmp_path / "run", report=False)
    out, err = capsys.readouterr()
    assert code == 0 and torch.nn.utils.clip_grad_norm_ is clip_before  # restored
    assert float(out.split("PRE")[1]) > 10  # the script's gradients were far above its limit ...
    run = gw.load_run(tmp_path / "run")
    assert (run.step_series("grad_norm") <= 1.0 + 1e-5).all()  # ... and what step() got was clipped
    assert err.count("the script clips SGD's gradients itself (clip_grad_norm_, max_norm=1)") == 1
    assert "--clip-norm 1" in err
    assert run.streams[0]["script_clipping"] == {"function": "clip_grad_norm_", "max_norm": 1.0}


def test_a_subclass_step_calling_super_step_is_one_recorded_step(tmp_path: Path) -> None:
    """torch hooks each optimizer class's step() once one of its instances exists: a subclass whose
    step() calls super().step() then fires the hooks twice per step; it is recorded once."""
    torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1)  # SGD.step is hooked from here on

    class Sub(torch.optim.SGD):
        def step(self, closure=None):  # type: ignore[no-untyped-def, override]
            return super().step(closure)

    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    opt = Sub(model.parameters(), lr=0.1)
    x = torch.randn(4, 2)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    with gw.watch(model, opt, out=tmp_path / "run", quiet=True, report=False) as w:
        for _ in range(3):
            closure()
            opt.step()
        for _ in range(2):
            opt.step(closure)
        with pytest.raises(ZeroDivisionError):  # a step that raises is not recorded; the next ones are
            opt.step(lambda: 1 / 0)
        closure()
        opt.step()
    np.testing.assert_array_equal(gw.load_run(tmp_path / "run").steps, np.arange(6))
    assert w.steps == 6


def test_the_loss_function_is_named_through_a_rescaling_of_the_loss() -> None:
    """Lightning and the HF Trainer divide the loss by the accumulation steps before backward()."""
    from gradwatch.watch import loss_node

    a, b = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    mse = nn.functional.mse_loss(a, torch.zeros(3))
    assert {loss_node(mse / 2), loss_node(mse * 0.5), loss_node(mse.clone() / torch.tensor(4.0))} == {"MseLossBackward0"}
    assert loss_node(a.sum() * b.sum()) == "MulBackward0"  # a product of two graphs is not a rescaling
    assert loss_node(mse.detach()) is None


# --------------------------------------------------------------- several optimizers, online diagnosis

GAN_SCRIPT = """\
import torch
from torch import nn
torch.manual_seed(0)
G = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 4))
D = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
og, od = torch.optim.Adam(G.parameters(), 1e-3), torch.optim.SGD(D.parameters(), 1e-2)
for i in range(120):
    x, z = torch.randn(16, 4), torch.randn(16, 4)
    ld = nn.functional.softplus(D(G(z).detach())).mean() + nn.functional.softplus(-D(x)).mean()
    od.zero_grad(); ld.backward(); od.step()
    lg = nn.functional.softplus(-D(G(z))).mean()
    og.zero_grad(); lg.backward(); og.step()
"""


def test_a_healthy_gan_gets_no_online_alarm_between_its_two_optimizers_flushes(tmp_path: Path, capsys) -> None:
    """D's window is stored before G's: read in between, G's layers looked as if they had no gradient
    and no finite weights. The online diagnosis reads up to the step both have stored."""
    script = tmp_path / "gan.py"
    script.write_text(GAN_SCRIPT)
    code, w = runner.run_script(str(script), out=tmp_path / "run", report=False)
    err = capsys.readouterr().err
    assert code == 0 and w.steps == 120
    assert "never receive a gradient" not in err and "nonfinite" not in err, err
    assert not [f for f in w.findings if f.severity in ("warning", "error")]


def test_a_run_read_until_a_step_holds_every_stream_up_to_it(tmp_path: Path) -> None:
    script = tmp_path / "gan.py"
    script.write_text(GAN_SCRIPT.replace("range(120)", "range(30)"))
    runner.run_script(str(script), out=tmp_path / "run", report=False, quiet=True, sample_every=10)
    run = gw.load_run(tmp_path / "run")
    early = run.until(11)
    np.testing.assert_array_equal(early.steps, np.arange(12))
    np.testing.assert_array_equal(early.step_series("grad_norm"), run.step_series("grad_norm")[:12])
    np.testing.assert_array_equal(early.layer_series("grad_norm"), run.layer_series("grad_norm")[:12])
    assert set(early.histograms()[0]) == {0, 2, 4, 6, 8, 10}  # sampled steps up to 11 (every other step at first)
