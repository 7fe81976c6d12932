"""Nearest-neighbour search cost as the memory bank grows and as the image size grows; HNSW accuracy with and
without the exact re-check.

    python benchmarks/search_scaling.py --bundle /tmp/bench_bundles/bottle10

Part A (224 px, bottle): banks of 1%, 10% (greedy k-center: the bundle's own FP32 bank, and its first 1% rows,
which ARE the 1% greedy coreset because greedy selection is a prefix process), 25% (a RANDOM subset of all bank
patches: greedy at that size costs minutes) and 100% (every patch of the bundle's 188 bank images). Queries: the
ONNX FP32 features of every 4th bottle test image. Per bank: exact search, HNSW at ef 16/32/64 (manifest ef
marked) with the runtime's exact re-check, HNSW alone, recall@1, largest image-score error with and without the
re-check, index build time and size.
Part B (224 / 320 / 448 px): ONNX FP32 and INT8 feature-extractor latency at each size (320 and 448 exported here
with export.onnx_export, INT8 calibrated on 16 training images) and search cost against a RANDOM 10% bank at that
grid size (greedy is the deployed choice, random keeps the run short; latency depends on size, not selection).
Writes benchmarks/results/search_scaling.{json,md}.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_report import (BOTTLE, DEFAULT_BUNDLE, LoadMonitor, ensure_bundle, md_table, median,  # noqa: E402
                          percentile, write_results)

from edge_runtime.bundle import Bundle  # noqa: E402
from edge_runtime.features import FeatureExtractor  # noqa: E402
from edge_runtime.nn_search import ExactSearch, HnswSearch, build_hnsw  # noqa: E402
from edge_runtime.preprocess import Preprocessing, load_image, preprocess  # noqa: E402
from export.dataset import test_images  # noqa: E402

EFS = (16, 32, 64)


def features_of(extractor: FeatureExtractor, paths: list[Path], size: int) -> np.ndarray:
    prep = Preprocessing(size)
    return np.stack([extractor(preprocess(load_image(p), prep)) for p in paths])   # (images, patches, dim)


def time_per_frame(fn, frames: np.ndarray, repeats: int = 1) -> list[float]:
    out = []
    for _ in range(repeats):
        for q in frames:
            t0 = time.perf_counter()
            fn(q)
            out.append((time.perf_counter() - t0) * 1000.0)
    return out


def measure_bank(bank: np.ndarray, queries: np.ndarray, params, threads: int, efs: tuple[int, ...]) -> dict:
    """Exact vs HNSW (each ef, with and without re-check) on `queries` (frames, patches, dim)."""
    exact = ExactSearch(bank)
    exact_ms = time_per_frame(exact.distances, queries)
    exact_d, exact_idx = zip(*(exact.nearest(q) for q in queries))
    exact_img = np.array([d.max() for d in exact_d])
    t0 = time.perf_counter()
    index = build_hnsw(bank, params, seed=0, threads=threads)
    build_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        index.save_index(str(Path(tmp) / "i.hnsw"))
        index_bytes = (Path(tmp) / "i.hnsw").stat().st_size
    search = HnswSearch(index, params, threads)
    rows = {}
    for ef in efs:
        search.params = replace(params, ef_search=ef)
        index.set_ef(ef)
        search.distances(queries[0])   # warm
        rechecked, img_re, img_approx, hits = [], [], [], 0
        re_ms = []
        for q in queries:
            t = time.perf_counter()
            d = search.distances(q)
            re_ms.append((time.perf_counter() - t) * 1000.0)
            rechecked.append(search.rechecked_last)
            img_re.append(d.max())
        approx_ms = time_per_frame(search.approximate, queries)
        for q, idx in zip(queries, exact_idx):
            labels, d2 = index.knn_query(q, k=1)
            hits += int(np.sum(labels[:, 0] == idx))
            img_approx.append(np.sqrt(max(d2.max(), 0.0)))
        rows[ef] = {
            "search_ms_median": median(re_ms), "search_ms_p95": percentile(re_ms, 95),
            "approx_only_ms_median": median(approx_ms),
            "rechecked_mean": float(np.mean(rechecked)), "rechecked_max": int(np.max(rechecked)),
            "recall_at_1": hits / queries.shape[0] / queries.shape[1],
            "max_rel_image_error_without_recheck": float(np.max((np.array(img_approx) - exact_img) / exact_img)),
            "max_rel_image_error_with_recheck": float(np.max(np.abs(np.array(img_re) - exact_img) / exact_img)),
        }
    return {"bank_size": int(len(bank)), "exact_ms_median": median(exact_ms), "exact_ms_p95": percentile(exact_ms, 95),
            "hnsw_build_s": build_s, "index_bytes": index_bytes, "bank_bytes": int(bank.nbytes), "hnsw": rows}


def extractor_latency(path: Path, n_patches: int, dim: int, size: int, tensors: list[np.ndarray],
                      threads: int, repeats: int) -> dict:
    ex = FeatureExtractor(path, (n_patches, dim, size), threads)
    for t in tensors[:2]:
        ex(t)
    ms = time_per_frame(ex, np.array(tensors), repeats)
    return {"median_ms": median(ms), "p95_ms": percentile(ms, 95), "model_bytes": path.stat().st_size}


def export_size(size: int, out_dir: Path, calib_paths: list[Path], backbone: str) -> tuple[Path, Path, float]:
    """ONNX FP32 + INT8 extractors at `size` (cached in out_dir: exporting is not what this script measures)."""
    fp32, int8 = out_dir / f"features_fp32_{size}.onnx", out_dir / f"features_int8_{size}.onnx"
    if fp32.is_file() and int8.is_file():
        return fp32, int8, 0.0
    import torch

    from export.onnx_export import export_fp32, quantize_int8
    from export.patch_features import PatchFeatures

    t0 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    export_fp32(PatchFeatures(backbone), size, fp32)
    quantize_int8(fp32, int8, [preprocess(load_image(p), Preprocessing(size)) for p in calib_paths])
    return fp32, int8, time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    p.add_argument("--data", type=Path, default=BOTTLE)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--banks", default="0.01,0.1,0.25,1.0", help="bank fractions for part A")
    p.add_argument("--sizes", default="224,320,448", help="image sizes for part B")
    p.add_argument("--onnx-cache", type=Path, default=Path("/tmp/bench_bundles/sizes"))
    a = p.parse_args()
    ensure_bundle(a.bundle, a.data)
    bundle = Bundle.load(a.bundle)
    m = bundle.manifest
    params = bundle.hnsw_params
    bank_paths = [a.data / "train" / "good" / n for n in m["fit"]["bank_images"]]
    tests = test_images(a.data)
    query_paths = [t.path for t in tests[::4]]
    size0 = bundle.preprocessing.image_size
    efs = tuple(sorted(set(EFS) | {params.ef_search}))

    monitor = LoadMonitor()
    # ---- part A: bank size ----
    fp32 = FeatureExtractor(bundle.path(bundle.variant("fp32").model_file),
                            (bundle.grid[0] * bundle.grid[1], bundle.dim, size0), a.threads)
    t0 = time.perf_counter()
    full = features_of(fp32, bank_paths, size0).reshape(-1, bundle.dim)
    print(f"bank features {full.shape} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    queries = features_of(fp32, query_paths, size0)
    greedy10 = HnswSearch.load(bundle.path(bundle.variant("fp32").index_file), bundle.dim, params).exact.bank
    rng = np.random.default_rng(0)
    part_a = {}
    for frac in (float(f) for f in a.banks.split(",")):
        n = int(round(frac * len(full)))
        if abs(frac - m["coreset"]["ratio"]) < 1e-9:
            bank, how = greedy10, "greedy k-center (the bundle's bank)"
        elif frac < m["coreset"]["ratio"]:
            bank, how = greedy10[:n], "greedy k-center (prefix of the bundle's bank)"
        elif frac >= 1.0:
            bank, how = full, "every bank patch"
        else:
            bank, how = full[rng.choice(len(full), n, replace=False)], "random subset"
        print(f"part A: bank {frac:.0%} ({len(bank)}) ...", file=sys.stderr)
        part_a[f"{frac:g}"] = {"fraction": frac, "selection": how, **measure_bank(bank, queries, params, a.threads, efs)}
        del bank

    # ---- part B: image size ----
    part_b = {}
    calib = sorted(bank_paths)[:16]
    for size in (int(s) for s in a.sizes.split(",")):
        print(f"part B: {size} px ...", file=sys.stderr)
        if size == size0:
            f_path, i_path, export_s = bundle.path("features_fp32.onnx"), bundle.path("features_int8.onnx"), None
        else:
            f_path, i_path, export_s = export_size(size, a.onnx_cache, calib, m["backbone"]["name"])
        grid = -(-size // 8)
        n_patches = grid * grid
        prep = Preprocessing(size)
        tensors = [preprocess(load_image(p), prep) for p in query_paths[::2]]
        lat = {name: extractor_latency(path, n_patches, bundle.dim, size, tensors, a.threads, 2)
               for name, path in (("fp32", f_path), ("int8", i_path))}
        ex = FeatureExtractor(f_path, (n_patches, bundle.dim, size), a.threads)
        bank_all = features_of(ex, bank_paths, size).reshape(-1, bundle.dim)
        bank = bank_all[np.random.default_rng(0).choice(len(bank_all), int(round(0.1 * len(bank_all))), replace=False)]
        del bank_all
        q = features_of(ex, query_paths[::2], size)
        search = measure_bank(bank, q, params, a.threads, (params.ef_search,))
        part_b[str(size)] = {"grid": [grid, grid], "patches": n_patches, "extractor": lat,
                             "export_seconds": export_s, "search": search}
    load = monitor.stop()

    ef0 = params.ef_search
    rows_a = []
    for key, r in part_a.items():
        for ef, h in r["hnsw"].items():
            rows_a.append([f"{r['fraction']:.0%} ({r['bank_size']})", r["exact_ms_median"],
                           f"{ef}{' (manifest)' if ef == ef0 else ''}", h["search_ms_median"], h["search_ms_p95"],
                           h["approx_only_ms_median"], h["rechecked_mean"], h["rechecked_max"], h["recall_at_1"],
                           h["max_rel_image_error_without_recheck"], h["max_rel_image_error_with_recheck"]])
    rows_build = [[f"{r['fraction']:.0%}", r["selection"], r["bank_size"], r["hnsw_build_s"], r["index_bytes"] / 1e6,
                   r["bank_bytes"] / 1e6] for r in part_a.values()]
    rows_b = [[f"{s} px", f"{r['grid'][0]}x{r['grid'][1]} = {r['patches']}", r["extractor"]["fp32"]["median_ms"],
               r["extractor"]["int8"]["median_ms"], r["search"]["bank_size"], r["search"]["exact_ms_median"],
               r["search"]["hnsw"][ef0]["search_ms_median"], r["search"]["hnsw"][ef0]["rechecked_mean"],
               r["search"]["hnsw"][ef0]["max_rel_image_error_without_recheck"]] for s, r in part_b.items()]
    body = [f"Bundle {bundle.bundle_id} (bottle, lite0, {bundle.dim}-d), {a.threads} threads for onnxruntime, "
            f"hnswlib and numpy/BLAS; HNSW M={params.M}, ef_construction={params.ef_construction}. "
            f"Latencies are per frame (all patches of one image), medians over {len(query_paths)} bottle test images.",
            "", "## A. Search vs bank size (224 px, 784 patches per frame)", "",
            md_table(["bank", "exact ms", "ef", "HNSW + re-check ms", "p95 ms", "HNSW alone ms", "re-checked patches (mean)",
                      "re-checked (max)", "recall@1", "max image-score error, HNSW alone", "with re-check"], rows_a),
            "", md_table(["bank", "selection", "vectors", "HNSW build s", "index MB", "raw bank MB"], rows_build),
            "", "## B. Extractor and search vs image size (random 10% bank at each grid size)", "",
            md_table(["input", "patches", "ONNX FP32 ms", "ONNX INT8 ms", "bank", "exact ms", f"HNSW ef {ef0} + re-check ms",
                      "re-checked (mean)", "max image-score error, HNSW alone"], rows_b)]
    write_results("search_scaling", "Search scaling: bank size, image size, HNSW accuracy", "\n".join(body),
                  {"bundle": str(a.bundle), "bundle_id": bundle.bundle_id, "threads": a.threads,
                   "query_images": [str(p) for p in query_paths], "bank_size": part_a, "image_size": part_b}, load)
    return 0


if __name__ == "__main__":
    sys.exit(main())
