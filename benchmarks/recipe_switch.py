"""Recipe switch time on a real bundle: a station with two recipes (the bundle and a copy that reads as another
product) switched back and forth through the same path the controller uses (RecipeSwitcher.request -> verified on
the line -> acknowledged). Warm: every recipe preloaded, a switch = golden self-test + swap. Cold: nothing
preloaded and a forced reload each time = checksums + build + self-test from disk. Writes
benchmarks/results/recipe_switch.json (load average recorded).

    PYTHONPATH=. nice -n 10 python benchmarks/recipe_switch.py --bundle /work/bundles/bottle --switches 6
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from edge_runtime.bench import cpu_info, load_average
from edge_runtime.config import StationConfig, resolve_paths
from edge_runtime.daemon import Station
from edge_runtime.schema import from_mapping

RESULTS = Path(__file__).resolve().parent / "results"


def second_product(bundle: Path, dest: Path) -> Path:
    shutil.copytree(bundle, dest)
    manifest = dest / "manifest.yaml"
    manifest.write_text(re.sub(r"^bundle_id: .*$", "bundle_id: recipe-b-copy", manifest.read_text(), count=1,
                               flags=re.M))
    return dest


def measure(bundle: Path, work: Path, switches: int, preload: bool, threads: int) -> dict:
    other = work / "b"
    if not other.exists():
        second_product(bundle, other)
    # An empty watched folder: a line that waits for parts while its recipe switches.
    (work / "incoming").mkdir(exist_ok=True)
    mapping = {"source": {"type": "folder", "path": str(work / "incoming"), "mode": "watch"},
               "trigger": {"type": "software"},
               "http": {"enabled": False}, "state_dir": str(work / f"state-{preload}"),
               "inference": {"threads": threads}, "recovery": {"read_timeout_s": 0.05, "exit_when_exhausted": False},
               "outputs": [], "recipes": {"preload": preload, "recipes": [
                   {"name": "a", "number": 1, "bundle": str(bundle)}, {"name": "b", "number": 2, "bundle": str(other)}]}}
    cfg = resolve_paths(from_mapping(StationConfig, mapping, "<bench>"), work)
    station = Station(cfg)
    thread = threading.Thread(target=station.run, daemon=True)
    t0 = time.monotonic()
    thread.start()
    line = station.line
    while not (line.recipes.status == "ok" and line._ready or time.monotonic() - t0 > 300):
        time.sleep(0.01)
    startup_s = time.monotonic() - t0
    times = []
    for i in range(switches):
        target = "b" if i % 2 == 0 else "a"
        line.recipes.request(target, "bench", force=not preload)
        while not (line.recipes.active.name == target and line.recipes.status == "ok" and not line.recipes.busy):
            time.sleep(0.002)
        times.append(line.recipes.last_switch_ms)
    station.request_stop()
    thread.join(60)
    v = np.asarray(times)
    return {"preload": preload, "startup_s": startup_s, "switch_ms": times,
            "p50_ms": float(np.percentile(v, 50)), "max_ms": float(v.max()),
            "golden_images": len(line.pipeline.variant.golden)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", type=Path, required=True, help="bundle directory (required)")
    p.add_argument("--switches", type=int, default=6, help="switches per mode (default: 6)")
    p.add_argument("--threads", type=int, default=2, help="inference threads (default: 2)")
    from bench_report import state_defaults   # every option's help states its default
    a = state_defaults(p).parse_args()
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="recipe-switch-") as tmp:
        warm = measure(a.bundle.resolve(), Path(tmp), a.switches, True, a.threads)
        cold = measure(a.bundle.resolve(), Path(tmp), a.switches, False, a.threads)
    report = {"bundle": str(a.bundle), "threads": a.threads, "warm": warm, "cold": cold,
              "machine": {"cpu": cpu_info(), "load_average_before": load_before, "load_average_after": load_average()}}
    for mode in ("warm", "cold"):
        r = report[mode]
        print(f"{mode:<5} switch p50 {r['p50_ms']:.0f} ms, max {r['max_ms']:.0f} ms over {len(r['switch_ms'])} switches "
              f"({r['golden_images']} golden images self-tested each); start-up {r['startup_s']:.1f} s")
    print(f"load average before {load_before}, after {report['machine']['load_average_after']}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "recipe_switch.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
