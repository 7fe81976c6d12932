"""`edge-bench BUNDLE`: per-stage latency of the device pipeline on real encoded images, on this machine.

It times exactly what the daemon runs (`Pipeline.inspect`, from encoded bytes to the decision) and reports the
machine alongside the numbers, because a latency figure without the CPU, ISA and thread count is meaningless.
Runtime modules only: no torch, so it runs on the device itself.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from edge_runtime.bundle import Bundle, BundleError
from edge_runtime.decode import decode_image, to_rgb
from edge_runtime.features import FeatureError, model_input
from edge_runtime.geometry import cut_tiles
from edge_runtime.int8_kernels import capability as int8_capability
from edge_runtime.nn_search import EF_MAX, device_blas
from edge_runtime.pipeline import Pipeline
from edge_runtime.preprocess import canvas_of, to_tensor
from edge_runtime.records import Frame, Verdict

STAGES = ("decode", "geometry", "quality", "preprocess", "features", "search", "scoring", "decision", "total")
THREAD_ENV = ("OPENBLAS_NUM_THREADS", "OPENBLAS_THREAD_TIMEOUT", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
              "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
# Back-to-back runs of the model alone after the timed frames: this minute's pace of the machine for the largest
# stage (on a shared VM the same model took 2.2 ms in one hour and 3.4 in another), to read the totals against.
MODEL_ALONE_RUNS = 50
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
# The ISA features that decide which onnxruntime / BLAS kernels run (INT8 dot products above all).
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni",
             "avx512_bf16", "amx_int8", "neon", "asimd", "asimddp", "i8mm", "sve")


class BenchError(RuntimeError):
    """The benchmark cannot run or produced no valid measurement; the message says why."""


# ---- the machine ---------------------------------------------------------------------------------------------
def cpu_info(cpuinfo_text: str | None = None) -> dict:
    """CPU model, core counts and the relevant ISA flags from /proc/cpuinfo (x86 'flags', ARM 'Features')."""
    if cpuinfo_text is None:
        try:
            cpuinfo_text = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo_text = ""
    model, flags = None, set()
    for line in cpuinfo_text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if model is None and key in ("model name", "hardware", "cpu model"):
            model = value.strip()
        elif key in ("flags", "features"):
            flags.update(value.split())
    if model is None:
        try:  # ARM boards often name themselves only in the device tree
            model = Path("/proc/device-tree/model").read_bytes().rstrip(b"\0").decode(errors="replace")
        except OSError:
            model = platform.processor() or platform.machine()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"model": model, "arch": platform.machine(), "logical_cpus": os.cpu_count(), "usable_cpus": usable,
            "isa": {f: (f in flags) for f in ISA_FLAGS}}


def software_info() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import onnxruntime

    def installed(dist: str) -> str | None:
        try:
            return version(dist)
        except PackageNotFoundError:
            return None
    return {"python": platform.python_version(), "onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
            "opencv": cv2.__version__, "faiss": installed("faiss-cpu"), "hnswlib": installed("hnswlib"),
            "kernel": platform.release()}


def memory_status() -> dict:
    """Resident memory now (VmRSS) and its peak (VmHWM), in MiB; None where /proc is not available."""
    out = {"vm_rss_mib": None, "vm_hwm_mib": None}
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            kib = float(value.split()[0])  # the kernel always reports these in kB
            out["vm_rss_mib" if key == "VmRSS" else "vm_hwm_mib"] = round(kib / 1024.0, 2)
    return out


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def cpu_counters(stat_text: str | None = None) -> dict | None:
    """All CPUs' time since boot from /proc/stat, in jiffies: total, busy (not idle or waiting for I/O) and steal
    (time the hypervisor ran something else while this VM's vCPUs had work); None where there is no /proc/stat."""
    try:
        text = stat_text if stat_text is not None else Path("/proc/stat").read_text()
        fields = [int(x) for x in text.splitlines()[0].split()[1:9]]
    except (OSError, ValueError, IndexError):
        return None
    fields += [0] * (8 - len(fields))   # kernels before 2.6.11 list no steal
    total = sum(fields)
    return {"total": total, "busy": total - fields[3] - fields[4], "steal": fields[7]}


def cpu_during(before: dict | None, after: dict | None, own_cpu_s: float, wall_s: float) -> dict | None:
    """What the machine did while the frames ran: the share of CPU time stolen by the hypervisor (a shared VM's
    slow minutes) and the cores other processes kept busy. None without /proc/stat counters."""
    if before is None or after is None or wall_s <= 0:
        return None
    total = after["total"] - before["total"]
    if total <= 0:
        return None
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    busy_s = (after["busy"] - after["steal"] - before["busy"] + before["steal"]) / tick
    return {"steal_percent": round(100.0 * (after["steal"] - before["steal"]) / total, 2),
            "other_processes_cores": round(max(busy_s - own_cpu_s, 0.0) / wall_s, 3)}


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


# ---- statistics ----------------------------------------------------------------------------------------------
def summarize(values_ms: list[float] | np.ndarray) -> dict:
    v = np.asarray(values_ms, dtype=np.float64)
    if v.size == 0:
        raise BenchError("no timings to summarise")
    p50, p95, p99 = np.percentile(v, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "max": float(v.max()), "mean": float(v.mean()),
            "count": int(v.size)}


# ---- inputs --------------------------------------------------------------------------------------------------
def load_images(bundle: Bundle, images_dir: Path | None, precision: str | None) -> list[tuple[str, bytes]]:
    """(name, encoded bytes) of the benchmark images: every image file under `images_dir` (recursively, so an
    MVTec-style test/ folder with good and defect sub-folders works as is), else the bundle's golden images."""
    if images_dir is not None:
        images_dir = Path(images_dir)
        if not images_dir.is_dir():
            # A file given for the folder is named as such: "does not exist" sent users looking for a typo.
            what = "is not a directory (--images takes a folder of images)" if images_dir.exists() \
                else "image directory does not exist"
            raise BenchError(f"{images_dir}: {what}")
        paths = sorted(p for p in images_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise BenchError(f"{images_dir}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    else:
        paths = [bundle.path(g["file"]) for g in bundle.variant(precision).golden]
        if not paths:
            raise BenchError(f"{bundle.root}: the bundle has no golden images; pass --images DIR")
    return [(str(p), p.read_bytes()) for p in paths]


# ---- the run -------------------------------------------------------------------------------------------------
def run_bench(bundle_dir: Path, images_dir: Path | None = None, frames: int = 200, warmup: int = 10,
              threads: int = 2, precision: str | None = None, knn: str = "hnsw", ef: int | None = None,
              providers: list[str] | None = None, gap_ms: float = 0.0, raw: bool = False,
              ivf_nprobe: int | None = None, seed_step: int | None = None, ef_seeded: int | None = None,
              position_prior: bool = True) -> dict:
    """Inspect `frames` frames (images cycled) after `warmup` untimed ones; the full report as a plain dict.

    raw=True feeds each image as a camera would: an 8-bit BGR array decoded once before the run, so the
    "decode" stage is only validation and colour order, not PNG/JPEG decompression.

    gap_ms idles between frames like the spacing of parts on a line: thread pools that spin after their work
    (onnxruntime, OpenBLAS) then go quiet before the next part, which back-to-back frames (0) never allow.
    """
    if frames < 1:
        raise BenchError(f"--frames must be at least 1, got {frames}")
    if warmup < 0:
        raise BenchError(f"--warmup must be >= 0, got {warmup}")
    if not 0 <= gap_ms < math.inf:   # NaN passed `< 0`; inf raised OverflowError in time.sleep after the load
        raise BenchError(f"--gap-ms must be >= 0 and finite, got {gap_ms}")
    mem_start = memory_status()
    t0 = time.perf_counter()
    bundle = Bundle.load(bundle_dir)
    pipeline = Pipeline(bundle, precision=precision, knn=knn, threads=threads, providers=providers, ef_search=ef,
                        ivf_nprobe=ivf_nprobe, seed_step=seed_step, ef_seeded=ef_seeded,
                        position_prior=position_prior)
    load_s = time.perf_counter() - t0
    images = load_images(bundle, images_dir, precision)
    if raw:
        arrays = []
        for name, data in images:
            # As the camera's driver hands it over: grey stays one channel, 16-bit stays 16-bit (the bundle's
            # preprocessing.shift_16bit applies in the pipeline, as to a camera's frames).
            array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
            if array is None:
                raise BenchError(f"{name}: OpenCV cannot decode this image for --raw")
            arrays.append(array)
    mem_loaded = memory_status()

    def inspect(i: int):
        name, data = images[i % len(images)]
        frame = (Frame(frame_id=i, source=name, image=arrays[i % len(images)]) if raw
                 else Frame(frame_id=i, source=name, encoded=data))
        result = pipeline.inspect(frame)
        if result.verdict is Verdict.FAULT:
            # A faulted frame skips stages: timing it would flatter the pipeline. Stop and say why.
            raise BenchError(f"{name}: frame faulted ({result.error}); the benchmark needs inspectable images")
        return result

    with device_blas(pipeline.knn):   # as the daemon runs: BLAS on one thread (edge_runtime.nn_search)
        for i in range(warmup):
            inspect(i)
        per_stage: dict[str, list[float]] = {s: [] for s in STAGES}
        heat_ms: list[float] = []
        rechecked: list[int] = []
        verdicts = {v.value: 0 for v in (Verdict.OK, Verdict.REVIEW, Verdict.NG)}
        hnsw = pipeline.search if pipeline.knn in ("hnsw", "hnswlib") else None
        idle_s = 0.0
        counters, own_start = cpu_counters(), _own_cpu_s()
        loop_start = time.perf_counter()
        for i in range(frames):
            if gap_ms > 0:
                t_idle = time.perf_counter()
                time.sleep(gap_ms / 1000.0)
                idle_s += time.perf_counter() - t_idle
            result = inspect(warmup + i)
            for stage in STAGES:
                per_stage[stage].append(result.timings_ms[stage])
            if hnsw is not None or knn == "ivf":   # both re-check the image score exactly (read before the
                rechecked.append(pipeline.search.rechecked_last)   # heat map, whose search re-checks again)
            # The heat map is made after the verdict, when first read (the NG image store, the page): its cost
            # is real CPU but not on the line's path, so it is timed on its own and kept out of `total`.
            t_map = time.perf_counter()
            result.anomaly_map
            heat_ms.append((time.perf_counter() - t_map) * 1000.0)
            verdicts[result.verdict.value] += 1
        wall_s = time.perf_counter() - loop_start
        during = cpu_during(counters, cpu_counters(), _own_cpu_s() - own_start, wall_s)
        loop_s = wall_s - idle_s   # throughput counts working time only
        last = (warmup + frames - 1) % len(images)   # inspected without a fault, so its tiles can be made
        alone_ms = model_alone(pipeline, images[last], arrays[last] if raw else None)

    variant = pipeline.variant
    geom = pipeline.geometry
    n_patches = bundle.grid[0] * bundle.grid[1] * geom.n_tiles
    return {
        "bundle": {"path": str(bundle.root), "bundle_id": bundle.bundle_id, "variant": variant.name,
                   "input_size": list(geom.input_size), "canvas_size": list(geom.canvas_size),
                   "tiles": geom.n_tiles, "grid": list(bundle.grid), "dim": bundle.dim,
                   "patches_per_frame": n_patches, "bank_size": len(pipeline.search),
                   "model_file": variant.model_file, "model_bytes": bundle.path(variant.model_file).stat().st_size,
                   "index_file": variant.index_file, "index_bytes": bundle.path(variant.index_file).stat().st_size},
        "settings": {"precision": variant.name, "knn": knn, "search_engine": type(pipeline.search).__name__,
                     "threads": threads,
                     "providers": pipeline.extractor.session.get_providers(),
                     "ef_search": pipeline.search.params.ef_search if hnsw is not None else None,
                     "ef_search_manifest": bundle.hnsw_params.ef_search,
                     # The seeded walk runs on the faiss engine only (knn: hnsw); 0 = every patch from the top.
                     "seed_step": pipeline.search.params.seed_step if knn == "hnsw" else None,
                     "ef_seeded": pipeline.search.params.ef_seeded if knn == "hnsw" else None,
                     "ivf_nprobe": getattr(pipeline.search, "nprobe", None) if knn == "ivf" else None,
                     "exact_recheck": pipeline.search.params.exact_recheck if hnsw is not None else None,
                     "position_prior": pipeline.prior_note,
                     "opencv_threads": cv2.getNumThreads(),
                     # Thread pools that spin after work (OpenBLAS, OpenMP) change every stage's latency on 2 cores.
                     "thread_env": {k: os.environ[k] for k in THREAD_ENV if k in os.environ},
                     "frames": frames, "warmup": warmup, "gap_ms": gap_ms, "images": len(images),
                     "input": "raw BGR arrays (camera frames)" if raw else "encoded files",
                     "images_source": str(images_dir) if images_dir is not None else "bundle golden images"},
        "stages_ms": {stage: summarize(values) for stage, values in per_stage.items()},
        # after the verdict (off the line outputs' path), and what a part costs with it
        "heat_map_ms": summarize(heat_ms),
        "total_with_heat_map_ms": summarize([t + h for t, h in zip(per_stage["total"], heat_ms)]),
        "throughput_fps": frames / loop_s if loop_s > 0 else None,
        "model_alone_ms": summarize(alone_ms),
        "rechecked_patches": ({**summarize(rechecked), "per_frame_of": n_patches} if rechecked else None),
        "verdicts": verdicts,
        "memory": {"before_load": mem_start, "after_load": mem_loaded, "after_run": memory_status()},
        "load_seconds": load_s,
        "machine": {"cpu": cpu_info(), "int8": int8_capability(providers), "software": software_info(),
                    "load_average": load_average(), "hostname": platform.node(), "during_run": during},
        "samples_ms": per_stage,
    }


def model_alone(pipeline: Pipeline, image: tuple[str, bytes], array: np.ndarray | None) -> list[float]:
    """MODEL_ALONE_RUNS timings (ms) of the features model alone, back to back, on one inspected frame's tiles."""
    name, data = image
    rgb = (to_rgb(array, name, shift_16bit=pipeline.bundle.shift_16bit) if array is not None
           else decode_image(data, name, pipeline.decode_limits, pipeline.bundle.shift_16bit))
    tiles = cut_tiles(canvas_of(rgb, pipeline.geometry, name)[0], pipeline.geometry)
    # What Pipeline.inspect hands the model: a 4-channel pixel graph's RGBA is made in the preprocess stage, not
    # in the timed call (features.model_input).
    tensor = (model_input(tiles, True, pipeline.extractor.channels) if pipeline.extractor.takes_pixels
              else to_tensor(tiles))
    timings = []
    for _ in range(MODEL_ALONE_RUNS):
        t = time.perf_counter()
        pipeline.extractor(tensor)
        timings.append((time.perf_counter() - t) * 1000.0)
    return timings


def format_table(report: dict) -> str:
    s, b = report["settings"], report["bundle"]
    cpu = report["machine"]["cpu"]
    isa = ", ".join(f for f, on in cpu["isa"].items() if on) or "none of the listed"
    lines = [
        f"bundle {b['bundle_id']} ({b['variant']}, input {b['input_size'][0]}x{b['input_size'][1]}, {b['tiles']} tile(s) "
        f"on a {b['canvas_size'][0]}x{b['canvas_size'][1]} canvas, {b['grid'][0]}x{b['grid'][1]} patches per tile x "
        f"{b['dim']}-d, bank {b['bank_size']})",
        f"knn {s['knn']}" + (f" ef {s['ef_search']}" if s["ef_search"] is not None else "")
        + (f", seeded walk step {s['seed_step']} ef {s['ef_seeded']}" if s.get("seed_step") else "")
        + f", threads {s['threads']} (OpenCV {s['opencv_threads']}"
        + "".join(f", {k}={v}" for k, v in s["thread_env"].items())
        + (f", position prior {s['position_prior']}" if s.get("position_prior") else "")
        + f"), {', '.join(s['providers'])}, {s['frames']} frames "
        f"({s['images']} images cycled, {s['warmup']} warm-up"
        + (f", {s['gap_ms']:g} ms idle between frames" if s["gap_ms"] else ", back to back") + f"); {s['input']}",
        f"cpu {cpu['model']} ({cpu['usable_cpus']}/{cpu['logical_cpus']} cpus usable; {isa}); "
        f"onnxruntime {report['machine']['software']['onnxruntime']}; load {report['machine']['load_average']}",
        f"int8 kernels: {report['machine'].get('int8', '?')}",
    ]
    during = report["machine"].get("during_run")
    if during:
        lines.append(f"during the frames: {during['steal_percent']:.1f}% of CPU time stolen by the hypervisor, "
                     f"other processes {during['other_processes_cores']:.2f} cores busy")
    lines += [
        "",
        f"{'stage':<11}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'max ms':>9}{'mean ms':>9}",
    ]
    for stage in STAGES:
        st = report["stages_ms"][stage]
        lines.append(f"{stage:<11}" + "".join(f"{st[k]:>9.2f}" for k in ("p50", "p95", "p99", "max", "mean")))
    for label, key in (("heat map", "heat_map_ms"), ("+ heat map", "total_with_heat_map_ms")):
        st = report[key]
        lines.append(f"{label:<11}" + "".join(f"{st[k]:>9.2f}" for k in ("p50", "p95", "p99", "max", "mean")))
    lines.append("(total = frame to verdict, what the line outputs wait for; the heat map is made after the "
                 "verdict, when the NG image store or the page first reads it)")
    mem = report["memory"]["after_run"]
    alone = report["model_alone_ms"]
    lines += ["", f"model alone {alone['p50']:.2f} ms p50 ({MODEL_ALONE_RUNS} runs back to back after the frames: "
              "this machine's pace for the features stage in this minute)",
              f"throughput {report['throughput_fps']:.1f} frames/s",
              f"memory VmRSS {mem['vm_rss_mib']} MiB, VmHWM {mem['vm_hwm_mib']} MiB",
              f"model {b['model_file']} {b['model_bytes'] / 1e6:.2f} MB, index {b['index_file']} "
              f"{b['index_bytes'] / 1e6:.2f} MB"]
    if report["rechecked_patches"]:
        r = report["rechecked_patches"]
        lines.append(f"exactly re-checked patches per frame: mean {r['mean']:.1f}, max {r['max']:.0f} "
                     f"of {r['per_frame_of']}")
    v = report["verdicts"]
    lines.append(f"verdicts: {v['OK']} OK, {v['REVIEW']} REVIEW, {v['NG']} NG")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="edge-bench", description=__doc__.split("\n")[0])
    p.add_argument("bundle", type=Path, help="model bundle directory")
    p.add_argument("--images", type=Path,
                   help="directory of encoded images, searched recursively, cycled (default: the bundle's golden "
                        "images); use your own parts for realistic decode cost")
    p.add_argument("--frames", type=int, default=200,
                   help="timed frames (default: 200); more for stable tail percentiles")
    p.add_argument("--warmup", type=int, default=10, help="untimed frames first (default: 10)")
    p.add_argument("--threads", type=int, default=2,
                   help="onnxruntime intra-op and HNSW search threads, 1-256 (default: 2); set to the station's "
                        "inference.threads")
    p.add_argument("--precision", choices=["int8", "fp32"], help="bundle variant (default: the bundle's default)")
    p.add_argument("--knn", choices=["hnsw", "hnswlib", "exact", "onnx", "ivf"], default="hnsw",
                   help="nearest-neighbour search (default: hnsw, the bundle's HNSW graph searched by faiss, as the "
                        "daemon runs); hnswlib (the same graph searched by hnswlib); ivf (faiss IVF built on the "
                        "device from the bank, then the same exact re-check of the image score); exact (numpy "
                        "BLAS) or onnx (exact, as an onnxruntime graph on --providers) to see their cost")
    p.add_argument("--providers", default="CPUExecutionProvider",
                   help="onnxruntime execution providers, comma-separated, in priority order (default: "
                        "CPUExecutionProvider); e.g. CUDAExecutionProvider,CPUExecutionProvider on a Jetson")
    p.add_argument("--ef", type=int, help="HNSW ef_search (default: the manifest's)")
    p.add_argument("--seed-step", type=int, default=None,
                   help="knn hnsw: seeded-walk step (every Nth patch row and column walks the graph from the top, "
                        "the rest start from their neighbours'); 0: every patch from the top (default: the manifest's)")
    p.add_argument("--ef-seeded", type=int, default=None,
                   help="knn hnsw: search width of a seeded patch (default: the manifest's)")
    p.add_argument("--position-prior", choices=["on", "off"], default="on",
                   help="knn hnsw: start each part's search from the bank rows its patch positions took on the "
                        "bundle's golden images, when they fit the part (default: on, as the daemon runs); off: "
                        "every patch walks the graph before the verdict. The score is the same either way")
    p.add_argument("--ivf-nprobe", type=int, default=None,
                   help="knn ivf: cells scanned per patch (default: inference.ivf_nprobe's default, 2); 1 is faster, the image "
                        "score stays exact either way")
    p.add_argument("--gap-ms", type=float, default=0.0,
                   help="idle time between frames, like part spacing on a line (default: 0.0, back to back); "
                        "set it to see cold-cache latency")
    p.add_argument("--sustained-fps", type=float, default=None,
                   help="sustained mode (default: off, back-to-back latency): the station loop itself fed by a "
                        "camera-paced source at this many frames per second (images from --images); reports frames "
                        "offered, inspected, dropped, throughput and latency percentiles")
    p.add_argument("--duration-s", type=float, default=30.0,
                   help="sustained mode: seconds of frames the paced source produces (default: 30.0)")
    p.add_argument("--lines", type=int, default=1,
                   help="sustained mode: inspection lines in one daemon, each with its own paced source (default: 1)")
    p.add_argument("--workers", type=int, default=1,
                   help="sustained mode: inference.workers, frames each line inspects at once, sharing --threads "
                        "(default: 1)")
    p.add_argument("--no-capture-thread", action="store_true",
                   help="sustained mode: read the source between inspections instead of on a capture thread "
                        "(default: off, i.e. a capture thread with a one-slot queue, as the daemon runs)")
    p.add_argument("--raw", action="store_true",
                   help="feed decoded 8-bit BGR arrays, as a camera delivers them, instead of encoded files "
                        "(default: off, encoded files, so decode cost is included)")
    p.add_argument("--json", type=Path, dest="json_out",
                   help="write the full report (with every sample) here (default: none, table only)")
    a = p.parse_args(argv)
    if a.ef is not None and not 1 <= a.ef <= EF_MAX:
        p.error(f"--ef must be 1-{EF_MAX}")
    if a.seed_step is not None and (a.seed_step < 0 or a.seed_step == 1):
        p.error("--seed-step must be 0 (off) or >= 2")
    if a.ef_seeded is not None and not 1 <= a.ef_seeded <= EF_MAX:
        p.error(f"--ef-seeded must be 1-{EF_MAX}")
    if a.ivf_nprobe is not None and a.ivf_nprobe < 1:
        p.error("--ivf-nprobe must be a positive integer")
    from edge_runtime.lines_config import MAX_THREADS

    # As `edge-runtime check --threads` and inference.threads: 0 ran on onnxruntime's default pool (not what was
    # asked), 999999 started that many threads and never finished.
    if not 1 <= a.threads <= MAX_THREADS:
        p.error(f"--threads must be 1-{MAX_THREADS}, got {a.threads}")
    # Refused before the run, not after it: a folder here raised IsADirectoryError once every frame was timed.
    if a.json_out is not None and a.json_out.is_dir():
        p.error(f"--json {a.json_out}: is a folder; name the file to write")
    if a.sustained_fps is not None:
        return _sustained(p, a)
    try:
        report = run_bench(a.bundle, a.images, a.frames, a.warmup, a.threads, a.precision, a.knn, a.ef,
                           providers=[x.strip() for x in a.providers.split(",") if x.strip()],
                           gap_ms=a.gap_ms, raw=a.raw, ivf_nprobe=a.ivf_nprobe, seed_step=a.seed_step,
                           ef_seeded=a.ef_seeded, position_prior=a.position_prior == "on")
    except (BenchError, BundleError, FeatureError, OSError, ValueError) as exc:
        print(f"edge-bench: {exc}", file=sys.stderr)
        return 2
    return _emit(format_table(report), report, a.json_out)


def _emit(table: str, report: dict, json_out: Path | None) -> int:
    """Print the table, keep the full report as JSON when asked; exit status 0."""
    print(table)
    if json_out is not None:
        try:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps(report, indent=1))
        except OSError as exc:   # a full disk, a read-only folder: said, not a traceback
            print(f"edge-bench: --json {json_out}: cannot write the report ({exc.strerror or exc})", file=sys.stderr)
            return 2
        print(f"\nJSON written to {json_out}")
    return 0


def _sustained(p: argparse.ArgumentParser, a: argparse.Namespace) -> int:
    from edge_runtime.bench_sustained import format_sustained, run_sustained

    # NaN passed `<= 0`, and inf (or a product past a float) raised OverflowError counting the frames.
    if not (0 < a.sustained_fps and 0 < a.duration_s and math.isfinite(a.sustained_fps * a.duration_s)) \
            or a.lines < 1 or not 1 <= a.workers <= 8:
        p.error("--sustained-fps and --duration-s must be > 0 and finite, --lines >= 1, --workers 1-8")
    if a.images is None:
        p.error("--sustained-fps needs --images DIR (the frames the paced source replays)")
    try:
        report = run_sustained(a.bundle, a.images, fps=a.sustained_fps, duration_s=a.duration_s, threads=a.threads,
                               precision=a.precision, knn=a.knn, capture_thread=not a.no_capture_thread,
                               lines=a.lines, workers=a.workers)
    except (BenchError, BundleError, FeatureError, OSError, ValueError) as exc:
        print(f"edge-bench: {exc}", file=sys.stderr)
        return 2
    return _emit(format_sustained(report), report, a.json_out)


if __name__ == "__main__":
    sys.exit(main())
