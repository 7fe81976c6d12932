"""Preprocess: a validated RGB image -> the network's input tensor (region, canvas, tiles, normalisation).

This module is the one definition of preprocessing; the exporter imports it for fitting, so training and
inspection see identical pixels. Decoding untrusted bytes is `decode`'s job, cutting the frame into model
inputs is `geometry`'s.
"""
from __future__ import annotations

import numpy as np

from edge_runtime.geometry import Geometry, Placement, cut_tiles, match_colour, region_of, to_canvas

NORMALIZATION = {"normalize": "(rgb - 127) / 128, float32 (EfficientNet-Lite's native input)",
                 "layout": "NCHW, one batch row per tile"}


def to_tensor(tiles: np.ndarray) -> np.ndarray:
    """(n, H, W, 3) or (H, W, 3) uint8 RGB -> (n, 3, H, W) float32 with EfficientNet-Lite's native normalisation."""
    if tiles.ndim == 3:
        tiles = tiles[None]
    x = np.empty((tiles.shape[0], 3, tiles.shape[1], tiles.shape[2]), dtype=np.float32)
    # One pass per channel straight into the NCHW buffer: no float HWC intermediate to transpose and copy.
    for c in range(3):
        np.subtract(tiles[..., c], np.float32(127.0), out=x[:, c], dtype=np.float32)
    x *= np.float32(1.0 / 128.0)
    return x


def canvas_of(rgb: np.ndarray, geom: Geometry, name: str = "<frame>",
              threads: int = 2) -> tuple[np.ndarray, Placement, tuple[int, int]]:
    """RGB frame -> (the canvas the tiles are cut from, where the region sits on it, the region's (h, w)): what the
    model sees before tiling, and what frame quality is measured on. Raises ImageError. `threads`: the
    resample's thread budget (geometry.to_canvas)."""
    region = region_of(rgb, geom, name)
    canvas, place = to_canvas(match_colour(region, geom, name), geom, name, threads)
    return canvas, place, region.shape[:2]


def preprocess(rgb: np.ndarray, geom: Geometry, name: str = "<frame>",
               threads: int = 2) -> tuple[np.ndarray, Placement, tuple[int, int]]:
    """RGB frame -> (tile tensor, where the region sits on the canvas, the region's (h, w)). Raises ImageError."""
    canvas, place, region_hw = canvas_of(rgb, geom, name, threads)
    return to_tensor(cut_tiles(canvas, geom)), place, region_hw
