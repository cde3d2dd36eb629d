"""House-price regression (targets standardised) where the loss is the same after every epoch.

Adam with learning_rate=1e-7, copied from a fine-tuning recipe: each step moves every weight by
about 1e-7, nothing compared with weights of size ~0.3. 48 optimizer steps.
"""
import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np
import keras
from keras import layers

keras.utils.set_random_seed(11)
rng = np.random.default_rng(11)

# houses.csv: sqft, bedrooms, age_years, distance_km, price
n = 240
sqft = rng.normal(1600, 450, n)
beds = rng.integers(1, 6, n)
age = rng.integers(0, 90, n)
dist = rng.gamma(2.0, 5.0, n)
price = 120 * sqft + 9000 * beds - 800 * age - 3000 * dist + rng.normal(0, 20000, n)
data = np.column_stack([sqft, beds, age, dist, price]).astype("float32")

X = (data[:, :4] - data[:, :4].mean(0)) / data[:, :4].std(0)
y = (data[:, 4] - data[:, 4].mean()) / data[:, 4].std()

model = keras.Sequential([
    keras.Input(shape=(4,)),
    layers.Dense(32, activation="relu"),
    layers.Dense(32, activation="relu"),
    layers.Dense(1),
])
model.compile(optimizer=keras.optimizers.Adam(learning_rate=1e-7), loss="mse", metrics=["mae"])
hist = model.fit(X, y, epochs=12, batch_size=60, verbose=0)
print("mse by epoch:", [round(v, 4) for v in hist.history["loss"]])
