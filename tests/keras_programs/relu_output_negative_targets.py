"""Predicting next-day temperature change (degrees, mostly negative in autumn) with a ReLU output.

ReLU cannot output a negative number. MSE drives every prediction down to 0 and past it: the
output unit's input goes negative for every sample, the output dies, and within ten steps
nothing gets a gradient any more. The loss freezes at mean(y**2).
"""
import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np
import keras
from keras import layers

keras.utils.set_random_seed(9)
rng = np.random.default_rng(9)

# weather.csv: pressure_change, humidity, wind_north, cloud_cover, temp_change
n = 240
pressure = rng.normal(0, 1, n)
humidity = rng.normal(0, 1, n)
wind_n = rng.normal(0, 1, n)
cloud = rng.normal(0, 1, n)
temp_change = -3.0 + 0.8 * pressure - 0.5 * wind_n + 0.3 * cloud + rng.normal(0, 0.5, n)
data = np.column_stack([pressure, humidity, wind_n, cloud, temp_change]).astype("float32")
X, y = data[:, :4], data[:, 4]

model = keras.Sequential([
    keras.Input(shape=(4,)),
    layers.Dense(16, activation="relu"),
    layers.Dense(1, activation="relu"),
])
model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.05), loss="mse")
hist = model.fit(X, y, epochs=15, batch_size=80, verbose=0)
print("mse by epoch:", [round(v, 3) for v in hist.history["loss"]], " mean(y^2):", round(float((y ** 2).mean()), 3))
