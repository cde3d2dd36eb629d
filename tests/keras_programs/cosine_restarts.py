"""Weekly-sales regression (as exponential_decay_rate_above_one.py) with CosineDecayRestarts.

The learning rate jumps back up every 96 steps (restarts at 0.9x the previous peak); the loss
falls within the first few dozen steps and then creeps down to the data's noise floor.
"""
import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np
import keras
from keras import layers

keras.utils.set_random_seed(31)
rng = np.random.default_rng(31)

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

schedule = keras.optimizers.schedules.CosineDecayRestarts(
    initial_learning_rate=0.02, first_decay_steps=96, t_mul=1.0, m_mul=0.9, alpha=0.05)
model = keras.Sequential([
    keras.Input(shape=(6,)),
    layers.Dense(24, activation="tanh"),
    layers.Dense(12, activation="tanh"),
    layers.Dense(1),
])
model.compile(optimizer=keras.optimizers.SGD(learning_rate=schedule, momentum=0.9), loss="mse", metrics=["mae"])
hist = model.fit(X, y, epochs=32, batch_size=32, verbose=0)
print("mse every 4 epochs:", [round(v, 4) for v in hist.history["loss"][::4]])
