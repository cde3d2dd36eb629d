"""The Keras program matrix: small, standalone Keras 3 training scripts of the kind people post when
their training fails (and their fixed or simply healthy counterparts), each recorded under
gradwatch's zero-code runner (``gradwatch run prog.py``, here in-process).

Every program lives in ``tests/keras_programs/<name>.py`` and runs on its own:
``KERAS_BACKEND=torch python tests/keras_programs/<name>.py``. Each is seeded
(``keras.utils.set_random_seed``), builds its data in the script (numpy tables, ``sklearn.datasets``;
nothing is downloaded) and trains for 20-60 optimizer steps, a few hundred for the slow-divergence
class.

This module registers them: ``PROGRAMS[name]`` says which finding a correct diagnosis raises
(``expect``; None for a healthy program), which other kinds would also be a correct diagnosis of
the same problem (``alternatives``), which class of the issue it exercises (``cls``):

1. short runs (20-60 steps, the signal total): stalls, a deep sigmoid net;
2. no gradient at all, exactly zero from step 0;
3. Keras saturation: tanh/sigmoid/softmax fed inputs or logits in the hundreds;
4. output-layer pathologies: outputs that cannot reach the targets, constant outputs;
5. healthy programs that must not be warned about;
6. slow divergence (a learning rate growing ~1.5% per step) and healthy schedules;
7. deep models with a gradient dip in the middle, layers created in one order and called in another;

and ``check_behaviour(run)``: asserts, from the recorded run only (never from gradwatch's
diagnosis), that the program really has the problem it claims, or really is healthy.

``record(name, out_dir)`` runs one program in this process (Keras is imported once for all of
them) and returns its run directory. ``python tests/keras_matrix.py [NAME ...]`` records the
programs, checks their behaviour and prints the current diagnosis of each.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

import numpy as np

os.environ.setdefault("KERAS_BACKEND", "torch")

import gradwatch as gw  # noqa: E402

PROGRAM_DIR = Path(__file__).resolve().parent / "keras_programs"

#: The finding kinds a program may expect.
KINDS = ("vanishing_gradients", "exploding_gradients", "nonfinite", "dead_units", "saturated_units",
         "loss_spike", "stalled_training")


# ------------------------------------------------------------------------------------ reading a run


def _f64(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def loss(run: gw.Run) -> np.ndarray:
    return _f64(run.step_series("loss"))


def grad_norm(run: gw.Run) -> np.ndarray:
    return _f64(run.step_series("grad_norm"))


def first_nonfinite(x: np.ndarray) -> int | None:
    bad = ~np.isfinite(x)
    return int(np.argmax(bad)) if bad.any() else None


def layer(run: gw.Run, suffix: str) -> int:
    """Index of the one layer whose name ends with ``suffix`` (e.g. ``"dense/kernel"``, ``"fc1/kernel"``)."""
    hits = [i for i, info in enumerate(run.layers) if info.name == suffix or info.name.endswith("/" + suffix)]
    assert len(hits) == 1, f"{len(hits)} layers end with {suffix!r}: {[info.name for info in run.layers]}"
    return hits[0]


def kernels(run: gw.Run) -> list[int]:
    """The weight matrices (rank >= 2), in the order the run lists them."""
    return [i for i, info in enumerate(run.layers) if len(info.shape) >= 2]


def series(run: gw.Run, metric: str, suffix: str, sampled: bool = False) -> np.ndarray:
    """One layer's per-step ``metric``; with ``sampled``, only the steps where it was computed."""
    x = _f64(run.layer_series(metric)[:, layer(run, suffix)])
    return x[~np.isnan(x)] if sampled else x


def median_rms(run: gw.Run, suffix: str, steps: slice = slice(None)) -> float:
    return float(np.median(series(run, "grad_rms", suffix)[steps]))


def ends(x: np.ndarray, frac: float = 0.1) -> tuple[float, float]:
    """Median of the first and of the last ``frac`` of ``x`` (at least one value each)."""
    k = max(1, int(len(x) * frac))
    return float(np.median(x[:k])), float(np.median(x[-k:]))


# ------------------------------------------------------------------------------------ behaviour checks
#
# Each returns None or raises AssertionError with one sentence on what the run does instead.


def check_finite(run: gw.Run) -> None:
    for metric in ("loss", "grad_norm"):
        x = run.step_series(metric)
        bad = first_nonfinite(x)
        assert bad is None, f"{metric} is not finite at step {bad}"


def check_healthy(run: gw.Run, falls_to: float = 0.5, max_growth: float = 20.0) -> None:
    """Finite throughout, the loss falls clearly (the last tenth's median below ``falls_to`` of the
    first tenth's), no layer's gradient is exactly zero for the whole run, and the gradient norm
    never rises above ``max_growth`` times its median over the first ten steps."""
    check_finite(run)
    first, last = ends(loss(run))
    assert last < falls_to * first, f"the loss fell only from {first:.4g} to {last:.4g} (needed < {falls_to:g}x)"
    rms = _f64(run.layer_series("grad_rms"))
    for i in kernels(run):
        assert np.any(rms[:, i] > 0), f"{run.layers[i].name} never gets a gradient"
    g = grad_norm(run)
    early = float(np.median(g[:10]))
    assert g.max() < max_growth * early, f"the gradient norm peaked at {g.max():.3g}, {g.max() / early:.3g}x its early median"


def check_no_gradient(run: gw.Run, from_step: int = 0, only: Sequence[str] | None = None, frozen: bool = True) -> None:
    """Every gradient (or those of the layers ending with ``only``) is exactly zero at every step from
    ``from_step`` on; with ``frozen``, the weights they belong to never change there either (true
    from step 0; after a gradient has been seen, Adam's momentum keeps moving the weights for a
    while). The loss stays finite."""
    check_finite(run)
    rms = _f64(run.layer_series("grad_rms"))[from_step:]
    ids = range(len(run.layers)) if only is None else [layer(run, s) for s in only]
    for i in ids:
        nz = np.flatnonzero(rms[:, i] != 0)
        assert not len(nz), f"{run.layers[i].name} has a non-zero gradient at step {from_step + nz[0]}"
    if frozen:
        w = _f64(run.layer_series("weight_norm"))
        rows = np.flatnonzero(run.steps >= from_step)
        for i in ids:
            wi = w[rows, i]
            wi = wi[~np.isnan(wi)]
            assert not len(wi) or np.ptp(wi) == 0, f"{run.layers[i].name}'s weights moved after step {from_step}"
    if only is None:
        assert np.all(grad_norm(run)[from_step:] == 0), "the global gradient norm is not zero"


def check_dies(run: gw.Run, by_step: int) -> None:
    """Training has a gradient at first, then every gradient is exactly zero from ``by_step`` on."""
    assert grad_norm(run)[0] > 0, "there is no gradient even at step 0 (this program should die during training)"
    check_no_gradient(run, from_step=by_step, frozen=False)


def check_stall(run: gw.Run, steps_per_epoch: int, max_update: float = 1e-5, max_change: float = 1e-3) -> None:
    """A stall with gradients present: every weight matrix moves less than ``max_update`` of its
    size per step, the epoch-mean loss changes by less than ``max_change`` (relative) from the first
    epoch to the last, and the gradient itself is of ordinary size (not zero)."""
    check_finite(run)
    g = grad_norm(run)
    assert np.median(g) > 1e-2, f"the gradient norm is tiny ({np.median(g):.3g}): that is not a learning-rate stall"
    for i in kernels(run):
        u = _f64(run.layer_series("update_ratio")[:, i])
        u = u[~np.isnan(u)]
        assert np.median(u) < max_update, f"{run.layers[i].name} moves {np.median(u):.3g} of its size per step"
    lo = loss(run)
    first, last = lo[:steps_per_epoch].mean(), lo[-steps_per_epoch:].mean()
    change = abs(last - first) / abs(first)
    assert change < max_change, f"the epoch-mean loss changed by {change:.3g} ({first:.6g} -> {last:.6g})"


def check_vanishing(run: gw.Run, input_side: str, output_side: str, below: float = 1e-2, stuck: float | None = None) -> None:
    """The input-side weight layer gets less than ``below`` of the output-side one's gradient RMS
    (medians over the run); with ``stuck``, the loss's last tenth stays above ``stuck`` times the
    first tenth (it did not learn)."""
    check_finite(run)
    ratio = median_rms(run, input_side) / median_rms(run, output_side)
    assert ratio < below, f"{input_side} gets {ratio:.3g} of {output_side}'s gradient RMS (needed < {below:g})"
    if stuck is not None:
        first, last = ends(loss(run))
        assert last > stuck * first, f"the loss fell from {first:.4g} to {last:.4g}: it learned"


def check_diverges(run: gw.Run, lo: int, hi: int, lr_growth: float = 20.0, norm_growth: float = 5.0) -> None:
    """A slow divergence: the loss and the gradient norm stay finite until a step in [lo, hi], after
    which the gradient norm is non-finite for good; by then the learning rate has grown more than
    ``lr_growth``-fold; and the gradient norm rose gradually before it: its median over the 30
    steps before the blow-up is above ``norm_growth`` times the lowest 50-step median of the run,
    and the 50 steps that end 80 steps before the blow-up are already 1.25x above that lowest (a
    rise over a hundred steps and more, not one bad batch)."""
    g = grad_norm(run)
    found = [b for b in (first_nonfinite(g), first_nonfinite(loss(run))) if b is not None]
    assert found, f"the loss and the gradient norm stayed finite for all {len(g)} steps (max norm {np.nanmax(g):.3g})"
    bad = min(found)
    assert lo <= bad <= hi, f"the run turned non-finite at step {bad}, not in [{lo}, {hi}]"
    assert np.all(~np.isfinite(g[max(found):])), "the gradient norm came back to finite values after the blow-up"
    lr = _f64(run.step_series("lr"))
    assert lr[bad - 1] > lr_growth * lr[0], f"the learning rate grew only {lr[bad - 1] / lr[0]:.3g}x"
    lowest = min(np.median(g[i : i + 50]) for i in range(0, bad - 80, 10))
    before = float(np.median(g[bad - 30 : bad]))
    assert before > norm_growth * lowest, (
        f"the gradient norm's median before step {bad} is {before:.3g}, only {before / lowest:.3g}x its lowest ({lowest:.3g})"
    )
    earlier = float(np.median(g[bad - 130 : bad - 80]))
    assert earlier > 1.25 * lowest, (
        f"no gradual rise: 80-130 steps before the blow-up the norm was {earlier / lowest:.3g}x its lowest"
    )


def check_zero_frac(run: gw.Run, suffix: str, lo: float, hi: float, tail: float = 0.5) -> None:
    """``suffix``'s sampled ``grad_zero_frac`` over the last ``tail`` of the samples has a median in [lo, hi]."""
    z = series(run, "grad_zero_frac", suffix, sampled=True)
    z = z[int(len(z) * (1 - tail)) :]
    m = float(np.median(z))
    assert lo <= m <= hi, f"{suffix}: median grad_zero_frac {m:.3g} not in [{lo}, {hi}]"


def check_healthy_tail(run: gw.Run, learners: Sequence[str]) -> None:
    """The layers in ``learners`` get a non-zero gradient at every step, and the loss falls."""
    rms = _f64(run.layer_series("grad_rms"))
    for s in learners:
        assert np.all(rms[:, layer(run, s)] > 0), f"{s} has a step without gradient"
    first, last = ends(loss(run))
    assert last < first, f"the loss did not fall ({first:.4g} -> {last:.4g})"


def check_ratio(run: gw.Run, small: str, big: str, below: float) -> None:
    ratio = median_rms(run, small) / median_rms(run, big)
    assert ratio < below, f"{small} gets {ratio:.3g} of {big}'s gradient RMS (needed < {below:g})"


def check_loss_falls_less_than(run: gw.Run, frac: float) -> None:
    """The loss's last tenth stays above ``1 - frac`` of its first tenth (at most a ``frac`` fall)."""
    first, last = ends(loss(run))
    assert last > (1 - frac) * first, f"the loss fell from {first:.4g} to {last:.4g}, more than {frac:.0%}"


def check_dip(run: gw.Run, input_side: str, middle: Sequence[str], output_side: str) -> None:
    """The gradient reaches the input side (its RMS at least 30% of the output side's) while one of
    the ``middle`` layers gets less than a fifth of the input side's: a dip, not vanishing."""
    inp, out = median_rms(run, input_side), median_rms(run, output_side)
    assert inp > 0.3 * out, f"{input_side} gets only {inp / out:.3g} of {output_side}'s gradient RMS"
    low = min(median_rms(run, m) for m in middle)
    assert low < 0.2 * inp, f"no dip: the middle layers get at least {low / inp:.3g} of the input side's gradient RMS"


def check_listed_first(run: gw.Run, suffix: str) -> None:
    assert run.layers[0].name.endswith("/" + suffix), (
        f"expected the run to list {suffix} first (creation order); it lists {run.layers[0].name} first"
    )


def all_of(*checks: Callable[[gw.Run], None]) -> Callable[[gw.Run], None]:
    def check(run: gw.Run) -> None:
        for c in checks:
            c(run)

    return check


# ------------------------------------------------------------------------------------ the programs


@dataclass(frozen=True)
class Program:
    """One Keras program of the matrix.

    Attributes:
        name: the script's name in ``tests/keras_programs`` (without ``.py``) and the test id.
        cls: the issue's class (1-7) it exercises.
        expect: the finding kind a correct diagnosis raises at warning or error; None when healthy.
        alternatives: other kinds that would also be a correct diagnosis of the same problem.
        what: one line for a docs table.
        check: asserts the recorded run has the problem (or is healthy); see ``check_behaviour``.
        notes: anything else worth knowing (read by people, not by tests).
    """

    name: str
    cls: int
    expect: str | None
    what: str
    check: Callable[[gw.Run], None]
    alternatives: tuple[str, ...] = ()
    notes: str = ""

    @property
    def path(self) -> Path:
        return PROGRAM_DIR / f"{self.name}.py"

    @property
    def healthy(self) -> bool:
        return self.expect is None

    @property
    def accepted(self) -> tuple[str, ...]:
        """Every kind that counts as a correct diagnosis (``expect`` first)."""
        return (self.expect, *self.alternatives) if self.expect else ()

    def check_behaviour(self, run: gw.Run) -> None:
        """Assert, from the recorded run only, that the program really does what it claims."""
        try:
            self.check(run)
        except AssertionError as e:
            raise AssertionError(f"{self.name}: {e}") from None


_PROGRAMS = [
    # ---------------------------------------------------------------- 1. short runs
    Program(
        "stall_sgd_tiny_lr", 1, "stalled_training",
        "churn MLP, SGD(1e-6), full batch, 30 steps: loss 0.67999 throughout, updates ~1e-7 of the weights",
        lambda r: check_stall(r, steps_per_epoch=1),
    ),
    Program(
        "stall_adam_tiny_lr_regression", 1, "stalled_training",
        "house-price MLP, Adam(1e-7), 48 steps of 60-row batches: epoch loss flat to 4 digits, updates ~3e-7",
        lambda r: check_stall(r, steps_per_epoch=4),
        notes="minibatches: the per-step loss jumps by +-30% (batch to batch) while the epoch mean is flat",
    ),
    Program(
        "short_deep_sigmoid", 1, "vanishing_gradients",
        "8 Dense+Activation('sigmoid') layers on circles, SGD(0.5), 40 steps: first layer gets ~1e-6 of the last's gradient",
        lambda r: check_vanishing(r, "dense/kernel", "dense_8/kernel", below=1e-3, stuck=0.8),
        alternatives=("stalled_training",),
        notes="separate Activation layers: the Dense layers' own activation is None in the layer table",
    ),
    # ---------------------------------------------------------------- 2. no gradient at all
    Program(
        "softmax_one_unit_bce", 2, "vanishing_gradients",
        "Dense(1, activation='softmax') + binary_crossentropy: output constant 1.0, every gradient exactly 0",
        check_no_gradient,
        alternatives=("stalled_training", "saturated_units"),
    ),
    Program(
        "sigmoid_unscaled_bce", 2, "vanishing_gradients",
        "loan table in raw units (incomes ~5e4) -> relu -> sigmoid; sigmoid exactly 0/1, BCE's clip passes nothing back",
        check_no_gradient,
        alternatives=("stalled_training", "saturated_units", "dead_units"),
        notes="the hidden ReLU units whose weights are negative are dead too; the live ones feed a saturated sigmoid",
    ),
    Program(
        "relu_output_dead_at_init", 2, "vanishing_gradients",
        "delivery-time regression on raw features with a relu output never positive for any row: predictions 0, no gradient",
        check_no_gradient,
        alternatives=("dead_units", "stalled_training"),
    ),
    # ---------------------------------------------------------------- 3. Keras saturation
    Program(
        "tanh_unscaled_inputs", 3, "saturated_units",
        "raw meter readings (in the thousands) into Dense+Activation('tanh'): first layer's gradient exactly 0, "
        "later layers learn",
        all_of(
            lambda r: check_no_gradient(r, only=["dense/kernel", "dense/bias"]),
            lambda r: check_zero_frac(r, "dense/kernel", 1.0, 1.0, tail=1.0),
            lambda r: check_zero_frac(r, "dense_1/kernel", 0.0, 0.05, tail=1.0),
            lambda r: check_zero_frac(r, "dense_2/kernel", 0.0, 0.05, tail=1.0),
            lambda r: check_healthy_tail(r, ["dense_1/kernel", "dense_2/kernel"]),
        ),
        alternatives=("vanishing_gradients",),
    ),
    Program(
        "softmax_huge_logits", 3, "saturated_units",
        "digits MLP with RandomNormal(stddev=20) kernels: softmax inputs in the hundreds, hard one-hot outputs, zero gradient",
        check_no_gradient,
        alternatives=("vanishing_gradients", "stalled_training"),
        notes="the clip in categorical_crossentropy turns the saturated softmax into exactly zero gradient everywhere",
    ),
    Program(
        "sigmoid_raw_pixels", 3, "saturated_units",
        "digits as raw 0-255 pixels into Dense(16, sigmoid): its bias gets ~1% of the output layer's gradient; 40% vs 76% scaled",
        all_of(
            check_finite,
            lambda r: check_ratio(r, "dense/bias", "dense_1/bias", below=0.03),
            lambda r: check_loss_falls_less_than(r, 0.3),
        ),
        alternatives=("vanishing_gradients",),
        notes="saturated sigmoid slopes are exactly zero only on the positive side; the kernel's gradient is not "
        "small (the inputs are in the hundreds), the bias's is; about 28% of the kernel's entries are exactly zero "
        "because the digits' border pixels are always blank, not because of saturation. With scaled pixels "
        "(sigmoid_scaled_pixels) the same bias ratio is ~0.2",
    ),
    # ---------------------------------------------------------------- 4. output-layer pathologies
    Program(
        "sigmoid_output_price_regression", 4, "vanishing_gradients",
        "car prices ~60-140 with a sigmoid output and MSE: output pinned at 1.0 by step 11, every gradient 0 after, MSE ~1e4",
        lambda r: check_dies(r, by_step=12),
        alternatives=("saturated_units", "stalled_training"),
        notes="Adam(0.05) also kills about half of the second hidden layer's ReLUs on the way",
    ),
    Program(
        "relu_output_negative_targets", 4, "dead_units",
        "temperature changes (mostly negative) with a relu output: MSE drives the output unit dead by step ~4, loss frozen",
        lambda r: check_dies(r, by_step=10),
        alternatives=("vanishing_gradients", "stalled_training"),
    ),
    Program(
        "zeros_init_constant_output", 4, "dead_units",
        "wine classifier with kernel_initializer='zeros': ReLUs all at exactly 0, only the output bias learns, constant output",
        all_of(
            lambda r: check_no_gradient(r, only=["dense/kernel", "dense/bias", "dense_1/kernel", "dense_1/bias",
                                                 "dense_2/kernel"]),
            lambda r: check_loss_falls_less_than(r, 0.9),
        ),
        alternatives=("vanishing_gradients", "stalled_training"),
        notes="the loss does fall a little (1.099 -> ~1.07): the output bias learns the class frequencies",
    ),
    # ---------------------------------------------------------------- 5. healthy
    Program(
        "binary_sigmoid_output", 5, None,
        "breast-cancer classifier, sigmoid output + BCE, scaled inputs, 54 steps: 98.6% accuracy",
        lambda r: check_healthy(r, falls_to=0.3),
    ),
    Program(
        "relu_half_inactive", 5, None,
        "digits MLP, 128 ReLUs, Adam(0.05): ~55% of the hidden units stop firing, still 97-98% accuracy",
        all_of(
            lambda r: check_healthy(r, falls_to=0.1, max_growth=5),
            lambda r: check_zero_frac(r, "dense/bias", 0.3, 0.8),
        ),
        notes="dead units a finding may mention (info) but must not warn about: the loss falls 96%",
    ),
    Program(
        "sigmoid_output_onehot_cce", 5, None,
        "iris, sigmoid output + categorical_crossentropy on one-hot targets: learns (97%) because Keras' CCE normalises",
        lambda r: check_healthy(r, falls_to=0.3),
        notes="listed in the issue as an output/loss pair that cannot learn; on Keras 3 it does learn: "
        "categorical_crossentropy divides the outputs by their sum before the log",
    ),
    Program(
        "tanh_scaled_inputs", 5, None,
        "tanh_unscaled_inputs with StandardScaler on the inputs: every layer learns, MSE 0.26 -> 0.01",
        lambda r: check_healthy(r, falls_to=0.1),
    ),
    Program(
        "softmax_digits", 5, None,
        "softmax_huge_logits with the default initialiser and Adam(0.01): 95% after 40 steps",
        lambda r: check_healthy(r, falls_to=0.3),
    ),
    Program(
        "price_regression_linear_output", 5, None,
        "sigmoid_output_price_regression with a linear output: MSE 1.1e4 -> ~400 in 48 steps on unscaled prices",
        lambda r: check_healthy(r, falls_to=0.1, max_growth=20),
        notes="unscaled targets: the gradient norm rises ~3x while the output layer scales up; about half the second "
        "layer's ReLUs die (info at most)",
    ),
    Program(
        "sigmoid_scaled_pixels", 5, None,
        "sigmoid_raw_pixels with the pixels scaled to [0, 1]: a slow but ordinary sigmoid net, 76% after 40 steps",
        lambda r: check_healthy(r, falls_to=0.75, max_growth=3),
        notes="a shallow sigmoid net with Adam learns steadily but not fast: the loss falls ~35% in 40 steps",
    ),
    Program(
        "short_full_batch", 5, None,
        "stall_sgd_tiny_lr with Adam(0.05): 30 full-batch steps, loss 0.68 -> 0.455 (the data are noisy; 78% accuracy)",
        lambda r: check_healthy(r, falls_to=0.75),
    ),
    # ---------------------------------------------------------------- 6. slow divergence and healthy schedules
    Program(
        "growing_lr_schedule", 6, "exploding_gradients",
        "a LearningRateSchedule returning lr0 * 1.015**step (uncapped warm-up), SGD: grad norm rises from step ~250, NaN at 400",
        lambda r: check_diverges(r, 300, 450),
        alternatives=("nonfinite", "loss_spike"),
    ),
    Program(
        "exponential_decay_rate_above_one", 6, "exploding_gradients",
        "ExponentialDecay(2.5e-3, decay_rate=1.16 per 10 steps) + SGD, tanh MLP: grad norm climbs from step ~200, NaN at 416",
        lambda r: check_diverges(r, 300, 450),
        alternatives=("nonfinite", "loss_spike"),
    ),
    Program(
        "warmup_then_decay", 6, None,
        "growing_lr_schedule's fix: linear warm-up to 0.05 over 60 steps, linear decay to 0 at step 400",
        lambda r: check_healthy(r, falls_to=0.1, max_growth=3),
    ),
    Program(
        "cosine_restarts", 6, None,
        "sales regression with CosineDecayRestarts(0.02, 96 steps, m_mul 0.9) + SGD(momentum 0.9), 384 steps",
        lambda r: check_healthy(r, falls_to=0.7, max_growth=3),
        notes="converges within the first tenth of the run (MSE 1.6 -> 0.2), then creeps to the noise floor ~0.14",
    ),
    Program(
        "noisy_small_batches", 6, None,
        "batch_size=4 on a noisy-label table with Dropout, 300 steps: per-step loss jumps around, falls overall (91%)",
        lambda r: check_healthy(r, falls_to=0.6, max_growth=5),
    ),
    # ---------------------------------------------------------------- 7. deep models, layer order
    Program(
        "deep18_bn_mixed", 7, None,
        "18 Dense+BatchNorm layers alternating tanh/sigmoid, one 256-wide: gradient dips ~10x mid-stack, full at the input",
        all_of(
            lambda r: check_healthy(r, falls_to=0.5, max_growth=5),
            lambda r: check_dip(r, "fc1/kernel", ["fc9/kernel", "fc10/kernel"], "out/kernel"),
        ),
        notes="the Dense biases before BatchNorm get ~1e-9 gradients (BatchNorm cancels them): legitimately near zero",
    ),
    Program(
        "functional_call_order", 7, None,
        "functional API: Dense blocks created as a list, called in the order 2, 0, 3, 1; 97% after 60 steps",
        lambda r: check_healthy(r, falls_to=0.5),
        notes="Keras lists a functional model's layers in call order, so the layer table reads stem, block_2, block_0, ...",
    ),
    Program(
        "residual_tanh", 7, None,
        "6 residual tanh blocks with LayerNormalization and Add skips (functional), 40 steps: 99% on moons",
        lambda r: check_healthy(r, falls_to=0.2, max_growth=5),
    ),
    Program(
        "subclassed_reversed_sigmoid", 7, "vanishing_gradients",
        "subclassed 8-layer sigmoid net whose layers are created head-first: variables listed output side first; vanishes",
        all_of(
            lambda r: check_listed_first(r, "head/kernel"),
            lambda r: check_vanishing(r, "h1/kernel", "head/kernel", below=1e-3, stuck=0.8),
        ),
        alternatives=("stalled_training",),
    ),
]


PROGRAMS: dict[str, Program] = {p.name: p for p in _PROGRAMS}


def check_behaviour(name: str, run: gw.Run) -> None:
    PROGRAMS[name].check_behaviour(run)


# ------------------------------------------------------------------------------------ recording


def record(name: str, out_dir: str | os.PathLike[str], *, stdout: TextIO | None = None, **watch_options: Any) -> Path:
    """Run program ``name`` in this process under gradwatch's zero-code runner (as ``gradwatch run``
    would) and return its run directory.

    The program's printout goes to ``stdout`` (default: discarded). ``watch_options`` go to
    :class:`gradwatch.Watch` (``sample_every``, ...); by default the runner's own defaults, quiet,
    without the HTML report. Keras' global state (layer-name counters, ...) is cleared first so each
    program records the same way whatever ran before it; torch runs on one thread while it records
    (these models are far faster so, and the recorded numbers are one thread's).
    """
    import keras
    import torch

    from gradwatch.runner import run_script

    program = PROGRAMS[name]
    out = Path(out_dir)
    options: dict[str, Any] = {"quiet": True, "report": False, "overwrite": True}
    options.update(watch_options)
    keras.backend.clear_session(free_memory=False)  # free_memory would gc.collect(): 0.25 s a program
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    err = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout if stdout is not None else io.StringIO()), contextlib.redirect_stderr(err):
            code, _ = run_script(str(program.path), out=out, **options)
    finally:
        torch.set_num_threads(threads)
    if code != 0:
        raise RuntimeError(f"{program.path.name} exited with {code}:\n{err.getvalue()[-4000:]}")
    return out


_root: Path | None = None


def recorded(name: str) -> Path:
    """Record program ``name`` once per process (the behaviour and the diagnosis tests share the
    recording); later calls return the same run directory."""
    global _root
    if name in _recorded:
        return _recorded[name]
    if _root is None:
        import atexit
        import shutil
        import tempfile

        _root = Path(tempfile.mkdtemp(prefix="gradwatch-keras-matrix-"))
        atexit.register(shutil.rmtree, _root, True)
    _recorded[name] = record(name, _root / name)
    return _recorded[name]


_recorded: dict[str, Path] = {}


# ------------------------------------------------------------------------------------ as a script


def _main(names: Sequence[str]) -> int:
    import tempfile
    import time

    failed = 0
    with tempfile.TemporaryDirectory(prefix="gradwatch-keras-matrix-") as tmp:
        for name in names or list(PROGRAMS):
            p = PROGRAMS[name]
            buf = io.StringIO()
            t0 = time.perf_counter()
            out = record(name, Path(tmp) / name, stdout=buf)
            dt = time.perf_counter() - t0
            run = gw.load_run(out)
            try:
                p.check_behaviour(run)
                ok = "behaves"
            except AssertionError as e:
                ok, failed = f"MISBEHAVES: {e}", failed + 1
            label = p.expect or "healthy"
            alt = f" (or {', '.join(p.alternatives)})" if p.alternatives else ""
            print(f"== {name} [class {p.cls}] expect {label}{alt}: {ok} ({len(run.steps)} steps, {dt:.1f} s)")
            print("   program says: " + " | ".join(buf.getvalue().strip().splitlines()[-2:]))
            try:
                fs = gw.diagnose(run)
            except Exception as e:  # the rules are being rewritten; the baseline may not run
                print(f"   diagnosis failed: {type(e).__name__}: {e}")
                continue
            for f in fs or []:
                print(f"   {f.kind}/{f.severity}: {f.summary}")
            if not fs:
                print("   (no findings)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
