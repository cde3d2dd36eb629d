#!/usr/bin/env python
"""What gradwatch costs a Keras 3 ``model.fit`` step on TensorFlow, JAX and torch.

For each backend (one child process per backend: KERAS_BACKEND must be set before ``import
keras``) and each model, fits with and without ``gradwatch.keras.GradWatch`` take turns, in one
process, and the table gives the step time of each and their ratio:

    .venv/bin/python benchmarks/keras_backends.py                      # all backends, ~10 min on 2 cores
    .venv/bin/python benchmarks/keras_backends.py --backend jax        # one backend
    .venv/bin/python benchmarks/keras_backends.py --quick              # smoke run, numbers meaningless
    .venv/bin/python benchmarks/keras_backends.py --variants           # also the rows that say where the time goes

Models (Keras versions of the shapes in src/gradwatch/scenarios/seeds.py and regression.py, plus a
deeper one):

* ``moons`` (seed 000): make_moons(3000, noise 0.25), Dense 10-10-5 sigmoid + Dense(1, sigmoid),
  U(-1, 1) init, RMSprop (Keras defaults), binary cross-entropy, batch 32.
* ``circles`` (seed 004): make_circles(1000, factor 0.5, noise 0.1), 4x Dense(5, sigmoid) +
  Dense(1, sigmoid), N(0, 1) init, RMSprop, binary cross-entropy, batch 32.
* ``regression`` (seed 001): make_regression(1000, 20 features), Dense(25, relu, he_uniform) +
  Dense(1), SGD(0.01, momentum 0.9), MSE, batch 32. The targets are standardised here (the seed's
  unscaled ones go NaN within a few steps; this benchmark times a finite steady state).
* ``deep``: 12x Dense(256, relu) + Dense(10), 256 random features, 10 classes, Adam, sparse
  categorical cross-entropy, batch 64: more layers and more work per step.

Method of measurement:

* Every fit gets a fresh model built from the same seed (identical weights) and a fresh optimizer,
  and runs one epoch of ``--steps`` batches (the data is tiled to that length; ``shuffle=False``).
  A fresh model is needed: GradWatch changes the optimizer (its ring variables) and, on JAX,
  rebuilds the train function, so reusing a model would time a different program. The first
  fit of each arm is a warm-up and is not counted.
* The arms of one model take turns in rounds (ABAB..., the order reversed every other round), so
  machine drift hits all of them alike; every figure is the median over rounds, and each ratio is
  the median over rounds of the ratio within a round.
* A timing callback notes ``time.perf_counter()`` at each ``on_train_batch_begin`` and at
  ``on_epoch_end``. It deliberately does not implement ``on_train_batch_end``: on JAX and torch,
  Keras 3 runs the batch-end callbacks in a background thread (without waiting for the step's
  logs) unless some callback implements ``on_train_batch_end``, and a timing callback that did
  would change the unwatched arm. ``on_epoch_end`` comes after Keras has waited for every step's
  logs, so the last interval contains the drain of any work still queued.
* A step's time is the interval from its batch begin to the next one (the last: to the epoch's
  end). It includes the batch-end callbacks of that step: gradwatch's host side, and its flush on
  every 50th step.
* Steady state is steps ``--skip`` (default 100) to the end: gradwatch samples every other step in
  steps 0-9 and every 10th up to step 99, then every 50th; with 600 steps the steady window holds
  exactly 10 sampled steps and 10 flushes in 500 steps. "median" is the median step time there
  (an ordinary step); "mean" is the wall time of the window over its steps (sampled steps, flushes
  and any queued work included). The first ``--skip`` steps are also timed (step 0, which
  compiles, left out) and reported as a mean.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("tensorflow", "jax", "torch")
MODELS = ("moons", "circles", "regression", "deep")

#: Arms of the main table, then the ones --variants adds. name -> (GradWatch options or None, extra no-op
#: batch-end callback).
MAIN_ARMS = {
    "unwatched": (None, False),
    "gradwatch": ({}, False),
}
VARIANT_ARMS = {
    "unwatched + no-op on_train_batch_end": (None, True),
    "gradwatch, norms only (sample_every=10**9)": ({"sample_every": 10**9}, False),
    "gradwatch, norms only, flush_every=500": ({"sample_every": 10**9, "flush_every": 500}, False),
}


# --------------------------------------------------------------------------------------------
# The child: one backend
# --------------------------------------------------------------------------------------------


def model_spec(name: str, keras, np, steps: int):  # type: ignore[no-untyped-def]
    """(build() -> compiled model, x, y, batch, description) for ``name``; x, y tiled to ``steps`` batches."""
    from sklearn.datasets import make_circles, make_moons, make_regression

    layers, init = keras.layers, keras.initializers

    def sequential(inputs: int, dense: list) -> object:  # type: ignore[type-arg]
        return keras.Sequential([keras.Input((inputs,)), *dense])

    if name == "moons":
        x, y = make_moons(n_samples=3000, noise=0.25, random_state=0)
        batch, desc = 32, "make_moons; Dense 10-10-5-1 sigmoid, U(-1,1), RMSprop"

        def build():  # type: ignore[no-untyped-def]
            u = lambda: init.RandomUniform(-1.0, 1.0)  # noqa: E731
            m = sequential(2, [layers.Dense(w, "sigmoid", kernel_initializer=u()) for w in (10, 10, 5, 1)])
            m.compile(optimizer=keras.optimizers.RMSprop(), loss="binary_crossentropy")
            return m
    elif name == "circles":
        x, y = make_circles(n_samples=1000, factor=0.5, noise=0.1, random_state=0)
        batch, desc = 32, "make_circles; 4x Dense(5) sigmoid + 1, N(0,1), RMSprop"

        def build():  # type: ignore[no-untyped-def]
            n = lambda: init.RandomNormal(0.0, 1.0)  # noqa: E731
            m = sequential(2, [layers.Dense(w, "sigmoid", kernel_initializer=n()) for w in (5, 5, 5, 5, 1)])
            m.compile(optimizer=keras.optimizers.RMSprop(), loss="binary_crossentropy")
            return m
    elif name == "regression":
        x, y = make_regression(n_samples=1000, n_features=20, noise=0.1, random_state=1)
        y = (y - y.mean()) / y.std()
        batch, desc = 32, "make_regression; Dense(25) relu + 1, SGD(0.01, m 0.9)"

        def build():  # type: ignore[no-untyped-def]
            m = sequential(20, [layers.Dense(25, "relu", kernel_initializer="he_uniform"), layers.Dense(1)])
            m.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), loss="mse")
            return m
    elif name == "deep":
        rng = np.random.default_rng(0)
        x, y = rng.normal(size=(64 * 50, 256)), rng.integers(0, 10, size=64 * 50)
        batch, desc = 64, "12x Dense(256) relu + Dense(10), Adam"

        def build():  # type: ignore[no-untyped-def]
            m = sequential(256, [*(layers.Dense(256, "relu") for _ in range(12)), layers.Dense(10)])
            m.compile(optimizer=keras.optimizers.Adam(),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            return m
    else:
        raise SystemExit(f"unknown model {name!r}")
    x = np.asarray(x, np.float32)
    y = np.asarray(y, np.float32 if name != "deep" else np.int32)
    reps = -(-steps * batch // len(x))
    x, y = np.tile(x, (reps, 1))[: steps * batch], np.tile(y, reps)[: steps * batch]

    def seeded_build():  # type: ignore[no-untyped-def]
        keras.utils.set_random_seed(0)  # the same initial weights in every fit
        return build()

    return seeded_build, x, y, batch, desc


def run_child(args: argparse.Namespace) -> dict:  # type: ignore[type-arg]
    backend = args.child
    os.environ["KERAS_BACKEND"] = backend
    import keras
    import numpy as np

    assert keras.backend.backend() == backend, keras.backend.backend()
    sys.path.insert(0, str(REPO_ROOT / "src"))
    import gradwatch
    from gradwatch.keras import GradWatch

    class Timer(keras.callbacks.Callback):
        """Batch-begin times and the epoch's end; no on_train_batch_end (see the module docstring)."""

        def on_train_begin(self, logs=None):  # type: ignore[no-untyped-def]
            self.begins: list[float] = []
            self.end = None

        def on_train_batch_begin(self, batch, logs=None):  # type: ignore[no-untyped-def]
            self.begins.append(time.perf_counter())

        def on_epoch_end(self, epoch, logs=None):  # type: ignore[no-untyped-def]
            self.end = time.perf_counter()

    class BatchEnd(keras.callbacks.Callback):
        """Does nothing, but implements on_train_batch_end (as GradWatch does)."""

        def on_train_batch_end(self, batch, logs=None):  # type: ignore[no-untyped-def]
            pass

    arms = dict(MAIN_ARMS)
    if args.variants:
        arms.update(VARIANT_ARMS)
    out: dict = {"backend": backend, "versions": versions(backend), "models": {}}  # type: ignore[type-arg]
    with tempfile.TemporaryDirectory(prefix="gradwatch-keras-bench-") as tmp:
        for model_name in args.models:
            build, x, y, batch, desc = model_spec(model_name, keras, np, args.steps)
            log(f"[{backend}] {model_name}: {desc}, batch {batch}, {args.steps} steps per fit")
            rec: dict = {"desc": desc, "batch": batch, "params": None, "arms": {a: [] for a in arms}}  # type: ignore[type-arg]
            names = list(arms)
            for r in range(args.rounds + 1):  # round 0: warm-up, not counted
                order = names if r % 2 == 0 else names[::-1]
                for arm in order:
                    options, batch_end = arms[arm]
                    model = build()
                    rec["params"] = int(model.count_params())
                    timer = Timer()
                    cbs = [timer]
                    if batch_end:
                        cbs.append(BatchEnd())
                    if options is not None:
                        cbs.append(GradWatch(Path(tmp) / f"{model_name}-{r}-{arm[:9]}", overwrite=True, quiet=True,
                                             report=False, **options))
                    t0 = time.perf_counter()
                    model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0, callbacks=cbs)
                    wall = time.perf_counter() - t0
                    times = timer.begins + [timer.end]
                    if len(times) != args.steps + 1:
                        raise SystemExit(f"{model_name}/{arm}: expected {args.steps} steps, timed {len(times) - 1}")
                    intervals = [(b - a) * 1e3 for a, b in zip(times, times[1:])]
                    if r > 0:
                        rec["arms"][arm].append({"ms": intervals, "fit_s": wall})
                    log(f"  round {r} {arm}: fit {wall:.1f} s, step 0 {intervals[0] / 1e3:.2f} s, "
                        f"median {statistics.median(intervals[args.skip:]):.3f} ms")
                    del model
            out["models"][model_name] = rec
    if not gradwatch.__file__.startswith(str(REPO_ROOT / "src")):
        log(f"note: timed the installed gradwatch at {gradwatch.__file__}")
    return out


def versions(backend: str) -> dict[str, str]:
    import keras
    import numpy as np

    v = {"keras": keras.__version__, "numpy": np.__version__}
    if backend == "tensorflow":
        import tensorflow as tf

        v["tensorflow"] = tf.__version__
    elif backend == "jax":
        import jax
        import jaxlib

        v["jax"] = jax.__version__
        v["jaxlib"] = jaxlib.__version__
    else:
        import torch

        v["torch"] = torch.__version__
        v["torch threads"] = str(torch.get_num_threads())
    return v


# --------------------------------------------------------------------------------------------
# Summaries (the parent)
# --------------------------------------------------------------------------------------------


def fit_stats(fit: dict, skip: int) -> dict[str, float]:  # type: ignore[type-arg]
    ms = fit["ms"]
    steady = ms[skip:]
    return {
        "median": statistics.median(steady),
        "mean": statistics.fmean(steady),
        "first": statistics.fmean(ms[1:skip]) if skip > 1 else float("nan"),  # step 0 compiles
        "step0": ms[0],
    }


def arm_summary(fits: list, base: list, skip: int) -> dict[str, float]:  # type: ignore[type-arg]
    """Median over rounds of each statistic, and of each within-round ratio against ``base``."""
    mine = [fit_stats(f, skip) for f in fits]
    ref = [fit_stats(f, skip) for f in base]
    out = {k: statistics.median(s[k] for s in mine) for k in mine[0]}
    for k in ("median", "mean", "first"):
        ratios = [m[k] / b[k] for m, b in zip(mine, ref)]
        out[f"ratio_{k}"] = statistics.median(ratios)
        out[f"ratio_{k}_lo"], out[f"ratio_{k}_hi"] = min(ratios), max(ratios)
    return out


def md_table(headers: list[str], rows: list[list[str]], numeric_from: int) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if i >= numeric_from else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if i >= numeric_from else "-" * (w + 2)
                          for i, w in enumerate(widths)) + "|"
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def report(results: list[dict], args: argparse.Namespace, wall: float) -> str:  # type: ignore[type-arg]
    skip, steps = args.skip, args.steps
    lines = [
        f"- command: {shlex.join(sys.orig_argv)}",
        f"- cpu: {cpu_model()} ({os.cpu_count()} logical cores); python {platform.python_version()}, "
        f"{platform.platform()}",
    ]
    for res in results:
        lines.append(f"- {res['backend']}: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items()))
    lines += [
        f"- {args.rounds} rounds (+1 warm-up) x {steps} steps per fit per arm; steady state = steps {skip}-{steps - 1}; "
        "median/mean over those steps per fit, then the median over rounds; ratios: median over rounds of "
        "the within-round ratio",
        f"- wall time: {wall:.0f} s",
        "",
    ]
    headers = ["backend", "model", "params", "batch", "unwatched median ms", "watched median ms", "ratio (median)",
               "ratio (mean)", "unwatched mean ms", "watched mean ms", f"ratio steps 1-{skip - 1} (mean)"]
    rows = []
    for res in results:
        for name, rec in res["models"].items():
            base = rec["arms"]["unwatched"]
            u = arm_summary(base, base, skip)
            w = arm_summary(rec["arms"]["gradwatch"], base, skip)
            rows.append([res["backend"], name, str(rec["params"]), str(rec["batch"]), f"{u['median']:.3f}",
                         f"{w['median']:.3f}", f"{w['ratio_median']:.2f}x", f"{w['ratio_mean']:.2f}x",
                         f"{u['mean']:.3f}", f"{w['mean']:.3f}", f"{w['ratio_first']:.2f}x"])
    lines.append(md_table(headers, rows, numeric_from=2))
    if args.variants:
        lines += ["", f"Where the time goes (same runs; ratios against 'unwatched' of the same round; range over "
                      f"{args.rounds} rounds in brackets):", ""]
        vrows = []
        for res in results:
            for name, rec in res["models"].items():
                base = rec["arms"]["unwatched"]
                for arm, fits in rec["arms"].items():
                    s = arm_summary(fits, base, skip)
                    vrows.append([res["backend"], name, arm, f"{s['median']:.3f}", f"{s['mean']:.3f}",
                                  f"{s['ratio_median']:.2f}x", f"{s['ratio_mean']:.2f}x "
                                  f"({s['ratio_mean_lo']:.2f}-{s['ratio_mean_hi']:.2f})", f"{s['step0'] / 1e3:.2f}"])
        lines.append(md_table(["backend", "model", "arm", "median ms", "mean ms", "ratio (median)", "ratio (mean)",
                               "step 0 s (compile)"], vrows, numeric_from=3))
    if args.quick:
        lines += ["", "- QUICK SMOKE RUN: too few steps and rounds for the numbers to mean anything."]
    return "\n".join(lines)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="all", choices=("all", *BACKENDS), help="default: all, one process each")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of: %(default)s")
    p.add_argument("--rounds", type=int, default=None, help="counted rounds per model (default 3; 1 with --quick)")
    p.add_argument("--steps", type=int, default=None, help="steps per fit (default 600; 60 with --quick)")
    p.add_argument("--skip", type=int, default=None,
                   help="steps left out of the steady state (default 100; 20 with --quick)")
    p.add_argument("--variants", action="store_true",
                   help="also time a no-op batch-end callback and gradwatch with norms only (flush 50 and 500)")
    p.add_argument("--quick", action="store_true", help="smoke run: few steps, numbers meaningless")
    p.add_argument("--json", type=Path, default=None, help="also write every step time here")
    p.add_argument("--child", choices=BACKENDS, help=argparse.SUPPRESS)
    p.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name, full, quick in (("rounds", 3, 1), ("steps", 600, 60), ("skip", 100, 20)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in args.models if m not in MODELS]
    if bad or not args.models:
        p.error(f"--models: choose from {', '.join(MODELS)}")
    if args.rounds < 1 or args.skip < 2 or args.steps <= args.skip:
        p.error("need --rounds >= 1, --skip >= 2 and --steps > --skip")
    return args


def child_argv(args: argparse.Namespace, backend: str, out: Path) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", backend, "--child-out", str(out),
            "--models", ",".join(args.models), "--rounds", str(args.rounds), "--steps", str(args.steps),
            "--skip", str(args.skip)]
    return argv + (["--variants"] if args.variants else [])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        args.child_out.write_text(json.dumps(run_child(args)))
        return 0
    started = time.perf_counter()
    results = []
    backends = BACKENDS if args.backend == "all" else (args.backend,)
    with tempfile.TemporaryDirectory(prefix="gradwatch-keras-bench-") as tmp:
        for backend in backends:
            out = Path(tmp) / f"{backend}.json"
            env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2"}
            proc = subprocess.run(child_argv(args, backend, out), env=env)
            if proc.returncode != 0:
                log(f"{backend}: the benchmark process failed (exit {proc.returncode}); left out of the table")
                continue
            results.append(json.loads(out.read_text()))
    if not results:
        return 1
    print(report(results, args, time.perf_counter() - started))
    if args.json:
        args.json.write_text(json.dumps({"command": sys.orig_argv, "args": {k: str(v) for k, v in vars(args).items()},
                                         "results": results}))
    return 0 if len(results) == len(backends) else 1


if __name__ == "__main__":
    sys.exit(main())
