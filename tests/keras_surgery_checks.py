"""Checks of gradwatch.surgery on Keras models, for whatever backend this process's Keras runs.

tests/test_keras_surgery.py calls them in-process (Keras on torch) and runs this file as a child
process with KERAS_BACKEND=tensorflow and =jax; as a script it prints ``ok NAME`` per check passed.
"""

from __future__ import annotations

import os
import sys
import tempfile
from typing import Any, Callable

import keras
import numpy as np
import pytest

from gradwatch import surgery
from gradwatch.errors import GradwatchError
from gradwatch.keras import own_activation

CHECKS: list[Callable[[], None]] = []


def check(fn: Callable[[], None]) -> Callable[[], None]:
    CHECKS.append(fn)
    return fn


def data(n: int = 64, d: int = 4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, d)).astype("float32")
    return x, (x[:, :1] + x[:, 1:2] > 0).astype("float32")


def predict(model: Any, x: np.ndarray) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(model(x, training=False)))


def sigmoid_stack(init: Any = "glorot_uniform") -> Any:
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="sigmoid", kernel_initializer=init),
                             keras.layers.Dense(8, activation="sigmoid", kernel_initializer=init),
                             keras.layers.Dense(1, activation="sigmoid", kernel_initializer=init)])


def conv_model(init: Any = "glorot_uniform") -> Any:
    return keras.Sequential([keras.Input((6, 6, 2)), keras.layers.Conv2D(3, 3, activation="tanh", kernel_initializer=init),
                             keras.layers.Flatten(), keras.layers.Dense(5, kernel_initializer=init),
                             keras.layers.Activation("tanh"), keras.layers.Dense(1, kernel_initializer=init)])


@check
def reinit_matches_a_fresh_build_with_that_initializer_and_seed() -> None:
    """reinit(seed=7) draws the same weights as building the model with the initialiser seeded by
    one SeedGenerator(7) shared by its layers; biases become 0."""
    for build, shape in ((sigmoid_stack, (16, 4)), (conv_model, (16, 6, 6, 2))):
        x = np.random.default_rng(1).normal(size=shape).astype("float32")
        for scheme, cls in (("he_uniform", keras.initializers.HeUniform), ("lecun_normal", keras.initializers.LecunNormal)):
            model = build()
            for layer in model.layers:
                if getattr(layer, "bias", None) is not None:
                    layer.bias.assign(np.full(tuple(layer.bias.shape), 0.3, "float32"))
            report = surgery.reinit(model, scheme, seed=7)
            fresh = build(cls(seed=keras.random.SeedGenerator(7)))
            np.testing.assert_allclose(predict(model, x), predict(fresh, x), rtol=1e-6, atol=1e-6)
            assert len(report.changed) == sum(1 for layer in model.layers if hasattr(layer, "kernel"))
            assert all(isinstance(layer.kernel_initializer, cls) for layer in model.layers if hasattr(layer, "kernel"))
            unseeded = build()
            surgery.reinit(unseeded, scheme, seed=8)
            assert not np.allclose(predict(unseeded, x), predict(fresh, x))  # the seed decides the draw


def activations(model: Any) -> dict[str, str | None]:
    return {layer.name: f"{type(layer).__name__}:{own_activation(layer)}" for layer in model.layers}


@check
def swap_activations_changes_exactly_the_layers_it_reports() -> None:
    inp = keras.Input((4,))
    h = keras.layers.Dense(8, activation="sigmoid", name="a")(inp)
    h = keras.layers.Dense(8, name="b")(h)
    h = keras.layers.Activation("sigmoid", name="b_act")(h)
    h = keras.layers.Dense(8, activation="tanh", name="c")(h)
    h = keras.layers.Dense(8, activation="sigmoid", name="d")(h)
    out = keras.layers.Dense(1, activation="sigmoid", name="out")(h)
    model = keras.Model(inp, out)
    before = activations(model)
    report = surgery.swap_activations(model, "sigmoid", "relu", skip=["d"])
    after = activations(model)
    changed = {line.split(" ")[0] for line in report.changed}
    assert changed == {name for name in before if before[name] != after.get(name)} == {"a", "b_act"}
    assert after["out"] == "Dense:Sigmoid" and after["d"] == "Dense:Sigmoid" and after["c"] == "Dense:Tanh"
    assert any(line.startswith("out ") and "output" in line for line in report.skipped)
    assert any(line.startswith("d ") and "as asked" in line for line in report.skipped)
    # An activation with options becomes a layer of its own; ReLU layers of their own class are replaced.
    report = surgery.swap_activations(model, "relu", "LeakyReLU", negative_slope=0.01)
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds.count("LeakyReLU") == 2 and len(report.changed) == 2
    assert all(layer.get_config()["negative_slope"] == 0.01 for layer in model.layers if type(layer).__name__ == "LeakyReLU")
    x, _ = data()
    assert np.isfinite(predict(model, x)).all()
    # keep_output=False swaps the output's too.
    report = surgery.swap_activations(model, "sigmoid", "tanh", keep_output=False)
    assert activations(model)["out"] == "Dense:Tanh" and "out (Dense): Sigmoid -> Tanh" in report.changed


def _fit(model: Any, epochs: int) -> list[float]:
    x, y = data()
    return model.fit(x, y, epochs=epochs, batch_size=16, verbose=0).history["loss"]


@check
def insert_norm_keeps_the_weights_and_the_model_trains_saves_and_loads() -> None:
    x, _ = data()
    for make in (sigmoid_stack, _functional_with_nested_sequential):
        model = make()
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="binary_crossentropy")
        _fit(model, 1)  # the optimizer is built: it must learn the new variables
        kernels = {v.path: np.array(keras.ops.convert_to_numpy(v)) for v in model.trainable_variables}
        count = len(model.trainable_variables)
        report = surgery.insert_norm(model)
        hidden = [line for line in report.changed if not line.startswith("(optimizer)")]
        assert len(hidden) == 2, report
        assert any("output layer" in line for line in report.skipped)
        assert len(model.trainable_variables) == count + 2 * len(hidden)  # gamma and beta each
        for v in model.trainable_variables:
            if v.path in kernels:
                np.testing.assert_array_equal(keras.ops.convert_to_numpy(v), kernels[v.path])
        assert sum("Normalization" in type(layer).__name__ for layer in surgery.keras.all_layers(model)) == 2
        losses = _fit(model, 4)
        assert np.isfinite(losses).all() and losses[-1] < losses[0]
        path = os.path.join(tempfile.mkdtemp(), "model.keras")
        model.save(path)
        loaded = keras.models.load_model(path)
        np.testing.assert_allclose(predict(loaded, x), predict(model, x), rtol=1e-6, atol=1e-6)
        assert [type(layer).__name__ for layer in surgery.keras.all_layers(loaded)] == \
            [type(layer).__name__ for layer in surgery.keras.all_layers(model)]
        with pytest.raises(GradwatchError, match="already followed by a norm"):
            surgery.insert_norm(model)


def _functional_with_nested_sequential() -> Any:
    inp = keras.Input((4,))
    block = keras.Sequential([keras.layers.Dense(8, activation="sigmoid"), keras.layers.Dense(8)], name="block")
    h = keras.layers.Activation("sigmoid")(block(inp))
    return keras.Model(inp, keras.layers.Dense(1, activation="sigmoid")(h))


class Subclassed(keras.Model):
    def __init__(self) -> None:
        super().__init__()
        self.d1 = keras.layers.Dense(8, activation="sigmoid")
        self.d2 = keras.layers.Dense(1, activation="sigmoid")

    def call(self, x: Any) -> Any:
        return self.d2(self.d1(x))


@check
def a_subclassed_model_gets_what_can_be_done_in_place_and_one_sentence_for_the_rest() -> None:
    model = Subclassed()
    x, _ = data()
    predict(model, x)
    report = surgery.swap_activations(model, "sigmoid", "relu")
    assert report.changed == [f"{model.d1.name} (Dense): Sigmoid -> ReLU"]
    with pytest.raises(GradwatchError, match="calls it in its call"):
        surgery.insert_norm(model)
    assert own_activation(model.d1) == "ReLU"  # the refusal changed nothing else
    assert surgery.reinit(model, "he_normal", seed=1).changed


@check
def bad_input_gets_one_sentence() -> None:
    model = sigmoid_stack()
    before = activations(model)
    for call, match in ((lambda: surgery.reinit(model, "xavier"), "unknown initialisation scheme"),
                        (lambda: surgery.swap_activations(model, "sigmoid", "wobbly"), "must be an activation name"),
                        (lambda: surgery.swap_activations(model, "selu", "relu"), "no layer whose activation is SELU"),
                        (lambda: surgery.insert_norm(model, "group"), "kind must be"),
                        (lambda: surgery.reinit(model, layers=["nope"]), "no layer named 'nope'"),
                        (lambda: surgery.swap_activations(model, "sigmoid", "LeakyReLU", slope=3), "cannot make")):
        with pytest.raises(GradwatchError, match=match):
            call()
    assert activations(model) == before  # a refusal changes nothing


if __name__ == "__main__":
    for fn in CHECKS:
        fn()
        print("ok", fn.__name__, flush=True)
    print("backend", keras.backend.backend(), file=sys.stderr)
