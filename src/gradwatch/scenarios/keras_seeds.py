"""Seeds 000, 001 and 004 as the seeds write them: Keras 3 ``Sequential`` models, ``compile`` and
``fit``, recorded by :class:`gradwatch.keras.GradWatch` on whatever backend this process's Keras runs.

The data, sizes, initialisers, optimizers, learning rates, batch size and epochs are those of the
PyTorch scenarios of the same name (:mod:`gradwatch.scenarios.seeds`), so ``gradwatch demo
--backend tensorflow`` (or ``jax``) can put the two side by side. Every variant trains into its own
run directory and is scored as the PyTorch one is (accuracy or MSE), with the first non-finite step
and what the diagnosis found.

This module needs neither torch nor, until a model is built, Keras. KERAS_BACKEND must be set
before the first ``import keras`` of a process, so one process runs one backend::

    python -m gradwatch.scenarios.keras_seeds --backend jax --json results.json --out runs/keras-jax

writes the results as JSON (what the demo reads) and prints one line per finished variant.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import GradwatchError
from .results import VariantResult

BACKENDS = ("tensorflow", "jax")
#: What to install for a backend, as the error messages say it.
EXTRAS = {"tensorflow": "gradwatch[tensorflow]", "jax": "gradwatch[jax]"}
#: Printed on stdout before each finished variant's JSON line (the demo's progress).
PROGRESS_PREFIX = "gradwatch-keras-variant "


@dataclass
class KerasTrial:
    """A compiled Keras model and the data it is fitted and scored on."""

    model: Any
    train: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray] | None  # None: scored on the training data, as the seed did
    metric: str  # "accuracy" (sigmoid output > 0.5) or "mse"
    batch_size: int = 32


@dataclass
class KerasVariant:
    label: str  # the PyTorch variant's label, so the two tables line up
    build: Callable[[int], KerasTrial]  # seed -> trial
    published: str = ""
    full_only: bool = False
    #: What the seed says of this run: "unhealthy" (the failure it shows), "healthy" (a fix), or ""
    #: (not stated plainly: the demo shows it but does not judge agreement on it).
    health: str = ""


@dataclass
class KerasScenario:
    name: str  # the PyTorch scenario's name
    seed_article: str
    title: str
    variants: list[KerasVariant]
    epochs: int
    full_epochs: int
    note: str = ""


# ------------------------------------------------------------------------------------------ data


def _sklearn_datasets() -> Any:
    try:
        from sklearn import datasets
    except ImportError:
        raise GradwatchError("the seed scenarios need scikit-learn for their data; "
                             "install it with `pip install gradwatch[demo]`.") from None
    return datasets


def _f32(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype="float32")


def moons_data() -> tuple[np.ndarray, np.ndarray]:
    """Seed 000: make_moons(3000, noise 0.25, random_state 1234)."""
    x, y = _sklearn_datasets().make_moons(n_samples=3000, shuffle=True, noise=0.25, random_state=1234)
    return _f32(x), _f32(y)[:, None]


def regression_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Seed 001: make_regression(1000, 20 features, noise 0.1, random_state 1), unscaled; 500 train, 500 test."""
    x, y = _sklearn_datasets().make_regression(n_samples=1000, n_features=20, noise=0.1, random_state=1)
    x, y = _f32(x), _f32(y)[:, None]
    return x[:500], y[:500], x[500:], y[500:]


def circles_data() -> tuple[np.ndarray, np.ndarray]:
    """Seed 004: make_circles(1000, factor 0.5, noise 0.1); random_state 0 (the seed sets none)."""
    x, y = _sklearn_datasets().make_circles(n_samples=1000, factor=0.5, noise=0.1, random_state=0)
    return _f32(x), _f32(y)[:, None]


# ---------------------------------------------------------------------------------------- models


def _keras() -> Any:
    try:
        import keras
    except ImportError:
        raise GradwatchError("the Keras scenarios need Keras 3; install it with `pip install gradwatch[tensorflow]` "
                             "or `gradwatch[jax]`.") from None
    return keras


def _initializer(how: str | tuple[str, float, float]) -> Any:
    """``"glorot_uniform"``, ``("uniform", a, b)`` -> RandomUniform(a, b), ``("normal", mean, std)``."""
    keras = _keras()
    if isinstance(how, str):
        return how
    dist, a, b = how
    if dist == "uniform":
        return keras.initializers.RandomUniform(minval=a, maxval=b)
    return keras.initializers.RandomNormal(mean=a, stddev=b)


def _binary_model(inputs: int, hidden: Sequence[int], activation: str, init: str | tuple) -> Any:
    """Seed 000's ``binaryModel`` and seed 004's ``make_mlp``: Dense layers with one initializer,
    a sigmoid output."""
    keras = _keras()
    layers = [keras.Input((inputs,))]
    layers += [keras.layers.Dense(w, activation=activation, kernel_initializer=_initializer(init)) for w in hidden]
    layers.append(keras.layers.Dense(1, activation="sigmoid", kernel_initializer=_initializer(init)))
    return keras.Sequential(layers)


def _moons_trial(activation: str = "sigmoid", hidden: tuple[int, ...] = (10, 10, 5),
                 init: str | tuple = ("uniform", -1.0, 1.0), adam_lr: float | None = None) -> Callable[[int], KerasTrial]:
    def build(seed: int) -> KerasTrial:
        keras = _keras()
        data = moons_data()
        keras.utils.set_random_seed(seed)
        model = _binary_model(2, hidden, activation, init)
        opt = keras.optimizers.Adam(learning_rate=adam_lr) if adam_lr else keras.optimizers.RMSprop()
        model.compile(optimizer=opt, loss="binary_crossentropy")
        return KerasTrial(model, data, None, "accuracy")

    return build


def _regression_trial(**clip: float) -> Callable[[int], KerasTrial]:
    def build(seed: int) -> KerasTrial:
        keras = _keras()
        x, y, xt, yt = regression_data()
        keras.utils.set_random_seed(seed)
        model = keras.Sequential([
            keras.Input((20,)),
            keras.layers.Dense(25, activation="relu", kernel_initializer="he_uniform"),
            keras.layers.Dense(1, activation="linear"),
        ])
        model.compile(loss="mean_squared_error", optimizer=keras.optimizers.SGD(learning_rate=0.01, momentum=0.9, **clip))
        return KerasTrial(model, (x, y), (xt, yt), "mse")

    return build


def _circles_trial(activation: str, init: str | tuple = ("normal", 0.0, 1.0)) -> Callable[[int], KerasTrial]:
    def build(seed: int) -> KerasTrial:
        keras = _keras()
        data = circles_data()
        keras.utils.set_random_seed(seed)
        model = _binary_model(2, (5, 5, 5, 5), activation, init)
        model.compile(optimizer="rmsprop", loss="binary_crossentropy")
        return KerasTrial(model, data, None, "accuracy")

    return build


MOONS = KerasScenario(
    name="moons",
    seed_article="000",
    title="make_moons(3000, noise 0.25); Dense 10-10-5-1 sigmoid, RandomUniform(-1, 1), RMSprop(), batch 32",
    variants=[
        KerasVariant("baseline sigmoid", _moons_trial(), "layer 1 mean grad ~0 (< 0.006)", health="unhealthy"),
        KerasVariant("relu", _moons_trial("relu"), "layer 1 grads vary", health="healthy"),
        KerasVariant("one hidden layer", _moons_trial(hidden=(3,)), "clear grad updates", health="healthy"),
        KerasVariant("glorot_uniform", _moons_trial(init="glorot_uniform"), "layer 1 varies, < layer 4"),
        KerasVariant("adam lr 0.008", _moons_trial(adam_lr=0.008), "grads away from 0, converges"),
    ],
    epochs=30,
    full_epochs=100,
    note="model.fit(x, y, batch_size=32) as the seed's binaryModel; accuracy on the 3000 training points",
)

REGRESSION = KerasScenario(
    name="regression",
    seed_article="001",
    title="make_regression(1000, 20 features, noise 0.1), unscaled targets; Dense 25 relu (he_uniform) + linear, "
          "SGD(0.01, momentum 0.9)",
    variants=[
        KerasVariant("no clipping", _regression_trial(), "NaN", health="unhealthy"),
        KerasVariant("clipnorm 1.0", _regression_trial(clipnorm=1.0), "test MSE 27.43 (train 5.08)", health="healthy"),
        KerasVariant("clipvalue 5.0", _regression_trial(clipvalue=5.0), "test MSE 9.99 (train 9.49)", health="healthy"),
        *[KerasVariant(f"clipnorm {c:g}", _regression_trial(clipnorm=c), "sweep suggested", full_only=True)
          for c in (0.1, 0.5, 2.0, 5.0)],
        *[KerasVariant(f"clipvalue {c:g}", _regression_trial(clipvalue=c), "sweep suggested", full_only=True)
          for c in (0.5, 1.0, 10.0)],
        KerasVariant("global clipnorm 1.0", _regression_trial(global_clipnorm=1.0), "", full_only=True),
    ],
    epochs=100,
    full_epochs=100,
    note="test MSE on the last 500 points; a Keras 3 optimizer takes one of clipnorm, clipvalue and "
         "global_clipnorm, so the combined variant is PyTorch only",
)

CIRCLES = KerasScenario(
    name="circles",
    seed_article="004",
    title="make_circles(1000, factor 0.5, noise 0.1); Dense 5-5-5-5-1, RandomNormal(0, 1), rmsprop, batch 32",
    variants=[
        KerasVariant("sigmoid", _circles_trial("sigmoid"), "0.652 (0.588 via fit)", health="unhealthy"),
        KerasVariant("tanh", _circles_trial("tanh"), "0.994 (0.993 via fit)", health="healthy"),
        KerasVariant("relu", _circles_trial("relu"), "0.995 (0.994 via fit)", health="healthy"),
        KerasVariant("sigmoid + glorot_uniform", _circles_trial("sigmoid", "glorot_uniform"), "recommended, no figure"),
    ],
    epochs=100,
    full_epochs=100,
    note="accuracy on the 1000 training points, as the seed scores it (model.evaluate)",
)

SCENARIOS: dict[str, KerasScenario] = {s.name: s for s in (MOONS, REGRESSION, CIRCLES)}


# -------------------------------------------------------------------------------------- training


def _bce(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(p, 1e-7, 1 - 1e-7)  # Keras' epsilon
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def _predict(model: Any, x: np.ndarray) -> np.ndarray:
    keras = _keras()
    return np.asarray(keras.ops.convert_to_numpy(model(x, training=False)), dtype=np.float64)


def _score(pred: np.ndarray, y: np.ndarray, metric: str) -> float:
    if not np.isfinite(pred).all():
        return math.nan
    if metric == "mse":
        return float(np.mean((pred - y) ** 2))
    return float(np.mean((pred > 0.5) == (y > 0.5)))


def run_variant(variant: KerasVariant, out: str | os.PathLike[str], *, epochs: int, seed: int = 0,
                **watch_options: Any) -> VariantResult:
    """Fit one variant under GradWatch into ``out`` and score it."""
    from ..keras import GradWatch
    from ..report.compare import summarize
    from ..store import load_run

    keras = _keras()
    trial = variant.build(seed)
    x, y = trial.train
    opts = {"quiet": True, "report": False, "overwrite": True, **watch_options}
    callback = GradWatch(out, **opts)
    t0 = time.perf_counter()
    trial.model.fit(x, y, batch_size=trial.batch_size, epochs=epochs, verbose=0, callbacks=[callback])
    seconds = time.perf_counter() - t0
    steps = int(np.asarray(keras.ops.convert_to_numpy(trial.model.optimizer.iterations)))
    pred = _predict(trial.model, x)
    final = (float(np.mean((pred - y) ** 2)) if trial.metric == "mse" else _bce(pred, y)) if np.isfinite(pred).all() \
        else math.nan
    tx, ty = trial.test if trial.test is not None else trial.train
    score = _score(_predict(trial.model, tx) if trial.test is not None else pred, ty, trial.metric)
    run = load_run(out)
    row = summarize(run)
    loss = run.step_series("loss")
    bad = ~np.isfinite(loss) & (run.step_series("loss_logged") > 0)
    return VariantResult(
        label=variant.label, metric=trial.metric, score=score, final_loss=final,
        first_nonfinite_step=int(run.steps[np.argmax(bad)]) if bad.any() else None,
        flow=row.first_layer_rel, findings=row.findings, steps=steps, seconds=seconds, out=str(out),
        published=variant.published,
    )


def slug(label: str) -> str:
    s = "".join(c if c.isalnum() else "-" for c in label.lower())
    while "--" in s:
        s = s.replace("--", "-")
    return s.strip("-")


def selected(scenario_name: str, label: str, only: Sequence[str]) -> bool:
    """Whether ``only`` names this variant: by its label, or as ``scenario/label``."""
    return label in only or f"{scenario_name}/{label}" in only


def variants_of(scenario: KerasScenario, full: bool, only: Sequence[str] | None = None) -> list[KerasVariant]:
    """The variants a run trains: the quick ones (all with ``full``), or those ``only`` names
    (``label`` or ``scenario/label``)."""
    if only:
        return [v for v in scenario.variants if selected(scenario.name, v.label, only)]
    return [v for v in scenario.variants if full or not v.full_only]


def epochs_of(scenario: KerasScenario, full: bool, epochs: int | None = None) -> int:
    return epochs if epochs is not None else scenario.full_epochs if full else scenario.epochs


def run_scenario(scenario: KerasScenario, out: str | os.PathLike[str], *, full: bool = False, epochs: int | None = None,
                 seed: int = 0, only: Sequence[str] | None = None,
                 progress: Callable[[VariantResult], None] | None = None, **watch_options: Any) -> list[VariantResult]:
    """Fit the scenario's variants into ``out/<variant>`` and write ``out/compare.html``."""
    from ..report.compare import write_compare

    root = Path(out)
    n_epochs = epochs_of(scenario, full, epochs)
    results = []
    for v in variants_of(scenario, full, only):
        results.append(run_variant(v, root / slug(v.label), epochs=n_epochs, seed=seed, **watch_options))
        if progress is not None:
            progress(results[-1])
    if results:
        write_compare([r.out for r in results], root / "compare.html")
    return results


def check_names(names: Sequence[str]) -> list[KerasScenario]:
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise GradwatchError(f"no Keras version of scenario {unknown[0]!r}; the Keras scenarios are: "
                             f"{', '.join(SCENARIOS)}.")
    return [SCENARIOS[n] for n in names] if names else list(SCENARIOS.values())


def run_keras_scenarios(
    names: Sequence[str] = (),
    out: str | os.PathLike[str] = "gradwatch-runs/keras-seeds",
    *,
    full: bool = False,
    epochs: int | None = None,
    seed: int = 0,
    only: Sequence[str] | None = None,
    progress: Callable[[str, VariantResult], None] | None = None,
    **watch_options: Any,
) -> list[tuple[KerasScenario, list[VariantResult]]]:
    """Run the Keras scenarios (all, or ``names``) on this process's Keras backend, each into
    ``out/<scenario>``; ``only``: just the variants with these labels."""
    done = []
    for sc in check_names(names):
        report = (lambda r, name=sc.name: progress(name, r)) if progress is not None else None
        done.append((sc, run_scenario(sc, Path(out) / sc.name, full=full, epochs=epochs, seed=seed, only=only,
                                      progress=report, **watch_options)))
    return done


def to_json(done: Sequence[tuple[KerasScenario, Sequence[VariantResult]]], *, backend: str, full: bool,
            epochs: int | None) -> dict[str, Any]:
    import keras

    return {
        "backend": backend,
        "keras": keras.__version__,
        "scenarios": [
            {"name": sc.name, "seed_article": sc.seed_article, "title": sc.title, "note": sc.note,
             "epochs": epochs_of(sc, full, epochs), "results": [asdict(r) for r in results]}
            for sc, results in done
        ],
    }


def results_from_json(data: dict[str, Any]) -> dict[str, list[VariantResult]]:
    """Scenario name -> its variants' results, from :func:`to_json`'s document."""
    return {s["name"]: [VariantResult(**r) for r in s["results"]] for s in data["scenarios"]}


def backend_error(backend: str) -> str | None:
    """Why Keras on ``backend`` cannot run here (one sentence), or None; imports nothing."""
    import importlib.util

    if backend not in BACKENDS:
        return f"the Keras scenarios run on {' or '.join(BACKENDS)}, not {backend!r}."
    needed = {"tensorflow": ("tensorflow", "keras"), "jax": ("jax", "jaxlib", "keras")}[backend]
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        name = {"tensorflow": "TensorFlow", "jax": "JAX"}[backend]
        return (f"Keras on {backend} needs {name} and Keras 3, and this Python lacks {', '.join(missing)}; "
                f"install them with `pip install {EXTRAS[backend]}`.")
    return None


def _set_backend(backend: str) -> None:
    """Make this process's Keras run ``backend`` (before its first ``import keras``)."""
    if "keras" in sys.modules:
        current = sys.modules["keras"].backend.backend()
        if current != backend:
            raise GradwatchError(f"Keras is already imported here on {current!r}; run the {backend} scenarios in a "
                                 f"new process (KERAS_BACKEND={backend}).")
        return
    problem = backend_error(backend)
    if problem is not None:
        raise GradwatchError(problem)
    os.environ["KERAS_BACKEND"] = backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gradwatch.scenarios.keras_seeds",
                                 description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("scenarios", nargs="*", metavar="SCENARIO", help=f"scenarios to run (default all: {', '.join(SCENARIOS)})")
    ap.add_argument("--backend", choices=BACKENDS, default=os.environ.get("KERAS_BACKEND") if
                    os.environ.get("KERAS_BACKEND") in BACKENDS else "tensorflow", help="Keras backend (default tensorflow)")
    ap.add_argument("--json", metavar="FILE", help="write the results here as JSON")
    ap.add_argument("--out", metavar="DIR", default="gradwatch-runs/keras-seeds", help="parent directory of the runs")
    ap.add_argument("--full", action="store_true", help="the seeds' own epochs, every variant")
    ap.add_argument("--epochs", type=int, default=None, help="epochs for every scenario")
    ap.add_argument("--seed", type=int, default=0, help="keras.utils.set_random_seed before each model (default 0)")
    ap.add_argument("--variant", action="append", metavar="LABEL",
                    help="run only this variant, by label or SCENARIO/LABEL (repeatable)")
    ap.add_argument("--flush-every", type=int, default=50, metavar="N")
    ap.add_argument("--sample-every", type=int, default=50, metavar="N")
    ns = ap.parse_args(argv)
    try:
        check_names(ns.scenarios)
        _set_backend(ns.backend)

        def progress(name: str, r: VariantResult) -> None:
            print(PROGRESS_PREFIX + json.dumps({"scenario": name, "label": r.label, "seconds": r.seconds,
                                                "findings": r.findings}), flush=True)

        done = run_keras_scenarios(ns.scenarios, ns.out, full=ns.full, epochs=ns.epochs, seed=ns.seed, only=ns.variant,
                                   progress=progress, flush_every=ns.flush_every, sample_every=ns.sample_every)
    except GradwatchError as e:
        print(f"gradwatch: error: {e}", file=sys.stderr)
        return 2
    doc = to_json(done, backend=ns.backend, full=ns.full, epochs=ns.epochs)
    if ns.json:
        Path(ns.json).write_text(json.dumps(doc, indent=1))
    else:
        print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
