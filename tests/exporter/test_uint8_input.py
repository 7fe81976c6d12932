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


def _pixel_conv_model(path, group: int = 1, shared_weight: bool = False):
    """uint8 NHWC pixels -> Transpose -> DequantizeLinear -> Conv (int8 weights) -> QDQ -> float: the INT8 stem's
    shape after take_uint8_pixels."""
    rng = np.random.default_rng(1)
    out_ch = 16 if group == 1 else 3
    w = rng.integers(-63, 64, (out_ch, 3 // group, 3, 3)).astype(np.int8)
    inits = [numpy_helper.from_array(np.array(UINT8_INPUT["scale"], np.float32), "s"),
             numpy_helper.from_array(np.array(UINT8_INPUT["zero_point"], np.uint8), "z"),
             numpy_helper.from_array(w, "w_q"),
             numpy_helper.from_array(np.full(out_ch, 0.01, np.float32), "w_s"),
             numpy_helper.from_array(np.zeros(out_ch, np.int8), "w_z"),
             numpy_helper.from_array(np.array(0.05, np.float32), "o_s"),
             numpy_helper.from_array(np.array(0, np.uint8), "o_z")]
    nodes = [helper.make_node("Transpose", ["image"], ["nchw"], perm=[0, 3, 1, 2]),
             helper.make_node("DequantizeLinear", ["nchw", "s", "z"], ["x"]),
             helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["w"], axis=0),
             helper.make_node("Conv", ["x", "w"], ["y"], pads=[0, 0, 1, 1], strides=[2, 2], group=group),
             helper.make_node("Relu", ["y"], ["r"]),
             helper.make_node("QuantizeLinear", ["r", "o_s", "o_z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "o_s", "o_z"], ["out"])]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["tiles", out_ch, 16, 16])]
    if shared_weight:     # the weight also read elsewhere: widening it would change that reader
        nodes.append(helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["w2"], axis=0))
        outputs.append(helper.make_tensor_value_info("w2", TensorProto.FLOAT, None))
    x = helper.make_tensor_value_info("image", TensorProto.UINT8, ["tiles", 32, 32, 3])
    model = helper.make_model(helper.make_graph(nodes, "g", [x], outputs, inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def test_widened_pixel_input_gives_the_same_outputs_and_narrows_back(tmp_path):
    import onnxruntime as ort

    from edge_runtime.features import model_input, pixel_channels
    from export.onnx_export import narrow_pixel_input, widen_pixel_input

    path = _pixel_conv_model(tmp_path / "m.onnx")
    original = path.read_bytes()
    pixels = np.random.default_rng(2).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    before = ort.InferenceSession(original).run(None, {"image": pixels})[0]
    assert widen_pixel_input(path)
    g = onnx.load(str(path)).graph
    assert [d.dim_param or d.dim_value for d in g.input[0].type.tensor_type.shape.dim] == ["tiles", 32, 32, 4]
    w = numpy_helper.to_array(next(i for i in g.initializer if i.name == "w_q"))
    assert w.shape == (16, 4, 3, 3) and not w[:, 3].any()
    session = ort.InferenceSession(str(path))
    assert pixel_channels(session) == 4
    rgba = model_input(pixels, True, 4)
    assert rgba.shape == (2, 32, 32, 4) and np.array_equal(rgba[..., :3], pixels)
    assert np.array_equal(session.run(None, {"image": rgba})[0], before)
    # Whatever the 4th channel holds: its weights are zero.
    rgba[..., 3] = np.random.default_rng(3).integers(0, 256, rgba.shape[:3], dtype=np.uint8)
    assert np.array_equal(session.run(None, {"image": rgba})[0], before)
    assert not widen_pixel_input(path)                      # already 4 channels
    assert narrow_pixel_input(path) and path.read_bytes() == original
    assert not narrow_pixel_input(path)


def test_graphs_of_another_shape_are_not_widened(tmp_path):
    from export.onnx_export import narrow_pixel_input, widen_pixel_input

    for name, path in {"float input": _model(tmp_path / "f.onnx", 1.0, 0, quantised_input=False),
                       "grouped convolution": _pixel_conv_model(tmp_path / "g.onnx", group=3),
                       "shared weight": _pixel_conv_model(tmp_path / "s.onnx", shared_weight=True)}.items():
        before = path.read_bytes()
        assert not widen_pixel_input(path) and path.read_bytes() == before, name
    path = _pixel_conv_model(tmp_path / "n.onnx")
    assert widen_pixel_input(path)
    m = onnx.load(str(path))
    w = next(i for i in m.graph.initializer if i.name == "w_q")
    arr = numpy_helper.to_array(w).copy()
    arr[0, 3, 0, 0] = 1                                     # a real 4th channel: not ours to drop
    w.CopyFrom(numpy_helper.from_array(arr, "w_q"))
    onnx.save(m, str(path))
    before = path.read_bytes()
    assert not narrow_pixel_input(path) and path.read_bytes() == before
