"""Torch feature graph -> ONNX FP32 (opset 17, static input size) -> ONNX INT8 (static QDQ quantisation)."""
from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from export.patch_features import PatchFeatures

OPSET = 17

# onnxruntime static quantisation settings per deployment target (QDQ, per-channel weights, MinMax).
# x86 without VNNI multiplies u8 x s8 with vpmaddubsw, whose 16-bit pair sums can saturate: reduce_range
# (7-bit weights) rules that out, at a cost in precision (INT8 feature SQNR 14.2 dB vs 18.7 dB without it,
# measured on an AVX512-VNNI machine where no saturation occurs). It is the default because it is correct
# on every x86 CPU; pick x86-vnni (Ice Lake+/Zen 4+/AVX-VNNI) for the more precise model (no AUROC gained on
# bottle: pixel 0.9829 vs 0.9831). ARM takes S8S8, onnxruntime's recommended default there, with 7-bit weights
# too: the bank is computed on the workstation, and an x86 CPU without VNNI runs a model's s8 x s8 convolutions
# through the same saturating kernel (8-bit weights: bottle image AUROC 0.448 there, benchmarks/int8_kernels.py),
# so only 7-bit weights let any x86 workstation fit a bundle for a Pi or a Jetson.
INT8_TARGETS: dict[str, dict] = {
    "x86-avx2": {"activation": "QUInt8", "weight": "QInt8", "reduce_range": True, "per_channel": True},
    "x86-vnni": {"activation": "QUInt8", "weight": "QInt8", "reduce_range": False, "per_channel": True},
    "arm": {"activation": "QInt8", "weight": "QInt8", "reduce_range": True, "per_channel": True},
}


def export_fp32(model: PatchFeatures, input_size: tuple[int, int], path: Path) -> dict:
    """Fixed H x W (TF pads are baked in at trace time), dynamic batch: all tiles of a frame in one run."""
    width, height = input_size
    dummy = torch.zeros(2, 3, height, width)
    with warnings.catch_warnings():
        # The tracer warns that pad sizes become constants: intended, the graph has a fixed input size.
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (dummy,), str(path), opset_version=OPSET, dynamo=False,
                          input_names=["image"], output_names=["patch_features"], do_constant_folding=True,
                          dynamic_axes={"image": {0: "tiles"}, "patch_features": {0: "tiles"}})
    constant_fold(path)
    folded = fold_pads_into_convs(path)
    rows, cols = model.grid(input_size)
    pin_output_shape(path, rows * cols, model.dim)
    return {"opset": OPSET, "input": {"name": "image", "shape": ["tiles", 3, height, width], "dynamic": "batch only"},
            "output": {"name": "patch_features", "shape": ["tiles", rows * cols, model.dim]},
            "exporter": f"torch.onnx.export legacy (dynamo=False), torch {torch.__version__}",
            "pads_folded_into_conv": folded}


def constant_fold(path: Path) -> None:
    """Turn the traced pad-size arithmetic into constants with onnxruntime's basic (hardware-independent) level."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # folding leaves unused initializers behind; their removal is not news
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(path)
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def fold_pads_into_convs(path: Path) -> int:
    """Merge constant zero Pad nodes (TF "SAME" padding) into the Conv that consumes them.

    onnxruntime runs an explicit Pad as its own copy of the activation; Conv's `pads` attribute does the
    same asymmetric padding for free (shared/BACKBONES.md: 12-13 ms -> 6-8 ms for lite0 on 2 threads).
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    g = model.graph
    consts = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    for n in g.node:
        if n.op_type == "Constant":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    removed = []
    for pad in [n for n in g.node if n.op_type == "Pad"]:
        mode = next((a.s.decode() for a in pad.attribute if a.name == "mode"), "constant")
        pads = consts.get(pad.input[1]) if len(pad.input) > 1 else None
        value = consts.get(pad.input[2]) if len(pad.input) > 2 and pad.input[2] else np.zeros(1)
        users = consumers.get(pad.output[0], [])
        if (mode != "constant" or pads is None or value is None or np.any(value != 0) or len(pads) != 8
                or np.any(pads[[0, 1, 4, 5]] != 0) or not users or any(u.op_type != "Conv" for u in users)):
            continue
        for conv in users:
            old = next((a for a in conv.attribute if a.name == "pads"), None)
            base = list(old.ints) if old is not None else [0, 0, 0, 0]
            new = [base[0] + int(pads[2]), base[1] + int(pads[3]), base[2] + int(pads[6]), base[3] + int(pads[7])]
            if old is not None:
                conv.attribute.remove(old)
            conv.attribute.append(onnx.helper.make_attribute("pads", new))
            conv.input[0] = pad.input[0]
        removed.append(pad)
    for n in removed:
        g.node.remove(n)
    # Drop constants nothing reads any more (the pad sizes), so onnxruntime has nothing to warn about on device.
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    for init in [i for i in g.initializer if i.name not in used]:
        g.initializer.remove(init)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return len(removed)


def pin_output_shape(path: Path, n_patches: int, dim: int) -> None:
    """Write the static patch and feature dimensions into the output's type: with a dynamic batch the tracer
    leaves them symbolic, and the device checks them against the manifest before running anything."""
    import onnx

    model = onnx.load(str(path))
    dims = model.graph.output[0].type.tensor_type.shape.dim
    dims[0].dim_param = "tiles"
    for d, value in zip(dims[1:], (n_patches, dim)):
        d.ClearField("dim_param")
        d.dim_value = value
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


# The head after the backbone's two taps (3x3 aggregation, upsampling, concatenation, layout, projection) stays
# float: onnxruntime's QLinearAveragePool alone took 0.36 ms of a 3.1 ms INT8 run (bottle, 256 x 256, 2 threads,
# per-op profile), the float head with its DequantizeLinear 2.70 vs 3.09 ms in total, and the features come out
# slightly closer to FP32 (mean relative error 0.107 vs 0.109): the convolutions are where INT8 pays.
FLOAT_HEAD_OPS = ("AveragePool", "Resize", "Concat", "Transpose", "Reshape", "Flatten", "MatMul")


# The device tensor is (rgb - 127) / 128 (edge_runtime.preprocess), so an unsigned 8-bit input quantised with
# scale 1/128 and zero point 127 IS the pixel value: lossless, where a calibrated scale (e.g. 0.0069, zero point
# 111) rounds the input. The INT8 graph then takes the frame's uint8 pixels as they are, NHWC, and the station skips
# the float tensor: preprocess + features 3.03 -> 2.71 ms p50 on bottle (256 x 256, 2 threads), features
# bit-identical to the same graph fed the float tensor.
UINT8_INPUT = {"scale": 1.0 / 128.0, "zero_point": 127}


def quantize_int8(fp32_path: Path, out_path: Path, calibration: Iterable[np.ndarray], target: str = "x86-avx2",
                  uint8_input: bool = True) -> dict:
    """The static INT8 (QDQ) graph of `fp32_path`. `uint8_input` (targets with unsigned activations): the graph
    takes uint8 RGB pixels, NHWC (`UINT8_INPUT`, `take_uint8_pixels`); otherwise the float tensor, NCHW."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quant_pre_process, quantize_static)

    if target not in INT8_TARGETS:
        raise ValueError(f"unknown INT8 target {target!r}; choose one of {sorted(INT8_TARGETS)}")
    settings = INT8_TARGETS[target]
    tensors = list(calibration)
    uint8_input = uint8_input and settings["activation"] == "QUInt8"   # a signed input cannot hold 0..255
    overrides = ({"TensorQuantOverrides": {"image": [{"scale": np.array(UINT8_INPUT["scale"], np.float32),
                                                      "zero_point": np.array(UINT8_INPUT["zero_point"], np.uint8)}]}}
                 if uint8_input else {})

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter({"image": t} for t in tensors)

        def get_next(self):
            return next(self.it, None)

    with tempfile.TemporaryDirectory() as tmp:
        prepped = Path(tmp) / "prepped.onnx"
        quant_pre_process(str(fp32_path), str(prepped))
        head = [n.name for n in onnx.load(str(prepped)).graph.node if n.op_type in FLOAT_HEAD_OPS]
        quantize_static(str(prepped), str(out_path), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=settings["per_channel"], reduce_range=settings["reduce_range"],
                        activation_type=getattr(QuantType, settings["activation"]),
                        weight_type=getattr(QuantType, settings["weight"]),
                        calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=head, extra_options=overrides)
    widened = False
    if uint8_input:
        uint8_input = take_uint8_pixels(out_path)
        widened = uint8_input and widen_pixel_input(out_path)
    input_note = ("uint8 RGB pixels, NHWC (the input quantised at scale 1/128, zero point 127: exactly the pixel "
                  "values)" if uint8_input else "float32 (rgb - 127) / 128, NCHW")
    if widened:
        input_note += ("; a 4th channel, RGBA, whose weights in the first convolution are zero (any value there "
                       "gives the same features)")
    return {"target": target, "format": "QDQ", "calibration": "MinMax", "calibration_images": len(tensors),
            "float_head_ops": list(FLOAT_HEAD_OPS), **settings, "input": input_note,
            "input_channels": 4 if widened else 3}


def take_uint8_pixels(path: Path) -> bool:
    """Make the quantised graph's input the uint8 pixels themselves: the QuantizeLinear of the float input (at
    `UINT8_INPUT`, checked here) is replaced by a uint8 NHWC input and a Transpose to NCHW. False (graph left as
    it is) when the input feeds anything but one QuantizeLinear (e.g. a float input map the quantiser left float)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path))
    g = model.graph
    inp = g.input[0]
    users = [n for n in g.node if inp.name in n.input]
    if len(users) != 1 or users[0].op_type != "QuantizeLinear":
        return False
    quant = users[0]
    init = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    scale, zero = init.get(quant.input[1]), init.get(quant.input[2])
    if (scale is None or zero is None or float(scale) != UINT8_INPUT["scale"] or zero.dtype != np.uint8
            or int(zero) != UINT8_INPUT["zero_point"]):
        raise ValueError(f"{path}: input quantised at scale {scale}, zero point {zero}, not {UINT8_INPUT}")
    dims = inp.type.tensor_type.shape.dim
    batch = dims[0].dim_param or dims[0].dim_value
    height, width = dims[2].dim_value, dims[3].dim_value
    g.node.remove(quant)
    g.input.remove(inp)
    g.input.insert(0, helper.make_tensor_value_info(inp.name, TensorProto.UINT8, [batch, height, width, 3]))
    g.node.insert(0, helper.make_node("Transpose", [inp.name], [quant.output[0]], perm=[0, 3, 1, 2],
                                      name="pixels_nhwc_to_nchw"))
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return True


# onnxruntime runs a quantised convolution on its symmetric indirect kernel (MlasConvSym: no im2col copy) only
# when the input channels are a multiple of 4; the stem's 3 RGB channels fall back to im2col + GEMM. A zero 4th
# channel puts the stem on that kernel with integer sums unchanged (the features are bit-identical): on bottle
# 256 x 256, 2 threads, stem 0.36 -> 0.18 ms in the per-node profile, features stage p50 -0.4 ms interleaved
# (benchmarks/stem_channels.py).
def _pixel_conv_weights(g, channels: int) -> list | None:
    """The int8 weight initializers of the convolutions that read the dequantised uint8 pixels (input NHWC with
    `channels` channels -> Transpose -> DequantizeLinear -> Conv), each of their own and over `channels` inputs;
    None when the graph is not of that shape."""
    from onnx import TensorProto, numpy_helper

    inp = g.input[0]
    dims = inp.type.tensor_type.shape.dim
    if inp.type.tensor_type.elem_type != TensorProto.UINT8 or len(dims) != 4 or dims[3].dim_value != channels:
        return None

    def users(name):
        return [n for n in g.node if name in n.input]

    first = users(inp.name)
    if len(first) != 1 or first[0].op_type != "Transpose":
        return None
    dq = users(first[0].output[0])
    if len(dq) != 1 or dq[0].op_type != "DequantizeLinear":
        return None
    init = {i.name: i for i in g.initializer}
    weights = []
    for conv in users(dq[0].output[0]):
        group = next((a.i for a in conv.attribute if a.name == "group"), 1)
        wdq = next((n for n in g.node if conv.input[1] in n.output), None) if conv.op_type == "Conv" else None
        if (group != 1 or conv.input[0] != dq[0].output[0] or wdq is None or wdq.op_type != "DequantizeLinear"
                or wdq.input[0] not in init or len(users(wdq.input[0])) != 1):
            return None
        w = init[wdq.input[0]]
        if w.data_type != TensorProto.INT8 or len(w.dims) != 4 or w.dims[1] != channels:
            return None
        weights.append((w, numpy_helper.to_array(w)))
    return weights or None


def widen_pixel_input(path: Path) -> bool:
    """Give the uint8 pixel graph (`take_uint8_pixels`) a 4th input channel: every convolution reading the
    dequantised pixels gets a zero weight for it. False (graph left as it is) unless the pixels feed exactly
    convolutions over 3 channels whose int8 weights are constants of their own."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    weights = _pixel_conv_weights(model.graph, 3)
    if weights is None:
        return False
    for init, w in weights:
        wide = np.concatenate([w, np.zeros(w.shape[:1] + (1,) + w.shape[2:], np.int8)], axis=1)
        init.CopyFrom(numpy_helper.from_array(wide, init.name))
    model.graph.input[0].type.tensor_type.shape.dim[3].dim_value = 4
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return True


def narrow_pixel_input(path: Path) -> bool:
    """The inverse of `widen_pixel_input`: the 3-channel graph of a widened one (what bundles before it shipped),
    for comparisons (benchmarks/stem_channels.py, the tests). False (left as it is) unless the graph is a widened
    one: 4 pixel channels, the 4th with zero weights."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    weights = _pixel_conv_weights(model.graph, 4)
    if weights is None or any(w[:, 3].any() for _, w in weights):
        return False
    for init, w in weights:
        init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w[:, :3]), init.name))
    model.graph.input[0].type.tensor_type.shape.dim[3].dim_value = 3
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return True
