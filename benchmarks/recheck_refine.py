"""The search stage with and without tightening the candidates for the image score before the exact re-check.

    python benchmarks/recheck_refine.py BUNDLE --images DIR [--frames 83] [--rounds 3]

`FaissHnswSearch._tighten` walks the patches whose bound lies within REFINE_SHARE of the largest again from the top
at REFINE_EF, so that the exact re-check measures fewer patches in full (a defect's patches are where the seeded
walk stops worst). Both settings search the same frames' features, frame by frame in turn (the order alternating),
under the device's BLAS setting. Reported: search-stage p50 / p90 / p99 / max (ms), image scores equal to the
exact ones, mean per-patch excess over exact. Writes benchmarks/results/recheck_refine[_NAME].{json,md}.
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
from bench_report import LoadMonitor, add_results_option, bundle_features, md_table, write_results  # noqa: E402

from edge_runtime.hnsw_graph import FaissHnswSearch  # noqa: E402
from edge_runtime.nn_search import device_blas, upper_bounds  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle", type=Path, help="bundle directory")
    ap.add_argument("--images", type=Path, required=True, help="folder of test images, searched recursively")
    ap.add_argument("--frames", type=int, default=83, help="frames (images, spread over the folder) (default: 83)")
    ap.add_argument("--rounds", type=int, default=3, help="timed passes over the frames (default: 3)")
    ap.add_argument("--name", default=None, help="result name suffix (default: none)")
    add_results_option(ap)
    from bench_report import state_defaults   # every option's help states its default
    a = state_defaults(ap).parse_args(argv)

    _, pipe, _, feats = bundle_features(a.bundle, a.images, a.frames, 2)
    search = pipe.search
    if not isinstance(search, FaissHnswSearch):
        raise SystemExit(f"{a.bundle}: knn hnsw runs {type(search).__name__}, not the faiss graph")
    exact = search.exact
    truth = [exact.nearest_within(q, upper_bounds(exact.bank, q, exact.nearest(q)[1]))[0] for q in feats]
    tighten = FaissHnswSearch._tighten
    settings = {"tightened (the default)": tighten, "not tightened": lambda self, q, d: d}
    times = {k: [] for k in settings}
    exact_img = {k: 0 for k in settings}
    excess = {k: [] for k in settings}
    load = LoadMonitor()
    try:
        with device_blas("hnsw"):
            for r in range(a.rounds):
                for i, q in enumerate(feats):
                    for name in (list(settings) if (i + r) % 2 else list(settings)[::-1]):
                        FaissHnswSearch._tighten = settings[name]
                        t0 = time.perf_counter()
                        d = search.distances(q)
                        times[name].append((time.perf_counter() - t0) * 1000)
                        if r == 0:
                            exact_img[name] += int(d.max() == truth[i].max())
                            excess[name].append(float(np.mean(d / np.maximum(truth[i], 1e-12) - 1)))
    finally:
        FaissHnswSearch._tighten = tighten
    summary = load.stop()
    rows = [[k, *np.percentile(v, [50, 90, 99]).tolist(), max(v), f"{exact_img[k]}/{len(feats)}",
             100 * float(np.mean(excess[k]))] for k, v in times.items()]
    body = (f"{len(feats)} frames x {a.rounds} rounds, settings alternating per frame; REFINE_SHARE "
            f"{FaissHnswSearch.REFINE_SHARE}, REFINE_EF {FaissHnswSearch.REFINE_EF}.\n\n"
            + md_table(["search", "p50 ms", "p90 ms", "p99 ms", "max ms", "image score == exact",
                        "mean patch excess %"], rows))
    write_results("recheck_refine" + (f"_{a.name}" if a.name else ""), "Tightening before the re-check", body,
                  {"bundle": str(a.bundle), "times_ms": times, "exact_image_scores": exact_img,
                   "mean_excess": {k: float(np.mean(v)) for k, v in excess.items()}}, summary,
                  out_dir=a.results_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
