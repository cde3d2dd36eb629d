"""Seed 004's failing model in Keras 3: make_circles, four hidden Dense(5, sigmoid) layers with
N(0, 1) weights, SGD, binary cross-entropy. Prints its accuracy."""
import os

os.environ.setdefault("KERAS_BACKEND", "torch")
import keras  # noqa: E402
from keras.initializers import RandomNormal  # noqa: E402
from keras.layers import Dense, Input  # noqa: E402
from sklearn.datasets import make_circles  # noqa: E402

keras.utils.set_random_seed(1)
x, y = make_circles(n_samples=512, factor=0.5, noise=0.1, random_state=0)
model = keras.Sequential([Input(shape=(2,))]
                         + [Dense(5, activation="sigmoid", kernel_initializer=RandomNormal(0.0, 1.0)) for _ in range(4)]
                         + [Dense(1, activation="sigmoid", kernel_initializer=RandomNormal(0.0, 1.0))])
model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1), loss="binary_crossentropy", metrics=["accuracy"])
model.fit(x, y, batch_size=32, epochs=8, verbose=0)
print("accuracy", round(float(model.evaluate(x, y, batch_size=512, verbose=0)[1]), 3))
