"""A subclassed deep sigmoid model whose layers are created output-side first.

`__init__` builds the stack from the head down (the poster mirrored a decoder), `call` runs it
from the input up. Variables are listed in creation order, so the first variable belongs to the
layer next to the output. The model really has vanishing gradients: eight sigmoid layers, the
input-side layer (`h1`) gets a vanishing fraction of the gradient of the output-side ones.
"""
import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras
from keras import layers
from sklearn.datasets import make_circles


class DeepNet(keras.Model):
    def __init__(self, depth=8, width=16):
        super().__init__()
        self.head = layers.Dense(1, activation="sigmoid", name="head")
        self.hidden = [layers.Dense(width, activation="sigmoid", name=f"h{i}") for i in range(depth, 0, -1)]

    def call(self, x):
        for layer in reversed(self.hidden):  # h1 (input side) ... h8
            x = layer(x)
        return self.head(x)


keras.utils.set_random_seed(4)
X, y = make_circles(n_samples=400, factor=0.5, noise=0.08, random_state=4)
model = DeepNet()
model.compile(optimizer=keras.optimizers.SGD(0.5), loss="binary_crossentropy", metrics=["accuracy"])
model.fit(X, y, epochs=10, batch_size=100, verbose=0)
loss, acc = model.evaluate(X, y, verbose=0)
print(f"loss {loss:.4f}  accuracy {acc:.3f}")
