"""Torch feature graph -> ONNX FP32 (opset 17, static input size) -> ONNX INT8 (static QDQ quantisation)."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from export.patch_features import PatchFeatures

OPSET = 17

# onnxruntime static quantisation settings per deployment target. Without VNNI, u8 x s8 products can
# saturate the 16-bit intermediate of AVX2 kernels: reduce_range (7-bit weights) avoids that.
INT8_TARGETS: dict[str, dict] = {
    "x86-avx2": {"activation": "QUInt8", "weight": "QInt8", "reduce_range": True, "per_channel": True},
    "x86-vnni": {"activation": "QUInt8", "weight": "QInt8", "reduce_range": False, "per_channel": True},
    "arm": {"activation": "QUInt8", "weight": "QInt8", "reduce_range": False, "per_channel": True},
}


def export_fp32(model: PatchFeatures, image_size: int, path: Path) -> dict:
    dummy = torch.zeros(1, 3, image_size, image_size)
    torch.onnx.export(model, (dummy,), str(path), opset_version=OPSET, dynamo=False,
                      input_names=["image"], output_names=["patch_features"], do_constant_folding=True)
    return {"opset": OPSET, "input": {"name": "image", "shape": [1, 3, image_size, image_size], "dynamic": False},
            "output": {"name": "patch_features", "shape": [1, model.grid(image_size)[0] * model.grid(image_size)[1], model.dim]},
            "exporter": f"torch.onnx.export legacy (dynamo=False), torch {torch.__version__}"}


def quantize_int8(fp32_path: Path, out_path: Path, calibration: Iterable[np.ndarray], target: str = "x86-avx2") -> dict:
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quant_pre_process, quantize_static)

    if target not in INT8_TARGETS:
        raise ValueError(f"unknown INT8 target {target!r}; choose one of {sorted(INT8_TARGETS)}")
    settings = INT8_TARGETS[target]
    tensors = list(calibration)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter({"image": t} for t in tensors)

        def get_next(self):
            return next(self.it, None)

    with tempfile.TemporaryDirectory() as tmp:
        prepped = Path(tmp) / "prepped.onnx"
        quant_pre_process(str(fp32_path), str(prepped))
        quantize_static(str(prepped), str(out_path), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=settings["per_channel"], reduce_range=settings["reduce_range"],
                        activation_type=getattr(QuantType, settings["activation"]),
                        weight_type=getattr(QuantType, settings["weight"]),
                        calibrate_method=CalibrationMethod.MinMax)
    return {"target": target, "format": "QDQ", "calibration": "MinMax", "calibration_images": len(tensors), **settings}
