"""Keras 3 on the torch backend: the seeds' own Keras programs, with the callback or under `gradwatch run`."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")
if keras.backend.backend() != "torch":  # pragma: no cover
    pytest.skip("these tests need KERAS_BACKEND=torch", allow_module_level=True)

from keras.initializers import RandomNormal, RandomUniform  # noqa: E402
from keras.layers import Dense, Input  # noqa: E402
from sklearn.datasets import make_circles, make_moons, make_regression  # noqa: E402

import gradwatch as gw  # noqa: E402
from gradwatch.keras import GradWatch  # noqa: E402


def make_mlp(activation, initializer, name):  # type: ignore[no-untyped-def]
    """Seed 004's make_mlp, as the seed writes it."""
    return keras.Sequential([
        Input(shape=(2,)),
        Dense(5, activation=activation, kernel_initializer=initializer, name=name + "1"),
        Dense(5, activation=activation, kernel_initializer=initializer, name=name + "2"),
        Dense(5, activation=activation, kernel_initializer=initializer, name=name + "3"),
        Dense(5, activation=activation, kernel_initializer=initializer, name=name + "4"),
        Dense(1, activation="sigmoid", kernel_initializer=initializer, name=name + "5"),
    ])


def _fit(model, x, y, out: Path, epochs: int, batch_size: int = 32):  # type: ignore[no-untyped-def]
    cb = GradWatch(out=out, quiet=True, report=False)
    model.fit(x, y, batch_size=batch_size, epochs=epochs, verbose=0, callbacks=[cb])
    return cb, gw.load_run(out)


def test_seed004_sigmoid_mlp_vanishes(tmp_path: Path) -> None:
    keras.utils.set_random_seed(1)
    x, y = make_circles(n_samples=1000, factor=0.5, noise=0.1, random_state=0)
    model = make_mlp("sigmoid", RandomNormal(mean=0.0, stddev=1.0), "sigmoid")
    model.compile(optimizer="rmsprop", loss="binary_crossentropy", metrics=["acc"])
    cb, run = _fit(model, x, y, tmp_path / "sig", epochs=10)
    assert len(run.steps) == 10 * 32 and run.streams[0]["optimizer"] == "keras.RMSprop"
    # Keras variable paths: the model's name (sequential, sequential_1... by how many came before in
    # this process), the layer's, the variable's.
    assert run.layers[0].name == f"{model.name}/sigmoid1/kernel" and run.layers[0].activation == "Sigmoid"
    assert "vanishing_gradients" in {f.kind for f in cb.findings}
    assert np.isfinite(run.step_series("loss")).all()


def test_seed000_binary_model_sigmoid_vanishes_and_relu_does_not(tmp_path: Path) -> None:
    x, y = make_moons(n_samples=3000, shuffle=True, noise=0.25, random_state=1234)

    def binary_model(act):  # type: ignore[no-untyped-def]
        init = RandomUniform(-1, 1)
        return keras.Sequential([Input(shape=(2,)), Dense(10, kernel_initializer=init, activation=act),
                                 Dense(10, kernel_initializer=init, activation=act),
                                 Dense(5, kernel_initializer=init, activation=act),
                                 Dense(1, kernel_initializer=init, activation="sigmoid")])

    found = {}
    for act in ("sigmoid", "relu"):
        keras.utils.set_random_seed(0)
        model = binary_model(act)
        model.compile(optimizer=keras.optimizers.RMSprop(), loss="binary_crossentropy", metrics=["accuracy"])
        cb, _ = _fit(model, x, y, tmp_path / act, epochs=3)
        found[act] = {f.kind for f in cb.findings if f.severity in ("warning", "error")}
    assert "vanishing_gradients" in found["sigmoid"] and "vanishing_gradients" not in found["relu"], found


def _seed001(clip: dict, tmp_path: Path, name: str):  # type: ignore[no-untyped-def]
    x, y = make_regression(n_samples=1000, n_features=20, noise=0.1, random_state=1)
    keras.utils.set_random_seed(1)
    model = keras.Sequential([Input(shape=(20,)), Dense(25, activation="relu", kernel_initializer="he_uniform"),
                              Dense(1, activation="linear")])
    model.compile(loss="mean_squared_error", optimizer=keras.optimizers.SGD(learning_rate=0.01, momentum=0.9, **clip))
    return _fit(model, x[:500], y[:500], tmp_path / name, epochs=5)


def test_seed001_unscaled_regression_explodes(tmp_path: Path) -> None:
    cb, run = _seed001({}, tmp_path, "none")
    assert {"exploding_gradients", "nonfinite"} & {f.kind for f in cb.findings if f.severity == "error"}, cb.findings


def test_keras_clipping_options_are_recorded_and_shown(tmp_path: Path) -> None:
    cb, run = _seed001({"clipnorm": 1.0}, tmp_path, "clipnorm")
    assert run.streams[0]["defaults"]["clipnorm"] == 1.0
    pre, post = run.step_series("grad_norm"), run.step_series("grad_norm_clipped")
    assert np.isfinite(post).all() and (pre > 1).all()
    assert (post <= math.sqrt(4) * (1 + 1e-4)).all(), "clipnorm clips each of the 4 variables to 1"
    assert not {f.kind for f in cb.findings if f.severity == "error"}
    cb, run = _seed001({"global_clipnorm": 1.0}, tmp_path, "global")
    np.testing.assert_allclose(run.step_series("grad_norm_clipped"), 1.0, rtol=1e-4)
    np.testing.assert_array_equal(run.step_series("clip_threshold"), 1.0)
    cb, run = _seed001({"clipvalue": 5.0}, tmp_path, "clipvalue")
    assert run.streams[0]["defaults"]["clipvalue"] == 5.0
    pre, post = run.step_series("grad_norm"), run.step_series("grad_norm_clipped")
    ok = np.isfinite(pre) & np.isfinite(post)
    assert ok.any() and (post[ok] <= pre[ok] * (1 + 1e-5)).all()


def test_healthy_keras_run_stays_clean(tmp_path: Path) -> None:
    keras.utils.set_random_seed(2)
    x, y = make_moons(n_samples=1000, noise=0.2, random_state=0)
    model = keras.Sequential([Input(shape=(2,)), Dense(16, activation="tanh"), Dense(16, activation="tanh"),
                              Dense(1, activation="sigmoid")])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="binary_crossentropy")
    cb, run = _fit(model, x, y, tmp_path / "ok", epochs=10)
    assert not [f for f in cb.findings if f.severity in ("warning", "error")], cb.findings


SCRIPT = """
import os
os.environ["KERAS_BACKEND"] = "torch"
import keras
from keras.layers import Dense, Input
from keras.initializers import RandomNormal
from sklearn.datasets import make_circles
keras.utils.set_random_seed(1)
X, y = make_circles(n_samples=1000, factor=0.5, noise=0.1, random_state=0)
model = keras.Sequential([Input(shape=(2,))] + [Dense(5, activation="sigmoid", kernel_initializer=RandomNormal(0.0, 1.0))
                                                for _ in range(4)] + [Dense(1, activation="sigmoid")])
model.compile(optimizer="rmsprop", loss="binary_crossentropy")
model.fit(X, y, batch_size=32, epochs=8, verbose=0)
print("done")
"""


def test_gradwatch_run_attaches_to_an_unmodified_keras_script(tmp_path: Path) -> None:
    script = tmp_path / "keras_train.py"
    script.write_text(SCRIPT)
    res = subprocess.run([sys.executable, "-m", "gradwatch", "run", "--out", str(tmp_path / "r"), "--no-report", str(script)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0 and "done" in res.stdout, res.stderr
    run = gw.load_run(tmp_path / "r")
    assert len(run.steps) == 8 * 32 and run.streams[0]["optimizer"] == "keras.RMSprop"
    assert np.isfinite(run.step_series("loss")).all(), "the loss backward() was called on"
    assert "vanishing_gradients" in {f.kind for f in run.findings}


def test_under_gradwatch_run_a_keras_callback_of_the_scripts_own_is_not_doubled(tmp_path: Path, capsys) -> None:
    from gradwatch import runner

    script = tmp_path / "keras_own.py"
    own = tmp_path / "own"
    script.write_text(SCRIPT.replace("epochs=8, verbose=0)", f"epochs=2, verbose=0, callbacks=[GradWatch(out={str(own)!r}, "
                                     "quiet=True, report=False)])").replace("import keras\n", "import keras\n"
                                     "from gradwatch.keras import GradWatch\n"))
    code, _ = runner.run_script(str(script), out=tmp_path / "r", report=False)
    assert code == 0 and len(gw.load_run(own).steps) == 2 * 32
    assert not (tmp_path / "r").exists()  # the runner's Keras hooks left the optimizer to the callback
    assert "the script records its optimizers itself" in capsys.readouterr().err


def test_a_legacy_h5_model_loads_and_is_watched(tmp_path: Path) -> None:
    keras.utils.set_random_seed(3)
    model = make_mlp("tanh", "glorot_uniform", "legacy")
    path = tmp_path / "model.h5"
    model.save(path)  # Keras 3 writes the legacy Keras 2 HDF5 format for .h5
    loaded = keras.models.load_model(path, compile=False)
    loaded.compile(optimizer="adam", loss="binary_crossentropy")
    x, y = make_circles(n_samples=256, factor=0.5, noise=0.1, random_state=0)
    cb, run = _fit(loaded, x, y, tmp_path / "h5", epochs=2)
    assert len(run.steps) == 2 * 8 and len(run.layers) == 10
    assert [w.shape for w in loaded.get_weights()][0] == (2, 5)


def test_a_backend_gradwatch_cannot_record_is_refused_in_one_sentence(monkeypatch: pytest.MonkeyPatch,
                                                                        tmp_path: Path) -> None:
    monkeypatch.setattr(keras.backend, "backend", lambda: "numpy")
    model = make_mlp("relu", "glorot_uniform", "np")
    model.compile(optimizer="adam", loss="binary_crossentropy")
    with pytest.raises(gw.GradwatchError, match="records Keras on torch, tensorflow or jax; this Keras runs on 'numpy'"):
        model.fit(np.zeros((4, 2)), np.zeros(4), verbose=0, callbacks=[GradWatch(out=tmp_path / "x", quiet=True)])


def test_without_keras_the_import_says_which_extra_to_install() -> None:
    code = ("import sys\nsys.modules['keras'] = None\nimport gradwatch\n"
            "try:\n    import gradwatch.keras\nexcept gradwatch.GradwatchError as e:\n    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "ERR gradwatch.keras needs Keras 3; install it with `pip install gradwatch[keras]`" in out.stdout, out.stderr


# ----------------------------------------------------------------------------- found in review


def _regression_model(seed: int = 5):  # type: ignore[no-untyped-def]
    keras.utils.set_random_seed(seed)
    return keras.Sequential([Input(shape=(4,)), Dense(8, activation="tanh"), Dense(1)])


def _xy(n: int = 64):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 4)).astype("float32")
    return x, (x.sum(1, keepdims=True) * 3).astype("float32")


def test_a_loss_scale_optimizer_is_recorded_unscaled(tmp_path: Path) -> None:
    x, y = _xy()
    runs = {}
    for name, opt in (("plain", keras.optimizers.SGD(0.01)),
                      ("scaled", keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.01)))):
        model = _regression_model()
        model.compile(optimizer=opt, loss="mse")
        _, runs[name] = _fit(model, x, y, tmp_path / name, epochs=1, batch_size=16)
    np.testing.assert_allclose(runs["scaled"].step_series("grad_norm"), runs["plain"].step_series("grad_norm"), rtol=1e-4)
    np.testing.assert_allclose(runs["scaled"].step_series("loss"), runs["plain"].step_series("loss"), rtol=1e-4)


def test_the_loss_is_each_steps_own_not_the_running_mean(tmp_path: Path) -> None:
    x, y = _xy()
    model = _regression_model()
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")  # lr 0: the weights stay, so each batch's loss is known
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False,
              callbacks=[GradWatch(out=tmp_path / "loss", quiet=True, report=False)])
    run = gw.load_run(tmp_path / "loss")
    expected = [float(np.mean((keras.ops.convert_to_numpy(model.predict(x[i:i + 16], verbose=0)) - y[i:i + 16]) ** 2))
                for i in range(0, 64, 16)]
    np.testing.assert_allclose(run.step_series("loss"), expected, rtol=1e-5)


class _Boom(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):  # type: ignore[no-untyped-def]
        if batch == 2:
            raise RuntimeError("boom")


def test_a_fit_that_raises_leaves_nothing_behind_and_a_reused_callback_writes_a_new_run(tmp_path: Path) -> None:
    x, y = _xy()
    model = _regression_model()
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    cb = GradWatch(out=tmp_path / "r", quiet=True, report=False)
    with pytest.raises(RuntimeError, match="boom"):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[cb, _Boom()])
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[cb])
    assert gw.load_run(tmp_path / "r").status == "crashed" and len(gw.load_run(tmp_path / "r").steps) == 3
    second = gw.load_run(tmp_path / "r-2")
    assert second.status == "finished" and len(second.steps) == 4
    assert "apply" not in model.optimizer.__dict__ and "_compute_loss" not in model.__dict__


def test_a_custom_schedule_without_get_config_is_recorded_not_broken(tmp_path: Path) -> None:
    """A LearningRateSchedule that does not override get_config() makes the optimizer's config
    raise; the run is recorded all the same and fit() never sees gradwatch's trouble."""

    class Ramp(keras.optimizers.schedules.LearningRateSchedule):
        def __call__(self, step):  # type: ignore[no-untyped-def]
            return 1e-2 * keras.ops.power(1.01, keras.ops.cast(step, "float32"))

    keras.utils.set_random_seed(4)
    x, y = make_moons(n_samples=200, noise=0.2, random_state=0)
    model = keras.Sequential([Input(shape=(2,)), Dense(8, activation="relu"), Dense(1, activation="sigmoid")])
    model.compile(optimizer=keras.optimizers.SGD(Ramp()), loss="binary_crossentropy")
    cb, run = _fit(model, x, y, tmp_path / "ramp", epochs=2)
    assert len(run.steps) == 2 * 7 and run.streams[0]["loss"] == "binary_crossentropy"
