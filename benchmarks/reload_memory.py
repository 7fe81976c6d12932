"""Resident memory across bundle reloads: does RSS climb reload after reload, and what bounds it?

Runs the daemon's own reload path (`load_pipeline(..., load_threads=1)` in a fresh thread, swap, drop the old
pipeline, score one frame) N times in one process, in a fresh subprocess per mode, and prints VmRSS after every reload:

  plain      the old pipeline is dropped, nothing else (the daemon before malloc_trim)
  trim       + malloc_trim(0) after the drop (what the daemon does now: daemon.release_freed_memory)
  arena2     plain, with MALLOC_ARENA_MAX=2 in the environment (a systemd unit setting)

Usage: python benchmarks/reload_memory.py BUNDLE [--reloads 30] [--threads 4] [--json benchmarks/results/reload_memory.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

MODES = {"plain": {}, "trim": {}, "arena2": {"MALLOC_ARENA_MAX": "2"}}


def rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def child(bundle: str, reloads: int, threads: int, trim: bool) -> dict:
    """One mode, in this process: start-up load, then `reloads` reloads; RSS after each (MiB)."""
    import numpy as np

    from edge_runtime.config import StationConfig
    from edge_runtime.daemon import load_pipeline, release_freed_memory
    from edge_runtime.schema import from_mapping

    # The source is never opened: load_pipeline only needs a valid station.
    cfg = from_mapping(StationConfig, {"bundle": bundle, "source": {"type": "folder", "path": bundle},
                                       "inference": {"threads": threads}}, "bench")
    pipeline = load_pipeline(cfg)
    w, h = pipeline.geometry.input_size
    frame = np.zeros((pipeline.geometry.n_tiles, 3, h, w), dtype=np.float32)
    pipeline.score_tiles(frame)
    rss = [rss_mib()]
    seconds = []
    for _ in range(reloads):
        t0 = time.perf_counter()
        box = []
        # A fresh thread per reload, as Station._start_reload does (glibc may give each thread its own arena).
        worker = threading.Thread(target=lambda: box.append(load_pipeline(cfg, pipeline.bundle, load_threads=1)))
        worker.start()
        worker.join()
        seconds.append(time.perf_counter() - t0)
        pipeline = box.pop()                 # the old one is dropped here, as in Station._apply_reload
        if trim:
            release_freed_memory()
        pipeline.score_tiles(frame)         # the station inspects between reloads
        rss.append(rss_mib())
    return {"rss_mib": [round(r, 1) for r in rss], "reload_s_median": round(sorted(seconds)[len(seconds) // 2], 3)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="bundle directory to reload")
    p.add_argument("--reloads", type=int, default=30, help="reloads per mode (default: 30)")
    p.add_argument("--threads", type=int, default=4, help="inference.threads of the station (default: 4)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {', '.join(MODES)} (default: {','.join(MODES)})")
    p.add_argument("--json", default="benchmarks/results/reload_memory.json", help="where to write the figures "
                   "(default: benchmarks/results/reload_memory.json)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    from bench_report import state_defaults   # every option's help states its default
    a = state_defaults(p).parse_args()
    if a.child:
        print(json.dumps(child(a.bundle, a.reloads, a.threads, a.child == "trim")))
        return 0
    results = {}
    for mode in a.modes.split(","):
        env = {**os.environ, **MODES[mode]}
        out = subprocess.run([sys.executable, __file__, a.bundle, "--reloads", str(a.reloads), "--threads",
                              str(a.threads), "--child", mode], capture_output=True, text=True, env=env, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        results[mode] = r
        rss = r["rss_mib"]
        print(f"{mode:7s} start {rss[0]:6.1f} MiB  after 1 {rss[1]:6.1f}  after {a.reloads} {rss[-1]:6.1f}  "
              f"max {max(rss):6.1f}  (reload {r['reload_s_median']:.2f} s median)")
        print("        per reload: " + " ".join(f"{x:.0f}" for x in rss))
    report = {"bundle": str(a.bundle), "reloads": a.reloads, "threads": a.threads, "machine": platform.machine(),
              "cpus": os.cpu_count(), "python": platform.python_version(), "modes": results}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
