"""The size of a picture from its file's header, before anything decodes it.

A picture's file says little about what it decodes to: a 1.2 MB PNG of 20000x20000 black pixels
took the agent 2.3 GiB, which no Pi has. Reading the header first lets `capture.read_image` refuse
such a file with one line instead of being killed for memory. PNG, JPEG, GIF, BMP and WebP are
read here, the formats a photo or a screenshot comes in; others meet OpenCV's own limit, which
agent/__init__.py sets to the same MAX_IMAGE_PIXELS, in vaguer words.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

# Start-of-frame markers carry the size; C4 (Huffman tables), C8 (reserved) and CC (arithmetic
# coding conditions) share their range but not their meaning.
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_JPEG_NO_LENGTH = {0x01, *range(0xD0, 0xD8)}  # TEM and the restart markers stand alone

# Decoded, a picture takes the agent about 6 bytes a pixel at its peak: 2.3 GiB for a 20000x20000
# PNG of 1.2 MB, 640 MiB for a 10000x10000 JPEG. Past 100 million pixels it is refused, unread.
MAX_IMAGE_PIXELS = 100_000_000


def image_size(path: str | Path) -> tuple[int, int] | None:
    """(width, height) from the header of a PNG, JPEG, GIF, BMP or WebP file; None for any other
    file, or a header cut short or malformed (OpenCV then says what it makes of it)."""
    try:
        with open(path, "rb") as f:
            head = f.read(32)
            if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR":
                return struct.unpack(">II", head[16:24])
            if head.startswith((b"GIF87a", b"GIF89a")) and len(head) >= 10:
                return struct.unpack("<HH", head[6:10])
            if head.startswith(b"BM"):
                return _bmp_size(head)
            if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
                return _webp_size(head)
            if head.startswith(b"\xff\xd8"):
                f.seek(2)
                return _jpeg_size(f)
    except (OSError, struct.error):
        pass
    return None


def _bmp_size(head: bytes) -> tuple[int, int] | None:
    """As OpenCV reads it: the size of the header after the file's own (14 bytes) says its kind. An
    OS/2 bitmap's (12 bytes) holds two 16-bit words; Windows' (40 bytes and up), two 32-bit ints."""
    if len(head) < 18:
        return None
    (header_size,) = struct.unpack("<I", head[14:18])
    if header_size == 12 and len(head) >= 22:
        return struct.unpack("<HH", head[18:22])
    if header_size >= 36 and len(head) >= 26:
        width, height = struct.unpack("<ii", head[18:26])
        return abs(width), abs(height)  # a negative height is a top-down bitmap
    return None


def _webp_size(head: bytes) -> tuple[int, int] | None:
    if len(head) < 30:  # every kind's size ends by then: a file cut short before it has none
        return None
    chunk = head[12:16]
    if chunk == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", head[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and head[20] == 0x2F:
        bits = int.from_bytes(head[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        return int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1
    return None


def _jpeg_size(f: BinaryIO) -> tuple[int, int] | None:
    """Walks the segments after SOI up to the frame header (EXIF and other APPn segments come first)."""
    while True:
        byte = f.read(1)
        if byte != b"\xff":
            return None
        marker = f.read(1)
        while marker == b"\xff":  # fill bytes
            marker = f.read(1)
        if not marker:
            return None
        code = marker[0]
        if code in _JPEG_NO_LENGTH:
            continue
        if code in (0xD9, 0xDA):  # the end, or the scan: no frame header came before it
            return None
        (length,) = struct.unpack(">H", f.read(2))
        if code in _JPEG_SOF:
            _precision, height, width = struct.unpack(">BHH", f.read(5))
            return width, height
        if length < 2:
            return None
        f.seek(length - 2, 1)
