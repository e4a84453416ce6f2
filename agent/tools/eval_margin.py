"""How much context around a detected face the expression model wants: the crop margin, chosen by
measurement on the detect -> crop -> classify path.

FER2013 faces are framed looser than BlazeFace's tight boxes. Each FER2013 face is upscaled and
placed in a larger frame (edges repeated, as `crop_face` does past a frame's border), BlazeFace
finds it, and the crop around that box is classified at each candidate margin. The margin with
the best accuracy on the faces the detector found is the one to ship.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from agent.classify import TFLiteEmotionClassifier
from agent.detect import FaceDetector
from agent.tools.eval_emotion import load_folder
from agent.tools.progress import Progress

UPSCALE = 4      # 48 px FER faces -> 192 px, a face size BlazeFace sees in real frames
PAD_FRACTION = 0.5


@dataclass(frozen=True, slots=True)
class MarginResult:
    margins: tuple[float, ...]
    accuracy: tuple[float, ...]     # on the faces the detector found, same faces for every margin
    faces: int
    detected: int
    whole_image_accuracy: float     # the same faces classified as FER2013 frames them: the reference

    @property
    def best(self) -> float:
        return self.margins[int(np.argmax(self.accuracy))]

    def as_dict(self) -> dict:
        return {"faces": self.faces, "detected": self.detected, "best_margin": self.best,
                "accuracy": {f"{m:g}": round(a, 4) for m, a in zip(self.margins, self.accuracy)},
                "whole_image_accuracy": round(self.whole_image_accuracy, 4)}


def frame_for(face: np.ndarray) -> np.ndarray:
    big = cv2.resize(face, (face.shape[1] * UPSCALE, face.shape[0] * UPSCALE), interpolation=cv2.INTER_LINEAR)
    pad = round(big.shape[0] * PAD_FRACTION)
    return cv2.cvtColor(cv2.copyMakeBorder(big, pad, pad, pad, pad, cv2.BORDER_REPLICATE), cv2.COLOR_GRAY2BGR)


def evaluate_margins(root: Path, detector: FaceDetector, model_path: Path | str, margins: Sequence[float],
                     limit: int | None = None) -> MarginResult:
    data = load_folder(root, limit)
    frames, boxes, labels, whole = [], [], [], []
    progress = Progress("detect", len(data.faces))
    for face, label in zip(data.faces, data.labels):
        frame = frame_for(face)
        found = detector.detect(frame)
        if found:
            frames.append(frame)
            boxes.append(max(found, key=lambda d: d.score).box)
            labels.append(label)
            whole.append(face)
        progress.update()
    progress.close()
    truth = np.asarray(labels)
    classifier = TFLiteEmotionClassifier(model_path)
    whole_accuracy = float(np.mean(np.argmax(classifier.classify_faces(whole), axis=1) == truth)) if labels else 0.0
    accuracy = []
    progress = Progress("classify", len(margins) * len(frames))
    for margin in margins:
        classifier.crop_margin = margin
        predicted = []
        for frame, box in zip(frames, boxes):
            predicted.append(classifier.classify(frame, [box])[0].top)
            progress.update()
        accuracy.append(float(np.mean(np.asarray(predicted) == truth)) if labels else 0.0)
    progress.close()
    return MarginResult(tuple(margins), tuple(accuracy), len(data.faces), len(labels), whole_accuracy)


def format_report(result: MarginResult) -> str:
    lines = [f"detector found {result.detected} of {result.faces} faces; accuracy on those by crop margin:"]
    for margin, acc in zip(result.margins, result.accuracy):
        mark = "  <- best" if margin == result.best else ""
        lines.append(f"  margin {margin:+.2f}: {acc:.2%}{mark}")
    lines.append(f"the same faces classified whole, as FER2013 frames them: {result.whole_image_accuracy:.2%}")
    return "\n".join(lines)
