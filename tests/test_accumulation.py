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
    with gw.watch(model, opt, out=tmp_path / "acc", quiet=True, report=False, sample_every=1) as w:
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
