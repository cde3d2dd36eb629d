"""Delivery-time regression where every prediction is 0.0 and the loss never moves.

The output layer has activation="relu" "because times are positive", and the features go in
raw. With this seed the output's input is never positive for any order, so the output is 0
everywhere and relu passes back nothing: no layer gets any gradient, ever, and Adam never moves
a weight.
"""
import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np
import keras
from keras import layers

keras.utils.set_random_seed(3)
rng = np.random.default_rng(0)

# orders.csv: distance_km, items, hour_of_day, raining, minutes
n = 200
dist = rng.gamma(2.0, 2.5, n)
items = rng.integers(1, 15, n)
hour = rng.integers(8, 23, n)
rain = rng.integers(0, 2, n)
minutes = 12 + 3.5 * dist + 0.8 * items + 6 * rain + rng.normal(0, 4, n)
table = np.column_stack([dist, items, hour, rain, minutes]).astype("float32")

X, y = table[:, :4], table[:, 4]

model = keras.Sequential([
    keras.Input(shape=(4,)),
    layers.Dense(8, activation="relu"),
    layers.Dense(1, activation="relu"),
])
model.compile(optimizer="adam", loss="mse", metrics=["mae"])
model.fit(X, y, epochs=25, batch_size=len(X), verbose=0)
pred = model.predict(X[:5], verbose=0).ravel()
print("first predictions:", pred, " mse:", model.evaluate(X, y, verbose=0)[0])
