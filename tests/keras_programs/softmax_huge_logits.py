"""Digit classifier copied with kernel_initializer=RandomNormal(stddev=20) "to break symmetry".

The softmax's inputs are in the hundreds and more: every prediction is a hard one-hot, exactly 0 or 1 in
float32, categorical_crossentropy clips them to [1e-7, 1 - 1e-7] and passes back nothing.
Accuracy stays at whatever the random init gives.
"""
import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras
from keras import layers
from sklearn.datasets import load_digits

keras.utils.set_random_seed(13)
digits = load_digits()  # bundled with scikit-learn, 1797 8x8 images
X = (digits.data[:480] / 16.0).astype("float32")
Y = keras.utils.to_categorical(digits.target[:480], 10)

init = keras.initializers.RandomNormal(stddev=20.0)
model = keras.Sequential([
    keras.Input(shape=(64,)),
    layers.Dense(32, activation="relu", kernel_initializer=init),
    layers.Dense(10, activation="softmax", kernel_initializer=init),
])
model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
model.fit(X, Y, epochs=5, batch_size=64, verbose=0)
loss, acc = model.evaluate(X, Y, verbose=0)
print(f"loss {loss:.3f}  accuracy {acc:.3f}")
