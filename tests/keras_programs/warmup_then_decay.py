"""The fixed version of growing_lr_schedule.py: linear warm-up for 60 steps, then linear decay.

Same regression, same SGD; the learning rate peaks at 0.05 and falls to zero by the last step.
"""
import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras
from keras import layers, ops
from sklearn.datasets import make_regression
from sklearn.preprocessing import StandardScaler

EPOCHS, BATCH, N = 40, 32, 320


class WarmUpThenDecay(keras.optimizers.schedules.LearningRateSchedule):
    def __init__(self, peak_lr, warmup_steps, total_steps):
        self.peak_lr = peak_lr
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps

    def __call__(self, step):
        step = ops.cast(step, "float32")
        warm = self.peak_lr * (step + 1) / self.warmup_steps
        decay = self.peak_lr * (self.total_steps - step) / (self.total_steps - self.warmup_steps)
        return ops.maximum(ops.minimum(warm, decay), 0.0)

    def get_config(self):
        return {"peak_lr": self.peak_lr, "warmup_steps": self.warmup_steps, "total_steps": self.total_steps}


keras.utils.set_random_seed(12)
X, y = make_regression(n_samples=N, n_features=8, n_informative=5, noise=10.0, random_state=12)
X = StandardScaler().fit_transform(X)
y = (y - y.mean()) / y.std()

model = keras.Sequential([
    keras.Input(shape=(8,)),
    layers.Dense(32, activation="relu"),
    layers.Dense(32, activation="relu"),
    layers.Dense(1),
])
schedule = WarmUpThenDecay(0.05, warmup_steps=60, total_steps=EPOCHS * N // BATCH)
model.compile(optimizer=keras.optimizers.SGD(learning_rate=schedule), loss="mse")
hist = model.fit(X, y, epochs=EPOCHS, batch_size=BATCH, verbose=0)
print("mse every 5 epochs:", [round(v, 4) for v in hist.history["loss"][::5]])
