"""The vocabulary's Keras models mean the same on every backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import backend_params

REPO = Path(__file__).resolve().parents[1]

# A sigmoid output with categorical cross-entropy, on fixed weights and inputs: the loss Keras
# computes against the loss as written (sigmoids normalised to sum 1) and against softmax
# cross-entropy of the same logits (what Keras' TensorFlow backend computes for a plain
# `Dense(activation="sigmoid")`, since it reuses the sigmoid's logits).
SCRIPT = """
import json, numpy as np, keras
from harness.architecture import model_layout
from harness.models import build_layout
from harness.spec import ModelConfig

config = ModelConfig.model_validate({"dense": {"units": [6]}, "output_activation": "sigmoid"})
model = build_layout(model_layout(config, input_shape=(5,), num_classes=4))
rng = np.random.default_rng(0)
model.set_weights([rng.normal(0, 1.5, w.shape).astype("float32") for w in model.get_weights()])
x = rng.random((16, 5)).astype("float32") * 4
y = keras.utils.to_categorical(np.arange(16) % 4, 4)
model.compile(loss="categorical_crossentropy")
keras_loss = float(model.evaluate(x, y, batch_size=16, verbose=0))
hidden = np.maximum(0, x.astype(float) @ model.get_weights()[0] + model.get_weights()[1])
z = hidden @ model.get_weights()[2] + model.get_weights()[3]
s = 1 / (1 + np.exp(-z))
p = np.clip(s / s.sum(1, keepdims=True), 1e-7, 1 - 1e-7)
literal = float(-(y * np.log(p)).sum(1).mean())
softmax = float(-(y * (z - np.log(np.exp(z).sum(1, keepdims=True)))).sum(1).mean())
print(json.dumps({"keras": keras_loss, "literal": literal, "softmax": softmax}))
"""


@pytest.mark.parametrize("backend", backend_params())
def test_a_sigmoid_output_is_a_sigmoid_on_every_backend(backend: str) -> None:
    env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    losses = json.loads(done.stdout.strip().splitlines()[-1])
    assert abs(losses["literal"] - losses["softmax"]) > 0.1  # the two readings differ on this data
    assert losses["keras"] == pytest.approx(losses["literal"], rel=1e-4), losses
