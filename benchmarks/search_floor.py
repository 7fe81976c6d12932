"""Where the search stage's floor is on this machine: every way we can find each patch's nearest bank vector, on
the same real patch features, in one run.

    python benchmarks/search_floor.py BUNDLE --images ../shared/data/mvtec_ad/bottle/test

For one bundle (its bank, its ONNX extractor) and the patch features of real test frames it times:
- HNSW (hnswlib, the deployed path) at several ef, alone and with the exact re-check of the image score;
- exact brute force in numpy (BLAS sgemm) and as an onnxruntime graph (`knn: onnx`);
- the brute-force floor in INT8: onnxruntime MatMulInteger of the queries against the bank with only a ReduceMax
  after it (no distances, no argmin: a lower bound of any INT8 brute-force search);
- with --candidates: other indexes that give per-patch upper bounds (usearch, faiss IVF/HNSW, a numpy
  previous-frame heuristic; benchmarks/search_candidates.py), each followed by the SAME exact re-check as the
  deployed path, all timed interleaved (frame by frame, engine by engine) with the deployed HNSW + re-check;
  it reports build time, index bytes, patches re-checked, image-score equality with exact search on every
  frame and the mean per-patch |approx - exact| (what the heat map sees), in search_floor_NAME_candidates.json/md;
and per engine: wall p50/p99, CPU ms per frame (less sensitive to other load), recall@1 and the mean amount by
which per-patch distances exceed the exact ones (what the heat map sees). Writes JSON to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge_runtime.bench import cpu_info, load_average, software_info  # noqa: E402
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_report import bundle_features  # noqa: E402
from edge_runtime.pipeline import Pipeline  # noqa: E402
from edge_runtime.nn_search import upper_bounds  # noqa: E402


def int8_floor_session(bank: np.ndarray, threads: int):
    """Queries (dynamic uint8) x bank (int8, per-tensor) with a ReduceMax: the cheapest INT8 brute force."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    scale = float(np.abs(bank).max()) / 127.0
    b8 = np.clip(np.round(bank / scale), -127, 127).astype(np.int8)
    nodes = [helper.make_node("DynamicQuantizeLinear", ["q"], ["qq", "qs", "qz"]),
             helper.make_node("MatMulInteger", ["qq", "bank", "qz"], ["dots"]),
             helper.make_node("ReduceMax", ["dots"], ["best"], axes=[1], keepdims=0)]
    graph = helper.make_graph(nodes, "int8_floor", [helper.make_tensor_value_info("q", TensorProto.FLOAT, ["n", bank.shape[1]])],
                              [helper.make_tensor_value_info("best", TensorProto.INT32, ["n"])],
                              [numpy_helper.from_array(np.ascontiguousarray(b8.T), "bank")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def timed(fn, feats: list[np.ndarray], rounds: int) -> tuple[dict, list]:
    wall, cpu, outs = [], [], []
    for _ in range(rounds):
        outs = []
        for q in feats:
            c0, w0 = time.process_time(), time.perf_counter()
            outs.append(fn(q))
            wall.append((time.perf_counter() - w0) * 1000)
            cpu.append((time.process_time() - c0) * 1000)
    return {"wall_p50_ms": float(np.percentile(wall, 50)), "wall_p99_ms": float(np.percentile(wall, 99)),
            "cpu_p50_ms": float(np.percentile(cpu, 50))}, outs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle", type=Path, help="bundle directory")
    ap.add_argument("--images", type=Path, required=True, help="folder of test images, searched recursively")
    ap.add_argument("--frames", type=int, default=24, help="frames (images) to use (default: 24)")
    ap.add_argument("--rounds", type=int, default=2, help="timed passes over the frames (default: 2)")
    ap.add_argument("--threads", type=int, default=2, help="threads for every engine (default: 2)")
    ap.add_argument("--efs", default="8,16,32", help="HNSW ef values (default: 8,16,32)")
    ap.add_argument("--candidates", default="", help="comma list of usearch,faiss,prevframe to compare "
                    "interleaved with the deployed HNSW + re-check; 'all' for every one (default: none)")
    ap.add_argument("--name", default=None, help="result name suffix (default: the bundle folder's name)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="JSON folder")
    from bench_report import state_defaults   # every option's help states its default
    a = state_defaults(ap).parse_args(argv)

    load_before = load_average()
    bundle, pipe, paths, feats = bundle_features(a.bundle, a.images, a.frames, a.threads)
    hnsw = pipe.search
    exact = hnsw.exact
    truth = [exact.nearest(q) for q in feats]
    results: dict[str, dict] = {}
    if a.candidates:
        return compare_candidates(a, bundle, pipe, feats, paths, load_before)

    def quality(dists: list[np.ndarray], labels: list[np.ndarray] | None = None) -> dict:
        over = np.concatenate([d / t[0] - 1.0 for d, t in zip(dists, truth)])
        img_err = max(abs(float(d.max()) - float(t[0].max())) for d, t in zip(dists, truth))
        q = {"mean_patch_overestimate": float(over.mean()), "worst_image_score_error": img_err}
        if labels is not None:
            q["recall_at_1"] = float(np.mean(np.concatenate([lab == t[1] for lab, t in zip(labels, truth)])))
        return q

    stats, out = timed(exact.nearest, feats, a.rounds)
    results["exact numpy sgemm"] = {**stats, **quality([o[0] for o in out], [o[1] for o in out])}
    try:
        from edge_runtime.nn_search import OnnxExactSearch

        graph = OnnxExactSearch(exact.bank, a.threads)
        stats, out = timed(graph.nearest, feats, a.rounds)
        results["exact onnxruntime graph (knn: onnx)"] = {**stats, **quality([o[0] for o in out], [o[1] for o in out])}
        floor = int8_floor_session(exact.bank, a.threads)
        stats, _ = timed(lambda q: floor.run(None, {"q": q}), feats, a.rounds)
        results["int8 brute-force floor (MatMulInteger + ReduceMax only)"] = stats
    except ImportError as exc:
        print(f"onnx engines skipped: {exc}", file=sys.stderr)
    # The bundle's graph in both engines: faiss (knn: hnsw, deployed) and hnswlib (knn: hnswlib).
    graphs = {"hnsw (graph in faiss, deployed)": hnsw,
              "hnswlib": Pipeline(bundle, knn="hnswlib", threads=a.threads).search}
    for engine, search in graphs.items():
        for ef in [int(x) for x in a.efs.split(",")]:
            search.set_ef(ef)
            stats, approx = timed(search.approximate, feats, a.rounds)
            labels = [search.labels(q) for q in feats]
            results[f"{engine} ef={ef}, approximate only"] = {**stats, **quality(approx, labels)}
            rechecked = []

            def with_recheck(q, search=search):
                d = search.distances(q)
                rechecked.append(search.rechecked_last)
                return d
            stats, out = timed(with_recheck, feats, a.rounds)
            results[f"{engine} ef={ef} + exact re-check"] = {
                **stats, **quality(out), "rechecked_patches_mean": float(np.mean(rechecked))}
        search.set_ef(search.params.ef_search)

    n_q, (n_b, dim) = feats[0].shape[0], exact.bank.shape
    report = {
        "bundle": {"path": str(a.bundle), "bundle_id": bundle.bundle_id, "queries_per_frame": n_q, "bank": n_b,
                   "dim": dim, "brute_force_macs_per_frame": n_q * n_b * dim,
                   "manifest_ef": bundle.hnsw_params.ef_search},
        "frames": len(feats), "rounds": a.rounds, "threads": a.threads, "engines": results,
        "machine": {"cpu": cpu_info(), "software": software_info(), "load_before": load_before,
                    "load_after": load_average(), "pid_cpu_count": os.cpu_count()},
    }
    name = a.name or a.bundle.name
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"search_floor_{name}.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"bundle {bundle.bundle_id}: {n_q} patches x {dim}-d against a bank of {n_b} "
          f"({n_q * n_b * dim / 1e9:.2f} G multiply-adds brute force); {len(feats)} frames x {a.rounds}; "
          f"{a.threads} threads; load {load_before} -> {report['machine']['load_after']}")
    print(f"{'engine':<58}{'wall p50':>9}{'p99':>8}{'cpu p50':>9}{'recall':>8}{'over %':>8}{'img err':>9}")
    for eng, r in results.items():
        rec = f"{r['recall_at_1']:.4f}" if "recall_at_1" in r else "-"
        over = f"{100 * r['mean_patch_overestimate']:.2f}" if "mean_patch_overestimate" in r else "-"
        err = f"{r['worst_image_score_error']:.1e}" if "worst_image_score_error" in r else "-"
        print(f"{eng:<58}{r['wall_p50_ms']:>9.2f}{r['wall_p99_ms']:>8.2f}{r['cpu_p50_ms']:>9.2f}{rec:>8}{over:>8}{err:>9}")
    print(f"JSON written to {path}")
    return 0


def _versions(modules) -> dict:
    out = {}
    for m in modules:
        try:
            out[m] = __import__(m).__version__
        except (ImportError, AttributeError):
            out[m] = None
    return out


def compare_candidates(a, bundle, pipe, feats, paths, load_before) -> int:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import search_candidates as sc

    hnsw = pipe.search
    exact = hnsw.exact
    wanted = {"usearch", "faiss", "prevframe"} if a.candidates == "all" else set(a.candidates.split(","))
    # Reference: every patch's exact nearest distance in the re-check's own kernel (brute-force labels give
    # a valid upper bound for each patch; nearest_within then returns the exact minimum).
    ref = []
    for q in feats:
        up = upper_bounds(exact.bank, q, exact.nearest(q)[1])
        ref.append(exact.nearest_within(q, up)[0])
    engines: dict[str, tuple] = {}
    info: dict[str, dict] = {}
    build = sc.hnswlib_build(exact.bank, hnsw.params, a.threads)
    index_bytes = len(bundle.read_verified(pipe.variant.index_file))
    engines["HNSW graph in faiss M=%d ef=%d + re-check (deployed)" % (hnsw.params.M, hnsw.params.ef_search)] = (
        lambda q: (hnsw.distances(q), hnsw.rechecked_last, None))
    info[next(iter(engines))] = {"build_s_on_2_threads": build, "index_bytes": index_bytes}
    hnswlib = Pipeline(bundle, knn="hnswlib", threads=a.threads).search   # the same graph, searched by hnswlib

    def hnswlib_threads(th):
        def labels(q):   # hnswlib's own threads, like faiss's, may lose on a busy 2-core box
            hnswlib.set_threads(th)
            return hnswlib.labels(q)
        return labels
    cands = [sc.Candidate(f"hnswlib (same graph) M={hnsw.params.M} ef={hnsw.params.ef_search} threads={th}", build,
                          index_bytes, hnswlib_threads(th)) for th in sorted({a.threads, 1})]
    for kind, make in (("usearch", lambda: sc.usearch_candidates(exact.bank, a.threads, hnsw.params.ef_search)),
                       ("faiss", lambda: sc.faiss_candidates(exact.bank, a.threads))):
        if kind in wanted:
            try:
                cands += make()
            except ImportError as exc:
                print(f"{kind} skipped: {exc}", file=sys.stderr)
    if "prevframe" in wanted:
        prev = sc.PreviousFrame(exact, tuple(pipe.grid))
        cands.append(sc.Candidate("numpy previous frame 3x3 labels", 0.0, 0, prev.labels))
    for c in cands:
        engines[c.name + " + re-check"] = sc.with_recheck(exact, c.labels)
        info[c.name + " + re-check"] = {"build_s_on_2_threads": c.build_s, "index_bytes": c.index_bytes}
    wall = {e: [] for e in engines}
    cpu = {e: [] for e in engines}
    rech = {e: [] for e in engines}
    pixel = {e: [] for e in engines}
    unequal = {e: [] for e in engines}
    off = {e: [] for e in engines}   # heat-map fidelity: share of patches more than 1% above their exact distance
    for r in range(a.rounds):
        for f, q in enumerate(feats):
            for e, fn in engines.items():   # interleaved: every engine sees the same load, frame by frame
                c0, w0 = time.process_time(), time.perf_counter()
                dist, n_re, _ = fn(q)
                wall[e].append((time.perf_counter() - w0) * 1000)
                cpu[e].append((time.process_time() - c0) * 1000)
                rech[e].append(n_re)
                pixel[e].append(float(np.abs(dist - ref[f]).mean()))
                off[e].append(float(np.mean(dist > ref[f] * 1.01)))
                if np.float32(dist.max()) != np.float32(ref[f].max()):
                    unequal[e].append((paths[f].parent.name + "/" + paths[f].name, float(dist.max()), float(ref[f].max())))
    base = next(iter(engines))
    results = {}
    for e in engines:
        results[e] = {"wall_p50_ms": float(np.percentile(wall[e], 50)), "wall_p99_ms": float(np.percentile(wall[e], 99)),
                      "cpu_p50_ms": float(np.percentile(cpu[e], 50)),
                      "speedup_p50_vs_deployed": float(np.percentile(wall[base], 50) / np.percentile(wall[e], 50)),
                      "rechecked_patches_mean": float(np.mean(rech[e])), "rechecked_patches_max": int(np.max(rech[e])),
                      "image_scores_equal_exact": f"{len(feats) * a.rounds - len(unequal[e])}/{len(feats) * a.rounds}",
                      "unequal": unequal[e][:5], "mean_abs_patch_error": float(np.mean(pixel[e])),
                      "patches_over_1pct": float(np.mean(off[e])), **info[e]}
    report = {"bundle": {"path": str(a.bundle), "bundle_id": bundle.bundle_id, "queries_per_frame": feats[0].shape[0],
                         "bank": exact.bank.shape[0], "dim": exact.bank.shape[1]},
              "frames": len(feats), "rounds": a.rounds, "threads": a.threads, "engines": results,
              "exact_patch_distance_mean": float(np.mean(np.concatenate(ref))),
              "exact_image_score_range": [float(min(r.max() for r in ref)), float(max(r.max() for r in ref))],
              "candidate_software": _versions(("usearch", "faiss")),
              "machine": {"cpu": cpu_info(), "software": software_info(), "load_before": load_before,
                          "load_after": load_average(), "avx512_vnni": "avx512_vnni" in Path("/proc/cpuinfo").read_text()
                          if Path("/proc/cpuinfo").exists() else None}}
    name = a.name or a.bundle.name
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"search_floor_{name}_candidates.json"
    path.write_text(json.dumps(report, indent=1))
    head = (f"bundle {bundle.bundle_id}: {feats[0].shape[0]} patches x {exact.bank.shape[1]}-d vs {exact.bank.shape[0]}; "
            f"{len(feats)} frames x {a.rounds} rounds, interleaved; {a.threads} threads; "
            f"load {load_before} -> {report['machine']['load_after']}; exact patch distance mean "
            f"{report['exact_patch_distance_mean']:.3f}, image scores {report['exact_image_score_range'][0]:.2f}.."
            f"{report['exact_image_score_range'][1]:.2f}")
    lines = [head, "", "| engine + exact re-check | p50 ms | p99 ms | cpu p50 ms | x deployed | build s | index MB "
             "| re-checked mean/max | image score == exact | mean abs patch error | patches > 1% off |", "|---" * 11 + "|"]
    for e, r in results.items():
        lines.append(f"| {e} | {r['wall_p50_ms']:.2f} | {r['wall_p99_ms']:.2f} | {r['cpu_p50_ms']:.2f} | "
                     f"{r['speedup_p50_vs_deployed']:.2f} | {r['build_s_on_2_threads']:.2f} | {r['index_bytes'] / 1e6:.1f} | "
                     f"{r['rechecked_patches_mean']:.1f}/{r['rechecked_patches_max']} | {r['image_scores_equal_exact']} | "
                     f"{r['mean_abs_patch_error']:.4f} | {100 * r['patches_over_1pct']:.2f}% |")
    text = "\n".join(lines) + "\n"
    path.with_suffix(".md").write_text(text)
    print(text + f"JSON written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
