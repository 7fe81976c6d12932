"""How close each stage runs to what this CPU can do: work per frame, measured rates, % of peak, where time goes.

    python benchmarks/compute_floor.py --bundle /tmp/bench_bundles/bottle10

Work per frame: multiply-adds of the feature graph counted from the ONNX model (Conv MACs from weight shapes and
shape-inferred output shapes; depthwise, pointwise and full convolutions apart), and distance multiply-adds of
the search (exact: patches x bank x dim; HNSW: hnswlib does not expose its distance count, so it is ESTIMATED as
ef x 2M layer-0 neighbours per query, an upper bound of the layer-0 work, plus the re-checked patches x bank x dim).
Peak: measured GEMM rates on this machine with the benchmark's thread count: numpy float32 matmul (OpenBLAS),
onnxruntime float32 MatMul and onnxruntime int8 MatMulInteger (u8 x s8). Stage times: edge_runtime.bench on the
bottle test images; per-operator times: onnxruntime's own profiler.
Writes benchmarks/results/compute_floor.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_report import (BOTTLE, DEFAULT_BUNDLE, LoadMonitor, add_results_option, ensure_bundle,  # noqa: E402
                          geometry_text, md_table, write_results)

from edge_runtime.bench import run_bench  # noqa: E402
from edge_runtime.bundle import Bundle  # noqa: E402
from edge_runtime.features import make_session, model_input, pixel_channels, takes_pixels  # noqa: E402
from edge_runtime.decode import load_image  # noqa: E402
from edge_runtime.preprocess import preprocess  # noqa: E402


# ---- work per frame -------------------------------------------------------------------------------------------
def conv_kind(group: int, kernel: tuple[int, ...]) -> str:
    if group > 1:
        return "depthwise"
    return "pointwise 1x1" if all(k == 1 for k in kernel) else "full (stem)"


def graph_macs(model_path: Path, n_tiles: int = 1) -> dict:
    """Multiply-adds per frame (all `n_tiles` tiles of it) by convolution kind, from the FP32 ONNX graph."""
    import onnx
    from onnx import numpy_helper, shape_inference

    model = onnx.load(str(model_path))
    # The graph's batch axis is dynamic (one row per tile): pin it to the frame's tile count, or shape inference
    # leaves every activation shape symbolic and no convolution can be counted.
    for vi in list(model.graph.input) + list(model.graph.output):
        vi.type.tensor_type.shape.dim[0].dim_value = n_tiles
    model = shape_inference.infer_shapes(model)
    g = model.graph
    shapes = {}
    for vi in list(g.value_info) + list(g.output) + list(g.input):
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        if dims and all(d > 0 for d in dims):
            shapes[vi.name] = dims
    weights = {i.name: numpy_helper.to_array(i).shape for i in g.initializer}
    macs: dict[str, int] = defaultdict(int)
    convs: dict[str, int] = defaultdict(int)
    params = 0
    other: dict[str, int] = defaultdict(int)
    for n in g.node:
        if n.op_type == "Conv":
            w = weights[n.input[1]]
            out = shapes[n.output[0]]
            group = next((a.i for a in n.attribute if a.name == "group"), 1)
            kind = conv_kind(group, tuple(w[2:]))
            macs[kind] += int(np.prod(out)) * int(np.prod(w[1:]))
            convs[kind] += 1
            params += int(np.prod(w))
        elif n.op_type in ("MatMul", "Gemm"):
            a, b = shapes.get(n.input[0]), weights.get(n.input[1]) or shapes.get(n.input[1])
            if a and b:
                macs["matmul"] += int(np.prod(a)) * int(b[-1])
        else:
            other[n.op_type] += 1
    return {"macs": dict(macs), "total_macs": int(sum(macs.values())), "conv_count": dict(convs),
            "conv_params": params, "other_ops": dict(other)}


# ---- peak rates -----------------------------------------------------------------------------------------------
def best_ms(fn, repeats: int = 15) -> tuple[float, float]:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    return float(np.min(times)), float(np.median(times))


def matmul_model(path: Path, n: int, integer: bool) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if integer:
        w = numpy_helper.from_array(rng.integers(-64, 64, (n, n), dtype=np.int8), "W")
        node = helper.make_node("MatMulInteger", ["A", "W"], ["Y"])
        a_type, y_type = TensorProto.UINT8, TensorProto.INT32
    else:
        w = numpy_helper.from_array(rng.standard_normal((n, n)).astype(np.float32), "W")
        node = helper.make_node("MatMul", ["A", "W"], ["Y"])
        a_type, y_type = TensorProto.FLOAT, TensorProto.FLOAT
    graph = helper.make_graph([node], "gemm", [helper.make_tensor_value_info("A", a_type, [n, n])],
                              [helper.make_tensor_value_info("Y", y_type, [n, n])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def gemm_rates(threads: int, bank_size: int, n_patches: int, dim: int) -> dict:
    n = 1024
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    out = {}
    best, med = best_ms(lambda: a @ b)
    out["numpy_sgemm_1024"] = {"best_ms": best, "median_ms": med, "gflops": 2 * n ** 3 / best / 1e6}
    q = rng.standard_normal((n_patches, dim), dtype=np.float32)
    bank_t = rng.standard_normal((dim, bank_size), dtype=np.float32)
    best, med = best_ms(lambda: q @ bank_t)
    out["numpy_sgemm_search_shape"] = {"shape": [n_patches, dim, bank_size], "best_ms": best, "median_ms": med,
                                       "gflops": 2 * n_patches * dim * bank_size / best / 1e6}
    time.sleep(0.3)   # let OpenBLAS workers stop spinning before onnxruntime is timed
    with tempfile.TemporaryDirectory() as tmp:
        for name, integer in (("ort_fp32_matmul_1024", False), ("ort_int8_matmulinteger_1024", True)):
            path = Path(tmp) / f"{name}.onnx"
            matmul_model(path, n, integer)
            sess = make_session(path, threads)
            x = (rng.integers(0, 255, (n, n), dtype=np.uint8) if integer else a)
            best, med = best_ms(lambda: sess.run(None, {"A": x}))
            out[name] = {"best_ms": best, "median_ms": med, ("gops" if integer else "gflops"): 2 * n ** 3 / best / 1e6}
    return out


# ---- per-operator profile -------------------------------------------------------------------------------------
def op_profile(model_path: Path, tensors: list[np.ndarray], threads: int, runs: int) -> dict:
    """onnxruntime profiler: time per optimised-graph operator type and per convolution kind, ms per frame."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "profile")
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        # uint8 pixels for INT8 graphs that take them
        feeds = [model_input(t, takes_pixels(sess), pixel_channels(sess)) for t in tensors]
        for i in range(runs):
            sess.run(None, {name: feeds[i % len(feeds)]})
        events = json.loads(Path(sess.end_profiling()).read_text())
        opt = onnx.load(opts.optimized_model_filepath, load_external_data=False)
    kinds = {}
    init_shapes = {i.name: tuple(i.dims) for i in opt.graph.initializer}
    for n in opt.graph.node:
        if "Conv" in n.op_type:
            group = next((a.i for a in n.attribute if a.name == "group"), 1)
            w_in = n.input[3] if n.op_type == "QLinearConv" else n.input[1]
            kernel = next((tuple(a.ints) for a in n.attribute if a.name == "kernel_shape"), init_shapes.get(w_in, (0, 0, 0, 0))[2:])
            kinds[n.name] = conv_kind(group, kernel)
    # The first run pays for memory planning and kernel selection: count the runs after it only.
    model_runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    cutoff = model_runs[0]["ts"] + model_runs[0]["dur"] if len(model_runs) > 1 else -1
    runs = len(model_runs) - 1 if len(model_runs) > 1 else runs
    by_op: dict[str, float] = defaultdict(float)
    by_kind: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or e["ts"] < cutoff:
            continue
        node = e["name"][: -len("_kernel_time")]
        op = e.get("args", {}).get("op_name", "?")
        by_op[op] += e["dur"] / 1000.0 / runs
        by_kind[kinds.get(node, "non-conv ops")] += e["dur"] / 1000.0 / runs
    return {"ms_per_frame_by_op": dict(sorted(by_op.items(), key=lambda kv: -kv[1])),
            "ms_per_frame_by_conv_kind": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
            "profiled_runs": runs}


def next_steps(analysis: dict, profiles: dict, work: dict, peak: dict) -> list[str]:
    """Plain statements derived from this run's numbers: the biggest stage, the gap to the extractor's floor."""
    out = []
    macs = work["total_macs"]
    for key in ("int8+hnsw", "fp32+exact"):
        a = analysis[key]
        st = {k: v for k, v in a["stage_p50_ms"].items() if k != "total"}
        top = max(st, key=st.get)
        prec = key.split("+")[0]
        alone = sum(profiles[prec]["ms_per_frame_by_conv_kind"].values())
        out.append(f"- {key}: {top} is the largest stage ({st[top]:.1f} of {a['stage_p50_ms']['total']:.1f} ms p50). "
                   f"The extractor alone runs in {alone:.1f} ms (profiler: {2 * macs / alone / 1e6:.0f} GOP/s) but takes "
                   f"{st['features']:.1f} ms inside the pipeline: the difference is cores taken by pools spinning "
                   "after their work (benchmarks/runtime_knobs.py), not arithmetic.")
    ex = analysis["fp32+exact"]
    out.append(f"- Exact search does {ex['search_macs'] / 1e9:.2f} G multiply-adds per frame at {ex['search_gflops']:.0f} "
               f"GFLOP/s, {ex['search_pct_of_gemm']:.0f}% of this CPU's sgemm rate at that shape: a smaller bank "
               "(coreset ratio) cuts it linearly; HNSW replaces it with an estimated "
               f"{analysis['int8+hnsw']['search_macs'] / 1e6:.0f} M multiply-adds but runs at a low rate "
               "(graph walks are memory-latency bound), so below a few thousand bank vectors exact search wins "
               "(benchmarks/search_scaling.py).")
    i8 = profiles["int8"]["ms_per_frame_by_conv_kind"]
    i8_total = sum(i8.values())
    slow = i8.get("depthwise", 0) + i8.get("non-conv ops", 0)
    out.append(f"- INT8 extractor: depthwise convolutions and non-conv ops (quantised pooling, resize, Q/DQ) take "
               f"{100 * slow / i8_total:.0f}% of its time for {100 * work['macs'].get('depthwise', 0) / macs:.0f}% of "
               f"the MACs; the pointwise convolutions already run at "
               f"{2 * work['macs']['pointwise 1x1'] / i8.get('pointwise 1x1', 1e9) / 1e6:.0f} GOP/s of a "
               f"{peak['ort_int8_matmulinteger_1024']['gops']:.0f} GOP/s GEMM peak.")
    fixed = [sum(a["stage_p50_ms"][s] for s in ("decode", "geometry", "preprocess")) for a in analysis.values()]
    out.append(f"- Decode (PNG), geometry and preprocess cost at least {min(fixed):.1f} ms per frame whatever the engine: a camera "
               "delivering raw frames skips the decode stage entirely.")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE,
                   help=f"bottle bundle, fitted there if missing (default {DEFAULT_BUNDLE})")
    p.add_argument("--data", type=Path, default=BOTTLE, help=f"MVTec-style category folder (default {BOTTLE})")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime, hnswlib and BLAS threads (default 2)")
    p.add_argument("--frames", type=int, default=83, help="timed frames per engine (default 83)")
    p.add_argument("--profile-runs", type=int, default=40, help="extractor runs under the profiler per model (default 40)")
    add_results_option(p)
    from bench_report import state_defaults   # every option's help states its default
    a = state_defaults(p).parse_args()
    ensure_bundle(a.bundle, a.data)
    bundle = Bundle.load(a.bundle)
    geom = bundle.geometry
    n_patches, dim = bundle.grid[0] * bundle.grid[1] * geom.n_tiles, bundle.dim   # per frame, all tiles
    params = bundle.hnsw_params

    monitor = LoadMonitor()
    work = graph_macs(bundle.path(bundle.variant("fp32").model_file), geom.n_tiles)
    bank_size = int(bundle.variant("fp32").info["bank_size"])
    # Profiles first, in a process where no pool is spinning yet (after a numpy GEMM an OpenBLAS worker keeps a
    # core busy for ~0.1 s; see runtime_knobs.py): the extractor's own speed, nothing else running.
    tensors = [preprocess(load_image(pth), geom, str(pth))[0] for pth in sorted((a.data / "test" / "good").glob("*.png"))[:8]]
    profiles = {}
    for prec in ("fp32", "int8"):
        profiles[prec] = op_profile(bundle.path(bundle.variant(prec).model_file), tensors, a.threads, a.profile_runs)
        time.sleep(0.3)
    peak = gemm_rates(a.threads, bank_size, n_patches, dim)
    runs = {}
    for prec, knn in (("int8", "hnsw"), ("fp32", "exact"), ("fp32", "hnsw"), ("int8", "exact")):
        r = run_bench(a.bundle, a.data / "test", frames=a.frames, warmup=5, threads=a.threads, precision=prec, knn=knn)
        runs[f"{prec}+{knn}"] = {"stages_ms": r["stages_ms"], "rechecked_patches": r["rechecked_patches"],
                                 "bank_size": r["bundle"]["bank_size"], "throughput_fps": r["throughput_fps"]}
    load = monitor.stop()

    fp32_peak = max(peak["numpy_sgemm_1024"]["gflops"], peak["ort_fp32_matmul_1024"]["gflops"])
    int8_peak = peak["ort_int8_matmulinteger_1024"]["gops"]
    search_peak = peak["numpy_sgemm_search_shape"]["gflops"]
    macs = work["total_macs"]
    rows, analysis = [], {}
    for key, r in runs.items():
        prec, knn = key.split("+")
        st = {s: v["p50"] for s, v in r["stages_ms"].items()}
        feat_rate = 2 * macs / st["features"] / 1e6   # GOP/s
        feat_peak = int8_peak if prec == "int8" else fp32_peak
        if knn == "exact":
            search_macs = n_patches * r["bank_size"] * dim
            search_note = "exact"
        else:
            re = r["rechecked_patches"]["mean"]
            # The seeded walk (HnswParams.seed_step): ~1 patch in step^2 walks from the top at ef_search, the
            # rest search the bottom level at ef_seeded.
            walked = n_patches / params.seed_step ** 2 if params.seed_step else n_patches
            widths = walked * params.ef_search + (n_patches - walked) * params.ef_seeded
            search_macs = widths * 2 * params.M * dim + re * r["bank_size"] * dim
            search_note = (f"estimate (ef {params.ef_search}" + (f" / seeded {params.ef_seeded}, step {params.seed_step}"
                           if params.seed_step else "") + f" x 2M per query + {re:.0f} re-checked x bank)")
        search_rate = 2 * search_macs / st["search"] / 1e6
        analysis[key] = {"stage_p50_ms": st, "features_gops": feat_rate, "features_pct_of_peak": 100 * feat_rate / feat_peak,
                         "search_macs": search_macs, "search_macs_note": search_note, "search_gflops": search_rate,
                         "search_pct_of_gemm": 100 * search_rate / search_peak}
        rows.append([key, st["decode"], st["geometry"], st["preprocess"], st["features"], f"{feat_rate:.1f} ({100 * feat_rate / feat_peak:.0f}%)",
                     st["search"], f"{search_macs / 1e6:.0f}", f"{search_rate:.1f} ({100 * search_rate / search_peak:.0f}%)",
                     st["scoring"], st["total"]])

    work_rows = [[k, v / 1e6, work["conv_count"].get(k, "-"), f"{100 * v / macs:.0f}%"] for k, v in work["macs"].items()]
    peak_rows = [[k, v.get("gflops", v.get("gops")), v["best_ms"], v["median_ms"]] for k, v in peak.items()]
    prof_rows = []
    for prec, prof in profiles.items():
        total = sum(prof["ms_per_frame_by_conv_kind"].values())
        for kind, ms in prof["ms_per_frame_by_conv_kind"].items():
            kind_macs = work["macs"].get(kind)
            prof_rows.append([prec, kind, ms, f"{100 * ms / total:.0f}%",
                              f"{100 * kind_macs / macs:.0f}%" if kind_macs else "-",
                              f"{2 * kind_macs / ms / 1e6:.1f}" if kind_macs else "-"])
    op_rows = [[prec, ", ".join(f"{op} {ms:.2f}" for op, ms in list(prof["ms_per_frame_by_op"].items())[:8])]
               for prec, prof in profiles.items()]
    body = [f"Bundle {bundle.bundle_id}: lite0 {geometry_text(geom)}, {n_patches} patches per frame x {dim}-d, "
            f"bank {bank_size}, HNSW M={params.M} ef={params.ef_search}; {a.threads} threads; stage times are medians "
            f"over {a.frames} bottle test frames (edge_runtime.bench.run_bench).",
            "", "## Work per frame (feature graph)", "",
            md_table(["convolution kind", "M multiply-adds", "layers", "share of MACs"], work_rows),
            "", f"Total {macs / 1e6:.0f} M multiply-adds per frame; {work['conv_params'] / 1e6:.2f} M conv weights.",
            "", "## Measured peak rates on this machine", "",
            md_table(["kernel", "GFLOP/s (GOP/s for int8)", "best ms", "median ms"], peak_rows),
            "", "## Stages against the peak", "",
            md_table(["engine", "decode ms", "geometry ms", "preprocess ms", "features ms", "features GOP/s (% of peak)", "search ms",
                      "search M MACs", "search GFLOP/s (% of same-shape sgemm)", "scoring ms", "total ms"], rows),
            f"\nFeature peak: {fp32_peak:.0f} GFLOP/s FP32 (best of numpy / onnxruntime 1024^3), {int8_peak:.0f} GOP/s INT8 "
            f"(onnxruntime MatMulInteger 1024^3). Search peak: numpy sgemm at the exact-search shape, {search_peak:.0f} GFLOP/s. "
            "HNSW's work is an estimate (see header), so its % is indicative only.",
            "", "## Where the extractor's time goes (onnxruntime profiler, ms per frame)", "",
            md_table(["model", "kind", "ms", "share of time", "share of MACs", "achieved GOP/s"], prof_rows),
            "", md_table(["model", "top operators (ms per frame)"], op_rows)]
    body += ["", "## What would cut time next (from the figures above)", "", *next_steps(analysis, profiles, work, peak)]
    write_results("compute_floor", "Compute floor: work per frame vs measured peak", "\n".join(body),
                  {"bundle": str(a.bundle), "bundle_id": bundle.bundle_id, "threads": a.threads, "work": work,
                   "peak": peak, "runs": runs, "analysis": analysis, "profiles": profiles,
                   "geometry": geom.to_manifest()}, load, out_dir=a.results_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
