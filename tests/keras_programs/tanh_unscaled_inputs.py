"""Energy-use regression on raw meter readings: the first layer never learns.

The inputs are raw readings in the thousands (square metres, kWh last year, ...), fed to a tanh
layer. Its pre-activations are in the hundreds to thousands, tanh is exactly +-1 in float32 and its slope is
exactly 0: the first layer's kernel gets no gradient at all, while the later layers (which see
+-1 inputs) learn normally. Standardising the inputs fixes it (see tanh_scaled_inputs.py).
"""
import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np
import keras
from keras import layers

keras.utils.set_random_seed(21)
rng = np.random.default_rng(21)

# buildings.csv: floor_area_m2, kwh_last_year, occupants, year_built, kwh_this_year
n = 300
area = rng.uniform(800, 6000, n)
last_year = area * rng.uniform(90, 160, n) / 10
occupants = rng.integers(20, 400, n) * 10
built = rng.integers(1950, 2020, n)
this_year = 0.9 * last_year + 2.0 * occupants - 3.0 * (built - 1950) + rng.normal(0, 500, n)
data = np.column_stack([area, last_year, occupants, built, this_year]).astype("float32")

X = data[:, :4]
y = (data[:, 4] - data[:, 4].mean()) / data[:, 4].std()  # the targets *were* standardised

model = keras.Sequential([
    keras.Input(shape=(4,)),
    layers.Dense(16),
    layers.Activation("tanh"),
    layers.Dense(16),
    layers.Activation("tanh"),
    layers.Dense(1),
])
model.compile(optimizer=keras.optimizers.Adam(learning_rate=0.01), loss="mse")
hist = model.fit(X, y, epochs=10, batch_size=60, verbose=0)
print("mse first/last epoch:", round(hist.history["loss"][0], 4), round(hist.history["loss"][-1], 4))
