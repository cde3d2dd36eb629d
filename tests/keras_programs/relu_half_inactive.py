"""Digits MLP with a wide ReLU layer and an aggressive Adam(0.05): about half of the 128 hidden
units stop firing within the first steps, and the model still reaches ~97% accuracy.

Many inactive ReLU units in an over-wide layer are not a problem worth a warning when the
remaining units carry the task.
"""
import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras
from keras import layers
from sklearn.datasets import load_digits

keras.utils.set_random_seed(0)
digits = load_digits()
X = (digits.data / 16.0).astype("float32")
y = digits.target

model = keras.Sequential([
    keras.Input(shape=(64,)),
    layers.Dense(128, activation="relu"),
    layers.Dense(10, activation="softmax"),
])
model.compile(optimizer=keras.optimizers.Adam(0.05), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
model.fit(X, y, epochs=4, batch_size=128, verbose=0)
loss, acc = model.evaluate(X, y, verbose=0)
print(f"loss {loss:.4f}  accuracy {acc:.3f}")
