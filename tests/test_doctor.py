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


# ----------------------------------------------------------------------------- found in review


def test_ranking_falls_back_to_the_recorded_loss_when_the_metric_is_missing() -> None:
    from gradwatch.doctor import TrialResult, rank_key

    base = TrialResult("baseline", [], Path("b"), 0, 1.0, problems=["nonfinite"])
    a = TrialResult("a", [], Path("a"), 0, 1.0, loss=2.5e4)
    b = TrialResult("b", [], Path("b"), 0, 1.0, loss=1.7e3)
    ranked = sorted([a, b], key=lambda r: rank_key(r, base, maximise=True, by_metric=False))
    assert ranked[0] is b
    failed = TrialResult("c", [], Path("c"), -1, 1.0, loss=1.0, error="timed out after 9 s (the budget)")
    assert rank_key(failed, base, True, False)[0] is True, "a failed trial is never best"


def _gw(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gradwatch", *args], capture_output=True, text=True, timeout=timeout)


def test_doctor_says_the_baseline_timed_out_instead_of_calling_it_healthy(tmp_path: Path) -> None:
    script = tmp_path / "slow.py"
    script.write_text("import time, torch\n"
                      "p = torch.nn.Parameter(torch.zeros(2)); o = torch.optim.SGD([p], lr=0.1)\n"
                      "for _ in range(3):\n    p.sum().backward(); o.step()\n"
                      "time.sleep(120)\n")
    res = _gw("doctor", "--budget", "6", "--out", str(tmp_path / "runs"), str(script))
    assert res.returncode == 2 and "did not finish within the budget of 6 s" in res.stderr
    assert "Healthy" not in res.stderr


def test_doctor_names_the_scripts_own_error(tmp_path: Path) -> None:
    script = tmp_path / "crash.py"
    script.write_text("raise RuntimeError('the data file is missing')\n")
    res = _gw("doctor", "--out", str(tmp_path / "runs"), str(script))
    assert res.returncode == 2 and "RuntimeError: the data file is missing" in res.stderr


def test_a_remedy_that_does_not_fit_the_model_voids_the_trial_in_one_line(tmp_path: Path) -> None:
    script = tmp_path / "functional.py"
    script.write_text(
        "import torch\nfrom torch import nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n        super().__init__(); self.a = nn.Linear(2, 4); self.b = nn.Linear(4, 1)\n"
        "    def forward(self, x):\n        return self.b(torch.sigmoid(self.a(x)))\n"
        "m = Net(); o = torch.optim.SGD(m.parameters(), lr=0.1)\n"
        "for _ in range(3):\n    o.zero_grad(); m(torch.randn(4, 2)).sum().backward(); o.step()\n")
    res = _gw("run", "--out", str(tmp_path / "r"), "--no-report", "--treatment",
              '[{"action": "swap_activation", "args": {"from": "Sigmoid", "to": "ReLU"}}]', str(script))
    assert res.returncode == 3, res.stderr
    assert "the remedy could not be applied: Net: Net.forward calls sigmoid as a function" in res.stderr
    assert "Traceback" not in res.stderr


GROUPS = """
import torch
from torch import nn
m = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1))
opt = torch.optim.SGD([{"params": m[0].parameters(), "lr": 0.5, "momentum": 0.9}, {"params": m[2].parameters()}], lr=0.1)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0)
for _ in range(3):
    opt.zero_grad(); m(torch.randn(4, 2)).sum().backward(); opt.step(); sched.step()
print("lrs", [g["lr"] for g in opt.param_groups])
"""


def test_set_optimizer_uses_its_own_lr_for_every_group(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    p = tmp_path / "groups.py"
    p.write_text(GROUPS)
    code, _ = run_script(str(p), out=tmp_path / "r", quiet=True, report=False,
                         treatment=Treatment([{"action": "set_optimizer", "args": {"name": "Adam", "lr": 0.008}}]))
    assert code == 0 and "lrs [0.008, 0.008]" in capsys.readouterr().out


def test_scale_lr_survives_a_scheduler_that_recomputes_from_base_lrs(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    p = tmp_path / "groups.py"
    p.write_text(GROUPS)
    code, _ = run_script(str(p), out=tmp_path / "r", quiet=True, report=False,
                         treatment=Treatment([{"action": "scale_lr", "args": {"factor": 0.1}}]))
    out = capsys.readouterr().out
    assert (code == 0
            and "lrs [0.05, 0.01]" in out.replace("0.05000000000000001", "0.05").replace("0.010000000000000002", "0.01")), out
