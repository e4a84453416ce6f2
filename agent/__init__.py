"""emotion-agent: facial-expression events from a camera, published to MQTT."""

import os

__version__ = "0.1.0"

# Decoded, a picture takes the agent about 6 bytes a pixel at its peak: 2.3 GiB for a 20000x20000
# PNG of 1.2 MB, 640 MiB for a 10000x10000 JPEG. Past 100 million pixels it is refused, unread.
MAX_IMAGE_PIXELS = 100_000_000

# OpenCV reads its limit once, as it loads, so this comes before any module imports it: it refuses
# a picture over MAX_IMAGE_PIXELS from its header, whatever its format, and capture.read_image
# turns that into one line.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(MAX_IMAGE_PIXELS))
