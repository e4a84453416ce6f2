"""Face-detector recall and precision against hand-marked boxes in dlib's imglab XML.

Matching is greedy by score: each detection, best first, takes the unmatched mark it overlaps most
at or above the IoU threshold; a mark is matched once, so a duplicate box is a false positive.

Results are given at IoU 0.5 (the usual convention) and 0.3, because detectors draw the face box
differently from dlib's marks (square, brow to chin). On dlib's examples BlazeFace's boxes are
about the marks' size (matched IoU 0.60–0.90, median 0.77), so both rows agree; the Haar
cascade's are about 1.2 times as wide, and one of its true faces overlaps its mark by only 0.49.
"""

from __future__ import annotations

import math
import os
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from agent.capture import is_truncated_jpeg, read_image
from agent.detect import FaceDetector
from agent.errors import SourceError
from agent.types import Box

IOU_THRESHOLDS = (0.5, 0.3)


@dataclass(frozen=True, slots=True)
class MarkedImage:
    path: Path
    boxes: tuple[Box, ...]


def _box(element: ET.Element, xml_path: Path) -> Box:
    try:
        left, top, width, height = (float(element.get(k)) for k in ("left", "top", "width", "height"))
    except (TypeError, ValueError):
        raise SourceError(f"{xml_path}: a <box> needs numeric top, left, width and height, "
                          f"got {dict(element.attrib)}") from None
    if not all(math.isfinite(v) for v in (left, top, width, height)):
        raise SourceError(f"{xml_path}: a <box> needs finite numbers, got {dict(element.attrib)}")
    if width <= 0 or height <= 0:
        raise SourceError(f"{xml_path}: a <box> needs positive width and height, got {dict(element.attrib)}")
    return Box(left, top, width, height)


def parse_imglab(xml_path: Path) -> list[MarkedImage]:
    """Images and their boxes (`<box top left width height>`, `ignore='1'` skipped)."""
    try:
        if os.path.exists(xml_path) and not os.path.isfile(xml_path):  # a named pipe would wait for a writer
            raise SourceError(f"cannot read imglab XML {xml_path}: not a file")
        root = ET.parse(xml_path).getroot()
    except OSError as exc:
        raise SourceError(f"cannot read imglab XML {xml_path}: {exc.strerror or exc}") from None
    except (ET.ParseError, LookupError) as exc:  # LookupError: an unknown encoding="..."
        raise SourceError(f"cannot read imglab XML {xml_path}: {exc}") from None
    images = []
    for image in root.iter("image"):
        if not image.get("file"):
            raise SourceError(f"{xml_path}: an <image> without a file attribute")
        boxes = tuple(_box(b, xml_path) for b in image.iter("box") if b.get("ignore", "0") != "1")
        images.append(MarkedImage(Path(xml_path).parent / image.get("file"), boxes))
    if not images:
        raise SourceError(f"{xml_path}: no <image> elements (not a dlib imglab file?)")
    return images


def match(found: Sequence[tuple[Box, float]], truth: Sequence[Box], iou: float) -> int:
    """True positives: detections, best score first, each taking the unmatched mark it overlaps most."""
    used: set[int] = set()
    hits = 0
    for box, _ in sorted(found, key=lambda f: -f[1]):
        best, best_iou = None, iou
        for i, mark in enumerate(truth):
            overlap = box.iou(mark)
            if i not in used and overlap >= best_iou:
                best, best_iou = i, overlap
        if best is not None:
            used.add(best)
            hits += 1
    return hits


@dataclass(frozen=True, slots=True)
class FaceEvalResult:
    images: int
    faces: int
    detections: int
    true_positives: dict[float, int]
    ms_per_image: float

    def recall(self, iou: float) -> float:
        return self.true_positives[iou] / self.faces if self.faces else 0.0

    def false_positives(self, iou: float) -> int:
        return self.detections - self.true_positives[iou]

    def precision(self, iou: float) -> float:
        return self.true_positives[iou] / self.detections if self.detections else 0.0

    def as_dict(self) -> dict:
        return {"images": self.images, "faces": self.faces, "detections": self.detections,
                "ms_per_image": round(self.ms_per_image, 2),
                "at_iou": {f"{t:g}": {"true_positives": self.true_positives[t],
                                      "false_positives": self.false_positives(t),
                                      "recall": round(self.recall(t), 4), "precision": round(self.precision(t), 4)}
                           for t in self.true_positives}}


def evaluate_detector(xml_paths: Sequence[Path], detector: FaceDetector) -> FaceEvalResult:
    """Runs `detector` on every image the XMLs name (each once) and counts matches at IOU_THRESHOLDS;
    ms_per_image times detect() alone, not the JPEG decoding."""
    images, seen = [], set()
    for marked in (m for path in xml_paths for m in parse_imglab(Path(path))):
        # dlib ships the same photos in several XMLs (with and without landmarks): count each once
        if marked.path.resolve() not in seen:
            seen.add(marked.path.resolve())
            images.append(marked)
    missing = [m.path for m in images if not m.path.is_file()]
    if missing:  # now, before any image is detected
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise SourceError(f"cannot read image {missing[0]} named in the XML: not a file{more}")
    faces = detections = 0
    hits = {t: 0 for t in IOU_THRESHOLDS}
    seconds = 0.0
    for marked in images:
        frame = read_image(marked.path)
        if frame is None:
            raise SourceError(f"cannot read image {marked.path} named in the XML")
        if is_truncated_jpeg(marked.path):  # its marked faces in the grey part would count as missed
            raise SourceError(f"image {marked.path} named in the XML is damaged (a JPEG cut short)")
        height, width = frame.shape[:2]
        for box in marked.boxes:  # no detection can match it: it would count as a face missed
            if box.x >= width or box.y >= height or box.x2 <= 0 or box.y2 <= 0:
                raise SourceError(f"a <box> (left {box.x:g}, top {box.y:g}, width {box.w:g}, height {box.h:g}) "
                                  f"lies wholly outside its image {marked.path} ({width}x{height})")
        start = time.perf_counter()
        found = [(d.box, d.score) for d in detector.detect(frame)]
        seconds += time.perf_counter() - start
        faces += len(marked.boxes)
        detections += len(found)
        for t in IOU_THRESHOLDS:
            hits[t] += match(found, marked.boxes, t)
    return FaceEvalResult(len(images), faces, detections, hits, 1000 * seconds / max(len(images), 1))


def format_report(r: FaceEvalResult) -> str:
    lines = [f"{r.images} images, {r.faces} marked faces, {r.detections} detections, {r.ms_per_image:.2f} ms/image"]
    for t in r.true_positives:
        lines.append(f"  IoU >= {t:g}: found {r.true_positives[t]}/{r.faces} (recall {r.recall(t):.1%}), "
                     f"false positives {r.false_positives(t)} (precision {r.precision(t):.1%})")
    return "\n".join(lines)
