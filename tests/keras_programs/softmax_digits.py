"""softmax_huge_logits.py after the fix: the same digits and model with the default initialiser."""
import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras
from keras import layers
from sklearn.datasets import load_digits

keras.utils.set_random_seed(13)
digits = load_digits()
X = (digits.data[:480] / 16.0).astype("float32")
Y = keras.utils.to_categorical(digits.target[:480], 10)

model = keras.Sequential([
    keras.Input(shape=(64,)),
    layers.Dense(32, activation="relu"),
    layers.Dense(10, activation="softmax"),
])
model.compile(optimizer=keras.optimizers.Adam(0.01), loss="categorical_crossentropy", metrics=["accuracy"])
model.fit(X, Y, epochs=5, batch_size=64, verbose=0)
loss, acc = model.evaluate(X, Y, verbose=0)
print(f"loss {loss:.3f}  accuracy {acc:.3f}")
