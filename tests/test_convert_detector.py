import importlib.util
from collections import Counter

import numpy as np
import pytest

from agent.tools.convert import sha256
from agent.tools.convert_detector import INT8_NAME, SIGNATURE, calibration_inputs, main, quantizable_float_graph
from agent.detect import BlazeFaceDetector
from agent.errors import AgentError
from agent.interpreter import load_interpreter
from agent.model_files import DEFAULT_DETECTOR_MODEL, default_model_path
from tests.sample_photos import two_faces_bgr

FLOAT_MODEL = default_model_path(DEFAULT_DETECTOR_MODEL)


def _outputs(interpreter, tensor: np.ndarray) -> list[np.ndarray]:
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], tensor)
    interpreter.invoke()
    by_name = {d["name"]: interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()}
    return [by_name[name] for name in sorted(by_name)]


def _op_counts(interpreter) -> Counter:
    return Counter(op["op_name"] for op in interpreter._get_ops_details())


def test_rewritten_float_graph_computes_what_the_bundled_model_does(tmp_path):
    rewritten = tmp_path / "rewritten.tflite"
    rewritten.write_bytes(quantizable_float_graph(FLOAT_MODEL.read_bytes()))
    before, after = load_interpreter(FLOAT_MODEL, 1), load_interpreter(rewritten, 1)
    # float16 weights now float32 constants, each RELU inside the op before it
    assert _op_counts(before)["DEQUANTIZE"] > 0 and _op_counts(before)["RELU"] > 0
    assert _op_counts(after)["DEQUANTIZE"] == 0 and _op_counts(after)["RELU"] == 0
    assert SIGNATURE in after.get_signature_list()
    tensor = BlazeFaceDetector(FLOAT_MODEL).prepare(two_faces_bgr()).tensor
    for old, new in zip(_outputs(before, tensor), _outputs(after, tensor), strict=True):
        np.testing.assert_allclose(new, old, atol=1e-3)


def test_calibration_inputs_are_each_photo_and_its_crops(tmp_path):
    import cv2

    cv2.imwrite(str(tmp_path / "two.jpg"), two_faces_bgr())
    (tmp_path / "notes.txt").write_text("not a photo")
    inputs = calibration_inputs(tmp_path, BlazeFaceDetector(FLOAT_MODEL))
    assert len(inputs) == 13 and all(x.shape == (1, 192, 192, 3) for x in inputs)
    assert len({x.tobytes() for x in inputs}) == 13  # the crops differ
    again = calibration_inputs(tmp_path, BlazeFaceDetector(FLOAT_MODEL))
    assert all(np.array_equal(a, b) for a, b in zip(inputs, again))  # seeded: the same build every time


@pytest.mark.parametrize("setup, message", [
    (lambda d: None, "no .jpg or .png photos"),
    (lambda d: (d / "broken.jpg").write_bytes(b"not a jpeg"), "cannot read"),
])
def test_unusable_calibration_folder_is_one_line(tmp_path, setup, message):
    setup(tmp_path)
    with pytest.raises(AgentError, match=message):
        calibration_inputs(tmp_path, BlazeFaceDetector(FLOAT_MODEL))


def test_missing_calibration_folder_is_one_line_and_exit_1(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--calibration", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: calibration photos:") and err.count("\n") == 1
    assert not (tmp_path / INT8_NAME).exists()


@pytest.mark.skipif(importlib.util.find_spec("ai_edge_quantizer") is None,
                    reason="needs ai-edge-quantizer (pip install '.[convert]')")
def test_the_build_reproduces_the_bundled_int8_detector(shared_data, tmp_path):
    assert main(["--out", str(tmp_path), "--calibration", str(shared_data / "photos" / "groups")]) == 0
    assert sha256(tmp_path / INT8_NAME) == sha256(default_model_path(INT8_NAME))
