"""Evaluate a bundle on an MVTec-style test set with one engine and search back-end; optional visual report."""
from __future__ import annotations

import math

import time
from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np

from edge_runtime.bundle import Bundle, sha256_file
from edge_runtime.decode import ImageError, load_image
from edge_runtime.pipeline import Pipeline, decide
from export.calibration import wilson_interval
from export.dataset import has_masks, test_images
from export.metrics import auroc

ENGINES = ("reference", "onnx-fp32", "onnx-int8")


def make_scorer(bundle: Bundle, engine: str, knn: str, threads: int = 2, ef_search: int | None = None,
                seed_step: int | None = None, ef_seeded: int | None = None):
    if engine == "reference":
        from export.reference import ReferenceScorer

        if knn != "exact":
            raise ValueError("the reference engine always searches exactly: use --knn exact")
        return ReferenceScorer(bundle, threads)
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    return Pipeline(bundle, precision=engine.split("-")[1], knn=knn, threads=threads, ef_search=ef_search,
                    seed_step=seed_step, ef_seeded=ef_seeded)


def load_mask(path: Path | None, shape: tuple[int, int], roi: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Ground truth at the inspected region's resolution (the heat map's), False where the part is good.

    Any nonzero pixel is defect: masks come as 0/255 (MVTec AD), 0/1 or small class labels (other sets, VisA),
    8- or 16-bit, grey or colour; a fixed cut such as > 127 read 0/1 masks as all background, and reading them
    as 8-bit grey first turned a 16-bit 0/1 mask (>> 8) or a pure red/blue mask (luma < 128) into background too.
    An alpha channel is not a mark and is ignored."""
    if path is None:
        return np.zeros(shape, dtype=bool)
    m = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if m is None:
        raise ValueError(f"{path}: cannot read ground-truth mask")
    if m.ndim == 3:   # colour (BGR, BGRA) or grey + alpha: a pixel is marked in any colour channel
        m = m[..., :3 if m.shape[2] >= 3 else 1].max(axis=2)
    if roi is not None:
        x, y, w, h = roi
        m = m[y:y + h, x:x + w]
    if m.shape != tuple(shape):
        # A mask of another size marks other pixels than the defect's: stretching it would score a wrong answer.
        raise ValueError(f"{path}: ground-truth mask is {m.shape[1]}x{m.shape[0]} but its image's inspected region "
                         f"is {shape[1]}x{shape[0]}")
    return m > 0


def pixel_note(data_dir: Path, items: list, with_masks: bool, no_mask: list) -> str | None:
    """Why pixel AUROC is missing or covers fewer defects than the set has, in one line (None: nothing to say)."""
    n_defects = sum(1 for it in items if it.is_defect)
    if with_masks:
        return (f"over {n_defects - len(no_mask)} of {n_defects} defect images: {len(no_mask)} have no "
                f"ground_truth/<type>/<stem>_mask.png (first: {no_mask[0].path.name})") if no_mask else None
    gt = Path(data_dir) / "ground_truth"
    if gt.is_dir():
        return f"{gt} holds no <defect type>/<image stem>_mask.png for these test images"
    return "no ground_truth folder (masks are optional)"


def rate(k: int, n: int) -> dict:
    lo, hi = wilson_interval(k, n)
    return {"count": int(k), "n": int(n), "rate": k / n if n else None, "ci95": [lo, hi]}


def operating_point_report(labels: list[str], scores: np.ndarray, threshold: float, review: float | None) -> dict:
    """What the shipped thresholds do on a labelled set: false rejects, escapes, reviews, with 95% intervals.
    A score of None is an image the station would FAULT: rejected (a good one counts as a false reject), never an
    escape, and counted apart (`fault`) so that a set whose defects all faulted does not read as caught."""
    verdicts = np.array(["FAULT" if x is None else decide(float(x), threshold, review).value for x in scores])
    labels = np.array(labels)
    good = labels == "good"
    n_good = int(good.sum())
    out = {"threshold": threshold, "review_threshold": review,
           "good": {"n": n_good, "false_rejects": rate(int(np.isin(verdicts[good], ("NG", "FAULT")).sum()), n_good),
                    "review": rate(int(np.sum(verdicts[good] == "REVIEW")), n_good),
                    "fault": rate(int(np.sum(verdicts[good] == "FAULT")), n_good)},
           "defects": {}}
    for d in ["all", *sorted(set(labels[~good]))]:
        sel = ~good if d == "all" else labels == d
        n = int(sel.sum())
        out["defects"][d] = {"n": n, "escapes": rate(int(np.sum(verdicts[sel] == "OK")), n),
                             "review": rate(int(np.sum(verdicts[sel] == "REVIEW")), n),
                             "ng": rate(int(np.sum(verdicts[sel] == "NG")), n),
                             "fault": rate(int(np.sum(verdicts[sel] == "FAULT")), n)}
    return out


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    p = min(max(p, 0.0), 1.0)
    return max(0.0, 1.0 - sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k)))


def false_reject_warning(observed: dict, expected: dict | None) -> str | None:
    """A message when the good test images are rejected far more often than fit expected (its 95% interval and
    this one's do not meet): the test images differ from the training images, or these do not cover how good
    parts vary, and the threshold should not be trusted until someone has looked at the rejected ones."""
    if not expected or not observed["n"] or expected.get("modelled") is None:
        return None
    # So many rejects would happen by chance under less than 1% if fit's rate held (an exact binomial tail).
    # (Requiring the two intervals apart had stayed silent on 10 of 238 good magnetic tiles rejected, 4.2%, from a
    # 50-image fit that expected 0.5%: its interval reached 3.7%.)
    p0, k, n = float(expected["modelled"]), int(observed["count"]), int(observed["n"])
    if k == 0 or binomial_tail(k, n, p0) >= 0.01:
        return None
    hi = float(expected.get("modelled_ci95", [0, expected["modelled"]])[1])
    return (f"good images rejected {observed['count']}/{observed['n']} ({observed['rate']:.1%}, 95% CI "
            f"{observed['ci95'][0]:.1%}-{observed['ci95'][1]:.1%}) where fit expected {expected['modelled']:.2%} "
            f"(95% CI up to {hi:.2%}): these good images differ from the training images (camera, lighting, "
            "compression, orientation, another product?) or the training images do not cover how good parts vary; "
            "look at the rejected good images before trusting the threshold")


def evaluate(bundle_dir: Path, data_dir: Path, engine: str | None = None, knn: str = "hnsw", threads: int = 2,
             report_dir: Path | None = None, ef_search: int | None = None, size_policy: str | None = None,
             seed_step: int | None = None, ef_seeded: int | None = None) -> dict:
    """`engine` None: the variant the station runs unless its file says otherwise (the bundle's default_variant:
    fit may choose FP32, and an INT8 evaluation of such a bundle reported an operating point no station had)."""
    bundle = Bundle.load(bundle_dir)
    engine = engine or f"onnx-{bundle.manifest.get('default_variant', 'int8')}"
    scorer = make_scorer(bundle, engine, knn, threads, ef_search, seed_step, ef_seeded)
    if size_policy:
        scorer.geometry = scorer.geometry.with_overrides(size_policy=size_policy)
    # Defects the threshold was calibrated on would flatter the escape rate: leave them out, and say so.
    # Matched by content, so copies of test images used as calibration defects are found too.
    used = set(bundle.manifest.get("fit", {}).get("calibration_defect_sha256") or [])
    all_items = test_images(data_dir)
    items = [it for it in all_items if not used or sha256_file(it.path) not in used]
    roi = scorer.geometry.roi
    with_masks = has_masks(items)
    # Pixel AUROC over the good images and the defects that have a mask: a defect without one would count its
    # defect pixels as good ones. How many were left out is reported.
    no_mask = [it for it in items if it.is_defect and it.mask is None] if with_masks else []
    scores, maps_max, rows = [], [], []
    pix_scores, pix_labels = [], []
    t0 = time.perf_counter()
    faults = []
    for it in items:
        try:
            rgb = load_image(it.path, bundle.shift_16bit)
            # The station's frame check comes before the score: a frame it faults (too dark, blurred, noisy against
            # the training frames) is a FAULT here too, not a score no station would give.
            check = getattr(scorer, "check_rgb", None)
            if check is not None:
                check(rgb, str(it.path))
            result = scorer.score_rgb(rgb, str(it.path))
        except ImageError as exc:
            # What the station would FAULT (another size under `refuse`, a grey frame for a colour bundle, a
            # corrupt file): rejected there, never passed, so a FAULT in the operating point; no score, so left
            # out of the AUROCs (inf marks it until then); listed, so it is seen.
            faults.append({"file": str(it.path), "label": it.label, "error": str(exc)})
            scores.append(np.inf)
            rows.append({"file": str(it.path), "label": it.label, "score": None, "fault": str(exc)})
            continue
        scores.append(result.score)
        rows.append({"file": str(it.path), "label": it.label, "score": result.score})
        if with_masks and not (it.is_defect and it.mask is None):
            # Pixel AUROC on a 4x-subsampled grid of the map: same ranking, a sixteenth of the memory.
            pix_scores.append(result.anomaly_map[::4, ::4].ravel())
            pix_labels.append(load_mask(it.mask, result.anomaly_map.shape, roi)[::4, ::4].ravel())
        if report_dir is not None:
            maps_max.append(result.anomaly_map)
    seconds = (time.perf_counter() - t0) / len(items)
    scores = np.array(scores)
    labels = np.array([it.is_defect for it in items])
    inspected = np.isfinite(scores)
    if not inspected.any():
        raise ImageError(f"none of the {len(items)} test images could be inspected; the first: {faults[0]['error']}")
    threshold = scorer.threshold
    review = getattr(scorer, "review_threshold", None)
    per_defect = {}
    for d in sorted({it.label for it in items if it.is_defect}):
        sel = np.array([it.label in ("good", d) for it in items]) & inspected
        per_defect[d] = auroc(labels[sel], scores[sel]) if len(set(labels[sel])) == 2 else None
    op = operating_point_report([it.label for it in items], [x if np.isfinite(x) else None for x in scores],
                                threshold, review)
    expected = bundle.manifest["variants"].get("fp32" if engine.endswith("fp32") else "int8", {}).get(
        "threshold_info", {}).get("expected_false_reject")
    result = {
        "bundle": str(bundle_dir), "bundle_id": bundle.bundle_id, "data_dir": str(data_dir), "engine": engine, "knn": knn,
        "search": asdict(scorer.search.params) if hasattr(getattr(scorer, "search", None), "params") else None,
        # What was evaluated: the bundle's geometry, with the --size-policy override if one was given.
        "geometry": ({**bundle.manifest["geometry"], "size_policy": size_policy,
                      "bundle_size_policy": bundle.manifest["geometry"].get("size_policy")}
                     if size_policy else bundle.manifest["geometry"]),
        "image_auroc": auroc(labels[inspected], scores[inspected]) if len(set(labels[inspected])) == 2 else None,
        "pixel_auroc": auroc(np.concatenate(pix_labels), np.concatenate(pix_scores)) if with_masks else None,
        "pixel_auroc_note": pixel_note(data_dir, items, with_masks, no_mask),
        "n_good": int((~labels).sum()), "n_defect": int(labels.sum()), "per_defect": per_defect,
        "excluded_calibration_defects": len(all_items) - len(items),
        "seconds_per_image": seconds, "threshold": threshold, "review_threshold": review,
        "false_rejects": op["good"]["false_rejects"]["count"], "escapes": op["defects"]["all"]["escapes"]["count"],
        "operating_point": op,
        "expected_false_reject": expected,
        "false_reject_warning": false_reject_warning(op["good"]["false_rejects"], expected),
        "faults": faults,
        "images": rows,
    }
    if report_dir is not None:
        keep = np.flatnonzero(inspected)
        write_report(Path(report_dir), [items[i] for i in keep], scores[keep], labels[keep], maps_max, threshold,
                     result)
    return result


def overlay(rgb: np.ndarray, amap: np.ndarray, threshold: float,
            roi: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Heat map over the image; full red at twice the threshold, so red-ish means above threshold. `amap` covers
    the region: the ROI (outlined; the frame around it is shown as it is) or the whole frame."""
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    x, y, w, h = roi if roi is not None else (0, 0, rgb.shape[1], rgb.shape[0])
    heat = cv2.resize(amap, (w, h), interpolation=cv2.INTER_LINEAR)
    heat8 = np.clip(heat / (2 * threshold) * 255, 0, 255).astype(np.uint8)
    color = cv2.applyColorMap(heat8, cv2.COLORMAP_JET)
    out = bgr.copy()
    out[y:y + h, x:x + w] = cv2.addWeighted(bgr[y:y + h, x:x + w], 0.55, color, 0.45, 0)
    if roi is not None:
        cv2.rectangle(out, (x, y), (x + w - 1, y + h - 1), (255, 255, 255), max(1, min(rgb.shape[:2]) // 200))
    return out


def write_report(out: Path, items, scores, labels, maps, threshold, result) -> Path:
    """One self-contained HTML file, out/report.html (export/report.py); returns its path."""
    from export.report import write_html_report

    manifest = Bundle.load(Path(result["bundle"]), verify=False).manifest
    return write_html_report(Path(out), result, items, scores, labels, maps, threshold, manifest)
