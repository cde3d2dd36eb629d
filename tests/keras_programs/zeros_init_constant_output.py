"""Wine-quality classifier where every wine gets the same prediction.

All kernels were initialised with "zeros" (to make runs reproducible, the poster said). Every
ReLU unit's input is exactly 0 for every sample, so the hidden layers pass nothing forward and
get exactly zero gradient; only the output bias learns: the model becomes the constant
"predict the class frequencies" classifier.
"""
import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np
import keras
from keras import layers
from sklearn.datasets import load_wine
from sklearn.preprocessing import StandardScaler

keras.utils.set_random_seed(1)
wine = load_wine()  # bundled with scikit-learn: 178 wines, 13 measurements, 3 cultivars
X = StandardScaler().fit_transform(wine.data).astype("float32")
y = wine.target

model = keras.Sequential([
    keras.Input(shape=(13,)),
    layers.Dense(32, activation="relu", kernel_initializer="zeros"),
    layers.Dense(16, activation="relu", kernel_initializer="zeros"),
    layers.Dense(3, activation="softmax", kernel_initializer="zeros"),
])
model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
model.fit(X, y, epochs=15, batch_size=60, verbose=0)
loss, acc = model.evaluate(X, y, verbose=0)
print(f"loss {loss:.4f}  accuracy {acc:.3f}")
print("distinct predictions:", np.unique(model.predict(X, verbose=0).round(4), axis=0))
