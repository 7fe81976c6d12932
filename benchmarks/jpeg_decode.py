"""Cost of decoding a JPEG frame on the station (`edge_runtime.decode.decode_image`: header checks, then
libjpeg-turbo through simplejpeg with its warnings as errors) against what users would pick instead (one
cv2.imdecode call, which drops libjpeg's warnings and so scores a corrupt file) and against the same decode with
the checks left out (simplejpeg alone: this machine's limit for a strict decode), for camera frames of common
sizes, baseline 4:2:0 quality 90 and progressive. Checks that the pixels equal OpenCV's. Writes
benchmarks/results/jpeg_decode.json.

    python benchmarks/jpeg_decode.py [--images DIR]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import simplejpeg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from edge_runtime.bench import cpu_info, load_average  # noqa: E402
from edge_runtime.decode import decode_image  # noqa: E402
from bench_report import interleaved_median_ms  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
FRAMES = [(384, 384), (1280, 1024), (1920, 1080), (2592, 1944)]
DEFAULT_IMAGES = ROOT.parent / "shared" / "data" / "mvtec_ad" / "bottle" / "test" / "good"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=Path, default=DEFAULT_IMAGES,
                   help="folder of real part images to encode (default: ../shared/data/mvtec_ad/bottle/test/good)")
    p.add_argument("--repeats", type=int, default=30, help="timed calls per case, interleaved (default: 30)")
    p.add_argument("--out", type=Path, default=RESULTS / "jpeg_decode.json",
                   help="JSON written here (default: benchmarks/results/jpeg_decode.json)")
    from bench_report import state_defaults   # every option's help states its default
    a = state_defaults(p).parse_args()
    paths = sorted(a.images.glob("*.png"))[:1]
    if not paths:
        p.error(f"--images {a.images}: no PNG images")
    part = cv2.imread(str(paths[0]), cv2.IMREAD_COLOR)
    load_before = load_average()
    rows = []
    head = f"{'frame':>10} {'kind':>12} {'station ms':>11} {'cv2.imdecode ms':>16} {'simplejpeg ms':>14} identical"
    print(f"OpenCV {cv2.__version__}, simplejpeg {simplejpeg.__version__}; {paths[0].name} scaled to each size")
    print(head)
    for w, h in FRAMES:
        frame = cv2.resize(part, (w, h), interpolation=cv2.INTER_CUBIC)
        for kind, flags in (("baseline q90", [cv2.IMWRITE_JPEG_QUALITY, 90]),
                            ("progressive", [cv2.IMWRITE_JPEG_QUALITY, 90, cv2.IMWRITE_JPEG_PROGRESSIVE, 1])):
            data = cv2.imencode(".jpg", frame, flags)[1].tobytes()
            buf = np.frombuffer(data, np.uint8)
            station, opencv, plain = interleaved_median_ms([
                lambda: decode_image(data, "frame.jpg"),
                lambda: cv2.imdecode(buf, cv2.IMREAD_UNCHANGED),
                lambda: simplejpeg.decode_jpeg(data, colorspace="BGR")], a.repeats)
            same = bool(np.array_equal(decode_image(data, "frame.jpg"),
                                       cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)[..., ::-1]))
            rows.append({"frame": [w, h], "kind": kind, "bytes": len(data), "station_ms": station,
                         "cv2_imdecode_ms": opencv, "simplejpeg_ms": plain, "pixels_identical": same})
            print(f"{w:>5}x{h:<4} {kind:>12} {station:>11.2f} {opencv:>16.2f} {plain:>14.2f} {same}")
    out = {"benchmark": "jpeg_decode", "command": " ".join(sys.argv), "repeats": a.repeats,
           "machine": {"cpu": cpu_info(), "opencv": cv2.__version__, "simplejpeg": simplejpeg.__version__,
                       "load_average_before": load_before, "load_average_after": load_average()},
           "notes": "station = decode_image (header checks + strict libjpeg-turbo + BGR->RGB); "
                    "cv2.imdecode = what a plain OpenCV pipeline does (corrupt data decodes without error); "
                    "simplejpeg = the strict decode alone",
           "rows": rows}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {a.out}")
    return 0 if all(r["pixels_identical"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
