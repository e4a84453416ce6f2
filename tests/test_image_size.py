"""The picture's size from its header, checked against what OpenCV decodes from the same file."""

import struct

import cv2
import numpy as np
import pytest

from agent.image_size import image_size

FORMATS = [
    (".png", []),
    (".jpg", []),
    (".jpg", [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]),
    (".bmp", []),
    (".webp", [cv2.IMWRITE_WEBP_QUALITY, 80]),    # lossy: VP8
    (".webp", [cv2.IMWRITE_WEBP_QUALITY, 101]),   # lossless: VP8L
    (".gif", []),
]


@pytest.mark.parametrize("suffix, params", FORMATS, ids=[f"{s}{p}" for s, p in FORMATS])
@pytest.mark.parametrize("width, height", [(1, 1), (37, 19), (640, 480), (5000, 3)])
def test_the_header_gives_the_size_opencv_decodes(tmp_path, suffix, params, width, height):
    path = tmp_path / f"picture{suffix}"
    pixels = np.random.default_rng(0).integers(0, 255, (height, width, 3), np.uint8)
    assert cv2.imwrite(str(path), pixels, params)
    decoded = cv2.imread(str(path))
    assert image_size(path) == (decoded.shape[1], decoded.shape[0]) == (width, height)


def test_a_jpeg_size_is_found_past_the_segments_before_its_frame_header(tmp_path):
    # A camera's EXIF (APP1) and other segments come between the start and the frame header.
    path = tmp_path / "photo.jpg"
    assert cv2.imwrite(str(path), np.zeros((30, 50, 3), np.uint8))
    data = path.read_bytes()
    exif = b"Exif\0\0" + bytes(3000)
    path.write_bytes(data[:2] + b"\xff\xe1" + struct.pack(">H", len(exif) + 2) + exif + b"\xff\xff" + data[2:])
    assert cv2.imread(str(path)).shape[:2] == (30, 50)
    assert image_size(path) == (50, 30)


@pytest.mark.parametrize("content", [
    b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8", b"\xff\xd8\xff\xe0\x00", b"\xff\xd8\xff\xda\x00\x08",
    b"\xff\xd8\xff\xe0\x00\x01", b"GIF89a\x01", b"RIFF\0\0\0\0WEBPVP8 ", b"not a picture at all", bytes(64),
], ids=["empty", "png-signature-only", "jpeg-soi-only", "jpeg-cut-in-a-length", "jpeg-scan-first",
        "jpeg-length-below-2", "gif-cut", "webp-cut", "text", "zeros"])
def test_a_header_cut_short_or_unknown_gives_no_size_and_no_error(tmp_path, content):
    path = tmp_path / "picture"
    path.write_bytes(content)
    assert image_size(path) is None


def test_a_tiff_is_left_to_opencv(tmp_path):
    path = tmp_path / "picture.tif"
    assert cv2.imwrite(str(path), np.zeros((4, 4, 3), np.uint8))
    assert image_size(path) is None
