"""A deep sigmoid network whose activations are layers of their own (Dense, then
Activation("sigmoid")), on make_moons, SGD. Prints its accuracy."""
import os

os.environ.setdefault("KERAS_BACKEND", "torch")
import keras  # noqa: E402
from keras.layers import Activation, Dense, Input  # noqa: E402
from sklearn.datasets import make_moons  # noqa: E402

keras.utils.set_random_seed(2)
x, y = make_moons(n_samples=512, noise=0.2, random_state=0)
layers = [Input(shape=(2,))]
for _ in range(6):
    layers += [Dense(8, kernel_initializer=keras.initializers.RandomNormal(0.0, 1.0)), Activation("sigmoid")]
model = keras.Sequential(layers + [Dense(1), Activation("sigmoid")])
model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1), loss="binary_crossentropy", metrics=["accuracy"])
model.fit(x, y, batch_size=32, epochs=8, verbose=0)
print("accuracy", round(float(model.evaluate(x, y, batch_size=512, verbose=0)[1]), 3))
