"""Expression classification: face crops -> seven emotion probabilities, with a TFLite model.

The model contract (see models/MODELS.md): one image input (1, H, W, 1) of gray faces scaled to
[-1, 1] (or its int8/uint8 quantized form), one output with seven values in `Emotion` order.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol, Sequence

import cv2
import numpy as np

from agent import model_files
from agent.config import ClassifierConfig
from agent.errors import ModelError
from agent.interpreter import dequantize, load_interpreter, quantize
from agent.types import EMOTIONS, Box, EmotionScores

logger = logging.getLogger(__name__)


# Below this tilt a crop is taken as it is: levelling it would only resample the pixels.
MIN_ROLL_DEG = 3.0
# Beyond this the eye points of a face in profile have crossed: the "tilt" would turn it upside down.
MAX_ROLL_DEG = 60.0


class EmotionClassifier(Protocol):
    def classify(self, image: np.ndarray, boxes: Sequence[Box],
                 rolls: Sequence[float] | None = None) -> list[EmotionScores]:
        """Scores for each box of `image` (a BGR frame as OpenCV gives it, or 2-D gray), in order;
        `rolls`, where given, are the faces' tilts in degrees, undone before classifying."""
        ...


class CroppedFaceClassifier(Protocol):
    def classify_faces(self, gray_faces: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """(N, 7) probabilities for N already-cropped uint8 gray faces of any size."""
        ...


def to_gray(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return image
    if image.ndim == 3 and image.shape[2] == 1:
        return image[:, :, 0]
    if image.ndim == 3 and image.shape[2] in (3, 4):
        return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY if image.shape[2] == 3 else cv2.COLOR_BGRA2GRAY)
    raise ValueError(f"expected a gray or BGR image, got shape {image.shape}")


def crop_face(image: np.ndarray, box: Box, margin: float) -> np.ndarray:
    """The square region around `box` grown by `margin` of its size per side, in gray.

    Square because the model was trained on square faces: resizing a tall crop would squash the
    face and change the very geometry (mouth width, eye opening) the model reads. Where the region
    leaves the frame the edge pixels are repeated, so the face stays centred and at its scale.
    """
    side = max(box.w, box.h) * (1 + 2 * margin)
    if side < 1:
        raise ValueError(f"face box too small to classify: {box}")
    cx, cy = box.center
    x0, y0 = round(cx - side / 2), round(cy - side / 2)
    x1, y1 = x0 + round(side), y0 + round(side)
    height, width = image.shape[:2]
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    if cx0 >= cx1 or cy0 >= cy1:
        raise ValueError(f"face box {box} lies outside the {width}x{height} frame")
    # Crop before the colour conversion: converting only the face is cheaper than the whole frame.
    crop = to_gray(image[cy0:cy1, cx0:cx1])
    pads = (cy0 - y0, y1 - cy1, cx0 - x0, x1 - cx1)
    if any(pads):
        crop = cv2.copyMakeBorder(crop, *pads, cv2.BORDER_REPLICATE)
    return crop


def level_face(image: np.ndarray, box: Box, margin: float, roll: float) -> np.ndarray:
    """`crop_face`, turned by `roll` degrees about the box's centre so that the eyes are level, as
    they are in FER2013's faces."""
    if not MIN_ROLL_DEG <= abs(roll) <= MAX_ROLL_DEG:
        return crop_face(image, box, margin)
    # a crop half as wide again holds the turned square up to 45 degrees, edges included
    wide = crop_face(image, box, margin * 1.5 + 0.25)
    side = round(max(box.w, box.h) * (1 + 2 * margin))
    centre = ((wide.shape[1] - 1) / 2, (wide.shape[0] - 1) / 2)
    turn = cv2.getRotationMatrix2D(centre, roll, 1.0)
    turn[:, 2] += (side - 1) / 2 - np.array(centre)
    return cv2.warpAffine(wide, turn, (side, side), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def resize_face(gray: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`gray` at (height, width) `size`; area averaging when shrinking, as it does not alias."""
    height, width = size
    if gray.shape == (height, width):
        return gray
    shrinking = gray.shape[0] > height or gray.shape[1] > width
    return cv2.resize(gray, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def scale_to_unit(gray: np.ndarray) -> np.ndarray:
    """uint8 pixels to the [-1, 1] floats the mini-Xception was trained on."""
    return gray.astype(np.float32) / 127.5 - 1.0


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def _is_probabilities(values: np.ndarray) -> bool:
    return bool(np.all(values >= -1e-3) and np.allclose(values.sum(axis=-1), 1.0, atol=0.02))


class TFLiteEmotionClassifier:
    """A TFLite expression model, float or quantized, run one face per invoke.

    One face per invoke, not a resized batch input: measured on the x86 dev machine (1 thread),
    batches of 8, 32 and 256 were no faster per face than single invokes (int8 0.129 ms/face for
    each of 1, 8, 32; float32 0.209 vs 0.216 at 32), and resizing the input re-allocates the
    interpreter whenever the number of faces changes.
    """

    def __init__(self, model_path: Path | str, crop_margin: float = ClassifierConfig().crop_margin,
                 threads: int = 1) -> None:
        self.model_path = Path(model_path)
        self.crop_margin = crop_margin
        self._interpreter = load_interpreter(self.model_path, threads)
        inputs = self._interpreter.get_input_details()
        if len(inputs) != 1:
            raise ModelError(f"{self.model_path}: expected one input tensor, found {len(inputs)}")
        spec = inputs[0]
        shape = tuple(int(n) for n in spec["shape"])
        if len(shape) != 4 or shape[0] != 1 or shape[3] != 1:
            raise ModelError(f"{self.model_path}: expected a (1, H, W, 1) gray input, found {shape}")
        self.input_size: tuple[int, int] = (shape[1], shape[2])
        self._input_index = spec["index"]
        self._input_dtype = np.dtype(spec["dtype"])
        if self._input_dtype not in (np.float32, np.int8, np.uint8):
            raise ModelError(f"{self.model_path}: unsupported input type {self._input_dtype}")
        # Each pixel value's input, in [-1, 1] or, for a quantized model, as its code: one look-up
        # a pixel, whatever the model's type.
        self._pixel_table = scale_to_unit(np.arange(256, dtype=np.uint8))
        if self._input_dtype != np.float32:
            if not spec["quantization"][0]:
                raise ModelError(f"{self.model_path}: quantized input without a scale")
            self._pixel_table = quantize(self._pixel_table, spec["quantization"], self._input_dtype)
        self._output = self._find_output(self._interpreter.get_output_details())
        self._output_quant = None if np.dtype(self._output["dtype"]) == np.float32 else self._output["quantization"]
        self._needs_softmax: bool | None = None  # decided on the first face, then fixed
        logger.info("emotion model %s: input %dx%d %s, output %r", self.model_path.name, shape[1], shape[2],
                    self._input_dtype.name, self._output["name"])

    def _find_output(self, outputs: list[dict]) -> dict:
        # By shape, not position: converters reorder and rename outputs between releases.
        candidates = [o for o in outputs if int(o["shape"][-1]) == len(EMOTIONS) and int(np.prod(o["shape"])) == 7]
        if len(candidates) > 1:
            named = [o for o in candidates if any(k in o["name"].lower() for k in ("prediction", "softmax", "prob"))]
            candidates = named or candidates
        if len(candidates) != 1:
            found = ", ".join(f"{o['name']}{tuple(int(n) for n in o['shape'])}" for o in outputs)
            raise ModelError(f"{self.model_path}: expected one output of {len(EMOTIONS)} emotion scores, found {found}")
        return candidates[0]

    def _run(self, face: np.ndarray) -> np.ndarray:
        tensor = np.take(self._pixel_table, face)
        self._interpreter.set_tensor(self._input_index, tensor[None, :, :, None])
        self._interpreter.invoke()
        raw = dequantize(self._interpreter.get_tensor(self._output["index"]).reshape(-1), self._output_quant)
        if self._needs_softmax is None:
            self._needs_softmax = not _is_probabilities(raw)
        return softmax(raw) if self._needs_softmax else raw

    def classify_faces(self, gray_faces: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """(N, 7) probabilities for already-cropped uint8 gray faces: an (N, H, W) array, or a
        sequence of 2-D faces of any sizes."""
        if isinstance(gray_faces, np.ndarray) and gray_faces.ndim == 2:
            gray_faces = gray_faces[None]
        out = np.empty((len(gray_faces), len(EMOTIONS)), dtype=np.float32)
        for i, face in enumerate(gray_faces):
            out[i] = self._run(resize_face(face, self.input_size))
        return out

    def classify(self, image: np.ndarray, boxes: Sequence[Box],
                 rolls: Sequence[float] | None = None) -> list[EmotionScores]:
        rolls = rolls if rolls is not None else [0.0] * len(boxes)
        return [EmotionScores.from_array(self._run(resize_face(level_face(image, box, self.crop_margin, roll),
                                                               self.input_size)))
                for box, roll in zip(boxes, rolls)]


def make_classifier(settings: ClassifierConfig) -> TFLiteEmotionClassifier:
    """The classifier the config's `classifier` section asks for."""
    model = model_files.model_path(settings.model, model_files.DEFAULT_EMOTION_MODEL)
    return TFLiteEmotionClassifier(model, settings.crop_margin, settings.threads)
