"""Two bundles' feature graphs on the same frames, interleaved: where each spends its time, per operator type.

    python benchmarks/feature_graphs.py BEFORE AFTER IMAGES_DIR [--variant int8] [--rounds 4] [--name NAME]

For a change to the exported graph (export/patch_features.py, export/onnx_export.py): fit BEFORE with the code
before it (e.g. from a `git worktree` of that commit) and AFTER with the code after, on the same images. Then
two Pipelines, one per bundle, inspect the same raw frames of IMAGES_DIR (every image below it) in turn, which
goes first alternating: preprocess, features and total p50 / p90 / p99, and image-score agreement. Each graph's
onnxruntime per-node profile on one frame's tiles (mean ms per run, by operator type, and the convolutions
against the rest) says where the difference comes from.

Writes benchmarks/results/feature_graphs[_NAME].{json,md}.
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
from bench_report import LoadMonitor, add_results_option, md_table, node_profile, write_results  # noqa: E402

from edge_runtime.bench import IMAGE_SUFFIXES  # noqa: E402
from edge_runtime.bundle import Bundle  # noqa: E402
from edge_runtime.features import model_input  # noqa: E402
from edge_runtime.geometry import cut_tiles  # noqa: E402
from edge_runtime.pipeline import Frame, Pipeline  # noqa: E402
from edge_runtime.preprocess import canvas_of, to_tensor  # noqa: E402

STAGES = ("preprocess", "features", "total")


def profile(model_bytes: bytes, x: np.ndarray, threads: int) -> dict[str, float]:
    """Mean ms per run of each operator type (onnxruntime's per-node profile), largest first."""
    per_op: dict[str, float] = collections.defaultdict(float)
    for op, _, ms in node_profile(model_bytes, x, threads):
        per_op[op] += ms
    return dict(sorted(per_op.items(), key=lambda kv: -kv[1]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("before", type=Path, help="bundle fitted with the code before the change")
    ap.add_argument("after", type=Path, help="bundle fitted with the code after it, on the same images")
    ap.add_argument("images", type=Path, help="folder of frames (every image file below it, fed as raw BGR arrays)")
    ap.add_argument("--variant", default="int8", help="the bundles' variant to run (default: int8)")
    ap.add_argument("--rounds", type=int, default=4, help="timed passes over the images (default: 4)")
    ap.add_argument("--threads", type=int, default=2, help="inference threads (default: 2)")
    ap.add_argument("--name", default=None, help="result name suffix (default: none)")
    add_results_option(ap)
    from bench_report import state_defaults   # every option's help states its default
    a = state_defaults(ap).parse_args(argv)

    names = ("before", "after")
    bundles = {"before": Bundle.load(a.before), "after": Bundle.load(a.after)}
    pipes = {k: Pipeline(b, a.variant, threads=a.threads) for k, b in bundles.items()}
    if bundles["before"].geometry.to_manifest() != bundles["after"].geometry.to_manifest():
        raise SystemExit("the two bundles cut frames differently (geometry): fit both on the same images and settings")
    paths = sorted(p for p in a.images.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise SystemExit(f"{a.images}: no images")
    frames = [cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in paths]

    profiles = {}
    for k, pipe in pipes.items():
        rgb = pipe.load_image(paths[0])
        tiles = cut_tiles(canvas_of(rgb, pipe.geometry, str(paths[0]))[0], pipe.geometry)
        ex = pipe.extractor
        x = model_input(tiles if ex.takes_pixels else to_tensor(tiles), ex.takes_pixels, ex.channels)
        profiles[k] = profile(bundles[k].read_verified(pipe.variant.model_file), x, a.threads)

    load = LoadMonitor()
    laps = {k: {s: [] for s in STAGES} for k in names}
    rel_diff = []
    verdicts_same = 0
    for r in range(a.rounds):
        for i, (p, img) in enumerate(zip(paths, frames)):
            res = {}
            for k in (names if (i + r) % 2 else names[::-1]):
                res[k] = pipes[k].inspect(Frame(frame_id=i, source=p.name, image=img))
                for s in STAGES:
                    laps[k][s].append(res[k].timings_ms[s])
            rel_diff.append(abs(res["after"].score - res["before"].score) / res["before"].score)
            verdicts_same += res["after"].verdict == res["before"].verdict
    summary = load.stop()

    def pct(v):
        return [round(float(x), 3) for x in np.percentile(v, [50, 90, 99])]

    rows = [[k, bundles[k].bundle_id, *[f"{pct(laps[k][s])[j]:.2f}" for s in STAGES for j in (0, 1)]] for k in names]
    ops = sorted(set(profiles["before"]) | set(profiles["after"]),
                 key=lambda op: -max(profiles["before"].get(op, 0), profiles["after"].get(op, 0)))
    prow = [[op, f"{profiles['before'].get(op, 0):.3f}", f"{profiles['after'].get(op, 0):.3f}"] for op in ops]
    conv = {k: sum(v for op, v in profiles[k].items() if "Conv" in op) for k in names}
    prow.append(["all but the convolutions", *[f"{sum(profiles[k].values()) - conv[k]:.3f}" for k in names]])
    prow.append(["whole graph", *[f"{sum(profiles[k].values()):.3f}" for k in names]])
    n = len(paths) * a.rounds
    body = (f"{a.variant}, {len(paths)} frames x {a.rounds} rounds, {a.threads} threads, alternating per frame. "
            f"Image scores: largest relative difference {max(rel_diff):.2e}; verdicts equal on {verdicts_same}/{n}."
            "\n\n" + md_table(["graph", "bundle", "preprocess p50", "p90", "features p50", "p90", "total p50",
                               "p90"], rows)
            + "\n\nPer-node profile of one frame's tiles, mean ms per run by operator type:\n\n"
            + md_table(["operator", "before", "after"], prow))
    write_results("feature_graphs" + (f"_{a.name}" if a.name else ""),
                  "Two feature graphs on the same frames", body,
                  {"before": str(a.before), "after": str(a.after), "variant": a.variant, "frames": len(paths),
                   "rounds": a.rounds, "threads": a.threads, "max_relative_score_difference": max(rel_diff),
                   "verdicts_equal": verdicts_same, "profiles_ms": profiles,
                   "stages_ms": {k: {s: pct(v) for s, v in laps[k].items()} for k in laps},
                   "samples_ms": laps}, summary, out_dir=a.results_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
