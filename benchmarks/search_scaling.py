"""Nearest-neighbour search cost as the memory bank grows and as the model input grows; HNSW accuracy with and
without the exact re-check.

    python benchmarks/search_scaling.py --bundle /tmp/bench_bundles/bottle10

Part A (the bundle's own geometry, bottle): banks of 1%, 10% (greedy k-center: the bundle's own FP32 bank, and a
greedy k-center selection from that bank for smaller fractions), 25% (a RANDOM subset of all bank
patches: greedy at that size costs minutes) and 100% (every patch of the bundle's bank images). Queries: the
ONNX FP32 features of every 4th bottle test image. Per bank: exact search, HNSW at ef 16/32/64 (manifest ef
marked) with the runtime's exact re-check, HNSW alone, recall@1, largest image-score error with and without the
re-check, index build time and size.
Part B (input W x H, square and non-square, one tile per frame: 224x224, 320x320, 448x448, 320x224, 448x320 by
default): ONNX FP32 and INT8 feature-extractor latency at each input size (sizes other than the bundle's exported
here with export.onnx_export from the bundle's feature graph, INT8 calibrated on 16 training images) and search
cost against a RANDOM 10% bank at that grid size (greedy is the deployed choice, random keeps the run short;
latency depends on size, not selection). A non-square input on the square bottle frames squashes them: the point
is the cost of a W x H input, not its accuracy.
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
from bench_report import (BOTTLE, DEFAULT_BUNDLE, LoadMonitor, add_results_option, ensure_bundle,  # noqa: E402
                          geometry_text, md_table, median, parse_size, percentile, write_results)

from edge_runtime.bundle import Bundle  # noqa: E402
from edge_runtime.features import FeatureExtractor  # noqa: E402
from edge_runtime.nn_search import ExactSearch, HnswSearch, build_hnsw  # noqa: E402
from edge_runtime.geometry import Geometry  # noqa: E402
from edge_runtime.decode import load_image  # noqa: E402
from edge_runtime.preprocess import preprocess  # noqa: E402
from export.dataset import test_images  # noqa: E402

EFS = (16, 32, 64)


def single_tile(size: tuple[int, int]) -> Geometry:
    """One W x H tile per frame, any frame size resampled onto it (the part B sweep)."""
    return Geometry(input_size=size, canvas_size=size, tiles=((0, 0),), region_size=None, size_policy="resize")


def tensor_of(path: Path, geom: Geometry) -> np.ndarray:
    return preprocess(load_image(path), geom, str(path))[0]


def features_of(extractor: FeatureExtractor, paths: list[Path], geom: Geometry) -> np.ndarray:
    return np.stack([extractor(tensor_of(p, geom)) for p in paths])   # (images, patches of all tiles, dim)


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


def extractor_latency(path: Path, n_patches: int, dim: int, geom: Geometry, tensors: list[np.ndarray],
                      threads: int, repeats: int) -> dict:
    ex = FeatureExtractor(path, (n_patches, dim, geom.input_size, geom.n_tiles), threads)
    for t in tensors[:2]:
        ex(t)
    ms = time_per_frame(ex, np.array(tensors), repeats)
    return {"median_ms": median(ms), "p95_ms": percentile(ms, 95), "model_bytes": path.stat().st_size}


def export_size(bundle: Bundle, geom: Geometry, out_dir: Path, calib_paths: list[Path]) -> tuple[Path, Path, float]:
    """ONNX FP32 + INT8 extractors of the bundle's feature graph at geom.input_size (cached in out_dir: exporting
    is not what this script measures)."""
    import torch

    from export.onnx_export import export_fp32, quantize_int8
    from export.reference import model_for

    m = bundle.manifest
    w, h = geom.input_size
    # The key names everything the graph depends on, so a cache left by another bundle is never reused wrongly.
    key = f"{m['backbone']['name']}_{bundle.dim}d_p{m['features']['aggregation'].get('size', 3)}_{w}x{h}"
    fp32, int8 = out_dir / f"features_fp32_{key}.onnx", out_dir / f"features_int8_{key}.onnx"
    if fp32.is_file() and int8.is_file():
        return fp32, int8, 0.0
    t0 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    export_fp32(model_for(bundle), geom.input_size, fp32)
    quantize_int8(fp32, int8, [tensor_of(p, geom) for p in calib_paths])
    return fp32, int8, time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE,
                   help=f"bottle bundle, fitted there if missing (default {DEFAULT_BUNDLE})")
    p.add_argument("--data", type=Path, default=BOTTLE, help=f"MVTec-style category folder (default {BOTTLE})")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime, hnswlib and BLAS threads (default 2)")
    p.add_argument("--banks", default="0.01,0.1,0.25,1.0", help="bank fractions for part A (default 0.01,0.1,0.25,1.0)")
    p.add_argument("--sizes", default="224x224,320x320,448x448,320x224,448x320",
                   help="model inputs W x H for part B, comma-separated; N means NxN "
                        "(default 224x224,320x320,448x448,320x224,448x320)")
    p.add_argument("--bank-images", type=int, default=None,
                   help="use only every k-th bank image so that about N remain (default: all; small N for a quick trial)")
    p.add_argument("--query-every", type=int, default=4, help="query with every Nth test image (default 4)")
    p.add_argument("--onnx-cache", type=Path, default=Path("/tmp/bench_bundles/sizes"),
                   help="where part B's exported extractors are kept between runs (default /tmp/bench_bundles/sizes)")
    add_results_option(p)
    from bench_report import state_defaults   # every option's help states its default
    a = state_defaults(p).parse_args()
    try:
        sizes = [parse_size(t) for t in a.sizes.split(",")]
    except ValueError as exc:
        p.error(f"--sizes: {exc}")
    ensure_bundle(a.bundle, a.data)
    bundle = Bundle.load(a.bundle)
    m = bundle.manifest
    params = bundle.hnsw_params
    bank_paths = [a.data / "train" / "good" / n for n in m["fit"]["bank_images"]]
    tests = test_images(a.data)
    if a.bank_images:
        bank_paths = bank_paths[::max(1, len(bank_paths) // a.bank_images)]
    query_paths = [t.path for t in tests[::a.query_every]]
    geom0 = bundle.geometry
    n_patches0 = bundle.grid[0] * bundle.grid[1] * geom0.n_tiles
    efs = tuple(sorted(set(EFS) | {params.ef_search}))

    monitor = LoadMonitor()
    # ---- part A: bank size ----
    fp32 = FeatureExtractor(bundle.path(bundle.variant("fp32").model_file),
                            (bundle.grid[0] * bundle.grid[1], bundle.dim, geom0.input_size, geom0.n_tiles), a.threads)
    t0 = time.perf_counter()
    full = features_of(fp32, bank_paths, geom0).reshape(-1, bundle.dim)
    print(f"bank features {full.shape} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    queries = features_of(fp32, query_paths, geom0)
    greedy10 = HnswSearch.load(bundle.path(bundle.variant("fp32").index_file), bundle.dim, params).exact.bank
    rng = np.random.default_rng(0)
    part_a = {}
    for frac in (float(f) for f in a.banks.split(",")):
        n = int(round(frac * len(full)))
        if abs(frac - m["coreset"]["ratio"]) < 1e-9:
            bank, how = greedy10, "greedy k-center (the bundle's bank)"
        elif frac < m["coreset"]["ratio"]:
            # The exporter's coreset comes back sorted by image (and chunked), so a prefix of the bank is no longer
            # a greedy coreset: select greedily again, from the bundle's bank (a coreset of the coreset).
            from export.coreset import greedy_coreset

            bank = greedy10[greedy_coreset(greedy10, n, m["coreset"].get("projection_dim", 128), 0, progress=False)]
            how = "greedy k-center of the bundle's bank"
        elif frac >= 1.0:
            bank, how = full, "every bank patch"
        else:
            bank, how = full[rng.choice(len(full), n, replace=False)], "random subset"
        print(f"part A: bank {frac:.0%} ({len(bank)}) ...", file=sys.stderr)
        part_a[f"{frac:g}"] = {"fraction": frac, "selection": how, **measure_bank(bank, queries, params, a.threads, efs)}
        del bank

    # ---- part B: input size (W x H, one tile per frame) ----
    part_b = {}
    calib = sorted(bank_paths)[:16]
    for size in sizes:
        w, h = size
        print(f"part B: input {w}x{h} ...", file=sys.stderr)
        geom = single_tile(size)
        if size == geom0.input_size:
            # The bundle's own extractors take this input (a tiled bundle's take it per tile: same graph).
            f_path, i_path = bundle.path(bundle.variant("fp32").model_file), bundle.path(bundle.variant("int8").model_file)
            export_s = None
        else:
            f_path, i_path, export_s = export_size(bundle, geom, a.onnx_cache, calib)
        grid = geom.grid()
        n_patches = grid[0] * grid[1]
        tensors = [tensor_of(p, geom) for p in query_paths[::2]]
        lat = {name: extractor_latency(path, n_patches, bundle.dim, geom, tensors, a.threads, 2)
               for name, path in (("fp32", f_path), ("int8", i_path))}
        ex = FeatureExtractor(f_path, (n_patches, bundle.dim, geom.input_size, 1), a.threads)
        bank_all = features_of(ex, bank_paths, geom).reshape(-1, bundle.dim)
        bank = bank_all[np.random.default_rng(0).choice(len(bank_all), int(round(0.1 * len(bank_all))), replace=False)]
        del bank_all
        q = features_of(ex, query_paths[::2], geom)
        search = measure_bank(bank, q, params, a.threads, (params.ef_search,))
        part_b[f"{w}x{h}"] = {"input_size": [w, h], "grid": list(grid), "patches": n_patches, "extractor": lat,
                              "export_seconds": export_s, "search": search}
    load = monitor.stop()

    ef0 = params.ef_search
    rows_a = []
    for key, r in part_a.items():
        for ef, h in r["hnsw"].items():
            rows_a.append([f"{100 * r['fraction']:g}% ({r['bank_size']})", r["exact_ms_median"],
                           f"{ef}{' (manifest)' if ef == ef0 else ''}", h["search_ms_median"], h["search_ms_p95"],
                           h["approx_only_ms_median"], h["rechecked_mean"], h["rechecked_max"], h["recall_at_1"],
                           h["max_rel_image_error_without_recheck"], h["max_rel_image_error_with_recheck"]])
    rows_build = [[f"{100 * r['fraction']:g}%", r["selection"], r["bank_size"], r["hnsw_build_s"], r["index_bytes"] / 1e6,
                   r["bank_bytes"] / 1e6] for r in part_a.values()]
    rows_b = [[s, f"{r['grid'][0]}x{r['grid'][1]} = {r['patches']}", r["extractor"]["fp32"]["median_ms"],
               r["extractor"]["int8"]["median_ms"], r["search"]["bank_size"], r["search"]["exact_ms_median"],
               r["search"]["hnsw"][ef0]["search_ms_median"], r["search"]["hnsw"][ef0]["rechecked_mean"],
               r["search"]["hnsw"][ef0]["max_rel_image_error_without_recheck"]] for s, r in part_b.items()]
    body = [f"Bundle {bundle.bundle_id} (bottle, lite0, {geometry_text(geom0)}, {bundle.dim}-d), {a.threads} threads for onnxruntime, "
            f"hnswlib and numpy/BLAS; HNSW M={params.M}, ef_construction={params.ef_construction}. "
            f"Latencies are per frame (all patches of one image), medians over {len(query_paths)} bottle test images.",
            "", f"## A. Search vs bank size ({geometry_text(geom0)}, {n_patches0} patches per frame)", "",
            md_table(["bank", "exact ms", "ef", "HNSW + re-check ms", "p95 ms", "HNSW alone ms", "re-checked patches (mean)",
                      "re-checked (max)", "recall@1", "max image-score error, HNSW alone", "with re-check"], rows_a),
            "", md_table(["bank", "selection", "vectors", "HNSW build s", "index MB", "raw bank MB"], rows_build),
            "", "## B. Extractor and search vs input size W x H, one tile per frame (random 10% bank at each grid size)", "",
            md_table(["input W x H", "patches (rows x cols)", "ONNX FP32 ms", "ONNX INT8 ms", "bank", "exact ms", f"HNSW ef {ef0} + re-check ms",
                      "re-checked (mean)", "max image-score error, HNSW alone"], rows_b)]
    write_results("search_scaling", "Search scaling: bank size, image size, HNSW accuracy", "\n".join(body),
                  {"bundle": str(a.bundle), "bundle_id": bundle.bundle_id, "threads": a.threads,
                   "geometry": geom0.to_manifest(), "bank_images": len(bank_paths),
                   "query_images": [str(p) for p in query_paths], "bank_size": part_a, "input_size": part_b}, load,
                  out_dir=a.results_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
