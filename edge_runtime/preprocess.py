"""Decode and preprocess: image bytes or array -> validated RGB uint8 -> the network's input tensor.

This module is the one definition of preprocessing; the exporter imports it for fitting, so training and
inspection see identical pixels.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

# Refuse decompression bombs before they exhaust a small board's memory.
MAX_PIXELS = 50_000_000
RESIZE_INTERPOLATION = "INTER_AREA"  # recorded in the manifest; pinned for fit and runtime alike


class ImageError(ValueError):
    """The frame cannot be inspected (corrupt, empty, wrong shape): reported as FAULT with this reason."""


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


def decode_image(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Encoded image file -> HxWx3 uint8 RGB. Raises ImageError naming `name` and the reason."""
    if not data:
        raise ImageError(f"{name}: empty file (0 bytes)")
    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        image = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        raise ImageError(f"{name}: cannot decode image ({exc.msg.strip() if hasattr(exc, 'msg') else exc})") from None
    if image is None:
        raise ImageError(f"{name}: not a decodable image (truncated, corrupt or unsupported format)")
    return to_rgb(image, name, assume_bgr=True)


def to_rgb(image: np.ndarray, name: str = "<frame>", assume_bgr: bool = True) -> np.ndarray:
    """Any camera/file array (gray, BGR, BGRA, 16-bit) -> HxWx3 uint8 RGB, or ImageError."""
    if not isinstance(image, np.ndarray) or image.size == 0:
        raise ImageError(f"{name}: empty frame")
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
        raise ImageError(f"{name}: unsupported shape {image.shape}; expected HxW, HxWx1, HxWx3 or HxWx4")
    h, w = image.shape[:2]
    if h < 8 or w < 8:
        raise ImageError(f"{name}: image {w}x{h} is too small (minimum 8x8)")
    if h * w > MAX_PIXELS:
        raise ImageError(f"{name}: image {w}x{h} exceeds the {MAX_PIXELS} pixel limit")
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        if image.dtype.kind == "f" and np.isfinite(image).all() and image.max() <= 1.0 and image.min() >= 0.0:
            image = np.round(image * 255).astype(np.uint8)
        else:
            raise ImageError(f"{name}: unsupported pixel type {image.dtype}; expected 8- or 16-bit")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB if assume_bgr else cv2.COLOR_RGBA2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB) if assume_bgr else np.ascontiguousarray(image)


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


def load_image(path) -> np.ndarray:
    """Read an image file to RGB uint8 (used by the exporter and tools; the daemon decodes frame bytes)."""
    with open(path, "rb") as fh:
        return decode_image(fh.read(), str(path))
