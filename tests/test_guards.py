"""Guards: each against a reference, fault injection over many seeds, rollback, sync counts, errors."""

from __future__ import annotations

import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import gradwatch as gw
from gradwatch.guards import (
    AGC, AutoClip, ClipNorm, ClipNormPerLayer, ClipValue, GuardStop, Rollback, SkipNonFinite, ZClip,
)
from gradwatch.testing import FaultInjector

aten = torch.ops.aten
SYNC_OPS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default, aten.item.default}

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2),
}


def _mlp(seed: int = 0, act: type[nn.Module] = nn.Tanh) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), act(), nn.Linear(16, 1))


def _data(seed: int = 0, n: int = 64, scale: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return x, x[:, :1] * scale + 0.1 * torch.randn(n, 1, generator=g)


def _all_finite(model: nn.Module, opt: torch.optim.Optimizer) -> bool:
    tensors = list(model.parameters()) + [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _broken(model: nn.Module, opt: torch.optim.Optimizer) -> bool:
    """Non-finite somewhere, or weights blown beyond any use (a 1e30 fault can leave SGD's at ±1e28)."""
    big = any(bool((p.abs() > 1e20).any()) for p in model.parameters())
    return big or not _all_finite(model, opt)


def _train(model, opt, out, guards=None, steps=30, injector=None, data=None, check=None, **opts):
    x, y = data if data is not None else _data()
    with gw.watch(model, opt, out=out, overwrite=True, quiet=True, report=False, diagnose_online=False,
                  guards=guards, **opts) as w:
        for _ in range(steps):
            loss = ((model(x) - y) ** 2).mean()
            if injector is not None:
                loss = injector.loss(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.log(loss)
            if check is not None:
                check()
    return w


# ----------------------------------------------------------------------------- fault injection


def _fault_run(seed: int, opt_name: str, guarded: bool, out: Path) -> tuple[bool, bool, int, int]:
    rng = random.Random(seed)
    model = _mlp(seed)
    opt = OPTIMIZERS[opt_name](model.parameters())
    steps = sorted(rng.sample(range(25), rng.randint(1, 4)))
    faults = {s: rng.choice(["nan", "inf", "-inf", 1e30]) for s in steps}
    inj = FaultInjector(model, opt, faults, target=rng.choice(["grad", "loss"]), seed=seed)
    finite = [True]

    def check() -> None:
        finite[0] = finite[0] and _all_finite(model, opt)

    _train(model, opt, out, [SkipNonFinite()] if guarded else None, injector=inj, data=_data(seed), check=check)
    inj.remove()
    skipped = int(gw.load_run(out).step_series("skipped").sum())
    return finite[0], _broken(model, opt), skipped, len(inj.injected)


@pytest.mark.integration  # 50 training runs per optimizer
@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_skip_nonfinite_over_50_seeds(tmp_path: Path, opt_name: str) -> None:
    """NaN, ±Inf or 1e30 in a gradient element or the loss at random steps: with SkipNonFinite the
    parameters and optimizer state are finite after every step and exactly the faulty steps are
    skipped; without it the same runs break."""
    for seed in range(50):
        finite, _, skipped, injected = _fault_run(seed, opt_name, True, tmp_path / "g")
        assert finite, f"seed {seed}: non-finite parameters or state despite SkipNonFinite"
        assert skipped == injected > 0, f"seed {seed}: skipped {skipped} steps for {injected} faults"
        _, broken, skipped, _ = _fault_run(seed, opt_name, False, tmp_path / "n")
        assert broken, f"seed {seed}: the unguarded run survived its faults, so the test proves nothing"
        assert skipped == 0


def test_skip_uses_found_inf_of_fused_optimizers(tmp_path: Path) -> None:
    model = _mlp(3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    inj = FaultInjector(model, opt, {2: "nan", 7: 1e30, 8: "-inf"}, seed=3)
    _train(model, opt, tmp_path / "r", [SkipNonFinite()], steps=20, injector=inj)
    assert _all_finite(model, opt)
    steps = {int(st["step"]) for st in opt.state.values()}
    assert steps == {20 - 3}, "a skipped step must not advance Adam's step count"
    assert not hasattr(opt, "found_inf"), "the flag handed to the optimizer is taken back after the step"


def test_skipped_first_step_leaves_no_optimizer_state(tmp_path: Path) -> None:
    model = _mlp(1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    inj = FaultInjector(model, opt, {0: "nan"}, seed=1)
    _train(model, opt, tmp_path / "r", [SkipNonFinite()], steps=1, injector=inj)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert len(opt.state) == 0, "the state a skipped first step created is removed again"


@pytest.mark.parametrize("fused", [False, True])
def test_guards_that_never_fire_change_nothing(tmp_path: Path, fused: bool) -> None:
    """SkipNonFinite (both ways of skipping) and Rollback on a clean run: bit-identical weights and state."""

    def run(guards):  # type: ignore[no-untyped-def]
        model = _mlp(5)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=fused)
        _train(model, opt, tmp_path / "r", guards, steps=40)
        return [p.detach().clone() for p in model.parameters()], [v.clone() for st in opt.state.values() for v in st.values()]

    w0, s0 = run(None)
    w1, s1 = run([SkipNonFinite(), Rollback(every=10)])
    assert all(torch.equal(a, b) for a, b in zip(w0, w1))
    assert all(torch.equal(a, b) for a, b in zip(s0, s1))


def test_skip_escalates_instead_of_skipping_forever(tmp_path: Path) -> None:
    model = _mlp(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    inj = FaultInjector(model, opt, {s: "nan" for s in range(10, 500)}, target="loss")
    with pytest.raises(GuardStop, match=r"in a row had non-finite gradients \(steps 10-"):
        _train(model, opt, tmp_path / "r", [SkipNonFinite(max_consecutive=12)], steps=500, injector=inj, flush_every=10)
    assert inj.step <= 10 + 12 + 2 * 10, "the stop comes within a flush window or two of the limit"
    assert gw.load_run(tmp_path / "r").status == "stopped"


# ----------------------------------------------------------------------------- clipping references


def _two_runs(tmp_path: Path, guards, reference, steps: int = 15):  # type: ignore[no-untyped-def]
    """The same training with a guard and with torch's own clipping in the loop."""
    x, y = _data(7, scale=40.0)
    m1, m2 = _mlp(7), _mlp(7)
    o1 = torch.optim.SGD(m1.parameters(), lr=0.01, momentum=0.9)
    o2 = torch.optim.SGD(m2.parameters(), lr=0.01, momentum=0.9)
    _train(m1, o1, tmp_path / "g", guards, steps=steps, data=(x, y))
    for _ in range(steps):
        loss = ((m2(x) - y) ** 2).mean()
        o2.zero_grad()
        loss.backward()
        reference(m2)
        o2.step()
    return m1, m2, gw.load_run(tmp_path / "g")


def test_clip_norm_is_clip_grad_norm_bit_for_bit(tmp_path: Path) -> None:
    m1, m2, run = _two_runs(tmp_path, [ClipNorm(1.0)], lambda m: nn.utils.clip_grad_norm_(m.parameters(), 1.0))
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    pre, post = run.step_series("grad_norm"), run.step_series("grad_norm_clipped")
    assert (pre > 1).all(), "the targets are scaled so that every step is clipped"
    np.testing.assert_allclose(post, 1.0, rtol=1e-5)
    np.testing.assert_allclose(run.step_series("clip_coef"), 1.0 / pre, rtol=1e-4)
    np.testing.assert_array_equal(run.step_series("clip_threshold"), 1.0)


def test_clip_value_is_clip_grad_value(tmp_path: Path) -> None:
    m1, m2, run = _two_runs(tmp_path, [ClipValue(0.5)], lambda m: nn.utils.clip_grad_value_(m.parameters(), 0.5))
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    assert (run.step_series("grad_norm_clipped") < run.step_series("grad_norm")).all()


def test_clip_norm_per_layer_is_keras_clipnorm(tmp_path: Path) -> None:
    def keras_clipnorm(m: nn.Module) -> None:  # tf.clip_by_norm per variable: g * c / max(|g|, c)
        for p in m.parameters():
            p.grad.mul_(0.3 / torch.clamp(torch.linalg.vector_norm(p.grad), min=0.3))

    m1, m2, run = _two_runs(tmp_path, [ClipNormPerLayer(0.3)], keras_clipnorm)
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert (run.step_series("grad_norm_clipped") <= 0.3 * math.sqrt(4) * (1 + 1e-5)).all()


def test_agc_is_unitwise_against_float64_reference(tmp_path: Path) -> None:
    """The gradients the optimizer used (clipped in place) against a float64 reference."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    x, y = torch.randn(8, 3, 6, 6), torch.randint(0, 5, (8,))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    before = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    with gw.watch(model, opt, out=tmp_path / "r", quiet=True, report=False, guards=[AGC(0.01, exclude=["3"])]):
        loss = nn.functional.cross_entropy(model(x) * 50, y)
        opt.zero_grad()
        loss.backward()
        grads = {n: p.grad.detach().double().clone() for n, p in model.named_parameters()}
        opt.step()
    for name, p in model.named_parameters():
        w, g = before[name], grads[name]
        if name.startswith("3."):
            expected = g  # the excluded head
        else:
            dims = tuple(range(1, g.dim()))
            wn = w.abs() if g.dim() <= 1 else w.pow(2).sum(dims, keepdim=True).sqrt()
            gn = g.abs() if g.dim() <= 1 else g.pow(2).sum(dims, keepdim=True).sqrt()
            cap = wn.clamp(min=1e-3) * 0.01
            expected = torch.where(gn > cap, g * cap / gn.clamp(min=1e-6), g)
            assert bool((gn > cap).any()), f"{name}: the test must make AGC act"
        torch.testing.assert_close(p.grad.double(), expected, rtol=1e-5, atol=1e-12)


def _norm_sequence_run(tmp_path: Path, guard, norms: list[float]):  # type: ignore[no-untyped-def]
    """Feed a chosen global gradient norm at each step (one parameter, gradient set by hand)."""
    p = nn.Parameter(torch.zeros(4))
    opt = torch.optim.SGD([p], lr=0.0)
    with gw.watch(None, opt, out=tmp_path / "n", overwrite=True, quiet=True, report=False, guards=[guard]):
        for n in norms:
            p.grad = torch.full((4,), n / 2.0)  # norm of four equal values v is 2|v|
            opt.step()
    run = gw.load_run(tmp_path / "n")
    return run.step_series("grad_norm_clipped").astype(np.float64), run.step_series("clip_threshold")


def test_zclip_follows_the_papers_rule(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    norms = list(1.0 + 0.1 * rng.standard_normal(60))
    norms[30], norms[31], norms[45] = 8.0, float("nan"), 3.0
    out, _ = _norm_sequence_run(tmp_path, ZClip(alpha=0.9, z_thresh=2.5, warmup=10), norms)
    # Reference in float64: warm-up mean/variance, then z-score, adaptive target, EMA of the clipped norm.
    mean = np.mean(norms[:10])
    var = np.mean((np.array(norms[:10]) - mean) ** 2)
    expected = list(norms[:10])
    for n in norms[10:]:
        if not math.isfinite(n):
            expected.append(n)
            continue
        std = math.sqrt(var)
        z = (n - mean) / (std + 1e-6)
        eff = mean + 2.5**2 * std / z if z > 2.5 else n
        expected.append(eff)
        mean = 0.9 * mean + 0.1 * eff
        var = 0.9 * var + 0.1 * (eff - mean) ** 2
    np.testing.assert_allclose(out, expected, rtol=1e-4)
    assert out[30] < 1.5 and out[45] < 1.5, "both spikes are clipped close to the mean"
    assert math.isnan(out[31]), "a non-finite norm is left to SkipNonFinite"


def test_autoclip_is_a_percentile_of_the_history(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    norms = list(np.exp(rng.standard_normal(40)))
    norms[20] = float("inf")
    out, threshold = _norm_sequence_run(tmp_path, AutoClip(25), norms)
    history: list[float] = []
    for i, n in enumerate(norms):
        if math.isfinite(n):
            history.append(n)
        t = np.percentile(history, 25)
        assert threshold[i] == pytest.approx(t, rel=1e-5)
        if math.isfinite(n):
            assert out[i] == pytest.approx(min(n, t * n / (n + 1e-6)), rel=1e-5)


# ----------------------------------------------------------------------------- rollback


def _spike_run(tmp_path: Path, name: str, guards, faults):  # type: ignore[no-untyped-def]
    model = _mlp(11, nn.ReLU)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    inj = FaultInjector(model, opt, faults, target="loss")
    x, y = _data(11, n=128)
    _train(model, opt, tmp_path / name, guards, steps=300, injector=inj, data=(x, y), flush_every=25)
    with torch.no_grad():
        return float(((model(x) - y) ** 2).mean()), opt


def test_rollback_recovers_from_a_loss_spike(tmp_path: Path) -> None:
    clean, _ = _spike_run(tmp_path, "clean", None, {})
    broken, _ = _spike_run(tmp_path, "broken", None, {150: 1e4})
    rb = Rollback(every=50)
    healed, opt = _spike_run(tmp_path, "healed", [rb], {150: 1e4})
    assert not (broken < 10 * clean), f"the spike must ruin the unguarded run (clean {clean}, broken {broken})"
    assert healed == pytest.approx(clean, rel=0.5, abs=0.02), (clean, healed)
    # The loss of step 150 was computed with the weights of step 150's snapshot: a bad loss condemns
    # that snapshot, so the one before (step 100) comes back.
    assert len(rb.events) == 1 and rb.events[0]["trigger_step"] == 150 and rb.events[0]["restored_step"] == 100
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)
    run = gw.load_run(tmp_path / "healed")
    assert run.step_series("rolled_back").sum() == 1
    assert run.streams[0]["rollbacks"][0]["restored_step"] == 100


@pytest.mark.parametrize("storage", ["device", "cpu", "disk"])
def test_rollback_restores_model_and_optimizer_exactly(tmp_path: Path, storage: str) -> None:
    """Right after the restore, weights and momentum buffers equal what they were when the snapshot
    was taken, bit for bit, wherever the snapshot was kept."""
    where = str(tmp_path / "snapshots") if storage == "disk" else storage
    rb = Rollback(every=50, keep=2, storage=where)
    at_snapshot: dict[int, list[torch.Tensor]] = {}
    after_restore: list[list[torch.Tensor]] = []
    # Spies on Rollback's internals: the state at the moment each snapshot is taken and right after the restore.
    take, restore = rb._take, rb._restore

    def live() -> list[torch.Tensor]:
        store = rb._store  # what a snapshot copies: parameters and buffers, and the optimizer's state
        return [t.detach().clone() for t in store.tensors] + [
            v.clone() for st in store.optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)]

    def spy_take(step):  # type: ignore[no-untyped-def]
        at_snapshot[step] = live()
        take(step)

    def spy_restore(snap):  # type: ignore[no-untyped-def]
        restore(snap)
        after_restore.append(live())

    rb._take, rb._restore = spy_take, spy_restore  # type: ignore[method-assign]
    healed, _ = _spike_run(tmp_path, "healed", [rb], {150: 1e4})
    assert len(rb.events) == 1 and rb.events[0]["restored_step"] == 100
    (restored,) = after_restore
    expected = at_snapshot[100]
    assert len(restored) == len(expected) and all(torch.equal(a, b) for a, b in zip(restored, expected))
    clean, _ = _spike_run(tmp_path, "clean", None, {})
    assert healed == pytest.approx(clean, rel=0.5, abs=0.02)
    if storage == "disk":
        files = sorted(p.name for p in (tmp_path / "snapshots").iterdir())
        assert len(files) <= 3 and all(f.startswith("rollback-step") and f.endswith(".pt") for f in files), files


def test_rollback_stops_after_max_rollbacks(tmp_path: Path) -> None:
    rb = Rollback(every=20, max_rollbacks=2, skip_batches=3)
    with pytest.raises(GuardStop, match="after 2 rollbacks"):
        _spike_run(tmp_path, "loop", [rb], {s: 1e6 for s in range(100, 300)})
    assert len(rb.events) == 2
    assert [e["skipped_batches"] for e in rb.events] == [3, 6], "each rollback backs off further"


# ----------------------------------------------------------------------------- host syncs


class _SyncCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func in SYNC_OPS:
            self.syncs += 1
        return func(*args, **(kwargs or {}))


def _count_syncs_in_hooks(w, per_step: list[int]) -> None:  # type: ignore[no-untyped-def]
    """Run each of the watch's two step hooks under its own counter; append the counts."""

    def counted(fn):  # type: ignore[no-untyped-def]
        def call(o):  # type: ignore[no-untyped-def]
            c = _SyncCounter()
            with c:
                fn(o)
            per_step.append(c.syncs)
        return call

    w.on_before_optimizer_step, w.on_after_optimizer_step = (
        counted(w.on_before_optimizer_step), counted(w.on_after_optimizer_step))


GUARDS = {
    "ClipNorm": lambda: ClipNorm(1.0),
    "ClipValue": lambda: ClipValue(0.1),
    "ClipNormPerLayer": lambda: ClipNormPerLayer(0.5),
    "AGC": lambda: AGC(0.01),
    "ZClip": lambda: ZClip(warmup=5),
    "AutoClip": lambda: AutoClip(10),
    "SkipNonFinite": lambda: SkipNonFinite(),
    "Rollback": lambda: Rollback(every=5),
}


@pytest.mark.parametrize("name", sorted(GUARDS))
@pytest.mark.parametrize("fused", [False, True])
def test_guards_do_not_sync(tmp_path: Path, name: str, fused: bool) -> None:
    """Each guard's per-step work (the watch's two hooks) makes no host read, faults included; the
    only exception is SkipNonFinite's one read at the step that creates the optimizer state."""
    model = _mlp(4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=fused)
    inj = FaultInjector(model, opt, {3: "nan", 9: 1e30}, seed=4)
    x, y = _data(4)
    per_step: list[int] = []
    # forensics=False: the guards' own reads are counted here; forensics replays the first faulty step
    # on purpose, reading values then (its healthy steps make none: tests/test_forensics.py).
    with gw.watch(model, opt, out=tmp_path / "r", quiet=True, report=False, guards=[GUARDS[name]()], flush_every=7,
                  forensics=False) as w:
        _count_syncs_in_hooks(w, per_step)
        for _ in range(20):
            loss = ((model(x) - y) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.log(loss)
    assert len(inj.injected) == 2, "the faulty steps were part of what was counted"
    allowed_first = 1 if name == "SkipNonFinite" else 0  # its one read where the optimizer state is created
    assert sum(per_step[:2]) <= allowed_first
    assert sum(per_step[2:]) == 0, per_step


# ----------------------------------------------------------------------------- seed 001, errors, CLI


def test_seed001_explodes_without_a_guard_and_trains_with_clipping(tmp_path: Path) -> None:
    from gradwatch.scenarios.regression import run_regression

    def run(label, guards):  # type: ignore[no-untyped-def]
        return run_regression(guards, label=label, epochs=15, out=tmp_path / label, quiet=True, report=False)

    none = run("none", [])
    assert math.isnan(none.train_mse) and none.first_nonfinite_step is not None
    variance = 2.0e4  # the training targets' variance: what predicting their mean scores
    for label, guards in [("clipnorm", [ClipNorm(1.0)]), ("perlayer", [ClipNormPerLayer(1.0)]),
                          ("clipvalue", [ClipValue(5.0)]), ("agc", [AGC(0.01, exclude=["2"])])]:
        r = run(label, guards)
        assert r.first_nonfinite_step is None and r.train_mse < variance / 5, (label, r)
    z = run("zclip", [ZClip(warmup=2)])
    assert z.first_nonfinite_step is None and math.isfinite(z.train_mse), "ZClip keeps it finite"


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: ZClip(alpha="x"), "ZClip\\(alpha\\) must be between 0 and 1"),
        (lambda: AGC(exclude=5), "AGC\\(exclude\\) takes module names"),
        (lambda: ClipNorm(float("inf")), "ClipNorm\\(max_norm\\) must be a positive number"),
        (lambda: Rollback(lr_factor=True), "Rollback\\(lr_factor\\) must be in"),
        (lambda: gw.watch(_mlp(), torch.optim.SGD(_mlp().parameters(), lr=0.1), guards=ClipNorm), "got the class ClipNorm"),
        (lambda: FaultInjector(_mlp(), torch.optim.SGD(_mlp().parameters(), lr=0.1), [(3, "nan")]), "faults maps step -> value"),
        (lambda: FaultInjector(_mlp(), torch.optim.SGD(_mlp().parameters(), lr=0.1), {1.5: "nan"}),
         "fault steps are non-negative integers"),
        (lambda: ClipNorm(0), "ClipNorm\\(max_norm\\) must be a positive number"),
        (lambda: ClipValue("big"), "ClipValue\\(value\\) must be a positive number"),
        (lambda: ZClip(alpha=1.5), "ZClip\\(alpha\\) must be between 0 and 1"),
        (lambda: AutoClip(150), "AutoClip\\(percentile\\) must be between 0 and 100"),
        (lambda: Rollback(storage=42), "Rollback\\(storage\\) must be 'device', 'cpu' or a directory path"),
        (lambda: SkipNonFinite(max_consecutive=0), "SkipNonFinite\\(max_consecutive\\) must be a positive integer"),
        (lambda: gw.watch(_mlp(), torch.optim.SGD(_mlp().parameters(), lr=0.1), guards=[object()]),
         "guards must be gradwatch.guards objects"),
        (lambda: gw.watch(_mlp(), torch.optim.SGD(_mlp().parameters(), lr=0.1), guards=[SkipNonFinite(), SkipNonFinite()]),
         "given twice"),
        (lambda: FaultInjector(_mlp(), torch.optim.SGD(_mlp().parameters(), lr=0.1), {1: "boom"}), "a fault value is a number"),
    ],
)
def test_bad_guard_arguments_are_one_sentence(make, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(gw.GradwatchError, match=message):
        make()


def test_each_optimizer_gets_its_own_guard_state(tmp_path: Path) -> None:
    g, d = _mlp(1), _mlp(2)
    og, od = torch.optim.SGD(g.parameters(), lr=0.01), torch.optim.SGD(d.parameters(), lr=0.01)
    z = ZClip(warmup=3)
    x, y = _data()
    with gw.watch(g, og, out=tmp_path / "r", quiet=True, report=False, guards=[z, ClipNorm(0.5)]) as w:
        for _ in range(5):  # the first optimizer's guards gather state before the second arrives
            loss = ((g(x) - y) ** 2).mean()
            og.zero_grad()
            loss.backward()
            og.step()
        w.add_optimizer(od, d)
        for _ in range(10):
            for m, o in ((g, og), (d, od)):
                loss = ((m(x) - y) ** 2).mean()
                o.zero_grad()
                loss.backward()
                o.step()
    chains = [w.stream(og).guards, w.stream(od).guards]
    assert chains[0].guards[0] is z and chains[1].guards[0] is not z
    assert (z.warmed_up, chains[1].guards[0].warmed_up) == (3, 3), "warm-ups counted per optimizer"
    assert (chains[0].guards[1].steps, chains[1].guards[1].steps) == (15, 10), "counters start fresh"
    run = gw.load_run(tmp_path / "r")
    assert [s["guards"][1] for s in run.streams] == [{"name": "ClipNorm", "max_norm": 0.5}] * 2
    # The merged post-guard norm is the norm over both streams' clipped gradients.
    # (steps count per optimizer: rows 0-9 hold both streams, rows 10-14 the first one alone)
    post = run.step_series("grad_norm_clipped")
    np.testing.assert_allclose(post[:10], math.sqrt(2) * 0.5, rtol=1e-4)
    np.testing.assert_allclose(post[10:], 0.5, rtol=1e-4)


SCRIPT = """
import torch
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
x = torch.randn(32, 4); y = x.sum(1, keepdim=True) * 100
for step in range(40):
    loss = ((model(x) - y) ** 2).mean()
    if step == 20:
        loss = loss * float("nan")
    opt.zero_grad(); loss.backward(); opt.step()
print("done", bool(torch.isfinite(model[0].weight).all()))
"""


@pytest.mark.integration  # the CLI in a subprocess
def test_cli_run_with_guard_flags(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    out = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, "-m", "gradwatch", "run", "--out", str(out), "--no-report", "--clip-norm", "1.0",
         "--skip-nonfinite", str(script)],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "done True" in r.stdout
    run = gw.load_run(out)
    assert [g["name"] for g in run.streams[0]["guards"]] == ["ClipNorm", "SkipNonFinite"]
    skipped = run.step_series("skipped")
    assert skipped[20] == 1 and skipped.sum() == 1
    post = run.step_series("grad_norm_clipped")
    assert np.nanmax(np.delete(post, 20)) <= 1.0 + 1e-5
    assert "SkipNonFinite skipped 1 step" in r.stderr


@pytest.mark.integration  # the CLI in a subprocess
def test_cli_rejects_a_bad_guard_value(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    r = subprocess.run([sys.executable, "-m", "gradwatch", "run", "--clip-norm", "-1", str(script)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "expected a positive number" in r.stderr and "Traceback" not in r.stderr


# ----------------------------------------------------------------------------- diagnosis of guarded runs


def test_diagnosis_reports_what_a_guard_contained(tmp_path: Path) -> None:
    """The NaN is still reported, but as contained by the guard, without suggesting the guard again."""

    def findings(guards):  # type: ignore[no-untyped-def]
        model = _mlp(8)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        inj = FaultInjector(model, opt, {12: "nan", 30: "inf"}, seed=8)
        w = _train(model, opt, tmp_path / "r", guards, steps=60, injector=inj)
        return [f for f in w.findings if f.kind == "nonfinite"]

    (unguarded,) = findings(None)
    assert unguarded.severity == "error"
    (guarded,) = findings([SkipNonFinite()])
    assert guarded.severity == "warning" and "contained: SkipNonFinite skipped 2 steps" in guarded.summary
    assert guarded.evidence["contained_by"] == ["SkipNonFinite"]
    assert "skip_nonfinite" not in [r.action for r in guarded.remedies] and guarded.remedies


def test_diagnosis_of_a_rolled_back_run(tmp_path: Path) -> None:
    _spike_run(tmp_path, "healed", [Rollback(every=50)], {150: 1e4})
    found = gw.diagnose(tmp_path / "healed")
    assert not [f for f in found if f.severity == "error"], [f.summary for f in found]
    contained = [f for f in found if "Rollback restored a good snapshot 1 time" in f.summary]
    assert contained and all("rollback" not in [r.action for r in f.remedies] for f in contained)


# ----------------------------------------------------------------------------- found in review


def test_skipped_first_step_of_fused_sgd_leaves_no_momentum(tmp_path: Path) -> None:
    """Fused SGD allocates its momentum buffer uninitialised on the first step: a skipped first
    step must not leave it behind."""
    model = _mlp(12)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, fused=True)
    before = [p.detach().clone() for p in model.parameters()]
    inj = FaultInjector(model, opt, {0: "nan"}, seed=12)
    _train(model, opt, tmp_path / "r", [SkipNonFinite()], steps=1, injector=inj)
    assert len(opt.state) == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_skip_with_stateless_sgd_never_syncs(tmp_path: Path) -> None:
    """Plain SGD never creates state, so there is no first-step read either."""
    model = _mlp(13)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    FaultInjector(model, opt, {0: "nan", 4: "inf"}, seed=13)
    per_step: list[int] = []
    x, y = _data(13)
    with gw.watch(model, opt, out=tmp_path / "r", quiet=True, report=False, guards=[SkipNonFinite()],
                  forensics=False) as w:  # the guard's reads only (forensics replays its first faulty step)
        _count_syncs_in_hooks(w, per_step)
        for _ in range(8):
            loss = ((model(x) - y) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert per_step == [0] * 16
    assert _all_finite(model, opt)


def test_guards_work_on_a_float64_model(tmp_path: Path) -> None:
    model = _mlp(14).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    inj = FaultInjector(model, opt, {3: "nan"}, seed=14)
    x, y = _data(14)
    _train(model, opt, tmp_path / "r", [ClipNorm(1.0), SkipNonFinite()], steps=10, injector=inj, data=(x.double(), y.double()))
    assert _all_finite(model, opt)
    run = gw.load_run(tmp_path / "r")
    assert run.step_series("skipped").sum() == 1 and np.nanmax(run.step_series("grad_norm_clipped")) <= 1.0 + 1e-5


def test_rollback_with_two_optimizers_restores_only_its_own(tmp_path: Path) -> None:
    a, b = _mlp(15), _mlp(16)
    oa, ob = torch.optim.Adam(a.parameters(), lr=1e-2), torch.optim.Adam(b.parameters(), lr=1e-2)
    inj = FaultInjector(a, oa, {33: "nan"}, seed=15)
    x, y = _data(15)
    b_before_rollback: list[torch.Tensor] = []
    with gw.watch(None, [oa, ob], out=tmp_path / "r", quiet=True, report=False, guards=[Rollback(every=10)], flush_every=10) as w:
        for step in range(45):
            for m, o in ((a, oa), (b, ob)):
                loss = ((m(x) - y) ** 2).mean()
                o.zero_grad()
                loss.backward()
                if m is b and step == 40:
                    b_before_rollback = [p.detach().clone() for p in b.parameters()]
                o.step()
                if m is b and step == 40:
                    b_after = [p.detach().clone() for p in b.parameters()]
    assert [f.step for f in inj.injected] == [33]
    chains = [w.stream(oa).guards, w.stream(ob).guards]
    assert len(chains[0].guards[0].events) == 1 and not chains[1].guards[0].events
    # A rolled back at its step 40 (after B's step 39); B's weights moved on normally.
    assert not all(torch.equal(p, q) for p, q in zip(b_before_rollback, b_after)), "B kept training"
    assert ob.param_groups[0]["lr"] == 1e-2 and oa.param_groups[0]["lr"] == 5e-3
    assert _all_finite(a, oa) and _all_finite(b, ob)


def test_rollback_holds_at_most_keep_plus_one_snapshots(tmp_path: Path) -> None:
    rb = Rollback(every=1, keep=2)
    held: list[int] = []
    take = rb._take  # a spy on Rollback's internals: snapshots held after each one taken

    def spy(step):  # type: ignore[no-untyped-def]
        take(step)
        held.append(len(rb._snapshots))

    rb._take = spy  # type: ignore[method-assign]
    model = _mlp(17)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    _train(model, opt, tmp_path / "r", [rb], steps=60, flush_every=10)
    assert held and max(held) <= 3


def test_rollback_scales_a_shared_lr_tensor_once(tmp_path: Path) -> None:
    model = _mlp(18)
    lr = torch.tensor(0.01)
    opt = torch.optim.Adam([{"params": model[0].parameters()}, {"params": model[2].parameters()}], lr=lr)
    assert opt.param_groups[0]["lr"] is opt.param_groups[1]["lr"]
    inj = FaultInjector(model, opt, {30: "nan"}, seed=18)
    rb = Rollback(every=10)
    _train(model, opt, tmp_path / "r", [rb], steps=45, injector=inj, flush_every=10)
    assert len(rb.events) == 1
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.005)


class _Broken(gw.guards.Guard):
    def commit(self, step):  # type: ignore[no-untyped-def]
        raise RuntimeError("a guard that fails after SkipNonFinite handed over its flag")


def test_a_failure_after_commit_takes_back_found_inf(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    model = _mlp(19)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    _train(model, opt, tmp_path / "r", [SkipNonFinite(), _Broken()], steps=3)
    assert not hasattr(opt, "found_inf"), "a stale flag would skip every later step silently"
    assert "its guards are off" in capsys.readouterr().err
    assert _all_finite(model, opt) and int(next(iter(opt.state.values()))["step"]) == 3
