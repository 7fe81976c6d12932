"""Soak test: tens of thousands of frames through the full daemon loop, with corrupt files mixed in.

    python benchmarks/soak.py [--frames 20000] [--bundle DIR] [--threads 2]

A Station (the real daemon loop: folder source in replay-loop mode -> Pipeline -> outputs) inspects a folder of
good parts, defective parts and deliberately corrupt files until --frames results were published. Outputs: the
JSON-lines result log, the NG image store and a counting output that watches every result. Reported:
  memory      VmRSS after warm-up (--warmup frames) and at the end, sampled every --sample-every frames
  descriptors open file descriptors (/proc/self/fd) after warm-up and at the end
  latency     pipeline total (decode .. decision) of inspected frames among the first and the last --window
              frames (1000 by default)
  records     result-log records (all rotated files) == frames published; every corrupt file's record FAULT
  fail-safe   OK verdicts given to a corrupt file (must be 0)
Without --bundle it fits the small synthetic flange bundle (as tests/conftest.py does, ~20 s) and replays its
test split. Writes benchmarks/results/soak.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections import deque
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge_runtime.bundle import Bundle  # noqa: E402
from edge_runtime.config import StationConfig  # noqa: E402
from edge_runtime.daemon import Station  # noqa: E402
from edge_runtime.outputs import Output, build_output  # noqa: E402
from edge_runtime.records import InspectionResult, Verdict  # noqa: E402
from edge_runtime.schema import from_mapping  # noqa: E402

CORRUPT_PREFIX = "corrupt_"


def vm_rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/status has no VmRSS")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"count": 0}
    a = np.asarray(values)
    return {"count": len(a), "p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max())}


def fit_synthetic_bundle(work: Path) -> tuple[Path, list[Path]]:
    """The tests' small flange bundle, and the test split's images (good and defective) to replay.

    Fitted in a child process: torch must not sit in this process's memory, whose VmRSS is the daemon's figure.
    """
    data, bundle = work / "flange", work / "bundle"
    script = (
        "import sys; from pathlib import Path; sys.path.insert(0, sys.argv[3])\n"
        "from export.fit import FitSettings, fit\n"
        "from export.synthetic_parts import generate_dataset\n"
        "d = generate_dataset(Path(sys.argv[1]), n_train=40, n_test_good=8, n_test_defect_per_type=4, size=224, seed=0)\n"
        "fit(d, Path(sys.argv[2]), FitSettings(coreset_ratio=0.05, input_size=(224, 224), int8_calibration_images=16),"
        " overwrite=True)\n")
    subprocess.run([sys.executable, "-c", script, str(data), str(bundle), str(ROOT)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return bundle, sorted((data / "test").rglob("*.png"))


def corrupt_files(sample: bytes) -> dict[str, bytes]:
    """Files a camera PC or a bad disk can leave in the folder; each must be a FAULT, never OK."""
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    import cv2

    jpeg = cv2.imencode(".jpg", cv2.imdecode(np.frombuffer(sample, np.uint8), cv2.IMREAD_COLOR))[1].tobytes()
    return {
        "truncated.png": sample[: len(sample) // 2],
        "truncated.jpg": jpeg[: len(jpeg) * 3 // 4],
        "empty.png": b"",
        "text.jpg": b"this is not an image\n" * 20,
        "random.bmp": np.random.default_rng(0).bytes(4096),
        "bomb_header.png": b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                           + chunk(b"IEND", b""),
        "flipped.png": sample[:100] + bytes(b ^ 0xFF for b in sample[100:400]) + sample[400:],
    }


class SoakMonitor(Output):
    """Counts every result, keeps per-frame latency, samples memory and fds, and stops the station after N."""

    name = "soak-monitor"

    def __init__(self, frames: int, warmup: int, sample_every: int, window: int = 1000) -> None:
        self.frames, self.warmup, self.sample_every, self.window = frames, warmup, sample_every, window
        self.station: Station | None = None
        self.count = 0
        self.verdicts = {v.value: 0 for v in Verdict}
        # (verdict, pipeline total ms) of the first and the last `window` frames only: a list of every frame would
        # itself grow by ~1.5 MB over 20k frames and be mistaken for a leak in the daemon.
        self.latency_first: list[tuple[str, float]] = []
        self.latency_last: deque[tuple[str, float]] = deque(maxlen=window)
        self.corrupt_seen = 0
        self.corrupt_not_fault: list[dict] = []
        self.samples: list[dict] = []
        self.t_start = self.t_warm = time.monotonic()

    def _sample(self) -> dict:
        s = {"frame": self.count, "rss_kb": vm_rss_kb(), "fds": open_fds(), "t_s": round(time.monotonic() - self.t_start, 1)}
        self.samples.append(s)
        return s

    def publish(self, result: InspectionResult) -> None:
        self.count += 1
        self.verdicts[result.verdict.value] += 1
        entry = (result.verdict.value, result.timings_ms["total"])
        if len(self.latency_first) < self.window:
            self.latency_first.append(entry)
        self.latency_last.append(entry)
        if Path(result.source).name.startswith(CORRUPT_PREFIX):
            self.corrupt_seen += 1
            if result.verdict is not Verdict.FAULT:
                self.corrupt_not_fault.append({"frame_id": result.frame_id, "source": result.source,
                                               "verdict": result.verdict.value})
        if self.count == self.warmup:
            self.t_warm = time.monotonic()
            self._sample()
        elif self.count % self.sample_every == 0 or self.count == self.frames:
            s = self._sample()
            print(f"  {s['frame']:>6} frames  rss {s['rss_kb'] / 1024:7.1f} MiB  fds {s['fds']:3d}  {s['t_s']:7.1f} s",
                  flush=True)
        if self.count >= self.frames and self.station is not None:
            self.station.request_stop()


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"))


def read_log(path: Path) -> list[dict]:
    """Every record of the result log and its rotated backups (oldest first); unparseable lines raise."""
    files = sorted(path.parent.glob(path.name + ".*"), key=lambda p: -int(p.suffix[1:])) + [path]
    records = []
    for f in files:
        if f.exists():
            records += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return records


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=20_000, help="results to publish before stopping (default 20000)")
    ap.add_argument("--bundle", type=Path, help="bundle directory (default: fit the small synthetic one)")
    ap.add_argument("--images", type=Path, help="folder of part images to replay (default: the bundle's golden "
                                                "images, or the synthetic test split)")
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime and HNSW search threads (default 2)")
    ap.add_argument("--warmup", type=int, default=1000, help="frames before the memory/fd baseline (default 1000)")
    ap.add_argument("--sample-every", type=int, default=1000, help="memory/fd sample interval in frames (default 1000)")
    ap.add_argument("--window", type=int, default=1000,
                    help="latency of the first and of the last N frames is compared (default 1000; small for a quick trial)")
    ap.add_argument("--workdir", type=Path, help="keep the run's files here (default: a temporary folder)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "soak.json",
                    help="JSON report (default benchmarks/results/soak.json)")
    from bench_report import state_defaults   # every option's help states its default
    args = state_defaults(ap).parse_args(argv)
    if args.window < 1 or args.frames < 2 * args.window or args.warmup >= args.frames:
        ap.error(f"--frames must be >= 2 x --window ({2 * args.window}: the first and last --window frames are "
                 "compared) and larger than --warmup; --window must be >= 1")

    work = args.workdir or Path(tempfile.mkdtemp(prefix="soak_"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    if args.bundle:
        bundle_dir = args.bundle
        b = Bundle.load(bundle_dir)
        parts = image_files(args.images) if args.images else [b.path(g["file"]) for g in b.variant().golden]
    else:
        print("fitting the synthetic flange bundle ...", flush=True)
        bundle_dir, parts = fit_synthetic_bundle(work)
        if args.images:
            parts = image_files(args.images)
    fit_s = time.monotonic() - t0

    frames_dir = work / "frames"
    if frames_dir.exists():
        shutil.rmtree(frames_dir)
    frames_dir.mkdir()
    for i, p in enumerate(parts):
        shutil.copy(p, frames_dir / f"part_{i:03d}_{p.parent.name}{p.suffix}")
    corrupt = corrupt_files(parts[0].read_bytes())
    for name, data in corrupt.items():
        (frames_dir / f"{CORRUPT_PREFIX}{name}").write_bytes(data)

    log_path = work / "results.jsonl"
    for old in work.glob("results.jsonl*"):
        old.unlink()
    cfg = from_mapping(StationConfig, {
        "name": "soak", "bundle": str(bundle_dir),
        "inference": {"threads": args.threads},
        "source": {"type": "folder", "path": str(frames_dir), "mode": "replay", "loop": True},
        "outputs": [{"type": "result_log", "path": str(log_path)},
                    {"type": "ng_images", "dir": str(work / "ng"), "max_files": 200}],
        "http": {"enabled": False},
        "logging": {"stats_interval_s": 60.0},
        "recovery": {"exit_when_exhausted": True},
    }, "soak")
    monitor = SoakMonitor(args.frames, args.warmup, args.sample_every, args.window)
    station = Station(cfg, outputs=[build_output(o) for o in cfg.outputs] + [monitor])
    monitor.station = station

    daemon_log = work / "daemon.log"
    logging.basicConfig(filename=daemon_log, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(f"{len(parts)} part images + {len(corrupt)} corrupt files in {frames_dir}; {args.frames} frames; "
          f"daemon log {daemon_log}", flush=True)
    # OpenCV and libpng print to fd 2 for each corrupt file that reaches them; keep the console readable.
    saved_stderr = os.dup(2)
    with open(work / "stderr.log", "ab") as err:
        os.dup2(err.fileno(), 2)
    t_run = time.monotonic()
    try:
        rc = station.run()
    finally:
        os.dup2(saved_stderr, 2)
        os.close(saved_stderr)
    run_s = time.monotonic() - t_run

    records = read_log(log_path)
    warm = next(s for s in monitor.samples if s["frame"] == args.warmup)
    end = monitor.samples[-1]
    first = [ms for v, ms in monitor.latency_first if v != "FAULT"]
    last = [ms for v, ms in monitor.latency_last if v != "FAULT"]
    corrupt_records = [r for r in records if Path(r["source"]).name.startswith(CORRUPT_PREFIX)]
    report = {
        "frames_requested": args.frames,
        "frames_published": monitor.count,
        "station_rc": rc,
        "fit_or_load_s": round(fit_s, 1),
        "run_s": round(run_s, 1),
        "frames_per_s_after_warmup": round((monitor.count - args.warmup) / max(time.monotonic() - monitor.t_warm, 1e-9), 2),
        "verdicts": monitor.verdicts,
        "station_counters": vars(station.counters),
        "rss_mib": {"after_warmup": round(warm["rss_kb"] / 1024, 1), "end": round(end["rss_kb"] / 1024, 1),
                    "growth": round((end["rss_kb"] - warm["rss_kb"]) / 1024, 1),
                    "max_sampled": round(max(s["rss_kb"] for s in monitor.samples) / 1024, 1)},
        "open_fds": {"after_warmup": warm["fds"], "end": end["fds"]},
        "latency_ms_inspected": {f"first_{args.window}": percentiles(first), f"last_{args.window}": percentiles(last)},
        "result_log": {"records": len(records), "equals_frames_published": len(records) == monitor.count,
                       "frame_ids_unique_and_consecutive": [r["frame_id"] for r in records] == list(range(records[0]["frame_id"], records[0]["frame_id"] + len(records))) if records else False},
        "corrupt_files": {"names": sorted(corrupt), "frames": monitor.corrupt_seen,
                          "not_fault_seen_by_outputs": monitor.corrupt_not_fault,
                          "log_records": len(corrupt_records),
                          "log_records_not_fault": sum(r["verdict"] != "FAULT" for r in corrupt_records),
                          "fault_reasons": sorted({r["error"].split(": ", 1)[-1][:90] for r in corrupt_records})},
        "ng_images_files": len(list((work / "ng").iterdir())) if (work / "ng").exists() else 0,
        "samples": monitor.samples,
        "bundle": str(bundle_dir), "workdir": str(work), "threads": args.threads,
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    rows = [
        ("frames published / requested", f"{monitor.count} / {args.frames}"),
        ("verdicts", ", ".join(f"{k} {v}" for k, v in monitor.verdicts.items())),
        ("throughput after warm-up", f"{report['frames_per_s_after_warmup']} frames/s ({run_s:.0f} s run)"),
        ("VmRSS after warm-up -> end", f"{report['rss_mib']['after_warmup']} -> {report['rss_mib']['end']} MiB "
                                       f"(growth {report['rss_mib']['growth']:+} MiB, max {report['rss_mib']['max_sampled']})"),
        ("open fds after warm-up -> end", f"{warm['fds']} -> {end['fds']}"),
        (f"latency first {args.window} p50/p95/p99/max", "/".join(f"{report['latency_ms_inspected'][f'first_{args.window}'].get(k, 0):.1f}" for k in ("p50", "p95", "p99", "max")) + " ms"),
        (f"latency last {args.window} p50/p95/p99/max", "/".join(f"{report['latency_ms_inspected'][f'last_{args.window}'].get(k, 0):.1f}" for k in ("p50", "p95", "p99", "max")) + " ms"),
        ("result-log records == published", f"{len(records)} == {monitor.count}: {report['result_log']['equals_frames_published']}"),
        ("frame ids consecutive in the log", str(report["result_log"]["frame_ids_unique_and_consecutive"])),
        ("corrupt-file frames (all FAULT?)", f"{monitor.corrupt_seen}, not FAULT: {len(monitor.corrupt_not_fault)} "
                                            f"(log: {report['corrupt_files']['log_records_not_fault']})"),
        ("output errors / source errors", f"{station.counters.output_errors} / {station.counters.source_errors}"),
        ("NG image store files (cap 200)", str(report["ng_images_files"])),
    ]
    width = max(len(r[0]) for r in rows)
    print("\n" + "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows))
    print(f"\nwrote {args.out}")
    ok = (monitor.count == args.frames and report["result_log"]["equals_frames_published"]
          and not monitor.corrupt_not_fault and report["corrupt_files"]["log_records_not_fault"] == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
