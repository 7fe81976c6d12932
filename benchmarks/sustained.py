"""Sustained throughput of the station loop from camera-paced sources: one line at 60 fps (capture thread on and
off) and at a rate the machine keeps up with, and two lines in one daemon (both rates). Prints the tables and writes benchmarks/results/sustained_60fps.json and
benchmarks/results/two_lines.json (load average recorded before and after each run). `--only workers`: one line
with inference.workers 1 and 2, alternating, at --fps and at --saturate-fps (more than the machine inspects, so
the figure is the line's ceiling), written to benchmarks/results/sustained_workers.json.

    PYTHONPATH=. nice -n 10 python benchmarks/sustained.py --bundle /work/bundles/bottle \
        --images ../shared/data/mvtec_ad/bottle/test --duration-s 20
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edge_runtime.bench import run_bench
from edge_runtime.bench_sustained import format_sustained, run_sustained

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_report import add_results_option  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", type=Path, required=True, help="bundle directory (required)")
    p.add_argument("--images", type=Path, required=True, help="folder of images the paced sources replay (required)")
    p.add_argument("--fps", type=float, default=60.0, help="frames per second of each source (default: 60)")
    p.add_argument("--duration-s", type=float, default=20.0, help="seconds per run (default: 20)")
    p.add_argument("--threads", type=int, default=2, help="inference threads of the station (default: 2)")
    p.add_argument("--keepup-fps", type=float, default=2.0,
                   help="also a rate this machine keeps up with, to show nothing is dropped then (default: 2)")
    p.add_argument("--only", choices=["one", "two", "workers"],
                   help="run only the one-line, the two-line or the workers part (default: one and two)")
    p.add_argument("--saturate-fps", type=float, default=100.0,
                   help="workers part: a rate above what the line inspects (default: 100)")
    p.add_argument("--rounds", type=int, default=2, help="workers part: alternating rounds (default: 2)")
    add_results_option(p)
    from bench_report import state_defaults   # every option's help states its default
    a = state_defaults(p).parse_args()
    RESULTS = a.results_dir
    RESULTS.mkdir(parents=True, exist_ok=True)
    # The machine's speed in this window: back-to-back latency of the same bundle (the sustained figures read
    # against it; on a shared machine the load changes run to run).
    ref = run_bench(a.bundle, a.images, frames=40, warmup=5, threads=a.threads)
    reference = {"back_to_back_total_ms": ref["stages_ms"]["total"], "throughput_fps": ref["throughput_fps"],
                 "load_average": ref["machine"]["load_average"]}
    print(f"back to back now: total p50 {reference['back_to_back_total_ms']['p50']:.1f} ms, "
          f"{reference['throughput_fps']:.1f} frames/s, load {reference['load_average']}\n")
    if a.only in (None, "one"):
        runs = {"reference": reference}
        for name, thread in (("capture_thread", True), ("no_capture_thread", False)):
            runs[name] = run_sustained(a.bundle, a.images, fps=a.fps, duration_s=a.duration_s, threads=a.threads,
                                       capture_thread=thread)
            print(format_sustained(runs[name]), "\n")
        runs["keepup"] = run_sustained(a.bundle, a.images, fps=a.keepup_fps, duration_s=a.duration_s,
                                       threads=a.threads)
        print(format_sustained(runs["keepup"]), "\n")
        (RESULTS / "sustained_60fps.json").write_text(json.dumps(runs, indent=1))
    if a.only in (None, "two"):
        # inference.threads is the station's budget: with 2 lines each gets threads // 2.
        two = {"reference": reference,
               "saturated": run_sustained(a.bundle, a.images, fps=a.fps, duration_s=a.duration_s, threads=a.threads,
                                          lines=2),
               "keepup": run_sustained(a.bundle, a.images, fps=a.keepup_fps, duration_s=a.duration_s,
                                       threads=a.threads, lines=2)}
        print(format_sustained(two["saturated"]), "\n")
        print(format_sustained(two["keepup"]))
        (RESULTS / "two_lines.json").write_text(json.dumps(two, indent=1))
    if a.only == "workers":
        runs = {"reference": reference, "runs": []}
        for r in range(a.rounds):
            for fps in (a.fps, a.saturate_fps):
                for workers in (1, 2):
                    rep = run_sustained(a.bundle, a.images, fps=fps, duration_s=a.duration_s, threads=a.threads,
                                        workers=workers)
                    runs["runs"].append({"round": r, "fps": fps, "workers": workers, "report": rep})
                    print(format_sustained(rep), "\n")
        print(f"{'fps':>6}{'workers':>8}{'inspected':>10}{'dropped':>8}{'frames/s':>9}{'p50 ms':>8}{'p99 ms':>8}")
        for run in runs["runs"]:
            line = run["report"]["per_line"][0]
            pm = line["pipeline_ms"] or {}
            print(f"{run['fps']:>6g}{run['workers']:>8}{line['inspected']:>10}{line['dropped']:>8}"
                  f"{line['throughput_fps'] or 0:>9.1f}{pm.get('p50', float('nan')):>8.1f}{pm.get('p99', float('nan')):>8.1f}")
        (RESULTS / "sustained_workers.json").write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
