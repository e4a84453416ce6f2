import cv2
import numpy as np
import pytest

from agent.classify import default_model_path
from agent.detect import BlazeFaceDetector, HaarDetector, make_detector, ssd_anchor_centres, weighted_nms
from agent.errors import ModelError
from agent.types import Box
from tests.conftest import astronaut_bgr, grace_hopper_path

MODEL = default_model_path("face_detection_full_range.tflite")
# Boxes read off the photos by eye: the face from hairline to chin.
ASTRONAUT_FACE = Box(175, 45, 120, 150)
HOPPER_FACE = Box(170, 80, 190, 250)


@pytest.fixture(scope="module")
def blazeface():
    return BlazeFaceDetector(MODEL, min_face_size=0)


@pytest.mark.parametrize("detector_kind", ["blazeface", "haar"])
@pytest.mark.parametrize("photo, face", [("astronaut", ASTRONAUT_FACE), ("hopper", HOPPER_FACE)])
def test_each_detector_finds_the_one_face_in_a_portrait(detector_kind, photo, face):
    image = astronaut_bgr() if photo == "astronaut" else cv2.imread(str(grace_hopper_path()))
    detector = make_detector(detector_kind, model_path=MODEL, min_face_size=24)
    found = detector.detect(image)
    assert len(found) == 1
    assert found[0].box.iou(face) >= 0.5, found[0].box


def test_blank_frame_has_no_face(blazeface):
    assert blazeface.detect(np.full((480, 640, 3), 127, np.uint8)) == []


def test_letterbox_maps_boxes_back_to_a_wide_frame(blazeface):
    image = astronaut_bgr()
    wide = np.zeros((512, 1200, 3), np.uint8)
    wide[:, 600:1112] = image
    plain = blazeface.detect(image)[0].box
    shifted = blazeface.detect(wide)[0].box
    assert abs(shifted.x - 600 - plain.x) < 8 and abs(shifted.y - plain.y) < 8
    assert abs(shifted.w - plain.w) < 10


def test_gray_and_tiny_frames_do_not_crash(blazeface):
    gray = cv2.cvtColor(astronaut_bgr(), cv2.COLOR_BGR2GRAY)
    assert len(blazeface.detect(gray)) == 1
    assert len(blazeface.detect(gray[:, :, None])) == 1
    assert len(HaarDetector().detect(gray[:, :, None])) == 1
    assert blazeface.detect(np.zeros((1, 1, 3), np.uint8)) == []
    assert HaarDetector().detect(np.zeros((1, 1), np.uint8)) == []


def test_boxes_are_clipped_to_the_frame(blazeface):
    image = astronaut_bgr()[:120, 150:320]  # the face cut off at the bottom
    for d in blazeface.detect(image):
        assert d.box.x >= 0 and d.box.y >= 0 and d.box.x2 <= 170 and d.box.y2 <= 120


def test_full_range_anchor_grid():
    anchors = ssd_anchor_centres(192, 4)
    assert anchors.shape == (2304, 2)
    assert anchors[0] == pytest.approx([0.5 / 48, 0.5 / 48])
    assert anchors[-1] == pytest.approx([47.5 / 48, 47.5 / 48])


def test_weighted_nms_merges_a_cluster_into_its_weighted_mean():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], np.float32)
    scores = np.array([0.9, 0.3, 0.8], np.float32)
    merged, kept = weighted_nms(boxes, scores, 0.3)
    assert len(merged) == 2 and kept.tolist() == pytest.approx([0.9, 0.8])
    assert merged[0] == pytest.approx([0.25, 0.25, 10.25, 10.25])


@pytest.mark.parametrize("make, message", [
    (lambda tmp: tmp / "missing.tflite", "model file not found"),
    (lambda tmp: default_model_path(), "not a BlazeFace model"),
    (lambda tmp: (tmp / "junk.tflite", (tmp / "junk.tflite").write_bytes(b"junk"))[0], "cannot load model"),
])
def test_unusable_detector_model_is_one_line(tmp_path, make, message):
    with pytest.raises(ModelError, match=message):
        BlazeFaceDetector(make(tmp_path))
