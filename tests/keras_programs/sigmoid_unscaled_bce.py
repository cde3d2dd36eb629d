"""Loan-default model on raw application data: loss ~10 and the accuracy never changes.

Income and loan amount go in unscaled (tens of thousands), so the sigmoid output's input is in
the thousands and the sigmoid is exactly 0.0 or 1.0 in float32. binary_crossentropy clips its
input to [1e-7, 1 - 1e-7] and the clip passes back nothing: every gradient is zero from step 0.
"""
import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np
import keras
from keras import layers

keras.utils.set_random_seed(4)
rng = np.random.default_rng(2)

# loans.csv: income, loan_amount, years_employed, open_accounts, defaulted
n = 400
income = rng.normal(52000, 15000, n).clip(12000, None).round()
loan = rng.normal(18000, 7000, n).clip(1000, None).round()
years = rng.integers(0, 30, n)
accounts = rng.integers(1, 12, n)
p = 1 / (1 + np.exp(-(loan / income * 6 - 2.2 - 0.05 * years)))
defaulted = (rng.random(n) < p).astype("float32")
data = np.column_stack([income, loan, years, accounts, defaulted]).astype("float32")
X, y = data[:, :4], data[:, 4]

model = keras.Sequential([
    keras.Input(shape=(4,)),
    layers.Dense(8, activation="relu"),
    layers.Dense(1, activation="sigmoid"),
])
model.compile(optimizer=keras.optimizers.Adam(learning_rate=0.001), loss="binary_crossentropy", metrics=["accuracy"])
model.fit(X, y, epochs=4, batch_size=40, verbose=0)
loss, acc = model.evaluate(X, y, verbose=0)
print(f"loss {loss:.4f}  accuracy {acc:.3f}  (default rate {y.mean():.3f})")
