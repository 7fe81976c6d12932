"""Per-stage latency against the number of tiles per frame: one, 2x2 and 3x3 tiles of the bottle frames.

    python benchmarks/tile_latency.py --frames 249

Three bottle bundles (coreset 1%, no cross-fitting: the bank's size barely matters next to the tile count here)
are fitted into --work once and reused: the exporter's default single input (aspect kept, about 256 x 256 model
pixels), and tiling at scale 1.0 (full 384 x 384 frame detail) with 224x224 tiles (2x2) and 160x160 tiles (3x3).
Each fit runs in its own process, so torch never sits in the process that is timed. Every bundle then goes
through edge_runtime.bench.run_bench (the daemon's Pipeline.inspect from encoded PNG bytes to the decision) on
the bottle test images, one bundle after the other in this process. 'ms per tile' is the total p50 divided by
the tile count: what each extra tile costs once the per-frame work (decode, search setup) is shared.
Writes benchmarks/results/tile_latency.{json,md}.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_report import BOTTLE, LoadMonitor, add_results_option, ensure_bundle, md_table, write_results  # noqa: E402

from edge_runtime.bench import STAGES, run_bench  # noqa: E402
from edge_runtime.bundle import MANIFEST, Bundle, BundleError  # noqa: E402

# name -> (model input (W, H) or None for the exporter's default, scale (None: one tile per frame), tiles expected)
LAYOUTS = {
    "tiles1": (None, None, 1),
    "tiles4": ((224, 224), 1.0, 4),
    "tiles9": ((160, 160), 1.0, 9),
}


def fit_layout(work: Path, data: Path, name: str, coreset: float, folds: int) -> Path:
    """The layout's bundle in work/NAME, fitted (in this process) unless a readable one with its tile count is there."""
    size, scale, n_tiles = LAYOUTS[name]
    bundle = work / name
    if (bundle / MANIFEST).is_file():
        try:
            if Bundle.load(bundle).geometry.n_tiles == n_tiles:
                return bundle
        except BundleError as exc:
            print(f"{bundle}: not usable ({exc}); fitting it again", file=sys.stderr)
        (bundle / MANIFEST).unlink()   # ensure_bundle refits only where no manifest is left
    ensure_bundle(bundle, data, coreset_ratio=coreset, input_size=size, scale=scale, cross_fit_folds=folds)
    got = Bundle.load(bundle).geometry.n_tiles
    if got != n_tiles:
        raise SystemExit(f"{bundle}: fitted with {got} tiles per frame, expected {n_tiles} "
                         f"(input {size}, scale {scale}; are the frames in {data} not 384x384?)")
    return bundle


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=BOTTLE, help=f"MVTec-style category folder (default {BOTTLE})")
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_bundles/tiles"),
                   help="where the three bundles are fitted and reused from (default /tmp/bench_bundles/tiles)")
    p.add_argument("--frames", type=int, default=249, help="timed frames per bundle (default 249: 3 passes over 83 images)")
    p.add_argument("--warmup", type=int, default=10, help="untimed frames per bundle first (default 10)")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime and HNSW search threads (default 2)")
    p.add_argument("--precision", choices=["int8", "fp32"], default="int8", help="bundle variant (default int8)")
    p.add_argument("--knn", choices=["hnsw", "hnswlib", "exact", "ivf"], default="hnsw", help="search (default hnsw)")
    p.add_argument("--gap-ms", type=float, default=0.0, help="idle ms between frames (default 0: back to back)")
    p.add_argument("--coreset", type=float, default=0.01, help="coreset ratio of the fitted bundles (default 0.01)")
    p.add_argument("--folds", type=int, default=0, help="cross-fit folds of the fitted bundles (default 0: none)")
    p.add_argument("--layouts", default=",".join(LAYOUTS),
                   help=f"which bundles, comma-separated (default {','.join(LAYOUTS)})")
    p.add_argument("--fit", choices=list(LAYOUTS), help=argparse.SUPPRESS)   # child: fit one layout
    add_results_option(p)
    from bench_report import state_defaults   # every option's help states its default
    a = state_defaults(p).parse_args()
    if a.fit:
        fit_layout(a.work, a.data, a.fit, a.coreset, a.folds)
        return 0
    names = [n.strip() for n in a.layouts.split(",")]
    unknown = [n for n in names if n not in LAYOUTS]
    if unknown:
        p.error(f"--layouts: unknown {', '.join(unknown)} (known: {', '.join(LAYOUTS)})")

    bundles = {}
    for name in names:
        # A child process per fit: torch's memory and thread pools must not stay in the process that is timed.
        cmd = [sys.executable, __file__, "--fit", name, "--data", str(a.data), "--work", str(a.work),
               "--coreset", str(a.coreset), "--folds", str(a.folds)]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"fitting {name} failed:\n{proc.stderr[-3000:]}")
        bundles[name] = a.work / name

    monitor = LoadMonitor()
    reports, loads = {}, {}
    for name, bundle in bundles.items():
        one = LoadMonitor()
        r = run_bench(bundle, a.data / "test", frames=a.frames, warmup=a.warmup, threads=a.threads,
                      precision=a.precision, knn=a.knn, gap_ms=a.gap_ms)
        loads[name] = one.stop()
        r.pop("samples_ms")   # percentiles are enough here
        reports[name] = r
        b, st = r["bundle"], r["stages_ms"]
        print(f"{name}: {b['tiles']} tiles of {b['input_size'][0]}x{b['input_size'][1]}: total p50 "
              f"{st['total']['p50']:.1f} ms", file=sys.stderr)
    load = monitor.stop()

    stages = [s for s in STAGES if s != "total"]
    rows, summary = [], {}
    for name, r in reports.items():
        b, st = r["bundle"], r["stages_ms"]
        per_tile = st["total"]["p50"] / b["tiles"]
        summary[name] = {"tiles": b["tiles"], "input_size": b["input_size"], "canvas_size": b["canvas_size"],
                         "patches_per_frame": b["patches_per_frame"], "bank_size": b["bank_size"],
                         "stage_p50_ms": {s: st[s]["p50"] for s in STAGES},
                         "total_ms": {k: st["total"][k] for k in ("p50", "p95", "p99", "max", "mean")},
                         "ms_per_tile_p50": per_tile, "throughput_fps": r["throughput_fps"],
                         "vm_hwm_mib": r["memory"]["after_run"]["vm_hwm_mib"]}
        rows.append([b["tiles"], f"{b['input_size'][0]}x{b['input_size'][1]}",
                     f"{b['canvas_size'][0]}x{b['canvas_size'][1]}", b["patches_per_frame"], b["bank_size"],
                     *[st[s]["p50"] for s in stages], st["total"]["p50"], st["total"]["p95"], st["total"]["p99"],
                     per_tile, r["memory"]["after_run"]["vm_hwm_mib"]])
    first = next(iter(reports.values()))
    body = [f"Bottle ({first['settings']['images']} test PNGs of 384x384, decoded from bytes every frame), "
            f"{a.precision.upper()} + {a.knn}, {a.threads} threads, {a.frames} timed frames per bundle after "
            f"{a.warmup} warm-up" + (f", {a.gap_ms:g} ms idle between frames" if a.gap_ms else ", back to back")
            + f"; bundles fitted with coreset {a.coreset:.0%}, {a.folds} cross-fit folds, in {a.work}.", "",
            md_table(["tiles", "input", "canvas", "patches per frame", "bank", *[f"{s} p50 ms" for s in stages],
                      "total p50 ms", "total p95 ms", "total p99 ms", "ms per tile (p50)", "VmHWM MiB"], rows), "",
            "Each bundle has its own bank (1% of its own patches), so a frame with more tiles also searches a larger "
            "bank: the search column carries both effects."]
    body += ["", "Other processes used " + ", ".join(f"{loads[n]['other_processes_cpu_cores']} cores during {n}"
                                             for n in reports) + "."]
    write_results("tile_latency", "Latency vs tiles per frame, bottle", "\n".join(body),
                  {"work": str(a.work), "precision": a.precision, "knn": a.knn, "threads": a.threads,
                   "frames": a.frames, "warmup": a.warmup, "gap_ms": a.gap_ms, "summary": summary,
                   "reports": reports, "layout_loads": loads}, load, out_dir=a.results_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
