"""Digits classifier fed raw 0-255 pixel values ("forgot to divide by 255").

The sigmoid layer's pre-activations are in the tens to hundreds, so almost all of them sit where
sigmoid is flat (slope exactly 0 above ~17, vanishingly small below -17): its units act as fixed
on/off switches, the layer gets about 1% of the output layer's gradient and hardly learns.
After 40 steps: ~40% accuracy, against ~76% for the same model on scaled pixels
(sigmoid_scaled_pixels.py).
"""
import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np
import keras
from keras import layers
from sklearn.datasets import load_digits

keras.utils.set_random_seed(8)
digits = load_digits()
X = np.round(digits.data[:640] * 255.0 / 16.0).astype("float32")  # raw pixels, 0-255
y = digits.target[:640]

model = keras.Sequential([
    keras.Input(shape=(64,)),
    layers.Dense(16, activation="sigmoid"),
    layers.Dense(10, activation="softmax"),
])
model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
model.fit(X, y, epochs=4, batch_size=64, verbose=0)
loss, acc = model.evaluate(X, y, verbose=0)
print(f"loss {loss:.3f}  accuracy {acc:.3f}")
