"""The sampled step's cheaper kernels (issue 18) against float64 and against the exact paths they replace."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch.probe.kernels import EXACT_MOMENTS_MAX, EXP_BINS, ParamGroup, exact_moments, exponent_counts, moments


class Wide(nn.Module):
    """Two layers above EXACT_MOMENTS_MAX elements (one of them with weights far from zero-mean) and
    small ones below it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(300, 400)  # 120 000 weights: the cheap moments
        self.b = nn.Linear(400, 200)  # 80 000
        self.head = nn.Linear(200, 3)  # small: exact moments
        with torch.no_grad():
            self.b.weight.normal_(1.0, 0.1)  # mean 10x the std: the identity's hard case

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.b(torch.tanh(self.a(x)))))


def test_large_tensor_moments_stay_within_their_documented_error(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Wide()
    assert model.a.weight.numel() > EXACT_MOMENTS_MAX >= model.head.weight.numel()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    grads, weights = [], []
    def keep(*_: object) -> None:
        grads.append([p.grad.double().clone() for p in model.parameters()])
        weights.append([p.detach().double().clone() for p in model.parameters()])

    opt.register_step_pre_hook(keep)
    x, y = torch.randn(64, 300), torch.randint(0, 3, (64,))
    with gw.watch(model, opt, out=tmp_path / "run", sample_every=1, quiet=True, report=False):
        for _ in range(4):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    run = gw.load_run(tmp_path / "run")
    names = [n for n, _ in model.named_parameters()]
    checked = 0
    for kind, ref in (("grad", grads), ("weight", weights)):
        mean, std = run.layer_series(f"{kind}_mean"), run.layer_series(f"{kind}_std")
        for step in range(4):
            for name, t in zip(names, ref[step]):
                i = run.layer_index(name)
                m, s, mabs = t.mean().item(), t.std(unbiased=False).item(), t.abs().mean().item()
                if t.numel() <= EXACT_MOMENTS_MAX:  # exact: float64 sum, centred second pass
                    assert mean[step, i] == pytest.approx(m, rel=1e-5, abs=1e-12 * mabs)
                    assert std[step, i] == pytest.approx(s, rel=1e-5)
                else:  # float32 partial sums of 1024; std from the identity: rel. error ~1e-6 * (1 + mean²/var)
                    assert abs(mean[step, i] - m) <= 1e-6 * mabs + 1e-6 * abs(m)
                    assert std[step, i] == pytest.approx(s, rel=1e-5 * (1 + m * m / (s * s)))
                checked += 1
    assert checked == 2 * 4 * len(names)
    # The hard case is really there: weight b's mean is ten times its std.
    wb = weights[0][names.index("b.weight")]
    assert wb.mean().item() > 5 * wb.std().item()


def test_moments_match_the_exact_path_on_zero_mean_tensors() -> None:
    g = torch.Generator().manual_seed(1)
    tensors = [torch.randn(512, 300, generator=g) * 1e-3, torch.randn(70_000, generator=g), torch.zeros(100_000),
               torch.randn(10, generator=g)]
    group = ParamGroup(list(range(len(tensors))), tensors)
    norms = torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32))
    sums, cnorms = moments(tensors, norms, group)
    for t, s, c in zip(tensors, sums, cnorms):
        es, ec = exact_moments(t, group.scratch, torch.empty(t.numel(), dtype=torch.float64))
        mabs = t.abs().mean().item()
        assert abs(s.item() - es.item()) / t.numel() <= 1e-6 * mabs + 1e-12
        assert c.item() == pytest.approx(ec.item(), rel=1e-5, abs=1e-30)
    assert cnorms[2].item() == 0.0  # all zeros: no cancellation noise


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_byte_histogram_equals_the_int32_one(dtype: torch.dtype) -> None:
    """On CPU the exponent word is narrowed to a byte before bincount; every bin must be the same as
    masking it in int32, signs, zeros, subnormals, inf and NaN included."""
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(200_000, generator=g) * torch.logspace(-30, 30, 200_000)).to(dtype)
    x[:6] = torch.tensor([0.0, -0.0, 1e-41, float("inf"), -float("inf"), float("nan")]).to(dtype)
    group = ParamGroup([0], [x])
    bits = x.to(torch.float32).view(torch.int32).to(torch.int64)
    expected = torch.bincount((bits >> 23) & 0xFF, minlength=EXP_BINS)
    assert torch.equal(exponent_counts(x, group.scratch, None), expected)
    assert expected[0] >= 3 and expected[255] >= 3  # zeros/subnormals, and inf/NaN (float16 overflows more)
    # The byte path is set up only where narrowing wraps modulo 256 (checked once per probe).
    words = torch.arange(-4096, 4096, 3, dtype=torch.int32)  # long enough for the vectorised copy
    wraps = torch.equal(torch.empty(words.numel(), dtype=torch.uint8).copy_(words).to(torch.int32), words & 0xFF)
    assert (group.scratch8 is not None) == wraps
    if group.scratch8 is not None:
        assert torch.equal(exponent_counts(x, group.scratch, group.scratch8), expected)


def test_conv_activation_extremes_reduce_in_place(tmp_path: Path) -> None:
    """The tap reduces a conv output over every axis but the channel one without copying it; its
    dead and constant shares are those of the channel-first copy."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(5, 3, 12, 12)
    model(x)
    with torch.no_grad():
        model[0].bias[:3] = -100.0  # channels 0-2 never fire
        model[2].weight[1] = 0.0  # channel 1 of the second conv is constant (its bias)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gw.watch(model, opt, out=tmp_path / "run", sample_every=1, quiet=True, report=False):
        for _ in range(2):
            opt.zero_grad()
            model(x).sum().backward()
            opt.step()
    run = gw.load_run(tmp_path / "run")
    dead, const = run.layer_series("act_dead_frac"), run.layer_series("act_const_frac")
    assert dead[0, run.layer_index("0.weight")] == pytest.approx(3 / 8)
    assert const[0, run.layer_index("2.weight")] == pytest.approx(1 / 4)
    assert np.isfinite(dead[1]).any()


class _Clock:
    """A stand-in for the session's clock: training and diagnosis advance it by what they "take"."""

    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now

    @staticmethod
    def strftime(fmt: str) -> str:
        import time

        return time.strftime(fmt)


@pytest.mark.parametrize("diagnosis_s, expected", [(0.0, 10), (0.05, 2)])
def test_online_diagnosis_keeps_to_its_time_budget(diagnosis_s: float, expected: int, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Free diagnoses run after every window (of the first 20), as before; ones that cost more than
    ONLINE_TIME_SHARE of the run's time run after the first two windows only, and then once
    ONLINE_MAX_WAIT_S have passed since the last one."""
    import gradwatch.session as session
    from gradwatch import finish

    clock = _Clock()
    monkeypatch.setattr(session, "time", clock)
    calls: list[float] = []

    def diagnose(*args: object, **kwargs: object) -> bool:
        calls.append(clock.now)
        clock.now += diagnosis_s
        return True

    monkeypatch.setattr(finish, "diagnose_so_far", diagnose)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(4, 3)
    with gw.watch(model, opt, out=tmp_path / "run", flush_every=5, report=False, summary=False):
        for step in range(51):  # 10 windows of 5 steps, 10 ms a step (a window is stored at the next step)
            clock.now += 0.01
            opt.zero_grad()
            model(x).sum().backward()
            opt.step()
        assert len(calls) == expected
        clock.now += session.ONLINE_MAX_WAIT_S  # long enough since the last one: the next window is diagnosed
        for step in range(5):
            opt.zero_grad()
            model(x).sum().backward()
            opt.step()
        assert len(calls) == expected + 1


@pytest.mark.parametrize("case", ["plain", "accumulation", "bf16 autocast", "guards"])
def test_recorded_grad_norms_are_clip_grad_norms_own_bit_for_bit(case: str, tmp_path: Path) -> None:
    """Of what reaches optimizer.step() (the sum of the micro-batches' gradients; under autocast the
    float32 gradients), the norms clip_grad_norm_ computes (one _foreach_norm), bit for bit: the
    sampled step's cheaper moments change nothing here (torch.dot would have been 30% cheaper on
    the CPU but moves norms by ~2e-6 relative: benchmarks/norm_floor.py, docs/performance.md)."""
    torch.manual_seed(0)
    model = Wide()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    seen: list[list[torch.Tensor]] = []
    opt.register_step_pre_hook(lambda *_: seen.append([p.grad.clone() for p in model.parameters()]) and None)
    x, y = torch.randn(64, 300), torch.randint(0, 3, (64,))
    guards = [gw.guards.ClipNorm(1e9)] if case == "guards" else None
    with gw.watch(model, opt, out=tmp_path / "run", quiet=True, report=False, guards=guards, sample_every=2):
        for _ in range(4):
            opt.zero_grad()
            for part in ((x[:32], y[:32]), (x[32:], y[32:])) if case == "accumulation" else ((x, y),):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "bf16 autocast"):
                    loss = nn.functional.cross_entropy(model(part[0]), part[1])
                loss.backward()
            opt.step()
    run = gw.load_run(tmp_path / "run")
    recorded = run.layer_series("grad_norm")
    order = [run.layer_index(n) for n, _ in model.named_parameters()]
    assert len(seen) == 4
    for step, grads in enumerate(seen):
        expected = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)).numpy()
        np.testing.assert_array_equal(recorded[step, order], expected)
        np.testing.assert_allclose(recorded[step, order], [g.double().norm().item() for g in grads], rtol=1e-5)
