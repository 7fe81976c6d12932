"""The INT8 graph's first convolution over 3 pixel channels vs 4 (a zero-weight 4th channel), interleaved.

    python benchmarks/stem_channels.py BUNDLE IMAGES_DIR [--rounds 4] [--name NAME]

onnxruntime runs a quantised convolution on its symmetric indirect kernel (MlasConvSym) only when its input
channels are a multiple of 4; over RGB the stem falls back to im2col + GEMM. `edge-export fit` now widens the pixel
input to 4 channels (export.onnx_export.widen_pixel_input, the runtime feeds RGBA: features.model_input). This
runs both graphs of BUNDLE's INT8 variant (the one it ships, and its twin with the 4th channel added or dropped)
on the same raw frames of IMAGES_DIR (every image below it):

  * the station's inspection, two Pipelines alternating per frame (which goes first alternates too): total,
    preprocess and features stage p50 / p90 / p99;
  * the features are compared bit for bit on every frame;
  * an onnxruntime per-node profile of each graph: the stem's own time.

Writes benchmarks/results/stem_channels[_NAME].{json,md}.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
from bench_report import LoadMonitor, add_results_option, md_table, node_profile, write_results  # noqa: E402

from edge_runtime.bench import IMAGE_SUFFIXES  # noqa: E402
from edge_runtime.bundle import Bundle  # noqa: E402
from edge_runtime.features import make_session, model_input, pixel_channels, takes_pixels  # noqa: E402
from edge_runtime.pipeline import Frame, Pipeline  # noqa: E402
from edge_runtime.preprocess import canvas_of  # noqa: E402
from edge_runtime.geometry import cut_tiles  # noqa: E402
from export.onnx_export import narrow_pixel_input, widen_pixel_input  # noqa: E402

STAGES = ("preprocess", "features", "total")


def twin_model(model_bytes: bytes, channels: int) -> bytes:
    """The same graph with the other channel count (the exporter's own passes)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        path.write_bytes(model_bytes)
        if not (widen_pixel_input(path) if channels == 3 else narrow_pixel_input(path)):
            raise SystemExit(f"this INT8 graph's {channels}-channel pixel input cannot be changed")
        return path.read_bytes()


def stem_ms(model_bytes: bytes, tiles: np.ndarray, channels: int, threads: int) -> dict:
    """The first convolution's and the whole graph's mean kernel time per run, ms (per-node profile)."""
    nodes = node_profile(model_bytes, model_input(tiles, True, channels), threads)
    return {"stem_ms": next(ms for op, _, ms in nodes if "Conv" in op), "graph_ms": sum(ms for _, _, ms in nodes)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle", type=Path, help="bundle directory (its INT8 variant is measured)")
    ap.add_argument("images", type=Path, help="folder of frames (every image file below it, fed as raw BGR arrays)")
    ap.add_argument("--rounds", type=int, default=4, help="timed passes over the images (default: 4)")
    ap.add_argument("--threads", type=int, default=2, help="inference threads (default: 2)")
    ap.add_argument("--name", default=None, help="result name suffix (default: none)")
    add_results_option(ap)
    from bench_report import state_defaults   # every option's help states its default
    a = state_defaults(ap).parse_args(argv)

    bundle = Bundle.load(a.bundle)
    shipped = bundle.read_verified(bundle.variant("int8").model_file)
    probe = make_session(shipped, 1)
    if not takes_pixels(probe):
        raise SystemExit(f"{a.bundle}: its INT8 graph takes the float tensor, not pixels: nothing to compare")
    channels = pixel_channels(probe)
    models = {channels: shipped, 7 - channels: twin_model(shipped, channels)}
    pipes = {}
    for c, model in models.items():
        pipe = Pipeline(bundle, "int8", threads=a.threads)
        pipe.extractor.session = make_session(model, a.threads)
        pipe.extractor.channels = c
        pipes[c] = pipe
    paths = sorted(p for p in a.images.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise SystemExit(f"{a.images}: no images")
    frames = [cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in paths]

    # Features of both graphs on every frame, bit for bit.
    identical = 0
    for p, img in zip(paths, frames):
        rgb = pipes[3].load_image(p)
        tiles = cut_tiles(canvas_of(rgb, pipes[3].geometry, str(p))[0], pipes[3].geometry)
        f = {c: pipe.extractor(tiles) for c, pipe in pipes.items()}
        identical += bool(np.array_equal(f[3], f[4]))
    profile = {c: stem_ms(m, tiles, c, a.threads) for c, m in models.items()}

    load = LoadMonitor()
    laps = {c: {s: [] for s in STAGES} for c in pipes}
    scores_same = 0
    for r in range(a.rounds):
        for i, (p, img) in enumerate(zip(paths, frames)):
            order = (3, 4) if (i + r) % 2 else (4, 3)
            res = {}
            for c in order:
                res[c] = pipes[c].inspect(Frame(frame_id=i, source=p.name, image=img))
                for s in STAGES:
                    laps[c][s].append(res[c].timings_ms[s])
            scores_same += res[3].score == res[4].score
    summary = load.stop()

    def pct(v):
        return [round(float(x), 3) for x in np.percentile(v, [50, 90, 99])]

    rows = []
    for c in (3, 4):
        rows.append([f"{c} channels" + (" (shipped)" if c == channels else ""),
                     *[f"{x:.2f}" for s in STAGES for x in pct(laps[c][s])[:2]],
                     f"{profile[c]['stem_ms']:.3f}", f"{profile[c]['graph_ms']:.2f}"])
    body = (f"bundle {bundle.bundle_id} (INT8, {pipes[3].geometry.input_size[0]}x{pipes[3].geometry.input_size[1]}, "
            f"{pipes[3].geometry.n_tiles} tile(s)), {len(paths)} frames x {a.rounds} rounds, {a.threads} threads, "
            f"alternating per frame. Features bit-identical on {identical}/{len(paths)} frames; image scores equal "
            f"on {scores_same}/{len(paths) * a.rounds} inspections.\n\n"
            + md_table(["pixel input", "preprocess p50", "p90", "features p50", "p90", "total p50", "p90",
                        "stem (profile) ms", "graph (profile) ms"], rows))
    write_results("stem_channels" + (f"_{a.name}" if a.name else ""),
                        "INT8 stem over 3 vs 4 pixel channels", body,
                        {"bundle": str(a.bundle), "bundle_id": bundle.bundle_id, "shipped_channels": channels,
                         "frames": len(paths), "rounds": a.rounds, "threads": a.threads,
                         "features_identical": identical, "scores_equal": scores_same,
                         "profile": {str(c): v for c, v in profile.items()},
                         "stages_ms": {str(c): {s: pct(v) for s, v in laps[c].items()} for c in laps},
                         "samples_ms": {str(c): laps[c] for c in laps}}, summary, out_dir=a.results_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
