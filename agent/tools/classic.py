"""The classic blog recipe, kept only as a speed reference for `bench`.

Haar cascade (1.3, 5), then per face: crop, 48x48 gray, /255 and one Keras `model.predict`, with
the blog model's published architecture. Random weights are fine: only its speed is measured.
Needs TensorFlow (`pip install .[convert]`); imported here, never by the daemon.
"""

from __future__ import annotations

import importlib.util
import os
import time

import cv2
import numpy as np

from agent.errors import ModelError


_NO_TENSORFLOW = "the classic reference needs TensorFlow: pip install '.[convert]' (or pass --no-classic)"


def check_tensorflow_installed() -> None:
    """A one-line error now if TensorFlow is missing, without importing it: the import alone
    takes hundreds of MiB, which would count in the agent's measured peak memory."""
    if importlib.util.find_spec("tensorflow") is None:
        raise ModelError(_NO_TENSORFLOW)


def require_tensorflow():
    """The tensorflow module, or a one-line error saying how to get it."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf
    except ImportError:
        raise ModelError(_NO_TENSORFLOW) from None
    return tf


def build_blog_model():
    """Conv64 5x5, MaxPool 5/2, Conv64 3x3 x2, AvgPool 3/2, Conv128 3x3 x2, AvgPool 3/2,
    Dense 1024 x2 with dropout 0.2, softmax 7."""
    tf = require_tensorflow()
    layers = tf.keras.layers
    model = tf.keras.Sequential([
        layers.Input((48, 48, 1)),
        layers.Conv2D(64, (5, 5), activation="relu"),
        layers.MaxPooling2D(pool_size=(5, 5), strides=(2, 2)),
        layers.Conv2D(64, (3, 3), activation="relu"),
        layers.Conv2D(64, (3, 3), activation="relu"),
        layers.AveragePooling2D(pool_size=(3, 3), strides=(2, 2)),
        layers.Conv2D(128, (3, 3), activation="relu"),
        layers.Conv2D(128, (3, 3), activation="relu"),
        layers.AveragePooling2D(pool_size=(3, 3), strides=(2, 2)),
        layers.Flatten(),
        layers.Dense(1024, activation="relu"),
        layers.Dropout(0.2),
        layers.Dense(1024, activation="relu"),
        layers.Dropout(0.2),
        layers.Dense(7, activation="softmax"),
    ])
    return model


class ClassicPipeline:
    def __init__(self) -> None:
        self.model = build_blog_model()
        self.cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")

    def process(self, frame: np.ndarray) -> tuple[list, float, float]:
        """(labels, detect seconds, classify seconds) for one BGR frame, the recipe's way."""
        start = time.perf_counter()
        gray = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
        faces = self.cascade.detectMultiScale(gray, 1.3, 5)
        detected = time.perf_counter()
        labels = []
        for (x, y, w, h) in faces:
            roi = cv2.resize(gray[y:y + h, x:x + w], (48, 48)).astype("float") / 255.0
            roi = np.expand_dims(np.expand_dims(roi, -1), 0)
            preds = self.model.predict(roi, verbose=0)[0]
            labels.append(int(np.argmax(preds)))
        return labels, detected - start, time.perf_counter() - detected
