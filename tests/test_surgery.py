"""Model surgery: initialisers against their formulas, activation swaps, norm insertion, refusals."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch import surgery as S
from gradwatch.surgery import torch as ST


def _mlp(act: type[nn.Module] = nn.Sigmoid, widths=(20, 64, 64, 32, 1)) -> nn.Sequential:  # type: ignore[no-untyped-def]
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-2], widths[1:-1]):
        layers += [nn.Linear(a, b), act()]
    return nn.Sequential(*layers, nn.Linear(widths[-2], widths[-1]), nn.Sigmoid())


@pytest.mark.parametrize(
    "scheme, expected_std",
    [
        ("glorot_uniform", lambda fi, fo: math.sqrt(2 / (fi + fo))),
        ("glorot_normal", lambda fi, fo: math.sqrt(2 / (fi + fo))),
        ("he_uniform", lambda fi, fo: math.sqrt(2 / fi)),
        ("he_normal", lambda fi, fo: math.sqrt(2 / fi)),
        ("lecun_uniform", lambda fi, fo: math.sqrt(1 / fi)),
        ("lecun_normal", lambda fi, fo: math.sqrt(1 / fi)),
    ],
)
def test_reinit_draws_with_the_keras_variance(scheme, expected_std) -> None:  # type: ignore[no-untyped-def]
    model = nn.Sequential(nn.Linear(400, 300), nn.ReLU(), nn.Conv2d(3, 64, 5), nn.Linear(300, 1))
    report = S.reinit(model, scheme, bias=0.1, seed=0)
    assert len(report.changed) == 3
    for m in (model[0], model[2]):
        fan_in, fan_out = ST._fans(m.weight)
        std = float(m.weight.detach().std())
        assert std == pytest.approx(expected_std(fan_in, fan_out), rel=0.05), (scheme, type(m).__name__)
        assert bool((m.bias == 0.1).all())
        limit = (math.sqrt(3) * expected_std(fan_in, fan_out) if scheme.endswith("uniform")
                 else 2 * expected_std(fan_in, fan_out) / ST._TRUNC_STD)
        assert float(m.weight.detach().abs().max()) <= limit * (1 + 1e-6)


def test_reinit_orthogonal_gain_matches_the_following_activation() -> None:
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    report = S.reinit(model, "orthogonal", seed=1)
    for i, gain in ((0, 5 / 3), (2, math.sqrt(2)), (4, 1.0)):
        w = model[i].weight
        torch.testing.assert_close(w @ w.T, gain**2 * torch.eye(64), atol=1e-4, rtol=1e-4)
    assert "gain 1.67 (Tanh)" in report.changed[0]


def test_reinit_is_reproducible_and_restricted_to_named_layers() -> None:
    a, b = _mlp(), _mlp()
    S.reinit(a, "he_uniform", seed=3)
    S.reinit(b, "he_uniform", seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    before = b[2].weight.clone()
    report = S.reinit(b, "glorot_normal", layers=["0"], seed=4)
    assert len(report.changed) == 1 and torch.equal(b[2].weight, before)


def test_swap_activations_replaces_modules_and_reports() -> None:
    model = _mlp(nn.Sigmoid)
    report = S.swap_activations(model, nn.Sigmoid, "leaky_relu", negative_slope=0.2, skip=["3"])
    assert [type(m).__name__ for m in model] == ["Linear", "LeakyReLU", "Linear", "Sigmoid",
                                                 "Linear", "LeakyReLU", "Linear", "Sigmoid"]
    assert model[1].negative_slope == 0.2
    assert len(report.changed) == 2
    assert report.skipped == ["3: kept, as asked",
                              "7: the output activation (in registration order; pass example= for the execution "
                              "order), kept (keep_output=False swaps it too)"]
    S.swap_activations(model, nn.Sigmoid, nn.Tanh, keep_output=False)
    assert type(model[7]).__name__ == "Tanh"
    assert model(torch.randn(4, 20)).shape == (4, 1)


@pytest.mark.parametrize("new", ["relu", "rrelu", "prelu", "elu", "selu", "swish", "tanh", nn.LeakyReLU])
def test_swap_to_each_seed_activation(new) -> None:  # type: ignore[no-untyped-def]
    model = _mlp(nn.Sigmoid)
    S.swap_activations(model, "sigmoid", new)
    assert model(torch.randn(3, 20)).shape == (3, 1)


class FunctionalSigmoid(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.sigmoid(self.fc1(x)))


def test_swap_refuses_activations_called_in_forward() -> None:
    with pytest.raises(gw.GradwatchError, match=r"FunctionalSigmoid.forward calls sigmoid as a function"):
        S.swap_activations(FunctionalSigmoid(), nn.Sigmoid, nn.ReLU)


def test_insert_norm_wraps_layers_and_joins_the_optimizer() -> None:
    torch.manual_seed(0)
    model = _mlp(nn.ReLU)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    report = S.insert_norm(model, "batch", optimizer=opt)
    assert [type(m).__name__ for m in model[0]] == ["Linear", "FeatureBatchNorm"]
    assert isinstance(model[6], nn.Linear), "the output layer is left alone"
    assert len(opt.param_groups) == 1 and len(opt.param_groups[0]["params"]) == 8 + 6  # joined the first group
    x = torch.randn(32, 20)
    out = model[0](x)
    assert out.mean(0).abs().max() < 1e-5 and (out.std(0, unbiased=False) - 1).abs().max() < 1e-3
    loss = model(x).mean()
    loss.backward()
    opt.step()  # the new parameters train
    assert report.changed[-1].startswith("(optimizer) 6 new parameters joined Adam's first param group")


def test_insert_layer_norm_on_conv_and_3d_linear() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.proj = nn.Linear(8, 8)
            self.head = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.conv(x).flatten(2).transpose(1, 2)  # (batch, positions, channels)
            return self.head(torch.relu(self.proj(h))).mean(1)

    for kind in ("layer", "batch"):
        net = Net()
        S.insert_norm(net, kind)
        assert net(torch.randn(2, 3, 6, 6)).shape == (2, 2)
        assert isinstance(net.head, nn.Linear)


def test_insert_norm_leaves_a_shared_module_alone() -> None:
    shared = nn.Linear(8, 8)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.ReLU(), nn.Linear(8, 1))
    with pytest.raises(gw.GradwatchError, match="used in several places"):
        S.insert_norm(model)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: S.reinit(_mlp(), "kaiming"), "unknown initialisation scheme 'kaiming'; known: glorot_uniform"),
        (lambda: S.reinit(_mlp(), layers=["nope"]), "no module named 'nope'"),
        (lambda: S.reinit(nn.Sequential(nn.ReLU())), "found no Linear or Conv layer"),
        (lambda: S.swap_activations(_mlp(nn.ReLU), nn.Tanh, nn.ReLU), "has no Tanh module to replace"),
        (lambda: S.swap_activations(_mlp(), "sigmoidal", nn.ReLU), "old must be an activation module class"),
        (lambda: S.swap_activations(_mlp(), nn.Sigmoid, nn.LeakyReLU, slope=2), "cannot make LeakyReLU"),
        (lambda: S.insert_norm(_mlp(), "group"), "kind must be 'batch' or 'layer'"),
        (lambda: S.insert_norm("model"), "surgery works on a torch.nn.Module"),
    ],
)
def test_refusals_are_one_sentence(call, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(gw.GradwatchError, match=message):
        call()


# ----------------------------------------------------------------------------- found in review


def test_a_shared_activation_is_replaced_everywhere_by_one_module() -> None:
    act = nn.Sigmoid()
    model = nn.Sequential(nn.Linear(4, 4), act, nn.Linear(4, 4), act, nn.Linear(4, 1))
    report = S.swap_activations(model, nn.Sigmoid, nn.ReLU)
    assert type(model[1]) is nn.ReLU and model[1] is model[3] and len(report.changed) == 2


class ListThenAct(nn.Module):
    """The output activation is registered last but runs after every layer: only execution order tells."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 1)  # registered first, runs last
        self.body = nn.ModuleList([nn.Linear(4, 8), nn.Linear(8, 8)])
        self.hidden = nn.Sigmoid()
        self.out = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.body:
            x = self.hidden(layer(x))
        return self.out(self.head(x))


def test_output_modules_come_from_the_execution_order_with_an_example() -> None:
    x = torch.randn(3, 4)
    model = ListThenAct()
    report = S.swap_activations(model, nn.Sigmoid, nn.ReLU, example=x)
    assert type(model.hidden) is nn.ReLU and type(model.out) is nn.Sigmoid, report
    model = ListThenAct()
    report = S.insert_norm(model, example=x)
    assert isinstance(model.head, nn.Linear) and all(isinstance(m, nn.Sequential) for m in model.body), report
    assert model(x).shape == (3, 1)


class ReadsWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.out = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(x @ self.fc.weight.T + self.fc.bias))


def test_insert_norm_leaves_layers_whose_weight_is_read_directly() -> None:
    with pytest.raises(gw.GradwatchError, match="reads self.fc's attributes"):
        S.insert_norm(ReadsWeight())
    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)  # its fast path reads linear1.weight
    with pytest.raises(gw.GradwatchError, match="TransformerEncoderLayer.forward reads self.linear1's attributes"):
        S.insert_norm(layer, include_output=True)
    assert layer(torch.randn(2, 5, 8)).shape == (2, 5, 8)  # untouched, still works


def test_insert_norm_twice_does_not_nest_and_an_lr_scheduler_survives() -> None:
    model = _mlp(nn.ReLU)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    S.insert_norm(model, optimizer=opt)
    with pytest.raises(gw.GradwatchError, match="already followed by a norm"):
        S.insert_norm(model, optimizer=opt)
    model(torch.randn(8, 20)).sum().backward()
    opt.step()
    sched.step()  # one param group, as the scheduler expects


class FunctionalVariants(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Docstrings may say sigmoid(Wx) without calling it."""
        s = "a # in a string"  # noqa: F841
        return nn.functional.leaky_relu(self.fc(x))


def test_functional_call_detection_reads_code_not_text() -> None:
    assert ST._functional_calls(FunctionalVariants(), nn.LeakyReLU) == ["FunctionalVariants"]
    assert ST._functional_calls(FunctionalVariants(), nn.Sigmoid) == []


def test_reinit_skips_lazy_layers_with_a_reason() -> None:
    model = nn.Sequential(nn.LazyLinear(4), nn.ReLU(), nn.Linear(4, 1))
    report = S.reinit(model, "he_uniform")
    assert any("not materialised yet" in s for s in report.skipped) and len(report.changed) == 1
