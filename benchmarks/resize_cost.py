"""Cost of the geometry stage's pinned resample (cv2.resize INTER_AREA, edge_runtime.geometry.INTERPOLATION) for
camera frames of common sizes down to a ~256-px-wide model input, against INTER_LINEAR and the BGR -> RGB
conversion, on this machine's OpenCV threads. The bottle frames (384 x 384) cost ~0.5 ms; a 5 MP frame costs
~20x that, more than the rest of the pipeline: where a station's latency goes once frames come from a real camera.
Writes benchmarks/results/resize_cost.json.

    python benchmarks/resize_cost.py
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
FRAMES = [(384, 384), (640, 480), (1280, 1024), (1920, 1200), (2448, 2048)]


def median_ms(fn, n: int) -> float:
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000.0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--width", type=int, default=256, help="model input width; height keeps the aspect (default: 256)")
    p.add_argument("--repeats", type=int, default=30, help="timed calls per case (default: 30)")
    a = p.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    print(f"OpenCV {cv2.__version__}, {cv2.getNumThreads()} threads")
    print(f"{'frame':>12} {'input':>10} {'INTER_AREA ms':>14} {'INTER_LINEAR ms':>16} {'BGR->RGB ms':>12}")
    for w, h in FRAMES:
        # A smooth image with texture, not noise: resampling cost does not depend on content, but keep it real-ish.
        base = cv2.resize(rng.integers(0, 255, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8), (w, h))
        th = max(8, int(round(a.width * h / w / 8)) * 8)
        area = median_ms(lambda: cv2.resize(base, (a.width, th), interpolation=cv2.INTER_AREA), a.repeats)
        linear = median_ms(lambda: cv2.resize(base, (a.width, th), interpolation=cv2.INTER_LINEAR), a.repeats)
        rgb = median_ms(lambda: cv2.cvtColor(base, cv2.COLOR_BGR2RGB), a.repeats)
        rows.append({"frame": [w, h], "input": [a.width, th], "inter_area_ms": area, "inter_linear_ms": linear,
                     "bgr_to_rgb_ms": rgb})
        print(f"{w:>6}x{h:<5} {a.width:>5}x{th:<4} {area:>14.2f} {linear:>16.2f} {rgb:>12.2f}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "resize_cost.json"
    out.write_text(json.dumps({"opencv": cv2.__version__, "threads": cv2.getNumThreads(), "rows": rows}, indent=1))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
