"""emotion-agent: facial-expression events from a camera, published to MQTT."""

import os

from agent.image_size import MAX_IMAGE_PIXELS

__version__ = "0.1.0"

# OpenCV reads its limit once, as it loads, so this comes before any module imports it: no picture
# over MAX_IMAGE_PIXELS is decoded, whatever its format (a TIFF's header can claim gigabytes too).
# capture.read_image refuses PNG, JPEG, GIF, BMP and WebP ones from their headers, in clearer words.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(MAX_IMAGE_PIXELS))
