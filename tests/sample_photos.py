"""Real face photos that the test-only dependencies ship: scikit-image's astronaut (Eileen Collins,
smiling) and matplotlib's Grace Hopper. Also a command for the README's samples and screenshot:

    python tests/sample_photos.py two.jpg      # both photos side by side, 512 px high
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np


def astronaut_bgr() -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[:, :, ::-1])


def grace_hopper_path() -> Path:
    from matplotlib import cbook

    return Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


def grace_hopper_bgr() -> np.ndarray:
    return cv2.imread(str(grace_hopper_path()))


def two_faces_bgr() -> np.ndarray:
    astronaut, hopper = astronaut_bgr(), grace_hopper_bgr()
    height = astronaut.shape[0]
    hopper = cv2.resize(hopper, (height * hopper.shape[1] // hopper.shape[0], height), interpolation=cv2.INTER_AREA)
    return np.hstack([astronaut, hopper])


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/sample_photos.py OUT.jpg")
    if not cv2.imwrite(sys.argv[1], two_faces_bgr()):
        sys.exit(f"cannot write {sys.argv[1]}")
    print(f"wrote {sys.argv[1]}")
