"""What lighting, focus and sensor drift do to a station's verdicts, and what the frame check and drift monitor see.

    python benchmarks/drift_monitor.py --bundle BUNDLE --data ../shared/data/mvtec_ad/bottle [--name bottle]

Every test image of the data set is inspected through the deployed path (`Pipeline.inspect`, the bundle's default
variant, HNSW search) as it is and under each condition below, applied to the decoded frame before it reaches the
pipeline (the station would see it so):

  gain x0.2 (a lamp failing) .. x1.2, offset -30 / +30, gamma 0.8 / 1.25, Gaussian blur sigma 1-3, sensor noise
  sigma 2 / 4 / 8, JPEG quality 40, a black and a white frame.

Per condition: good parts rejected (NG or REVIEW), defects passed (OK), frames refused by the frame check (FAULT;
edge_runtime/frame_quality.py), against the unchanged frames. Then a line's stream: 400 parts drawn with
replacement, 10% defects, through the drift monitor (edge_runtime/drift_monitor.py, the station file's defaults):
which rolling warnings fire and after how many parts (a false alarm is any warning on unchanged frames). The same
stream with 30% defects checks the score rule against a bad batch of real defects. Also the cost of measuring a
frame's quality (the pipeline's "quality" stage). Writes benchmarks/results/drift_monitor[_NAME].{json,md}.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
from bench_report import LoadMonitor, add_results_option, md_table, write_results  # noqa: E402

from edge_runtime.bundle import Bundle  # noqa: E402
from edge_runtime.drift_monitor import DriftConfig, DriftMonitor  # noqa: E402
from edge_runtime.pipeline import Pipeline  # noqa: E402
from edge_runtime.records import Frame, Verdict  # noqa: E402
from export.dataset import test_images  # noqa: E402


def _lut(f) -> np.ndarray:
    return np.clip(np.round(f(np.arange(256, dtype=np.float64))), 0, 255).astype(np.uint8)


def _noise(sigma: float):
    def apply(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return np.clip(img.astype(np.float32) + rng.normal(0, sigma, img.shape), 0, 255).astype(np.uint8)
    return apply


def _jpeg(quality: int):
    def apply(img: np.ndarray, rng) -> np.ndarray:
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
        return cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    return apply


CONDITIONS = {
    "unchanged": lambda img, rng: img,
    "gain x0.2 (lamp failing)": lambda img, rng: cv2.LUT(img, _lut(lambda v: v * 0.2)),
    "gain x0.7": lambda img, rng: cv2.LUT(img, _lut(lambda v: v * 0.7)),
    "gain x0.85": lambda img, rng: cv2.LUT(img, _lut(lambda v: v * 0.85)),
    "gain x1.2": lambda img, rng: cv2.LUT(img, _lut(lambda v: v * 1.2)),
    "offset -30": lambda img, rng: cv2.LUT(img, _lut(lambda v: v - 30)),
    "offset +30": lambda img, rng: cv2.LUT(img, _lut(lambda v: v + 30)),
    "gamma 0.8": lambda img, rng: cv2.LUT(img, _lut(lambda v: 255 * (v / 255) ** 0.8)),
    "gamma 1.25": lambda img, rng: cv2.LUT(img, _lut(lambda v: 255 * (v / 255) ** 1.25)),
    "blur sigma 1": lambda img, rng: cv2.GaussianBlur(img, (0, 0), 1.0),
    "blur sigma 2": lambda img, rng: cv2.GaussianBlur(img, (0, 0), 2.0),
    "blur sigma 3": lambda img, rng: cv2.GaussianBlur(img, (0, 0), 3.0),
    "noise sigma 2": _noise(2.0),
    "noise sigma 4": _noise(4.0),
    "noise sigma 8": _noise(8.0),
    "JPEG q40": _jpeg(40),
    "black frame": lambda img, rng: np.zeros_like(img),
    "white frame": lambda img, rng: np.full_like(img, 255),
}


def inspect_all(pipe: Pipeline, items, seed: int) -> dict[str, list[dict]]:
    """condition -> per test image: label, verdict, score, quality, quality-stage ms."""
    decoded = [cv2.imread(str(it.path), cv2.IMREAD_UNCHANGED) for it in items]
    out = {}
    for name, condition in CONDITIONS.items():
        rng = np.random.default_rng(seed)
        rows = []
        for i, (it, img) in enumerate(zip(items, decoded)):
            r = pipe.inspect(Frame(frame_id=i, source=it.path.name, image=condition(img, rng)))
            rows.append({"label": it.label, "verdict": r.verdict.value, "score": r.score, "error": r.error,
                         "quality": r.quality, "quality_ms": r.timings_ms.get("quality"), "result": r})
        out[name] = rows
    return out


def verdict_table(results: dict[str, list[dict]]) -> tuple[list[list], dict]:
    rows, data = [], {}
    for name, rs in results.items():
        good = [r for r in rs if r["label"] == "good"]
        bad = [r for r in rs if r["label"] != "good"]
        fault_good = sum(r["verdict"] == "FAULT" for r in good)
        fault_bad = sum(r["verdict"] == "FAULT" for r in bad)
        rejected = sum(r["verdict"] in ("NG", "REVIEW") for r in good)
        passed = sum(r["verdict"] == "OK" for r in bad)
        median_good = float(np.median([r["score"] for r in good if r["score"] is not None])) if \
            any(r["score"] is not None for r in good) else None
        reasons = sorted({r["error"].split("frame check: ", 1)[1].split(" ")[1] for r in rs
                          if r["error"] and "frame check: " in r["error"]})
        data[name] = {"good": len(good), "defects": len(bad), "good_rejected": rejected, "defects_passed": passed,
                      "fault_good": fault_good, "fault_defects": fault_bad, "median_good_score": median_good,
                      "frame_check_rules": reasons}
        rows.append([name, f"{rejected}/{len(good)}", f"{passed}/{len(bad)}", f"{fault_good + fault_bad}/{len(rs)}",
                     ", ".join(reasons) or "-", median_good])
    return rows, data


def stream(results: dict[str, list[dict]], pipe: Pipeline, cfg: DriftConfig, n: int, defect_share: float,
           seed: int) -> tuple[list[list], dict]:
    """Each condition as a line's stream through the drift monitor: which warnings, from which part on."""
    good_p50 = pipe.variant.info.get("threshold_info", {}).get("good_scores", {}).get("p50")
    rows, data = [], {}
    for name, rs in results.items():
        rng = np.random.default_rng(seed)
        good = [r for r in rs if r["label"] == "good"]
        bad = [r for r in rs if r["label"] != "good"]
        monitor = DriftMonitor(cfg, good_p50, pipe.quality_band, "bench")
        first: dict[str, int] = {}
        faults = 0
        for k in range(n):
            pool = bad if rng.random() < defect_share else good
            r = pool[int(rng.integers(len(pool)))]
            faults += r["verdict"] == "FAULT"
            monitor.observe(r["result"])   # as the line does: a refused frame's quality counts too
            for check in monitor.active:
                first.setdefault(check, k + 1)
        data[name] = {"first_warning_at_part": first, "faulted": faults, "parts": n, "defect_share": defect_share}
        rows.append([name, ", ".join(f"{c} at part {p}" for c, p in sorted(first.items(), key=lambda x: x[1])) or "none",
                     f"{faults}/{n}"])
    return rows, data


def main() -> int:
    p = argparse.ArgumentParser(description="Drift conditions through the deployed path: verdicts, the frame check "
                                            "and the drift monitor's warnings; writes JSON and Markdown.")
    p.add_argument("--bundle", type=Path, required=True, help="bundle from edge-export fit (required)")
    p.add_argument("--data", type=Path, required=True, help="MVTec-style data folder with test/ (required)")
    p.add_argument("--name", default=None, help="suffix of the result files (default: none)")
    p.add_argument("--parts", type=int, default=400, help="parts per simulated stream (default: 400)")
    p.add_argument("--threads", type=int, default=2, help="inference threads (default: 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise and the streams (default: 0)")
    add_results_option(p)
    from bench_report import state_defaults   # every option's help states its default
    a = state_defaults(p).parse_args()

    load = LoadMonitor()
    logging.getLogger("edge_runtime.drift_monitor").setLevel(logging.ERROR)   # one warning per simulated stream
    pipe = Pipeline(Bundle.load(a.bundle), threads=a.threads)
    if pipe.quality_band is None:
        print(f"{a.bundle}: no frame_quality in the manifest (fitted before it was recorded): refit", file=sys.stderr)
        return 2
    items = test_images(a.data)
    t0 = time.monotonic()
    results = inspect_all(pipe, items, a.seed)
    t_inspect = time.monotonic() - t0
    vrows, vdata = verdict_table(results)
    cfg = DriftConfig()
    srows, sdata = stream(results, pipe, cfg, a.parts, 0.10, a.seed)
    brows, bdata = stream({"unchanged": results["unchanged"]}, pipe, cfg, a.parts, 0.30, a.seed)
    q_ms = [r["quality_ms"] for rs in results.values() for r in rs if r["quality_ms"] is not None]
    band = pipe.quality_band
    body = [
        f"Bundle `{a.bundle}` ({pipe.bundle.bundle_id}, variant {pipe.variant.name}, search {pipe.knn}), "
        f"{len(items)} test images of `{a.data}`; threshold {pipe.threshold:.2f}. Training frames "
        f"(manifest frame_quality, {band.n} images, 0.5th-99.5th percentile): {band.describe()}.",
        "", "## Verdicts per condition (frame check on, station defaults)", "",
        md_table(["condition", "good rejected", "defects passed", "refused (FAULT)", "frame-check rule", "median good score"],
                 vrows),
        "", f"## A line's stream: {a.parts} parts, 10% defects, drift monitor defaults (window {cfg.window}, score "
            f"x{cfg.score_ratio:g}, brightness +-{cfg.brightness_margin:.0%}, sharpness +-{cfg.sharpness_margin:.0%}, noise "
            f"+-{cfg.noise_margin:.0%})", "",
        md_table(["condition", "warnings (first part at which each holds)", "refused"], srows),
        "", f"Unchanged frames, 30% defects (a bad batch): {brows[0][1]}.", "",
        f"Cost of measuring a frame's quality (the pipeline's `quality` stage, brightness, Laplacian variance and noise "
        f"estimate of the canvas, and the check): median {np.median(q_ms):.3f} ms, p99 {np.percentile(q_ms, 99):.3f} ms over "
        f"{len(q_ms)} frames.",
    ]
    data = {"bundle": str(a.bundle), "bundle_id": pipe.bundle.bundle_id, "threshold": pipe.threshold,
            "band": {**{name: vars(b) for name, b in band.bands().items()}, "n": band.n},
            "verdicts": vdata, "stream_10pct_defects": sdata, "stream_30pct_defects_unchanged": bdata,
            "quality_stage_ms": {"median": float(np.median(q_ms)), "p99": float(np.percentile(q_ms, 99)),
                                 "n": len(q_ms)},
            "inspect_seconds": round(t_inspect, 1), "drift_config": vars(cfg)}
    name = "drift_monitor" + (f"_{a.name}" if a.name else "")
    path = write_results(name, f"Drift conditions, frame check and drift monitor ({a.name or a.bundle.name})",
                         "\n".join(body), data, load.stop(), out_dir=a.results_dir)
    print("\n".join(body))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
