"""Latency of the deployed path with the kernels an x86 CPU without AVX-512 or VNNI gets, on this CPU's cores.

    python benchmarks/non_vnni_latency.py --bundle bottle10=DIR [--bundle bottle1=DIR] [--precisions int8,fp32]
        [--rounds 3] [--frames 166]

onnxruntime (INT8 and float kernels), numpy and faiss choose their SIMD code by CPUID. `cpuid_mask/mask_cpuid.c`,
preloaded into edge-bench, makes CPUID fault (Linux arch_prctl ARCH_SET_CPUID, on CPUs with CPUID faulting) and
answers it with the AVX-512, VNNI and AMX bits cleared: the libraries then dispatch as on an AVX2 CPU
(Haswell..Coffee Lake, Zen 1-3) and run those kernels here at native speed. This isolates the kernels, not the
chip: a real AVX2 CPU also differs in clock, cache and execution ports. Each round runs `edge-bench BUNDLE --raw`
once with and once without the mask (order alternating), in fresh processes. Needs gcc to build the shim.
On a CPU that itself lacks AVX-512 and VNNI the runs are native, unmasked (no gcc or CPUID faulting needed).
Writes benchmarks/results/non_vnni_latency.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_report import BOTTLE, LoadMonitor, add_results_option, md_table, median, write_results  # noqa: E402

SHIM = Path(__file__).resolve().parent / "cpuid_mask" / "mask_cpuid.c"
STAGES = ("geometry", "features", "search", "total")
# What the masked process must see: no AVX-512 in numpy's CPUID view, and onnxruntime's u8 x s8 full-range
# product inexact (its AVX2 kernel); otherwise the mask did not take and the comparison would be meaningless.
CHECK = ("import json; from numpy._core._multiarray_umath import __cpu_features__ as f; "
         "from edge_runtime.int8_kernels import exact_products; "
         "print(json.dumps({'avx512f': bool(f.get('AVX512F')), 'u8s8_exact': exact_products('QUInt8', 127)}))")


def build_shim(work: Path) -> Path:
    if shutil.which("gcc") is None:
        raise SystemExit("gcc not found: needed to build benchmarks/cpuid_mask/mask_cpuid.c")
    if "cpuid_fault" not in Path("/proc/cpuinfo").read_text():
        raise SystemExit("this CPU (or VM) offers no CPUID faulting: the mask cannot work here")
    so = work / "mask_cpuid.so"
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(so), str(SHIM)], check=True)
    return so


def bench(bundle: Path, precision: str, images: Path, frames: int, env: dict, out: Path) -> dict:
    cmd = ["edge-bench", str(bundle), "--precision", precision, "--images", str(images), "--frames", str(frames),
           "--raw", "--json", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr[-2000:]}")
    d = json.loads(out.read_text())
    return {s: {"p50": d["stages_ms"][s]["p50"], "p99": d["stages_ms"][s]["p99"]} for s in STAGES}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", action="append", required=True, metavar="LABEL=DIR",
                    help="bundle to time, labelled (repeat for each; required)")
    ap.add_argument("--images", type=Path, default=BOTTLE / "test",
                    help="images cycled as raw frames (default: ../shared/data/mvtec_ad/bottle/test)")
    ap.add_argument("--frames", type=int, default=166, help="timed frames per edge-bench run (default: 166)")
    ap.add_argument("--precisions", default="int8",
                    help="bundle variants to time, comma-separated (default: int8); int8,fp32 shows which one an "
                         "AVX2-only CPU should run")
    ap.add_argument("--rounds", type=int, default=3, help="runs per bundle and kind, alternating (default: 3)")
    ap.add_argument("--name", default="non_vnni_latency", help="results file name (default: non_vnni_latency)")
    add_results_option(ap)
    from bench_report import state_defaults   # every option's help states its default
    a = state_defaults(ap).parse_args()
    load = LoadMonitor()
    runs: dict = {}
    def sees(env: dict) -> dict:
        return json.loads(subprocess.run([sys.executable, "-c", CHECK], env=env, cwd=ROOT, capture_output=True,
                                         text=True, check=True).stdout)

    avx2_only = {"avx512f": False, "u8s8_exact": False}
    with tempfile.TemporaryDirectory(prefix="non-vnni-") as tmp:
        work = Path(tmp)
        native = sees(dict(os.environ))
        if native == avx2_only:
            # A real AVX2-only CPU (Haswell..Coffee Lake, Zen 1-3): its own kernels, clock and caches; no mask.
            envs, seen = {"avx2": dict(os.environ)}, {"avx2": native}
        else:
            so = build_shim(work)
            envs = {"vnni": dict(os.environ), "avx2": {**os.environ, "LD_PRELOAD": str(so)}}
            seen = {"vnni": native, "avx2": sees(envs["avx2"])}
            if seen["avx2"] != avx2_only:
                raise SystemExit(f"the CPUID mask did not take: {seen['avx2']}")
        for item in a.bundle:
            bundle_label, _, path = item.partition("=")
            for precision in a.precisions.split(","):
                label = f"{bundle_label} {precision}"
                runs[label] = {kind: [] for kind in envs}
                for r in range(a.rounds):
                    for kind in sorted(envs, reverse=r % 2 == 0):   # alternating when there are two
                        res = bench(Path(path), precision, a.images, a.frames, envs[kind], work / "bench.json")
                        runs[label][kind].append(res)
                        print(f"{label} round {r + 1} {kind}: "
                              + ", ".join(f"{s} {res[s]['p50']:.2f}" for s in STAGES), flush=True)
    rows = []
    for label, kinds in runs.items():
        for kind, rs in kinds.items():
            rows.append([label, "AVX-512 + VNNI (this CPU)" if kind == "vnni" else
                         "AVX2 only (CPUID masked)" if "vnni" in envs else "AVX2 only (this CPU, native)"]
                        + [f"{median([x[s]['p50'] for x in rs]):.2f}" for s in STAGES]
                        + [f"{median([x['total']['p99'] for x in rs]):.2f}"])
    body = md_table(["bundle, variant", "kernels", *(f"{s} p50" for s in STAGES), "total p99"], rows)
    body += (f"\n\nMedians over {a.rounds}{' alternating' if len(envs) > 1 else ''} `edge-bench --raw` runs of {a.frames} frames per bundle and kind, "
             "2 threads. What each process saw (numpy's CPUID view, the INT8 probe): "
             f"{json.dumps(seen)}. "
             + ("Same cores: the kernels differ, the chip does not.\n" if "vnni" in envs else
                "A CPU without AVX-512 or VNNI: its own kernels, clock and caches, nothing masked.\n"))
    write_results(a.name, "Deployed path with AVX2-only kernels (CPUID masked) vs this CPU's" if "vnni" in envs else
                  "Deployed path on an AVX2-only CPU (native)",
                  body, {"seen": seen, "runs": runs}, load.stop(), out_dir=a.results_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
