"""Where model files are: the bundled ones (the repository's models/, installed as the package
`agent.models`) and the files a setting names."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

# Our net and fer's mini-Xception in one int8 file; why this one: models/MODELS.md.
DEFAULT_EMOTION_MODEL = "emotion_ensemble_int8.tflite"
DEFAULT_DETECTOR_MODEL = "face_detection_full_range.tflite"


def default_model_path(name: str = DEFAULT_EMOTION_MODEL) -> Path:
    """A model file shipped in the package `agent.models` (the repository's models/ folder)."""
    try:
        resource = importlib.resources.files("agent.models") / name
        if isinstance(resource, Path) and resource.is_file():
            return resource
    except ModuleNotFoundError:
        pass
    # A source tree that was never installed: models/ is not importable as agent.models.
    return Path(__file__).resolve().parents[1] / "models" / name


def resolve_model_path(value: str, folder: Path | None = None) -> Path:
    """A model setting as a path: the file it names (in `folder`, the config file's, if given;
    else the working folder), or, for a bare file name that is no file there, the bundled model
    of that name (so `face_detection_full_range_int8.tflite` works wherever the package is
    installed)."""
    path = folder / value if folder is not None else Path(value)
    if not path.exists() and Path(value).name == value:
        bundled = default_model_path(value)
        if bundled.is_file():
            return bundled
    return path


def model_path(setting: str | None, default: str) -> Path:
    """The file a model setting names (see resolve_model_path), or the bundled `default` for null."""
    return resolve_model_path(setting) if setting else default_model_path(default)
