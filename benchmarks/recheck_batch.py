"""The exact re-check with its patches' prefix bounds from one GEMM per batch, against one GEMV per patch.

    python benchmarks/recheck_batch.py BUNDLE --images DIR [--batches 8,1] [--rounds 4] [--every 1] [--name NAME]

edge_runtime.nn_search.exact_image_recheck measures patches in descending order of their bound; each needs its
prefix bounds over the whole bank (a GEMM of the patches' projections against the bank's prefix table), and a patch
whose bound an earlier one has beaten by the time its turn comes needs none. With a batch of b, the bounds of the
next b patches come from one GEMM (OpenBLAS packs the whole table for it); with 1, each patch's from its own GEMV
when its turn comes (nn_search.RECHECK_BATCH, the default). One pipeline per setting, all of the same bundle,
inspect the same raw frames (decoded once), frame by frame in turn, the order rotating, under the device's BLAS
setting. Reported per setting and per kind of part (good / defect, by folder name): search-stage p50 / p90 / p99 and
mean (ms), and in how many frames every setting's score was the same. Writes
benchmarks/results/recheck_batch[_NAME].{json,md}.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
from bench_report import LoadMonitor, add_results_option, md_table, write_results  # noqa: E402

from edge_runtime import nn_search  # noqa: E402
from edge_runtime.bundle import Bundle  # noqa: E402
from edge_runtime.nn_search import device_blas  # noqa: E402
from edge_runtime.pipeline import Pipeline  # noqa: E402
from edge_runtime.records import Frame, Verdict  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle", type=Path, help="bundle directory")
    ap.add_argument("--images", type=Path, required=True,
                    help="folder of test images, one subfolder per kind (required)")
    ap.add_argument("--batches", default="8,1",
                    help="comma-separated batch sizes to compare (default: 8,1; 1 is the station's)")
    ap.add_argument("--rounds", type=int, default=4, help="timed passes over the images (default: 4)")
    ap.add_argument("--every", type=int, default=1, help="use every N-th image (default: 1, all)")
    ap.add_argument("--threads", type=int, default=2, help="inference threads of each pipeline (default: 2)")
    ap.add_argument("--name", default=None, help="result name suffix (default: none)")
    add_results_option(ap)
    from bench_report import state_defaults   # every option's help states its default
    a = state_defaults(ap).parse_args(argv)

    batches = [int(b) for b in a.batches.split(",")]
    if not batches or min(batches) < 1:
        raise SystemExit(f"--batches: positive integers, got {a.batches!r}")
    bundle = Bundle.load(a.bundle)
    pipes = {b: Pipeline(bundle, threads=a.threads) for b in batches}
    paths = sorted(p for p in a.images.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))
    paths = paths[::a.every]
    frames = [(p, cv2.imread(str(p), cv2.IMREAD_UNCHANGED)) for p in paths]
    kinds = ["good" if p.parent.name == "good" else "defect" for p in paths]
    stats = {b: {k: [] for k in ("good", "defect")} for b in batches}
    same_score = 0
    default = nn_search.RECHECK_BATCH
    load = LoadMonitor()
    try:
        with device_blas("hnsw"):
            for i in range(min(5, len(frames))):   # warm-up
                for b, pipe in pipes.items():
                    nn_search.RECHECK_BATCH = b
                    pipe.inspect(Frame(frame_id=i, source=str(frames[i][0]), image=frames[i][1]))
            for r in range(a.rounds):
                for i, ((path, image), kind) in enumerate(zip(frames, kinds)):
                    k = (i + r) % len(batches)
                    scores = set()
                    for b in batches[k:] + batches[:k]:   # the order rotating
                        nn_search.RECHECK_BATCH = b
                        res = pipes[b].inspect(Frame(frame_id=i, source=str(path), image=image))
                        if res.verdict is Verdict.FAULT:
                            raise SystemExit(f"{path}: {res.error}")
                        stats[b][kind].append(res.timings_ms["search"])
                        scores.add(res.score)
                    same_score += int(len(scores) == 1)
    finally:
        nn_search.RECHECK_BATCH = default
    summary = load.stop()
    rows = []
    for b in batches:
        every = stats[b]["good"] + stats[b]["defect"]
        for kind, v in (("good", stats[b]["good"]), ("defect", stats[b]["defect"]), ("all", every)):
            if v:
                rows.append([b, kind, len(v) // a.rounds, *np.percentile(v, [50, 90, 99]).tolist(), float(np.mean(v))])
    body = (f"{len(frames)} raw frames x {a.rounds} rounds, the settings in turn per frame (order rotating), "
            f"{a.threads} threads; the station's RECHECK_BATCH: {default}. Scores identical in "
            f"{same_score}/{len(frames) * a.rounds} inspections of a frame by every setting.\n\n"
            + md_table(["batch", "parts", "frames", "search p50 ms", "search p90 ms", "search p99 ms",
                        "search mean ms"], rows))
    write_results("recheck_batch" + (f"_{a.name}" if a.name else ""),
                  "The exact re-check: prefix bounds per batch of patches (one GEMM) or per patch (one GEMV)", body,
                  {"bundle": str(a.bundle), "batches": batches, "stats_ms": stats, "same_score": same_score,
                   "frames": len(frames), "rounds": a.rounds}, summary, out_dir=a.results_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
