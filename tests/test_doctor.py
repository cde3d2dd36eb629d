"""gradwatch doctor: remedies applied from outside an unmodified script, trials ranked, best confirmed."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gradwatch as gw
from gradwatch.doctor import doctor, parse_metric
from gradwatch.runner import run_script
from gradwatch.treatment import Treatment

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def test_doctor_fixes_seed_004s_vanishing_sigmoid_net(tmp_path: Path) -> None:
    rep = doctor(str(EXAMPLES / "seed004_sigmoid.py"), out=tmp_path, metric="accuracy", trials=3)
    assert "vanishing_gradients" in rep.baseline.problems
    assert rep.best is not None and rep.confirmed is not None and rep.baseline_full is not None
    assert "vanishing_gradients" not in rep.confirmed.problems
    assert rep.confirmed.metric >= rep.baseline_full.metric + 0.2, (rep.baseline_full.metric, rep.confirmed.metric)
    assert rep.best.remedies[0]["action"] == "swap_activation"
    assert rep.compare is not None and rep.compare.exists()


def test_doctor_stops_seed_001s_explosion(tmp_path: Path) -> None:
    rep = doctor(str(EXAMPLES / "seed001_unscaled_targets.py"), out=tmp_path, trials=3)
    assert {"exploding_gradients", "nonfinite"} <= set(rep.baseline.problems)
    assert not math.isfinite(rep.baseline.loss)
    assert rep.best is not None and rep.confirmed is not None
    assert math.isfinite(rep.confirmed.loss) and math.isfinite(rep.confirmed.metric)
    assert not {"exploding_gradients", "nonfinite"} & set(rep.confirmed.problems)
    assert any("scale_targets" in a for a in rep.advice), "the cause that needs a code change is named"


def test_doctor_leaves_a_healthy_script_alone(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "gradwatch", "doctor", "--metric", "accuracy", "--out", str(tmp_path),
         str(EXAMPLES / "healthy_tanh.py")],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert "Healthy: no warning or error, so nothing was changed." in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["baseline"], "no trial was run"


def test_doctor_refuses_a_missing_script(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "gradwatch", "doctor", str(tmp_path / "nope.py")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "no such script" in res.stderr and "Traceback" not in res.stderr


SCRIPT = """
import torch
from torch import nn
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 8), nn.Sigmoid(), nn.Linear(8, 1), nn.Sigmoid())
opt = torch.optim.RMSprop(model.parameters(), lr=1e-3)
x, y = torch.randn(64, 4), torch.rand(64, 1).round()
for _ in range(STEPS):
    loss = nn.functional.binary_cross_entropy(model(x), y)
    opt.zero_grad(); loss.backward(); opt.step()
print("kind", type(opt).__name__, isinstance(opt, torch.optim.RMSprop), [type(m).__name__ for m in model])
"""


def _script(tmp_path: Path, steps: int = 5) -> Path:
    p = tmp_path / "train.py"
    p.write_text(SCRIPT.replace("STEPS", str(steps)))
    return p


def test_treatment_swaps_the_optimizer_class_and_puts_it_back(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    original = torch.optim.RMSprop
    t = Treatment([{"action": "set_optimizer", "args": {"name": "Adam", "lr": 0.008}}])
    code, w = run_script(str(_script(tmp_path)), out=tmp_path / "r", treatment=t, quiet=True, report=False)
    assert code == 0 and torch.optim.RMSprop is original
    assert "kind Adam True" in capsys.readouterr().out  # what runs is Adam; the script's isinstance still holds
    run = gw.load_run(tmp_path / "r")
    assert run.streams[0]["optimizer"] == "Adam" and run.step_series("lr")[0] == pytest.approx(0.008)


def test_treatment_scales_lr_before_the_first_step_and_does_surgery_before_the_first_forward(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    t = Treatment([{"action": "scale_lr", "args": {"factor": 0.1}},
                   {"action": "swap_activation", "args": {"from": "Sigmoid", "to": "ReLU"}},
                   {"action": "insert_norm", "args": {"kind": "batch"}}])
    code, w = run_script(str(_script(tmp_path)), out=tmp_path / "r", treatment=t, quiet=True, report=False)
    assert code == 0
    out = capsys.readouterr().out
    assert "'ReLU'" in out and out.count("Sigmoid") == 1, out  # the output sigmoid is kept
    run = gw.load_run(tmp_path / "r")
    assert run.step_series("lr")[0] == pytest.approx(1e-4)
    assert any("new parameters joined RMSprop" in line for line in t.log)


def test_trial_runs_stop_at_max_steps_with_exit_code_0(tmp_path: Path) -> None:
    code, w = run_script(str(_script(tmp_path, steps=100)), out=tmp_path / "r", max_steps=7, quiet=True, report=False)
    assert code == 0 and len(gw.load_run(tmp_path / "r").steps) == 7


def test_remedies_that_need_code_are_refused() -> None:
    with pytest.raises(gw.GradwatchError, match="scale_targets.*cannot be applied from outside the script: standardise"):
        Treatment([{"action": "scale_targets", "args": {"method": "standardize"}}])


@pytest.mark.parametrize(
    "text, name, value",
    [("epoch 3 accuracy 0.5\naccuracy: 0.93\n", "accuracy", 0.93), ("final loss 1.5e-3", "loss", 1.5e-3),
     ("acc=0.7 val_acc=0.6", "acc", 0.7), ("final loss nan", "loss", math.nan), ("nothing here", "loss", math.nan)],
)
def test_parse_metric(text: str, name: str, value: float) -> None:
    got = parse_metric(text, name)
    assert (math.isnan(got) and math.isnan(value)) or got == pytest.approx(value)
