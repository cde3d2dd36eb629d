#!/usr/bin/env python
"""What one online diagnosis costs: load the stored run and run every rule, as a flush does.

Trains the 24x512 ReLU MLP of overhead.py (SGD, batch 64) for --steps steps under gradwatch (quiet,
so no diagnosis runs during training), then times `diagnose(load_run(out))` --repeats times and
prints the median; `--numpy-median` times it with numpy's own nanmedian in place of
`gradwatch.diagnose.facts.nanmedian`, the version before issue 18.

    .venv/bin/python benchmarks/diagnosis_cost.py [--steps 600] [--numpy-median]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead  # noqa: E402

try:
    import gradwatch as gw
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
    import gradwatch as gw
import gradwatch.diagnose.rules  # noqa: E402,F401 - loaded, so --numpy-median reaches every rule
from gradwatch.diagnose import diagnose, facts  # noqa: E402


def numpy_nanmedian(x: np.ndarray, axis: int | None = None) -> object:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(x, axis=axis)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--numpy-median", action="store_true")
    a = ap.parse_args()
    if a.numpy_median:
        for name, module in list(sys.modules.items()):  # every rule module that imported it
            if name.startswith("gradwatch.diagnose") and getattr(module, "nanmedian", None) is facts.nanmedian:
                module.nanmedian = numpy_nanmedian
    (t,) = overhead.make_trainees(overhead.MODELS["mlp-sgd64"], 1, 0, torch.device("cpu"))
    out = Path(tempfile.mkdtemp()) / "run"
    with gw.watch(t.model, t.optimizer, out=out, quiet=True, report=False, summary=False) as w:
        for _ in range(a.steps):
            w.log(loss=overhead.train_step(t))
    diagnose(gw.load_run(out))  # imports and caches out of the timing
    times = []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        diagnose(gw.load_run(out))
        times.append(time.perf_counter() - t0)
    run = gw.load_run(out)
    print(f"{len(run.steps)} steps x {len(run.layers)} layers, nanmedian: {'numpy' if a.numpy_median else 'gradwatch'}; "
          f"load + diagnose median {statistics.median(times) * 1e3:.1f} ms over {a.repeats}")


if __name__ == "__main__":
    main()
