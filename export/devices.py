"""The device a bundle is for -> the INT8 quantisation target it needs (export/onnx_export.py INT8_TARGETS).

Torch-free, so `edge-export --help` stays fast. The device names are the station file's `device:` values
(edge_runtime.config.Device); a test keeps the two lists equal.
"""
from __future__ import annotations

# Generic x86 takes the AVX2-safe settings (reduce_range: no u8 x s8 saturation on any x86 CPU); x86-vnni is for
# CPUs with VNNI (Ice Lake+, Zen 4+, AVX-VNNI), where full-range weights are exact and more precise; every ARM
# board here (Cortex-A72/A76/A78AE) takes S8S8, onnxruntime's default where no such quirk applies.
DEVICE_INT8_TARGET: dict[str, str] = {
    "x86": "x86-avx2",
    "x86-vnni": "x86-vnni",
    "pi4": "arm",
    "pi5": "arm",
    "jetson-orin": "arm",
    "arm64": "arm",
}


def int8_target_for(device: str) -> str:
    """The INT8 target for a device name. Raises ValueError naming the known devices."""
    try:
        return DEVICE_INT8_TARGET[device]
    except KeyError:
        raise ValueError(f"unknown device {device!r}; known: {', '.join(DEVICE_INT8_TARGET)}") from None
