"""Scores and heat map: patch distances -> image score, anomaly map, normalised score.

THE score definition (pinned in every bundle manifest): each patch's score is the L2 distance of its
feature to the nearest memory-bank vector (k = 1); the image score is the largest patch score; the heat map
is the patch-score grid bilinearly upsampled to the network input and Gaussian-smoothed (sigma 4 px);
the normalised score is clip(0.5 * score / threshold, 0, 1), so 0.5 sits exactly at the threshold.
"""
from __future__ import annotations

import cv2
import numpy as np

SMOOTHING_SIGMA = 4.0
SMOOTHING_KSIZE = 2 * int(4 * SMOOTHING_SIGMA + 0.5) + 1  # 33: truncate the kernel at 4 sigma

SCORE_DEFINITION = {
    "patch_score": "L2 distance to the nearest memory-bank vector (k=1)",
    "image_score": "max over patches of the patch score (before smoothing)",
    "anomaly_map": f"patch grid -> cv2.resize INTER_LINEAR to image_size -> GaussianBlur sigma {SMOOTHING_SIGMA}, "
                   f"ksize {SMOOTHING_KSIZE}, BORDER_REFLECT",
    "normalized_score": "clip(0.5 * score / threshold, 0, 1)",
    "decision": "NG when score >= threshold",
}


def image_score(patch_scores: np.ndarray) -> float:
    return float(np.max(patch_scores))


def anomaly_map(patch_scores: np.ndarray, grid: tuple[int, int], out_size: int) -> np.ndarray:
    """Patch scores (h*w,) -> out_size x out_size float32 heat map."""
    g = patch_scores.reshape(grid).astype(np.float32)
    up = cv2.resize(g, (out_size, out_size), interpolation=cv2.INTER_LINEAR)
    return cv2.GaussianBlur(up, (SMOOTHING_KSIZE, SMOOTHING_KSIZE), SMOOTHING_SIGMA, borderType=cv2.BORDER_REFLECT)


def normalized_score(score: float, threshold: float) -> float:
    return float(np.clip(0.5 * score / threshold, 0.0, 1.0))
