"""Accuracy levers, one at a time: input resolution and aspect, backbone, aggregation, coreset ratio, and the
paper's k-nearest re-weighting of the image score, on bottle and magnetic tile.

    python benchmarks/accuracy_levers.py                       # every row not yet in the JSON
    python benchmarks/accuracy_levers.py --only bottle/         # rows whose name starts with this
    python benchmarks/accuracy_levers.py --table                # print the table from the JSON

Each row fits a bundle with one setting changed from a baseline (cross-fitting off: AUROC does not need a
threshold) and evaluates the torch reference (exact search) and the deployed path (ONNX INT8 + HNSW) on the
same test images. Magnetic tile rows use a 1% coreset to keep the study affordable on 2 cores (the 10% default
is measured by benchmarks/accuracy.py). Results accumulate in benchmarks/results/accuracy_levers.json (a row
already there is not re-run); the table goes to stdout and benchmarks/results/accuracy_levers.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = ROOT.parent / "shared" / "data"
BOTTLE = DATA / "mvtec_ad" / "bottle"
TILE = DATA / "magnetic_tile" / "magnetic_tile"

# name -> (data, FitSettings overrides, what changes)
ROWS: dict[str, tuple[Path, dict, str]] = {
    "bottle/square-224": (BOTTLE, {"input_norm": "native", "input_size": (224, 224)}, "224 x 224 (the 0.1 release)"),
    "bottle/256": (BOTTLE, {"input_norm": "native", "pixels": 256 * 256}, "256 x 256, native input statistics"),
    "bottle/320": (BOTTLE, {"input_norm": "native", "input_size": (320, 320)}, "320 x 320"),
    "bottle/native-384": (BOTTLE, {"input_norm": "native", "input_size": (384, 384)}, "384 x 384 (native)"),
    "bottle/lite2": (BOTTLE, {"input_norm": "native", "pixels": 256 * 256, "backbone": "lite2"}, "lite2 backbone (vs bottle/256)"),
    "bottle/agg-5": (BOTTLE, {"input_norm": "native", "pixels": 256 * 256, "aggregation_size": 5}, "5 x 5 aggregation (vs bottle/256)"),
    "bottle/agg-1": (BOTTLE, {"input_norm": "native", "pixels": 256 * 256, "aggregation_size": 1}, "no aggregation (vs bottle/256)"),
    "bottle/coreset-1pct": (BOTTLE, {"input_norm": "native", "pixels": 256 * 256, "coreset_ratio": 0.01}, "1% coreset (vs bottle/256)"),
    "tile/square-224": (TILE, {"input_norm": "native", "input_size": (224, 224), "coreset_ratio": 0.01}, "224 x 224 squashed (0.1 release)"),
    "tile/65k-px": (TILE, {"input_norm": "native", "pixels": 256 * 256, "coreset_ratio": 0.01}, "median aspect kept, ~65k px, resize (the default geometry)"),
    "tile/letterbox": (TILE, {"input_norm": "native", "pixels": 256 * 256, "coreset_ratio": 0.01, "size_policy": "letterbox"},
                       "aspect kept per image (letterbox), ~65k px"),
    "tile/100k-px": (TILE, {"input_norm": "native", "pixels": 320 * 320, "coreset_ratio": 0.01},
                     "median aspect kept, ~100k px (the images' median size)"),
    "tile/lite2": (TILE, {"input_norm": "native", "pixels": 256 * 256, "coreset_ratio": 0.01, "backbone": "lite2"}, "lite2 (vs tile/65k-px)"),
    "bottle/imagenet": (BOTTLE, {"pixels": 256 * 256, "input_norm": "imagenet"},
                        "ImageNet input statistics (vs bottle/256)"),
    "tile/imagenet": (TILE, {"pixels": 256 * 256, "coreset_ratio": 0.01, "input_norm": "imagenet"},
                      "ImageNet input statistics (vs tile/65k-px)"),
    "tile/agg-5": (TILE, {"input_norm": "native", "pixels": 256 * 256, "coreset_ratio": 0.01, "aggregation_size": 5},
                   "5 x 5 aggregation (vs tile/65k-px)"),
}
ENGINES = ("reference/exact", "onnx-int8/hnsw")
REWEIGHT_B = 9  # neighbourhood of the paper's eq. 7


def reweighted_auroc(bundle_dir: Path, data_dir: Path) -> dict:
    """Image AUROC with the paper's re-weighting s = (1 - softmax over the b neighbours of m*) * s*, deployed path."""
    from edge_runtime.bundle import Bundle
    from edge_runtime.pipeline import Pipeline
    from edge_runtime.decode import load_image
    from edge_runtime.preprocess import preprocess
    from export.dataset import test_images
    from export.metrics import auroc

    bundle = Bundle.load(bundle_dir)
    pipe = Pipeline(bundle, "int8", "exact")
    bank = pipe.search.bank
    items = test_images(data_dir)
    plain, weighted = [], []
    for it in items:
        feats = pipe.extractor(preprocess(load_image(it.path), pipe.geometry, str(it.path))[0])
        dist, idx = pipe.search.nearest(feats)
        p = int(np.argmax(dist))
        m_star = bank[idx[p]]
        d_bank = np.sum((bank - m_star) ** 2, axis=1)
        neigh = np.argpartition(d_bank, REWEIGHT_B)[:REWEIGHT_B + 1]       # m* itself and its b neighbours
        d = np.sqrt(np.sum((bank[neigh] - feats[p]) ** 2, axis=1)).astype(np.float64)
        w = 1.0 - np.exp(dist[p] - d.max()) / np.sum(np.exp(d - d.max()))
        plain.append(float(dist[p]))
        weighted.append(float(w * dist[p]))
    labels = [it.is_defect for it in items]
    return {"image_auroc_plain": auroc(labels, plain), "image_auroc_reweighted": auroc(labels, weighted)}


def run_row(name: str, data: Path, overrides: dict, work: Path) -> dict:
    from export.evaluate import evaluate
    from export.fit import FitSettings, fit

    bundle = work / name.replace("/", "_")
    t0 = time.time()
    fit(data, bundle, FitSettings(cross_fit_folds=0, **overrides), overwrite=True)
    fit_s = time.time() - t0
    row = {"data": str(data), "overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()},
           "fit_seconds": round(fit_s, 1), "load_average": os.getloadavg()[0], "engines": {}}
    for spec in ENGINES:
        engine, knn = spec.split("/")
        r = evaluate(bundle, data, engine, knn)
        row["engines"][spec] = {"image_auroc": r["image_auroc"], "pixel_auroc": r["pixel_auroc"],
                                "per_defect": r["per_defect"], "ms_per_image": round(r["seconds_per_image"] * 1000, 1)}
        print(f"  {name} {spec}: image {r['image_auroc']:.4f} pixel {r['pixel_auroc']:.4f}", flush=True)
    row["geometry"] = {k: r["geometry"][k] for k in ("input_size", "canvas_size", "size_policy")}
    if name in ("bottle/256", "tile/65k-px"):
        row["reweighting"] = reweighted_auroc(bundle, data)
    return row


def table(results: dict) -> str:
    lines = ["| row | change | input | image AUROC ref / int8 | pixel AUROC ref / int8 | fit s |",
             "|---|---|---|---|---|---|"]
    for name, (_, _, what) in ROWS.items():
        if name not in results:
            continue
        r = results[name]
        e = r["engines"]
        img = " / ".join(f"{e[s]['image_auroc']:.4f}" for s in ENGINES)
        pix = " / ".join(f"{e[s]['pixel_auroc']:.4f}" for s in ENGINES)
        size = "x".join(map(str, r["geometry"]["input_size"]))
        lines.append(f"| {name} | {what} | {size} | {img} | {pix} | {r['fit_seconds']} |")
        if "reweighting" in r:
            rw = r["reweighting"]
            lines.append(f"| {name} + re-weighting | paper eq. 7, b = {REWEIGHT_B} (INT8, exact) | {size} | "
                         f"{rw['image_auroc_plain']:.4f} -> {rw['image_auroc_reweighted']:.4f} | | |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="run rows whose name starts with this (default: all)")
    ap.add_argument("--rerun", action="store_true", help="run rows even if the JSON has them (default: skip)")
    ap.add_argument("--work", default="/tmp/accuracy_levers", help="where bundles are written (default: %(default)s)")
    ap.add_argument("--table", action="store_true", help="only print the table from the JSON")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="results folder (default: %(default)s)")
    from bench_report import state_defaults   # every option's help states its default
    a = state_defaults(ap).parse_args()
    out = Path(a.out)
    path = out / "accuracy_levers.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    if not a.table:
        for name, (data, overrides, _) in ROWS.items():
            if not name.startswith(a.only) or (name in results and not a.rerun):
                continue
            if not data.is_dir():
                print(f"skip {name}: {data} not present")
                continue
            print(f"row {name}", flush=True)
            results[name] = run_row(name, data, overrides, Path(a.work))
            out.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(results, indent=2))
    text = table(results)
    print(text)
    notes = ("\nrow names: the setting changed; rows marked (vs X) change one setting from row X. Reference = torch "
             "features + exact search over the FP32 bank; int8 = the deployed ONNX INT8 + HNSW path. Cross-fitting off "
             "(AUROC needs no threshold). Fit seconds were measured while other jobs shared the 2 cores (load 5-11): "
             "read them as relative at best. Rows missing from the table were not run (see the JSON).\n")
    (out / "accuracy_levers.md").write_text("# Accuracy levers (benchmarks/accuracy_levers.py)\n\n" + text + "\n" + notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
