"""Re-derive a bundle's operating point without refitting: new calibration defects, target or review band.

The bank, the models and the cross-fitted good scores stay; the defects are scored by the runtime's own
pipeline, and the thresholds come from the same `operating_point` as in `fit`. The result is a new bundle
(new id, higher bundle_version, checksums rewritten); the original is never modified.
"""
from __future__ import annotations

import copy
import datetime as dt
from pathlib import Path

import numpy as np

from edge_runtime.bundle import (MANIFEST, Bundle, BundleError, check_output_dir, sha256_file, staged_bundle,
                                 write_manifest)
from edge_runtime.bank_adapt import FEEDBACK_KEY, copy_verified, stored_defects
from edge_runtime.decode import decode_image
from edge_runtime.pipeline import Pipeline
from export.calibration import DEFAULT_MAX_FALSE_REJECT, score_outliers
from export.dataset import calibration_images
from export.fit import calibration_score, choose_default_variant, left_out_rate, log, set_operating_point


def recalibrate(bundle_dir: Path, out: Path, calibration_defects: Path | None = None,
                target_false_reject: float | None = None, review_false_reject: float | None = None,
                defect_margin: float | None = None, overwrite: bool = False,
                max_false_reject: float | None = None) -> Bundle:
    """Write `out`: `bundle_dir` with thresholds recomputed. Options left None keep the bundle's fit settings.

    Raises BundleError for a bundle fitted without cross-fitting (no good scores to model) and
    FileExistsError for a non-empty `out` without `overwrite`.
    """
    src = Bundle.load(bundle_dir)
    m = copy.deepcopy(src.manifest)
    settings = m.get("fit", {}).get("settings", {})
    target = target_false_reject if target_false_reject is not None else settings.get("target_false_reject", 0.005)
    review = review_false_reject if review_false_reject is not None else settings.get("review_false_reject")
    margin = defect_margin if defect_margin is not None else settings.get("defect_margin", 0.05)
    cap = (max_false_reject if max_false_reject is not None
           else settings.get("max_false_reject", DEFAULT_MAX_FALSE_REJECT))
    for name, v in m["variants"].items():
        if not v.get("cross_fit_scores"):
            raise BundleError(f"{Path(bundle_dir) / MANIFEST}: variant {name} has no cross-fitted good scores "
                              "(fitted with --cross-fit-folds 0): refit instead")
    out = Path(out)
    if out.resolve() == Path(bundle_dir).resolve():
        raise ValueError("--out must differ from the bundle: the original is kept for rollback")
    inputs = {"bundle": Path(bundle_dir)}
    check_output_dir(out, overwrite, inputs)
    # Written beside `out` and moved there only when complete (as fit): a recalibration that fails (an image
    # it cannot read) leaves `out` as it was, never a copy of the source that looks recalibrated.
    with staged_bundle(out, overwrite, inputs) as stage:
        _recalibrate_into(stage, src, m, bundle_dir, calibration_defects, settings, target, review, margin, cap)
    bundle = Bundle.load(out)
    log(f"bundle {bundle.bundle_id} (recalibrated from {src.bundle_id}) written to {out}")
    return bundle


def left_out_outliers(m: dict, cross_fit_scores: dict, target: float) -> tuple[list[str], np.ndarray]:
    """(names, scores) of the good images the threshold is set from: without the score outliers fit left out
    (fit.score_outliers), as fit did, unless it kept them (--keep-score-outliers). Re-including them had put a
    slipped defect's score back into the tail (bottle, 6 slipped: threshold 24.2 -> 45.2, 34 of 57 defects passed).
    Bundles from before the rule was recorded get it applied here."""
    names = list(cross_fit_scores)
    scores = np.array([cross_fit_scores[n] for n in names], dtype=np.float64)
    recorded = (m.get("fit") or {}).get("score_outliers")
    if recorded is None:
        keep = ~score_outliers(scores, target)
    elif recorded.get("in_threshold"):
        keep = np.ones(len(names), dtype=bool)
    else:
        left = set(recorded.get("images") or [])
        keep = np.array([n not in left for n in names], dtype=bool)
    return [n for n, k in zip(names, keep) if k], scores[keep]


def recorded_defects(m: dict) -> tuple[list[Path], str | None]:
    """The calibration defects fit (or the last recalibration) used, when every one is still there unchanged
    (sha256), and else why not. Recalibrating to another target without them had dropped the REVIEW band and
    zero-escape point they set (probe 38)."""
    fit = m.get("fit") or {}
    paths = [Path(p) for p in fit.get("calibration_defects") or []]
    digests = fit.get("calibration_defect_sha256") or []
    if not paths:
        return [], None
    if len(digests) != len(paths):
        return [], "their checksums are not recorded"
    for path, digest in zip(paths, digests):
        try:
            if sha256_file(path) != digest:
                return [], f"{path} has changed since"
        except OSError as exc:
            return [], f"{path}: {exc.strerror or exc}"
    return paths, None


def stored_defect_score(pipe: Pipeline, bundle: Bundle, rel: str) -> float:
    """A defect stored in the bundle (feedback/defects/...), scored from its verified bytes as a station frame."""
    rgb = decode_image(bundle.read_verified(rel), rel, shift_16bit=bundle.shift_16bit)
    return pipe.score_rgb(rgb, rel).score


def _recalibrate_into(out: Path, src: Bundle, m: dict, bundle_dir: Path, calibration_defects: Path | None,
                      settings: dict, target: float, review: float | None, margin: float,
                      cap: float | None = DEFAULT_MAX_FALSE_REJECT) -> None:
    """The recalibration proper, into the new (staging) folder `out`."""
    # Only the files the manifest pins, as the bytes that were verified (as adapt does): a copy of the whole folder
    # had pinned whatever else lay there, unverified (a stray file, the half-written staging folder of an --out
    # inside the bundle, copied into itself), and a file replaced after the check with its new checksum.
    copy_verified(src, out)
    (out / MANIFEST).write_bytes((Path(bundle_dir) / MANIFEST).read_bytes())
    draft = Bundle.load(out)
    if calibration_defects:
        defects = calibration_images(calibration_defects)
    else:
        defects, missing = recorded_defects(m)
        if defects:
            log(f"the {len(defects)} calibration defects the bundle was calibrated with are used again "
                "(give --calibration-defects for others)")
        elif missing:
            log(f"WARNING: the bundle's calibration defects cannot be used again ({missing}): the threshold is set "
                "from good parts only, without the zero-escape point or REVIEW band they set; give "
                "--calibration-defects")
    # Defects a station stored in a device-made version (edge-runtime adapt --defect, the page's "this part was
    # bad") are calibration defects too: left out, the threshold they had lowered came back and they passed as OK.
    stored = stored_defects(draft)
    if stored:
        log(f"the {len(stored)} defects stored in the bundle ({FEEDBACK_KEY}.defects) are kept NG")
    separation = {}
    for name, v in m["variants"].items():
        pipe = Pipeline(draft, precision=name, knn="hnsw", threads=2)
        defect_scores = np.array([calibration_score(pipe, p) for p in defects]
                                 + [stored_defect_score(pipe, draft, d["file"]) for d in stored])
        names, good = left_out_outliers(m, v["cross_fit_scores"], target)
        kept = set(names)
        left = [n for n in v["cross_fit_scores"] if n not in kept]
        if left and name == next(iter(m["variants"])):   # the same images for every variant: said once
            log(f"{len(left)} good images left out of the threshold as in fit (score outliers): {', '.join(left)}")
        bank_max = v.get("threshold_info", {}).get("bank_scores_max")
        # Bundles from before fit.cross_fit was recorded re-ran the coreset per fold.
        method = (m.get("fit", {}).get("cross_fit") or {}).get("method", "refit")
        sep = set_operating_point(v, name, good, defect_scores, np.array([bank_max]) if bank_max else None,
                                  target, review, margin, cross_fit_method=method, names=names,
                                  max_false_reject=cap)
        if sep is not None:
            separation[name] = sep
        if left:
            every = np.array(list(v["cross_fit_scores"].values()), dtype=np.float64)
            left_out_rate(v, name, every, np.array([n in kept for n in v["cross_fit_scores"]]))
    requested = settings.get("default_variant", m["default_variant"])
    m["default_variant"], m["default_variant_reason"] = choose_default_variant(requested, separation)
    m["fit"] = {**m.get("fit", {}), "calibration_defects": [str(p) for p in defects],
                "calibration_defect_sha256": [sha256_file(p) for p in defects],
                "settings": {**settings, "target_false_reject": target, "review_false_reject": review,
                             "defect_margin": margin, "max_false_reject": cap},
                "recalibrated_from": src.bundle_id}
    m["created"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    m["bundle_id"] = None
    if isinstance(m.get("bundle_version"), int):
        # The next release of the same lineage, not "now": a recalibrated older release numbered by the clock went
        # above releases fitted after it, and after one recalibration every hand-numbered release (fit
        # --bundle-version) was below it (probe 40).
        m["bundle_version"] = m["bundle_version"] + 1
    write_manifest(out, m)
