"""Cost of the geometry stage's resample (region -> canvas, `edge_runtime.geometry.resample`) for camera frames of
common sizes down to a ~256-px-wide model input: "area" (one cv2.INTER_AREA resize: bundles of schema 2) against
"halve-area" (2 x 2 box halvings, then INTER_AREA: the fit default since schema 3), with INTER_LINEAR (aliasing,
never used: the floor of any resample) and the BGR -> RGB conversion for scale, on this machine's OpenCV threads;
the colour pin's cost (a colour bundle's check, a grey bundle's one-channel resample); and "area" against one
plain cv2.resize INTER_AREA call (OpenCV runs it on one thread for a small canvas; the
geometry stage splits it over two where that is bit-exact, `geometry._area`), with a check that the pixels agree.
Also how far the two methods' pixels lie apart (mean / max absolute difference, grey levels) on a textured frame.
Writes benchmarks/results/resize_cost.json and .md.

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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from edge_runtime.bench import cpu_info, load_average  # noqa: E402
from edge_runtime.geometry import Geometry, match_colour, resample, to_canvas  # noqa: E402
from bench_report import interleaved_median_ms  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
FRAMES = [(384, 384), (640, 480), (900, 900), (1280, 1024), (1920, 1080), (1920, 1200), (2448, 2048), (4096, 3000)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--width", type=int, default=256, help="model input width; height keeps the aspect (default: 256)")
    p.add_argument("--repeats", type=int, default=60, help="timed calls per case, interleaved (default: 60)")
    from bench_report import state_defaults   # every option's help states its default
    a = state_defaults(p).parse_args()
    rng = np.random.default_rng(0)
    rows = []
    load_before = load_average()
    print(f"OpenCV {cv2.__version__}, {cv2.getNumThreads()} threads")
    head = ("| frame | canvas | area ms | one INTER_AREA call ms | identical | halve-area ms | speed-up | "
            "INTER_LINEAR ms | BGR->RGB ms | diff mean / max | colour check ms | grey bundle ms |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    print(head)
    for w, h in FRAMES:
        # Texture at several scales (not noise): what a part's surface gives the resample to average.
        base = sum(cv2.resize(rng.integers(0, 255, (h // s + 1, w // s + 1, 3), dtype=np.uint8), (w, h),
                              interpolation=cv2.INTER_CUBIC).astype(np.float32) for s in (2, 8, 32)) / 3
        base = np.clip(base, 0, 255).astype(np.uint8)
        th = max(8, int(round(a.width * h / w / 8)) * 8)
        size = (a.width, th)
        as_colour = Geometry(size, size, ((0, 0),), resample="halve-area", colour="colour")
        as_grey = Geometry(size, size, ((0, 0),), resample="halve-area", colour="grey")
        area, single, halve, linear, rgb, check, grey = interleaved_median_ms([lambda: resample(base, size, "area"),
                                              lambda: cv2.resize(base, size, interpolation=cv2.INTER_AREA),
                                              lambda: resample(base, size, "halve-area"),
                                              lambda: cv2.resize(base, size, interpolation=cv2.INTER_LINEAR),
                                              lambda: cv2.cvtColor(base, cv2.COLOR_BGR2RGB),
                                              lambda: match_colour(base, as_colour),
                                              lambda: to_canvas(match_colour(base, as_grey), as_grey)], a.repeats)
        d = np.abs(resample(base, size, "area").astype(np.int16) - resample(base, size, "halve-area"))
        same = bool(np.array_equal(resample(base, size, "area"), cv2.resize(base, size, interpolation=cv2.INTER_AREA)))
        rows.append({"frame": [w, h], "input": list(size), "area_ms": area, "one_inter_area_call_ms": single,
                     "identical": same, "halve_area_ms": halve,
                     "inter_linear_ms": linear, "bgr_to_rgb_ms": rgb, "diff_mean": float(d.mean()),
                     "diff_max": int(d.max()), "colour_check_ms": check, "grey_bundle_ms": grey})
        line = (f"| {w} x {h} | {size[0]} x {size[1]} | {area:.2f} | {single:.2f} | {'yes' if same else 'NO'} | "
                f"{halve:.2f} | {area / halve:.1f}x | {linear:.2f} "
                f"| {rgb:.2f} | {d.mean():.2f} / {d.max()} | {check:.3f} | {grey:.2f} |")
        lines.append(line)
        print(line)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "resize_cost.json"
    meta = {"opencv": cv2.__version__, "threads": cv2.getNumThreads(), "cpu": cpu_info(),
            "load_average": [load_before, load_average()], "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    out.write_text(json.dumps({**meta, "rows": rows}, indent=1))
    cpu = meta["cpu"]
    (RESULTS / "resize_cost.md").write_text(
        "# Geometry stage: region -> canvas resample\n\n`python benchmarks/resize_cost.py`\n\n"
        f"{meta['date']}; {cpu['model']}, {cpu['usable_cpus']} usable CPUs; OpenCV {cv2.__version__}, "
        f"{meta['threads']} threads; load {meta['load_average']}\n\n" + "\n".join(lines) + "\n\n"
        "area = one cv2.INTER_AREA resize (schema-2 bundles); halve-area = 2 x 2 box halvings while the frame is at "
        "least twice the canvas on both axes, then INTER_AREA (the fit default since schema 3; identical to area "
        "below 2x). INTER_LINEAR aliases thin defects at these ratios and is not used: the floor of any resample. "
        "diff: grey levels between the two methods' canvases on a textured frame. one INTER_AREA call: what area "
        "cost before the geometry stage split it over two threads, rows or columns (where OpenCV's scale is the exact ratio: "
        "geometry._split_at); identical: area's canvas equals that call's, pixel for pixel. colour check: what a "
        "colour bundle adds per frame (geometry.match_colour: is the region grey? its middle row, then 8 rows, first); grey "
        "bundle: luma, then halve-area on one channel, copied to three (geometry.colour grey), against the "
        "halve-area column's three channels.\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
