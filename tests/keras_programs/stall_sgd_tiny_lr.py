"""Churn classifier that "doesn't learn anything": loss stays at 0.6800 for every epoch.

The learning rate was typed as 1e-6 (meant 1e-2). Full batch, 30 epochs = 30 optimizer steps.
"""
import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np
import keras
from keras import layers
from sklearn.preprocessing import StandardScaler

keras.utils.set_random_seed(7)
rng = np.random.default_rng(7)

# customers.csv: age, tenure_months, monthly_charges, support_calls, churned
n = 300
age = rng.integers(18, 80, n)
tenure = rng.integers(1, 72, n)
charges = rng.normal(70, 25, n).round(2)
calls = rng.poisson(2, n)
logit = -0.04 * tenure + 0.6 * calls + 0.02 * (charges - 70) - 0.5
churned = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype("float32")
table = np.column_stack([age, tenure, charges, calls, churned]).astype("float32")

X = StandardScaler().fit_transform(table[:, :4])
y = table[:, 4]

model = keras.Sequential([
    keras.Input(shape=(4,)),
    layers.Dense(16, activation="relu"),
    layers.Dense(8, activation="relu"),
    layers.Dense(1, activation="sigmoid"),
])
model.compile(optimizer=keras.optimizers.SGD(learning_rate=1e-6), loss="binary_crossentropy", metrics=["accuracy"])
history = model.fit(X, y, epochs=30, batch_size=len(X), verbose=0)
print("loss per epoch:", [round(v, 4) for v in history.history["loss"][::5]])
loss, acc = model.evaluate(X, y, verbose=0)
print(f"final loss {loss:.4f}  accuracy {acc:.3f}")
