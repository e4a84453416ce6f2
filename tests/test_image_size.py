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


def test_an_os2_bitmap_gives_its_16_bit_size(tmp_path):
    # Its header (BITMAPCOREHEADER, 12 bytes) holds the size in two 16-bit words, where the
    # Windows one holds two 32-bit ints: read as those, a 100x60 bitmap was refused as 6 million
    # million pixels, though OpenCV decodes it.
    width, height = 100, 60
    pixels = bytes((width * 3 + 3) // 4 * 4 * height)
    path = tmp_path / "os2.bmp"
    path.write_bytes(struct.pack("<2sIHHI", b"BM", 26 + len(pixels), 0, 0, 26)
                     + struct.pack("<IHHHH", 12, width, height, 1, 24) + pixels)
    assert cv2.imread(str(path)).shape[:2] == (height, width)
    assert image_size(path) == (width, height)


@pytest.mark.parametrize("content", [
    b"RIFF\0\0\0\0WEBPVP8L", b"RIFF\0\0\0\0WEBPVP8L\0\0\0\0", b"RIFF\0\0\0\0WEBPVP8X",
    b"BM" + bytes(30), b"BM\0\0\0\0\0\0\0\0\0\0\0\0\x0c\0\0\0\x01",
], ids=["webp-lossless-cut-at-its-chunk", "webp-lossless-cut-before-its-signature", "webp-extended-cut",
        "bmp-header-size-0", "bmp-core-cut"])
def test_a_header_cut_where_its_size_would_be_gives_no_size_and_no_error(tmp_path, content):
    # An IndexError from a lossless WebP cut short ended `run` with an internal error, not one line.
    path = tmp_path / "picture"
    path.write_bytes(content)
    assert image_size(path) is None
