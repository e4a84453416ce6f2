"""Accuracy of an expression model on a FER2013-layout folder (one sub-folder per class, named
as FER2013, CK+, KDEF or JAFFE name it).

FER2013 images are already face crops, so each is classified whole (resized to the model's input),
without a detector. `load_folder` reads, `score` is pure, `evaluate_folder` is the two plus timing.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from agent.capture import is_truncated_jpeg, read_image
from agent.classify import CroppedFaceClassifier
from agent.errors import AgentError, SourceError
from agent.types import EMOTION_LABELS

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".pgm")


@dataclass(frozen=True, slots=True)
class LabelledFaces:
    faces: list[np.ndarray]  # uint8 gray, any size
    labels: np.ndarray  # int class index in Emotion order, one per face
    unreadable: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class EmotionEvalResult:
    confusion: tuple[tuple[int, ...], ...]  # rows: true class, columns: predicted class
    seconds_per_face: float
    model: str = ""
    source: str = ""
    unreadable: int = 0
    ece: float = 0.0  # expected calibration error of the top scores

    @property
    def count(self) -> int:
        return sum(map(sum, self.confusion))

    @property
    def correct(self) -> int:
        return sum(self.confusion[i][i] for i in range(len(self.confusion)))

    @property
    def accuracy(self) -> float:
        return self.correct / self.count if self.count else 0.0

    @property
    def support(self) -> dict[str, int]:
        return {label: sum(row) for label, row in zip(EMOTION_LABELS, self.confusion)}

    @property
    def recall(self) -> dict[str, float | None]:
        """Per class: the share of its faces predicted as it (None where the folder has none)."""
        return {label: (row[i] / sum(row) if sum(row) else None)
                for i, (label, row) in enumerate(zip(EMOTION_LABELS, self.confusion))}

    @property
    def mean_recall(self) -> float:
        present = [r for r in self.recall.values() if r is not None]
        return sum(present) / len(present) if present else 0.0

    def as_dict(self) -> dict:
        return {
            "model": self.model,
            "source": self.source,
            "count": self.count,
            "unreadable": self.unreadable,
            "accuracy": round(self.accuracy, 4),
            "mean_recall": round(self.mean_recall, 4),
            "ms_per_face": round(self.seconds_per_face * 1000, 3),
            "ece": round(self.ece, 4),
            "recall": {k: (round(v, 4) if v is not None else None) for k, v in self.recall.items()},
            "support": self.support,
            "classes": list(EMOTION_LABELS),
            "confusion": [list(row) for row in self.confusion],
        }


# The folder names other datasets give the seven classes, matched in any case: CK+'s nouns,
# KDEF's and JAFFE's two-letter codes, adjectives, FER+'s and AffectNet's "happiness".
_OTHER_NAMES = {
    "angry": ("anger", "an"),
    "disgust": ("disgusted", "di"),
    "fear": ("fearful", "afraid", "af", "fe"),
    "happy": ("happiness", "ha"),
    "sad": ("sadness", "sa"),
    "surprise": ("surprised", "su"),
    "neutral": ("ne",),
}
CLASS_OF_FOLDER = {name: EMOTION_LABELS.index(label)
                   for label, names in _OTHER_NAMES.items() for name in (label, *names)}
OUTSIDE_THE_SEVEN = ("contempt",)  # CK+'s eighth class: its images are skipped, not refused


def load_folder(root: Path, limit: int | None = None) -> LabelledFaces:
    """Gray faces and labels from `root/<class name>/*` (a name in CLASS_OF_FOLDER, in any case); at
    most `limit` images per class, taken in name order so a limited run is the same run every time."""
    root = Path(root)
    faces: list[np.ndarray] = []
    labels: list[int] = []
    unreadable: list[str] = []
    for folder in _class_folders(root):
        label = CLASS_OF_FOLDER[folder.name.lower()]
        files = _images(folder)
        if limit is not None:  # two folders of one class (happy/ and HA/) share its limit
            files = files[:max(0, limit - labels.count(label))]
        for path in files:
            image = _read_face(path)
            if image is None:
                unreadable.append(str(path))
                continue
            faces.append(image)
            labels.append(label)
    if not faces:
        raise SourceError(f"{root}: no readable images in the class folders")
    return LabelledFaces(faces, np.asarray(labels, dtype=np.int64), tuple(unreadable))


def _class_folders(root: Path) -> list[Path]:
    """The class folders in `root`, in name order; SourceError for a folder of no known class, or
    none at all. A folder of a class outside the seven (CK+'s contempt) is skipped, and said so."""
    folders = sorted(p for p in _listing(root) if p.is_dir()) if root.is_dir() else []
    unknown = [p.name for p in folders if p.name.lower() not in (*CLASS_OF_FOLDER, *OUTSIDE_THE_SEVEN)]
    if unknown:
        raise SourceError(f"{root}: unknown class folder(s) {', '.join(unknown)}; expected {', '.join(EMOTION_LABELS)} "
                          "or the CK+, KDEF or JAFFE names (anger, sadness, AN, DI, AF, ...)")
    outside = [p for p in folders if p.name.lower() in OUTSIDE_THE_SEVEN]
    folders = [p for p in folders if p not in outside]
    if not folders:
        raise SourceError(f"{root}: no class folders; expected sub-folders named {', '.join(EMOTION_LABELS)}")
    if outside:
        skipped = sum(len(_images(p)) for p in outside)
        logger.info("%s: %d image(s) in %s skipped: not one of the seven classes", root, skipped,
                    ", ".join(p.name for p in outside))
    return folders


def _read_face(path: Path) -> np.ndarray | None:
    """The gray face in `path`; None, with a warning, for a file that cannot be used."""
    try:
        image, why = read_image(path, cv2.IMREAD_GRAYSCALE), f"cannot read {path}"
    except SourceError as exc:  # over OpenCV's pixel limit: that file is skipped, not the run
        image, why = None, str(exc)
    if image is not None and is_truncated_jpeg(path):  # half a face would count as one
        image, why = None, f"{path} is damaged (a JPEG cut short)"
    if image is None:
        logger.warning("%s; skipped", why)
    return image


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in _listing(folder) if p.suffix.lower() in IMAGE_SUFFIXES)


def _listing(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError as exc:
        raise SourceError(f"cannot list folder {folder}: {exc.strerror or exc}") from None


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray) -> tuple[tuple[int, ...], ...]:
    n = len(EMOTION_LABELS)
    matrix = np.zeros((n, n), dtype=np.int64)
    np.add.at(matrix, (np.asarray(labels), np.asarray(predicted)), 1)
    return tuple(tuple(int(v) for v in row) for row in matrix)


ECE_BINS = 15


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """How far the top score is from the share it gets right: the faces put in `bins` equal-width
    bins of their top score, (lower, upper], and the bins' |accuracy - mean top score| averaged,
    each weighted by its share of the faces (Guo et al. 2017). 0 for a calibrated model."""
    probs = np.asarray(probs, dtype=np.float64)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(labels)
    which = np.digitize(confidence, np.linspace(0.0, 1.0, bins + 1)[1:-1], right=True)
    gaps = np.bincount(which, weights=correct - confidence, minlength=bins)  # per bin: n * (accuracy - mean)
    return float(np.abs(gaps).sum() / len(confidence))


def evaluate_folder(root: Path, classifier: CroppedFaceClassifier, limit: int | None = None) -> EmotionEvalResult:
    """Classify every face of a FER2013-layout folder; `limit` caps the images per class."""
    data = load_folder(root, limit)
    started = time.perf_counter()
    probs = classifier.classify_faces(data.faces)
    elapsed = time.perf_counter() - started
    model = getattr(classifier, "model_path", None)
    return EmotionEvalResult(confusion=confusion_matrix(data.labels, np.argmax(probs, axis=1)),
                             seconds_per_face=elapsed / len(data.faces),
                             model=Path(model).name if model else type(classifier).__name__,
                             source=str(root), unreadable=len(data.unreadable),
                             ece=expected_calibration_error(probs, data.labels))


def format_report(result: EmotionEvalResult) -> str:
    labels = EMOTION_LABELS
    width = max(map(len, labels)) + 1
    lines = [
        f"model      {result.model}",
        f"images     {result.count} from {result.source}" + (f" ({result.unreadable} unreadable, skipped)"
                                                            if result.unreadable else ""),
        f"accuracy   {100 * result.accuracy:.2f} %  ({result.correct}/{result.count})",
        f"mean recall {100 * result.mean_recall:.2f} %",
        f"speed      {1000 * result.seconds_per_face:.3f} ms per face (classification only)",
        f"ECE        {result.ece:.4f} (expected calibration error, {ECE_BINS} bins of the top score)",
        "",
        f"{'true':<{width}} {'n':>5} {'recall':>7}   predicted: " + " ".join(f"{lb:>8}" for lb in labels),
    ]
    for label, row in zip(labels, result.confusion):
        recall = result.recall[label]
        shown = f"{100 * recall:6.1f}%" if recall is not None else "      -"
        lines.append(f"{label:<{width}} {sum(row):>5} {shown}" + " " * 14 + " ".join(f"{v:>8}" for v in row))
    return "\n".join(lines)


_NO_MATPLOTLIB = "--plot needs matplotlib: pip install '.[plot]'"


def check_pyplot_installed() -> None:
    """A one-line error now if matplotlib is missing, without importing it (bench measures this
    process's peak memory, and pyplot alone adds tens of MiB)."""
    if importlib.util.find_spec("matplotlib") is None:
        raise AgentError(_NO_MATPLOTLIB)


def require_pyplot():
    """matplotlib's pyplot drawing to files, or a one-line error saying how to get it."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed on a headless device
        import matplotlib.pyplot as plt
    except ImportError:
        raise AgentError(_NO_MATPLOTLIB) from None
    return plt


def plot_confusion(result: EmotionEvalResult, path: Path) -> Path:
    """The row-normalised confusion matrix as an image (needs matplotlib, imported only here)."""
    plt = require_pyplot()

    counts = np.asarray(result.confusion, dtype=np.float64)
    rows = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(EMOTION_LABELS)), EMOTION_LABELS, rotation=45, ha="right")
    ax.set_yticks(range(len(EMOTION_LABELS)), EMOTION_LABELS)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{result.model}\naccuracy {100 * result.accuracy:.1f} % on {result.count} faces", fontsize=10)
    for i in range(len(EMOTION_LABELS)):
        for j in range(len(EMOTION_LABELS)):
            ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if shares[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, label="share of the true class")
    fig.tight_layout()
    return save_figure(plt, fig, Path(path), dpi=120)


def save_figure(plt, fig, path: Path, dpi: int) -> Path:
    """`fig` written to `path` and closed; an OSError (a full disk) as one line."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)
    except OSError as exc:  # the report is printed by then: only the plot is lost
        raise AgentError(f"cannot write plot {path}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
    return path
