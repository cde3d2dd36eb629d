#!/usr/bin/env python
"""What does each integration cost per training step, next to the plain-PyTorch figure?

One MLP (DEPTH x Linear(WIDTH, WIDTH) + ReLU, batch BATCH, Adam) trained the way each framework
trains it, with and without gradwatch:

  pytorch       a plain loop; gradwatch.watch(model, optimizer)
  lightning     Trainer.fit; callbacks=[gradwatch.lightning.GradWatch()]
  keras         Keras 3 (torch backend) model.fit; callbacks=[gradwatch.keras.GradWatch()]
  transformers  Hugging Face Trainer; callbacks=[gradwatch.transformers.GradWatchCallback()]

Each framework's run is timed over its steps after a warm-up (the framework's own per-step work is
part of both numbers, so the ratio is what gradwatch adds inside that framework). Frameworks that
are not installed are skipped with a line saying so.

    .venv/bin/python benchmarks/integrations.py           # a few minutes on 2 CPU cores
    .venv/bin/python benchmarks/integrations.py --quick   # smoke run; numbers meaningless
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("KERAS_BACKEND", "torch")
import logging  # noqa: E402
import warnings  # noqa: E402

logging.disable(logging.WARNING)  # the frameworks' info lines (Lightning's "GPU available", tips): the table is the output
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import gradwatch as gw  # noqa: E402


class Sizes:
    def __init__(self, quick: bool):
        self.depth, self.width, self.batch = (2, 32, 16) if quick else (8, 256, 128)
        self.steps, self.warmup, self.repeats = (6, 2, 1) if quick else (200, 30, 3)


def mlp(s: Sizes) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(s.depth):
        layers += [nn.Linear(s.width, s.width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(s.width, 10))


def data(s: Sizes, n_batches: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n_batches * s.batch, s.width, generator=g), torch.randint(0, 10, (n_batches * s.batch,), generator=g)


def pytorch(s: Sizes, watched: bool, tmp: Path) -> float:
    model = mlp(s)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = data(s, s.steps + s.warmup)
    w = gw.watch(model, opt, out=tmp / "pt", overwrite=True, quiet=True, report=False, diagnose_online=False) if watched else None
    t0 = 0.0
    for i in range(s.steps + s.warmup):
        if i == s.warmup:
            t0 = time.perf_counter()
        xb, yb = x[i * s.batch : (i + 1) * s.batch], y[i * s.batch : (i + 1) * s.batch]
        loss = nn.functional.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if w is not None:
            w.log(loss)
    dt = time.perf_counter() - t0
    if w is not None:
        w.close()
    return dt / s.steps * 1e3


class _Timer:
    """Per-batch wall times, read by a framework's own batch-end callback."""

    def __init__(self, warmup: int):
        self.warmup, self.n, self.t0, self.t1 = warmup, 0, 0.0, 0.0

    def tick(self) -> None:
        self.n += 1
        if self.n == self.warmup:
            self.t0 = time.perf_counter()
        self.t1 = time.perf_counter()

    def ms_per_step(self) -> float:
        return (self.t1 - self.t0) / max(1, self.n - self.warmup) * 1e3


def lightning(s: Sizes, watched: bool, tmp: Path) -> float:
    import lightning.pytorch as pl

    from gradwatch.lightning import GradWatch

    class M(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp(s)

        def training_step(self, batch, i):  # type: ignore[no-untyped-def]
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    timer = _Timer(s.warmup)

    class Tick(pl.Callback):
        def on_train_batch_end(self, *a, **k):  # type: ignore[no-untyped-def]
            timer.tick()

    x, y = data(s, s.steps + s.warmup)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=s.batch)
    callbacks = [Tick()] + ([GradWatch(out=tmp / "pl", overwrite=True, quiet=True, report=False, diagnose_online=False)]
                            if watched else [])
    trainer = pl.Trainer(max_epochs=1, callbacks=callbacks, logger=False, accelerator="cpu", devices=1,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(M(), loader)
    return timer.ms_per_step()


def keras_fit(s: Sizes, watched: bool, tmp: Path) -> float:
    import keras

    from gradwatch.keras import GradWatch

    keras.utils.set_random_seed(0)
    layers = [keras.Input((s.width,))] + [keras.layers.Dense(s.width, activation="relu") for _ in range(s.depth)]
    model = keras.Sequential(layers + [keras.layers.Dense(10)])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    timer = _Timer(s.warmup)

    class Tick(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):  # type: ignore[no-untyped-def]
            timer.tick()

    x, y = data(s, s.steps + s.warmup)
    callbacks = [Tick()] + ([GradWatch(out=tmp / "k", overwrite=True, quiet=True, report=False, diagnose_online=False)]
                            if watched else [])
    model.fit(x.numpy(), y.numpy(), batch_size=s.batch, epochs=1, verbose=0, callbacks=callbacks, shuffle=False)
    return timer.ms_per_step()


def transformers_trainer(s: Sizes, watched: bool, tmp: Path) -> float:
    import transformers

    from gradwatch.transformers import GradWatchCallback

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp(s)

        def forward(self, x, labels=None):  # type: ignore[no-untyped-def]
            logits = self.net(x)
            return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}

    class DS(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.x, self.y = data(s, s.steps + s.warmup)

        def __len__(self) -> int:
            return len(self.x)

        def __getitem__(self, i):  # type: ignore[no-untyped-def]
            return {"x": self.x[i], "labels": self.y[i]}

    timer = _Timer(s.warmup)

    class Tick(transformers.TrainerCallback):
        def on_step_end(self, *a, **k):  # type: ignore[no-untyped-def]
            timer.tick()

    args = transformers.TrainingArguments(output_dir=str(tmp / "hf"), per_device_train_batch_size=s.batch, num_train_epochs=1,
                                          report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
                                          disable_tqdm=True, dataloader_num_workers=0)
    callbacks = [Tick()] + ([GradWatchCallback(out=tmp / "hfw", overwrite=True, quiet=True, report=False, diagnose_online=False)]
                            if watched else [])
    model = Net()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=DS(), callbacks=callbacks,
                                   optimizers=(torch.optim.Adam(model.parameters(), lr=1e-3), None))
    trainer.remove_callback(transformers.PrinterCallback)  # the table is the output
    trainer.train()
    return timer.ms_per_step()


FRAMEWORKS: dict[str, tuple[str, Callable[[Sizes, bool, Path], float]]] = {
    "pytorch": ("torch", pytorch),
    "lightning": ("lightning", lightning),
    "keras": ("keras", keras_fit),
    "transformers": ("transformers", transformers_trainer),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--frameworks", default=",".join(FRAMEWORKS))
    ns = ap.parse_args(argv)
    s = Sizes(ns.quick)
    print(f"integration cost per step: MLP {s.depth}x{s.width}, batch {s.batch}, Adam; {s.steps} timed steps after "
          f"{s.warmup} warm-up, median of {s.repeats} runs (alternating without/with); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    rows = []
    for name in ns.frameworks.split(","):
        module, fn = FRAMEWORKS[name]
        try:
            __import__(module)
        except ImportError:
            rows.append(f"| {name} | not installed | | |")
            continue
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):  # the frameworks' own chatter; the table is the output
            plain, watched = [], []
            for _ in range(s.repeats):
                plain.append(fn(s, False, Path(tmp)))
                watched.append(fn(s, True, Path(tmp)))
        a, b = statistics.median(plain), statistics.median(watched)
        rows.append(f"| {name} | {a:.2f} | {b:.2f} | {b / a:.2f}x |")
    print()
    print("| framework | without gradwatch ms/step | with gradwatch ms/step | ratio |")
    print("|---|---:|---:|---:|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
