"""Resident memory of a loaded pipeline per search engine: how many copies of the bank each one holds.

    python benchmarks/search_memory.py --bundle BUNDLE [--knn hnsw hnswlib exact ivf]

Each engine is loaded in its own fresh process (imports done first, so they are not counted): VmRSS before the
bundle is read, after `Pipeline(...)` + `bundle.release()` (the verified bytes dropped, as the daemon does), and
VmHWM (the peak during the load). Memory does not depend on load from other processes, so this runs anywhere.
Writes benchmarks/results/search_memory_<bundle folder>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

CHILD = r"""
import gc, json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
import cv2, faiss, numpy, onnxruntime   # noqa: F401 - imported before the first reading: not the bank's memory
try:
    import hnswlib  # noqa: F401
except ImportError:
    pass
from edge_runtime.bundle import Bundle
from edge_runtime.pipeline import Pipeline

def status():
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024.0
    return out

before = status()
bundle = Bundle.load(Path(sys.argv[1]))
pipe = Pipeline(bundle, knn=sys.argv[2], threads=2)
bundle.release()
gc.collect()
after = status()
print(json.dumps({"rss_before_mib": before["VmRSS"], "rss_after_mib": after["VmRSS"], "peak_mib": after["VmHWM"],
                  "engine": type(pipe.search).__name__, "bank": [len(pipe.search), pipe.search.dim]}))
"""


def main(argv: list[str] | None = None) -> int:
    from bench_report import LoadMonitor, add_results_option, md_table, write_results

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", type=Path, required=True, help="bundle directory (required)")
    p.add_argument("--knn", nargs="+", default=["hnsw", "hnswlib", "exact", "ivf"],
                   help="engines to load, one process each (default: hnsw hnswlib exact ivf)")
    add_results_option(p)
    from bench_report import state_defaults   # every option's help states its default
    a = state_defaults(p).parse_args(argv)
    mon = LoadMonitor()
    rows, data = [], {}
    for knn in a.knn:
        run = subprocess.run([sys.executable, "-c", CHILD, str(a.bundle), knn, str(ROOT)], capture_output=True,
                             text=True, timeout=600)
        if run.returncode:
            print(f"knn {knn}: {run.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            continue
        r = json.loads(run.stdout.strip().splitlines()[-1])
        data[knn] = r
        bank_mib = r["bank"][0] * r["bank"][1] * 4 / 2**20
        rows.append([knn, r["engine"], f"{r['rss_after_mib'] - r['rss_before_mib']:.0f}", f"{r['peak_mib'] - r['rss_before_mib']:.0f}",
                     f"{bank_mib:.0f}", f"{(r['rss_after_mib'] - r['rss_before_mib']) / bank_mib:.1f}"])
    body = (f"Bundle {a.bundle}: bank {next(iter(data.values()))['bank'] if data else '?'}, fresh process per engine.\n\n"
            + md_table(["knn", "engine", "resident after load, MiB", "peak during load, MiB", "bank MiB (float32)",
                        "resident / bank"], rows)
            + "\n\nResident and peak are above the process's own baseline (interpreter, numpy, onnxruntime, faiss, "
              "opencv imported); they include the ONNX session (~1-3 MiB for lite0) and the re-check's 48-axis prefix "
              "(a third of the bank).\n")
    write_results(f"search_memory_{a.bundle.name}", "Resident memory per search engine", body,
                  {"bundle": str(a.bundle), "engines": data}, mon.stop(), out_dir=a.results_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
