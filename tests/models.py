"""Small models of the architectures the probe must handle, and a seeded training loop."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def mlp(depth: int = 4, width: int = 16, act: type[nn.Module] = nn.ReLU) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(8, width), act()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), act()]
    layers.append(nn.Linear(width, 3))
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class SmallLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 16, num_layers=2, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


class SmallTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(1))


class OddParams(nn.Module):
    """The corner cases at once: tied weights, a zero-size parameter, a frozen layer, LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.body = nn.Linear(8, 8)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.norm = nn.LayerNorm(8)
        self.empty = nn.Parameter(torch.zeros(0, 3))
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.embed.weight  # tied: one layer, counted once

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x).mean(1)
        h = self.norm(torch.tanh(self.body(h)) + self.frozen(h))
        return self.head(h)[:, :3] + self.empty.sum()


def data_for(model: nn.Module, batch: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if isinstance(model, SmallCNN):
        return torch.randn(batch, 3, 8, 8, generator=g)
    if isinstance(model, SmallLSTM):
        return torch.randn(batch, 5, 8, generator=g)
    if isinstance(model, (SmallTransformer, OddParams)):
        return torch.randint(0, 10, (batch, 6), generator=g)
    return torch.randn(batch, 8, generator=g)


ARCHITECTURES: dict[str, Callable[[], nn.Module]] = {
    "mlp": mlp,
    "cnn": SmallCNN,
    "lstm": SmallLSTM,
    "transformer": SmallTransformer,
}


def make(arch: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ARCHITECTURES[arch]() if arch in ARCHITECTURES else OddParams()


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    steps: int,
    *,
    on_step: Callable[[torch.Tensor], None] | None = None,
    before_step: Callable[[int], None] | None = None,
    seed: int = 0,
) -> None:
    """Seeded training on fixed random batches; ``on_step(loss)`` after each optimizer step."""
    target_gen = torch.Generator().manual_seed(seed + 1)
    for i in range(steps):
        x = data_for(model, seed=seed + i)
        y = torch.randint(0, 3, (x.shape[0],), generator=target_gen)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        if before_step is not None:
            before_step(i)
        optimizer.step()
        if on_step is not None:
            on_step(loss)
