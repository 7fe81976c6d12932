"""Thread settings that decide how the pipeline's stages share 2 cores: measured per stage, nothing else changed.

    python benchmarks/runtime_knobs.py --bundle /tmp/bench_bundles/bottle10 --rounds 3
    python benchmarks/runtime_knobs.py --bundle /tmp/bench_bundles/bottle10 --rounds 2 --precision fp32 --knn exact

onnxruntime's intra-op pool spins ~40 ms after each run, OpenBLAS worker threads spin ~100 ms after each GEMM
(the exact re-check, exact search), OpenCV wakes its own pool for colour conversion and resize, hnswlib starts
threads per query batch: on a 2-core device they can take each other's cores. Each setting runs in its OWN process (a thread pool left
spinning by one setting must not slow the next one down), one pass over the bottle test images per round, the
settings' order rotated from round to round so slow drifts in machine load hit all of them alike.
Writes benchmarks/results/runtime_knobs.{json,md} (runtime_knobs_<precision>_<knn> for other engines).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_report import (BOTTLE, DEFAULT_BUNDLE, LoadMonitor, add_results_option, ensure_bundle,  # noqa: E402
                          geometry_text, md_table, median, percentile, write_results)

STAGES = ("decode", "geometry", "preprocess", "features", "search", "scoring", "decision", "total")

# name -> (environment, onnxruntime spins, OpenCV threads (None: its default), HNSW search threads (None: --threads), what)
SETTINGS = {
    "as deployed": ({}, True, None, None, "edge_runtime defaults"),
    "onnxruntime no spin": ({}, False, None, None, "session config session.intra_op.allow_spinning = 0"),
    "OpenBLAS 1 thread": ({"OPENBLAS_NUM_THREADS": "1"}, True, None, None, "numpy GEMM (exact search, re-check) on the calling thread"),
    "OpenBLAS no spin": ({"OPENBLAS_THREAD_TIMEOUT": "4"}, True, None, None,
                         "OPENBLAS_THREAD_TIMEOUT=4: 2 threads, workers sleep after 2^4 cycles"),
    "OpenCV 1 thread": ({}, True, 1, None, "cv2.setNumThreads(1)"),
    "hnswlib 1 thread": ({}, True, None, 1, "index.set_num_threads(1)"),
    "no spin (onnxruntime + OpenBLAS)": ({"OPENBLAS_THREAD_TIMEOUT": "4"}, False, None, None,
                                         "both pools keep 2 threads but sleep when idle"),
    "no spin + OpenBLAS 1 + OpenCV 1": ({"OPENBLAS_NUM_THREADS": "1"}, False, 1, None,
                                        "onnxruntime no spin, OpenBLAS and OpenCV single-threaded"),
}


def idle_cpu_after(call, window_s: float = 0.3, step_s: float = 0.005) -> dict:
    """CPU time this process burns while its main thread sleeps after `call()`: threads spinning for more work."""
    import time

    import numpy as np

    call()
    time.sleep(1.0)   # let pools from earlier calls go quiet first
    call()
    t0 = time.process_time()
    samples = []
    for _ in range(int(window_s / step_s)):
        time.sleep(step_s)
        samples.append(time.process_time() - t0)
    burnt = samples[-1]
    # Busy until the last step in which the process used more than half a core.
    steps = np.diff([0.0, *samples])
    busy = np.nonzero(steps > 0.5 * step_s)[0]
    quiet_after = step_s * (busy[-1] + 1) if busy.size else 0.0
    return {"cpu_ms_burnt": burnt * 1000.0, "busy_for_ms": quiet_after * 1000.0, "window_ms": window_s * 1000.0}


def spin_probe(a: argparse.Namespace) -> None:
    """One call of each pool the pipeline uses, then how long it keeps a core busy with nothing to do."""
    import numpy as np

    from edge_runtime.bundle import Bundle
    from edge_runtime.features import make_session, model_input, pixel_channels, takes_pixels

    bundle = Bundle.load(a.bundle)
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((int(bundle.variant(a.precision).info["bank_size"]), bundle.dim), dtype=np.float32)
    rows8 = rng.standard_normal((8, bundle.dim), dtype=np.float32)
    geom = bundle.geometry
    rows_all = rng.standard_normal((bundle.grid[0] * bundle.grid[1] * geom.n_tiles, bundle.dim), dtype=np.float32)
    session = make_session(bundle.path(bundle.variant(a.precision).model_file), a.threads)
    width, height = geom.input_size
    x = np.zeros((geom.n_tiles, 3, height, width), dtype=np.float32)   # one frame: every tile in one run
    x = model_input(x, takes_pixels(session), pixel_channels(session))   # the pixels, for INT8 graphs taking them
    name = session.get_inputs()[0].name
    print(json.dumps({
        "onnxruntime features run": idle_cpu_after(lambda: session.run(None, {name: x})),
        "numpy GEMM, 8 rows x bank (the HNSW re-check)": idle_cpu_after(lambda: rows8 @ bank.T),
        "numpy GEMM, all patches x bank (exact search)": idle_cpu_after(lambda: rows_all @ bank.T),
    }))


def worker(a: argparse.Namespace) -> None:
    """One setting, one pass: prints the per-frame stage timings and scores as one JSON line."""
    import cv2
    import onnxruntime as ort

    from edge_runtime.bundle import Bundle
    from edge_runtime.pipeline import Pipeline
    from edge_runtime.records import Frame, Verdict

    _, spin, cv_threads, hnsw_threads, _ = SETTINGS[a.worker]
    bundle = Bundle.load(a.bundle)
    pipe = Pipeline(bundle, a.precision, a.knn, a.threads)
    if not spin:
        opts = ort.SessionOptions()   # as edge_runtime.features.make_session, plus no spinning
        opts.intra_op_num_threads = a.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        pipe.extractor.session = ort.InferenceSession(str(bundle.path(pipe.variant.model_file)), opts,
                                                      providers=["CPUExecutionProvider"])
    if cv_threads is not None:
        cv2.setNumThreads(cv_threads)
    if hnsw_threads is not None and a.knn in ("hnsw", "hnswlib"):
        pipe.search.set_threads(hnsw_threads)
    images = [(str(f), f.read_bytes()) for f in sorted((a.data / "test").rglob("*.png"))][:a.images]
    for name, data in images[:5]:
        pipe.inspect(Frame(0, name, data))
    out = {s: [] for s in STAGES}
    scores = []
    for i, (name, data) in enumerate(images):
        r = pipe.inspect(Frame(i, name, data))
        if r.verdict is Verdict.FAULT:
            raise SystemExit(f"{name}: {r.error}")
        for s in STAGES:
            out[s].append(r.timings_ms[s])
        scores.append(r.score)
    print(json.dumps({"timings": out, "scores": scores, "opencv_threads": cv2.getNumThreads()}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE,
                   help=f"bottle bundle, fitted there if missing (default {DEFAULT_BUNDLE})")
    p.add_argument("--data", type=Path, default=BOTTLE, help=f"MVTec-style category folder (default {BOTTLE})")
    p.add_argument("--precision", default="int8", choices=["int8", "fp32"], help="bundle variant (default int8)")
    p.add_argument("--knn", default="hnsw", choices=["hnsw", "hnswlib", "exact"], help="search (default hnsw)")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime and HNSW search threads (default 2)")
    p.add_argument("--rounds", type=int, default=3, help="passes over the test images per setting (default 3)")
    p.add_argument("--images", type=int, default=None,
                   help="use only the first N test images per pass (default: all of them; small N for a quick trial)")
    add_results_option(p)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--spin-probe", action="store_true", help=argparse.SUPPRESS)
    from bench_report import state_defaults   # every option's help states its default
    a = state_defaults(p).parse_args()
    if a.worker:
        worker(a)
        return 0
    if a.spin_probe:
        spin_probe(a)
        return 0
    ensure_bundle(a.bundle, a.data)
    probe = subprocess.run([sys.executable, __file__, "--bundle", str(a.bundle), "--precision", a.precision,
                            "--threads", str(a.threads), "--spin-probe"], capture_output=True, text=True)
    if probe.returncode != 0:
        raise SystemExit(f"spin probe failed:\n{probe.stderr[-3000:]}")
    spin = json.loads(probe.stdout.strip().splitlines()[-1])
    names = list(SETTINGS)
    timings = {n: {s: [] for s in STAGES} for n in names}
    scores: dict[str, list] = {}
    cv_default = None
    monitor = LoadMonitor()
    for rnd in range(a.rounds):
        k = rnd % len(names)
        for n in names[k:] + names[:k]:
            env = {**os.environ, **SETTINGS[n][0]}
            cmd = [sys.executable, __file__, "--bundle", str(a.bundle), "--data", str(a.data), "--precision",
                   a.precision, "--knn", a.knn, "--threads", str(a.threads), "--worker", n]
            if a.images is not None:
                cmd += ["--images", str(a.images)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"setting {n!r} failed:\n{proc.stderr[-3000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            for s in STAGES:
                timings[n][s] += r["timings"][s]
            scores.setdefault(n, r["scores"])
            if n == "as deployed":
                cv_default = r["opencv_threads"]
        print(f"round {rnd + 1}/{a.rounds} done", file=sys.stderr)
    load = monitor.stop()

    base = median(timings["as deployed"]["total"])
    summary = {n: {"what": SETTINGS[n][4], "env": SETTINGS[n][0],
                   "stage_median_ms": {s: median(timings[n][s]) for s in STAGES},
                   "total_p95_ms": percentile(timings[n]["total"], 95),
                   "total_median_vs_deployed": base / median(timings[n]["total"]),
                   "frames": len(timings[n]["total"]),
                   "scores_identical": scores[n] == scores["as deployed"]} for n in names}
    from edge_runtime.bundle import Bundle

    n_images = len(timings["as deployed"]["total"]) // a.rounds
    body = [f"{a.precision.upper()} + {a.knn}, {a.threads} threads (onnxruntime intra-op; hnswlib unless set), "
            f"bundle {a.bundle} ({geometry_text(Bundle.load(a.bundle).geometry)}); OpenCV's default pool here: "
            f"{cv_default} threads. {a.rounds} rounds x {n_images} bottle test "
            "images per setting, each setting in its own process, order rotated per round.", "",
            md_table(["setting", "what", *[f"{s} ms" for s in STAGES], "total p95 ms", "median total vs deployed",
                      "same scores"],
                     [[n, s["what"], *[s["stage_median_ms"][st] for st in STAGES], s["total_p95_ms"],
                       f"{s['total_median_vs_deployed']:.2f}x", s["scores_identical"]] for n, s in summary.items()]),
            "", "## Why: CPU a pool burns after its work is done (main thread asleep, default settings)", "",
            md_table(["one call of", "CPU ms burnt afterwards", "busy for ms"],
                     [[k, v["cpu_ms_burnt"], v["busy_for_ms"]] for k, v in spin.items()]),
            "", "A pool that spins holds one of the two cores while the next stage (or the next part) wants both."]
    name = "runtime_knobs" if (a.precision, a.knn) == ("int8", "hnsw") else f"runtime_knobs_{a.precision}_{a.knn}"
    write_results(name, f"Thread settings on 2 cores: per-stage effect, {a.precision.upper()} + {a.knn}", "\n".join(body),
                  {"bundle": str(a.bundle), "precision": a.precision, "knn": a.knn, "threads": a.threads,
                   "rounds": a.rounds, "opencv_default_threads": cv_default, "settings": summary,
                   "spin_after_work": spin}, load, out_dir=a.results_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
