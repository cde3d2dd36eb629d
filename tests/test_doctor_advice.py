"""gradwatch.doctor_advice: the line of the user's script that a code-change remedy names.

Most tests pair a small script with a run built from its layer table (what the recorder stores for
that model); two record a real run (torch with gw.watch, Keras on torch with its callback) so that
the names and activations the locator matches are the ones the recorders write."""

from __future__ import annotations

import math
import os
import runpy
import textwrap
from pathlib import Path

import pytest

from gradwatch import load_run
from gradwatch.doctor_advice import locate
from gradwatch.store import Run

SPAM = '''\
import keras
from keras import layers
from sklearn.preprocessing import StandardScaler

X, y = load_spam()
scaler = StandardScaler().fit(X)

model = keras.Sequential([
    keras.Input(shape=(12,)),
    layers.Dense(32, activation="relu"),
    layers.Dense(16, activation="relu"),
    layers.Dense(1, activation="softmax"),
])
model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
model.fit(X, y, epochs=5, batch_size=32, verbose=0)
'''


def write(tmp_path: Path, text: str, name: str = "train.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def line(path: Path, needle: str, nth: int = 0) -> int:
    """1-based number of the ``nth`` line of ``path`` that contains ``needle``."""
    return [i for i, text in enumerate(path.read_text().splitlines(), 1) if needle in text][nth]


def make_run(tmp_path: Path, layers: list[tuple[str, tuple[int, ...], str, str | None]], loss: str | None) -> Run:
    """A stored run's metadata as the recorders write it: the layer table and stream 0's loss."""
    table = [{"name": n, "shape": list(s), "numel": math.prod(s), "module_type": t, "activation": a}
             for n, s, t, a in layers]
    return Run(tmp_path, {"layers": table, "streams": [{"index": 0, "loss": loss}]}, [], False)


def dense_run(tmp_path: Path, dims: list[tuple[int, int, str | None]], loss: str | None = "binary_crossentropy",
              names: list[str] | None = None, prefix: str = "sequential/") -> Run:
    """Keras Dense layers (in, out, activation), auto-named dense, dense_1, ... unless ``names``."""
    layers = []
    for i, (n_in, n_out, act) in enumerate(dims):
        name = names[i] if names else ("dense" if i == 0 else f"dense_{i}")
        layers += [(f"{prefix}{name}/kernel", (n_in, n_out), "Dense", act), (f"{prefix}{name}/bias", (n_out,), "Dense", act)]
    return make_run(tmp_path, layers, loss)


SPAM_DIMS = [(12, 32, "ReLU"), (32, 16, "ReLU"), (16, 1, "Softmax")]


def test_keras_sequential_softmax_output_and_its_loss(tmp_path: Path) -> None:
    script = write(tmp_path, SPAM)
    run = dense_run(tmp_path, SPAM_DIMS)
    assert locate(script, "change_output", run) == (
        f'the `layers.Dense(1, activation="softmax")` output at {script}:{line(script, "Dense(1,")}')
    assert locate(str(script), "change_loss", run) == (
        f'the `loss="binary_crossentropy"` in `model.compile(...)` at {script}:{line(script, "compile")}')


def test_keras_inputs_and_targets_are_the_compiled_models_fit_arguments(tmp_path: Path) -> None:
    script = write(tmp_path, SPAM)  # scaler.fit(X) comes first: it is not the model's fit
    run = dense_run(tmp_path, SPAM_DIMS)
    fit, made = line(script, "model.fit"), line(script, "load_spam")
    assert locate(script, "scale_inputs", run) == f"the inputs `X` in `model.fit(...)` at {script}:{fit} (set at line {made})"
    assert locate(script, "scale_targets", run) == f"the targets `y` in `model.fit(...)` at {script}:{fit} (set at line {made})"
    no_y = write(tmp_path, SPAM.replace("model.fit(X, y,", "model.fit(dataset,"), "ds.py")
    assert locate(no_y, "scale_targets", run) is None  # the targets are inside a dataset: cannot tell
    assert locate(no_y, "scale_inputs", run) == f"the inputs `dataset` in `model.fit(...)` at {no_y}:{fit}"


def test_a_loss_object_and_a_multiline_compile(tmp_path: Path) -> None:
    script = write(tmp_path, SPAM.replace(
        'loss="binary_crossentropy", metrics=["accuracy"])',
        '\n    loss=keras.losses.BinaryCrossentropy(from_logits=False),\n)'))
    run = dense_run(tmp_path, SPAM_DIMS, loss="BinaryCrossentropy")
    at = line(script, "loss=keras")  # the line of the loss, not the compile's first line
    assert locate(script, "change_loss", run) == (
        f"the `loss=keras.losses.BinaryCrossentropy(from_logits=False)` in `model.compile(...)` at {script}:{at}")
    separate = write(tmp_path, SPAM.replace('loss="binary_crossentropy"', "loss=loss_fn").replace(
        "model.compile", "loss_fn = keras.losses.BinaryCrossentropy()\nmodel.compile"), "sep.py")
    assert locate(separate, "change_loss", run) == (
        f"the loss `keras.losses.BinaryCrossentropy()` at {separate}:{line(separate, 'loss_fn =')}")
    mse = dense_run(tmp_path, SPAM_DIMS, loss="mse")
    assert locate(write(tmp_path, SPAM, "bce.py"), "change_loss", mse) is None  # the script's loss is another one


def test_functional_model_is_found_by_layer_name(tmp_path: Path) -> None:
    script = write(tmp_path, '''\
        inputs = keras.Input(shape=(10,))
        x = layers.Dense(8, activation="tanh", name="stem")(inputs)
        gate = layers.Dense(1, activation="sigmoid", name="gate")(x)
        outputs = layers.Dense(1, activation="sigmoid", name="head")(x * gate)
        model = keras.Model(inputs, outputs)
        ''')
    run = dense_run(tmp_path, [(10, 8, "Tanh"), (8, 1, "Sigmoid"), (8, 1, "Sigmoid")], names=["stem", "gate", "head"],
                    prefix="")
    assert locate(script, "change_output", run) == (
        f'the `layers.Dense(1, activation="sigmoid", name="head")` output at {script}:4')


@pytest.mark.parametrize("text, dense, act", [
    ("model = keras.Sequential([\n    layers.Input((16,)),\n    layers.Dense(1),\n    layers.Dropout(0.1),\n"
     "    layers.Activation('softmax'),\n])\n", "layers.Dense(1)", "layers.Activation('softmax')"),
    ("model = Sequential()\nmodel.add(Dense(16, activation='relu'))\nmodel.add(Dense(1))\n"
     "model.add(Activation(keras.activations.softmax))\n", "Dense(1)", "Activation(keras.activations.softmax)"),
    ("x = layers.Dense(1)(x)\nx = layers.BatchNormalization()(x)\noutputs = layers.Softmax()(x)\n",
     "layers.Dense(1)", "layers.Softmax()"),
], ids=["list", "add", "functional"])
def test_activation_given_as_the_layer_after_the_output(tmp_path: Path, text: str, dense: str, act: str) -> None:
    script = write(tmp_path, text)
    run = dense_run(tmp_path, [(4, 16, "ReLU"), (16, 1, "Softmax")])
    assert locate(script, "change_output", run) == (
        f"the `{dense}` output at {script}:{line(script, dense)} and its `{act}` at {script}:{line(script, act)}")


def test_activation_by_position_or_function_and_units_by_keyword(tmp_path: Path) -> None:
    run = dense_run(tmp_path, [(4, 16, "ReLU"), (16, 1, "Softmax")])
    for i, call in enumerate(["Dense(1, 'softmax')", "Dense(units=1, activation=keras.activations.softmax)",
                              "Dense(n_out, activation=softmax)"]):
        script = write(tmp_path, f"model = Sequential([Dense(16, activation='relu'), {call}])\n", f"s{i}.py")
        assert locate(script, "change_output", run) == f"the `{call}` output at {script}:1"


def test_two_matching_calls_name_the_first_and_how_many(tmp_path: Path) -> None:
    script = write(tmp_path, SPAM + "\nfixed = keras.Sequential([layers.Dense(16), layers.Dense(1, activation='softmax')])\n")
    run = dense_run(tmp_path, SPAM_DIMS)
    first, second = line(script, "Dense(1,"), line(script, "fixed =")
    assert locate(script, "change_output", run) == (
        f'the `layers.Dense(1, activation="softmax")` output at {script}:{first} '
        f"(1 of 2 matching calls; also {script}:{second})")


def test_a_call_that_contradicts_the_run_is_never_named(tmp_path: Path) -> None:
    run = dense_run(tmp_path, [(4, 16, "ReLU"), (16, 1, "Softmax")])
    for i, call in enumerate(["Dense(1, activation='sigmoid')", "Dense(2, activation='softmax')",
                              "Dense(1, activation='softmax', name='out')", "Dense(1)"]):
        script = write(tmp_path, f"model = Sequential([Dense(16, activation='relu'), {call}, Activation('tanh')])\n",
                       f"c{i}.py")
        assert locate(script, "change_output", run) is None, call
    # The more facts a call confirms, the surer: a literal unit count beats a variable one.
    script = write(tmp_path, "a = Dense(n, activation='softmax')\nb = Dense(1, activation='softmax')\n", "units.py")
    assert locate(script, "change_output", run) == f"the `Dense(1, activation='softmax')` output at {script}:2"


def test_unreadable_scripts_runs_and_other_actions_give_none(tmp_path: Path) -> None:
    run = dense_run(tmp_path, SPAM_DIMS)
    script = write(tmp_path, SPAM)
    (tmp_path / "bad.py").write_text("model = keras.Sequential([\n")
    (tmp_path / "bytes.py").write_bytes(b"\x00\xff\xfe garbage")
    for path in (tmp_path / "missing.py", tmp_path / "bad.py", tmp_path / "bytes.py", tmp_path):
        for action in ("change_output", "change_loss", "scale_inputs", "scale_targets"):
            assert locate(path, action, run) is None
    for action in ("reduce_depth", "check_data", "check_graph", "set_dtype", "clip_norm"):
        assert locate(script, action, run) is None
    assert locate(script, "change_output", None) is None  # type: ignore[arg-type]
    assert locate(script, "change_output", make_run(tmp_path, [], None)) is None


TORCH = '''\
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

X = torch.randn(256, 4)
y = (X[:, :1] > 0).float()
model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1), nn.Sigmoid())
criterion = nn.BCELoss()
loader = DataLoader(TensorDataset(X, y), batch_size=32)
'''


def test_torch_linear_output_loss_and_dataset(tmp_path: Path) -> None:
    script = write(tmp_path, TORCH)
    run = make_run(tmp_path, [("0.weight", (16, 4), "Linear", "ReLU"), ("0.bias", (16,), "Linear", "ReLU"),
                              ("2.weight", (1, 16), "Linear", "Sigmoid"), ("2.bias", (1,), "Linear", "Sigmoid")],
                   "BinaryCrossEntropyBackward0")
    model, data = line(script, "nn.Sequential"), line(script, "TensorDataset(X")
    assert locate(script, "change_output", run) == f"the `nn.Linear(16, 1)` output and its `nn.Sigmoid()` at {script}:{model}"
    assert locate(script, "change_loss", run) == f"the loss `nn.BCELoss()` at {script}:{line(script, 'BCELoss')}"
    assert locate(script, "scale_inputs", run) == (
        f"the inputs `X` in `TensorDataset(...)` at {script}:{data} (set at line {line(script, 'X = ')})")
    assert locate(script, "scale_targets", run) == (
        f"the targets `y` in `TensorDataset(...)` at {script}:{data} (set at line {line(script, 'y = ')})")
    relu = make_run(tmp_path, [("2.weight", (1, 16), "Linear", "ReLU")], "MseLossBackward0")
    assert locate(script, "change_output", relu) is None  # the Sigmoid after it says it is another layer
    assert locate(script, "change_loss", relu) is None  # no MSE in the script


SEED001 = '''\
import torch
from torch import nn
import gradwatch as gw

torch.manual_seed(1)
x = torch.randn(256, 20)
y = x @ torch.randn(20, 1) * 100

def train(model):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with gw.watch(model, opt, out=OUT, quiet=True, report=False) as w:
        for i in range(0, 256, 32):
            loss = nn.functional.mse_loss(model(x[i:i + 32]), y[i:i + 32])
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.log(loss)

train(nn.Sequential(nn.Linear(20, 25), nn.ReLU(), nn.Linear(25, 1)))
'''


def test_a_real_torch_run_names_the_loss_call_for_its_data(tmp_path: Path) -> None:
    script = write(tmp_path, SEED001)
    runpy.run_path(str(script), init_globals={"OUT": str(tmp_path / "run")})
    run = load_run(tmp_path / "run")
    assert run.streams[0]["loss"] == "MseLossBackward0" and run.layers[2].name == "2.weight"
    at = line(script, "mse_loss")
    assert locate(script, "scale_targets", run) == (
        f"the targets `y[i:i + 32]` in `nn.functional.mse_loss(...)` at {script}:{at} (`y` set at line 7)")
    assert locate(script, "scale_inputs", run) == (
        f"the inputs `x[i:i + 32]` in `nn.functional.mse_loss(...)` at {script}:{at} (`x` set at line 6)")
    assert locate(script, "change_output", run) == f"the `nn.Linear(25, 1)` output at {script}:{line(script, 'train(nn')}"
    assert locate(script, "change_loss", run) == (
        f"the loss `nn.functional.mse_loss(model(x[i:i + 32]), y[i:i + 32])` at {script}:{at}")


KERAS = '''\
import numpy as np
import keras
from keras import layers
from gradwatch.keras import GradWatch

X = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
y = (X[:, 0] > 0).astype("float32")
model = keras.Sequential([
    keras.Input(shape=(4,)),
    layers.Dense(8, activation="relu"),
    layers.Dense(1),
    layers.Activation("softmax"),
])
model.compile(optimizer="adam", loss="binary_crossentropy")
model.fit(X, y, epochs=1, batch_size=32, verbose=0, callbacks=[GradWatch(out=OUT, quiet=True, report=False)])
'''


def test_a_real_keras_run_names_the_dense_output_and_its_activation_layer(tmp_path: Path) -> None:
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":  # pragma: no cover
        pytest.skip("this test records Keras on the torch backend")
    script = write(tmp_path, KERAS)
    runpy.run_path(str(script), init_globals={"OUT": str(tmp_path / "run")})
    run = load_run(tmp_path / "run")
    out = run.layers[-2]  # Keras names its layers from a per-process counter: dense_N
    assert out.name.endswith("/kernel") and out.activation == "Softmax" and run.streams[0]["loss"] == "binary_crossentropy"
    assert locate(script, "change_output", run) == (
        f"the `layers.Dense(1)` output at {script}:11 and its `layers.Activation(\"softmax\")` at {script}:12")
    assert locate(script, "change_loss", run) == f'the `loss="binary_crossentropy"` in `model.compile(...)` at {script}:14'
    assert locate(script, "scale_inputs", run) == f"the inputs `X` in `model.fit(...)` at {script}:15 (set at line 6)"
