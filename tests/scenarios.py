"""The diagnosis matrix's training runs: small, seeded, plain-PyTorch experiments on sklearn data.

Each scenario trains one model under ``gradwatch.watch`` into a run directory and says which
finding a correct diagnosis must raise (``expect``; ``None`` for a healthy run, which must raise no
warning or error). The unhealthy ones are the seeds' experiments (000: sigmoid MLP on make_moons,
ReLU regression with U(4, 5) init; 001: MLP on unscaled make_regression targets; 004: deep sigmoid
MLP on make_circles) plus the other classic ways training goes wrong; the healthy ones are the
seeds' fixes and ordinary well-set-up models of each architecture the probe handles.

Every scenario trains a few hundred steps in about a second on a 2-core CPU. Short runs use
``sample_every=5`` so that the sampled statistics (mean, std, zero fraction, histograms, update
ratio) are dense.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from sklearn.datasets import load_digits, make_circles, make_classification, make_moons, make_regression
from sklearn.preprocessing import StandardScaler
from torch import nn

import gradwatch as gw

SAMPLE_EVERY = 5
#: The step (0-based optimizer step) whose batch carries NaN inputs in ``nonfinite_nan_input``.
NAN_STEP = 30


@dataclass(frozen=True)
class Scenario:
    """One training run of the matrix.

    Attributes:
        name: the test id.
        expect: the finding kind a correct diagnosis raises at warning or error; None when healthy.
        what: one line for the docs table.
        train: trains the model under gradwatch into the given run directory.
        details: what else the scenario pins down (read by the tests): ``origin``, the allowed
            ``evidence["origin"]`` of its nonfinite finding (which must then exist); ``first_step``,
            that finding's first step; ``forbid``, finding kinds it must not raise at all;
            ``warn_before_nonfinite``, how many steps before the first non-finite gradient norm the
            expected finding must start.
    """

    name: str
    expect: str | None
    what: str
    train: Callable[[Path], None]
    details: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------ the loop


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a), dtype=torch.float32)


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    out: Path,
    *,
    steps: int,
    batch_size: int = 32,
    seed: int = 0,
    sample_every: int = SAMPLE_EVERY,
    corrupt: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    scheduler: Any = None,
) -> None:
    """Mini-batch training for ``steps`` optimizer steps over shuffled epochs of ``(x, y)``.

    Nothing is caught: a run that goes NaN keeps stepping with NaN, as plain training does.
    ``corrupt(step, xb)`` may replace a batch's inputs (bad data at a known step); ``scheduler``
    (a torch LR scheduler) steps after every optimizer step.
    """
    gen = torch.Generator().manual_seed(seed)
    threads = torch.get_num_threads()
    # Models this small run up to ten times faster on one thread than on two (no intra-op
    # parallelism to win, only synchronisation to pay); the recorded numbers are one thread's.
    torch.set_num_threads(1)
    try:
        _loop(model, optimizer, x, y, loss_fn, out, steps, batch_size, gen, sample_every, corrupt, scheduler)
    finally:
        torch.set_num_threads(threads)


def _loop(model, optimizer, x, y, loss_fn, out, steps, batch_size, gen, sample_every, corrupt, scheduler) -> None:
    step = 0
    with gw.watch(model, optimizer, out=out, quiet=True, sample_every=sample_every) as w:
        while step < steps:
            order = torch.randperm(len(x), generator=gen)
            for start in range(0, len(x) - batch_size + 1, batch_size):
                if step >= steps:
                    break
                idx = order[start : start + batch_size]
                xb, yb = x[idx], y[idx]
                if corrupt is not None:
                    xb = corrupt(step, xb)
                loss = loss_fn(model(xb), yb)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                w.log(loss=loss)
                if scheduler is not None:
                    scheduler.step()
                step += 1


def _mlp(widths: list[int], act: type[nn.Module] | None, out_act: nn.Module | None = None) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2 and act is not None:
            layers.append(act())
    if out_act is not None:
        layers.append(out_act)
    return nn.Sequential(*layers)


def _linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


# ------------------------------------------------------------------------------------ data


def moons(n: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = make_moons(n_samples=n, noise=0.2, random_state=0)
    return _tensor(x), _tensor(y).unsqueeze(1)


def circles(n: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    # seed 004's data: make_circles(1000, factor 0.5, noise 0.1)
    x, y = make_circles(n_samples=n, factor=0.5, noise=0.1, random_state=0)
    return _tensor(x), _tensor(y).unsqueeze(1)


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    d = load_digits()
    x = torch.as_tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)  # (1797, 1, 8, 8) in [0, 1]
    return x, torch.as_tensor(d.target, dtype=torch.long)


def regression_001(scale_targets: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Seed 001's problem: make_regression(1000, 20 features, noise 0.1, random_state 1), the first
    500 points for training. The seed standardises neither inputs nor targets in the failing run
    (its inputs are N(0, 1) already; its targets have a standard deviation of about 140)."""
    x, y = make_regression(n_samples=1000, n_features=20, noise=0.1, random_state=1)
    x, y = x[:500], y[:500].reshape(-1, 1)
    if scale_targets:
        x = StandardScaler().fit_transform(x)
        y = StandardScaler().fit_transform(y)
    return _tensor(x), _tensor(y)


# ------------------------------------------------------------------------------------ unhealthy


def deep_sigmoid_mlp(seed: int = 0) -> nn.Sequential:
    """After seed 004's failing model, deeper: 2 inputs, 7 hidden sigmoid layers of 12, one logit;
    N(0, 1) weights, zero biases."""
    torch.manual_seed(seed)
    model = _mlp([2] + [12] * 7 + [1], nn.Sigmoid)
    for m in _linears(model):
        nn.init.normal_(m.weight, 0.0, 1.0)
        nn.init.zeros_(m.bias)
    return model


def vanishing_sigmoid_mlp(out: Path) -> None:
    """deep_sigmoid_mlp on make_circles with plain SGD. Each sigmoid passes back at most a quarter
    of the gradient; over the first 100 steps the first layer gets 0.5% of the last layer's
    gradient RMS."""
    x, y = circles()
    model = deep_sigmoid_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fit(model, opt, x, y, nn.BCEWithLogitsLoss(), out, steps=300)


class SigmoidCNN(nn.Module):
    """Five 3x3 convolutions with sigmoid on 8x8 digits, PyTorch's default init, then a linear head."""

    def __init__(self, depth: int = 5, channels: int = 8):
        super().__init__()
        layers: list[nn.Module] = []
        c = 1
        for _ in range(depth):
            layers += [nn.Conv2d(c, channels, 3, padding=1), nn.Sigmoid()]
            c = channels
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def vanishing_sigmoid_cnn(out: Path) -> None:
    torch.manual_seed(0)
    x, y = digits()
    model = SigmoidCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fit(model, opt, x, y, nn.CrossEntropyLoss(), out, steps=200)


def _he_uniform_relu_regressor(n_in: int, hidden: int) -> nn.Sequential:
    model = _mlp([n_in, hidden, 1], nn.ReLU)
    for m in _linears(model):
        nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")  # Keras' he_uniform
        nn.init.zeros_(m.bias)
    return model


def exploding_unscaled_targets(out: Path) -> None:
    """Seed 001's failing run: MLP 20-25-1 ReLU, He-uniform init, SGD(lr 0.01, momentum 0.9), MSE on
    the raw make_regression targets (std about 100)."""
    torch.manual_seed(1)
    x, y = regression_001(scale_targets=False)
    model = _he_uniform_relu_regressor(20, 25)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    fit(model, opt, x, y, nn.MSELoss(), out, steps=150)


def exploding_large_init(out: Path) -> None:
    """Seed 000's failing regression: make_regression(1500, 15 features, noise 0.2, random_state 42),
    Dense 35 ReLU + linear output, every weight U(4, 5), SGD(lr 0.01), MSE."""
    torch.manual_seed(0)
    x, y = make_regression(n_samples=1500, n_features=15, noise=0.2, random_state=42)
    x, y = _tensor(x), _tensor(y).unsqueeze(1)
    model = _mlp([15, 35, 1], nn.ReLU)
    for m in _linears(model):
        nn.init.uniform_(m.weight, 4.0, 5.0)
        nn.init.zeros_(m.bias)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    fit(model, opt, x, y, nn.MSELoss(), out, steps=100)


class LastStep(nn.Module):
    """A recurrent layer read at its last step by a linear head."""

    def __init__(self, cell: nn.Module, hidden: int, n_out: int = 1):
        super().__init__()
        self.rnn = cell
        self.head = nn.Linear(hidden, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(x)
        return self.head(h[:, -1])


def _sequences(n: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """make_classification points read as sequences: feature t is the input at time t."""
    x, y = make_classification(
        n_samples=n, n_features=length, n_informative=8, n_redundant=0, random_state=seed, shuffle=False
    )
    return _tensor(x).unsqueeze(-1), torch.as_tensor(y, dtype=torch.long)


def exploding_rnn(out: Path) -> None:
    """A ReLU RNN (16 units) reads 60-step sequences and regresses their scaled sum, MSE, SGD(lr
    0.01, momentum 0.9); its recurrent matrix starts at spectral radius 1.1. The gradient norm sits
    near 0.4 for about 110 steps, climbs, jumps to about 1e6 at step 121 and is NaN from step 122:
    the backward pass multiplies by the recurrent matrix 60 times, and once training pushes that
    product past 1 it runs away. (Whether and when it runs away depends on the seed.)"""
    torch.manual_seed(0)
    x, _ = _sequences(600, 60, seed=0)
    y = x.sum(1) / math.sqrt(60)
    hidden = 16
    model = LastStep(nn.RNN(1, hidden, nonlinearity="relu", batch_first=True), hidden, 1)
    with torch.no_grad():
        w = torch.randn(hidden, hidden)
        model.rnn.weight_hh_l0.copy_(w * (1.1 / torch.linalg.eigvals(w).abs().max()))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    fit(model, opt, x, y, nn.MSELoss(), out, steps=150)


def _classification_10() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = make_classification(n_samples=1000, n_features=10, n_informative=6, random_state=0)
    return _tensor(StandardScaler().fit_transform(x)), _tensor(y).unsqueeze(1)


def dead_relu_negative_bias(out: Path) -> None:
    """A ReLU MLP 10-32-32-32-1 on make_classification whose hidden biases start at -5: every
    hidden unit's pre-activation is negative for every input, so every hidden gradient is exactly
    zero and only the output bias learns."""
    torch.manual_seed(0)
    x, y = _classification_10()
    model = _mlp([10, 32, 32, 32, 1], nn.ReLU)
    for m in _linears(model)[:-1]:
        nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        nn.init.constant_(m.bias, -5.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    fit(model, opt, x, y, nn.BCEWithLogitsLoss(), out, steps=200)


def dead_relu_high_lr(out: Path) -> None:
    """Dying ReLU: the same data, a default-initialised ReLU MLP 10-32-32-1 and Adam with lr 0.3.
    The first big steps push the second hidden layer's units negative: by the end about 85% of
    them fire for no training input at all, while the loss still falls (0.68 -> 0.51, medians of
    the first and last tenth)."""
    torch.manual_seed(0)
    x, y = _classification_10()
    model = _mlp([10, 32, 32, 1], nn.ReLU)
    opt = torch.optim.Adam(model.parameters(), lr=0.3)
    fit(model, opt, x, y, nn.BCEWithLogitsLoss(), out, steps=300)


def _relu_moons_model() -> nn.Sequential:
    return _mlp([2, 32, 32, 1], nn.ReLU)


def nonfinite_nan_input(out: Path) -> None:
    """The healthy ReLU MLP + Adam on make_moons, but the batch of step NAN_STEP has a NaN input."""
    torch.manual_seed(0)
    x, y = moons()
    model = _relu_moons_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def corrupt(step: int, xb: torch.Tensor) -> torch.Tensor:
        if step != NAN_STEP:
            return xb
        xb = xb.clone()
        xb[3, 0] = float("nan")
        return xb

    fit(model, opt, x, y, nn.BCEWithLogitsLoss(), out, steps=100, corrupt=corrupt)


# ------------------------------------------------------------------------------------ healthy


def healthy_relu_mlp_adam(out: Path) -> None:
    torch.manual_seed(0)
    x, y = moons()
    model = _relu_moons_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    fit(model, opt, x, y, nn.BCEWithLogitsLoss(), out, steps=300)


def healthy_tanh_glorot_rmsprop(out: Path) -> None:
    """Seed 004's fix: the same 5-deep MLP of 5 units on make_circles with tanh, Glorot-uniform
    init and RMSprop (Keras' defaults: lr 1e-3, rho 0.9, eps 1e-7)."""
    torch.manual_seed(0)
    x, y = circles()
    model = _mlp([2, 5, 5, 5, 5, 1], nn.Tanh)
    for m in _linears(model):
        nn.init.xavier_uniform_(m.weight)
        nn.init.zeros_(m.bias)
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-3, alpha=0.9, eps=1e-7)
    # At Keras' lr the loss creeps for about 400 steps (0.698 -> 0.676) before it falls (0.30 at
    # step 1000): a slow start, not a stall.
    fit(model, opt, x, y, nn.BCEWithLogitsLoss(), out, steps=1000)


class BNCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def healthy_cnn_batchnorm_sgd(out: Path) -> None:
    torch.manual_seed(0)
    x, y = digits()
    model = BNCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    fit(model, opt, x, y, nn.CrossEntropyLoss(), out, steps=200)


def healthy_lstm_adam(out: Path) -> None:
    """An LSTM over 30 steps of make_classification features read as a sequence, the informative
    ones last (so that the task is learnable in 200 steps)."""
    torch.manual_seed(0)
    x, y = _sequences(1000, 30, seed=0)
    x = x.flip(1)
    model = LastStep(nn.LSTM(1, 32, batch_first=True), 32, 2)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    fit(model, opt, x, y, nn.CrossEntropyLoss(), out, steps=200)


class TinyTransformer(nn.Module):
    """Token classification: embedding + learned positions, 2 pre-LN encoder layers, a linear head."""

    def __init__(self, vocab: int, length: int, d: int = 32, n_classes: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(length, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, 4, dim_feedforward=64, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(d, n_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.embed(tokens) + self.pos)
        return self.head(h).transpose(1, 2)  # (batch, classes, length) for cross_entropy


def token_task(n: int = 1000, length: int = 12, vocab: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Label each token 1 when the same token occurs elsewhere in the sequence (needs attention)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (n, length), generator=g)
    same = tokens.unsqueeze(2) == tokens.unsqueeze(1)
    labels = (same.sum(2) > 1).long()
    return tokens, labels


def healthy_transformer_adamw(out: Path) -> None:
    torch.manual_seed(0)
    x, y = token_task()
    model = TinyTransformer(vocab=16, length=12)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    fit(model, opt, x, y, nn.CrossEntropyLoss(), out, steps=200)


def healthy_scaled_regression_sgd(out: Path) -> None:
    """Seed 001's fix: the same MLP and optimizer on standardised inputs and targets."""
    torch.manual_seed(1)
    x, y = regression_001(scale_targets=True)
    model = _he_uniform_relu_regressor(20, 25)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    fit(model, opt, x, y, nn.MSELoss(), out, steps=300)


# ------------------------------------------------------------------------------------ the matrix

# The exploding runs end in NaN. Their first non-finite value shows up in the loss or the gradients,
# but the cause is the weights the exploding updates produced (or the backward pass itself), never
# the data: a nonfinite finding must not blame the forward pass.
_BLOWN_UP = {"origin": ("weights", "backward")}

# ------------------------------------------------------------------------------------ slow divergence


#: Growth of the learning rate per step in ``exploding_growing_lr`` (the real-code issue's case).
LR_GROWTH = 1.015


def growing_lr_run(out: Path, seed: int = 0, lr: float = 0.001, hidden: tuple[int, ...] = (25,),
                   batch_size: int = 500, steps: int = 500) -> None:
    """A learning rate that grows 1.5% per step (a schedule set up the wrong way round): the run
    trains, passes the edge of stability, and the gradient norm rises exponentially for dozens of
    steps before it turns non-finite. Standardised make_regression (500 points; full batch by
    default, as small real runs are), ReLU MLP, plain SGD."""
    torch.manual_seed(seed)
    x, y = regression_001(scale_targets=True)
    model = _mlp([20, *hidden, 1], nn.ReLU)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: LR_GROWTH ** s)
    fit(model, opt, x, y, nn.MSELoss(), out, steps=steps, batch_size=batch_size, seed=seed, scheduler=sched)


def exploding_growing_lr(out: Path) -> None:
    growing_lr_run(out, lr=0.002, hidden=(64, 64), steps=560)


def healthy_warmup_cosine(out: Path) -> None:
    """Linear warm-up over 100 steps to a large SGD lr, then cosine decay: the norm moves with the
    lr during warm-up without diverging."""
    torch.manual_seed(0)
    x, y = moons()
    model = _mlp([2, 64, 64, 1], nn.ReLU)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    total = 600
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / 100 if s < 100 else 0.5 * (1 + math.cos(math.pi * (s - 100) / (total - 100))))
    fit(model, opt, x, y, nn.BCEWithLogitsLoss(), out, steps=total, scheduler=sched)


def healthy_cosine_restarts(out: Path) -> None:
    """SGD with cosine annealing and warm restarts every 60 steps: the lr jumps back up at each
    restart, and the norm with it, then settles."""
    torch.manual_seed(0)
    x, y = regression_001(scale_targets=True)
    model = _he_uniform_relu_regressor(20, 64)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=60)
    fit(model, opt, x, y, nn.MSELoss(), out, steps=600, scheduler=sched)


def healthy_noisy_small_batches(out: Path) -> None:
    """Batches of 4 on noisy labels (make_classification, 20% flipped): a gradient norm that jumps
    from batch to batch by an order of magnitude, and a loss that falls all the same."""
    torch.manual_seed(0)
    x, y = make_classification(n_samples=2000, n_features=20, n_informative=10, flip_y=0.2, random_state=3)
    model = _mlp([20, 64, 64, 1], nn.ReLU)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    fit(model, opt, _tensor(x), _tensor(y).unsqueeze(1), nn.BCEWithLogitsLoss(), out, steps=600, batch_size=4)


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in [
        Scenario("vanishing_sigmoid_mlp", "vanishing_gradients",
                 "make_circles, MLP 7x12 sigmoid, N(0,1) init, SGD", vanishing_sigmoid_mlp),
        Scenario("vanishing_sigmoid_cnn", "vanishing_gradients",
                 "load_digits 8x8, 5 Conv2d+Sigmoid, default init, SGD", vanishing_sigmoid_cnn),
        Scenario("exploding_unscaled_targets", "exploding_gradients",
                 "seed 001: make_regression raw targets, MLP 20-25-1 ReLU, SGD momentum", exploding_unscaled_targets,
                 _BLOWN_UP),
        Scenario("exploding_large_init", "exploding_gradients",
                 "seed 000: make_regression, MLP 15-35-1 ReLU, U(4,5) init, SGD", exploding_large_init, _BLOWN_UP),
        Scenario("exploding_rnn", "exploding_gradients",
                 "ReLU RNN over 60 steps, recurrent spectral radius 1.1, SGD momentum", exploding_rnn, _BLOWN_UP),
        Scenario("dead_relu_negative_bias", "dead_units",
                 "make_classification, ReLU MLP 3x32, hidden biases -5, SGD", dead_relu_negative_bias),
        Scenario("dead_relu_high_lr", "dead_units",
                 "make_classification, ReLU MLP 2x32, Adam lr 0.3 (dying ReLU)", dead_relu_high_lr),
        Scenario("nonfinite_nan_input", "nonfinite",
                 f"make_moons ReLU MLP + Adam, NaN in the inputs at step {NAN_STEP}", nonfinite_nan_input,
                 {"origin": ("forward",), "first_step": NAN_STEP, "forbid": ("exploding_gradients",)}),
        Scenario("exploding_growing_lr", "exploding_gradients",
                 f"standardised make_regression, full batch, ReLU MLP 20-64-64-1, SGD lr 0.002 growing {LR_GROWTH - 1:.1%} "
                 "per step",
                 exploding_growing_lr, {**_BLOWN_UP, "warn_before_nonfinite": 20}),
        Scenario("healthy_relu_mlp_adam", None, "make_moons, ReLU MLP 32-32, Adam", healthy_relu_mlp_adam),
        Scenario("healthy_tanh_glorot_rmsprop", None,
                 "seed 004 fix: make_circles, tanh MLP 4x5, Glorot, RMSprop lr 1e-3", healthy_tanh_glorot_rmsprop),
        Scenario("healthy_cnn_batchnorm_sgd", None,
                 "load_digits 8x8, CNN + BatchNorm, SGD momentum", healthy_cnn_batchnorm_sgd),
        Scenario("healthy_lstm_adam", None, "LSTM 32 over 30-step sequences, Adam", healthy_lstm_adam),
        Scenario("healthy_transformer_adamw", None,
                 "2-layer transformer encoder, token classification, AdamW", healthy_transformer_adamw),
        Scenario("healthy_scaled_regression_sgd", None,
                 "seed 001 fix: standardised make_regression, MLP 20-25-1 He, SGD momentum",
                 healthy_scaled_regression_sgd),
        Scenario("healthy_warmup_cosine", None,
                 "make_moons, ReLU MLP 64-64, SGD lr 0.5: 100 warm-up steps, then cosine decay", healthy_warmup_cosine),
        Scenario("healthy_cosine_restarts", None,
                 "standardised make_regression, ReLU MLP 20-64-1, SGD, cosine warm restarts every 60 steps",
                 healthy_cosine_restarts),
        Scenario("healthy_noisy_small_batches", None,
                 "make_classification with 20% flipped labels, ReLU MLP 64-64, Adam, batches of 4",
                 healthy_noisy_small_batches),
    ]
}
