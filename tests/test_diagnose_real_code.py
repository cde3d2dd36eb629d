"""The rules on the classes of failure real users' programs show (short runs, no gradient at all,
output layers, harmless facts, slow divergence, profiles in execution order), on exact series."""

from __future__ import annotations

import numpy as np
import pytest

import gradwatch as gw
from gradwatch.diagnose import rules
from gradwatch.store import LayerInfo
from test_diagnose import FakeRun

SERIOUS = ("warning", "error")


def dense_net(hidden_act: str | None, out_act: str | None, out_units: int = 1, depth: int = 3) -> list[LayerInfo]:
    """Keras-style layers: kernels (in, out) and biases, the last one the output."""
    layers = []
    width = 8
    for k in range(depth):
        last = k == depth - 1
        units = out_units if last else width
        act = out_act if last else hidden_act
        name = f"sequential/dense_{k}"
        layers.append(LayerInfo(f"{name}/kernel", (width, units), width * units, "Dense", act))
        layers.append(LayerInfo(f"{name}/bias", (units,), units, "Dense", act))
    return layers


def fake(n: int, layers: list[LayerInfo], *, loss: str | None = None, order: list[int] | None = None,
         sample: int = 2) -> FakeRun:
    """A run of ``n`` steps, finite and quiet unless changed: every layer gets gradient RMS 0.05, the
    loss falls from 1 to ~0.1, the sampled steps (every ``sample``) update by 1e-3 of the weights."""
    run = FakeRun(n, layers)
    t = np.arange(n)
    run.step["loss"][:] = 0.1 + 0.9 * np.exp(-t / max(1, n / 4))
    run.step["grad_norm"][:] = 1.0
    run.layer["grad_rms"][:] = 0.05
    run.layer["grad_norm"][:] = 0.5
    run.step["sampled"][::sample] = 1
    run.layer["update_ratio"][::sample] = 1e-3
    run.layer["weight_norm"][::sample] = 1.0
    run.layer["grad_zero_frac"][::sample] = 0.0
    info = {"index": 0, "layers": list(range(len(layers)))}
    if loss is not None:
        info["loss"] = loss
    if order is not None:
        info["execution_order"] = order
    run.streams = [info]
    return run


def findings(run: FakeRun) -> dict[str, gw.Finding]:
    return {f.kind: f for f in gw.diagnose(run)}


def serious(run: FakeRun) -> dict[str, gw.Finding]:
    return {k: f for k, f in findings(run).items() if f.severity in SERIOUS}


# ------------------------------------------------------------------------------------ 1. short runs


def test_a_flat_loss_over_30_steps_with_tiny_updates_is_a_stall() -> None:
    run = fake(30, dense_net("ReLU", None), loss="mse")
    run.step["loss"][:] = 0.6931 + 1e-5 * np.arange(30) % 3  # flat to four digits
    run.layer["update_ratio"][::2] = 1e-5 / 3
    f = serious(run)["stalled_training"]
    assert f.evidence["steps_seen"] == 30 and "over 30 steps" in f.summary
    assert abs(f.evidence["improvement"]) < 1e-3


def test_a_short_run_that_learns_is_not_a_stall() -> None:
    run = fake(30, dense_net("ReLU", None), loss="mse")
    assert serious(run) == {}


def test_a_short_deep_sigmoid_run_is_vanishing_with_its_step_count() -> None:
    run = fake(24, dense_net("Sigmoid", "Sigmoid", depth=6), loss="binary_crossentropy")
    kernels = [i for i, layer in enumerate(run.layers) if layer.name.endswith("kernel")]
    for k, i in enumerate(kernels):
        run.layer["grad_rms"][:, i] = 0.05 * 0.25 ** (len(kernels) - 1 - k)
    f = serious(run)["vanishing_gradients"]
    assert f.evidence["steps_seen"] == 24 and "first 24 steps" in f.summary


# ------------------------------------------------------------------------------------ 2. no gradient at all


def _no_gradient(run: FakeRun) -> FakeRun:
    run.step["grad_norm"][:] = 0.0
    run.layer["grad_rms"][:] = 0.0
    run.layer["grad_norm"][:] = 0.0
    run.layer["grad_zero_frac"][::2] = 1.0
    run.layer["update_ratio"][::2] = 0.0
    run.step["loss"][:] = 7.6246
    return run


def test_a_softmax_over_one_unit_is_an_error_at_step_0_naming_the_output_layer() -> None:
    run = _no_gradient(fake(40, dense_net("ReLU", "Softmax"), loss="binary_crossentropy"))
    f = serious(run)["vanishing_gradients"]
    assert f.severity == "error" and f.first_step == 0
    assert "sequential/dense_2/kernel" in f.summary and "softmax over the single unit" in f.summary
    assert f.evidence["cause"] == "softmax_single_unit" and f.evidence["output_units"] == 1
    assert f.remedies[0].action == "change_output" and f.remedies[0].args["activation"] == "sigmoid"
    assert f.layers == ["sequential/dense_2/kernel"]


def test_an_output_pinned_in_its_flat_tail_is_named_as_the_cause() -> None:
    run = _no_gradient(fake(40, dense_net("ReLU", "Sigmoid"), loss="binary_crossentropy"))
    out = [i for i, layer in enumerate(run.layers) if layer.name == "sequential/dense_2/kernel"][0]
    run.layer["act_sat_frac"][::2, out] = 1.0
    f = serious(run)["vanishing_gradients"]
    assert f.evidence["cause"] == "output_saturated" and "Sigmoid is flat for 100%" in f.summary


def test_a_linear_output_under_a_probability_loss_is_the_loss_clipping() -> None:
    run = _no_gradient(fake(40, dense_net("ReLU", None), loss="binary_crossentropy"))
    f = serious(run)["vanishing_gradients"]
    assert f.evidence["cause"] == "probability_loss_on_linear_output"
    assert f.remedies[0].action == "change_loss" and f.remedies[0].args == {"from_logits": True}


def test_no_gradient_without_an_output_cause_blames_the_loss() -> None:
    run = _no_gradient(fake(40, dense_net("ReLU", None), loss="MseLossBackward0"))
    f = serious(run)["vanishing_gradients"]
    assert f.evidence["cause"] == "loss_detached" and "does not depend on the trained weights" in f.summary


def test_gradients_gone_from_some_step_to_the_end_are_no_gradient_from_that_step() -> None:
    run = fake(48, dense_net("ReLU", "Sigmoid"), loss="mse")
    run.step["grad_norm"][11:] = 0.0
    f = rules.no_gradient(run)
    assert f is not None and f.first_step == 11 and "from step 11 to the end (37 of the last 37 steps)" in f.summary
    assert f.evidence["cause"] == "bounded_regression_output"


def test_zero_gradients_on_a_few_steps_are_not_no_gradient() -> None:
    run = fake(40, dense_net("ReLU", None), loss="mse")
    run.step["grad_norm"][20:24] = 0.0  # a handful of steps (frozen batch), then gradients again
    assert rules.no_gradient(run) is None


# ------------------------------------------------------------------------------------ 3./4. saturation and the output layer


def test_hidden_tanh_flat_to_float_precision_is_saturation_with_input_scaling_first() -> None:
    run = fake(40, dense_net("Tanh", "Sigmoid"), loss="binary_crossentropy")
    run.step["loss"][:] = 0.69
    run.layer["grad_zero_frac"][::2, 0] = 1.0  # first kernel: tanh(x) == 1.0 exactly
    run.layer["grad_zero_frac"][::2, 1] = 1.0
    f = serious(run)["saturated_units"]
    assert f.layers[0] == "sequential/dense_0/kernel" and "exactly zero" in f.summary
    assert f.remedies[0].action == "scale_inputs"


def test_a_bounded_output_for_regression_says_so_and_ranks_the_output_fix_first() -> None:
    run = fake(40, dense_net("ReLU", "Sigmoid"), loss="mean_squared_error")
    run.step["loss"][:] = 9801.0 - np.arange(40) * 0.01
    out = [i for i, layer in enumerate(run.layers) if layer.name == "sequential/dense_2/kernel"][0]
    run.layer["act_sat_frac"][::2, out] = 0.97
    f = serious(run)["saturated_units"]
    assert f.layers == ["sequential/dense_2/kernel"] and f.severity == "error"
    assert "can only reach [0, 1]" in f.summary and "97%" in f.summary
    assert [r.action for r in f.remedies[:2]] == ["change_output", "scale_targets"]


def test_sigmoid_outputs_with_categorical_crossentropy_that_do_not_learn() -> None:
    run = fake(40, dense_net("ReLU", "Sigmoid", out_units=4), loss="categorical_crossentropy")
    run.step["loss"][:] = 1.38 - 0.0005 * np.arange(40)
    f = serious(run)["stalled_training"]
    assert f.evidence["cause"] == "sigmoid_categorical" and f.remedies[0].args == {"activation": "softmax"}


# ------------------------------------------------------------------------------------ 5. harmless facts are info


def test_the_output_sigmoid_does_not_lower_the_vanishing_bar() -> None:
    run = fake(200, dense_net("ReLU", "Sigmoid"), loss="binary_crossentropy")
    run.layer["grad_rms"][:, 0] = 0.05 * 0.05  # 5% of the output's: fine for a ReLU net
    assert "vanishing_gradients" not in serious(run)


def test_half_a_relu_layer_inactive_while_the_loss_falls_well_is_info_saying_why() -> None:
    run = fake(60, dense_net("ReLU", "Sigmoid"), loss="binary_crossentropy")
    run.layer["act_dead_frac"][::2, 0] = 0.5
    f = findings(run)["dead_units"]
    assert f.severity == "info" and "harmless" in f.evidence and "lower" in f.evidence["harmless"]


def test_half_a_relu_layer_dead_while_the_loss_is_stuck_is_a_warning() -> None:
    run = fake(60, dense_net("ReLU", "Sigmoid"), loss="binary_crossentropy")
    run.layer["act_dead_frac"][::2, 0] = 0.6
    run.step["loss"][:] = 0.69 - 0.001 * np.arange(60)
    assert serious(run)["dead_units"].severity == "warning"


# ------------------------------------------------------------------------------------ 6. slow divergence


def test_the_issue_slow_divergence_is_flagged_20_steps_before_the_nan() -> None:
    """The real-code case: the norm goes 2 -> 7 -> 24 over steps 360-400 and is NaN at 409."""
    n = 420
    run = fake(n, dense_net("ReLU", None), loss="mse")
    rng = np.random.default_rng(0)
    norm = 2.0 * np.exp(rng.normal(0, 0.25, n))
    t = np.arange(360, 409)
    norm[360:409] *= np.exp(np.log(12) * (t - 360) / 40)  # 2 -> 7 at 380 -> 24 at 400
    norm[409:] = np.nan
    run.step["grad_norm"][:] = norm
    run.step["loss"][:] = 0.3 + 0.05 * rng.random(n)
    run.step["loss"][409:] = np.nan
    run.layer["grad_nonfinite"][409:] = 1
    f = serious(run)["exploding_gradients"]
    assert f.first_step <= 409 - 20, f.summary
    assert f.evidence["sustained_rise_step"] == f.first_step and "rising exponentially" in f.summary


@pytest.mark.parametrize("shape", ["warmup", "restart", "noise", "spike"])
def test_healthy_norm_shapes_do_not_trip_the_early_warning(shape: str) -> None:
    n = 400
    run = fake(n, dense_net("ReLU", None), loss="mse")
    rng = np.random.default_rng(1)
    t = np.arange(n)
    noise = np.exp(rng.normal(0, 0.4 if shape == "noise" else 0.1, n))
    if shape == "warmup":  # the norm climbs with a linear warm-up for 100 steps, then settles
        norm = (0.2 + 1.8 * np.minimum(t, 100) / 100) * noise
    elif shape == "restart":  # cosine schedule restarted every 60 steps: a jump, then decay
        norm = (0.3 + 2.0 * (1 + np.cos(np.pi * (t % 60) / 60)) / 2) * noise
    elif shape == "noise":
        norm = 1.0 * noise
    else:  # a transient spike that the run recovers from
        norm = 0.5 * noise
        norm[200:212] *= np.geomspace(1, 8, 12)
    run.step["grad_norm"][:] = norm
    run.step["loss"][:] = 0.5 + 0.1 * rng.random(n)
    assert rules.sustained_rise(norm.astype(np.float64), run.step["loss"].astype(np.float64)) is None


# ------------------------------------------------------------------------------------ 7. what the sentence says


def test_seed000_profile_with_a_starved_second_layer_is_vanishing_and_says_which() -> None:
    layers = dense_net("Sigmoid", "Sigmoid", depth=4)
    run = fake(100, layers, loss="binary_crossentropy")
    kernels = [i for i, layer in enumerate(layers) if layer.name.endswith("kernel")]
    for i, r in zip(kernels, [0.25, 0.0853, 0.208, 1.0]):  # seed 000's torch run, early
        run.layer["grad_rms"][:, i] = 0.05 * r
    f = serious(run)["vanishing_gradients"]
    assert ("sequential/dense_1/kernel gets 0.0853x" in f.summary
            and "input-side layer sequential/dense_0/kernel 0.25x" in f.summary)


def test_a_dip_in_the_middle_with_full_gradient_at_the_input_is_not_vanishing() -> None:
    layers = dense_net("Sigmoid", "Sigmoid", depth=6)
    run = fake(100, layers, loss="binary_crossentropy")
    kernels = [i for i, layer in enumerate(layers) if layer.name.endswith("kernel")]
    rel = [1.21, 0.9, 0.085, 0.4, 0.8, 1.0]
    for i, r in zip(kernels, rel):
        run.layer["grad_rms"][:, i] = 0.05 * r
    fs = findings(run)
    f = fs["vanishing_gradients"]
    assert f.severity == "info" and "not vanishing" in f.summary
    assert "sequential/dense_2/kernel gets 0.085x" in f.summary and "sequential/dense_0/kernel gets 1.21x" in f.summary


def test_a_vanishing_sentence_quotes_the_layer_and_number_that_triggered_it() -> None:
    layers = dense_net("Sigmoid", "Sigmoid", depth=4)
    run = fake(100, layers, loss="binary_crossentropy")
    kernels = [i for i, layer in enumerate(layers) if layer.name.endswith("kernel")]
    for i, r in zip(kernels, [0.02, 0.004, 0.3, 1.0]):
        run.layer["grad_rms"][:, i] = 0.05 * r
    f = serious(run)["vanishing_gradients"]
    assert f.summary.startswith("vanishing_gradients in the first 100 steps: sequential/dense_1/kernel gets 0.004x "
                                "the gradient RMS of the output layer sequential/dense_3/kernel (threshold 0.1)")
    assert "input-side layer sequential/dense_0/kernel 0.02x" in f.summary
    assert f.evidence["input_relative_rms"] == pytest.approx(0.02, rel=1e-3)


def test_the_profile_follows_execution_order_not_creation_order() -> None:
    # Created a, b, c; the forward runs c, a, b: b is the output layer, c the input side.
    layers = [LayerInfo(f"{k}/kernel", (8, 8), 64, "Dense", "Sigmoid") for k in "abc"]
    run = fake(100, layers, loss="mse", order=[2, 0, 1])
    run.layer["grad_rms"][:, 2] = 0.05 * 0.02  # c: the input side, starved
    run.layer["grad_rms"][:, 0] = 0.05 * 0.3
    run.layer["grad_rms"][:, 1] = 0.05
    f = serious(run)["vanishing_gradients"]
    assert f.evidence["reference_layer"] == "b/kernel" and f.evidence["input_layer"] == "c/kernel"
    assert f.evidence["order"] == "execution"
    # The same numbers read in creation order would call c the output: nothing starved.
    plain = fake(100, layers, loss="mse")
    plain.layer["grad_rms"][:] = run.layer["grad_rms"]
    assert "vanishing_gradients" not in serious(plain)


def test_layers_the_tap_does_not_see_keep_their_place_in_the_profile() -> None:
    from gradwatch.diagnose.facts import streams

    names = ["lstm.weight_ih_l0", "lstm.weight_hh_l0", "lstm.weight_ih_l1", "lstm.weight_hh_l1", "head.weight", "proj.weight"]
    layers = [LayerInfo(n, (8, 8), 64, "LSTM" if n.startswith("lstm") else "Linear", None) for n in names]
    # The forward runs proj, then the LSTM (untapped), then head; proj was created last.
    run = fake(10, layers, order=[5, 4])
    assert [layers[i].name for i in streams(run)[0]] == [
        "lstm.weight_ih_l0", "lstm.weight_hh_l0", "lstm.weight_ih_l1", "lstm.weight_hh_l1", "proj.weight", "head.weight"]


# ------------------------------------------------------------------------------------ parameters the loss never reaches


def test_weights_that_never_get_a_gradient_are_named_with_their_share() -> None:
    layers = [LayerInfo("offset", (1,), 1, "Regressor", None)] + dense_net("ReLU", None, depth=2)
    run = fake(64, layers, loss="MseLossBackward0")
    run.layer["grad_nonfinite"][:, 1:] = np.nan  # .grad stayed None: the output was detached
    run.layer["grad_rms"][:, 1:] = np.nan
    f = serious(run)["vanishing_gradients"]
    assert f.severity == "error" and f.evidence["cause"] == "no_gradient_path"
    assert (f.layers == ["sequential/dense_0/kernel", "sequential/dense_1/kernel"]
            and "never receive a gradient in 64 steps" in f.summary)
    assert f.remedies[0].action == "check_graph"


def test_a_small_unused_part_of_the_model_is_info() -> None:
    layers = dense_net("ReLU", None, depth=3) + [LayerInfo("pooler/kernel", (2, 2), 4, "Dense", "Tanh")]
    run = fake(64, layers, loss="mse")
    run.layer["grad_nonfinite"][:, -1] = np.nan
    f = findings(run)["vanishing_gradients"]
    assert f.severity == "info" and f.layers == ["pooler/kernel"]


def test_every_finding_says_how_many_steps_it_saw() -> None:
    run = fake(60, dense_net("ReLU", "Sigmoid"), loss="binary_crossentropy")
    run.layer["act_dead_frac"][::2, 0] = 0.6
    run.step["loss"][:] = 0.69 - 0.001 * np.arange(60)
    run.step["loss"][40] = 50.0
    run.step["grad_norm"][50:] = np.nan
    run.layer["grad_nonfinite"][50:] = 1
    fs = gw.diagnose(run)
    assert {"dead_units", "nonfinite", "loss_spike"} <= {f.kind for f in fs}
    assert all(f.evidence.get("steps_seen") == 60 for f in fs), [(f.kind, f.evidence.get("steps_seen")) for f in fs]
