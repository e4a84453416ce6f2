"""Command-line value types: each turns a bad value into argparse's one-line usage error."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import NoReturn

from agent.errors import AgentError


class Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line, as every other error of this program is: a
    service's log and a script's stderr get the reason alone, and --help still shows the usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number 1..65535, got {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 1..65535, got {value}")
    return value


def _whole_number(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least {least}, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least {least}, got {value}")
    return value


def positive_int(text: str) -> int:
    return _whole_number(text, 1)


def non_negative_int(text: str) -> int:
    return _whole_number(text, 0)


def positive_float(text: str) -> float:
    """A finite number above 0: nan, inf, 0 and below are typos that would only fail after the work."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number above 0, got {text}")
    return value


MAX_SECONDS = 86400  # a day: beyond it, a typo, not a wish


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 <= value <= MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"expected a number of seconds from 0 to {MAX_SECONDS}, got {text}")
    return value


def positive_seconds(text: str) -> float:
    """`seconds`, but not 0: a wait of no time can only fail."""
    value = seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0, got {text}")
    return value


PLOT_SUFFIXES = (".png", ".pdf", ".svg")


def plot_file(text: str) -> Path:
    path = Path(text)
    if not text.strip() or path.suffix.lower() not in PLOT_SUFFIXES:
        raise argparse.ArgumentTypeError(f"expected a file name ending in {', '.join(PLOT_SUFFIXES)}, got {text!r}")
    return path


def name_part(text: str) -> str:
    if not text.strip() or "/" in text or text in (".", ".."):
        raise argparse.ArgumentTypeError(f"expected a name without '/', got {text!r}")
    return text


def make_output_folder(folder: Path, option: str) -> None:
    """Create `folder` now, before minutes of measuring, or say in one line why not."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise AgentError(f"{option}: not a folder: {folder}") from None
    except OSError as exc:
        raise AgentError(f"{option}: cannot create folder {folder}: {exc.strerror}") from None
    if not os.access(folder, os.W_OK):
        raise AgentError(f"{option}: folder not writable: {folder}")


def check_output_file(path: Path, option: str) -> None:
    """Make sure `path` can be written now, before minutes of measuring, or say in one line why
    not: its folder is created, and the file opened for appending (and removed again if it was new),
    which catches a folder in the way, a name too long and a place no file can be made."""
    make_output_folder(path.parent, option)
    try:
        if path.is_dir():
            raise AgentError(f"{option}: {path} is a folder, not a file")
        if path.exists() and not path.is_file():
            raise AgentError(f"{option}: {path} is not a regular file")  # a FIFO would block
        existed = os.path.lexists(path)
        with path.open("ab"):
            pass
        if not existed:
            path.unlink()
    except OSError as exc:
        raise AgentError(f"{option}: cannot write {path}: {exc.strerror or exc}") from None
