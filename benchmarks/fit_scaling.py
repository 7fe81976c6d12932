"""Fit time (features, coreset, total) and peak memory against the number of training images (bottle, 10% coreset).

    python benchmarks/fit_scaling.py --sizes 25,50,100,188

Each size is a full export.fit.fit (features, greedy coreset, ONNX FP32 + INT8, INT8 bank, HNSW, calibration,
golden images) in a fresh subprocess, so its peak resident memory (ru_maxrss) is its own. 188 is every bottle
training image left after the 10% calibration hold-out. The coreset rate is compared with the bar set by a
widely used PatchCore library on this 2-core machine: ~3 iterations/s for bottle at 10%.
Writes benchmarks/results/fit_scaling.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_report import BOTTLE, LoadMonitor, md_table, write_results  # noqa: E402

BAR_ITERATIONS_PER_S = 3.0


def child(data: Path, out: Path, n_images: int, ratio: float) -> None:
    """One fit; prints one JSON line with its timings and this process's peak memory."""
    from export.fit import FitSettings, fit

    t0 = time.perf_counter()
    bundle = fit(data, out, FitSettings(coreset_ratio=ratio, max_train=n_images), overwrite=True)
    wall = time.perf_counter() - t0
    m = bundle.manifest
    print(json.dumps({
        "bank_images": m["coreset"]["n_bank_images"], "bank_patches": m["coreset"]["n_patches"],
        "coreset_selected": m["coreset"]["n_selected"], "feature_seconds": m["fit"]["feature_seconds"],
        "coreset_seconds": m["coreset"]["seconds"], "total_seconds": wall,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,   # KiB on Linux
    }))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=BOTTLE)
    p.add_argument("--sizes", default="25,50,100,188")
    p.add_argument("--ratio", type=float, default=0.1)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/bench_bundles/fit_scaling"))
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child is not None:
        child(a.data, a.workdir / f"n{a.child}", a.child, a.ratio)
        return 0

    monitor = LoadMonitor()
    runs = []
    for n in (int(s) for s in a.sizes.split(",")):
        print(f"fit with {n} images ...", file=sys.stderr)
        one = LoadMonitor()
        proc = subprocess.run([sys.executable, __file__, "--data", str(a.data), "--ratio", str(a.ratio),
                               "--workdir", str(a.workdir), "--child", str(n)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"fit with {n} images failed:\n{proc.stderr[-3000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r["requested_images"] = n
        r["coreset_iterations_per_s"] = r["coreset_selected"] / r["coreset_seconds"]
        r["load"] = one.stop()
        runs.append(r)
        print(f"  {r}", file=sys.stderr)
    load = monitor.stop()

    rows = [[r["bank_images"], r["bank_patches"], r["coreset_selected"], r["feature_seconds"], r["coreset_seconds"],
             r["total_seconds"], r["coreset_iterations_per_s"], r["coreset_iterations_per_s"] / BAR_ITERATIONS_PER_S,
             r["coreset_selected"] / BAR_ITERATIONS_PER_S / 60.0, r["peak_rss_mib"], r["load"]["other_processes_cpu_cores"]]
            for r in runs]
    body = [f"Bottle, lite0 224 px, 152-d patch features, coreset {a.ratio:.0%} (greedy k-center in a 128-d random "
            "projection, torch float32 on 2 threads). 'total' is the whole export.fit.fit: features, coreset, ONNX "
            "FP32 export, INT8 quantisation, INT8 bank, two HNSW indexes, threshold calibration, golden images, "
            "manifest. Peak memory is the fitting process's ru_maxrss (torch, onnxruntime and the bank included).",
            "", md_table(["bank images", "patches", "coreset size", "features s", "coreset s", "total fit s",
                          "coreset it/s", f"x the bar ({BAR_ITERATIONS_PER_S:g} it/s)",
                          "coreset at the bar, min", "peak RSS MiB", "other load (cores)"], rows),
            "", "Coreset cost grows with the square of the image count (iterations x bank size), so the it/s rate "
            "falls as the bank grows; the bar figure is for the full bottle set (last row)."]
    write_results("fit_scaling", "Fit scaling: time and memory vs training images", "\n".join(body),
                  {"ratio": a.ratio, "bar_iterations_per_s": BAR_ITERATIONS_PER_S, "runs": runs}, load)
    return 0


if __name__ == "__main__":
    sys.exit(main())
