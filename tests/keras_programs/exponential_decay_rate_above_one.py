"""Weekly-sales regression with ExponentialDecay(decay_rate=1.16): a "decay" that grows.

decay_rate=1.16 every 10 steps (the poster meant 0.86) raises the learning rate ~1.5% per step.
SGD trains fine for a while, then from about step 200 the gradient norm climbs, slowly at first,
and the loss becomes NaN around step 400.
"""
import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np
import keras
from keras import layers

keras.utils.set_random_seed(31)
rng = np.random.default_rng(31)

# stores.csv: week, promo, price_index, competitor_distance_km, holiday, temperature, sales
n = 384
week = rng.integers(1, 53, n)
promo = rng.integers(0, 2, n)
price = rng.normal(1.0, 0.1, n)
comp = rng.gamma(2.0, 3.0, n)
holiday = (rng.random(n) < 0.08).astype(float)
temp = 15 + 10 * np.sin(week / 52 * 2 * np.pi) + rng.normal(0, 3, n)
sales = 500 + 120 * promo - 300 * (price - 1) + 8 * comp + 200 * holiday + 4 * temp + rng.normal(0, 40, n)
data = np.column_stack([week, promo, price, comp, holiday, temp, sales]).astype("float32")

X = (data[:, :6] - data[:, :6].mean(0)) / data[:, :6].std(0)
y = (data[:, 6] - data[:, 6].mean()) / data[:, 6].std()

schedule = keras.optimizers.schedules.ExponentialDecay(initial_learning_rate=2.5e-3, decay_steps=10, decay_rate=1.16)
model = keras.Sequential([
    keras.Input(shape=(6,)),
    layers.Dense(24, activation="tanh"),
    layers.Dense(12, activation="tanh"),
    layers.Dense(1),
])
model.compile(optimizer=keras.optimizers.SGD(learning_rate=schedule), loss="mse", metrics=["mae"])
hist = model.fit(X, y, epochs=36, batch_size=32, verbose=0)
print("mse every 4 epochs:", [round(v, 4) for v in hist.history["loss"][::4]])
