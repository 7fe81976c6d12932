"""Preprocess: a validated RGB image -> the network's input tensor (crop, resize, normalise).

This module is the one definition of preprocessing; the exporter imports it for fitting, so training and
inspection see identical pixels. Decoding untrusted bytes is `decode`'s job.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from edge_runtime.decode import MAX_PIXELS, ImageError, decode_image, load_image, to_rgb  # noqa: F401  (re-exported)

RESIZE_INTERPOLATION = "INTER_AREA"  # recorded in the manifest; pinned for fit and runtime alike


@dataclass(frozen=True)
class Preprocessing:
    image_size: int                         # square network input, pixels
    roi: tuple[int, int, int, int] | None = None  # x, y, w, h crop applied before resizing

    def to_manifest(self) -> dict:
        return {
            "image_size": self.image_size,
            "roi": list(self.roi) if self.roi else None,
            "decode": "cv2.imdecode IMREAD_UNCHANGED; 16-bit scaled to 8-bit; gray and BGRA converted to RGB",
            "resize": f"cv2.resize to image_size x image_size, cv2.{RESIZE_INTERPOLATION}",
            "normalize": "(rgb - 127) / 128, float32",
            "layout": "NCHW, batch 1",
        }


def crop_roi(rgb: np.ndarray, roi: tuple[int, int, int, int] | None, name: str = "<frame>") -> np.ndarray:
    if roi is None:
        return rgb
    x, y, w, h = roi
    H, W = rgb.shape[:2]
    if x + w > W or y + h > H:
        raise ImageError(f"{name}: region of interest {roi} lies outside the {W}x{H} frame")
    return rgb[y:y + h, x:x + w]


def resize_square(rgb: np.ndarray, size: int) -> np.ndarray:
    return cv2.resize(rgb, (size, size), interpolation=getattr(cv2, RESIZE_INTERPOLATION))


def to_tensor(rgb_square: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 RGB -> 1x3xHxW float32 with EfficientNet-Lite's native normalisation."""
    x = (rgb_square.astype(np.float32) - 127.0) / 128.0
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def preprocess(rgb: np.ndarray, prep: Preprocessing, name: str = "<frame>") -> np.ndarray:
    return to_tensor(resize_square(crop_roi(rgb, prep.roi, name), prep.image_size))


