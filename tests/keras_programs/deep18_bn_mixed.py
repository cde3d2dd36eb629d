"""An 18-layer tabular MLP mixing sigmoid and tanh, each Dense followed by BatchNormalization.

BatchNorm keeps every layer's input well scaled, so the input side gets its full share of the
gradient. In the middle, the 256-unit "expansion" layer and the layer after it get about a
tenth of the input side's gradient per weight: a dip in the profile, not vanishing gradients.
The model trains. (BatchNormalization(momentum=0.9): with Keras' default 0.99 the moving
statistics are still far off after 40 steps and evaluate() reports chance accuracy.)
"""
import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras
from keras import layers
from sklearn.datasets import make_classification
from sklearn.preprocessing import StandardScaler

keras.utils.set_random_seed(18)
X, y = make_classification(n_samples=512, n_features=16, n_informative=8, class_sep=1.2, random_state=18)
X = StandardScaler().fit_transform(X)

widths = [32] * 8 + [256] + [32] * 8
acts = ["tanh", "sigmoid"] * 9

inputs = keras.Input(shape=(16,))
x = inputs
for i, (w, a) in enumerate(zip(widths, acts)):
    x = layers.Dense(w, name=f"fc{i + 1}")(x)
    x = layers.BatchNormalization(momentum=0.9, name=f"bn{i + 1}")(x)
    x = layers.Activation(a)(x)
outputs = layers.Dense(1, activation="sigmoid", name="out")(x)
model = keras.Model(inputs, outputs)

model.compile(optimizer=keras.optimizers.Adam(0.003), loss="binary_crossentropy", metrics=["accuracy"])
model.fit(X, y, epochs=5, batch_size=64, verbose=0)
loss, acc = model.evaluate(X, y, verbose=0)
print(f"{len(model.layers)} layers, loss {loss:.4f}  accuracy {acc:.3f}")
