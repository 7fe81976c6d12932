"""Where the heat map's per-patch distances come from, and what that does to pixel AUROC and to its cost.

    python benchmarks/heat_map_source.py BUNDLE DATA_DIR [--rounds 2] [--name NAME]

With the position prior (edge_runtime.position_prior) the search stage finds the exact image score without walking
every patch. The heat map then takes the per-patch bounds that search left (`FaissHnswSearch.prior_scores`: each a
real bank vector's distance, the largest exact); before, a second, full seeded walk of every patch (and its exact
re-check) ran when the heat map was first read. Three sources on the same features of every test image of
DATA_DIR (with its ground-truth masks):

  exact        every patch's distance to its nearest bank vector (numpy, the whole bank)
  full walk    the seeded HNSW walk of every patch with the exact re-check (`distances`: the heat map before)
  prior        the station's now (`prior_scores`)

Reported: image and pixel AUROC of each (pixel AUROC as `edge-export evaluate` computes it), each source's mean
and p90 excess over exact per patch, the correlation of its heat map with the full walk's, and the cost of a heat
map read after the verdict (interleaved per frame, under the device's BLAS setting): the full walk + map vs the
map alone. Writes benchmarks/results/heat_map_source[_NAME].{json,md}.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
from bench_report import LoadMonitor, add_results_option, md_table, write_results  # noqa: E402

from edge_runtime import scoring  # noqa: E402
from edge_runtime.bundle import Bundle  # noqa: E402
from edge_runtime.nn_search import device_blas  # noqa: E402
from edge_runtime.pipeline import Pipeline  # noqa: E402
from edge_runtime.preprocess import preprocess  # noqa: E402
from export.dataset import test_images  # noqa: E402
from export.evaluate import load_mask  # noqa: E402
from export.metrics import auroc  # noqa: E402

SOURCES = ("exact", "full walk", "prior")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle", type=Path, help="bundle directory")
    ap.add_argument("data_dir", type=Path, help="MVTec-style folder: test/<kind>/*, ground_truth/<kind>/*_mask.png")
    ap.add_argument("--rounds", type=int, default=2, help="timed passes over the images for the cost (default: 2)")
    ap.add_argument("--threads", type=int, default=2, help="inference threads (default: 2)")
    ap.add_argument("--name", default=None, help="result name suffix (default: none)")
    add_results_option(ap)
    from bench_report import state_defaults   # every option's help states its default
    a = state_defaults(ap).parse_args(argv)

    pipe = Pipeline(Bundle.load(a.bundle), threads=a.threads)
    search = pipe.search
    if getattr(search, "prior", None) is None:
        raise SystemExit(f"{a.bundle}: no position prior for this bundle ({pipe.prior_note}): its heat map is the "
                         "full walk's already")
    items = [it for it in test_images(a.data_dir) if not (it.is_defect and it.mask is None)]
    feats, places, labels, pix_labels = [], [], [], []
    for it in items:
        rgb = pipe.load_image(it.path)
        tensor, place, hw = preprocess(rgb, pipe.geometry, str(it.path), a.threads)
        feats.append(pipe.extractor(tensor))
        places.append((place, hw))
        labels.append(it.is_defect)
        pix_labels.append(load_mask(it.mask, hw, pipe.geometry.roi)[::4, ::4].ravel())
    load = LoadMonitor()
    img = {s: [] for s in SOURCES}
    pix = {s: [] for s in SOURCES}
    excess = {s: [] for s in SOURCES[1:]}
    corr = []
    cost = {"full walk + map": [], "map alone (now)": []}
    with device_blas("hnsw"):
        for q, (place, hw) in zip(feats, places):
            exact = search.exact.distances(q)
            dists = {"exact": exact, "full walk": search.distances(q), "prior": search.prior_scores(q)}
            maps = {}
            for s, d in dists.items():
                img[s].append(float(d.max()))
                maps[s] = scoring.anomaly_map(d, pipe.geometry, place, hw)
                pix[s].append(maps[s][::4, ::4].ravel())
                if s != "exact":
                    excess[s].append(d / exact - 1.0)
            corr.append(float(np.corrcoef(maps["prior"].ravel(), maps["full walk"].ravel())[0, 1]))
        for r in range(a.rounds):
            for i, (q, (place, hw)) in enumerate(zip(feats, places)):
                ours = search.prior_scores(q)           # the verdict's search, as the station runs it
                for kind in (cost if (i + r) % 2 else list(cost)[::-1]):
                    t0 = time.perf_counter()
                    d = search.distances(q) if kind.startswith("full") else ours
                    scoring.anomaly_map(d, pipe.geometry, place, hw)
                    cost[kind].append((time.perf_counter() - t0) * 1000.0)
    summary = load.stop()
    y = np.array(labels)
    pl = np.concatenate(pix_labels)
    res = {s: {"image_auroc": auroc(y, np.array(img[s])), "pixel_auroc": auroc(pl, np.concatenate(pix[s]))}
           for s in SOURCES}
    for s in SOURCES[1:]:
        e = np.concatenate(excess[s])
        res[s].update(mean_excess=float(e.mean()), p90_excess=float(np.percentile(e, 90)),
                      share_over_1pct=float((e > 0.01).mean()))
    res["prior"]["map_correlation_with_full_walk"] = {"min": float(min(corr)), "median": float(np.median(corr))}
    same_score = sum(a_ == b_ for a_, b_ in zip(img["full walk"], img["prior"]))
    rows = [[s, f"{res[s]['image_auroc']:.4f}", f"{res[s]['pixel_auroc']:.5f}",
             "-" if s == "exact" else f"{res[s]['mean_excess']:.2%}",
             "-" if s == "exact" else f"{res[s]['p90_excess']:.2%}"] for s in SOURCES]
    crow = [[k, *np.percentile(v, [50, 90, 99]).round(2).tolist()] for k, v in cost.items()]
    body = (f"{len(items)} test images ({int(y.sum())} defects with masks), prior: {pipe.prior_note}; image scores "
            f"of the full walk and the prior identical in {same_score}/{len(items)}; heat-map correlation, prior vs "
            f"full walk: min {min(corr):.4f}, median {np.median(corr):.4f}.\n\n"
            + md_table(["per-patch distances", "image AUROC", "pixel AUROC", "mean excess over exact",
                        "p90 excess"], rows)
            + f"\n\nA heat map read after the verdict, {a.rounds} rounds interleaved, {a.threads} threads:\n\n"
            + md_table(["heat map", "p50 ms", "p90 ms", "p99 ms"], crow))
    write_results("heat_map_source" + (f"_{a.name}" if a.name else ""),
                  "The heat map from the position prior's bounds vs a full walk", body,
                  {"bundle": str(a.bundle), "data_dir": str(a.data_dir), "prior": pipe.prior_note,
                   "sources": res, "same_image_score": same_score, "images": len(items),
                   "cost_ms": cost}, summary, out_dir=a.results_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
