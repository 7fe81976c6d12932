"""Accuracy of every deployment path on real data, and the parity figures between them, in one run.

    python benchmarks/accuracy.py ../shared/data/mvtec_ad/bottle --name bottle --coreset-ratio 0.1
    python benchmarks/accuracy.py ../shared/data/magnetic_tile/magnetic_tile --name magnetic_tile --coreset-ratio 0.01
    python benchmarks/accuracy.py ../shared/data/mvtec_ad/bottle --name bottle_fewshot5 --max-train 5 --engines onnx-int8/hnsw

Fits a bundle (fit time and peak memory recorded), evaluates reference / onnx-fp32 / onnx-int8 with exact
and HNSW search, measures torch-vs-ONNX feature parity and INT8 SQNR, HNSW recall@1 and the image-score error
that the exact re-check removes. Writes benchmarks/results/accuracy_<name>.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge_runtime.bundle import Bundle  # noqa: E402
from edge_runtime.pipeline import Pipeline  # noqa: E402
from edge_runtime.decode import load_image  # noqa: E402
from edge_runtime.preprocess import preprocess  # noqa: E402
from export.dataset import test_images  # noqa: E402
from export.evaluate import evaluate  # noqa: E402
from export.fit import FitSettings, fit  # noqa: E402

ALL = ["reference/exact", "onnx-fp32/exact", "onnx-fp32/hnsw", "onnx-int8/exact", "onnx-int8/hnsw"]


def parity(bundle_dir: Path, data_dir: Path, n_images: int = 20) -> dict:
    """Feature parity torch vs ONNX FP32 vs ONNX INT8, and HNSW quality, on held-out test images."""
    from export.reference import ReferenceScorer

    bundle = Bundle.load(bundle_dir)
    ref = ReferenceScorer(bundle)
    fp32 = Pipeline(bundle, "fp32", "hnsw")
    int8 = Pipeline(bundle, "int8", "hnsw")
    items = test_images(data_dir)
    step = max(1, len(items) // n_images)
    items = items[::step][:n_images]
    abs_diff, ref_mag, sig, noise = [], [], 0.0, 0.0
    hits = total = 0
    worst_no_recheck = 0.0
    rechecked = []
    for it in items:
        x = preprocess(load_image(it.path), bundle.geometry)[0]
        f_ref = ref.features(x).numpy()
        f32 = fp32.extractor(x)
        f8 = int8.extractor(x)
        abs_diff.append(np.abs(f32 - f_ref).ravel())
        ref_mag.append(np.abs(f_ref).max())
        sig += float(np.sum(f32.astype(np.float64) ** 2))
        noise += float(np.sum((f8.astype(np.float64) - f32) ** 2))
        for pipe, feats in ((fp32, f32), (int8, f8)):
            labels = pipe.search.labels(feats)
            exact_d, exact_idx = pipe.search.exact.nearest(feats)
            hits += int(np.sum(labels == exact_idx))
            total += len(feats)
            approx = pipe.search.approximate(feats)
            worst_no_recheck = max(worst_no_recheck, float(approx.max() / exact_d.max() - 1))
            rechecked_d = pipe.search.distances(feats)
            rechecked.append(pipe.search.rechecked_last)
            assert abs(rechecked_d.max() - exact_d.max()) <= 1e-3 * exact_d.max(), "re-check must give the exact image score"
    d = np.concatenate(abs_diff)
    return {"images": len(items), "torch_vs_onnx_fp32_max_abs": float(d.max()), "torch_vs_onnx_fp32_mean_abs": float(d.mean()),
            "feature_max_magnitude": float(max(ref_mag)), "int8_sqnr_db": 10 * np.log10(sig / noise),
            "hnsw_ef": bundle.hnsw_params.ef_search, "hnsw_recall_at_1": hits / total,
            "largest_relative_image_score_error_without_recheck": worst_no_recheck,
            "largest_relative_image_score_error_with_recheck": 0.0,
            "patches_rechecked_per_image_mean": float(np.mean(rechecked))}


def mixed_extractor_auroc(bundle_dir: Path, data_dir: Path) -> dict:
    """What building the bank from FP32 features but querying with INT8 ones would cost (the design question)."""
    from export.metrics import auroc

    bundle = Bundle.load(bundle_dir)
    mixed = Pipeline(bundle, "int8", "exact")
    mixed.search = Pipeline(bundle, "fp32", "exact").search
    items = test_images(data_dir)
    scores = [mixed.score_rgb(load_image(it.path)).score for it in items]
    return {"bank": "fp32", "queries": "int8", "image_auroc": auroc([it.is_defect for it in items], scores)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data_dir")
    ap.add_argument("--name", required=True)
    ap.add_argument("--coreset-ratio", type=float, default=0.1)
    ap.add_argument("--max-train", type=int, default=None)
    ap.add_argument("--backbone", default="auto", help="lite0, lite2 or auto (default: auto, as fit)")
    ap.add_argument("--input-size", default=None, help="WxH model input (default: fit's choice)")
    ap.add_argument("--pixels", type=int, default=None, help="model pixels per tile (default: fit's)")
    ap.add_argument("--scale", type=float, default=None, help="tiling scale (default: one tile)")
    ap.add_argument("--size-policy", default=None)
    ap.add_argument("--aggregation", type=int, default=3)
    ap.add_argument("--cross-fit-folds", type=int, default=5)
    ap.add_argument("--review-frr", type=float, default=None)
    ap.add_argument("--calibration-per-type", type=int, default=0,
                    help="take this many images of each test defect type as calibration defects (left out of evaluation)")
    ap.add_argument("--int8-target", default="x86-avx2")
    ap.add_argument("--engines", default=",".join(ALL))
    ap.add_argument("--bundle", default=None, help="reuse a fitted bundle instead of fitting")
    ap.add_argument("--keep-bundle", default=None, help="write the bundle here instead of a temp dir")
    ap.add_argument("--no-parity", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    from bench_report import state_defaults   # every option's help states its default
    a = state_defaults(ap).parse_args()
    data_dir = Path(a.data_dir)
    result: dict = {"name": a.name, "data_dir": str(data_dir), "command": " ".join(sys.argv)}
    tmp = tempfile.TemporaryDirectory()
    if a.bundle:
        bundle_dir = Path(a.bundle)
    else:
        bundle_dir = Path(a.keep_bundle) if a.keep_bundle else Path(tmp.name) / "bundle"
        extra = {k: v for k, v in {"pixels": a.pixels, "scale": a.scale, "size_policy": a.size_policy,
                                     "review_false_reject": a.review_frr}.items() if v is not None}
        if a.input_size:
            extra["input_size"] = tuple(int(v) for v in a.input_size.split("x"))
        settings = FitSettings(coreset_ratio=a.coreset_ratio, backbone=a.backbone, max_train=a.max_train,
                               int8_target=a.int8_target, aggregation_size=a.aggregation,
                               cross_fit_folds=a.cross_fit_folds, **extra)
        calib = None
        if a.calibration_per_type:
            calib = Path(tmp.name) / "calibration"
            calib.mkdir()
            for it in [t for d in sorted({t.label for t in test_images(data_dir) if t.is_defect})
                       for t in [u for u in test_images(data_dir) if u.label == d][:a.calibration_per_type]]:
                (calib / f"{it.label}__{it.path.name}").symlink_to(it.path.resolve())
        t0 = time.time()
        fit(data_dir, bundle_dir, settings, calibration_defects=calib, overwrite=True)
        result["fit_seconds"] = time.time() - t0
        result["fit_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    m = Bundle.load(bundle_dir).manifest
    result["settings"] = m["fit"]["settings"]
    result["int8_quantization"] = m["variants"]["int8"].get("quantization")
    result["coreset"] = m["coreset"]
    result["bank_images"] = len(m["fit"]["bank_images"])
    result["thresholds"] = {k: v["threshold"] for k, v in m["variants"].items()}
    result["review_thresholds"] = {k: v.get("review_threshold") for k, v in m["variants"].items()}
    result["threshold_info"] = {k: v["threshold_info"] for k, v in m["variants"].items()}
    result["geometry"] = m["geometry"]
    sizes = {k: v["bytes"] for k, v in m["files"].items()}
    result["sizes_bytes"] = {"bundle_total": sum(sizes.values()) + (bundle_dir / "manifest.yaml").stat().st_size, **sizes}
    result["evaluations"] = {}
    print(f"| {a.name} | image AUROC | pixel AUROC | false rejects | escapes | ms/image |")
    print("|---|---|---|---|---|---|")
    for spec in a.engines.split(","):
        engine, knn = spec.split("/")
        r = evaluate(bundle_dir, data_dir, engine, knn)
        r.pop("images")
        result["evaluations"][spec] = r
        pix = "n/a" if r["pixel_auroc"] is None else f"{r['pixel_auroc']:.4f}"
        print(f"| {spec} | {r['image_auroc']:.4f} | {pix} | {r['false_rejects']}/{r['n_good']} | "
              f"{r['escapes']}/{r['n_defect']} | {r['seconds_per_image'] * 1000:.1f} |", flush=True)
    if not a.no_parity:
        result["parity"] = parity(bundle_dir, data_dir)
        result["parity"]["mixed_fp32_bank_int8_queries"] = mixed_extractor_auroc(bundle_dir, data_dir)
        print(json.dumps(result["parity"], indent=2))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"accuracy_{a.name}.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out / f'accuracy_{a.name}.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
