"""Scores and heat map: patch distances -> image score, anomaly map, normalised score, verdict.

THE score definition (pinned in every bundle manifest): each patch's score is the L2 distance of its
feature to the nearest memory-bank vector (k = 1); the image score is the largest patch score over every
tile; the heat map is each tile's patch grid bilinearly upsampled to the tile, stitched onto the canvas
(overlaps: maximum), Gaussian-smoothed (sigma 4 canvas px) and resampled to the inspected region's own size;
the normalised score is clip(0.5 * score / threshold, 0, 1), so 0.5 sits exactly at the threshold.
"""
from __future__ import annotations

import cv2
import numpy as np

from edge_runtime.geometry import Geometry, Placement, stitch, to_region
from edge_runtime.records import Verdict

SMOOTHING_SIGMA = 4.0
SMOOTHING_KSIZE = 2 * int(4 * SMOOTHING_SIGMA + 0.5) + 1  # 33: truncate the kernel at 4 sigma

SCORE_DEFINITION = {
    "patch_score": "L2 distance to the nearest memory-bank vector (k=1)",
    "image_score": "max over all patches of all tiles of the patch score (before smoothing)",
    "anomaly_map": "per tile: patch grid -> cv2.resize INTER_LINEAR to the tile; stitched on the canvas "
                   f"(overlaps: max) -> GaussianBlur sigma {SMOOTHING_SIGMA}, ksize {SMOOTHING_KSIZE}, "
                   "BORDER_REFLECT -> cv2.resize INTER_LINEAR to the region's size",
    "normalized_score": "clip(0.5 * score / threshold, 0, 1)",
    "decision": "NG when score >= threshold; REVIEW when review_threshold <= score < threshold; else OK",
}


def image_score(patch_scores: np.ndarray) -> float:
    return float(np.max(patch_scores))


def anomaly_map(patch_scores: np.ndarray, geom: Geometry, place: Placement | None = None,
                region_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Patch scores (n_tiles * rows * cols,) -> heat map of the region ((h, w) float32), or of the canvas."""
    rows, cols = geom.grid()
    tw, th = geom.input_size
    grids = patch_scores.reshape(geom.n_tiles, rows, cols).astype(np.float32)
    tiles = np.stack([cv2.resize(g, (tw, th), interpolation=cv2.INTER_LINEAR) for g in grids])
    canvas = cv2.GaussianBlur(stitch(tiles, geom), (SMOOTHING_KSIZE, SMOOTHING_KSIZE), SMOOTHING_SIGMA,
                              borderType=cv2.BORDER_REFLECT)
    if place is None or region_hw is None:
        return canvas
    return to_region(canvas, place, region_hw)


def normalized_score(score: float, threshold: float) -> float:
    return float(np.clip(0.5 * score / threshold, 0.0, 1.0))


def decide(score: float, threshold: float, review_threshold: float | None = None) -> Verdict:
    """OK, REVIEW or NG. NaN compares false with everything, so it must land on NG, never OK."""
    if not score < threshold:
        return Verdict.NG
    if review_threshold is not None and not score < review_threshold:
        return Verdict.REVIEW
    return Verdict.OK
