"""A textbook binary classifier: sigmoid output, binary_crossentropy, scaled inputs. It works.

The output sigmoid is near 0 or 1 for most samples by the end (confident, correct predictions):
that is what a trained classifier looks like, not a saturation problem.
"""
import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras
from keras import layers
from sklearn.datasets import load_breast_cancer
from sklearn.preprocessing import StandardScaler

keras.utils.set_random_seed(14)
data = load_breast_cancer()  # bundled with scikit-learn: 569 tumours, 30 measurements
X = StandardScaler().fit_transform(data.data).astype("float32")
y = data.target.astype("float32")

model = keras.Sequential([
    keras.Input(shape=(30,)),
    layers.Dense(16, activation="relu"),
    layers.Dense(8, activation="relu"),
    layers.Dense(1, activation="sigmoid"),
])
model.compile(optimizer=keras.optimizers.Adam(0.01), loss="binary_crossentropy", metrics=["accuracy"])
model.fit(X, y, epochs=6, batch_size=64, verbose=0)
loss, acc = model.evaluate(X, y, verbose=0)
print(f"loss {loss:.4f}  accuracy {acc:.3f}")
