"""Seed 001's unscaled regression in Keras 3: make_regression targets of scale ~100, an MLP with
SGD(0.01, momentum 0.9) and MSE explodes to NaN. Prints the test loss."""
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
import keras  # noqa: E402
from keras.layers import Dense, Input  # noqa: E402
from sklearn.datasets import make_regression  # noqa: E402

keras.utils.set_random_seed(1)
x, y = make_regression(n_samples=1000, n_features=20, noise=0.1, random_state=1)
x, y = x.astype("float32"), y.astype("float32")[:, None]
model = keras.Sequential([Input(shape=(20,)), Dense(25, activation="relu", kernel_initializer="he_uniform"),
                          Dense(1, activation="linear")])
model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.01, momentum=0.9), loss="mean_squared_error")
model.fit(x[:500], y[:500], batch_size=32, epochs=3, verbose=0)
print("final loss", float(model.evaluate(x[500:], y[500:], batch_size=500, verbose=0)))
