"""Seed 000's baseline: a sigmoid MLP on make_moons whose first layer's gradient vanishes.

make_moons(3000, noise 0.25, random_state 1234); Dense 10-10-5 sigmoid + a sigmoid output;
RandomUniform(-1, 1) init; RMSprop with Keras' defaults (lr 1e-3, rho 0.9, eps 1e-7); batch 32;
binary cross-entropy. The seed trains 100 epochs; the demo's default is shorter, the picture the same.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..errors import GradwatchError
from ..watch import Watch

SEED_DATA = 1234  # make_moons random_state of seed 000
HIDDEN = (10, 10, 5)


def moons_data(n_samples: int = 3000) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import make_moons
    except ImportError:
        raise GradwatchError("the demo needs scikit-learn for its data; install it with `pip install gradwatch[demo]`.") from None
    x, y = make_moons(n_samples=n_samples, shuffle=True, noise=0.25, random_state=SEED_DATA)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32).unsqueeze(1)


def sigmoid_mlp(activation: type[nn.Module] = nn.Sigmoid, hidden: tuple[int, ...] = HIDDEN, seed: int = 0) -> nn.Sequential:
    """Seed 000's ``binaryModel``: Dense layers with U(-1, 1) kernels and zero biases (Keras' default)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    width = 2
    for h in hidden:
        layers += [nn.Linear(width, h), activation()]
        width = h
    layers += [nn.Linear(width, 1), nn.Sigmoid()]
    model = nn.Sequential(*layers)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.uniform_(m.weight, -1.0, 1.0)
            nn.init.zeros_(m.bias)
    return model


@dataclass
class MoonsResult:
    out: str
    steps: int
    final_loss: float
    accuracy: float


def run_moons(
    out: str | os.PathLike[str],
    *,
    epochs: int = 20,
    batch_size: int = 32,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    **watch_options,
) -> MoonsResult:
    """Train seed 000's sigmoid baseline under gradwatch and return where the run went."""
    x, y = moons_data()
    model = sigmoid_mlp(seed=seed)
    optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-3, alpha=0.9, eps=1e-7)
    loss_fn = nn.BCELoss()
    gen = torch.Generator().manual_seed(seed)
    n_batches = -(-len(x) // batch_size)
    total = epochs * n_batches
    with Watch(model, optimizer, out, **watch_options) as w:
        for epoch in range(epochs):
            order = torch.randperm(len(x), generator=gen)
            for b in range(n_batches):
                idx = order[b * batch_size : (b + 1) * batch_size]
                loss = loss_fn(model(x[idx]), y[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                w.log(loss=loss)
            if progress is not None:
                progress((epoch + 1) * n_batches, total)
    with torch.no_grad():
        pred = model(x)
        acc = ((pred > 0.5).float() == y).float().mean().item()
        final = loss_fn(pred, y).item()
    return MoonsResult(out=str(w.out), steps=w.steps, final_loss=final, accuracy=acc)
