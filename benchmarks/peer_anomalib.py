"""Our deployed path against anomalib's PatchCore exported to ONNX (same backbone weights and taps), one interleaved run.

    python -m venv --system-site-packages /work/venv-peer          # anomalib lives here, never in the runtime
    /work/venv-peer/bin/pip install -c constraints.txt 'patchcore-edge[peer]'   # constraints: torch==2.13.0, torchvision==0.28.0
    PYTHONPATH=$PWD /work/venv-peer/bin/python benchmarks/peer_anomalib.py \\
        --bundle 0.01=/tmp/bench_bundles/bottle01 --bundle 0.1=/tmp/bench_bundles/bottle10

The peer: anomalib's `Patchcore` (its own coreset sampler, nearest-neighbour scoring with num_neighbors=9
re-weighting, anomaly-map generator and `to_onnx` export), with anomalib's timm extractor replaced by OUR
EfficientNet-Lite taps (export.backbone, TF padding, the same weights) and its pre-processor set to our input size
and normalisation, so both engines see the same features up to INT8 and resampling. Anomalib's post-processor
(score normalisation with clamping, fitted on a validation split) is left out of the graph: its clamp would tie
scores and bias the AUROC; it is a handful of element-wise ops. Each anomalib model is fitted (and exported) once in
a child process and cached in --work-dir; the timing process never imports torch.

Each test frame is inspected by every engine x input mode (PNG bytes, raw uint8 frame) in a random order, with an
idle --settle-ms before each, so drifting load hits all engines alike (as on a triggered line); with --burst N each
engine instead inspects N frames back to back after --warm-ms of untimed inspections (steady state, as on a busy
station), engines in random order per burst. A frame counts as quiet when other processes
used < --quiet-cores CPU cores while its engines ran. Writes benchmarks/results/NAME.{json,md} (--name).
Ours is built through the public Pipeline/Bundle API only: the run measures whatever the current pipeline is.
Ours is timed to the score AND its heat map (read after each verdict: anomalib's graph makes its map too); a
second table gives our time to the verdict alone from the same calls (what the line's outputs wait for), and
--position-prior on off times our search with and without its position prior (which speeds the verdict; with it
the heat map takes the bounds that search left, without it every patch walks the graph).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_report import (BOTTLE, LoadMonitor, add_results_option, md_table, median, percentile,  # noqa: E402
                          write_results)

INPUT_MODES = ("png", "raw")
# anomalib's ImageNet-free pre-processing replaced by ours: (x*255 - 127) / 128 == (x - 127/255) / (128/255).
NORM_MEAN, NORM_STD = 127.0 / 255.0, 128.0 / 255.0


# ---- the anomalib side: fit + export in a child process (torch, anomalib) ---------------------------------------
def _torchvision_without_ops() -> None:
    """Let `import torchvision` succeed when its compiled ops cannot load.

    PyPI's x86_64 torchvision 0.28 links libtorch_cuda.so; beside the CPU build of torch 2.13 its _C.so does not
    load, and torchvision's import then fails on `register_fake("torchvision::nms")` ("operator does not exist").
    anomalib's PatchCore uses no torchvision op (nms, roi_align, ...), only transforms; declaring the two schemas
    that torchvision registers unconditionally lets the import through. Any real use of them would still fail.
    """
    import importlib.util

    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    lib = Path(list(spec.submodule_search_locations)[0]) / "_C.so"
    try:
        torch.ops.load_library(str(lib))
        return
    except OSError:
        pass
    global _TV_SHIM  # the Library object must outlive this function, or the definitions go away
    _TV_SHIM = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        _TV_SHIM.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    print(f"note: {lib} does not load beside torch {torch.__version__} (a CUDA build of torchvision); "
          "declared torchvision::nms/qnms so that anomalib imports (PatchCore uses neither)", file=sys.stderr)


def fit_anomalib(data: Path, ratio: float, input_hw: tuple[int, int], frame_hw: tuple[int, int], backbone: str,
                 out_dir: Path, sampler: str = "anomalib", seed: int = 0) -> dict:
    """anomalib Patchcore with our taps, fitted on data/train/good, exported by anomalib's to_onnx."""
    _torchvision_without_ops()
    import cv2
    import torch
    from torch import nn
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    import anomalib
    from anomalib.models import Patchcore
    from anomalib.pre_processing import PreProcessor

    from export.backbone import EfficientNetLiteTaps
    from export.dataset import train_images

    class OurTaps(nn.Module):
        """Our backbone in anomalib's extractor slot: {layer name: feature map}, as TimmFeatureExtractor returns."""

        def __init__(self) -> None:
            super().__init__()
            self.net = EfficientNetLiteTaps(backbone, padding="tf")   # the exporter's padding (manifest: TF SAME)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            # As anomalib's TimmFeatureExtractor: always eval, so PatchcoreModel.train() (the fit phase) does not
            # switch BatchNorm to batch statistics and rewrite its running averages.
            self.net.eval()
            f8, f16 = self.net(x)
            return {"stride8": f8, "stride16": f16}

    torch.manual_seed(seed)
    torch.set_num_threads(2)
    pre = PreProcessor(transform=Compose([Resize(input_hw, antialias=True),
                                          Normalize(mean=[NORM_MEAN] * 3, std=[NORM_STD] * 3)]))
    # backbone "resnet18", pre_trained=False: a placeholder that downloads nothing; replaced by our taps below.
    model = Patchcore(backbone="resnet18", layers=("layer2", "layer3"), pre_trained=False,
                      coreset_sampling_ratio=ratio, pre_processor=pre, post_processor=False, evaluator=False,
                      visualizer=False)
    model.model.feature_extractor = OurTaps().eval()
    model.model.layers = ["stride8", "stride16"]

    out_dir.mkdir(parents=True, exist_ok=True)
    bank_file = out_dir / "memory_bank.npy"
    # The training embeddings do not depend on the coreset ratio: computed once, shared by every ratio's fit.
    emb_file = out_dir.parent / f"embeddings_{backbone}_{input_hw[0]}x{input_hw[1]}.npy"
    paths = train_images(data)
    if sampler == "reuse":
        # Re-export only: the bank anomalib fitted earlier (memory_bank.npy, or the initializer of its ONNX model).
        bank, prev = _saved_bank(out_dir)
        model.model.memory_bank = torch.from_numpy(bank)
        t_feat, t_coreset, n_patches = prev["seconds"]["features"], prev["seconds"]["coreset"], prev["patches"]
        sampler = prev.get("coreset_sampler", "anomalib")
    else:
        t0 = time.perf_counter()
        if emb_file.is_file():
            model.model.embedding_store = [torch.from_numpy(np.load(emb_file))]
        else:
            model.model.train()
            with torch.no_grad():
                for i in range(0, len(paths), 16):
                    batch = []
                    for p in paths[i:i + 16]:
                        rgb = cv2.cvtColor(cv2.imread(str(p), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
                        batch.append(torch.from_numpy(rgb).permute(2, 0, 1).float() / 255.0)
                    # what Patchcore.training_step does, after the PreProcessor callback has transformed the batch
                    model.model(model.pre_processor(torch.stack(batch)))
            np.save(emb_file, torch.vstack(model.model.embedding_store).numpy())
        t_feat = time.perf_counter() - t0
        n_patches = sum(e.shape[0] for e in model.model.embedding_store)
        t0 = time.perf_counter()
        if sampler == "anomalib":
            model.fit()                                  # anomalib's k-center-greedy coreset
        else:
            # The same greedy k-center selection, by our faster implementation (128-d projection, cache-sized
            # chunks), over anomalib's own embeddings; anomalib's sampler makes one pass over a 303-d projection of
            # every patch per selected point: 20 min at 1%, hours at 10% on a loaded 2-core machine.
            from export.coreset import greedy_coreset

            emb = torch.vstack(model.model.embedding_store)
            model.model.embedding_store.clear()
            idx = greedy_coreset(emb.numpy(), int(emb.shape[0] * ratio), seed=seed)
            model.model.memory_bank = emb[torch.from_numpy(np.asarray(idx, dtype=np.int64))].contiguous()
        t_coreset = time.perf_counter() - t0
        np.save(bank_file, model.model.memory_bank.numpy())
    model.eval()
    t0 = time.perf_counter()
    # anomalib's own export. dynamic_shapes=None: one frame per call, as a station runs. Its default (batch axis
    # "dynamic") traces with a batch of 2 and, for this model, comes out fixed at batch 2.
    onnx_path = model.to_onnx(out_dir, input_size=frame_hw, dynamic_shapes=None)
    t_export = time.perf_counter() - t0
    bank = tuple(model.model.memory_bank.shape)
    meta = {"anomalib": anomalib.__version__, "torch": torch.__version__, "onnx": str(onnx_path),
            "coreset_ratio": ratio, "bank": list(bank), "patches": n_patches, "train_images": len(paths),
            "input_hw": list(input_hw), "frame_hw": list(frame_hw), "backbone": backbone,
            "num_neighbors": model.model.num_neighbors, "coreset_sampler": sampler, "export_batch": 1,
            "seconds": {"features": round(t_feat, 1), "coreset": round(t_coreset, 1), "export": round(t_export, 1)}}
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def _saved_bank(out_dir: Path) -> tuple[np.ndarray, dict]:
    prev = json.loads((out_dir / "meta.json").read_text())
    if (out_dir / "memory_bank.npy").is_file():
        return np.load(out_dir / "memory_bank.npy"), prev
    import onnx
    from onnx import numpy_helper

    model = onnx.load(prev["onnx"])
    bank = next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name.endswith("memory_bank"))
    np.save(out_dir / "memory_bank.npy", bank)
    return bank, prev


def ensure_anomalib(a, ratio: float, input_hw, frame_hw) -> dict:
    sampler = "ours" if ratio in a.our_sampler_at else "anomalib"
    out = a.work_dir / f"coreset{ratio:g}"
    meta_file = out / "meta.json"
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        same_bank = meta.get("input_hw") == list(input_hw) and meta.get("coreset_sampler") == sampler
        if (same_bank and meta.get("frame_hw") == list(frame_hw) and meta.get("export_batch") == 1
                and Path(meta["onnx"]).is_file()):
            return meta
        if same_bank:
            sampler = "reuse"      # the fitted bank is still right: export again, do not fit again
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--fit-anomalib", str(ratio), "--data", str(a.data),
           "--work-dir", str(a.work_dir), "--input-hw", f"{input_hw[0]}x{input_hw[1]}",
           "--frame-hw", f"{frame_hw[0]}x{frame_hw[1]}", "--backbone", a.backbone, "--sampler", sampler]
    print(f"fitting anomalib PatchCore at {ratio:g} coreset (child process): {' '.join(cmd)}", file=sys.stderr)
    subprocess.run(cmd, check=True)
    return json.loads(meta_file.read_text())


# ---- the timed engines (no torch in this process) --------------------------------------------------------------
class OursEngine:
    def __init__(self, pipeline) -> None:
        self.pipeline = pipeline
        self.verdict_ms = 0.0   # the last frame's time to the verdict (what the line waits for), heat map excluded

    def inspect(self, name: str, data: bytes | np.ndarray) -> float:
        from edge_runtime.records import Frame, Verdict

        frame = (Frame(frame_id=0, source=name, encoded=data) if isinstance(data, bytes)
                 else Frame(frame_id=0, source=name, image=data))
        r = self.pipeline.inspect(frame)
        if r.verdict is Verdict.FAULT:
            raise RuntimeError(f"{name}: our pipeline faulted: {r.error}")
        self.verdict_ms = r.timings_ms["total"]
        r.anomaly_map   # made after the verdict, on first read; anomalib's graph makes its map too: count ours
        return float(r.score)


class AnomalibOnnxEngine:
    """anomalib's exported graph in onnxruntime, fed as anomalib's inferencers feed it: RGB float [0, 1], NCHW."""

    def __init__(self, onnx_path: str, threads: int) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.score_index = self.outputs.index("pred_score")

    def inspect(self, name: str, data: bytes | np.ndarray) -> float:
        import cv2

        if isinstance(data, bytes):
            bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
            if bgr is None:
                raise RuntimeError(f"{name}: cannot decode")
        else:
            bgr = data
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        x = (rgb.astype(np.float32) * (1.0 / 255.0)).transpose(2, 0, 1)[None]
        out = self.session.run(None, {self.input: np.ascontiguousarray(x)})   # score and anomaly map, as deployed
        return float(np.asarray(out[self.score_index]).reshape(-1)[0])


def _parse_hw(text: str) -> tuple[int, int]:
    h, _, w = text.partition("x")
    return int(h), int(w)


def _parse_bundle(text: str) -> tuple[float, Path]:
    ratio, sep, path = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--bundle wants RATIO=PATH (e.g. 0.1=/tmp/bench_bundles/bottle10), got {text!r}")
    return float(ratio), Path(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=_parse_bundle, action="append", default=None,
                   help="RATIO=PATH: our bundle fitted with `edge-export fit --coreset-ratio RATIO` (repeatable; "
                        "default 0.01=/tmp/bench_bundles/bottle01 and 0.1=/tmp/bench_bundles/bottle10, fitted "
                        "with fit's defaults when missing)")
    p.add_argument("--data", type=Path, default=BOTTLE, help=f"benchmark folder (default {BOTTLE})")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/peer_anomalib"),
                   help="where the fitted anomalib ONNX models are cached (default /tmp/peer_anomalib)")
    p.add_argument("--backbone", default="lite0", help="our backbone, for both engines (default lite0)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads of every engine (default 2)")
    p.add_argument("--knn", nargs="+", choices=("hnsw", "ivf", "exact", "onnx"), default=["hnsw"],
                   help="our search engines, each timed as its own engine in the same interleaved run "
                        "(default hnsw; ivf needs the ivf-search extra)")
    p.add_argument("--position-prior", nargs="+", choices=("on", "off"), default=["on"],
                   help="our search's position prior, each setting timed as its own engine in the same run "
                        "(default on, as the station runs; `on off` times both)")
    p.add_argument("--passes", type=int, default=2, help="passes over the test set (default 2)")
    p.add_argument("--settle-ms", type=float, default=100.0,
                   help="idle time before each engine's frame, or before each burst (default 100)")
    p.add_argument("--burst", type=int, default=1,
                   help="frames each engine inspects back to back, after untimed warm-up frames (--warm-ms), before "
                        "the next engine takes over (default 1: every frame after --settle-ms idle and no warm-up, "
                        "as on a triggered line; 8: steady state, as on a busy station)")
    p.add_argument("--warm-ms", type=float, default=150.0,
                   help="with --burst > 1: untimed inspections by the engine, for at least this long (and at least "
                        "one), before its timed burst: the CPU at full speed for every engine alike (default 150; "
                        "this VM takes ~50 ms of work to come back to speed after 100 ms idle)")
    p.add_argument("--name", default="peer_anomalib",
                   help="results file name, NAME.json / NAME.md (default peer_anomalib)")
    p.add_argument("--quiet-cores", type=float, default=0.3,
                   help="a frame is quiet when other processes used fewer CPU cores than this while it ran "
                        "(default 0.3)")
    p.add_argument("--every", type=int, default=1,
                   help="use every N-th test image, for a quick trial (default 1: all 83 bottle test images)")
    p.add_argument("--seed", type=int, default=0, help="random engine order (default 0)")
    p.add_argument("--our-sampler-at", type=float, nargs="*", default=[],
                   help="coreset ratios at which anomalib's embeddings are subsampled by our k-center-greedy "
                        "implementation instead of anomalib's (same algorithm and bank size; anomalib's sampler "
                        "takes hours at 0.1 on a loaded 2-core machine) (default: none, anomalib's everywhere)")
    p.add_argument("--fit-anomalib", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--sampler", choices=("anomalib", "ours", "reuse"), default="anomalib", help=argparse.SUPPRESS)
    p.add_argument("--input-hw", type=_parse_hw, default=None, help=argparse.SUPPRESS)
    p.add_argument("--frame-hw", type=_parse_hw, default=None, help=argparse.SUPPRESS)
    add_results_option(p)
    from bench_report import state_defaults   # every option's help states its default
    a = state_defaults(p).parse_args(argv)

    if a.fit_anomalib is not None:   # the child: torch + anomalib, then exit
        out = a.work_dir / f"coreset{a.fit_anomalib:g}"
        meta = fit_anomalib(a.data, a.fit_anomalib, a.input_hw, a.frame_hw, a.backbone, out, a.sampler)
        print(json.dumps(meta), file=sys.stderr)
        return 0

    import importlib.util

    if importlib.util.find_spec("anomalib") is None:
        print("anomalib is not installed: this benchmark needs the optional extra `peer` in its own venv "
              "(see benchmarks/README.md, 'Peer: anomalib')", file=sys.stderr)
        return 2

    import cv2

    from edge_runtime.bundle import Bundle
    from edge_runtime.pipeline import Pipeline
    from export.dataset import test_images
    from export.metrics import auroc

    bundles = a.bundle or [(0.01, Path("/tmp/bench_bundles/bottle01")), (0.1, Path("/tmp/bench_bundles/bottle10"))]
    for ratio, path in bundles:
        if not (path / "manifest.yaml").is_file():
            print(f"{path}: no bundle; fitting it with `edge-export fit --coreset-ratio {ratio:g}` (fit's defaults)",
                  file=sys.stderr)
            subprocess.run(["nice", "-n", "10", sys.executable, "-m", "export.cli", "fit", str(a.data),
                            "--out", str(path), "--coreset-ratio", str(ratio)], check=True)

    items = test_images(a.data)[::a.every]
    engines: dict[str, object] = {}
    info: dict[str, dict] = {}
    for ratio, path in bundles:
        bundle = Bundle.load(path)
        for knn in a.knn:
            for prior in a.position_prior:
                pipe = Pipeline(bundle, knn=knn, threads=a.threads, position_prior=prior == "on")
                ours = (f"ours {ratio:.0%}" + ("" if a.knn == ["hnsw"] else f" {knn}")
                        + ("" if a.position_prior == ["on"] else f" prior {prior}"))
                engines[ours] = OursEngine(pipe)
                info[ours] = {"bundle": str(path), "bundle_id": bundle.bundle_id, "precision": pipe.variant.name,
                              "knn": pipe.knn, "bank_size": pipe.variant.info.get("bank_size"),
                              "input_wh": list(pipe.geometry.input_size), "ratio": ratio,
                              "position_prior": pipe.prior_note}
        (w, h) = pipe.geometry.input_size
        frame = cv2.imread(str(items[0].path), cv2.IMREAD_COLOR)
        meta = ensure_anomalib(a, ratio, (h, w), frame.shape[:2])
        peer = f"anomalib ONNX {ratio:.0%}"
        engines[peer] = AnomalibOnnxEngine(meta["onnx"], a.threads)
        info[peer] = {"ratio": ratio}
        info[peer] |= {"onnx": meta["onnx"], "bank_size": meta["bank"][0], "dim": meta["bank"][1],
                      "fit_seconds": meta["seconds"], "anomalib": meta["anomalib"], "torch": meta["torch"],
                      "num_neighbors": meta["num_neighbors"], "coreset_sampler": meta["coreset_sampler"], "input_wh": [meta["input_hw"][1], meta["input_hw"][0]]}
    assert "torch" not in sys.modules, "the timing process must not import torch"

    frames = []
    for it in items:
        data = it.path.read_bytes()
        frames.append((str(it.path), it.label, data, cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)))
    variants = [(e, m) for e in engines for m in INPUT_MODES]
    # warm-up: one frame through every variant (first-run allocations, lazy graph init)
    for e, m in variants:
        name, _, data, raw = frames[0]
        engines[e].inspect(name, data if m == "png" else raw)

    rng = random.Random(a.seed)
    times = {f"{e} [{m}]": [] for e, m in variants}
    quiet_times = {k: [] for k in times}
    # Our engines' time to the verdict in the same calls (Pipeline's own clock; the heat map comes after it).
    verdict_times = {f"{e} [{m}]": [] for e, m in variants if isinstance(engines[e], OursEngine)}
    quiet_verdict = {k: [] for k in verdict_times}
    scores: dict[str, list[float]] = {e: [] for e in engines}
    other_cores = []
    load = LoadMonitor()
    burst = max(1, a.burst)
    for pass_no in range(a.passes):
        for start in range(0, len(frames), burst):
            group = frames[start:start + burst]
            order = variants[:]
            rng.shuffle(order)
            mon = LoadMonitor()
            this = {}
            for e, m in order:
                time.sleep(a.settle_ms / 1000.0)
                if burst > 1:   # steady state: the engine has been inspecting for a while, as on a busy station
                    t_warm = time.perf_counter() + a.warm_ms / 1000.0
                    while True:
                        engines[e].inspect(group[0][0], group[0][2] if m == "png" else group[0][3])
                        if time.perf_counter() >= t_warm:
                            break
                for name, label, data, raw in group:
                    t0 = time.perf_counter()
                    s = engines[e].inspect(name, data if m == "png" else raw)
                    this.setdefault(f"{e} [{m}]", []).append((time.perf_counter() - t0) * 1000.0)
                    if isinstance(engines[e], OursEngine):
                        this.setdefault(("verdict", f"{e} [{m}]"), []).append(engines[e].verdict_ms)
                    if pass_no == 0 and m == "png":
                        scores[e].append(s)
            other = mon.stop()["other_processes_cpu_cores"]
            other_cores.extend([other] * len(group))
            quiet = other is not None and other < a.quiet_cores
            for k, v in this.items():
                if isinstance(k, tuple):
                    verdict_times[k[1]].extend(v)
                    if quiet:
                        quiet_verdict[k[1]].extend(v)
                    continue
                times[k].extend(v)
                if quiet:
                    quiet_times[k].extend(v)
    load = load.stop()

    labels = np.array([0 if lab == "good" else 1 for _, lab, _, _ in frames])
    aurocs = {e: auroc(labels, np.array(s)) for e, s in scores.items()}
    n_quiet = sum(1 for o in other_cores if o is not None and o < a.quiet_cores)

    def stats(v):
        return {"n": len(v), "median_ms": median(v), "p90_ms": percentile(v, 90), "p99_ms": percentile(v, 99)} if v else None

    # Quiet frames when there are enough of them (>= 20), else all frames; one choice for every row.
    basis = "quiet" if n_quiet >= 20 else "all"
    rows, table = [], {}
    for e, m in variants:
        k = f"{e} [{m}]"
        # the first of our engines at the same bank ratio is the yardstick ("x ours")
        ours_e = next(x for x in engines if x.startswith("ours") and info[x]["ratio"] == info[e]["ratio"])
        ours_k = f"{ours_e} [{m}]"
        st_all, st_q = stats(times[k]), stats(quiet_times[k])
        use = st_q if basis == "quiet" else st_all
        ref = stats(quiet_times[ours_k]) if basis == "quiet" else stats(times[ours_k])
        table[k] = {"all_frames": st_all, "quiet_frames": st_q, "image_auroc": aurocs[e], **info[e]}
        label = e + (" (bank: our sampler)" if info[e].get("coreset_sampler") == "ours" else "")
        rows.append([label, m, info[e]["bank_size"], use["median_ms"], use["p90_ms"], use["p99_ms"],
                     use["median_ms"] / ref["median_ms"], aurocs[e]])
    headers = ["engine", "input", "bank", f"median ms ({basis})", f"p90 ms ({basis})", f"p99 ms ({basis})",
               "x ours (median)", "image AUROC"]
    # The verdict alone: what the line waits for (ours: Pipeline.inspect's total; the heat map is made after it,
    # when the NG image store or the page reads it). anomalib's graph gives score and map in one run.
    vrows = []
    for k in verdict_times:
        v = quiet_verdict[k] if basis == "quiet" else verdict_times[k]
        if not v:
            continue
        e, m = k.rsplit(" [", 1)
        peer = f"anomalib ONNX {info[e]['ratio']:.0%} [{m}"
        peer_v = quiet_times.get(peer) if basis == "quiet" else times.get(peer)
        vrows.append([e, m.rstrip("]"), median(v), percentile(v, 90), percentile(v, 99),
                      median(peer_v) / median(v) if peer_v else float("nan")])
        table[k]["to_verdict"] = stats(v)
    body = "\n".join([
        f"bottle test set, {len(frames)} frames x {a.passes} passes, {a.threads} threads per engine, "
        + (f"random engine order per frame, {a.settle_ms:g} ms idle before each" if burst == 1 else
         f"bursts of {burst} frames back to back per engine after {a.warm_ms:g} ms of untimed warm-up inspections "
         "(steady state), random "
         f"engine order per burst, {a.settle_ms:g} ms idle before each burst") + f"; quiet frames: {n_quiet} of "
        f"{len(other_cores)} (other processes < {a.quiet_cores} cores); the table uses {basis} frames. Input png = encoded bytes to score, "
        "raw = decoded uint8 BGR frame to score.", "",
        md_table(headers, rows), "",
        "Our engines to the verdict alone, in the same calls (Pipeline's own clock; the heat map above is made after "
        "it):", "",
        md_table(["engine", "input", f"median ms ({basis})", f"p90 ms ({basis})", f"p99 ms ({basis})",
                  "anomalib (score + map) / ours to verdict, medians"], vrows), "",
        "anomalib: its Patchcore (k-center-greedy coreset, num_neighbors=9 score re-weighting, anomaly map with "
        "Gaussian blur) with our EfficientNet-Lite taps and input normalisation, exported by its to_onnx, run in "
        "onnxruntime; post-processor (score normalisation) not in the graph. Ours: edge_runtime.pipeline.Pipeline "
        "on a bundle from `edge-export fit` with its defaults (deployed variant and search).",
    ])
    data = {"engines": table, "frames": len(frames), "passes": a.passes, "threads": a.threads,
            "settle_ms": a.settle_ms, "burst": burst, "warm_ms": a.warm_ms if burst > 1 else 0, "quiet_cores": a.quiet_cores, "quiet_frames": n_quiet, "table_basis": basis,
            "other_cores_per_frame": other_cores,
            "cpu_has_avx512_vnni": "avx512_vnni" in Path("/proc/cpuinfo").read_text().split(),
            "loadavg": os.getloadavg()}
    write_results(a.name, "Ours vs anomalib PatchCore (ONNX), matched bank sizes", body, data, load,
                  out_dir=a.results_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
