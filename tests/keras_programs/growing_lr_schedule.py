"""A home-made warm-up schedule that never stops warming up: lr = lr0 * 1.015**step.

The poster meant to cap it after a hundred steps. The learning rate grows 1.5% per step, so the
regression trains well at first, then the gradient norm rises exponentially for a couple of
hundred steps and the loss turns NaN in the fifth hundred.
"""
import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras
from keras import layers, ops
from sklearn.datasets import make_regression
from sklearn.preprocessing import StandardScaler

LR0 = 3.5e-3


class WarmUp(keras.optimizers.schedules.LearningRateSchedule):
    def __init__(self, initial_lr, growth):
        self.initial_lr = initial_lr
        self.growth = growth

    def __call__(self, step):
        return self.initial_lr * ops.power(self.growth, ops.cast(step, "float32"))

    def get_config(self):
        return {"initial_lr": self.initial_lr, "growth": self.growth}


keras.utils.set_random_seed(12)
X, y = make_regression(n_samples=320, n_features=8, n_informative=5, noise=10.0, random_state=12)
X = StandardScaler().fit_transform(X)
y = (y - y.mean()) / y.std()

model = keras.Sequential([
    keras.Input(shape=(8,)),
    layers.Dense(32, activation="relu"),
    layers.Dense(32, activation="relu"),
    layers.Dense(1),
])
model.compile(optimizer=keras.optimizers.SGD(learning_rate=WarmUp(LR0, 1.015)), loss="mse")
hist = model.fit(X, y, epochs=45, batch_size=32, verbose=0)
losses = hist.history["loss"]
print("mse every 5 epochs:", [round(v, 4) for v in losses[::5]])
