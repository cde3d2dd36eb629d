"""Mixed precision: GradScaler (plain and fused optimizers), bf16 autocast and bf16 models on CPU."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import gradwatch as gw
from gradwatch.diagnose import diagnose
from test_probe import SYNC_OPS

SKIP_AT = (3, 7)  # steps whose (scaled) gradients get an Inf: GradScaler must skip them
STEPS = 20


def _model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1)).to(dtype)


def _data(n: int = 64, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 8, generator=g)
    return x.to(dtype), (x[:, :1] * 2 - x[:, 1:2]).to(dtype)


def _train_scaled(model: nn.Module, opt: torch.optim.Optimizer, scaler, w=None, bad=SKIP_AT, steps=STEPS):  # type: ignore[no-untyped-def]
    """The usual AMP loop; an Inf written into one scaled gradient at the steps in ``bad``."""
    x, y = _data()
    for s in range(steps):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        loss = nn.functional.mse_loss(out.float(), y)
        scaler.scale(loss).backward()
        if s in bad:
            model[2].weight.grad[0, 0] = math.inf
        scaler.step(opt)
        scaler.update()
        if w is not None:
            w.log(loss=loss)


def _reference(fused: bool, tmp: Path):  # type: ignore[no-untyped-def]
    """The same run without loss scaling: the skipped steps are simply not taken."""
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=fused)
    x, y = _data()
    with gw.watch(model, opt, out=tmp / "ref", quiet=True, report=False, sample_every=1) as w:
        for s in range(STEPS):
            if s in SKIP_AT:
                continue
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
            loss = nn.functional.mse_loss(out.float(), y)
            loss.backward()
            opt.step()
            w.log(loss=loss)
    return model, gw.load_run(tmp / "ref")


@pytest.mark.parametrize("fused", [False, True])
def test_grad_scaler_statistics_are_unscaled_and_skips_are_marked(tmp_path: Path, fused: bool) -> None:
    """Plain Adam: GradScaler unscales before the step and skips it on Inf (our hooks never fire
    there). Fused Adam: the kernel unscales, so the probe sees scaled gradients and divides at the
    flush. Either way the record equals an unscaled run's and the two skipped steps are marked."""
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    with gw.watch(model, opt, out=tmp_path / "amp", quiet=True, report=False, sample_every=1) as w:
        _train_scaled(model, opt, scaler, w)
    run = gw.load_run(tmp_path / "amp")
    assert run.steps.tolist() == list(range(STEPS))  # skipped steps are recorded, not lost
    skipped = run.step_series("amp_skipped")
    assert np.flatnonzero(skipped).tolist() == list(SKIP_AT)
    assert not run.step_series("skipped").any()  # "skipped" is the guards' flag
    scale = run.step_series("amp_scale")
    assert scale[0] == 2.0**16 and scale[4] == 2.0**15 and scale[8] == 2.0**14  # halved after each skip
    ref_model, ref = _reference(fused, tmp_path)
    kept = [s for s in range(STEPS) if s not in SKIP_AT]
    for metric in ("grad_norm", "grad_std", "grad_maxabs", "grad_mean", "weight_norm"):
        a = run.layer_series(metric)[kept]
        b = ref.layer_series(metric)
        np.testing.assert_allclose(a, b, rtol=1e-6, equal_nan=True, err_msg=metric)
    np.testing.assert_allclose(run.step_series("grad_norm")[kept], ref.step_series("grad_norm"), rtol=1e-6)
    _, h, _ = run.histograms()
    _, h_ref, _ = ref.histograms()
    hist_steps = run.histograms()[0]
    keep_h = [i for i, s in enumerate(hist_steps) if s not in SKIP_AT]
    np.testing.assert_array_equal(h[keep_h], h_ref)  # the log2 histogram shifted back by log2(scale)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    # The same findings as the unscaled run: the two overflows the scaler caught are not among them.
    findings = [(f.kind, f.severity, f.layers) for f in diagnose(run)]
    assert findings == [(f.kind, f.severity, f.layers) for f in diagnose(ref)]
    assert "nonfinite" not in [k for k, *_ in findings]
    # The Inf is in the record (the layer it hit), only the finding is withheld.
    if not fused:
        assert run.layer_series("grad_nonfinite")[SKIP_AT[0], run.layer_index("2.weight")] == 1


def test_monitoring_under_grad_scaler_changes_nothing(tmp_path: Path) -> None:
    results = []
    for watched in (False, True):
        model = _model()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        if watched:
            with gw.watch(model, opt, out=tmp_path / "w", quiet=True, report=False, sample_every=1) as w:
                _train_scaled(model, opt, scaler, w)
        else:
            _train_scaled(model, opt, scaler)
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_grad_scaler_stuck_is_a_finding(tmp_path: Path) -> None:
    """Overflow at every step from 10 on: the scaler keeps skipping; that is reported once, as AMP's."""
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    with gw.watch(model, opt, out=tmp_path / "s", quiet=True, report=False) as w:
        _train_scaled(model, opt, scaler, w, bad=range(10, 40), steps=40)
    findings = [f for f in diagnose(gw.load_run(tmp_path / "s")) if f.kind == "nonfinite"]
    assert len(findings) == 1 and findings[0].severity == "error"
    assert "GradScaler skipped" in findings[0].summary and findings[0].evidence["amp_skipped_steps"] == 30


class _Syncs(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.n += func in SYNC_OPS
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("fused", [False, True])
def test_grad_scaler_steps_add_no_host_sync(tmp_path: Path, fused: bool) -> None:
    """scaler.step + update make the same host reads with gradwatch as without (GradScaler's own)."""
    counts = []
    for watched in (False, True):
        model = _model()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=fused)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        w = gw.watch(model, opt, out=tmp_path / f"w{watched}", quiet=True, report=False, flush_every=100) if watched else None
        x, y = _data()
        c = _Syncs()
        for s in range(8):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            scaler.scale(loss).backward()
            if s == 5:
                model[2].weight.grad[0, 0] = math.inf
            if s >= 2:  # past the steps that create optimizer state
                with c:
                    scaler.step(opt)
                    scaler.update()
                    if w is not None:
                        w.log(loss=loss)
            else:
                scaler.step(opt)
                scaler.update()
        if w is not None:
            w.close()
            assert gw.load_run(tmp_path / "wTrue").step_series("amp_skipped")[5] == 1
        counts.append(c.n)
    assert counts[1] == counts[0]


def test_bf16_autocast_trains_and_records(tmp_path: Path) -> None:
    """bf16 autocast on CPU: float32 gradients, recorded as they are."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = _data()
    with gw.watch(model, opt, out=tmp_path / "bf", quiet=True, report=False, flush_every=5) as w:
        for _ in range(10):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = nn.functional.mse_loss(model(x).float(), y)
            loss.backward()
            expected = [p.grad.norm().item() for p in model.parameters()]
            opt.step()
            w.log(loss=loss)
    run = gw.load_run(tmp_path / "bf")
    np.testing.assert_allclose(run.layer_series("grad_norm")[-1], expected, rtol=1e-6)
    assert np.isnan(run.step_series("amp_scale")).all()  # no GradScaler: no scale


def test_bf16_gradients_are_reduced_in_float32(tmp_path: Path) -> None:
    """A bfloat16 model: norms and moments accumulate in float32 (float64 for sums), so they match a
    float64 reference of the same bf16 values; a bf16 accumulation would be off by ~1e-3."""
    model = _model(dtype=torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = _data(4096, torch.bfloat16)
    with gw.watch(model, opt, out=tmp_path / "b", quiet=True, report=False, sample_every=1):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        grads = [p.grad.double() for p in model.parameters()]
        bf16_norms = [p.grad.norm().double().item() for p in model.parameters()]
        opt.step()
    run = gw.load_run(tmp_path / "b")
    ref = np.array([g.norm().item() for g in grads])
    np.testing.assert_allclose(run.layer_series("grad_norm")[0], ref, rtol=1e-6)
    np.testing.assert_allclose(run.layer_series("grad_mean")[0], [g.mean().item() for g in grads], rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(run.layer_series("grad_std")[0], [g.std(unbiased=False).item() for g in grads], rtol=1e-5)
    # The comparison has teeth: torch's own bf16 norm is visibly off for the large layers.
    assert max(abs(a - b) / b for a, b in zip(bf16_norms, ref)) > 1e-4


GUARDS_UNDER_AMP = {
    "ClipNorm": lambda: gw.guards.ClipNorm(0.1),
    "ClipValue": lambda: gw.guards.ClipValue(0.02),
    "AGC": lambda: gw.guards.AGC(0.005, exclude=[]),
}


@pytest.mark.parametrize("name", sorted(GUARDS_UNDER_AMP))
def test_guards_under_grad_scaler_judge_unscaled_gradients(tmp_path: Path, name: str) -> None:
    """With GradScaler, plain Adam's guards see unscaled gradients (unscale_ ran first); fused Adam's
    see scaled ones, and the guards take the scale they carry into account (norms divided, value
    bounds multiplied). Both clip the same, and record the same unscaled norm after the guard."""
    results = {}
    for fused in (False, True):
        model = _model()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=fused)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        out = tmp_path / f"f{fused}"
        with gw.watch(model, opt, out=out, quiet=True, report=False, guards=[GUARDS_UNDER_AMP[name]()]) as w:
            _train_scaled(model, opt, scaler, w)
        run = gw.load_run(out)
        kept = [s for s in range(STEPS) if s not in SKIP_AT]
        results[fused] = (run.step_series("clip_coef")[kept], run.step_series("grad_norm_clipped")[kept],
                          [p.detach().clone() for p in model.parameters()])
    assert np.all(results[False][0] < 0.999)  # the guard bites at every step
    if name == "ClipNorm":
        assert np.all(results[True][1] <= 0.1 * (1 + 1e-5))
    np.testing.assert_allclose(results[True][0], results[False][0], rtol=1e-4)
    np.testing.assert_allclose(results[True][1], results[False][1], rtol=1e-4)
    for a, b in zip(results[True][2], results[False][2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fused", [False, True])
def test_grad_scaler_overflows_are_not_the_guards_business(tmp_path: Path, fused: bool) -> None:
    """Four overflows in a row: GradScaler skips them. SkipNonFinite(max_consecutive=3) does not count
    them (a fused optimizer shows them to the guards, a plain one does not) and Rollback does not
    roll back for them."""
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    skip, rollback = gw.guards.SkipNonFinite(max_consecutive=3), gw.guards.Rollback(every=5)
    with gw.watch(model, opt, out=tmp_path / "g", quiet=True, report=False, flush_every=5,
                  guards=[skip, rollback]) as w:
        _train_scaled(model, opt, scaler, w, bad=range(6, 10), steps=25)
    assert skip.skipped_steps == []
    assert rollback.events == []
    run = gw.load_run(tmp_path / "g")
    assert np.flatnonzero(run.step_series("amp_skipped")).tolist() == [6, 7, 8, 9]
    assert run.status == "finished"
    assert "nonfinite" not in [f.kind for f in diagnose(run)]


def test_report_and_summary_show_amp(tmp_path: Path) -> None:
    from rich.console import Console

    from gradwatch.report.html import write_report
    from gradwatch.report.terminal import print_summary

    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    with gw.watch(model, opt, out=tmp_path / "r", quiet=True, report=False) as w:
        _train_scaled(model, opt, scaler, w)
    run = gw.load_run(tmp_path / "r")
    console = Console(record=True, width=200)
    print_summary(run, console=console, layers=False)
    text = console.export_text()
    assert "loss scale 65536 -> 16384, 2 steps skipped by GradScaler (at 3, 7" in text
    assert "non-finite" not in text  # the overflows GradScaler caught are not the run's problem
    html = write_report(tmp_path / "r").read_text()
    assert "2 steps skipped by GradScaler" in html
    assert "Recording notes" in html
