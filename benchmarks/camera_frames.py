"""Camera-size frames end to end: the same category fitted with each resample method, timed and evaluated.

    python benchmarks/camera_frames.py [--size 2048x2048] [--frames 166]

This machine has no real parts at camera resolution (the data sets are at most 600 px wide), so the category's
images (and masks) are enlarged to --size into --work (bicubic; masks nearest) as a stand-in for a 4 MP camera:
the resample's COST is then that of a real camera frame; the accuracy comparison only shows that halve-area does
no harm on smooth content, not what it does on real high-frequency detail. Two bundles are fitted with the
exporter's defaults but for `--resample` (area: one cv2.INTER_AREA, the schema-2 behaviour; halve-area: the
default since schema 3), each fit in its own process; both go through edge_runtime.bench.run_bench on raw
frames (the daemon's Pipeline.inspect), alternating bundle by bundle for --rounds rounds, and through
`edge-export evaluate` (deployed INT8 + HNSW). Writes benchmarks/results/camera_frames.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import cv2

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_report import BOTTLE, LoadMonitor, add_results_option, md_table, write_results  # noqa: E402

from edge_runtime.bench import run_bench  # noqa: E402
from edge_runtime.bundle import MANIFEST, SCHEMA_VERSION, Bundle, BundleError  # noqa: E402

METHODS = ("area", "halve-area")


def _size(text: str) -> tuple[int, int]:
    w, h = (int(v) for v in text.lower().split("x"))
    if min(w, h) < 64:
        raise argparse.ArgumentTypeError(f"--size {text}: at least 64x64")
    return w, h


def enlarge(data: Path, out: Path, size: tuple[int, int]) -> Path:
    """The category at `size`, written once (images bicubic, ground-truth masks nearest)."""
    done = out / ".complete"
    if done.is_file():
        return out
    for src in sorted(data.rglob("*.png")):
        dst = out / src.relative_to(data)
        dst.parent.mkdir(parents=True, exist_ok=True)
        img = cv2.imread(str(src), cv2.IMREAD_UNCHANGED)
        mask = "ground_truth" in src.relative_to(data).parts
        img = cv2.resize(img, size, interpolation=cv2.INTER_NEAREST if mask else cv2.INTER_CUBIC)
        cv2.imwrite(str(dst), img, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    done.write_text("")
    return out


def fit(data: Path, bundle: Path, method: str) -> Path:
    if (bundle / MANIFEST).is_file():
        try:
            b = Bundle.load(bundle)
            if b.manifest["schema_version"] == SCHEMA_VERSION and b.geometry.resample == method:
                return bundle
        except BundleError as exc:
            print(f"{bundle}: not usable ({exc}); fitting it again", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "export.cli", "fit", str(data / "train" / "good"), "--out", str(bundle),
                    "--resample", method, "--overwrite"], check=True, cwd=Path(__file__).resolve().parents[1])
    return bundle


def evaluate(bundle: Path, data: Path, out: Path) -> dict:
    subprocess.run([sys.executable, "-m", "export.cli", "evaluate", str(bundle), str(data), "--json", str(out)],
                   check=True, cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL)
    r = json.loads(out.read_text())
    return {k: r[k] for k in ("image_auroc", "pixel_auroc", "threshold", "false_rejects", "escapes", "n_good",
                              "n_defect")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=BOTTLE, help=f"MVTec-style category folder (default {BOTTLE})")
    p.add_argument("--size", type=_size, default=(2048, 2048), help="frame size W x H (default 2048x2048, 4.2 MP)")
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_bundles/camera"),
                   help="where the enlarged set and the two bundles are made once and reused "
                        "(default /tmp/bench_bundles/camera)")
    p.add_argument("--frames", type=int, default=83, help="timed frames per bundle per round (default 83)")
    p.add_argument("--rounds", type=int, default=2, help="rounds, bundles alternating (default 2)")
    p.add_argument("--threads", type=int, default=2, help="inference threads (default 2)")
    add_results_option(p)
    from bench_report import state_defaults   # every option's help states its default
    a = state_defaults(p).parse_args()

    w, h = a.size
    data = enlarge(a.data, a.work / f"{a.data.name}_{w}x{h}", a.size)
    bundles = {m: fit(data, a.work / f"{a.data.name}_{w}x{h}_{m}", m) for m in METHODS}
    load = LoadMonitor()
    runs: dict[str, list[dict]] = {m: [] for m in METHODS}
    for _ in range(a.rounds):
        for m in METHODS:
            r = run_bench(bundles[m], images_dir=data / "test", frames=a.frames, warmup=5, threads=a.threads, raw=True)
            r.pop("samples_ms")
            runs[m].append(r)
            st = r["stages_ms"]
            print(f"{m:<11} geometry p50 {st['geometry']['p50']:.2f} ms, total p50 {st['total']['p50']:.2f} "
                  f"p99 {st['total']['p99']:.2f} ms", flush=True)
    load_summary = load.stop()
    accuracy = {m: evaluate(bundles[m], data, a.work / f"evaluate_{m}.json") for m in METHODS}
    rows = []
    for m in METHODS:
        for i, r in enumerate(runs[m]):
            st = r["stages_ms"]
            acc = accuracy[m]
            rows.append([m, i + 1, st["decode"]["p50"], st["geometry"]["p50"], st["features"]["p50"],
                         st["search"]["p50"], st["total"]["p50"], st["total"]["p99"], acc["image_auroc"],
                         acc["pixel_auroc"], f"{acc['false_rejects']} / {acc['escapes']}"])
    body = (f"{a.data.name} enlarged to {w} x {h} (bicubic; a stand-in for a camera of that size: the cost is "
            f"real, the accuracy only shows no harm on smooth content), raw BGR frames, {a.frames} frames x "
            f"{a.rounds} rounds per bundle, alternating; accuracy: `edge-export evaluate` (deployed INT8 + HNSW), "
            f"false rejects / escapes at the shipped threshold.\n\n"
            + md_table(["resample", "round", "decode p50", "geometry p50", "features p50", "search p50",
                        "total p50", "total p99", "image AUROC", "pixel AUROC", "FR / esc"], rows))
    write_results("camera_frames", "Camera-size frames: area vs halve-area resample", body,
                  {"size": [w, h], "runs": runs, "accuracy": accuracy,
                   "bundles": {m: str(b) for m, b in bundles.items()}}, load_summary, out_dir=a.results_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
