"""Used-car price model (prices in thousands, ~60-140) whose MSE is stuck near 10 000.

The last layer kept activation="sigmoid" from a classification tutorial. MSE pushes the output
toward ~100, the sigmoid climbs to exactly 1.0 (float32) in about ten steps and its slope
becomes exactly zero: from then on no layer gets any gradient (Adam's momentum still drifts
the weights a little, to no effect).
"""
import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np
import keras
from keras import layers

keras.utils.set_random_seed(17)
rng = np.random.default_rng(17)

# cars.csv: age_years, km_thousands, engine_litres, owners, price_thousands
n = 256
age = rng.uniform(0, 15, n)
km = age * rng.uniform(8, 20, n)
engine = rng.choice([1.2, 1.6, 2.0, 3.0], n)
owners = rng.integers(1, 5, n)
price = 130 - 4.0 * age - 0.1 * km + 8 * engine - 2 * owners + rng.normal(0, 5, n)
data = np.column_stack([age, km, engine, owners, price]).astype("float32")

X = (data[:, :4] - data[:, :4].mean(0)) / data[:, :4].std(0)
y = data[:, 4]

model = keras.Sequential([
    keras.Input(shape=(4,)),
    layers.Dense(32, activation="relu"),
    layers.Dense(16, activation="relu"),
    layers.Dense(1, activation="sigmoid"),
])
model.compile(optimizer=keras.optimizers.Adam(learning_rate=0.05), loss="mse", metrics=["mae"])
hist = model.fit(X, y, epochs=12, batch_size=64, verbose=0)
print("mse by epoch:", [round(v) for v in hist.history["loss"]])
print("predictions:", model.predict(X[:4], verbose=0).ravel(), "targets:", y[:4])
