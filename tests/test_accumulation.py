"""Gradient accumulation: one record per optimizer step, of the gradient the step consumes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

import gradwatch as gw


def test_statistics_are_of_the_accumulated_gradient(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(96, 6), torch.randn(96, 1)
    expected, maxabs = [], []
    with gw.watch(model, opt, out=tmp_path / "acc", quiet=True, report=False, sample_every=1):
        for step in range(6):
            opt.zero_grad()
            for micro in range(4):  # 4 micro-batches of 4 per optimizer step
                sl = slice(16 * step + 4 * micro, 16 * step + 4 * micro + 4)
                (nn.functional.mse_loss(model(x[sl]), y[sl]) / 4).backward()
            expected.append([p.grad.norm().item() for p in model.parameters()])
            maxabs.append([p.grad.abs().max().item() for p in model.parameters()])
            opt.step()
    run = gw.load_run(tmp_path / "acc")
    assert run.steps.tolist() == list(range(6))  # optimizer steps, not micro-batches
    np.testing.assert_allclose(run.layer_series("grad_norm"), expected, rtol=1e-6)
    np.testing.assert_allclose(run.layer_series("grad_maxabs"), maxabs, rtol=1e-6)
    # The activation statistics of a sampled step combine its four forward passes.
    assert not np.isnan(run.layer_series("act_dead_frac")[:, 0]).any()


def test_a_step_without_forward_hooks_firing_keeps_the_tap_in_eager_mode(tmp_path: Path) -> None:
    """LBFGS runs its forwards inside step(), after the tap was collected: no hook fires between two
    steps. In eager mode that is no reason to turn activation statistics off (only a compiled graph
    that bypasses the hooks is)."""
    import json

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=3)
    x, y = torch.randn(32, 4), torch.randn(32, 1)

    def closure():  # type: ignore[no-untyped-def]
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    with gw.watch(model, opt, out=tmp_path / "lbfgs", quiet=True, report=False, sample_every=1) as w:
        for _ in range(4):
            opt.step(closure)
        probe = w.stream(opt).probe
        assert probe.activation_tap_attached and probe.activation_note is None  # the tap is on, never turned off
    meta = json.loads((tmp_path / "lbfgs" / "meta.json").read_text())
    assert "activation_stats" not in meta["streams"][0]
