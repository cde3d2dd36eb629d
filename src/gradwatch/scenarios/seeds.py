"""The five seed articles' experiments, in PyTorch, as named scenarios.

Keras defaults are kept where the seeds rely on them: zero biases, RMSprop(lr 1e-3, rho 0.9,
eps 1e-7), SGD(lr 0.01), batch 32, Glorot-uniform init unless the seed names another.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from .. import surgery
from ..guards import ClipNorm, ClipNormPerLayer, ClipValue
from .base import Scenario, Trial, Variant, require_sklearn
from .moons import moons_data
from .regression import regression_data, regression_mlp


def _t(a) -> torch.Tensor:  # type: ignore[no-untyped-def]
    return torch.as_tensor(a, dtype=torch.float32)


def _mlp(widths: list[int], act: type[nn.Module] | None, out_act: nn.Module | None) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-2], widths[1:-1]):
        layers += [nn.Linear(a, b)] + ([act()] if act is not None else [])
    layers.append(nn.Linear(widths[-2], widths[-1]))
    if out_act is not None:
        layers.append(out_act)
    return nn.Sequential(*layers)


def _init(model: nn.Module, how: str | tuple[str, float, float], seed: int) -> nn.Module:
    """Keras-style: ``("uniform", a, b)``, ``("normal", 0, std)``, or a surgery scheme; biases 0."""
    gen = torch.Generator().manual_seed(seed)
    if isinstance(how, str):
        surgery.reinit(model, how, seed=seed)
        return model
    dist, a, b = how
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                if dist == "uniform":
                    nn.init.uniform_(m.weight, a, b, generator=gen)
                else:
                    nn.init.normal_(m.weight, a, b, generator=gen)
                nn.init.zeros_(m.bias)
    return model


def _rmsprop(model: nn.Module, lr: float = 1e-3) -> torch.optim.Optimizer:
    return torch.optim.RMSprop(model.parameters(), lr=lr, alpha=0.9, eps=1e-7)


# --------------------------------------------------------------------- seed 004: make_circles


def _circles() -> tuple[torch.Tensor, torch.Tensor]:
    require_sklearn()
    from sklearn.datasets import make_circles

    x, y = make_circles(n_samples=1000, factor=0.5, noise=0.1, random_state=0)
    return _t(x), _t(y).unsqueeze(1)


def _circles_trial(act: type[nn.Module], init: str | tuple = ("normal", 0.0, 1.0)) -> Callable[[int], Trial]:
    def build(seed: int) -> Trial:
        torch.manual_seed(seed)
        model = _init(_mlp([2, 5, 5, 5, 5, 1], act, nn.Sigmoid()), init, seed)
        return Trial(model, _rmsprop(model), nn.BCELoss(), _circles(), None, "accuracy")

    return build


CIRCLES = Scenario(
    name="circles",
    seed_article="004",
    title="make_circles(1000, factor 0.5, noise 0.1); MLP 2-5-5-5-5-1, N(0, 1) init, RMSprop, batch 32",
    variants=[
        Variant("sigmoid", _circles_trial(nn.Sigmoid), "0.652 (0.588 via fit)"),
        Variant("tanh", _circles_trial(nn.Tanh), "0.994 (0.993 via fit)"),
        Variant("relu", _circles_trial(nn.ReLU), "0.995 (0.994 via fit)"),
        Variant("sigmoid + glorot_uniform", _circles_trial(nn.Sigmoid, "glorot_uniform"), "recommended, no figure"),
    ],
    epochs=100,
    full_epochs=100,
    note="accuracy on the 1000 training points, as the seed scores it; make_circles random_state 0 (the seed sets none); "
         "each variant's report.html has the seed's weight and gradient mean/std plots per layer",
    reports=True,
    expectations=[
        ("sigmoid ends far below tanh and relu (by > 0.1) and its gradients vanish", lambda r: (
            r["sigmoid"].score < min(r["tanh"].score, r["relu"].score) - 0.1
            and any("vanishing" in f for f in r["sigmoid"].findings))),
        ("tanh and relu learn (> 0.9)", lambda r: r["tanh"].score > 0.9 and r["relu"].score > 0.9),
    ],
)


# ------------------------------------------------------------------ seed 000: make_moons, vanishing


def _moons_trial(act: type[nn.Module] = nn.Sigmoid, hidden: tuple[int, ...] = (10, 10, 5),
                 init: str | tuple = ("uniform", -1.0, 1.0), adam_lr: float | None = None) -> Callable[[int], Trial]:
    def build(seed: int) -> Trial:
        require_sklearn()
        torch.manual_seed(seed)
        model = _init(_mlp([2, *hidden, 1], act, nn.Sigmoid()), init, seed)
        opt = torch.optim.Adam(model.parameters(), lr=adam_lr, eps=1e-7) if adam_lr else _rmsprop(model)
        return Trial(model, opt, nn.BCELoss(), moons_data(), None, "accuracy")

    return build


MOONS = Scenario(
    name="moons",
    seed_article="000",
    title="make_moons(3000, noise 0.25); MLP 2-10-10-5-1 sigmoid, U(-1, 1) init, RMSprop, batch 32",
    variants=[
        Variant("baseline sigmoid", _moons_trial(), "layer 1 mean grad ~0 (< 0.006)"),
        Variant("relu", _moons_trial(nn.ReLU), "layer 1 grads vary"),
        Variant("one hidden layer", _moons_trial(hidden=(3,)), "clear grad updates"),
        Variant("glorot_uniform", _moons_trial(init="glorot_uniform"), "layer 1 varies, < layer 4"),
        Variant("adam lr 0.008", _moons_trial(adam_lr=0.008), "grads away from 0, converges"),
    ],
    epochs=30,
    full_epochs=100,
    note="the seed reports gradient plots, not accuracies; flow = first layer's gradient RMS over the last's",
    expectations=[
        ("ReLU and a shallower net carry more gradient to the first layer than the baseline",
         lambda r: all(r["baseline sigmoid"].flow < r[k].flow for k in ("relu", "one hidden layer"))),
        ("ReLU and Adam(0.008) reach a higher accuracy than the baseline",
         lambda r: all(r[k].score > r["baseline sigmoid"].score for k in ("relu", "adam lr 0.008"))),
        ("the baseline is diagnosed as vanishing", lambda r: any("vanishing" in f for f in r["baseline sigmoid"].findings)),
        ("ReLU is not", lambda r: not any(f.startswith("vanishing_gradients") for f in r["relu"].findings)),
    ],
)


# ------------------------------------------------------------ seed 000: regression, exploding


def _explode_data() -> tuple[torch.Tensor, torch.Tensor]:
    require_sklearn()
    from sklearn.datasets import make_regression

    x, y = make_regression(n_samples=1500, n_features=15, noise=0.2, random_state=42)
    return _t(x), _t(y).unsqueeze(1)


def _explode_trial(init: str | tuple, act: type[nn.Module] = nn.ReLU, clipvalue: float | None = None,
                   l2: float = 0.0) -> Callable[[int], Trial]:
    def build(seed: int) -> Trial:
        torch.manual_seed(seed)
        model = _mlp([15, 35, 1], act, None)
        _init(model, "glorot_uniform", seed)  # the output layer keeps Keras' default
        first = nn.Sequential(model[0])
        _init(first, init, seed)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)

        def penalty(m: nn.Module) -> torch.Tensor:  # kernel_regularizer=l2(l2) on the hidden layer
            return l2 * m[0].weight.pow(2).sum()

        return Trial(model, opt, nn.MSELoss(), _explode_data(), None, "mse",
                     guards=[ClipValue(clipvalue)] if clipvalue else [], penalty=penalty if l2 else None)

    return build


EXPLODING = Scenario(
    name="exploding",
    seed_article="000",
    title="make_regression(1500, 15 features, noise 0.2); Dense 35 + linear, SGD(0.01), batch 32",
    variants=[
        Variant("relu, U(4, 5) init", _explode_trial(("uniform", 4.0, 5.0)), "NaN (Neptune reports an error)"),
        Variant("clipvalue 50 + glorot_normal", _explode_trial("glorot_normal", clipvalue=50.0), "gradients kept in range"),
        Variant("glorot_normal + tanh", _explode_trial("glorot_normal", nn.Tanh), "explosion fixed"),
        Variant("glorot_normal + tanh + L2 0.01", _explode_trial("glorot_normal", nn.Tanh, l2=0.01),
                "gradients in range, converges"),
    ],
    epochs=20,
    full_epochs=100,
    note="MSE on the 1500 training points; L2 on the hidden kernel only (the seed adds an activity regulariser too)",
    expectations=[
        ("U(4, 5) init goes non-finite", lambda r: r["relu, U(4, 5) init"].first_nonfinite_step is not None),
        ("each fix stays finite", lambda r: all(math.isfinite(r[k].score) for k in (
            "clipvalue 50 + glorot_normal", "glorot_normal + tanh", "glorot_normal + tanh + L2 0.01"))),
    ],
)


# ------------------------------------------------------------- seed 001: unscaled targets, clipping


def _regression_trial(guards: Callable[[], list]) -> Callable[[int], Trial]:
    def build(seed: int) -> Trial:
        x, y, xt, yt = regression_data()
        model = regression_mlp(seed + 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        return Trial(model, opt, nn.MSELoss(), (x, y), (xt, yt), "mse", guards=guards())

    return build


REGRESSION = Scenario(
    name="regression",
    seed_article="001",
    title="make_regression(1000, 20 features, noise 0.1), unscaled targets; MLP 20-25-1 ReLU, SGD(0.01, momentum 0.9)",
    variants=[
        Variant("no clipping", _regression_trial(lambda: []), "NaN"),
        Variant("clipnorm 1.0", _regression_trial(lambda: [ClipNormPerLayer(1.0)]), "test MSE 27.43 (train 5.08)"),
        Variant("clipvalue 5.0", _regression_trial(lambda: [ClipValue(5.0)]), "test MSE 9.99 (train 9.49)"),
        Variant("clipvalue 5.0 + clipnorm 1.0", _regression_trial(lambda: [ClipValue(5.0), ClipNormPerLayer(1.0)]), "suggested"),
        *[Variant(f"clipnorm {c:g}", _regression_trial(lambda c=c: [ClipNormPerLayer(c)]), "sweep suggested", full_only=True)
          for c in (0.1, 0.5, 2.0, 5.0)],
        *[Variant(f"clipvalue {c:g}", _regression_trial(lambda c=c: [ClipValue(c)]), "sweep suggested", full_only=True)
          for c in (0.5, 1.0, 10.0)],
        Variant("global clipnorm 1.0", _regression_trial(lambda: [ClipNorm(1.0)]), "", full_only=True),
    ],
    epochs=100,
    full_epochs=100,
    note="test MSE on the last 500 points; Keras clipnorm clips each weight's gradient (ClipNormPerLayer)",
    expectations=[
        ("without clipping the loss goes NaN", lambda r: r["no clipping"].first_nonfinite_step is not None),
        ("clipnorm and clipvalue train to a finite test MSE", lambda r: all(
            math.isfinite(r[k].score) and r[k].score < 1000 for k in ("clipnorm 1.0", "clipvalue 5.0"))),
    ],
)


# ------------------------------------------------------------ seed 003: optimizer x lr x batch grid


def _digits(seed: int = 0) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    require_sklearn()
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = _t(d.data / 16.0), torch.as_tensor(d.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
    n = int(0.8 * len(x))
    return (x[order[:n]], y[order[:n]]), (x[order[n:]], y[order[n:]])


_OPTIMIZERS = {
    "SGD": lambda p, lr, wd: torch.optim.SGD(p, lr=lr, weight_decay=wd),
    "RMSprop": lambda p, lr, wd: torch.optim.RMSprop(p, lr=lr, alpha=0.9, eps=1e-7, weight_decay=wd),
    "Adagrad": lambda p, lr, wd: torch.optim.Adagrad(p, lr=lr, weight_decay=wd),
    "Adadelta": lambda p, lr, wd: torch.optim.Adadelta(p, lr=lr, weight_decay=wd),
    "Adam": lambda p, lr, wd: torch.optim.Adam(p, lr=lr, eps=1e-7, weight_decay=wd),
}


def _grid_trial(opt: str, lr: float, batch: int, wd: float = 0.0) -> Callable[[int], Trial]:
    def build(seed: int) -> Trial:
        torch.manual_seed(seed)
        model = _init(_mlp([64, 128, 64, 10], nn.ReLU, None), "glorot_uniform", seed)
        train, test = _digits()
        return Trial(model, _OPTIMIZERS[opt](model.parameters(), lr, wd), nn.CrossEntropyLoss(), train, test,
                     "accuracy", batch_size=batch)

    return build


def _grid_variants() -> list[Variant]:
    quick = [Variant(f"{o} lr 0.01 batch 100", _grid_trial(o, 0.01, 100),
                     "underfits" if o == "Adagrad" else "fits" if o == "Adam" else "") for o in _OPTIMIZERS]
    full = [Variant(f"{o} lr {lr:g} batch {b}", _grid_trial(o, lr, b), "", full_only=True)
            for o in _OPTIMIZERS for lr in (0.001, 0.01, 0.1) for b in (10, 100, 1000) if not (lr == 0.01 and b == 100)]
    wd = [Variant(f"Adam lr 0.01 batch 100 wd {w:g}", _grid_trial("Adam", 0.01, 100, w), "", full_only=True)
          for w in (0.001, 0.01, 0.1)]
    return quick + full + wd


GRID = Scenario(
    name="grid",
    seed_article="003",
    title="optimizer x learning rate x batch size (x weight decay); MLP 64-128-64-10 ReLU on load_digits",
    variants=_grid_variants(),
    epochs=20,
    full_epochs=50,
    note="sklearn's load_digits (8x8, 1797 images, 80/20 split) stands in for MNIST, which cannot be downloaded here",
    expectations=[
        ("Adagrad ends below Adam (lr 0.01, batch 100; the seed: Adagrad underfits, Adam does not)",
         lambda r: r["Adagrad lr 0.01 batch 100"].score < r["Adam lr 0.01 batch 100"].score),
    ],
)

SCENARIOS: dict[str, Scenario] = {s.name: s for s in (MOONS, EXPLODING, REGRESSION, CIRCLES, GRID)}
