"""Rebuilds the int8 face detector from the bundled float one: `python -m agent.tools.convert_detector`.

Source: models/face_detection_full_range.tflite (MediaPipe BlazeFace full-range, float16 weights).
Output: models/face_detection_full_range_int8.tflite, full-integer int8 except its two output
convolutions, which stay float: quantized, their box offsets would come in steps of about half an
input pixel (the scale the quantizer gave that output), and their scores drifted several times
further from the float model's than with them in float (tests/test_detect.py holds the shipped
file to within 0.1 of the float scores, and IoU 0.85 of its boxes, on two portraits).

Three rewrites come first, each keeping the float graph's outputs (tests/test_convert_detector.py):
  1. The float16 weights behind DEQUANTIZE ops become float32 constants: the quantizer reads
     weights from constants, and finds none behind a DEQUANTIZE.
  2. Each RELU is fused into the ADD or convolution that feeds it. Quantized, a standalone RELU
     is not taken by XNNPACK (LiteRT's CPU backend): the graph split into dozens of delegated
     pieces and ran several times slower than float (seen once, with ai-edge-litert 2.3.0).
  3. A `serving_default` signature, which the quantizer's calibration needs.

Calibration: ai-edge-quantizer's min/max over the group photos in ../shared/data/photos/groups
(public, MIT; see that folder's README), each whole and in seeded random crops, so faces come at
many scales. None of the photos or videos the detector is evaluated on is used.

The graph surgery needs only ai-edge-litert (a runtime dependency); the quantizer comes with
`pip install '.[convert]'`.
"""

from __future__ import annotations

import logging
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from agent.argtypes import Parser
from agent.errors import AgentError, ModelError
from agent.model_files import DEFAULT_DETECTOR_MODEL, default_model_path

logger = logging.getLogger(__name__)

INT8_NAME = "face_detection_full_range_int8.tflite"
SIGNATURE = "serving_default"
# The output convolutions, kept float (see the module's docstring).
FLOAT_LAYERS = r".*(classifier|regressor)_face_4"
CROPS_PER_PHOTO = 12
SEED = 0

DEFAULT_CALIBRATION_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "photos" / "groups"


def _schema():
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    return schema, flatbuffer_utils


def _opcode(model, op) -> int:
    code = model.operatorCodes[op.opcodeIndex]
    return max(code.builtinCode, code.deprecatedBuiltinCode)


def _fold_float16_weights(model, schema) -> int:
    """Replaces DEQUANTIZE(float16 constant) by a float32 constant; returns how many."""
    graph = model.subgraphs[0]
    kept, folded = [], 0
    for op in graph.operators:
        if _opcode(model, op) == schema.BuiltinOperator.DEQUANTIZE:
            source, target = graph.tensors[op.inputs[0]], graph.tensors[op.outputs[0]]
            data = model.buffers[source.buffer].data
            if source.type == schema.TensorType.FLOAT16 and data is not None and len(data):
                weights = np.frombuffer(bytes(bytearray(data)), np.float16).astype(np.float32)
                buffer = schema.BufferT()
                buffer.data = np.frombuffer(weights.tobytes(), np.uint8)
                model.buffers.append(buffer)
                target.buffer = len(model.buffers) - 1
                folded += 1
                continue
        kept.append(op)
    graph.operators = kept
    return folded


def _fuse_relus(model, schema) -> int:
    """Folds each RELU into its producer's fused activation, where the RELU is the producer's
    only consumer and the producer can fuse one; returns how many."""
    graph = model.subgraphs[0]
    ops = schema.BuiltinOperator
    consumers = Counter(tensor for op in graph.operators for tensor in op.inputs)
    producer = {tensor: op for op in graph.operators for tensor in op.outputs}
    fused = set()
    for op in graph.operators:
        if _opcode(model, op) != ops.RELU:
            continue
        source = producer.get(op.inputs[0])
        if (source is None or consumers.get(op.inputs[0]) != 1 or op.inputs[0] in graph.outputs
                or _opcode(model, source) not in (ops.ADD, ops.CONV_2D, ops.DEPTHWISE_CONV_2D)
                or source.builtinOptions.fusedActivationFunction != schema.ActivationFunctionType.NONE):
            continue
        source.builtinOptions.fusedActivationFunction = schema.ActivationFunctionType.RELU
        source.outputs = [op.outputs[0]]
        fused.add(id(op))
    graph.operators = [op for op in graph.operators if id(op) not in fused]
    return len(fused)


def _drop_unused_tensors(model) -> None:
    """Removes tensors no operator reads or writes (the calibrator records every tensor, and
    fails on one that is never computed), renumbering the rest."""
    graph = model.subgraphs[0]
    used = sorted({t for op in graph.operators for t in [*op.inputs, *op.outputs] if t >= 0}
                  | set(graph.inputs) | set(graph.outputs))
    new_index = {old: new for new, old in enumerate(used)}
    graph.tensors = [graph.tensors[i] for i in used]
    for op in graph.operators:
        op.inputs = [new_index[t] if t >= 0 else t for t in op.inputs]  # -1: an optional input left out
        op.outputs = [new_index[t] for t in op.outputs]
    graph.inputs = [new_index[t] for t in graph.inputs]
    graph.outputs = [new_index[t] for t in graph.outputs]


def _add_signature(model, schema) -> None:
    graph = model.subgraphs[0]

    def tensor_map(index: int):
        entry = schema.TensorMapT()
        entry.name, entry.tensorIndex = graph.tensors[index].name, index
        return entry

    signature = schema.SignatureDefT()
    signature.signatureKey, signature.subgraphIndex = SIGNATURE.encode(), 0
    signature.inputs = [tensor_map(i) for i in graph.inputs]
    signature.outputs = [tensor_map(i) for i in graph.outputs]
    model.signatureDefs = [signature]


def quantizable_float_graph(float_model: bytes) -> bytes:
    """The same float model, rewritten so ai-edge-quantizer can calibrate and quantize it and
    XNNPACK can run the quantized result in one piece (see the module's docstring)."""
    schema, flatbuffer_utils = _schema()
    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(float_model))
    if len(model.subgraphs) != 1:
        raise ModelError(f"expected a one-graph BlazeFace model, found {len(model.subgraphs)} graphs")
    folded, fused = _fold_float16_weights(model, schema), _fuse_relus(model, schema)
    _drop_unused_tensors(model)
    _add_signature(model, schema)
    logger.info("float graph: %d float16 weights folded, %d RELUs fused, %d operators left",
                folded, fused, len(model.subgraphs[0].operators))
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def calibration_inputs(folder: Path, detector) -> list[np.ndarray]:
    """The detector's inputs for every photo in `folder`, whole and in seeded random crops."""
    import cv2

    photos = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not photos:
        raise AgentError(f"no .jpg or .png photos in {folder} to calibrate with")
    rng = np.random.default_rng(SEED)
    inputs = []
    for path in photos:
        image = cv2.imread(str(path))
        if image is None:
            raise AgentError(f"cannot read {path} as an image")
        height, width = image.shape[:2]
        inputs.append(detector.prepare(image).tensor)
        for _ in range(CROPS_PER_PHOTO):  # a camera sees faces at every scale, whole groups to close-ups
            crop_w = int(width * rng.uniform(0.25, 0.9))
            crop_h = min(height, int(height * rng.uniform(0.25, 0.9) * rng.uniform(0.5, 1.2)))
            x, y = rng.integers(0, width - crop_w + 1), rng.integers(0, height - crop_h + 1)
            inputs.append(detector.prepare(image[y:y + crop_h, x:x + crop_w]).tensor)
    return inputs


def quantize(float_graph: bytes, inputs: list[np.ndarray]) -> bytes:
    """Full-integer int8 (int8 weights per channel, int8 activations), FLOAT_LAYERS left float."""
    try:
        from ai_edge_quantizer import quantizer, recipe
    except ImportError as exc:
        raise AgentError(f"ai-edge-quantizer is not installed ({exc}): pip install '.[convert]'") from None
    from ai_edge_litert.interpreter import Interpreter

    input_name = Interpreter(model_content=float_graph).get_signature_list()[SIGNATURE]["inputs"][0]
    plan = recipe.static_wi8_ai8()
    plan.append({"regex": FLOAT_LAYERS, "operation": "*", "algorithm_key": "no_quantize", "op_config": {}})
    job = quantizer.Quantizer(bytearray(float_graph))
    job.load_quantization_recipe(plan)
    ranges = job.calibrate({SIGNATURE: [{input_name: x} for x in inputs]})
    return bytes(job.quantize(ranges).quantized_model)


def build(source: Path, out: Path, calibration_dir: Path) -> Path:
    from agent.detect import BlazeFaceDetector

    if not calibration_dir.is_dir():
        raise AgentError(f"calibration photos: {calibration_dir} is not a folder (--calibration DIR)")
    inputs = calibration_inputs(calibration_dir, BlazeFaceDetector(source))
    logger.info("calibrating on %d inputs from %s", len(inputs), calibration_dir)
    target = out / INT8_NAME
    target.write_bytes(quantize(quantizable_float_graph(source.read_bytes()), inputs))
    BlazeFaceDetector(target)  # loads and has the outputs the detector needs, or raises
    return target


def main(argv: list[str] | None = None) -> int:
    from agent.tools.convert import sha256

    parser = Parser(prog="python -m agent.tools.convert_detector", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("models"), help="folder for the int8 model (default: models)")
    parser.add_argument("--calibration", type=Path, default=DEFAULT_CALIBRATION_DIR, metavar="DIR",
                        help=f"photos to calibrate with (default: {DEFAULT_CALIBRATION_DIR})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        target = build(default_model_path(DEFAULT_DETECTOR_MODEL), args.out, args.calibration)
    except (AgentError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{target}: {target.stat().st_size} bytes, sha256 {sha256(target)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
