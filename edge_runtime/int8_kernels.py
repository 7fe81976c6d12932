"""Whether onnxruntime on this machine multiplies an INT8 model's types exactly.

An INT8 bundle's bank and threshold were made from the features its model computed on the fitting machine, so
the device must compute the same integers. It does not always: an x86 CPU without VNNI multiplies u8 x s8 with
vpmaddubsw, whose 16-bit sums of product pairs saturate at 32,767, and a model's s8 x s8 convolutions saturate
there too (measured; onnxruntime runs them through the same u8 x s8 kernel). A model quantised with full 8-bit
weights (INT8 targets x86-vnni and arm) then computes other features: bottle patch features 60-62% off, image
AUROC 1.000 -> 0.62 (x86-vnni) / 0.45 (arm), every good part rejected (`benchmarks/int8_kernels.py`: the AVX2
kernels under qemu's Haswell model, and on this CPU with CPUID masked).
reduce_range (7-bit weights, the x86-avx2 target) keeps every pair sum below 32,767: identical on both kinds.

The question is asked of onnxruntime itself, not of CPU flags: a one-convolution QDQ graph of the bundle's
activation type and weight range, its input quantised inside the graph as in the bundle's model (onnxruntime's
s8 -> u8 rewrite applies to such tensors only), every product at its largest, run on the station's providers.
Whatever kernel this onnxruntime picks on this CPU (or GPU), a saturating one gets the sum wrong.
"""
from __future__ import annotations

import base64
import functools

import numpy as np

from edge_runtime.features import FeatureError, make_session

CHANNELS = 64   # products summed per output: 32 pairs, each of which saturates alone when the kernel does
GRID = 8        # 8 x 8 outputs: a GEMM large enough for onnxruntime's blocked kernels
WEIGHTS = (127, 63)   # the largest int8 weight, and the largest with reduce_range (7-bit weights)


def _setup(activation: str) -> tuple[type, int, dict[int, float]]:
    """(input dtype, its largest value, output scale per weight): the exact sum lands on a representable step,
    a saturated one (about half of it) on another."""
    if activation not in ("QUInt8", "QInt8"):
        raise FeatureError(f"unknown INT8 activation type {activation!r} (expected QUInt8 or QInt8)")
    dtype, top, levels = (np.uint8, 255, 255) if activation == "QUInt8" else (np.int8, 127, 127)
    return dtype, top, {w: float(2 ** int(np.ceil(np.log2(CHANNELS * top * w / levels)))) for w in WEIGHTS}


def build_probe(activation: str, weight: int) -> bytes:
    """The probe model for one activation type and weight (needs the onnx package: tests and regeneration only;
    the device runs the serialised copy in PROBES): float input x, quantised in the graph, through one QDQ 1 x 1
    convolution to output y. One model per case: with two convolutions reading one quantised input, onnxruntime
    did not rewrite s8 to u8 and the probe missed the saturation a real model meets."""
    from onnx import TensorProto, helper, numpy_helper

    dtype, _, scales = _setup(activation)
    inits = [numpy_helper.from_array(np.array(1.0, np.float32), "x_scale"),
             numpy_helper.from_array(np.array(0, dtype), "x_zero"),
             numpy_helper.from_array(np.full((1, CHANNELS, 1, 1), weight, np.int8), "w"),
             numpy_helper.from_array(np.array([1.0], np.float32), "w_scale"),
             numpy_helper.from_array(np.array([0], np.int8), "w_zero"),
             numpy_helper.from_array(np.array(scales[weight], np.float32), "y_scale"),
             numpy_helper.from_array(np.array(0, dtype), "y_zero")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xf"]),
             helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zero"], ["wf"], axis=0),
             helper.make_node("Conv", ["xf", "wf"], ["yf"]),
             helper.make_node("QuantizeLinear", ["yf", "y_scale", "y_zero"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "y_scale", "y_zero"], ["y"])]
    graph = helper.make_graph(nodes, "int8_probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, CHANNELS, GRID, GRID])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, GRID, GRID])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edge_runtime")
    model.ir_version = 9   # onnxruntime builds older than onnx's newest IR
    return model.SerializeToString()


def probes_literal() -> str:
    """The PROBES assignment for this file, made with the onnx package."""
    out = ["PROBES = {"]
    for activation in ("QUInt8", "QInt8"):
        for weight in WEIGHTS:
            text = base64.b64encode(build_probe(activation, weight)).decode()
            out += [f'    ("{activation}", {weight}): (']
            out += [f'        "{text[i:i + 96]}"' for i in range(0, len(text), 96)] + ["    ),"]
    return "\n".join(out + ["}"])


# The probe models as build_probe makes them (tests/runtime/test_int8_kernels.py checks that they still are;
# regenerate with: python -c "from edge_runtime.int8_kernels import probes_literal; print(probes_literal())").
PROBES = {
    ("QUInt8", 127): (
        "CAkSDGVkZ2VfcnVudGltZTr8AwooCgF4Cgd4X3NjYWxlCgZ4X3plcm8SAnhxIg5RdWFudGl6ZUxpbmVhcgorCgJ4cQoHeF9z"
        "Y2FsZQoGeF96ZXJvEgJ4ZiIQRGVxdWFudGl6ZUxpbmVhcgo3CgF3Cgd3X3NjYWxlCgZ3X3plcm8SAndmIhBEZXF1YW50aXpl"
        "TGluZWFyKgsKBGF4aXMYAKABAgoSCgJ4ZgoCd2YSAnlmIgRDb252CikKAnlmCgd5X3NjYWxlCgZ5X3plcm8SAnlxIg5RdWFu"
        "dGl6ZUxpbmVhcgoqCgJ5cQoHeV9zY2FsZQoGeV96ZXJvEgF5IhBEZXF1YW50aXplTGluZWFyEgppbnQ4X3Byb2JlKhEQAUIH"
        "eF9zY2FsZUoEAACAPyoNEAJCBnhfemVyb0oBACpPCAEIQAgBCAEQA0IBd0pAf39/f39/f39/f39/f39/f39/f39/f39/f39/"
        "f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/fyoTCAEQAUIHd19zY2FsZUoEAACAPyoPCAEQA0IGd196ZXJv"
        "SgEAKhEQAUIHeV9zY2FsZUoEAAAARioNEAJCBnlfemVyb0oBAFobCgF4EhYKFAgBEhAKAggBCgIIQAoCCAgKAggIYhsKAXkS"
        "FgoUCAESEAoCCAEKAggBCgIICAoCCAhCBAoAEBE="
    ),
    ("QUInt8", 63): (
        "CAkSDGVkZ2VfcnVudGltZTr8AwooCgF4Cgd4X3NjYWxlCgZ4X3plcm8SAnhxIg5RdWFudGl6ZUxpbmVhcgorCgJ4cQoHeF9z"
        "Y2FsZQoGeF96ZXJvEgJ4ZiIQRGVxdWFudGl6ZUxpbmVhcgo3CgF3Cgd3X3NjYWxlCgZ3X3plcm8SAndmIhBEZXF1YW50aXpl"
        "TGluZWFyKgsKBGF4aXMYAKABAgoSCgJ4ZgoCd2YSAnlmIgRDb252CikKAnlmCgd5X3NjYWxlCgZ5X3plcm8SAnlxIg5RdWFu"
        "dGl6ZUxpbmVhcgoqCgJ5cQoHeV9zY2FsZQoGeV96ZXJvEgF5IhBEZXF1YW50aXplTGluZWFyEgppbnQ4X3Byb2JlKhEQAUIH"
        "eF9zY2FsZUoEAACAPyoNEAJCBnhfemVyb0oBACpPCAEIQAgBCAEQA0IBd0pAPz8/Pz8/Pz8/Pz8/Pz8/Pz8/Pz8/Pz8/Pz8/"
        "Pz8/Pz8/Pz8/Pz8/Pz8/Pz8/Pz8/Pz8/Pz8/Pz8/Pz8/Pz8/PyoTCAEQAUIHd19zY2FsZUoEAACAPyoPCAEQA0IGd196ZXJv"
        "SgEAKhEQAUIHeV9zY2FsZUoEAACARSoNEAJCBnlfemVyb0oBAFobCgF4EhYKFAgBEhAKAggBCgIIQAoCCAgKAggIYhsKAXkS"
        "FgoUCAESEAoCCAEKAggBCgIICAoCCAhCBAoAEBE="
    ),
    ("QInt8", 127): (
        "CAkSDGVkZ2VfcnVudGltZTr8AwooCgF4Cgd4X3NjYWxlCgZ4X3plcm8SAnhxIg5RdWFudGl6ZUxpbmVhcgorCgJ4cQoHeF9z"
        "Y2FsZQoGeF96ZXJvEgJ4ZiIQRGVxdWFudGl6ZUxpbmVhcgo3CgF3Cgd3X3NjYWxlCgZ3X3plcm8SAndmIhBEZXF1YW50aXpl"
        "TGluZWFyKgsKBGF4aXMYAKABAgoSCgJ4ZgoCd2YSAnlmIgRDb252CikKAnlmCgd5X3NjYWxlCgZ5X3plcm8SAnlxIg5RdWFu"
        "dGl6ZUxpbmVhcgoqCgJ5cQoHeV9zY2FsZQoGeV96ZXJvEgF5IhBEZXF1YW50aXplTGluZWFyEgppbnQ4X3Byb2JlKhEQAUIH"
        "eF9zY2FsZUoEAACAPyoNEANCBnhfemVyb0oBACpPCAEIQAgBCAEQA0IBd0pAf39/f39/f39/f39/f39/f39/f39/f39/f39/"
        "f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/fyoTCAEQAUIHd19zY2FsZUoEAACAPyoPCAEQA0IGd196ZXJv"
        "SgEAKhEQAUIHeV9zY2FsZUoEAAAARioNEANCBnlfemVyb0oBAFobCgF4EhYKFAgBEhAKAggBCgIIQAoCCAgKAggIYhsKAXkS"
        "FgoUCAESEAoCCAEKAggBCgIICAoCCAhCBAoAEBE="
    ),
    ("QInt8", 63): (
        "CAkSDGVkZ2VfcnVudGltZTr8AwooCgF4Cgd4X3NjYWxlCgZ4X3plcm8SAnhxIg5RdWFudGl6ZUxpbmVhcgorCgJ4cQoHeF9z"
        "Y2FsZQoGeF96ZXJvEgJ4ZiIQRGVxdWFudGl6ZUxpbmVhcgo3CgF3Cgd3X3NjYWxlCgZ3X3plcm8SAndmIhBEZXF1YW50aXpl"
        "TGluZWFyKgsKBGF4aXMYAKABAgoSCgJ4ZgoCd2YSAnlmIgRDb252CikKAnlmCgd5X3NjYWxlCgZ5X3plcm8SAnlxIg5RdWFu"
        "dGl6ZUxpbmVhcgoqCgJ5cQoHeV9zY2FsZQoGeV96ZXJvEgF5IhBEZXF1YW50aXplTGluZWFyEgppbnQ4X3Byb2JlKhEQAUIH"
        "eF9zY2FsZUoEAACAPyoNEANCBnhfemVyb0oBACpPCAEIQAgBCAEQA0IBd0pAPz8/Pz8/Pz8/Pz8/Pz8/Pz8/Pz8/Pz8/Pz8/"
        "Pz8/Pz8/Pz8/Pz8/Pz8/Pz8/Pz8/Pz8/Pz8/Pz8/Pz8/Pz8/PyoTCAEQAUIHd19zY2FsZUoEAACAPyoPCAEQA0IGd196ZXJv"
        "SgEAKhEQAUIHeV9zY2FsZUoEAACARSoNEANCBnlfemVyb0oBAFobCgF4EhYKFAgBEhAKAggBCgIIQAoCCAgKAggIYhsKAXkS"
        "FgoUCAESEAoCCAEKAggBCgIICAoCCAhCBAoAEBE="
    ),
}


@functools.lru_cache(maxsize=None)
def exact_products(activation: str, weight_max: int, providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> bool:
    """True when a QDQ convolution of `activation` ("QUInt8" or "QInt8") inputs at their largest value and int8
    weights of `weight_max` (127, or 63 with reduce_range) returns the exact sum here. Raises FeatureError when
    onnxruntime cannot run it."""
    _, top, scales = _setup(activation)
    if weight_max not in scales:
        raise FeatureError(f"no INT8 probe for weights up to {weight_max} (have {', '.join(map(str, WEIGHTS))})")
    model = base64.b64decode(PROBES[(activation, weight_max)])
    session = make_session(model, 1, list(providers), name="<INT8 exactness probe>")
    try:
        got = session.run(None, {"x": np.full((1, CHANNELS, GRID, GRID), top, np.float32)})[0]
    except Exception as exc:  # onnxruntime's own exception types
        raise FeatureError(f"<INT8 exactness probe>: onnxruntime cannot run it ({exc})") from None
    scale = scales[weight_max]
    return bool(np.all(got == np.float32(scale * np.round(CHANNELS * top * weight_max / scale))))


def capability(providers: list[str] | None = None) -> str:
    """One line for reports (edge-bench, edge-runtime check): which INT8 targets this machine computes exactly."""
    wanted = tuple(providers or ["CPUExecutionProvider"])
    try:
        full = all(exact_products(a, 127, wanted) for a in ("QUInt8", "QInt8"))
        seven = all(exact_products(a, 63, wanted) for a in ("QUInt8", "QInt8"))
    except FeatureError as exc:
        return f"INT8 probe failed ({exc})"
    if full:
        return "8-bit products exact (x86-avx2, x86-vnni and arm bundles all run here)"
    if seven:
        return "8-bit products saturate, 7-bit exact (no VNNI: only x86-avx2 bundles run here)"
    return "INT8 products inexact even with 7-bit weights: run the FP32 variant"


DEVICE_ADVICE = ("Refit for this device (edge-export fit --device x86: the x86-avx2 target, exact on every x86 CPU) "
                 "or run the FP32 variant (inference.precision: fp32)")


def check_quantization(quantization: dict | None, providers: list[str] | None, name: str,
                       advice: str = DEVICE_ADVICE) -> None:
    """Raise FeatureError naming `name` when this machine would compute the INT8 model described by `quantization`
    (a manifest's `variants.int8.quantization`, or export.onnx_export.INT8_TARGETS' settings plus `target`)
    differently from an exact integer machine. Nothing to check without a description (older bundles: their
    golden self-test still compares scores)."""
    if not quantization or "activation" not in quantization:
        return
    weight_max = 63 if quantization.get("reduce_range") else 127
    wanted = tuple(providers or ["CPUExecutionProvider"])
    if exact_products(quantization["activation"], weight_max, wanted):
        return
    target = quantization.get("target", "?")
    kind = "u8 x s8" if quantization["activation"] == "QUInt8" else "s8 x s8"
    raise FeatureError(
        f"{name}: INT8 model quantised for {target} ({kind}, {'7' if weight_max == 63 else '8'}-bit weights), but "
        f"onnxruntime on this machine ({', '.join(wanted)}) does not sum such products exactly (an x86 CPU without "
        "VNNI saturates their pair sums at 32767), so its features would not be those the bank and threshold "
        f"were made with. {advice}")
