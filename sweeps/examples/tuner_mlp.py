"""A KerasTuner build function, written as KerasTuner's own tutorial writes one: nothing here knows
about the harness. `harness sweep` calls it with every `args` value fixed (hp.Fixed) and the other
hyperparameters at their defaults; `harness tune` searches its space.
"""

import keras
from keras import layers


def build(hp):
    model = keras.Sequential()
    model.add(keras.Input(shape=(28, 28, 1)))
    model.add(layers.Flatten())
    for i in range(hp.Int("layers", 1, 2, default=1)):
        model.add(layers.Dense(units=hp.Int(f"units_{i}", min_value=16, max_value=128, step=16, default=64),
                               activation=hp.Choice("activation", ["relu", "tanh"])))
    if hp.Boolean("dropout", default=False):
        model.add(layers.Dropout(rate=0.25))
    model.add(layers.Dense(10, activation="softmax"))
    learning_rate = hp.Float("lr", min_value=1e-4, max_value=1e-2, sampling="log", default=1e-3)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss="categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model
