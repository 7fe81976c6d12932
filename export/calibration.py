"""OK/NG threshold calibration from held-out good images and, when given, a few defective ones."""
from __future__ import annotations

import numpy as np


def score_stats(scores: np.ndarray) -> dict | None:
    if len(scores) == 0:
        return None
    q = np.percentile(scores, [50, 95, 99])
    return {"n": int(len(scores)), "min": float(scores.min()), "mean": float(scores.mean()), "std": float(scores.std()),
            "p50": float(q[0]), "p95": float(q[1]), "p99": float(q[2]), "max": float(scores.max())}


def calibrate_threshold(good: np.ndarray, defects: np.ndarray, target_false_reject: float = 0.01) -> tuple[float, dict]:
    """Threshold (NG when score >= threshold) and a record of how it was chosen.

    Good images only: the (1 - target) quantile of held-out good scores, taken as the next observed score at
    or above it, so with n images the false-reject rate cannot be estimated below 1/(n+1).
    With defects: the operating point that lets no calibration defect through at the lowest false-reject
    rate, i.e. anywhere in (largest good score below the smallest defect score, smallest defect score];
    we take the middle of that interval so neither side sits on the edge.
    """
    good = np.sort(np.asarray(good, dtype=np.float64))
    defects = np.asarray(defects, dtype=np.float64)
    if len(good) == 0:
        raise ValueError("threshold calibration needs at least one held-out good image")
    info: dict = {"target_false_reject": target_false_reject, "good_scores": score_stats(good),
                  "defect_scores": score_stats(defects)}
    if len(defects) == 0:
        q = float(np.quantile(good, 1.0 - target_false_reject, method="higher"))
        # Nudge just above the quantile score so that image itself passes (NG is score >= threshold).
        threshold = float(np.nextafter(np.float32(q), np.float32(np.inf)))
        info.update(method=f"good-only: {1 - target_false_reject:.3f} quantile of {len(good)} held-out good scores",
                    min_estimable_false_reject=1.0 / (len(good) + 1))
    else:
        lowest_defect = float(defects.min())
        below = good[good < lowest_defect]
        upper = lowest_defect
        lower = float(below.max()) if len(below) else 0.0
        threshold = 0.5 * (lower + upper)
        info.update(method="no calibration defect passes, lowest false-reject rate (midpoint of the feasible interval)",
                    feasible_interval=[lower, upper])
    info["calibration_false_reject_rate"] = float(np.mean(good >= threshold))
    info["calibration_escapes"] = int(np.sum(defects < threshold)) if len(defects) else 0
    return threshold, info
