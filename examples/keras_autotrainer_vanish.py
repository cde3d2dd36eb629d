"""AutoTrainer's Gradient_Vanish_Case, rebuilt as a plain Keras script for `gradwatch doctor`.

The data are those of AutoTrainer's demo (its data/simplednn.py, method "circle"): make_circles(1000,
noise 0.1, random_state 1), scaled to [-1, 1], the first 700 to train, 300 to validate. Its model
ships as a binary model.h5, so the model here is the textbook deep-MLP vanishing-gradient network
on that data: five hidden Dense(5, tanh) layers drawn from RandomUniform(0, 1), a sigmoid output,
SGD(0.01, momentum 0.9), binary cross-entropy. It prints the validation accuracy.

    KERAS_BACKEND=tensorflow gradwatch doctor --metric val_accuracy examples/keras_autotrainer_vanish.py
"""

import argparse

import keras
from sklearn.datasets import make_circles
from sklearn.preprocessing import MinMaxScaler

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=100)
args = parser.parse_args()

x, y = make_circles(n_samples=1000, noise=0.1, random_state=1)
x = MinMaxScaler(feature_range=(-1, 1)).fit_transform(x).astype("float32")
y = y.astype("float32")
x_train, x_val, y_train, y_val = x[:700], x[700:], y[:700], y[700:]

init = keras.initializers.RandomUniform(minval=0.0, maxval=1.0)
model = keras.Sequential([keras.Input((2,))]
                         + [keras.layers.Dense(5, activation="tanh", kernel_initializer=init) for _ in range(5)]
                         + [keras.layers.Dense(1, activation="sigmoid")])
model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.01, momentum=0.9), loss="binary_crossentropy",
              metrics=["accuracy"])
history = model.fit(x_train, y_train, validation_data=(x_val, y_val), epochs=args.epochs, batch_size=32, verbose=0)
print(f"val_accuracy {history.history['val_accuracy'][-1]:.3f}")
