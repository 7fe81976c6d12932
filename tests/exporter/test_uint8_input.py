"""export.onnx_export.take_uint8_pixels: the INT8 graph's float input becomes the uint8 pixels, exactly."""
import numpy as np
import pytest
from extras import require

onnx = require("onnx", "export")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from export.onnx_export import UINT8_INPUT, take_uint8_pixels  # noqa: E402


def _model(path, scale: float, zero: int, quantised_input: bool = True):
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["tiles", 3, 4, 5])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["tiles", 3, 4, 5])
    inits = [numpy_helper.from_array(np.array(scale, np.float32), "s"),
             numpy_helper.from_array(np.array(zero, np.uint8), "z")]
    if quantised_input:
        nodes = [helper.make_node("QuantizeLinear", ["image", "s", "z"], ["q"]),
                 helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"]),
                 helper.make_node("Relu", ["dq"], ["out"])]
    else:
        nodes = [helper.make_node("Relu", ["image"], ["out"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def test_the_input_becomes_the_pixels_and_the_output_is_unchanged(tmp_path):
    import onnxruntime as ort

    path = _model(tmp_path / "m.onnx", UINT8_INPUT["scale"], UINT8_INPUT["zero_point"])
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (2, 4, 5, 3), dtype=np.uint8)
    x = (pixels.transpose(0, 3, 1, 2).astype(np.float32) - 127) / 128           # preprocess.to_tensor's tensor
    before = ort.InferenceSession(str(path)).run(None, {"image": x})[0]
    assert take_uint8_pixels(path)
    g = onnx.load(str(path)).graph
    assert g.input[0].type.tensor_type.elem_type == TensorProto.UINT8
    assert [d.dim_param or d.dim_value for d in g.input[0].type.tensor_type.shape.dim] == ["tiles", 4, 5, 3]
    assert not [n for n in g.node if n.op_type == "QuantizeLinear"]
    after = ort.InferenceSession(str(path)).run(None, {"image": pixels})[0]
    assert np.array_equal(before, after)


def test_another_input_scale_is_refused_and_a_float_input_left_alone(tmp_path):
    with pytest.raises(ValueError, match="scale"):
        take_uint8_pixels(_model(tmp_path / "a.onnx", 0.0069, 111))
    path = _model(tmp_path / "b.onnx", 1.0, 0, quantised_input=False)
    before = path.read_bytes()
    assert not take_uint8_pixels(path) and path.read_bytes() == before
