"""Whether onnxruntime on this machine multiplies an INT8 model's types exactly.

An INT8 bundle's bank and threshold were made from the features its model computed on the fitting machine, so
the device must compute the same integers. It does not always: an x86 CPU without VNNI multiplies u8 x s8 with
vpmaddubsw, whose 16-bit sums of product pairs saturate at 32,767. A model quantised with full 8-bit weights
(INT8 target x86-vnni) then computes other features there: measured with qemu's Haswell CPU model (AVX2, no
AVX-512 or VNNI), bottle patch features 62% off in L2 (`benchmarks/int8_kernels.py`), every part scored wrong.
reduce_range (7-bit weights, the x86-avx2 target) keeps every pair sum below 32,767, and s8 x s8 (the arm target)
is exact there as well: both were measured identical to the VNNI machine's.

The question is asked of onnxruntime itself, not of CPU flags: a one-convolution QDQ graph of the bundle's
activation type and weight range, with every product at its largest, run on the station's providers. Whatever
kernel this onnxruntime picks on this CPU (or GPU), a saturating one gets the sum wrong.
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


def build_probe(activation: str) -> bytes:
    """The probe model for one activation type (needs the onnx package: tests and regeneration only; the device
    runs the serialised copy in PROBES). Input x; outputs y127 and y63, one QDQ 1 x 1 convolution each."""
    from onnx import TensorProto, helper, numpy_helper

    dtype, _, scales = _setup(activation)
    inits = [numpy_helper.from_array(np.array(1.0, np.float32), "x_scale"),
             numpy_helper.from_array(np.array(0, dtype), "zero"),
             numpy_helper.from_array(np.array([1.0], np.float32), "w_scale"),
             numpy_helper.from_array(np.array([0], np.int8), "w_zero")]
    nodes = [helper.make_node("DequantizeLinear", ["x", "x_scale", "zero"], ["xf"])]
    for w, scale in scales.items():
        inits += [numpy_helper.from_array(np.full((1, CHANNELS, 1, 1), w, np.int8), f"w{w}"),
                  numpy_helper.from_array(np.array(scale, np.float32), f"y{w}_scale")]
        nodes += [helper.make_node("DequantizeLinear", [f"w{w}", "w_scale", "w_zero"], [f"w{w}f"], axis=0),
                  helper.make_node("Conv", ["xf", f"w{w}f"], [f"y{w}f"]),
                  helper.make_node("QuantizeLinear", [f"y{w}f", f"y{w}_scale", "zero"], [f"y{w}q"]),
                  helper.make_node("DequantizeLinear", [f"y{w}q", f"y{w}_scale", "zero"], [f"y{w}"])]
    x_type = TensorProto.UINT8 if dtype == np.uint8 else TensorProto.INT8
    graph = helper.make_graph(nodes, "int8_probe", [helper.make_tensor_value_info("x", x_type, [1, CHANNELS, GRID, GRID])],
                              [helper.make_tensor_value_info(f"y{w}", TensorProto.FLOAT, [1, 1, GRID, GRID])
                               for w in WEIGHTS], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edge_runtime")
    model.ir_version = 9   # onnxruntime builds older than onnx's newest IR
    return model.SerializeToString()


def probes_literal() -> str:
    """The PROBES assignment for this file, made with the onnx package."""
    out = ["PROBES = {"]
    for activation in ("QUInt8", "QInt8"):
        text = base64.b64encode(build_probe(activation)).decode()
        out += [f'    "{activation}": ('] + [f'        "{text[i:i + 96]}"' for i in range(0, len(text), 96)] + ["    ),"]
    return "\n".join(out + ["}"])


# The probe models as build_probe makes them (tests/runtime/test_int8_kernels.py checks that they still are;
# regenerate with: python -c "from edge_runtime.int8_kernels import probes_literal; print(probes_literal())").
PROBES = {
    "QUInt8": (
        "CAkSDGVkZ2VfcnVudGltZTqcBgooCgF4Cgd4X3NjYWxlCgR6ZXJvEgJ4ZiIQRGVxdWFudGl6ZUxpbmVhcgo9CgR3MTI3Cgd3"
        "X3NjYWxlCgZ3X3plcm8SBXcxMjdmIhBEZXF1YW50aXplTGluZWFyKgsKBGF4aXMYAKABAgoYCgJ4ZgoFdzEyN2YSBXkxMjdm"
        "IgRDb252CjAKBXkxMjdmCgp5MTI3X3NjYWxlCgR6ZXJvEgV5MTI3cSIOUXVhbnRpemVMaW5lYXIKMQoFeTEyN3EKCnkxMjdf"
        "c2NhbGUKBHplcm8SBHkxMjciEERlcXVhbnRpemVMaW5lYXIKOwoDdzYzCgd3X3NjYWxlCgZ3X3plcm8SBHc2M2YiEERlcXVh"
        "bnRpemVMaW5lYXIqCwoEYXhpcxgAoAECChYKAnhmCgR3NjNmEgR5NjNmIgRDb252Ci0KBHk2M2YKCXk2M19zY2FsZQoEemVy"
        "bxIEeTYzcSIOUXVhbnRpemVMaW5lYXIKLgoEeTYzcQoJeTYzX3NjYWxlCgR6ZXJvEgN5NjMiEERlcXVhbnRpemVMaW5lYXIS"
        "CmludDhfcHJvYmUqERABQgd4X3NjYWxlSgQAAIA/KgsQAkIEemVyb0oBACoTCAEQAUIHd19zY2FsZUoEAACAPyoPCAEQA0IG"
        "d196ZXJvSgEAKlIIAQhACAEIARADQgR3MTI3SkB/f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/"
        "f39/f39/f39/f39/f39/f39/f39/KhQQAUIKeTEyN19zY2FsZUoEAAAARipRCAEIQAgBCAEQA0IDdzYzSkA/Pz8/Pz8/Pz8/"
        "Pz8/Pz8/Pz8/Pz8/Pz8/Pz8/Pz8/Pz8/Pz8/Pz8/Pz8/Pz8/Pz8/Pz8/Pz8/Pz8/Pz8/Pz8/KhMQAUIJeTYzX3NjYWxlSgQA"
        "AIBFWhsKAXgSFgoUCAISEAoCCAEKAghACgIICAoCCAhiHgoEeTEyNxIWChQIARIQCgIIAQoCCAEKAggICgIICGIdCgN5NjMS"
        "FgoUCAESEAoCCAEKAggBCgIICAoCCAhCBAoAEBE="
    ),
    "QInt8": (
        "CAkSDGVkZ2VfcnVudGltZTqcBgooCgF4Cgd4X3NjYWxlCgR6ZXJvEgJ4ZiIQRGVxdWFudGl6ZUxpbmVhcgo9CgR3MTI3Cgd3"
        "X3NjYWxlCgZ3X3plcm8SBXcxMjdmIhBEZXF1YW50aXplTGluZWFyKgsKBGF4aXMYAKABAgoYCgJ4ZgoFdzEyN2YSBXkxMjdm"
        "IgRDb252CjAKBXkxMjdmCgp5MTI3X3NjYWxlCgR6ZXJvEgV5MTI3cSIOUXVhbnRpemVMaW5lYXIKMQoFeTEyN3EKCnkxMjdf"
        "c2NhbGUKBHplcm8SBHkxMjciEERlcXVhbnRpemVMaW5lYXIKOwoDdzYzCgd3X3NjYWxlCgZ3X3plcm8SBHc2M2YiEERlcXVh"
        "bnRpemVMaW5lYXIqCwoEYXhpcxgAoAECChYKAnhmCgR3NjNmEgR5NjNmIgRDb252Ci0KBHk2M2YKCXk2M19zY2FsZQoEemVy"
        "bxIEeTYzcSIOUXVhbnRpemVMaW5lYXIKLgoEeTYzcQoJeTYzX3NjYWxlCgR6ZXJvEgN5NjMiEERlcXVhbnRpemVMaW5lYXIS"
        "CmludDhfcHJvYmUqERABQgd4X3NjYWxlSgQAAIA/KgsQA0IEemVyb0oBACoTCAEQAUIHd19zY2FsZUoEAACAPyoPCAEQA0IG"
        "d196ZXJvSgEAKlIIAQhACAEIARADQgR3MTI3SkB/f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/f39/"
        "f39/f39/f39/f39/f39/f39/f39/KhQQAUIKeTEyN19zY2FsZUoEAAAARipRCAEIQAgBCAEQA0IDdzYzSkA/Pz8/Pz8/Pz8/"
        "Pz8/Pz8/Pz8/Pz8/Pz8/Pz8/Pz8/Pz8/Pz8/Pz8/Pz8/Pz8/Pz8/Pz8/Pz8/Pz8/Pz8/Pz8/KhMQAUIJeTYzX3NjYWxlSgQA"
        "AIBFWhsKAXgSFgoUCAMSEAoCCAEKAghACgIICAoCCAhiHgoEeTEyNxIWChQIARIQCgIIAQoCCAEKAggICgIICGIdCgN5NjMS"
        "FgoUCAESEAoCCAEKAggBCgIICAoCCAhCBAoAEBE="
    ),
}


@functools.lru_cache(maxsize=None)
def exact_products(activation: str, weight_max: int, providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> bool:
    """True when a QDQ convolution of `activation` ("QUInt8" or "QInt8") inputs at their largest value and int8
    weights of `weight_max` (127, or 63 with reduce_range) returns the exact sum here. Raises FeatureError when
    onnxruntime cannot run it."""
    dtype, top, scales = _setup(activation)
    if weight_max not in scales:
        raise FeatureError(f"no INT8 probe for weights up to {weight_max} (have {', '.join(map(str, WEIGHTS))})")
    session = make_session(base64.b64decode(PROBES[activation]), 1, list(providers), name="<INT8 exactness probe>")
    try:
        got = session.run([f"y{weight_max}"], {"x": np.full((1, CHANNELS, GRID, GRID), top, dtype)})[0]
    except Exception as exc:  # onnxruntime's own exception types
        raise FeatureError(f"<INT8 exactness probe>: onnxruntime cannot run it ({exc})") from None
    scale = scales[weight_max]
    return bool(np.all(got == np.float32(scale * np.round(CHANNELS * top * weight_max / scale))))


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
        "VNNI saturates u8 x s8 pair sums at 32767), so its features would not be those the bank and threshold "
        f"were made with. {advice}")
