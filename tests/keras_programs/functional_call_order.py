"""Functional model whose Dense layers are created in a list and then called in another order.

The poster built `blocks` once and wired them as blocks[2] -> blocks[0] -> blocks[3] -> blocks[1]
while experimenting. The names follow creation order (block_0 .. block_3), so the first-created
layer is not the input-side one. Nothing is wrong with the training: it works.
"""
import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras
from keras import layers
from sklearn.datasets import make_classification

keras.utils.set_random_seed(19)
X, y = make_classification(n_samples=400, n_features=10, n_informative=6, class_sep=1.5, random_state=19)

blocks = [layers.Dense(24, activation="tanh", name=f"block_{i}") for i in range(4)]
inputs = keras.Input(shape=(10,))
x = layers.Dense(24, activation="tanh", name="stem")(inputs)
for i in (2, 0, 3, 1):
    x = blocks[i](x)
outputs = layers.Dense(1, activation="sigmoid", name="head")(x)
model = keras.Model(inputs, outputs)

model.compile(optimizer=keras.optimizers.Adam(0.01), loss="binary_crossentropy", metrics=["accuracy"])
model.fit(X, y, epochs=6, batch_size=40, verbose=0)
loss, acc = model.evaluate(X, y, verbose=0)
print(f"loss {loss:.4f}  accuracy {acc:.3f}")
print("layer order in the model:", [layer.name for layer in model.layers])
