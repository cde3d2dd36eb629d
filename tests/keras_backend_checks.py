"""Checks of Keras recording on one compiled backend, run in a child process (KERAS_BACKEND must be
set before the first ``import keras``, and the test process runs Keras on torch):

    KERAS_BACKEND=jax python tests/keras_backend_checks.py OUT_DIR  ->  JSON of measured facts

test_keras_compiled.py runs it once per backend and asserts on the facts.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("GRADWATCH_REPORT", "0")
import keras  # noqa: E402

import gradwatch as gw  # noqa: E402
import gradwatch.keras as gwk  # noqa: E402
from gradwatch.keras import GradWatch  # noqa: E402

BACKEND = keras.backend.backend()
OPTS = {"quiet": True, "report": False, "overwrite": True}


def mlp(act: str, depth: int, width: int = 16, inputs: int = 8, init: str = "glorot_uniform", out_act: str = "sigmoid"):
    keras.utils.set_random_seed(0)
    layers: list[Any] = [keras.Input((inputs,))]
    layers += [keras.layers.Dense(width, activation=act, kernel_initializer=init) for _ in range(depth)]
    layers.append(keras.layers.Dense(1, activation=out_act))
    return keras.Sequential(layers)


def data(n: int = 320, inputs: int = 8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, inputs)).astype("float32")
    return x, (x[:, :1] + 0.5 * x[:, 1:2] > 0).astype("float32")


def weights(model: Any) -> list[np.ndarray]:
    return [np.array(keras.ops.convert_to_numpy(v)) for v in model.weights]


def check_fit(out: Path) -> dict[str, Any]:
    """fit() with the callback: steps, fetches (one per flush), the loss per step, bit-identical weights."""
    x, y = data()
    plain = mlp("tanh", 3)
    # jit_compile=True: on TensorFlow the step (and gradwatch's ops in it) is compiled by XLA.
    plain.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy", jit_compile=True)
    plain.fit(x, y, epochs=3, batch_size=32, verbose=0, shuffle=False)
    watched = mlp("tanh", 3)
    watched.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy", jit_compile=True)
    fetches = []
    from gradwatch.keras_compiled import Recorder

    original = Recorder.fetch

    def counting(self: Any) -> Any:
        got = original(self)
        fetches.append(got.steps)  # the device's step counter when the host read it
        return got

    Recorder.fetch = counting  # type: ignore[method-assign]
    cb = GradWatch(out / "fit", flush_every=10, **OPTS)
    try:
        watched.fit(x, y, epochs=3, batch_size=32, verbose=0, shuffle=False, callbacks=[cb])
    finally:
        Recorder.fetch = original  # type: ignore[method-assign]
    run = gw.load_run(out / "fit")
    # The first batch's loss, recomputed from the initial weights.
    first = mlp("tanh", 3)
    loss0 = float(keras.ops.convert_to_numpy(keras.losses.binary_crossentropy(y[:32, 0], first(x[:32])[:, 0])).mean())
    same = all(np.array_equal(a, b) for a, b in zip(weights(plain), weights(watched)))
    return {
        "steps": run.steps.tolist(), "fetch_at": fetches, "status": run.status,
        "loss0": float(run.step_series("loss")[0]), "loss0_recomputed": loss0,
        "loss_logged": float(np.nanmean(run.step_series("loss_logged"))),
        "identical_weights": same,
        "layers": [(layer.name, layer.module_type, layer.activation) for layer in run.layers],
        "sampled": run.step_series("sampled").tolist(),
        "update_ratio_finite": bool(np.isfinite(run.layer_series("update_ratio")[run.step_series("sampled") == 1]).all()),
        "hist_steps": gw.load_run(out / "fit").histograms()[0].tolist(),
        "findings": [(f.kind, f.severity) for f in cb.findings],
        "optimizer_class_restored": type(watched.optimizer).__mro__[1].__name__ != "_Watched",
    }


def _grads_fn(model: Any, loss_fn: Any) -> Any:
    """(x, y) -> (loss, grads as numpy float32) of ``model``'s trainable variables, on this backend."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        def grads(x: Any, y: Any) -> Any:
            with tf.GradientTape() as tape:
                loss = loss_fn(y, model(x, training=True))
            return loss, tape.gradient(loss, model.trainable_variables)

        return grads
    import jax

    def loss_of(tv: Any, ntv: Any, x: Any, y: Any) -> Any:
        pred, _ = model.stateless_call(tv, ntv, x, training=True)
        return loss_fn(y, pred)

    value_and_grad = jax.jit(jax.value_and_grad(loss_of))

    def grads_jax(x: Any, y: Any) -> Any:
        tv = [v.value for v in model.trainable_variables]
        ntv = [v.value for v in model.non_trainable_variables]
        return value_and_grad(tv, ntv, x, y)

    return grads_jax


def check_loop(out: Path) -> dict[str, Any]:
    """A custom loop through gradwatch.keras.watch: per-layer norms against float64, clipping recorded,
    fetches only at flushes."""
    x, y = data(n=160)
    model = mlp("sigmoid", 4, init="random_normal")
    opt = keras.optimizers.SGD(0.1, global_clipnorm=0.05)
    opt.build(model.trainable_variables)
    loss_fn = keras.losses.BinaryCrossentropy()
    grads_of = _grads_fn(model, loss_fn)
    kept: list[list[np.ndarray]] = []
    w = gwk.watch(model, opt, out=out / "loop", flush_every=4, **OPTS)
    fetches_before = w.recorder.stream.fetches
    counts = []
    for i in range(0, 160, 16):
        xb, yb = x[i:i + 16], y[i:i + 16]
        loss, grads = grads_of(xb, yb)
        kept.append([np.asarray(keras.ops.convert_to_numpy(g), np.float64) for g in grads])
        if BACKEND == "tensorflow":
            opt.apply_gradients(zip(grads, model.trainable_variables))
        else:
            opt.apply(grads, model.trainable_variables)  # eager JAX: the host steps through w.step()
            w.step()
        counts.append(w.recorder.stream.fetches - fetches_before)
    w.close()
    run = gw.load_run(out / "loop")
    stored = run.layer_series("grad_norm")
    expected = np.array([[np.sqrt(np.sum(g * g)) for g in step] for step in kept])
    rel = np.abs(stored - expected) / np.maximum(expected, 1e-30)
    return {
        "steps": run.steps.tolist(), "max_rel_err": float(rel.max()), "fetch_counts": counts,
        "clipped": run.step_series("grad_norm_clipped").tolist(), "threshold": run.step_series("clip_threshold").tolist(),
        "raw": run.step_series("grad_norm").tolist(),
    }


def check_refit(out: Path) -> dict[str, Any]:
    """fit() again, watched, on a model fitted before (unwatched, then watched): each record holds its
    own steps with real gradients, and the optimizer's state does not grow with each fit."""
    x, y = data()
    model = mlp("relu", 1)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
    model.fit(x, y, epochs=1, batch_size=32, verbose=0)
    result = []
    for k in range(2):
        model.fit(x, y, epochs=1, batch_size=32, verbose=0, callbacks=[GradWatch(out / f"refit{k}", **OPTS)])
        run = gw.load_run(out / f"refit{k}")
        result.append({"steps": run.steps.tolist(), "min_grad_norm": float(np.nanmin(run.step_series("grad_norm"))),
                       "variables": len(model.optimizer.variables)})
    return {"fits": result}


def check_crash(out: Path) -> dict[str, Any]:
    """fit() that raises after 25 steps: the run holds what was flushed, and says it crashed."""
    x, y = data()

    class Boom(keras.callbacks.Callback):
        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            if batch == 24:
                raise RuntimeError("boom")

    model = mlp("relu", 2)
    model.compile(optimizer="adam", loss="binary_crossentropy")
    cb = GradWatch(out / "crash", flush_every=10, **OPTS)
    try:
        model.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[cb, Boom()])
    except RuntimeError:
        pass
    # Keras never tells a callback that fit() raised: the next fit() (or interpreter exit) closes it.
    cb.on_train_begin()
    cb.on_train_end()
    run = gw.load_run(out / "crash")
    return {"steps": len(run.steps), "status": run.status}


def check_activations(out: Path) -> dict[str, Any]:
    """Activation statistics from the layers the torch backend taps: a saturated sigmoid layer, a ReLU
    layer (a separate Activation) that never fires, the tanh layer after it (constant input)."""
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(256, 10)).astype("float32")
    model = keras.Sequential([
        keras.Input((10,)),
        keras.layers.Dense(32, activation="sigmoid", kernel_initializer=keras.initializers.RandomNormal(0, 3.0)),
        keras.layers.Dense(32, bias_initializer=keras.initializers.Constant(-3.0)), keras.layers.Activation("relu"),
        keras.layers.Dense(16, activation="tanh"),
        keras.layers.Dense(1, activation="sigmoid")])
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="binary_crossentropy")
    model.fit(x, (x[:, :1] > 0).astype("float32"), epochs=1, batch_size=64, verbose=0,
              callbacks=[GradWatch(out / "acts", **OPTS)])
    run = gw.load_run(out / "acts")
    first = run.step_series("sampled") == 1
    return {k: [None if np.isnan(v) else float(v) for v in run.layer_series(k)[first][0, ::2]]
            for k in ("act_dead_frac", "act_sat_frac", "act_const_frac")}


def check_log_to(out: Path) -> dict[str, Any]:
    """fit() with log_to="tensorboard": the live events' global gradient norm, beside the stored run's."""
    import types

    x, y = data()
    model = mlp("relu", 2)
    model.compile(optimizer="adam", loss="binary_crossentropy")
    model.fit(x, y, epochs=1, batch_size=16, verbose=0,
              callbacks=[GradWatch(out / "live", flush_every=5, log_to="tensorboard", **OPTS)])
    run = gw.load_run(out / "live")
    if "tensorflow" not in sys.modules:  # the reader works without TensorFlow; do not import it for this
        sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(str(out / "live" / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    events = acc.Scalars("grad_norm")
    return {"steps": run.steps.tolist(), "norms": run.step_series("grad_norm").tolist(),
            "tb_steps": [e.step for e in events], "tb_norms": [e.value for e in events]}


if __name__ == "__main__":
    root = Path(sys.argv[1])
    result = {"backend": BACKEND, "fit": check_fit(root), "loop": check_loop(root), "crash": check_crash(root),
              "refit": check_refit(root),
              "acts": check_activations(root), "log_to": check_log_to(root)}
    print("RESULT " + json.dumps(result))
