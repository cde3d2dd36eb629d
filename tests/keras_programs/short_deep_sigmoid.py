"""A "deeper is better" attempt: eight sigmoid hidden layers on a two-feature problem, 40 steps.

The loss stays at chance and the first layers' weights barely change: every sigmoid passes
back at most a quarter of the gradient, so after seven of them the input side gets almost
nothing (about a millionth of the last layer's gradient).
"""
import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras
from keras import layers
from sklearn.datasets import make_circles

keras.utils.set_random_seed(3)
X, y = make_circles(n_samples=400, factor=0.5, noise=0.08, random_state=3)

model = keras.Sequential([keras.Input(shape=(2,))])
for _ in range(8):
    model.add(layers.Dense(16))
    model.add(layers.Activation("sigmoid"))
model.add(layers.Dense(1, activation="sigmoid"))

model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.5), loss="binary_crossentropy", metrics=["accuracy"])
model.fit(X, y, epochs=10, batch_size=100, verbose=0)
loss, acc = model.evaluate(X, y, verbose=0)
print(f"loss {loss:.4f}  accuracy {acc:.3f}")
