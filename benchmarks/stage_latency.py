"""Per-stage latency of the device pipeline (edge-bench) on the bottle test images, for the four engine settings.

    python benchmarks/stage_latency.py --bundle /tmp/bench_bundles/bottle10 --frames 249

Each setting runs `edge-bench BUNDLE --images DATA/test --frames N --threads 2 --precision P --knn K --json ...`
in its own process, so resident memory (VmRSS / VmHWM) belongs to that setting alone. The settings run one after
the other (not interleaved: see runtime_vs_reference.py for paired timings). Back to back (--gap-ms 0) is the
throughput case; with 150 ms between frames, thread pools that spin after their work (onnxruntime, OpenBLAS) have
gone quiet before the next part arrives, as on a line with spaced parts.
Writes benchmarks/results/stage_latency.{json,md} (and the raw edge-bench JSON of each setting inside it).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_report import (BOTTLE, DEFAULT_BUNDLE, LoadMonitor, add_results_option, ensure_bundle,  # noqa: E402
                          md_table, write_results)

from edge_runtime.bench import STAGES  # noqa: E402

# (precision, knn, idle ms between frames): back to back, then the two main settings as parts spaced on a line.
SETTINGS = (("int8", "hnsw", False), ("fp32", "exact", False), ("fp32", "hnsw", False), ("int8", "exact", False),
            ("int8", "hnsw", True), ("fp32", "exact", True))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE,
                   help=f"bottle bundle, fitted there if missing (default {DEFAULT_BUNDLE})")
    p.add_argument("--data", type=Path, default=BOTTLE, help=f"MVTec-style category folder (default {BOTTLE})")
    p.add_argument("--frames", type=int, default=249, help="timed frames per setting (3 passes over 83 images)")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime and HNSW search threads (default 2)")
    p.add_argument("--warmup", type=int, default=10, help="untimed frames per setting first (default 10)")
    p.add_argument("--gap-ms", type=int, default=150,
                   help="idle ms between frames for the spaced-parts settings (default 150)")
    add_results_option(p)
    from bench_report import state_defaults   # every option's help states its default
    a = state_defaults(p).parse_args()
    ensure_bundle(a.bundle, a.data)
    monitor = LoadMonitor()
    reports, loads = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for prec, knn, spaced in SETTINGS:
            gap = a.gap_ms if spaced else 0
            key = f"{prec.upper()} + {knn}" + (f", {gap} ms between frames" if gap else ", back to back")
            out = Path(tmp) / f"{prec}_{knn}_{gap}.json"
            cmd = [sys.executable, "-m", "edge_runtime.bench", str(a.bundle), "--images", str(a.data / "test"),
                   "--frames", str(a.frames), "--warmup", str(a.warmup), "--threads", str(a.threads), "--precision", prec,
                   "--knn", knn, "--gap-ms", str(gap), "--json", str(out)]
            one = LoadMonitor()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
            loads[key] = one.stop()
            print(proc.stdout, file=sys.stderr)
            report = json.loads(out.read_text())
            report.pop("samples_ms")   # percentiles are enough here; edge-bench --json keeps every sample
            report["command"] = "edge-bench " + " ".join(cmd[3:-2])
            reports[key] = report
    load = monitor.stop()

    b = next(iter(reports.values()))["bundle"]
    size = reports[next(iter(reports))]["settings"]["images"]
    tiles = f"{b['tiles']} tile{'s' if b['tiles'] != 1 else ''}" + (
        f" on a {b['canvas_size'][0]}x{b['canvas_size'][1]} canvas" if b["tiles"] != 1 else "")
    body = [f"Bundle {b['bundle_id']} (bottle, input {b['input_size'][0]}x{b['input_size'][1]}, {tiles}, "
            f"{b['grid'][0]}x{b['grid'][1]} patches per tile x {b['dim']}-d, bank {b['bank_size']}); the {size} bottle "
            f"test images (PNG) decoded from bytes every frame; {a.frames} timed frames per setting after {a.warmup} "
            f"warm-up; {a.threads} threads.", ""]
    for key, r in reports.items():
        st = r["stages_ms"]
        rows = [[s, st[s]["p50"], st[s]["p95"], st[s]["p99"], st[s]["max"], st[s]["mean"]] for s in STAGES]
        mem = r["memory"]["after_run"]
        re = r["rechecked_patches"]
        extra = (f"; re-checked patches per frame: mean {re['mean']:.1f}, max {re['max']:.0f} of {re['per_frame_of']}"
                 if re else "")
        body += [f"## {key}", "", f"`{r['command']}`", "",
                 md_table(["stage", "p50 ms", "p95 ms", "p99 ms", "max ms", "mean ms"], rows), "",
                 f"{r['throughput_fps']:.1f} frames/s; VmRSS {mem['vm_rss_mib']} MiB, VmHWM {mem['vm_hwm_mib']} MiB; "
                 f"model {r['bundle']['model_bytes'] / 1e6:.2f} MB, index {r['bundle']['index_bytes'] / 1e6:.2f} MB"
                 f"{extra}; ef {r['settings']['ef_search']}; other processes used "
                 f"{loads[key]['other_processes_cpu_cores']} cores meanwhile.", ""]
    body += ["## Summary (p50 ms)", "",
             md_table(["setting", *STAGES, "frames/s", "VmHWM MiB"],
                      [[k, *[r["stages_ms"][s]["p50"] for s in STAGES], r["throughput_fps"],
                        r["memory"]["after_run"]["vm_hwm_mib"]] for k, r in reports.items()])]
    write_results("stage_latency", "Per-stage latency (edge-bench), bottle", "\n".join(body),
                  {"bundle": str(a.bundle), "settings": reports, "setting_loads": loads}, load,
                  out_dir=a.results_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
