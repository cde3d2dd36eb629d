#!/usr/bin/env python
"""What gradwatch costs a Keras 3 ``model.fit`` step on TensorFlow, JAX and torch.

For each backend (one child process per backend: KERAS_BACKEND must be set before ``import
keras``) and each model, fits with and without ``gradwatch.keras.GradWatch`` take turns, in one
process, and the table gives the step time of each and their ratio:

    .venv/bin/python benchmarks/keras_backends.py                 # all backends, ~6 min on 2 cores
    .venv/bin/python benchmarks/keras_backends.py --backend jax   # one backend
    .venv/bin/python benchmarks/keras_backends.py --quick         # smoke run (~1.5 min), numbers meaningless
    .venv/bin/python benchmarks/keras_backends.py --variants --rounds 2   # + where the time goes, ~10 min

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
  rebuilds the train function, so reusing a model would time a different program. Each arm's
  first fit (60 steps) is a warm-up and is not counted. After every watched fit the run it wrote
  is read back and checked (one row per step, finite, non-zero gradient norms).
* One intra-op thread per backend by default (``--threads``): on a 2-core machine that other
  processes share, two-thread OpenMP/Eigen kernels wait at barriers for a descheduled partner and
  a step gets up to 10x slower and erratic (seen with torch here). The CPU time other processes
  used meanwhile is measured and printed per model.
* The arms of one model take turns in rounds (ABAB..., the order reversed every other round), so
  machine drift hits all of them alike; every figure is the median over rounds, and each ratio is
  the median over rounds of the ratio within a round.
* A timing callback notes ``time.perf_counter()`` at each ``on_train_batch_begin`` and at
  ``on_epoch_end``. It deliberately does not implement ``on_train_batch_end``: on JAX and torch,
  Keras 3 runs the batch-end callbacks in a background thread (without waiting for the step's
  logs) unless some callback implements ``on_train_batch_end``, and a timing callback that did
  would change the unwatched arm. ``on_epoch_end`` comes after Keras has waited for every step's
  logs, so the last interval contains the drain of any work still queued. On JAX, whose steps are
  dispatched asynchronously, the timer waits once for the device at the first steady step, so the
  steady window starts with nothing queued (TensorFlow and torch on CPU return from a step when it
  has run).
* A step's time is the interval from its batch begin to the next one (the last: to the epoch's
  end). It includes the batch-end callbacks of that step: gradwatch's host side, and its flush on
  every 50th step.
* Steady state is steps ``--skip`` (default 100) to the end: gradwatch samples every other step in
  steps 0-9 and every 10th up to step 99, then every 50th; with 600 steps the steady window holds
  exactly 10 sampled steps and 10 flushes in 500 steps. "median" is the median step time there
  (an ordinary step); "mean" is the wall time of the window over its steps (sampled steps, flushes
  and any queued work included): the throughput, the figure to trust. Where the unwatched arm
  runs Keras' batch-end callbacks asynchronously (JAX) and the host is ahead of the device, its
  median is the host's time per step, not the device's. The first ``--skip`` steps are also timed
  (step 0, which compiles, left out) and reported as a mean; step 0 (trace and compile) is in the
  --variants table.
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
    "gradwatch, norms only (sample_every=10**5)": ({"sample_every": 10**5}, False),
    "gradwatch, norms only, flush_every=500": ({"sample_every": 10**5, "flush_every": 500}, False),
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


class ForeignCpu:
    """Share of the machine's CPU used by processes outside this one (and its children) since
    construction (Linux; None elsewhere): above a few percent, the rows it covers are contaminated."""

    def __init__(self) -> None:
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._wall0, self._start = time.perf_counter(), self._sample()

    def _sample(self) -> tuple[float, float] | None:
        try:
            busy = sum(int(f) for i, f in enumerate(Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9])
                       if i != 3 and i != 4)  # all but idle and iowait
            own = os.times()
            return busy / self._tick, own.user + own.system + own.children_user + own.children_system
        except (OSError, ValueError):
            return None

    def share(self) -> float | None:
        end = self._sample()
        if self._start is None or end is None:
            return None
        foreign = (end[0] - self._start[0]) - (end[1] - self._start[1])
        return max(foreign, 0.0) / ((time.perf_counter() - self._wall0) * (os.cpu_count() or 1))


def set_threads(backend: str, threads: int) -> None:
    """Intra-op threads of the backend (0: its default). Call before the backend runs an op."""
    if not threads:
        return
    if backend == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    elif backend == "torch":
        import torch

        torch.set_num_threads(threads)
    # jax: XLA_FLAGS, set by the parent before the process starts (see child_env)


def run_child(args: argparse.Namespace) -> dict:  # type: ignore[type-arg]
    backend = args.child
    os.environ["KERAS_BACKEND"] = backend
    import keras
    import numpy as np

    assert keras.backend.backend() == backend, keras.backend.backend()
    set_threads(backend, args.threads)
    sys.path.insert(0, str(REPO_ROOT / "src"))
    import gradwatch
    from gradwatch.keras import GradWatch
    from gradwatch.store import load_run

    if backend == "jax":
        import jax

        def wait_for_device(model) -> None:  # type: ignore[no-untyped-def]
            # fit() keeps the live state in model._jax_state between steps; its arrays are ready
            # once every step dispatched so far has run.
            jax.block_until_ready(getattr(model, "_jax_state", None))
    else:
        def wait_for_device(model) -> None:  # type: ignore[no-untyped-def]
            pass  # TensorFlow and torch on CPU return from a step when it has run

    class Timer(keras.callbacks.Callback):
        """Batch-begin times and the epoch's end; no on_train_batch_end (see the module docstring)."""

        def __init__(self, sync_at: int):
            super().__init__()
            self.sync_at = sync_at

        def on_train_begin(self, logs=None):  # type: ignore[no-untyped-def]
            self.begins: list[float] = []
            self.end = None

        def on_train_batch_begin(self, batch, logs=None):  # type: ignore[no-untyped-def]
            if batch == self.sync_at:  # the steady window starts with no step still queued
                wait_for_device(self.model)
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

        def fit(build, x, y, batch, arm: str, run: str, steps: int):  # type: ignore[no-untyped-def]
            """One fit of ``arm`` on a fresh model: the ms of each step, the fit's wall seconds."""
            options, batch_end = arms[arm]
            model = build()
            timer = Timer(sync_at=args.skip)
            cbs = [timer] + ([BatchEnd()] if batch_end else [])
            if options is not None:
                cbs.append(GradWatch(Path(tmp) / run, overwrite=True, quiet=True, report=False, **options))
            t0 = time.perf_counter()
            model.fit(x[: steps * batch], y[: steps * batch], batch_size=batch, epochs=1, shuffle=False, verbose=0,
                      callbacks=cbs)
            wall = time.perf_counter() - t0
            times = timer.begins + [timer.end]
            if len(times) != steps + 1 or timer.end is None:
                raise SystemExit(f"{run}: expected {steps} timed steps, got {len(times) - 1}")
            if options is not None:  # the watched fit recorded what it should have
                norms = load_run(Path(tmp) / run).layer_series("grad_norm")
                if len(norms) != steps or not np.isfinite(norms).all() or not (norms[-1] > 0).any():
                    raise SystemExit(f"{run}: the record is wrong ({len(norms)} steps, last norms {norms[-1]})")
            return [(b - a) * 1e3 for a, b in zip(times, times[1:])], wall, int(model.count_params())

        for model_name in args.models:
            build, x, y, batch, desc = model_spec(model_name, keras, np, args.steps)
            log(f"[{backend}] {model_name}: {desc}, batch {batch}, {args.steps} steps per fit")
            meter = ForeignCpu()
            rec: dict = {"desc": desc, "batch": batch, "params": None, "arms": {a: [] for a in arms}}  # type: ignore[type-arg]
            names = list(arms)
            if not args.quick:  # warm-up: one short fit per arm (first-call costs of the process), not counted
                for arm in names:
                    fit(build, x, y, batch, arm, f"{model_name}-warmup-{names.index(arm)}", min(args.steps, 60))
            for r in range(args.rounds):
                order = names if r % 2 == 0 else names[::-1]
                for arm in order:
                    ms, wall, rec["params"] = fit(build, x, y, batch, arm, f"{model_name}-{r}-{names.index(arm)}",
                                                  args.steps)
                    rec["arms"][arm].append({"ms": ms, "fit_s": wall})
                    log(f"  round {r + 1} {arm}: fit {wall:.1f} s, step 0 {ms[0] / 1e3:.2f} s, "
                        f"steady median {statistics.median(ms[args.skip:]):.3f} ms, "
                        f"mean {statistics.fmean(ms[args.skip:]):.3f} ms")
            rec["foreign_cpu"] = meter.share()
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


def phases(fit: dict, skip: int) -> dict[str, float]:  # type: ignore[type-arg]
    """Median ms, over the steady steps of one fit, of: ordinary steps; steps 50k (sampled by
    gradwatch; on torch also where its flush runs); steps 50k-1 (on TensorFlow and JAX their interval
    ends with gradwatch's flush, run in on_train_batch_end)."""
    ms = fit["ms"]
    idx = range(skip, len(ms))
    return {
        "ordinary": statistics.median(ms[i] for i in idx if i % 50 not in (0, 49)),
        "at_50k": statistics.median(ms[i] for i in idx if i % 50 == 0),
        "at_50k_1": statistics.median(ms[i] for i in idx if i % 50 == 49),
    }


def phase_rows(results: list[dict], skip: int) -> list[list[str]]:  # type: ignore[type-arg]
    rows = []
    for res in results:
        for name, rec in res["models"].items():
            u = [phases(f, skip) for f in rec["arms"]["unwatched"]]
            w = [phases(f, skip) for f in rec["arms"]["gradwatch"]]
            med = lambda xs, k: statistics.median(x[k] for x in xs)  # noqa: E731
            extra = lambda k: statistics.median(x[k] - x["ordinary"] for x in w)  # noqa: E731
            rows.append([res["backend"], name, f"{med(u, 'ordinary'):.3f}", f"{med(w, 'ordinary'):.3f}",
                         f"{extra('at_50k'):+.2f}", f"{extra('at_50k_1'):+.2f}"])
    return rows


def report(results: list[dict], args: argparse.Namespace, wall: float,  # type: ignore[type-arg]
           command: list[str] | None = None) -> str:
    skip, steps = args.skip, args.steps
    lines = [
        f"- command: {shlex.join(command or sys.orig_argv)}",
        f"- cpu: {cpu_model()} ({os.cpu_count()} logical cores); python {platform.python_version()}, "
        f"{platform.platform()}",
    ]
    for res in results:
        lines.append(f"- {res['backend']}: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items()))
        shares = [(m, rec.get("foreign_cpu")) for m, rec in res["models"].items()]
        if all(v is not None for _, v in shares):
            lines.append("  CPU used by other processes meanwhile (share of the machine): "
                         + ", ".join(f"{m} {v:.0%}" for m, v in shares))
    lines += [
        f"- intra-op threads per backend: {args.threads or 'framework defaults'}",
        f"- {args.rounds} rounds x {steps} steps per fit per arm"
        f"{'' if args.quick else ' (after one warm-up fit per arm)'}; steady state = steps {skip}-{steps - 1}; "
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
        lines += ["", "Steady steps by kind (median ms over the steps of a fit, then over rounds; extra = gradwatch's "
                      "step minus its ordinary step):", ""]
        lines.append(md_table(["backend", "model", "ordinary, unwatched", "ordinary, gradwatch",
                               "extra at step 50k (sampled; torch: + flush)", "extra at step 50k-1 (TF/JAX: + flush)"],
                              phase_rows(results, skip), numeric_from=2))
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
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads per backend (default 1; 0: each framework's own default)")
    p.add_argument("--quick", action="store_true", help="smoke run: few steps, numbers meaningless")
    p.add_argument("--json", type=Path, default=None, help="also write every step time here")
    p.add_argument("--report-from", type=Path, default=None, metavar="JSON",
                   help="print the tables of a run saved with --json (measures nothing)")
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
            "--skip", str(args.skip), "--threads", str(args.threads)]
    if args.quick:
        argv.append("--quick")
    return argv + (["--variants"] if args.variants else [])


def child_env(backend: str, threads: int) -> dict[str, str]:
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
        if backend == "jax" and threads == 1:  # XLA's CPU client takes no thread count but this switch
            flags = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
            env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flags}".strip()
    return env


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        args.child_out.write_text(json.dumps(run_child(args)))
        return 0
    if args.report_from:
        saved = json.loads(args.report_from.read_text())
        run_args = argparse.Namespace(**saved["args"])
        print(report(saved["results"], run_args, saved["wall_s"], command=saved["command"]))
        return 0
    started = time.perf_counter()
    results = []
    backends = BACKENDS if args.backend == "all" else (args.backend,)
    with tempfile.TemporaryDirectory(prefix="gradwatch-keras-bench-") as tmp:
        for backend in backends:
            out = Path(tmp) / f"{backend}.json"
            proc = subprocess.run(child_argv(args, backend, out), env=child_env(backend, args.threads))
            if proc.returncode != 0:
                log(f"{backend}: the benchmark process failed (exit {proc.returncode}); left out of the table")
                continue
            results.append(json.loads(out.read_text()))
    if not results:
        return 1
    wall = time.perf_counter() - started
    print(report(results, args, wall))
    if args.json:
        saved_args = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        args.json.write_text(json.dumps({"command": sys.orig_argv, "args": saved_args, "wall_s": wall,
                                         "results": results}))
    return 0 if len(results) == len(backends) else 1


if __name__ == "__main__":
    sys.exit(main())
