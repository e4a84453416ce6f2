"""What a benchmark ran on: CPU model, cores, the vector extensions that decide LiteRT's speed, and
the versions of the libraries doing the work.

The same VM can land on different hosts from one day to the next. On one host the int8 emotion
model beat float32; on an AVX2-only one it is the slower of the two, and BlazeFace took two to
four times as long (docs/benchmarks.md). Figures from different days only compare with these
lines beside them.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path

# The extensions XNNPACK (LiteRT's CPU backend) picks its kernels by, as /proc/cpuinfo names them.
SIMD_FLAGS = (
    "avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8",  # x86-64
    "asimd", "asimddp", "asimdhp", "i8mm", "sve",                                    # arm64 (Pi 4: asimd; Pi 5: +asimddp)
)
# Whichever of these are installed: the runtimes the interpreter loader may pick, both OpenCV wheels.
PACKAGES = ("ai-edge-litert", "tflite-runtime", "opencv-python", "opencv-python-headless", "numpy", "tensorflow")


def parse_cpuinfo(text: str) -> tuple[str, list[str]]:
    """(CPU model, the SIMD_FLAGS it has) from the text of /proc/cpuinfo, x86 or ARM."""
    names: dict[str, str] = {}
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip().lower(), value.strip()
        if key in ("flags", "features"):
            flags.update(value.split())
        elif value and not value.isdigit():  # x86 also has "model : 49", a number
            names.setdefault(key, value)
    # x86: "model name"; a Pi: "Model : Raspberry Pi 4 Model B Rev 1.4"; older ARM kernels: "Hardware"
    model = next((names[k] for k in ("model name", "model", "hardware") if k in names), "")
    return model, [f for f in SIMD_FLAGS if f in flags]


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def describe(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict:
    """This machine, for a benchmark's report. Reads files and package metadata only: importing
    TensorFlow to ask its version would add hundreds of MiB to the measured process."""
    try:
        model, simd = parse_cpuinfo(cpuinfo.read_text(errors="replace"))
    except OSError:
        model, simd = "", []
    return {
        "cpu": model or platform.processor() or "unknown",
        "arch": platform.machine(),
        "cores": os.cpu_count(),
        "simd": simd,
        "python": platform.python_version(),
        "packages": {name: v for name in PACKAGES if (v := _version(name))},
    }


def format_machine(m: dict) -> str:
    simd = " ".join(m["simd"]) or "none of " + "/".join(SIMD_FLAGS[:4])
    packages = ", ".join(f"{k} {v}" for k, v in m["packages"].items())
    return f"machine: {m['cpu']}, {m['cores']} cores, {m['arch']} ({simd}); Python {m['python']}; {packages}"
