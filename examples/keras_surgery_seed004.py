"""Model surgery on seed 004's network written in Keras (Dense 5-5-5-5-1, sigmoid, RMSprop): the
reports docs/doctor.md shows. Any backend:

    KERAS_BACKEND=tensorflow .venv/bin/python examples/keras_surgery_seed004.py
"""

import keras
import numpy as np
from sklearn.datasets import make_circles

from gradwatch import surgery

keras.utils.set_random_seed(0)
x, y = make_circles(n_samples=1000, factor=0.5, noise=0.1, random_state=1)
init = keras.initializers.RandomNormal(0.0, 1.0)
model = keras.Sequential([keras.Input((2,))]
                         + [keras.layers.Dense(5, activation="sigmoid", kernel_initializer=init) for _ in range(4)]
                         + [keras.layers.Dense(1, activation="sigmoid", kernel_initializer=init)])
model.compile(optimizer="rmsprop", loss="binary_crossentropy", metrics=["accuracy"])
model.fit(x, y, epochs=5, batch_size=32, verbose=0)  # the optimizer is built: surgery must tell it

print(surgery.swap_activations(model, "sigmoid", "relu"))
print(surgery.reinit(model, "he_uniform", seed=0))
print(surgery.insert_norm(model, "batch"))
history = model.fit(x, y, epochs=20, batch_size=32, verbose=0).history
print(f"after surgery: {len(model.layers)} layers, accuracy {history['accuracy'][-1]:.3f} after 20 more epochs")
model.save("/tmp/keras_surgery_seed004.keras")
again = keras.models.load_model("/tmp/keras_surgery_seed004.keras")
same = np.allclose(np.asarray(again.predict(x, verbose=0)), np.asarray(model.predict(x, verbose=0)))
print(f"saved and loaded: predictions {'equal' if same else 'DIFFER'}")
