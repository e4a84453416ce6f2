import cv2
import numpy as np
import pytest

from agent.config import DetectorConfig
from agent.model_files import default_model_path
from agent.detect import BlazeFaceDetector, HaarDetector, make_detector, ssd_anchor_centres, weighted_nms
from agent.errors import ModelError
from agent.interpreter import dequantize, quantize
from agent.types import Box
from tests.conftest import astronaut_bgr, grace_hopper_path
from tests.sample_photos import two_faces_bgr

MODEL = default_model_path("face_detection_full_range.tflite")
INT8_MODEL = default_model_path("face_detection_full_range_int8.tflite")
# Boxes read off the photos by eye: the face from hairline to chin.
ASTRONAUT_FACE = Box(175, 45, 120, 150)
HOPPER_FACE = Box(170, 80, 190, 250)


@pytest.fixture(scope="module", params=[MODEL, INT8_MODEL], ids=["float", "int8"])
def blazeface(request):
    return BlazeFaceDetector(request.param, min_face_size=0)


@pytest.mark.parametrize("detector_kind, model", [("blazeface", MODEL), ("blazeface", INT8_MODEL), ("haar", MODEL)],
                         ids=["blazeface", "blazeface-int8", "haar"])
@pytest.mark.parametrize("photo, face", [("astronaut", ASTRONAUT_FACE), ("hopper", HOPPER_FACE)])
def test_each_detector_finds_the_one_face_in_a_portrait(detector_kind, model, photo, face):
    image = astronaut_bgr() if photo == "astronaut" else cv2.imread(str(grace_hopper_path()))
    detector = make_detector(DetectorConfig(kind=detector_kind, model=str(model) if detector_kind == "blazeface" else None,
                                            min_face_size=24))
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


def test_int8_detector_finds_the_float_detectors_faces_with_about_its_boxes_and_scores():
    image = two_faces_bgr()
    by_float = BlazeFaceDetector(MODEL).detect(image)
    by_int8 = BlazeFaceDetector(INT8_MODEL).detect(image)
    assert len(by_float) == len(by_int8) == 2
    for f in by_float:
        match = max(by_int8, key=lambda d: d.box.iou(f.box))
        assert match.box.iou(f.box) >= 0.85 and abs(match.score - f.score) <= 0.1, (f, match)


def test_quantize_saturates_and_dequantize_inverts_it():
    codes = quantize(np.array([-1.0, 0.0, 0.5, 9.0]), (0.01, 5), np.dtype(np.int8))
    assert codes.tolist() == [-95, 5, 55, 127]
    assert dequantize(codes, (0.01, 5)).tolist() == pytest.approx([-1.0, 0.0, 0.5, 1.22])
    floats = np.array([0.25], np.float32)
    assert dequantize(floats, None) is floats  # a float output is read as it is


def test_quantized_input_is_the_float_input_in_codes():
    detector = BlazeFaceDetector(INT8_MODEL)
    frame = np.zeros((90, 160, 3), np.uint8)
    frame[:, :80] = 255  # left half white, right half black
    prepared = detector.prepare(frame)
    details = detector._interpreter.get_input_details()[0]
    assert prepared.tensor.dtype == details["dtype"] == np.int8
    black, white = quantize(np.array([-1.0, 1.0]), details["quantization"], np.dtype(np.int8))
    assert prepared.tensor[0, 0, 0, 0] == black  # the letterbox padding: black
    assert prepared.tensor[0, prepared.pad_y + 5, 5, 0] == white
    assert prepared.tensor[0, prepared.pad_y + 5, 187, 0] == black


@pytest.mark.parametrize("make, message", [
    (lambda tmp: tmp / "missing.tflite", "model file not found"),
    (lambda tmp: default_model_path(), "not a BlazeFace model"),
    (lambda tmp: (tmp / "junk.tflite", (tmp / "junk.tflite").write_bytes(b"junk"))[0], "cannot load model"),
])
def test_unusable_detector_model_is_one_line(tmp_path, make, message):
    with pytest.raises(ModelError, match=message):
        BlazeFaceDetector(make(tmp_path))
