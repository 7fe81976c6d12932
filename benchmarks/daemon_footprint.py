"""Resident memory and start-up time of the daemon (`edge-runtime run`) with the bottle bundle, per setting.

    python benchmarks/daemon_footprint.py [--bundle DIR] [--runs 3] [--frames 40]

Each run starts `edge-runtime run` as a fresh process on a station file that replays the bottle test images in a
loop, with a real AF_UNIX socket as NOTIFY_SOCKET. Measured from outside, from /proc/<pid>/status:
  start-up    process start -> READY=1 (imports, sha256 of the bundle, ONNX session, index, golden self-test);
              the daemon's own "start-up took" log line splits off the bundle part
  memory      VmRSS at READY (bundle loaded, nothing inspected yet), VmRSS and VmHWM after --frames inspected
              frames (steady state), and the same for a station whose bundle is missing (the runtime alone)
  stop        SIGTERM -> exit (finishes the frame in hand, flushes the log)
Per-frame latency comes from the result log (decode of the PNG included).
Writes benchmarks/results/daemon_footprint.{json,md}. Without --bundle it fits (once) the 10% coreset bottle
bundle the other benchmarks share.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_report import (BOTTLE, DEFAULT_BUNDLE, LoadMonitor, add_results_option, ensure_bundle,  # noqa: E402
                          geometry_text, md_table, median, percentile, write_results)

# (label, precision, knn); None precision: a station whose bundle is missing, so the daemon idles in FAULT.
SETTINGS = (("INT8 + hnsw", "int8", "hnsw"), ("FP32 + exact", "fp32", "exact"), ("no bundle (FAULT)", None, None))


def daemon_command(station: Path) -> list[str]:
    script = shutil.which("edge-runtime")
    return ([script] if script else [sys.executable, "-m", "edge_runtime.cli"]) + ["run", "--config", str(station)]


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, VmSize in KiB from /proc/<pid>/status."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "VmSize"):
            out[key] = int(value.split()[0])
    return out


def count_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def one_run(workdir: Path, images: Path, bundle: Path, precision: str | None, knn: str | None, threads: int,
            frames: int) -> dict:
    workdir.mkdir(parents=True)
    log_path = workdir / "results.jsonl"
    station = {
        "bundle": str(bundle) if precision else str(workdir / "no-such-bundle"),
        "source": {"type": "folder", "path": str(images), "loop": True},
        "outputs": [{"type": "result_log", "path": str(log_path), "fsync": "never"}],
        "http": {"enabled": False},
        "logging": {"stats_interval_s": 3600},
    }
    if precision:
        station["inference"] = {"precision": precision, "knn": knn, "threads": threads}
    station_path = workdir / "station.yaml"
    station_path.write_text(yaml.safe_dump(station))

    sock_path = workdir / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(0.2)
    ready, done = threading.Event(), threading.Event()
    ready_at: list[float] = []  # perf_counter() when READY=1 arrived

    def read_notifications() -> None:
        # Keep reading like systemd does: a full datagram queue would block the daemon's sd_notify calls.
        while not done.is_set():
            try:
                msg = sock.recv(4096)
            except socket.timeout:
                continue
            if msg == b"READY=1" and not ready.is_set():
                ready_at.append(time.perf_counter())
                ready.set()

    reader = threading.Thread(target=read_notifications, daemon=True)
    reader.start()
    env = dict(os.environ, NOTIFY_SOCKET=str(sock_path))
    err_path = workdir / "daemon.log"
    with open(err_path, "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(daemon_command(station_path), env=env, stdout=err, stderr=subprocess.STDOUT)
        try:
            if not ready.wait(300):
                raise SystemExit(f"no READY=1 within 300 s:\n{err_path.read_text()}")
            ready_s = ready_at[0] - t0
            at_ready = proc_status(proc.pid)
            if precision:
                deadline = time.monotonic() + 600
                while count_lines(log_path) < frames:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit(f"daemon stopped or stalled:\n{err_path.read_text()}")
                    time.sleep(0.05)
            else:
                time.sleep(2.0)  # a few idle loop iterations in FAULT
            steady = proc_status(proc.pid)
            t_stop = time.perf_counter()
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(60)
            stop_s = time.perf_counter() - t_stop
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            done.set()
            reader.join(5)
            sock.close()
    log_text = err_path.read_text()
    if rc != 0:
        raise SystemExit(f"daemon exited {rc}:\n{log_text}")
    match = re.search(r"start-up took ([0-9.]+) s", log_text)
    records = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.exists() else []
    steady_records = records[3:]  # the first frames warm caches up
    totals = [r["latency_ms"]["total"] for r in steady_records]
    features = [r["latency_ms"]["features"] for r in steady_records]
    search = [r["latency_ms"]["search"] for r in steady_records]
    return {
        "ready_s": ready_s, "bundle_load_s": float(match.group(1)) if match else None, "stop_s": stop_s,
        "rss_at_ready_mib": at_ready["VmRSS"] / 1024, "rss_steady_mib": steady["VmRSS"] / 1024,
        "hwm_mib": steady["VmHWM"] / 1024, "frames": len(records),
        "verdicts": sorted({r["verdict"] for r in records}),
        "frame_ms_median": median(totals) if totals else None, "frame_ms_p95": percentile(totals, 95) if totals else None,
        "features_ms_median": median(features) if features else None, "search_ms_median": median(search) if search else None,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", type=Path, default=None, help=f"bundle directory (default {DEFAULT_BUNDLE}, fitted if missing)")
    p.add_argument("--data", type=Path, default=BOTTLE, help=f"MVTec-style category folder (default {BOTTLE})")
    p.add_argument("--runs", type=int, default=3, help="fresh daemon processes per setting (default 3)")
    p.add_argument("--frames", type=int, default=40, help="frames inspected before the steady-state reading (default 40)")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime and HNSW search threads (default 2)")
    add_results_option(p)
    from bench_report import state_defaults   # every option's help states its default
    a = state_defaults(p).parse_args()
    bundle = ensure_bundle(a.bundle or DEFAULT_BUNDLE, a.data)
    manifest = yaml.safe_load((bundle / "manifest.yaml").read_text())

    monitor = LoadMonitor()
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="daemon_footprint_") as tmp:
        images = Path(tmp) / "images"
        images.mkdir()
        for label_dir in sorted((a.data / "test").iterdir()):
            for img in sorted(label_dir.glob("*.png")):
                shutil.copyfile(img, images / f"{label_dir.name}_{img.name}")  # copies: links outside are skipped
        for run in range(a.runs):  # settings interleaved, so a burst of load on the machine hits all of them
            for label, precision, knn in SETTINGS:
                r = one_run(Path(tmp) / f"{run}_{label.split()[0]}", images, bundle, precision, knn, a.threads, a.frames)
                results.setdefault(label, []).append(r)
                print(f"run {run + 1}/{a.runs} {label}: READY after {r['ready_s']:.2f} s, "
                      f"RSS {r['rss_steady_mib']:.0f} MiB, HWM {r['hwm_mib']:.0f} MiB", file=sys.stderr)
    load = monitor.stop()

    def med(label: str, key: str):
        values = [r[key] for r in results[label] if r[key] is not None]
        return median(values) if values else None

    rows = []
    for label, precision, _ in SETTINGS:
        files = manifest["files"]
        variant = manifest["variants"].get(precision) if precision else None
        size = (files[variant["model"]]["bytes"] + files[variant["index"]]["bytes"]) / 2**20 if variant else None
        rows.append([label, size, med(label, "ready_s"), med(label, "bundle_load_s"), med(label, "rss_at_ready_mib"),
                     med(label, "rss_steady_mib"), med(label, "hwm_mib"), med(label, "features_ms_median"),
                     med(label, "search_ms_median"), med(label, "frame_ms_median"), med(label, "frame_ms_p95"),
                     med(label, "stop_s")])
    headers = ["setting", "model+index MiB", "start -> READY s", "bundle load s", "RSS at READY MiB",
               "RSS steady MiB", "VmHWM MiB", "features ms p50", "search ms p50", "frame ms p50", "frame ms p95",
               "SIGTERM -> exit s"]
    from edge_runtime.decode import load_image
    from edge_runtime.geometry import Geometry

    bank = manifest["variants"]["int8"].get("bank_size")
    geom = Geometry.from_manifest(manifest["geometry"])
    tests = sorted((a.data / "test").rglob("*.png"))
    frame_h, frame_w = load_image(tests[0]).shape[:2]
    body = (f"Bundle {manifest['bundle_id']} ({bundle}; bottle, {geometry_text(geom)}, bank "
            f"{bank} vectors x {manifest['features']['dim']}-d). Medians over {a.runs} fresh `edge-runtime run` "
            f"processes per setting, {a.threads} threads, steady state after {a.frames} frames of the {len(tests)} "
            f"bottle test PNGs ({frame_w}x{frame_h}, decoded every frame). 'bundle load' is the daemon's own start-up line (verify + "
            f"session + index + golden self-test); the rest of start -> READY is interpreter start and imports.\n\n"
            + md_table(headers, rows))
    write_results("daemon_footprint", "Daemon footprint: memory and start-up", body,
                  {"bundle": str(bundle), "bundle_id": manifest["bundle_id"], "runs": a.runs, "frames": a.frames,
                   "threads": a.threads, "table": {"headers": headers, "rows": rows}, "raw": results}, load,
                  out_dir=a.results_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
