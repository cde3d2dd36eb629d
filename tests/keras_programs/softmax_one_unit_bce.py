"""Spam filter whose accuracy is stuck at the share of spam (every e-mail is called spam).

The output layer is Dense(1, activation="softmax"): a softmax over one unit is the constant 1.0,
so binary_crossentropy sees 1.0 for every e-mail and passes back exactly zero gradient.
"""
import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np
import keras
from keras import layers
from sklearn.datasets import make_classification

keras.utils.set_random_seed(5)
X, y = make_classification(n_samples=320, n_features=12, n_informative=6, weights=[0.6, 0.4], random_state=5)

model = keras.Sequential([
    keras.Input(shape=(12,)),
    layers.Dense(32, activation="relu"),
    layers.Dense(16, activation="relu"),
    layers.Dense(1, activation="softmax"),
])
model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
model.fit(X, y, epochs=5, batch_size=32, verbose=0)
loss, acc = model.evaluate(X, y, verbose=0)
print(f"loss {loss:.4f}  accuracy {acc:.3f}  (share of spam {y.mean():.3f})")
print("predictions:", np.unique(model.predict(X[:20], verbose=0)))
