"""Device runtime (ONNX INT8/FP32 x HNSW/exact) against the plain torch PatchCore reference, paired per frame.

    python benchmarks/runtime_vs_reference.py --bundle /tmp/bench_bundles/bottle10 --passes 2

Every engine inspects the same encoded image from bytes to decision, one engine after the other, in a random
order per frame, so drifting machine load hits all engines alike; the speed-up is the median of the per-frame
ratios. Before each engine's frame the script idles --settle-ms: thread pools left spinning by the previous
engine (OpenBLAS workers spin ~0.1 s after a GEMM, onnxruntime and OpenMP pools briefly) would otherwise steal a
core from the next one. Each figure is thus the latency of one part arriving at an idle station. The reference is export.reference.ReferenceScorer (torch features, torch.cdist exact search
in float64, the runtime's scoring code); a second reference row runs the same torch features with a float32
torch.cdist, so the speed-up is not just float64 vs float32. Image-score parity and AUROC come from the same run.
Writes benchmarks/results/runtime_vs_reference.{json,md}.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_report import (BOTTLE, DEFAULT_BUNDLE, LoadMonitor, add_results_option, ensure_bundle,  # noqa: E402
                          geometry_text, md_table, median, percentile, write_results)

from edge_runtime import scoring  # noqa: E402
from edge_runtime.bundle import Bundle  # noqa: E402
from edge_runtime.pipeline import Pipeline, decide  # noqa: E402
from edge_runtime.geometry import cut_tiles, match_colour, region_of, to_canvas  # noqa: E402
from edge_runtime.decode import decode_image, to_rgb  # noqa: E402
from edge_runtime.preprocess import to_tensor  # noqa: E402
from edge_runtime.records import Frame, Verdict  # noqa: E402
from export.dataset import test_images  # noqa: E402
from export.metrics import auroc  # noqa: E402
from export.reference import ReferenceScorer  # noqa: E402

RUNTIME_ENGINES = (("int8", "hnsw"), ("fp32", "hnsw"), ("fp32", "exact"), ("int8", "exact"))
if importlib.util.find_spec("faiss") is not None:   # knn: ivf needs the ivf-search extra
    RUNTIME_ENGINES += (("int8", "ivf"),)
REFERENCE = "torch reference (cdist f64)"
REFERENCE_F32 = "torch reference, cdist f32"
STAGES = ("decode", "geometry", "preprocess", "features", "search", "scoring", "decision")


class ReferenceEngine:
    """ReferenceScorer.score_tiles split into the runtime's stages so both are timed the same way."""

    def __init__(self, scorer: ReferenceScorer, search_dtype: torch.dtype):
        self.scorer = scorer
        self.dtype = search_dtype

    @torch.no_grad()
    def inspect(self, name: str, data: bytes | np.ndarray) -> tuple[float, dict]:
        s = self.scorer
        timings = {}
        t0 = t = time.perf_counter()

        def lap(stage):
            nonlocal t
            now = time.perf_counter()
            timings[stage] = (now - t) * 1000.0
            t = now

        rgb = decode_image(data, name) if isinstance(data, bytes) else to_rgb(data, name)   # as the runtime does
        lap("decode")
        region = region_of(rgb, s.geometry, name)
        canvas, place = to_canvas(match_colour(region, s.geometry, name), s.geometry, name)
        tiles = cut_tiles(canvas, s.geometry)
        lap("geometry")
        tensor = to_tensor(tiles)
        lap("preprocess")
        feats = s.features(tensor)
        lap("features")
        # As ReferenceScorer.score_tiles (bank converted per call, as there); float32 for the second row.
        patch = torch.cdist(feats.to(self.dtype), s.bank.to(self.dtype)).min(dim=1).values.float().numpy()
        lap("search")
        score = scoring.image_score(patch)
        scoring.anomaly_map(patch, s.geometry, place, region.shape[:2])
        lap("scoring")
        decide(score, s.threshold, s.review_threshold)
        scoring.normalized_score(score, s.threshold)
        lap("decision")
        timings["total"] = (time.perf_counter() - t0) * 1000.0
        return score, timings


class RuntimeEngine:
    def __init__(self, pipeline: Pipeline):
        self.pipeline = pipeline

    def inspect(self, name: str, data: bytes | np.ndarray) -> tuple[float, dict]:
        frame = (Frame(frame_id=0, source=name, encoded=data) if isinstance(data, bytes)
                 else Frame(frame_id=0, source=name, image=data))
        result = self.pipeline.inspect(frame)
        if result.verdict is Verdict.FAULT:
            raise RuntimeError(f"{name}: runtime faulted: {result.error}")
        # The runtime makes its heat map after the verdict (on first read); the reference makes one in `scoring`,
        # so it is made and counted here too: the same work on both sides.
        t = time.perf_counter()
        result.anomaly_map
        heat_ms = (time.perf_counter() - t) * 1000.0
        timings = dict(result.timings_ms)
        timings["scoring"] += heat_ms
        timings["total"] += heat_ms
        return result.score, timings


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE,
                   help=f"bottle bundle, fitted there if missing (default {DEFAULT_BUNDLE})")
    p.add_argument("--data", type=Path, default=BOTTLE, help=f"MVTec-style category folder (default {BOTTLE})")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime, HNSW search and torch threads (default 2)")
    p.add_argument("--passes", type=int, default=2, help="passes over the test images (default 2)")
    p.add_argument("--warmup", type=int, default=3, help="untimed frames per engine first (default 3)")
    p.add_argument("--settle-ms", type=float, default=150.0, help="idle time before each engine's frame (default 150)")
    p.add_argument("--every", type=int, default=1,
                   help="use every Nth test image (default 1: all; e.g. 10 for a quick trial)")
    p.add_argument("--raw", action="store_true",
                   help="feed every engine decoded BGR arrays, as a camera delivers them (default: off, encoded PNG "
                        "bytes, decoded by each engine); results go to runtime_vs_reference_raw")
    add_results_option(p)
    from bench_report import state_defaults   # every option's help states its default
    a = state_defaults(p).parse_args()
    ensure_bundle(a.bundle, a.data)
    torch.set_num_threads(a.threads)
    bundle = Bundle.load(a.bundle)
    items = test_images(a.data)[::a.every]
    images = [(str(it.path), it.path.read_bytes()) for it in items]
    if a.raw:   # decoded once here, outside every timed region
        images = [(n, cv2.imdecode(np.frombuffer(d, np.uint8), cv2.IMREAD_COLOR)) for n, d in images]
    labels = np.array([it.is_defect for it in items])

    scorer = ReferenceScorer(bundle, a.threads)
    engines = {f"runtime {prec.upper()} + {knn}": RuntimeEngine(Pipeline(bundle, prec, knn, a.threads))
               for prec, knn in RUNTIME_ENGINES}
    engines[REFERENCE] = ReferenceEngine(scorer, torch.float64)
    engines[REFERENCE_F32] = ReferenceEngine(scorer, torch.float32)
    names = list(engines)

    # Warm-up, and a check that the split reference reproduces ReferenceScorer's own score.
    for name, data in images[:a.warmup]:
        want = scorer.score_rgb(decode_image(data, name) if isinstance(data, bytes) else to_rgb(data, name)).score
        for e in names:
            got, _ = engines[e].inspect(name, data)
            if e == REFERENCE and got != want:
                raise SystemExit(f"split reference score {got} != ReferenceScorer {want} on {name}")

    monitor = LoadMonitor()
    totals = {e: [] for e in names}
    stages = {e: {s: [] for s in STAGES} for e in names}
    scores = {e: np.zeros(len(images)) for e in names}
    rng = np.random.default_rng(0)
    for pss in range(a.passes):
        for i, (name, data) in enumerate(images):
            for e in rng.permutation(names):
                time.sleep(a.settle_ms / 1000.0)
                score, t = engines[e].inspect(name, data)
                totals[e].append(t["total"])
                for s in STAGES:
                    stages[e][s].append(t[s])
                if pss == 0:
                    scores[e][i] = score
        print(f"pass {pss + 1}/{a.passes} done", file=sys.stderr)
    load = monitor.stop()

    ref_tot = np.array(totals[REFERENCE])
    ref32_tot = np.array(totals[REFERENCE_F32])
    ref_scores = scores[REFERENCE]
    ref_verdict = ref_scores >= scorer.threshold
    summary = {}
    for e in names:
        tot = np.array(totals[e])
        exact_twin = e.replace("hnsw", "exact") if "hnsw" in e else None
        pipe = engines[e].pipeline if isinstance(engines[e], RuntimeEngine) else None
        threshold = pipe.threshold if pipe else scorer.threshold
        summary[e] = {
            "median_ms": median(tot), "p95_ms": percentile(tot, 95), "mean_ms": float(tot.mean()),
            "max_ms": float(tot.max()), "frames": int(tot.size),
            "speedup_vs_reference": median(ref_tot / tot), "speedup_vs_reference_f32": median(ref32_tot / tot),
            "speedup_vs_reference_p5_p95": [percentile(ref_tot / tot, 5), percentile(ref_tot / tot, 95)],
            "stage_median_ms": {s: median(stages[e][s]) for s in STAGES},
            "stage_p95_ms": {s: percentile(stages[e][s], 95) for s in STAGES},
            "max_rel_score_diff_vs_reference": float(np.max(np.abs(scores[e] - ref_scores) / ref_scores)),
            "max_rel_score_diff_vs_exact_twin": (float(np.max(np.abs(scores[e] - scores[exact_twin]) / scores[exact_twin]))
                                                 if exact_twin else None),
            "image_auroc": auroc(labels, scores[e]),
            "threshold": threshold,
            "verdicts_differing_from_reference": int(np.sum((scores[e] >= threshold) != ref_verdict)),
        }

    rows = [[e, s["median_ms"], s["p95_ms"], s["mean_ms"], f"{s['speedup_vs_reference']:.2f}x",
             f"{s['speedup_vs_reference_f32']:.2f}x", 1000.0 / s["mean_ms"]] for e, s in summary.items()]
    body = [f"Bottle test set ({len(images)} images: {int((~labels).sum())} good, {int(labels.sum())} defective) x "
            f"{a.passes} passes = {len(ref_tot)} paired frames per engine; bundle {bundle.bundle_id} "
            f"({geometry_text(bundle.geometry)}, {bundle.grid[0]}x{bundle.grid[1]} patches per tile x {bundle.dim}-d, "
            f"bank {len(scorer.bank)} = {bundle.manifest['coreset']['ratio']:.0%} coreset), {a.threads} threads "
            f"(onnxruntime intra-op, HNSW search, torch). Every frame goes from "
            + ("a decoded BGR array (a camera frame)" if a.raw else "encoded PNG bytes") + " to the decision.",
            "", f"## Latency per frame (paired; random engine order per frame; {a.settle_ms:g} ms idle before each)", "",
            md_table(["engine", "median ms", "p95 ms", "mean ms", "speed-up vs reference (median of paired ratios)",
                      "speed-up vs reference with f32 cdist", "frames/s (1/mean)"], rows),
            "", "## Median per stage (ms)", "",
            md_table(["engine", *STAGES], [[e, *[s["stage_median_ms"][st] for st in STAGES]] for e, s in summary.items()]),
            "", "## Image-score parity and accuracy on the same frames", "",
            md_table(["engine", "max rel. score diff vs reference", "max rel. diff vs same-precision exact",
                      "image AUROC", "verdicts differing from reference"],
                     [[e, s["max_rel_score_diff_vs_reference"], s["max_rel_score_diff_vs_exact_twin"], s["image_auroc"],
                       s["verdicts_differing_from_reference"]] for e, s in summary.items()]),
            "", "INT8 engines score with their own INT8 bank and threshold (README.md, \"Why the bundle holds two "
            "banks\"), so their distance "
            "to the FP32 reference is the quantisation error, not a search error; HNSW with exact re-check must "
            "match its exact twin (0 or float rounding)."]
    write_results("runtime_vs_reference" + ("_raw" if a.raw else ""),
                  "Runtime vs torch reference, bottle" + (", raw frames" if a.raw else ""), "\n".join(body),
                  {"bundle": str(a.bundle), "bundle_id": bundle.bundle_id, "threads": a.threads, "passes": a.passes,
                   "settle_ms": a.settle_ms, "input": "raw BGR arrays" if a.raw else "encoded PNG bytes",
                   "images": [n for n, _ in images], "engines": summary,
                   "image_scores_pass1": {e: scores[e] for e in names},
                   "totals_ms": totals}, load, out_dir=a.results_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
