"""Diagnosis rules on exact series, the round trip through findings.json, online announcements,
and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch.store import LAYER_METRICS, STEP_METRICS, LayerInfo
from models import mlp, train


class FakeRun:
    """Series written by hand, for rules in isolation: every metric NaN unless set."""

    def __init__(self, n: int, layers: list[LayerInfo]):
        self.layers = layers
        self.steps = np.arange(n, dtype=np.int64)
        self.step = {m: np.full(n, np.nan, np.float32) for m in STEP_METRICS}
        self.step["sampled"][:] = 0
        self.step["loss_logged"][:] = 1
        self.layer = {m: np.full((n, len(layers)), np.nan, np.float32) for m in LAYER_METRICS}
        self.layer["grad_nonfinite"][:] = 0

    def step_series(self, name: str) -> np.ndarray:
        return self.step[name]

    def layer_series(self, name: str) -> np.ndarray:
        return self.layer[name]


def three_layers(act: str | None = "ReLU") -> list[LayerInfo]:
    return [
        LayerInfo("0.weight", (16, 8), 128, "Linear", act),
        LayerInfo("0.bias", (16,), 16, "Linear", act),
        LayerInfo("2.weight", (16, 16), 256, "Linear", act),
        LayerInfo("4.weight", (3, 16), 48, "Linear", None),
    ]


def healthy(n: int = 200) -> FakeRun:
    run = FakeRun(n, three_layers())
    rng = np.random.default_rng(0)
    run.step["loss"][:] = 1.0 / (1 + 0.01 * np.arange(n)) + 0.01 * rng.random(n)
    run.step["grad_norm"][:] = 1.0 + 0.1 * rng.random(n)
    run.layer["grad_rms"][:] = 0.05 + 0.01 * rng.random((n, 4))
    run.layer["grad_norm"][:] = run.layer["grad_rms"] * 10
    run.step["sampled"][::10] = 1
    run.layer["update_ratio"][::10] = 1e-3
    run.layer["weight_norm"][::10] = 1.0
    run.layer["grad_zero_frac"][::10] = 0.0
    return run


def kinds(run) -> list[str]:  # type: ignore[no-untyped-def]
    return [f.kind for f in gw.diagnose(run) if f.severity != "info"]


def test_healthy_series_give_no_finding() -> None:
    assert kinds(healthy()) == []


def test_explosion_is_reported_by_the_step_the_norm_passes_100x_its_early_median() -> None:
    run = healthy()
    run.step["grad_norm"][60:] = np.geomspace(2, 1e6, 140)  # median of the first steps is ~1.05
    f = next(f for f in gw.diagnose(run) if f.kind == "exploding_gradients")
    crossing = int(np.flatnonzero(run.step["grad_norm"] > 100 * np.median(run.step["grad_norm"][:10]))[0])
    assert f.evidence["threshold_crossing_step"] == crossing
    # A steady exponential climb is flagged as soon as it is one (30 steps of it), at or before the crossing.
    assert f.first_step == min(crossing, f.evidence["sustained_rise_step"]) and f.first_step <= crossing
    assert f.severity == "warning"  # no non-finite value followed
    assert f.remedies[0].action == "clip_norm"


def test_nan_from_data_is_forward_and_not_an_explosion() -> None:
    run = healthy()
    run.step["loss"][30:] = np.nan  # a NaN batch at step 30 poisons the weights: NaN from then on
    run.step["grad_norm"][30:] = np.nan
    run.layer["grad_nonfinite"][30:] = 1
    found = {f.kind: f for f in gw.diagnose(run)}
    assert "exploding_gradients" not in found
    assert found["nonfinite"].evidence["origin"] == "forward"
    assert found["nonfinite"].first_step == 30


def test_nonfinite_gradient_with_finite_loss_is_backward() -> None:
    run = healthy()
    run.layer["grad_nonfinite"][42, 2] = 1
    run.step["grad_norm"][42] = np.inf
    f = next(f for f in gw.diagnose(run) if f.kind == "nonfinite")
    assert (f.evidence["origin"], f.first_step, f.evidence["first_layer"]) == ("backward", 42, "2.weight")


def test_nan_after_an_explosion_comes_from_the_weights() -> None:
    run = healthy()
    run.step["grad_norm"][50:80] = np.geomspace(10, 1e8, 30)
    run.step["grad_norm"][80:] = np.nan
    run.step["loss"][80:] = np.inf
    run.layer["grad_nonfinite"][80:] = 1
    found = {f.kind: f for f in gw.diagnose(run)}
    assert found["nonfinite"].evidence["origin"] == "weights"
    assert found["exploding_gradients"].severity == "error"
    assert found["exploding_gradients"].first_step < found["nonfinite"].first_step


def test_vanishing_profile_names_the_starved_layers() -> None:
    run = healthy()
    run.layer["grad_rms"][:, 0] = 1e-5
    run.layer["grad_rms"][:, 2] = 4e-4
    f = next(f for f in gw.diagnose(run) if f.kind == "vanishing_gradients")
    assert f.layers == ["0.weight", "2.weight"] and f.severity == "error"
    assert f.evidence["profile"]["0.weight"] == pytest.approx(1e-5 / np.median(run.layer["grad_rms"][:100, 3]), rel=1e-3)
    assert f.last_step <= 99  # reported within the first 100 steps


def test_the_zero_gradients_of_a_run_wrecked_by_nan_are_not_vanishing() -> None:
    """After the weights go NaN, JAX's ReLU passes 0 back to the input side: that is the wreck, not
    the flow. The profile is judged on the steps before the first non-finite value, and a real
    starvation there is still found."""
    run = healthy()
    run.step["loss"][8:] = np.inf
    run.step["grad_norm"][8:] = np.nan
    run.layer["grad_rms"][8:, :2] = 0.0
    run.layer["grad_rms"][8:, 2:] = np.nan
    assert "vanishing_gradients" not in kinds(run)
    run.layer["grad_rms"][:8, 0] = 1e-5
    assert "vanishing_gradients" in kinds(run)
    amp = healthy()  # AMP's scaler skipping an overflowing step does not end the judged window
    amp.step["grad_norm"][3] = np.inf
    amp.step["amp_skipped"][:] = 0
    amp.step["amp_skipped"][3] = 1
    amp.layer["grad_rms"][:, 0] = 1e-5
    f = next(f for f in gw.diagnose(amp) if f.kind == "vanishing_gradients")
    assert f.last_step == 99


def test_exact_zero_gradients_are_dead_units_not_vanishing() -> None:
    run = healthy()
    run.layer["grad_zero_frac"][::10, 1] = 0.75  # 12 of 16 ReLU units get no gradient: never active
    run.layer["grad_rms"][:, 0] = 1e-5
    run.layer["grad_zero_frac"][::10, 0] = 0.95
    run.step["loss"][:] = 0.69  # and the run is not learning: the dead units hurt (else they are info)
    found = kinds(run)
    assert "dead_units" in found and "vanishing_gradients" not in found


def test_units_silenced_by_nan_are_not_dead_but_units_dead_before_it_are() -> None:
    run = healthy()
    run.step["loss"][:] = 0.69
    run.step["loss"][120:] = np.nan  # the run goes NaN at step 120; ReLUs of NaN never fire after it
    run.step["grad_norm"][120:] = np.nan
    run.layer["grad_nonfinite"][120:] = 1
    run.layer["grad_zero_frac"][120::10, 1] = 0.95
    assert "dead_units" not in kinds(run)
    run.layer["grad_zero_frac"][60::10, 1] = 0.95  # dead from step 60, six sampled steps before the NaN
    f = next(f for f in gw.diagnose(run) if f.kind == "dead_units")
    assert f.first_step == 60 and f.layers == ["0.weight"]  # column 1 is 0.bias: its units


def test_a_loss_spike_is_found_by_its_robust_z_score() -> None:
    run = healthy()
    run.step["loss"][120] = 50.0
    f = next(f for f in gw.diagnose(run) if f.kind == "loss_spike")
    assert f.first_step == 120 and f.evidence["spike_steps"] == [120]


def test_flat_loss_with_tiny_updates_is_stalled() -> None:
    run = healthy(300)
    run.step["loss"][:] = 0.69
    run.layer["update_ratio"][::10] = 1e-8
    assert kinds(run) == ["stalled_training"]


# ------------------------------------------------------------------------ on real runs


def sigmoid_net() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(8, 16), nn.Sigmoid()]
    for _ in range(6):
        layers += [nn.Linear(16, 16), nn.Sigmoid()]
    return nn.Sequential(*layers, nn.Linear(16, 3))


def test_findings_survive_the_round_trip(tmp_path: Path) -> None:
    model = sigmoid_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gw.watch(model, opt, out=tmp_path / "run", quiet=True, sample_every=5) as w:
        train(model, opt, 120, on_step=lambda loss: w.log(loss=loss))
    online = [f.to_json() for f in w.findings]
    assert "vanishing_gradients" in [f["kind"] for f in online]
    after = [f.to_json() for f in gw.diagnose(gw.load_run(tmp_path / "run"))]
    stored = json.loads((tmp_path / "run" / "findings.json").read_text())["findings"]
    assert online == after == stored
    assert [f.to_json() for f in gw.load_run(tmp_path / "run").findings] == stored


def test_a_problem_is_announced_once_while_training(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    model = sigmoid_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gw.watch(model, opt, out=tmp_path / "run", flush_every=20, sample_every=5):
        train(model, opt, 80)
        during = capsys.readouterr().err  # before the watch closes
    lines = [line for line in during.splitlines() if "vanishing_gradients" in line]
    assert len(lines) == 1 and "Try: swap_activation(from=Sigmoid, to=ReLU" in lines[0]


@pytest.mark.integration  # the CLI in a subprocess
@pytest.mark.parametrize("case", ["one_step", "zero_grads", "nan_loss", "no_layers"])
def test_degenerate_runs_get_a_finding_or_a_sentence(case: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    model = mlp(depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    if case == "no_layers":
        out.mkdir()
        (out / "meta.json").write_text(json.dumps({"format": 1, "tool": "gradwatch", "layers": [], "streams": []}))
    else:
        with gw.watch(model, opt, out=out, quiet=True, sample_every=1) as w:
            def zero(step: int) -> None:
                if case == "zero_grads":
                    for p in model.parameters():
                        p.grad.zero_()

            def log(loss: torch.Tensor) -> None:
                w.log(loss=float("nan") if case == "nan_loss" else loss)

            train(model, opt, 1 if case == "one_step" else 30, before_step=zero, on_step=log)
    result = subprocess.run([sys.executable, "-m", "gradwatch", "diagnose", str(out)], capture_output=True, text=True)
    assert "Traceback" not in result.stderr
    assert result.returncode == 0, result.stderr
    found = kinds(gw.load_run(out))
    if case == "zero_grads":  # no gradient anywhere, from step 0: an error that says the loss reaches no weight
        f = next(f for f in gw.load_run(out).findings if f.kind == "vanishing_gradients")
        assert f.severity == "error" and f.first_step == 0 and f.evidence["cause"] == "loss_detached", f.summary
        assert "dead_units" not in found, found
        return
    expected = {"one_step": [], "nan_loss": ["nonfinite"], "no_layers": []}[case]
    assert found == expected, found


@pytest.mark.integration  # the CLI in a subprocess
def test_diagnose_json_prints_the_contract_format(tmp_path: Path) -> None:
    model = sigmoid_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gw.watch(model, opt, out=tmp_path / "run", quiet=True, sample_every=5):
        train(model, opt, 60)
    result = subprocess.run([sys.executable, "-m", "gradwatch", "diagnose", "--json", str(tmp_path / "run")],
                            capture_output=True, text=True)
    data = json.loads(result.stdout)
    assert data["format"] == 1
    f = data["findings"][0]
    assert set(f) == {"kind", "severity", "first_step", "last_step", "layers", "summary", "evidence", "remedies"}
    assert set(f["remedies"][0]) == {"action", "args", "why"}


def test_a_remedy_reads_as_the_call_it_stands_for() -> None:
    """One spelling for the terminal, the report and the online line."""
    assert gw.Remedy("clip_norm", {"max_norm": 1.0}).call() == "clip_norm(max_norm=1.0)"
    assert gw.Remedy("swap_activation", {"from": "Sigmoid", "to": "ReLU"}).call() == "swap_activation(from=Sigmoid, to=ReLU)"
    assert gw.Remedy("check_graph").call() == "check_graph()"


def test_nanmedian_is_numpys_on_every_shape_axis_and_special_value() -> None:
    """diagnose.facts.nanmedian (one sort, no masked arrays) gives exactly np.nanmedian: NaN and
    +-inf values, all-NaN and empty slices, every axis."""
    import warnings

    from gradwatch.diagnose.facts import nanmedian

    rng = np.random.default_rng(0)
    compared = 0
    for _ in range(600):
        shape = tuple(int(d) for d in rng.integers(0, 6, size=rng.integers(1, 4)))
        x = rng.normal(size=shape)
        u = rng.random(shape)
        x[u < 0.3], x[u > 0.95], x[(u > 0.9) & (u <= 0.95)] = np.nan, np.inf, -np.inf
        for axis in [None, *range(-x.ndim, x.ndim)]:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                expected = np.nanmedian(x, axis=axis)
            got = nanmedian(x, axis=axis)
            assert np.shape(got) == np.shape(expected)
            np.testing.assert_array_equal(got, expected)
            compared += 1
    assert compared > 2000
