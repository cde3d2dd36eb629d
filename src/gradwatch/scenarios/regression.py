"""Seed 001: an MLP on unscaled make_regression targets explodes; clipping (a guard) fixes it.

make_regression(1000 samples, 20 features, noise 0.1, random_state 1); first 500 points train,
last 500 test; Dense 25 ReLU (He-uniform init) + linear output; SGD(lr 0.01, momentum 0.9); MSE;
batch 32 (Keras' default), shuffled every epoch; 100 epochs. The targets' standard deviation is
about 140, so the first gradients are huge and SGD with momentum overflows to NaN.

``python -m gradwatch.scenarios.regression`` trains it once per guard and prints the table that
docs/guards.md shows, next to the seed's published numbers.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import GradwatchError
from ..guards import AGC, AutoClip, ClipNorm, ClipNormPerLayer, ClipValue, Guard, SkipNonFinite, ZClip
from ..watch import Watch

#: The seed's results (train MSE, test MSE) as it printed them, Keras 2 / TensorFlow, 100 epochs.
#: Keras' ``clipnorm`` clips each weight's gradient by its own norm (our ClipNormPerLayer).
PUBLISHED = {
    "none": ("nan", "nan"),
    "clipnorm=1.0": ("5.08", "27.43"),
    "clipvalue=5.0": ("9.49", "9.99"),
}


def regression_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import make_regression
    except ImportError:
        raise GradwatchError("this scenario needs scikit-learn for its data; "
                             "install it with `pip install gradwatch[demo]`.") from None
    x, y = make_regression(n_samples=1000, n_features=20, noise=0.1, random_state=1)
    x_t = torch.tensor(x, dtype=torch.float32)
    y_t = torch.tensor(y, dtype=torch.float32).unsqueeze(1)
    return x_t[:500], y_t[:500], x_t[500:], y_t[500:]


def regression_mlp(seed: int = 1) -> nn.Sequential:
    """Seed 001's model: Dense(25, relu, he_uniform) then Dense(1, linear); Keras' zero biases."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(20, 25), nn.ReLU(), nn.Linear(25, 1))
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")  # Keras he_uniform
            nn.init.zeros_(m.bias)
    return model


@dataclass
class RegressionResult:
    label: str
    train_mse: float
    test_mse: float
    steps: int
    first_nonfinite_step: int | None
    seconds: float
    out: str | None


def run_regression(
    guards: Sequence[Guard] = (),
    *,
    label: str = "",
    epochs: int = 100,
    out: str | os.PathLike[str] | None = None,
    seed: int = 1,
    progress: Callable[[int, int], None] | None = None,
    **watch_options,
) -> RegressionResult:
    """Train seed 001's model once with ``guards`` (under a watch when ``out`` is given)."""
    x, y, xt, yt = regression_data()
    model = regression_mlp(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(x) / 32)
    total = epochs * steps_per_epoch
    w = Watch(model, opt, out, guards=list(guards), **watch_options).attach() if out is not None else None
    if w is None and guards:
        raise GradwatchError("guards act through a watch: give run_regression an output directory (out=...).")
    t0 = time.perf_counter()
    first_bad: int | None = None
    step = 0
    try:
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x), 32):
                idx = order[i : i + 32]
                loss = nn.functional.mse_loss(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                if w is not None:
                    w.log(loss)
                step += 1
                if progress is not None:
                    progress(step, total)
            if w is None and first_bad is None and not all(torch.isfinite(p).all() for p in model.parameters()):
                first_bad = step  # without a record: the end of the first epoch with non-finite weights
    finally:
        if w is not None:
            w.close()
    if w is not None:  # the exact step, from the record
        from ..store import load_run

        bad = ~np.isfinite(load_run(out).step_series("loss"))
        first_bad = int(np.argmax(bad)) if bad.any() else None
    with torch.no_grad():
        train = nn.functional.mse_loss(model(x), y).item()
        test = nn.functional.mse_loss(model(xt), yt).item()
    return RegressionResult(label or "none", train, test, step, first_bad, time.perf_counter() - t0, str(out) if out else None)


def guard_table() -> list[tuple[str, list[Guard], str]]:
    """(label, guards, the seed's row it compares with) of the docs/guards.md table."""
    return [
        ("none", [], "none"),
        ("ClipNormPerLayer(1.0)", [ClipNormPerLayer(1.0)], "clipnorm=1.0"),
        ("ClipNorm(1.0)", [ClipNorm(1.0)], "clipnorm=1.0"),
        ("ClipValue(5.0)", [ClipValue(5.0)], "clipvalue=5.0"),
        ("ClipValue(5.0) + ClipNorm(1.0)", [ClipValue(5.0), ClipNorm(1.0)], ""),
        ("ZClip()", [ZClip()], ""),
        ("ZClip(warmup=2)", [ZClip(warmup=2)], ""),
        ("AutoClip(10)", [AutoClip(10)], ""),
        ("AGC(0.01)", [AGC(0.01, exclude=["2"])], ""),
        ("SkipNonFinite()", [SkipNonFinite(max_consecutive=10**9)], ""),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    ap = argparse.ArgumentParser(prog="python -m gradwatch.scenarios.regression", description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=100, help="epochs per run (the seed: 100)")
    ap.add_argument("--out", default="gradwatch-runs/seed001", help="parent directory of the runs")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown (as docs/guards.md shows it)")
    ns = ap.parse_args(argv)
    console = Console(highlight=False)
    table = Table(title=f"seed 001: unscaled make_regression, SGD(0.01, momentum 0.9), {ns.epochs} epochs, batch 32")
    for col in ("guard", "train MSE", "test MSE", "seed's train / test", "first non-finite", "time"):
        table.add_column(col, justify="left" if col in ("guard", "seed's train / test") else "right")
    rows = []
    for label, guards, seed_row in guard_table():
        slug = "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-")
        out = os.path.join(ns.out, slug)
        r = run_regression(guards, label=label, epochs=ns.epochs, out=out, overwrite=True, quiet=True, report=False)
        pub = PUBLISHED.get(seed_row)
        seed_text = f"{pub[0]} / {pub[1]} ({seed_row})" if pub else ""
        row = (label, f"{r.train_mse:.4g}", f"{r.test_mse:.4g}", seed_text,
               "-" if r.first_nonfinite_step is None else f"step {r.first_nonfinite_step}", f"{r.seconds:.1f} s")
        rows.append(row)
        table.add_row(*row)
        print(f"  {label}: train {r.train_mse:.4g}, test {r.test_mse:.4g}", file=sys.stderr)
    if ns.markdown:
        heads = [c.header for c in table.columns]
        print("| " + " | ".join(heads) + " |")
        print("|" + "|".join("---" if i in (0, 3) else "---:" for i in range(len(heads))) + "|")
        for row in rows:
            print("| " + " | ".join(str(c) for c in row) + " |")
    else:
        console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
