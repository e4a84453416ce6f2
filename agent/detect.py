"""Face detection: MediaPipe BlazeFace full-range (TFLite) by default, OpenCV's Haar cascade as
the classic alternative. Boxes come back in the frame's pixel coordinates, clipped to it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import cv2
import numpy as np

from agent import model_files
from agent.config import DetectorConfig
from agent.errors import ModelError
from agent.interpreter import dequantize, load_interpreter, quantize
from agent.types import Box, Detection

logger = logging.getLogger(__name__)

# sigmoid(±80) is still finite in float32; MediaPipe clips raw scores the same way.
RAW_SCORE_LIMIT = 80.0


class PreparedFrame(NamedTuple):
    tensor: np.ndarray      # the model's input
    width: int              # of the frame
    height: int
    scale: float            # model input pixels per frame pixel
    pad_x: int              # letterbox offsets in the input
    pad_y: int


class FaceDetector(Protocol):
    """`detect(image)` is `run(prepare(image))`: split so one thread can prepare the next frame's
    input while another runs the model (prepare touches no state of the detector)."""

    def detect(self, image_bgr: np.ndarray) -> list[Detection]:
        """Faces in a BGR (or gray) frame: boxes in its pixels, clipped to it, scores in [0, 1]."""

    def prepare(self, image_bgr: np.ndarray) -> Any: ...

    def run(self, prepared: Any) -> list[Detection]: ...


def _as_bgr(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2 or image.shape[2] == 1:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    return image


def _output_quantization(detail: dict) -> tuple[float, int] | None:
    if np.dtype(detail["dtype"]) == np.float32:
        return None
    scale, zero_point = detail["quantization"]
    if not scale:
        raise ModelError(f"output {detail['name']!r} is quantized but has no scale")
    return float(scale), int(zero_point)


def ssd_anchor_centres(input_size: int, stride: int, offset: float = 0.5) -> np.ndarray:
    """(N, 2) anchor centres in [0, 1] of a one-layer, one-anchor-per-cell SSD grid (the
    full-range model: 192 / 4 = 48 cells a side, 2304 anchors)."""
    cells = input_size // stride
    ys, xs = np.meshgrid(np.arange(cells), np.arange(cells), indexing="ij")
    return np.stack([(xs.ravel() + offset) / cells, (ys.ravel() + offset) / cells], axis=1).astype(np.float32)


def weighted_nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """MediaPipe's weighted non-maximum suppression: each cluster of overlapping boxes becomes the
    score-weighted mean of its members, scored by its best member. boxes: (N, 4) x1 y1 x2 y2."""
    order = np.argsort(-scores)
    boxes, scores = boxes[order], scores[order]
    areas = np.maximum(0, boxes[:, 2] - boxes[:, 0]) * np.maximum(0, boxes[:, 3] - boxes[:, 1])
    remaining = np.ones(len(boxes), bool)
    out_boxes, out_scores = [], []
    for i in range(len(boxes)):
        if not remaining[i]:
            continue
        ix1 = np.maximum(boxes[i, 0], boxes[:, 0])
        iy1 = np.maximum(boxes[i, 1], boxes[:, 1])
        ix2 = np.minimum(boxes[i, 2], boxes[:, 2])
        iy2 = np.minimum(boxes[i, 3], boxes[:, 3])
        inter = np.maximum(0, ix2 - ix1) * np.maximum(0, iy2 - iy1)
        iou = inter / np.maximum(areas[i] + areas - inter, 1e-12)
        members = remaining & (iou > iou_threshold)
        members[i] = True
        weights = scores[members]
        out_boxes.append((boxes[members] * weights[:, None]).sum(axis=0) / weights.sum())
        out_scores.append(scores[i])
        remaining &= ~members
    if not out_boxes:
        return np.zeros((0, boxes.shape[1]), np.float32), np.zeros(0, np.float32)
    return np.array(out_boxes, np.float32), np.array(out_scores, np.float32)


class BlazeFaceDetector:
    """MediaPipe BlazeFace full-range: 192x192 RGB in [-1, 1], 2304 anchors, one stride-4 layer.

    The frame is letterboxed to the square input (aspect ratio kept), so boxes map back exactly.
    The float model and its int8 build (agent.tools.convert_detector) both load: a quantized input is
    filled from the pixels through a table, quantized outputs are dequantized where read.
    """

    def __init__(self, model_path: Path | str, score_threshold: float = 0.5, nms_iou: float = 0.3,
                 threads: int = 1, min_face_size: int = 0):
        self._interpreter = load_interpreter(model_path, threads)
        inp = self._interpreter.get_input_details()[0]
        shape = tuple(int(v) for v in inp["shape"])
        if len(shape) != 4 or shape[1] != shape[2] or shape[3] != 3:
            raise ModelError(f"{model_path}: not a BlazeFace model (expected a square RGB input, got {shape})")
        # Each pixel value's input, in [-1, 1] or, for a quantized model, as its code: one look-up
        # a pixel fills the input whatever the model's type.
        unit = np.arange(256, dtype=np.float32) * (2.0 / 255.0) - 1.0
        input_dtype = np.dtype(inp["dtype"])
        if input_dtype == np.float32:
            self._pixel_table = unit
        elif input_dtype in (np.int8, np.uint8) and inp["quantization"][0]:
            self._pixel_table = quantize(unit, inp["quantization"], input_dtype)
        else:
            raise ModelError(f"{model_path}: unsupported BlazeFace input type {input_dtype.name}")
        self._input_index = inp["index"]
        self._size = int(shape[1])
        boxes_out = scores_out = None
        for out in self._interpreter.get_output_details():  # by shape: output order varies by export
            if out["shape"][-1] == 16:
                boxes_out = out
            elif out["shape"][-1] == 1:
                scores_out = out
        if boxes_out is None or scores_out is None:
            raise ModelError(f"{model_path}: not a BlazeFace model (no (N,16) boxes and (N,1) scores outputs)")
        self._boxes_index, self._scores_index = boxes_out["index"], scores_out["index"]
        self._boxes_quant, self._scores_quant = _output_quantization(boxes_out), _output_quantization(scores_out)
        count = int(self._interpreter.get_output_details()[0]["shape"][1])
        self._anchors = ssd_anchor_centres(self._size, stride=4)
        if len(self._anchors) != count:
            raise ModelError(f"{model_path}: {count} anchors, but the full-range layout has {len(self._anchors)}")
        # logit threshold: compare raw scores without a sigmoid over every anchor
        clipped = min(max(score_threshold, 1e-6), 1 - 1e-6)
        self._logit_threshold = float(np.log(clipped / (1 - clipped)))
        if self._scores_quant is not None:  # compare the raw codes: the threshold as a code
            scale, zero_point = self._scores_quant
            self._logit_threshold = self._logit_threshold / scale + zero_point
        self._nms_iou = nms_iou
        self._min_face = min_face_size

    def detect(self, image_bgr: np.ndarray) -> list[Detection]:
        return self.run(self.prepare(image_bgr))

    def prepare(self, image_bgr: np.ndarray) -> PreparedFrame:
        """The model's input for a frame. Touches no state of the detector, so one thread can
        prepare the next frame while another runs the model on this one."""
        image = _as_bgr(image_bgr)
        height, width = image.shape[:2]
        side = max(height, width)
        scale = self._size / side
        new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
        pad_x, pad_y = (self._size - new_w) // 2, (self._size - new_h) // 2
        # Area averaging: bilinear is 5x cheaper and finds the same dlib-marked faces, but its
        # aliased crops made held expressions late or missed on the real videos (agent.tools.flicker).
        resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA)
        rgb = cv2.cvtColor(resized, cv2.COLOR_BGR2RGB)
        table = self._pixel_table
        tensor = np.full((1, self._size, self._size, 3), table[0], table.dtype)  # black padding
        tensor[0, pad_y:pad_y + new_h, pad_x:pad_x + new_w] = np.take(table, rgb)
        return PreparedFrame(tensor, width, height, scale, pad_x, pad_y)

    def run(self, prepared: PreparedFrame) -> list[Detection]:
        """Faces in a prepared frame (one thread at a time: the interpreter is not shareable)."""
        tensor, width, height, scale, pad_x, pad_y = prepared
        self._interpreter.set_tensor(self._input_index, tensor)
        self._interpreter.invoke()
        raw_scores = self._interpreter.get_tensor(self._scores_index)[0, :, 0]
        keep = np.flatnonzero(raw_scores > self._logit_threshold)
        if keep.size == 0:
            return []
        # box centre and size, then the subject's right and left eye, all relative to the anchor
        raw = dequantize(self._interpreter.get_tensor(self._boxes_index)[0, keep, :8], self._boxes_quant) / self._size
        logits = dequantize(raw_scores[keep], self._scores_quant)
        anchors = self._anchors[keep]
        centres = raw[:, :2] + anchors
        half = raw[:, 2:4] / 2
        boxes = np.concatenate([centres - half, centres + half, raw[:, 4:6] + anchors, raw[:, 6:8] + anchors], axis=1)
        valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        scores = 1.0 / (1.0 + np.exp(-np.clip(logits, -RAW_SCORE_LIMIT, RAW_SCORE_LIMIT)))
        boxes, scores = weighted_nms(boxes[valid], scores[valid], self._nms_iou)
        # the letterbox scales both axes alike, so the eye line's angle needs no undoing
        rolls = np.degrees(np.arctan2(boxes[:, 7] - boxes[:, 5], boxes[:, 6] - boxes[:, 4]))
        boxes = boxes[:, :4]
        # undo the letterbox: input-normalised -> frame pixels
        boxes *= self._size
        boxes[:, [0, 2]] = (boxes[:, [0, 2]] - pad_x) / scale
        boxes[:, [1, 3]] = (boxes[:, [1, 3]] - pad_y) / scale
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height)
        found = []
        for (x1, y1, x2, y2), score, roll in zip(boxes, scores, rolls):
            w, h = x2 - x1, y2 - y1
            if w >= max(1, self._min_face) and h >= 1:
                found.append(Detection(Box(float(x1), float(y1), float(w), float(h)), float(score), float(roll)))
        return found


class HaarDetector:
    """OpenCV's frontal-face Haar cascade, as the classic recipe uses it."""

    def __init__(self, scale_factor: float = 1.3, min_neighbors: int = 5, min_size: int = 30):
        if not hasattr(cv2, "CascadeClassifier"):
            raise ModelError("this OpenCV has no CascadeClassifier (OpenCV 5 moved it): "
                             "pip install 'opencv-python<5', or use detector.kind: blazeface")
        path = Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"
        self._cascade = cv2.CascadeClassifier(str(path))
        if self._cascade.empty():
            raise ModelError(f"cannot load the Haar cascade {path}")
        self._scale, self._neighbors, self._min = scale_factor, min_neighbors, max(1, min_size)

    def detect(self, image_bgr: np.ndarray) -> list[Detection]:
        return self.run(self.prepare(image_bgr))

    def prepare(self, image_bgr: np.ndarray) -> np.ndarray:
        return image_bgr  # the cascade's own work is all in run

    def run(self, image_bgr: np.ndarray) -> list[Detection]:
        if image_bgr.ndim == 2:
            gray = image_bgr
        elif image_bgr.shape[2] == 1:
            gray = image_bgr[:, :, 0]
        else:
            gray = cv2.cvtColor(_as_bgr(image_bgr), cv2.COLOR_BGR2GRAY)
        if min(gray.shape[:2]) < self._min:
            return []
        faces = self._cascade.detectMultiScale(gray, self._scale, self._neighbors, minSize=(self._min, self._min))
        return [Detection(Box(float(x), float(y), float(w), float(h)), 1.0) for (x, y, w, h) in faces]


def make_detector(settings: DetectorConfig) -> FaceDetector:
    """The detector the config's `detector` section asks for. Its min_face_size (pixels of the
    frame) drops BlazeFace boxes narrower than it and is the Haar cascade's smallest window."""
    if settings.kind == "blazeface":
        model = model_files.model_path(settings.model, model_files.DEFAULT_DETECTOR_MODEL)
        return BlazeFaceDetector(model, settings.score_threshold, settings.nms_iou, settings.threads,
                                 settings.min_face_size)
    if settings.kind == "haar":
        return HaarDetector(settings.haar_scale_factor, settings.haar_min_neighbors, settings.min_face_size)
    raise ModelError(f"unknown detector kind {settings.kind!r} (expected blazeface or haar)")
