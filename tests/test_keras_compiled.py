"""Keras on TensorFlow and JAX: statistics computed inside the compiled step, read once per flush.

Each backend runs in a child process (KERAS_BACKEND is fixed at the first ``import keras``; this
process runs Keras on torch): ``keras_backend_checks.py`` measures, these tests judge.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import gradwatch as gw

HERE = Path(__file__).parent
SRC = HERE.parent / "src"
def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(not _has(b), reason=f"{b} is not installed"))
            for b in ("tensorflow", "jax")]


def _env(backend: str) -> dict[str, str]:
    env = dict(os.environ, KERAS_BACKEND=backend, PYTHONPATH=str(SRC), TF_CPP_MIN_LOG_LEVEL="3")
    return env


@functools.lru_cache(maxsize=None)
def checks(backend: str, root: str) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, str(HERE / "keras_backend_checks.py"), root], env=_env(backend),
                          capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("keras-backends"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fit_records_every_step_and_reads_the_device_only_at_flushes(backend: str, root: str) -> None:
    fit = checks(backend, root)["fit"]
    assert fit["steps"] == list(range(30)) and fit["status"] == "finished"
    # flush_every=10, counted at each batch's start: the host read the ring when the device had
    # taken 9, 19 and 29 steps, and at the end; never in between (each read is counted).
    assert fit["fetch_at"] == [9, 19, 29, 30]
    assert fit["findings"] == []  # a healthy tanh/Glorot MLP with Adam
    assert fit["loss_logged"] == 1.0
    assert fit["loss0"] == pytest.approx(fit["loss0_recomputed"], rel=1e-5)
    assert fit["hist_steps"] == [0, 2, 4, 6, 8, 10, 20]  # the same schedule as PyTorch's probe
    assert fit["update_ratio_finite"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_monitoring_changes_nothing_and_the_optimizer_gets_its_class_back(backend: str, root: str) -> None:
    fit = checks(backend, root)["fit"]
    assert fit["identical_weights"]
    assert fit["optimizer_class_restored"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_layers_are_keras_paths_with_their_layer_type_and_activation(backend: str, root: str) -> None:
    layers = checks(backend, root)["fit"]["layers"]
    assert layers[0][0].endswith("/kernel") and layers[1][0].endswith("/bias")
    assert [t for _, t, _ in layers] == ["Dense"] * 8
    assert [a for _, _, a in layers] == ["Tanh"] * 6 + ["Sigmoid"] * 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_layer_norms_agree_with_a_float64_recomputation(backend: str, root: str) -> None:
    loop = checks(backend, root)["loop"]
    assert loop["steps"] == list(range(10))
    assert loop["max_rel_err"] < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_keras_global_clipnorm_is_recorded(backend: str, root: str) -> None:
    loop = checks(backend, root)["loop"]
    raw, clipped = np.array(loop["raw"]), np.array(loop["clipped"])
    assert np.allclose(loop["threshold"], 0.05)
    assert np.all(clipped <= 0.05 * (1 + 1e-5))
    assert np.allclose(clipped, np.minimum(raw, 0.05), rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_custom_loop_is_read_only_at_flushes(backend: str, root: str) -> None:
    # flush_every=4: after step k (1-based) the host has read the ring floor(k / 4) times.
    assert checks(backend, root)["loop"]["fetch_counts"] == [k // 4 for k in range(1, 11)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_fit_that_raises_keeps_what_was_flushed(backend: str, root: str) -> None:
    crash = checks(backend, root)["crash"]
    assert crash["status"] == "crashed"
    assert crash["steps"] >= 20  # flush_every=10: at most the steps after the last flush are lost


@pytest.mark.parametrize("backend", BACKENDS)
def test_fitting_again_records_the_new_steps_and_does_not_grow_the_state(backend: str, root: str) -> None:
    # The model was fitted once unwatched (10 steps): its step function was traced without gradwatch.
    first, second = checks(backend, root)["refit"]["fits"]
    assert first["steps"] == list(range(10, 20)) and second["steps"] == list(range(20, 30))
    assert first["min_grad_norm"] > 0 and second["min_grad_norm"] > 0
    assert first["variables"] == second["variables"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_log_to_tensorboard_logs_the_stored_run_live(backend: str, root: str) -> None:
    live = checks(backend, root)["log_to"]
    assert live["tb_steps"] == live["steps"] and len(live["steps"]) == 20
    np.testing.assert_allclose(live["tb_norms"], live["norms"], rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_activation_statistics_come_from_the_layers_torch_taps(backend: str, root: str) -> None:
    acts = checks(backend, root)["acts"]  # kernels of: sigmoid N(0, 3), Dense + Activation("relu") never firing, tanh, output
    assert acts["act_dead_frac"] == [0.0, 1.0, 1.0, 0.0]
    assert acts["act_sat_frac"][0] > 0.4 and acts["act_sat_frac"][1] is None  # ReLU has no flat part to saturate
    assert acts["act_sat_frac"][2:] == [0.0, 0.0]
    assert acts["act_const_frac"] == [0.0, 0.0, 1.0, 1.0]  # after a dead layer every unit is constant


LOOP = '''
import sys
import numpy as np
import tensorflow as tf
import keras
from sklearn.datasets import make_circles

x, y = make_circles(n_samples=640, noise=0.1, factor=0.5, random_state=0)
x, y = x.astype("float32"), y.astype("float32")[:, None]
keras.utils.set_random_seed(1)
init = keras.initializers.RandomNormal(0.0, 1.0)
model = keras.Sequential([keras.Input((2,))] + [keras.layers.Dense(10, activation="sigmoid", kernel_initializer=init)
                                                 for _ in range(6)] + [keras.layers.Dense(1, activation="sigmoid")])
optimizer = keras.optimizers.SGD(0.1)
loss_fn = keras.losses.BinaryCrossentropy()

def train_step(xb, yb):
    with tf.GradientTape() as tape:
        loss = loss_fn(yb, model(xb, training=True))
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    return loss

if sys.argv[1] == "function":
    train_step = tf.function(train_step)
for epoch in range(2):
    for xb, yb in tf.data.Dataset.from_tensor_slices((x, y)).batch(32):
        train_step(xb, yb)
print("steps", int(optimizer.iterations.numpy()))
'''


@pytest.mark.integration
@pytest.mark.skipif(not _has("tensorflow"), reason="tensorflow is not installed")
def test_a_gradient_tape_loop_is_recorded_under_gradwatch_run(tmp_path: Path) -> None:
    # Inside @tf.function here; eager apply_gradients loops are keras_backend_checks.py's check_loop.
    mode = "function"
    script = tmp_path / "loop.py"
    script.write_text(LOOP)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "gradwatch", "run", "--out", str(out), str(script), mode],
                          env=_env("tensorflow"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "steps 40" in proc.stdout
    run = gw.load_run(out)
    assert run.steps.tolist() == list(range(40))
    assert run.meta["framework"]["name"] == "tensorflow"
    losses = run.step_series("loss")
    # The loss is the scalar given to tape.gradient, in the traced function as in fit's train step.
    assert np.isfinite(losses).all() and run.step_series("loss_logged").all()
    kinds = {f.kind for f in gw.diagnose(run) if f.severity in ("warning", "error")}
    assert kinds == {"vanishing_gradients"}, kinds
