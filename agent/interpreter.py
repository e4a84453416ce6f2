"""Loads a TFLite model with whichever LiteRT/TFLite runtime is installed.

Preference: ai-edge-litert (the maintained LiteRT wheel), then tflite-runtime, then
tensorflow.lite. TensorFlow is only a last resort and is imported lazily, so the daemon runs on a
bare Pi with just the small runtime.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import ModelError, interrupted

logger = logging.getLogger(__name__)


def _not_installed(exc: ImportError) -> None:
    """Returns for a runtime that is not there; re-raises a Ctrl-C that came during its import,
    which an extension module's initialisation reports as an ImportError caused by it."""
    if interrupted(exc):
        raise KeyboardInterrupt from None


def _interpreter_class() -> tuple[type, str]:
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter, "ai-edge-litert"
    except ImportError as exc:
        _not_installed(exc)
    try:
        from tflite_runtime.interpreter import Interpreter  # type: ignore[no-redef]

        return Interpreter, "tflite-runtime"
    except ImportError as exc:
        _not_installed(exc)
    try:
        import tensorflow as tf  # heavy: only when nothing lighter is installed

        return tf.lite.Interpreter, "tensorflow.lite"
    except ImportError:
        raise ModelError(
            "no TFLite runtime found: pip install ai-edge-litert (or tflite-runtime)"
        ) from None


_xnnpack_seen = False


@contextlib.contextmanager
def _runtime_info_muted():
    """The runtime's C++ code writes "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." to
    the process's stderr on every load, and no setting silences it: it would be a second line
    before every one-line error and noise in the journal. What it writes meanwhile is caught in a
    file and passed on, all but its INFO lines."""
    info: list[str] = []
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all
        yield info
        return
    with tempfile.TemporaryFile() as caught:
        if sys.stderr is not None:
            sys.stderr.flush()
        os.dup2(caught.fileno(), 2)
        try:
            yield info
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            lines = caught.read().decode(errors="replace").splitlines(keepends=True)
            info.extend(line[len("INFO: "):].strip() for line in lines if line.startswith("INFO: "))
            kept = [line for line in lines if not line.startswith("INFO: ")]
            if kept and sys.stderr is not None:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def load_interpreter(path: Path | str, threads: int = 1) -> Any:
    """An allocated interpreter for `path`, or ModelError with a one-line reason."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file not found: {path}")
    cls, runtime = _interpreter_class()
    try:
        with _runtime_info_muted() as said:
            interpreter = cls(model_path=str(path), num_threads=threads)
            interpreter.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load model {path}: {first_line}") from None
    # Whether the fast kernels run (a sandbox that hides /proc/cpuinfo turns them off on ARM). The
    # runtime says so once a process, at the first model it gives them.
    global _xnnpack_seen
    _xnnpack_seen = _xnnpack_seen or any("XNNPACK delegate" in line for line in said)
    kernels = "XNNPACK delegate" if _xnnpack_seen else "built-in kernels"
    logger.info("model %s: %s, %s, %d thread%s", path.name, runtime, kernels, threads, "" if threads == 1 else "s")
    return interpreter


def quantize(values: np.ndarray, quantization: tuple[float, int], dtype: np.dtype) -> np.ndarray:
    """Real values to a quantized tensor's codes (rounded, saturated)."""
    scale, zero_point = quantization
    info = np.iinfo(dtype)
    return np.clip(np.round(values / scale + zero_point), info.min, info.max).astype(dtype)


def dequantize(codes: np.ndarray, quantization: tuple[float, int] | None) -> np.ndarray:
    """A quantized tensor's codes to float32 (a float tensor, quantization None, as it is)."""
    if quantization is None:
        return codes.astype(np.float32, copy=False)
    scale, zero_point = quantization
    return (codes.astype(np.float32) - zero_point) * np.float32(scale)
