"""A credit-scoring classifier trained with batch_size=4: the per-step loss jumps around a lot.

Nothing is wrong: tiny batches of a noisy-label table give noisy per-batch losses and gradient
norms, but the loss falls and accuracy ends high.
"""
import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras
from keras import layers
from sklearn.datasets import make_classification
from sklearn.preprocessing import StandardScaler

keras.utils.set_random_seed(23)
X, y = make_classification(n_samples=240, n_features=10, n_informative=5, n_redundant=2,
                           flip_y=0.05, class_sep=1.5, random_state=23)
X = StandardScaler().fit_transform(X)

model = keras.Sequential([
    keras.Input(shape=(10,)),
    layers.Dense(32, activation="relu"),
    layers.Dropout(0.2),
    layers.Dense(16, activation="relu"),
    layers.Dense(1, activation="sigmoid"),
])
model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy", metrics=["accuracy"])
model.fit(X, y, epochs=5, batch_size=4, verbose=0)
loss, acc = model.evaluate(X, y, verbose=0)
print(f"loss {loss:.4f}  accuracy {acc:.3f}")
