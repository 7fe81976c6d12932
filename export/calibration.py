"""The operating point: OK / REVIEW / NG thresholds from every good image, with an honest false-reject estimate.

Input: one cross-fitted score per good training image (scored against a bank built without it, so the scores
are what a new good part would get) and, optionally, scores of a few calibration defects.

- The tail of the good scores is modelled by peaks over a threshold: the top ~20% of scores, less their
  smallest, follow a generalised Pareto distribution (fitted by probability-weighted moments, Hosking & Wallis
  1987). An image score is a maximum over patches, the setting in which that tail model holds, and it lets a
  target false-reject rate below 1/n be reached without pretending the sample maximum is the 1/n quantile.
- The threshold is the modelled (1 - target) quantile, never below the bank's own scores.
- With calibration defects: when the lowest defect already scores above it, the threshold stays and the margin
  (lowest defect / threshold - 1) is reported; otherwise the threshold drops to `defect_margin` below the lowest
  defect (the zero-escape point), and the false-reject rate that costs is reported.
- Uncertainty: a bootstrap interval of the modelled false-reject rate at the chosen threshold (widened by the
  spread of the thresholds the resamples themselves choose, when the good scores chose it), and the empirical
  cross-fitted rate with its Wilson interval.
"""
from __future__ import annotations

import math

import numpy as np

# With calibration defects: the most good parts the zero-escape point may reject (modelled) as the NG threshold;
# above it NG stays at this rate and the zero-escape point is a REVIEW band's lower edge (--max-frr).
DEFAULT_MAX_FALSE_REJECT = 0.05
XI_BOUNDS = (-0.5, 0.5)   # beyond these, 20-60 exceedances cannot tell a shape apart from noise
# Below this many good scores the tail model rests on fewer than ten exceedances (TailModel's minimum): its
# threshold is an extrapolation the data cannot check, so the reported interval takes the assumption-free
# binomial one as its upper end and the fit says so.
MIN_GOOD_FOR_TAIL = 30
# Below this many good images the tail model's false-reject figure is rough, whatever its interval says: 50
# magnetic-tile images predicted 0.50% (CI 0-3.7%), 10 of 238 held-out good images (4.2%) were rejected.
STABLE_TAIL_GOOD = 100
# A threshold this far above the highest good score is the tail model's extrapolation more than the data's.
EXTRAPOLATION_WARN = 1.15
# A threshold that drops by more than this when the highest good score is left out rests on that one image.
# Leaving the highest score out lowered it 4.2% on bottle (209 images) and 1.6% on magnetic tile (714); 150-image
# subsets of bottle's scores at most 8.8%, 100-image ones at most 12.9% (2,000 draws each); a 150-image
# magnetic-tile fit 11.6% (one image at 46.8, the next 39.7). Below STABLE_TAIL_GOOD images every threshold warns.
INFLUENCE_WARN = 0.10          # from 150 good images
INFLUENCE_WARN_FEW = 0.15      # 100-149


def score_stats(scores: np.ndarray) -> dict | None:
    scores = np.asarray(scores, dtype=np.float64)
    if len(scores) == 0:
        return None
    q = np.percentile(scores, [50, 95, 99])
    return {"n": int(len(scores)), "min": float(scores.min()), "mean": float(scores.mean()), "std": float(scores.std()),
            "p50": float(q[0]), "p95": float(q[1]), "p99": float(q[2]), "max": float(scores.max())}


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial rate k / n (sensible at k = 0, unlike the normal approximation)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


class TailModel:
    """Empirical body + generalised Pareto tail of a score sample; P(score >= t) and its inverse."""

    def __init__(self, scores: np.ndarray, tail_fraction: float = 0.2, min_exceedances: int = 10):
        s = np.sort(np.asarray(scores, dtype=np.float64))
        if len(s) < 2:
            raise ValueError("the tail model needs at least 2 good scores")
        self.scores = s
        n = len(s)
        k = min(n - 1, max(min_exceedances, int(round(tail_fraction * n))))
        self.u = float(s[n - k - 1])               # the tail starts above the (k+1)-th largest score
        self.zeta = k / n                          # P(score > u)
        y = s[n - k:] - self.u
        self.xi, self.sigma = _gpd_pwm(y)

    def survival(self, t: float) -> float:
        """Modelled P(score >= t) for a good part."""
        if t <= self.u:
            return float(np.mean(self.scores >= t))
        z = t - self.u
        if abs(self.xi) < 1e-9:
            tail = math.exp(-z / self.sigma)
        else:
            base = 1 + self.xi * z / self.sigma
            tail = 0.0 if base <= 0 else base ** (-1 / self.xi)
        return self.zeta * tail

    def quantile(self, rate: float) -> float:
        """Score t with modelled P(score >= t) = rate."""
        if rate >= self.zeta:
            return float(np.quantile(self.scores, 1 - rate, method="higher"))
        r = rate / self.zeta
        if abs(self.xi) < 1e-9:
            return self.u - self.sigma * math.log(r)
        if self.xi < 0:  # bounded tail: never beyond its end point
            r = max(r, 1e-12)
        return self.u + self.sigma / self.xi * (r ** (-self.xi) - 1)

    def to_dict(self) -> dict:
        return {"model": "generalised Pareto above u (probability-weighted moments)", "u": self.u,
                "exceedance_fraction": self.zeta, "xi": self.xi, "sigma": self.sigma, "n": int(len(self.scores))}


def _gpd_pwm(y: np.ndarray) -> tuple[float, float]:
    """(xi, sigma) of a generalised Pareto sample y >= 0 by probability-weighted moments, xi clamped."""
    y = np.sort(y)
    n = len(y)
    a0 = float(y.mean())
    if n < 2 or a0 <= 0:
        return 0.0, max(a0, 1e-9)
    a1 = float(np.sum((n - np.arange(1, n + 1)) / (n - 1) * y) / n)
    kappa = a0 / (a0 - 2 * a1) - 2 if a0 != 2 * a1 else 0.0
    xi = float(np.clip(-kappa, *XI_BOUNDS))
    # sigma from the mean of a GPD, E[y] = sigma / (1 - xi), consistent with the clamped shape
    return xi, max(a0 * (1 - xi), 1e-9)


def false_reject_interval(scores: np.ndarray, threshold: float, n_boot: int = 400, seed: int = 0,
                          tail: TailModel | None = None, chosen_at: float | None = None) -> dict:
    """Modelled and empirical false-reject rate at `threshold`, each with a 95% interval (`tail`: the model of
    `scores` when the caller has it already).

    `chosen_at`: the threshold is these scores' own modelled quantile at this rate, so the rate it really gives
    varies with the sample that chose it, not only with the model's fit at a fixed point. The interval then also
    holds the bootstrap's answer to that: each resample chooses its threshold the same way, and the original
    model says what rate that threshold gives (the sample standing in for the truth). On simulated scores
    (Gumbel, lognormal, normal; 60 and 209 good images, target 0.5%) the fixed-point interval alone held the true
    rate in 80-91% of draws."""
    scores = np.asarray(scores, dtype=np.float64)
    tail = tail or TailModel(scores)
    rng = np.random.default_rng(seed)
    boot, chosen = [], []
    for _ in range(n_boot):
        model = TailModel(rng.choice(scores, len(scores), replace=True))
        boot.append(model.survival(threshold))
        if chosen_at is not None:
            chosen.append(tail.survival(model.quantile(chosen_at)))
    k = int(np.sum(scores >= threshold))
    lo, hi = np.percentile(boot, [2.5, 97.5])
    if chosen:
        c_lo, c_hi = np.percentile(chosen, [2.5, 97.5])
        lo, hi = min(lo, c_lo), max(hi, c_hi)
    if len(scores) < MIN_GOOD_FOR_TAIL:   # a bootstrap of a handful of scores is as narrow as it is wrong
        hi = max(float(hi), wilson_interval(k, len(scores))[1])
    return {"modelled": tail.survival(threshold), "modelled_ci95": [float(lo), float(hi)],
            "empirical": k / len(scores), "empirical_count": k, "n": int(len(scores)),
            "empirical_ci95": list(wilson_interval(k, len(scores)))}


def _above(value: float) -> float:
    """The smallest float32 above `value`: NG is score >= threshold, so a score equal to `value` passes."""
    return float(np.nextafter(np.float32(value), np.float32(np.inf)))


# A good image whose cross-fitted score is this far out (robust z: median and 1.4826 x MAD) and this far above the
# threshold the other good images give looks like a defect or another product slipped in among the good images.
# Clean sets stay under both: the highest robust z was 9.3 on bottle (209 images) and 10.6 on magnetic tile (714),
# each within 1.17 x the threshold; 6 defects slipped among bottle's good images scored z 14-31, 1.4-2.2 x.
OUTLIER_Z = 12.0
OUTLIER_RATIO = 1.25
OUTLIER_CORE_Z = 8.0   # the scores the reference threshold comes from


def score_outliers(good: np.ndarray, target_false_reject: float) -> np.ndarray:
    """Mask of the good images whose cross-fitted scores stand out as above (OUTLIER_Z and OUTLIER_RATIO).

    The threshold they are compared with comes from the core of the scores (robust z <= OUTLIER_CORE_Z), and the
    test is repeated on what is left until nothing more stands out: slipped images just under the z cut had raised
    "the rest's" threshold and hidden the others under the ratio (15 defects slipped into bottle: one pass named 8,
    the threshold stayed at 37.7 and 28 of 48 defects passed)."""
    good = np.asarray(good, dtype=np.float64)
    keep = np.ones(len(good), dtype=bool)
    if len(good) < MIN_GOOD_FOR_TAIL:
        return ~keep
    while keep.sum() >= MIN_GOOD_FOR_TAIL:
        med = float(np.median(good[keep]))
        mad = 1.4826 * float(np.median(np.abs(good[keep] - med)))
        if mad <= 0:
            break
        z = (good - med) / mad
        core = keep & (z <= OUTLIER_CORE_Z)
        reference = TailModel(good[core]).quantile(target_false_reject)
        out = keep & (z > OUTLIER_Z) & (good > OUTLIER_RATIO * reference)
        if not out.any():
            break
        keep &= ~out
    return ~keep


def operating_point(good: np.ndarray, defects: np.ndarray | None = None, target_false_reject: float = 0.005,
                    review_false_reject: float | None = None, bank_scores: np.ndarray | None = None,
                    defect_margin: float = 0.05, seed: int = 0,
                    names: list[str] | None = None,
                    max_false_reject: float | None = DEFAULT_MAX_FALSE_REJECT) -> tuple[float, float | None, dict]:
    """(threshold, review_threshold or None, a record of how they were chosen and what they are expected to do).

    good: cross-fitted scores of good images; defects: calibration defect scores; bank_scores: scores of images
    whose patches are in the shipped bank, scored against it (the threshold is never at or below them); names:
    the good images' names, in the order of `good`, for the warnings. max_false_reject: the most good parts the
    zero-escape point may reject (modelled); beyond it the NG threshold stays at that rate and the zero-escape
    point becomes the lower edge of a REVIEW band (None: no limit).
    """
    good = np.asarray(good, dtype=np.float64)
    defects = np.asarray(defects if defects is not None else [], dtype=np.float64)
    if len(good) < 2:
        raise ValueError("the operating point needs at least 2 cross-fitted good scores")
    if not 0 < target_false_reject < 1:
        raise ValueError(f"target false-reject rate must be in (0, 1), got {target_false_reject}")
    tail = TailModel(good)
    t_frr = tail.quantile(target_false_reject)
    info: dict = {"target_false_reject": target_false_reject, "good_scores": score_stats(good),
                  "defect_scores": score_stats(defects), "tail": tail.to_dict(),
                  "threshold_at_target": t_frr}
    threshold = t_frr
    defect_review = None   # the zero-escape point, when it is too costly as the NG threshold
    warnings = []
    method = (f"good-only: modelled {1 - target_false_reject:.4f} quantile of {len(good)} cross-fitted good scores")
    if len(defects):
        d_min = float(defects.min())
        zero = d_min * (1 - defect_margin)
        cost = tail.survival(zero)
        if t_frr < d_min:
            method += "; every calibration defect scores above it"
        elif max_false_reject is None or cost <= max(max_false_reject, target_false_reject):
            threshold = zero   # (a --max-frr below --target-frr counts as the target)
            method = (f"zero-escape: {defect_margin:.0%} below the lowest of {len(defects)} calibration defects "
                      f"(the {1 - target_false_reject:.4f} good quantile {t_frr:.4f} would let defects through)")
        else:
            # Probe 34: on parts whose defects overlap the good ones, the zero-escape point rejected 24% and 94% of
            # good parts, shipped with exit 0 and no warning. NG stays at the most a line can throw away; the
            # defects below it go to a person (REVIEW is never OK; a line without a REVIEW output counts it NG).
            max_false_reject = max(max_false_reject, target_false_reject)
            threshold = max(tail.quantile(max_false_reject), zero)
            defect_review = zero
            method = (f"capped: the zero-escape point {zero:.4f} ({defect_margin:.0%} below the lowest of "
                      f"{len(defects)} calibration defects) would reject {cost:.1%} of good parts (modelled), over "
                      f"--max-frr {max_false_reject:.1%}: NG from the modelled {1 - max_false_reject:.4f} good "
                      f"quantile, REVIEW from the zero-escape point")
            warnings.append(
                f"the calibration defects overlap the good parts: a threshold that stops every one of them "
                f"({zero:.4f}) rejects about {cost:.1%} of good parts. Shipped: NG from {threshold:.4f} (about "
                f"{max_false_reject:.1%} of good parts) and a REVIEW band from {zero:.4f}, so no calibration defect "
                f"is OK and about {cost:.1%} of good parts are REVIEW or NG; a line without a REVIEW output (GPIO, coil "
                "or token) treats REVIEW as NG. Fit on more good images, an --roi on the part or a finer geometry "
                "to separate them, or accept the rate with --max-frr")
        info["lowest_defect"] = d_min
        info["zero_escape_point"] = {"threshold": zero, "modelled_false_reject": cost}
    if bank_scores is not None and len(bank_scores):
        floor = float(np.max(bank_scores))
        info["bank_scores_max"] = floor
        if threshold <= floor:
            threshold = floor
            method += f"; raised to the highest score of an image in the bank ({floor:.4f})"
    threshold = _above(threshold)

    review = None
    if defect_review is not None and defect_review < threshold:
        review = float(defect_review)
        info["review_band"] = {"source": "calibration defects: the zero-escape point (--max-frr)",
                               "review_threshold": review,
                               "expected_review_or_ng": false_reject_interval(good, review, seed=seed, tail=tail)}
    if review_false_reject is not None:
        r = tail.quantile(review_false_reject)
        if r < threshold and (review is None or r < review):
            review = float(r)
            info["review_band"] = {"target_review_rate": review_false_reject, "review_threshold": review,
                                   "expected_review_or_ng": false_reject_interval(good, review, seed=seed, tail=tail,
                                                                                 chosen_at=review_false_reject)}
        elif review is None:   # (a lower band from the calibration defects stands as it is)
            note = (f"no REVIEW band: the good parts' modelled {1 - review_false_reject:.4f} quantile {r:.4f} (review "
                    f"rate {review_false_reject:.2%}) is not below the threshold {threshold:.4f}"
                    + (" (the zero-escape point)" if len(defects) and threshold < t_frr else "")
                    + ": ask for a larger review rate, or no band")
            info["review_band"] = {"target_review_rate": review_false_reject, "review_threshold": None, "note": note}
    if len(defects):  # after every adjustment: what the shipped thresholds do to the calibration defects
        info["defect_margin"] = float(defects.min()) / threshold - 1
        info["calibration_escapes"] = int(np.sum(defects < (review if review is not None else threshold)))
        if review is not None:
            info["calibration_review"] = int(np.sum((defects >= review) & (defects < threshold)))
    info["method"] = method
    chosen_at = target_false_reject if threshold == _above(t_frr) else None   # not moved by defects or the bank
    if defect_review is not None and threshold == _above(tail.quantile(max_false_reject)):
        chosen_at = max_false_reject   # the capped NG threshold is the good scores' own quantile too
    info["expected_false_reject"] = false_reject_interval(good, threshold, seed=seed, tail=tail, chosen_at=chosen_at)
    if len(good) < MIN_GOOD_FOR_TAIL:
        warnings.append(f"only {len(good)} good images: the threshold is extrapolated from too few scores to check "
                        f"it ({threshold / float(good.max()):.2f}x the highest good score); the false-reject "
                        f"interval is the binomial one"
                        + (f": fit on at least {MIN_GOOD_FOR_TAIL} (a few hundred for a stable tail)" if len(defects)
                           else ", and without calibration defects nothing shows how many defects it passes: fit on "
                                f"at least {MIN_GOOD_FOR_TAIL} (a few hundred for a stable tail) or give "
                                "--calibration-defects"))
    elif len(good) < STABLE_TAIL_GOOD:
        warnings.append(f"only {len(good)} good images: the expected false-reject rate rests on the few highest of "
                        f"them and can be several times off on varied parts; fit on a few hundred, and check it with "
                        f"`edge-export evaluate` on good images fit did not see")
    if review_false_reject is not None and review is None:
        warnings.append(info["review_band"]["note"])
    top = float(good.max())
    if len(good) >= MIN_GOOD_FOR_TAIL and threshold > EXTRAPOLATION_WARN * top and threshold == _above(t_frr):
        warnings.append(f"the threshold {threshold:.4f} lies {threshold / top - 1:.0%} above the highest cross-fitted "
                        f"good score {top:.4f}: the tail model extrapolates from a few far good images (on varied "
                        "parts, 150 magnetic-tile images put it at 44.4 where all 714 put it at 29.9, and 378 of 392 "
                        "defects passed); look at the highest-scoring good images, fit on more, or give "
                        "--calibration-defects")
    if len(good) >= STABLE_TAIL_GOOD and threshold == _above(t_frr):
        top_i = int(np.argmax(good))
        without = TailModel(np.delete(good, top_i)).quantile(target_false_reject)
        drop = 1 - without / threshold
        info["top_image_influence"] = {"highest_good_score": top, "image": names[top_i] if names else None,
                                       "threshold_without_it": without, "drop": drop}
        if drop > (INFLUENCE_WARN if len(good) >= 150 else INFLUENCE_WARN_FEW):
            second = float(np.partition(good, -2)[-2])
            who = f" ({names[top_i]})" if names else ""
            warnings.append(f"the threshold {threshold:.4f} rests on one image: without the highest cross-fitted good "
                            f"score {top:.4f}{who} it would be {without:.4f} ({drop:.1%} lower; the "
                            f"next highest scores {second:.4f}). Look at that image: if it is not a good part, remove "
                            "it and fit again; if it is, fit on more parts like it, or give --calibration-defects")
    spread = float(good.max() - good.min())
    if len(good) > 1 and spread <= 1e-6 * max(1.0, float(abs(good.max()))):
        warnings.append("every good image scores the same: the images are copies of one another, so they say "
                        "nothing about how good parts vary; fit on different parts")
    if warnings:
        info["warnings"] = warnings
    return threshold, review, info
