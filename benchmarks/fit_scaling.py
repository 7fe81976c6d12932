"""Fit time (features, coreset, total) and peak memory against the number of training images (bottle, 10% coreset).

    python benchmarks/fit_scaling.py --sizes 25,50,100,209
    python benchmarks/fit_scaling.py --data ../shared/data/magnetic_tile/magnetic_tile --sizes all --name fit_scaling_magnetic_tile
    python benchmarks/fit_scaling.py --data ../shared/data/magnetic_tile/magnetic_tile --sizes 150 --cross-fit-method refit --name fit_crossfit_refit_mt150

Each size is a full export.fit.fit (features, greedy coreset, ONNX FP32 + INT8, INT8 bank, HNSW, k-fold
cross-fitted threshold, golden images) in a fresh subprocess, so its peak resident memory (ru_maxrss) is its own.
209 is every bottle training image (every good image is in the bank; the threshold is cross-fitted). --input-size
and --folds change the geometry and the cross-fitting, --cross-fit-method how each fold's bank is made (the
exporter's defaults otherwise). Each run records wall and CPU seconds per fit stage (CPU seconds do not depend on
what else shares the cores), the thresholds and their expected false-reject rates, and the load.
Writes benchmarks/results/<--name, default fit_scaling>.{json,md}.
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
from bench_report import BOTTLE, LoadMonitor, add_results_option, md_table, parse_size, write_results  # noqa: E402


def child(data: Path, out: Path, n_images: int | None, ratio: float, input_size: tuple[int, int] | None,
          folds: int | None, method: str | None) -> None:
    """One fit; prints one JSON line with its timings and this process's peak memory."""
    from export.fit import FitSettings, fit

    settings = FitSettings(coreset_ratio=ratio, max_train=n_images, input_size=input_size)
    if folds is not None:
        settings.cross_fit_folds = folds
    if method is not None:
        settings.cross_fit_method = method
    t0 = time.perf_counter()
    bundle = fit(data, out, settings, overwrite=True)
    wall = time.perf_counter() - t0
    m = bundle.manifest
    g = m["geometry"]
    print(json.dumps({
        "input_size": g["input_size"], "canvas_size": g["canvas_size"], "tiles": len(g["tiles"]),
        "cross_fit_folds": m["fit"]["settings"]["cross_fit_folds"],
        "cross_fit_seconds": m["fit"].get("cross_fit_seconds"),
        "bank_images": m["coreset"]["n_bank_images"], "bank_patches": m["coreset"]["n_patches"],
        "coreset_selected": m["coreset"]["n_selected"], "feature_seconds": m["fit"]["feature_seconds"],
        "coreset_seconds": m["coreset"]["seconds"], "total_seconds": wall,
        "cpu_seconds": m["fit"].get("cpu_seconds"), "stages": m["fit"].get("stages"),
        "cross_fit": m["fit"].get("cross_fit"),
        "operating_point": {name: {"threshold": v["threshold"],
                                   "expected_false_reject": v["threshold_info"]["expected_false_reject"],
                                   "good_scores": v["threshold_info"]["good_scores"]}
                            for name, v in m["variants"].items()},
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,   # KiB on Linux
    }))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=BOTTLE, help=f"MVTec-style category folder (default {BOTTLE})")
    p.add_argument("--sizes", default="25,50,100,209",
                   help="training image counts, comma-separated; 'all' for every image (default 25,50,100,209)")
    p.add_argument("--cross-fit-method", choices=["bank-minus-fold", "refit"], default=None,
                   help="how each cross-fit fold's bank is made (default: the exporter's, bank-minus-fold)")
    p.add_argument("--name", default="fit_scaling", help="results file stem (default fit_scaling)")
    p.add_argument("--ratio", type=float, default=0.1, help="coreset ratio (default 0.1)")
    p.add_argument("--input-size", default=None,
                   help="model input N or WxH (default: the exporter's, from the images' aspect and pixel budget)")
    p.add_argument("--folds", type=int, default=None,
                   help="cross-fit folds for the threshold (default: the exporter's; 0 skips cross-fitting)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/bench_bundles/fit_scaling"),
                   help="where the fitted bundles go (default /tmp/bench_bundles/fit_scaling)")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    add_results_option(p)
    from bench_report import state_defaults   # every option's help states its default
    a = state_defaults(p).parse_args()
    try:
        input_size = parse_size(a.input_size) if a.input_size else None
    except ValueError as exc:
        p.error(f"--input-size: {exc}")
    if a.child is not None:
        child(a.data, a.workdir / f"n{a.child}", a.child or None, a.ratio, input_size, a.folds, a.cross_fit_method)
        return 0

    monitor = LoadMonitor()
    runs = []
    for n in (0 if s == "all" else int(s) for s in a.sizes.split(",")):
        print(f"fit with {n} images ...", file=sys.stderr)
        one = LoadMonitor()
        cmd = [sys.executable, __file__, "--data", str(a.data), "--ratio", str(a.ratio),
               "--workdir", str(a.workdir), "--child", str(n)]
        cmd += ["--input-size", a.input_size] if a.input_size else []
        cmd += ["--folds", str(a.folds)] if a.folds is not None else []
        cmd += ["--cross-fit-method", a.cross_fit_method] if a.cross_fit_method else []
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"fit with {n} images failed:\n{proc.stderr[-3000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r["requested_images"] = n or "all"
        r["coreset_iterations_per_s"] = r["coreset_selected"] / r["coreset_seconds"]
        r["load"] = one.stop()
        runs.append(r)
        print(f"  {r}", file=sys.stderr)
    load = monitor.stop()

    rows = [[r["bank_images"], r["bank_patches"], r["coreset_selected"], r["feature_seconds"], r["coreset_seconds"],
             r["cross_fit_seconds"], r["total_seconds"], r.get("cpu_seconds"), r["coreset_iterations_per_s"],
             r["peak_rss_mib"], r["load"]["other_processes_cpu_cores"]]
            for r in runs]
    ops = [[r["bank_images"], name, (r.get("cross_fit") or {}).get("method", "none"), op["threshold"],
            op["expected_false_reject"]["modelled"], "{:.2%}-{:.2%}".format(*op["expected_false_reject"]["modelled_ci95"]),
            f"{op['expected_false_reject']['empirical_count']}/{op['expected_false_reject']['n']}"]
           for r in runs for name, op in r["operating_point"].items()]
    stage_rows = [[r["bank_images"], k, v["wall_s"], v["cpu_s"]] for r in runs for k, v in (r.get("stages") or {}).items()]
    r0 = runs[0]
    tiles = f"{r0['tiles']} tile{'s' if r0['tiles'] != 1 else ''}" + (
        f" on a {r0['canvas_size'][0]}x{r0['canvas_size'][1]} canvas" if r0["tiles"] != 1 else "")
    body = [f"{a.data.name}, lite0 input {r0['input_size'][0]}x{r0['input_size'][1]}, {tiles}, 152-d patch features, "
            f"coreset {a.ratio:.0%} (greedy k-center in a 128-d random "
            "projection, chunks of <= 32768 patches on 2 workers). 'total' is the whole export.fit.fit: ONNX FP32 "
            "export, INT8 quantisation, FP32 + INT8 features of every image (onnxruntime), coreset, two HNSW indexes, "
            f"{r0['cross_fit_folds']}-fold cross-fitted threshold ({(r0.get('cross_fit') or {}).get('method', 'none')}), "
            "golden images, manifest. 'CPU s' is the fit's process CPU time (all threads): on shared cores the wall "
            "time depends on the other load (last column), the CPU time much less. Peak memory is the fitting "
            "process's ru_maxrss (torch, onnxruntime and the bank included).",
            "", md_table(["bank images", "patches", "coreset size", "features s", "coreset s", "cross-fit s", "total fit s",
                          "CPU s", "coreset it/s", "peak RSS MiB", "other load (cores)"], rows),
            "", "Operating point per variant:", "",
            md_table(["bank images", "variant", "cross-fit", "threshold", "expected FRR", "95% CI", "cross-fitted >= t"], ops),
            "", "Stages (wall and CPU seconds):", "", md_table(["bank images", "stage", "wall s", "CPU s"], stage_rows)]
    write_results(a.name, "Fit scaling: time and memory vs training images", "\n".join(body),
                  {"data": str(a.data), "ratio": a.ratio, "cross_fit_method": a.cross_fit_method or "default",
                   "runs": runs}, load, out_dir=a.results_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
