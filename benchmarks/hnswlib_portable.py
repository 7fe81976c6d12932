"""hnswlib built portable (HNSWLIB_NO_NATIVE=1) against its default -march=native build: build time and search speed.

    python benchmarks/hnswlib_portable.py --bundle /tmp/bench_bundles/bottle10 [--builds native portable x86-64-v3]

Each build is `device_configs/build_wheelhouse.sh`'s hnswlib step (pip wheel from the sdist, timed), installed into
its own --target folder; a child process per build loads the bundle's own HNSW index (the deployed variant's
bank) and queries it with the bundle's INT8 features of bottle test images at the manifest's ef, on --threads
threads, interleaved round-robin over the builds. Optionally compares the chroma-hnswlib binary wheel (--chroma), a
fork with aarch64 wheels on PyPI. Writes benchmarks/results/hnswlib_portable.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_report import BOTTLE, LoadMonitor, add_results_option, md_table, write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BUILD_ENV = {
    "native": {},                                                   # hnswlib's setup.py default: -O3 -march=native
    "portable": {"HNSWLIB_NO_NATIVE": "1", "CFLAGS": "-O3"},        # the architecture's baseline (x86-64: SSE2)
    "x86-64-v3": {"HNSWLIB_NO_NATIVE": "1", "CFLAGS": "-O3 -march=x86-64-v3"},   # AVX2 + FMA floor
}

CHILD = r"""
import json, sys, time
import numpy as np
import hnswlib
index_path, dim, ef, threads, queries_path, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], int(sys.argv[6])
q = np.load(queries_path)                        # (frames, patches, dim) float32
idx = hnswlib.Index(space="l2", dim=dim)
idx.load_index(index_path)
idx.set_ef(ef)
idx.set_num_threads(threads)
labels0, d0 = idx.knn_query(q[0], k=1)           # warm-up
out = []
for line in sys.stdin:                           # one round per line from the parent: interleaved with the others
    times = []
    for f in q:
        t0 = time.perf_counter()
        labels, d = idx.knn_query(f, k=1)
        times.append((time.perf_counter() - t0) * 1000.0)
    print(json.dumps({"ms": times, "sum_d": float(np.sqrt(np.maximum(d, 0)).sum())}), flush=True)
"""


def _children_cpu() -> float:
    """CPU seconds of finished child processes (pip and the compiler): unlike wall time, not inflated by load."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def build(name: str, version: str, work: Path) -> dict:
    target, wheels = work / name / "site", work / name / "wheels"
    for p in (target, wheels):
        if p.exists():
            subprocess.run(["rm", "-rf", str(p)], check=True)
    wheels.mkdir(parents=True)
    env = {**os.environ, **BUILD_ENV[name]}
    if name == "native":
        env.pop("HNSWLIB_NO_NATIVE", None)
    cpu0 = _children_cpu()
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "--no-binary", "hnswlib",
                          f"hnswlib=={version}", "-w", str(wheels)], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    cpu = _children_cpu() - cpu0
    if run.returncode != 0:
        raise RuntimeError(f"building hnswlib ({name}) failed:\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}")
    wheel = next(wheels.glob("hnswlib-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(target),
                    str(wheel)], check=True, capture_output=True)
    return {"build_seconds": round(seconds, 1), "build_cpu_seconds": round(cpu, 1), "wheel": str(wheel), "wheel_bytes": wheel.stat().st_size,
            "site": str(target), "env": BUILD_ENV[name]}


def zmm_instructions(site: Path) -> int:
    """AVX-512 register uses in the built extension: > 0 means the wheel needs AVX-512 (SIGILL without it)."""
    so = next(Path(site).glob("hnswlib*.so"))
    try:
        dis = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(so)], capture_output=True, text=True).stdout
    except FileNotFoundError:
        return -1
    return dis.count("%zmm")


def queries(bundle_dir: Path, data: Path, n_frames: int) -> tuple[np.ndarray, dict]:
    """The deployed variant's features of the first bottle test images, through the public Pipeline API."""
    import cv2

    from edge_runtime.bundle import Bundle
    from edge_runtime.pipeline import Pipeline
    from edge_runtime.preprocess import preprocess
    from export.dataset import test_images

    bundle = Bundle.load(bundle_dir)
    pipe = Pipeline(bundle, threads=2)
    items = test_images(data)
    step = max(1, len(items) // n_frames)
    feats = []
    for it in items[::step][:n_frames]:
        rgb = cv2.cvtColor(cv2.imread(str(it.path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        tensor, _, _ = preprocess(rgb, pipe.geometry, str(it.path))
        feats.append(np.asarray(pipe.extractor(tensor), dtype=np.float32).reshape(-1, bundle.dim))
    info = {"bundle": str(bundle_dir), "variant": pipe.variant.name, "index_file": str(bundle.path(pipe.variant.index_file)),
            "dim": bundle.dim, "bank_size": pipe.variant.info.get("bank_size"), "ef": bundle.hnsw_params.ef_search,
            "patches_per_frame": feats[0].shape[0]}
    return np.stack(feats), info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, default=Path("/tmp/bench_bundles/bottle10"),
                   help="bundle whose HNSW index and features are searched (default /tmp/bench_bundles/bottle10)")
    p.add_argument("--data", type=Path, default=BOTTLE, help=f"benchmark folder for the query frames (default {BOTTLE})")
    p.add_argument("--builds", nargs="+", default=["native", "portable", "x86-64-v3"], choices=sorted(BUILD_ENV),
                   help="hnswlib builds to compare (default: native portable x86-64-v3)")
    p.add_argument("--chroma", default="chroma-hnswlib==0.7.6",
                   help="also time this binary-wheel fork (module name hnswlib); '' to skip (default chroma-hnswlib==0.7.6)")
    p.add_argument("--hnswlib-version", default="0.8.0", help="hnswlib sdist version (default 0.8.0)")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/hnswlib_builds"),
                   help="build folders and --target installs (default /tmp/hnswlib_builds)")
    p.add_argument("--frames", type=int, default=20, help="query frames (default 20)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds over the frames (default 5)")
    p.add_argument("--threads", type=int, default=2, help="hnswlib query threads (default 2)")
    add_results_option(p)
    from bench_report import state_defaults   # every option's help states its default
    a = state_defaults(p).parse_args(argv)

    a.work_dir.mkdir(parents=True, exist_ok=True)
    q, info = queries(a.bundle, a.data, a.frames)
    qpath = a.work_dir / "queries.npy"
    np.save(qpath, q)

    load = LoadMonitor()
    builds = {}
    for name in a.builds:
        print(f"building hnswlib {a.hnswlib_version} ({name}) ...", file=sys.stderr)
        builds[name] = build(name, a.hnswlib_version, a.work_dir)
        builds[name]["zmm_instructions"] = zmm_instructions(Path(builds[name]["site"]))
    if a.chroma:
        target = a.work_dir / "chroma" / "site"
        subprocess.run(["rm", "-rf", str(target)], check=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--only-binary=:all:", "--target",
                        str(target), a.chroma], check=True, capture_output=True)
        builds["chroma-hnswlib wheel"] = {"build_seconds": None, "install_seconds": round(time.perf_counter() - t0, 1),
                                          "site": str(target), "package": a.chroma,
                                          "zmm_instructions": zmm_instructions(target)}

    children = {}
    for name, b in builds.items():
        # Loading the bundle's own index first: a build that cannot read it is reported, not timed.
        env = {**os.environ, "PYTHONPATH": b["site"], "OMP_NUM_THREADS": "1"}
        check = subprocess.run([sys.executable, "-c", "import hnswlib, sys; i = hnswlib.Index(space='l2', dim=int(sys.argv[2]));"
                                " i.load_index(sys.argv[1]); print(i.get_current_count())", info["index_file"],
                                str(info["dim"])], env=env, capture_output=True, text=True)
        if check.returncode != 0:
            b["error"] = (check.stderr.strip().splitlines() or ["?"])[-1]
            print(f"{name}: cannot load {info['index_file']}: {b['error']}", file=sys.stderr)
            continue
        children[name] = subprocess.Popen(
            [sys.executable, "-c", CHILD, info["index_file"], str(info["dim"]), str(info["ef"]), str(a.threads),
             str(qpath), "1"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    ms = {name: [] for name in children}
    sums = {}
    for _ in range(a.rounds):
        for name, child in children.items():       # round-robin: drifting load hits every build alike
            child.stdin.write("go\n")
            child.stdin.flush()
            r = json.loads(child.stdout.readline())
            ms[name] += r["ms"]
            sums[name] = r["sum_d"]
    for child in children.values():
        child.stdin.close()
        child.wait()
    load = load.stop()

    ref = float(np.median(ms["native"])) if "native" in ms else None
    rows = []
    for name, b in builds.items():
        if name not in ms:
            rows.append([name, b["build_seconds"], b.get("build_cpu_seconds"), b["zmm_instructions"], None, None,
                         None, "cannot load the index: " + b["error"]])
            continue
        v = np.asarray(ms[name])
        med = float(np.median(v))
        b.update({"search_median_ms": med, "search_p90_ms": float(np.percentile(v, 90)),
                  "search_p99_ms": float(np.percentile(v, 99)), "sum_of_nn_distances": sums[name]})
        rows.append([name, b["build_seconds"], b.get("build_cpu_seconds"), b["zmm_instructions"], med, b["search_p90_ms"],
                     med / ref if ref else None, round(sums[name], 1)])
    body = "\n".join([
        f"Bank: {info['bank_size']} x {info['dim']} ({info['variant']} variant of {info['bundle']}), ef {info['ef']}, "
        f"{info['patches_per_frame']} query patches per frame, {a.frames} frames x {a.rounds} rounds, "
        f"{a.threads} threads, builds interleaved round-robin.", "",
        md_table(["build", "build s (wall)", "build CPU s", "zmm (AVX-512) uses", "search median ms/frame", "p90 ms", "x native",
                  "sum of NN distances (last round)"], rows), "",
        "native = hnswlib's default (-O3 -march=native: this CPU only); portable = HNSWLIB_NO_NATIVE=1 (architecture "
        "baseline: runs on every x86-64 / every aarch64); x86-64-v3 = HNSWLIB_NO_NATIVE=1 CFLAGS=-march=x86-64-v3 "
        "(AVX2/FMA floor). The same sum of distances means the same neighbours were found.",
    ])
    write_results("hnswlib_portable", "hnswlib: portable wheel vs -march=native", body,
                  {"index": info, "builds": builds, "rounds": a.rounds, "frames": a.frames, "threads": a.threads,
                   "loadavg": os.getloadavg()}, load, out_dir=a.results_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
