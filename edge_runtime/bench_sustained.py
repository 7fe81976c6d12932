"""`edge-bench --sustained-fps`: sustained throughput of the real station loop fed by a camera-paced source.

A paced source (edge_runtime/sources/paced_source.py) produces frames at the given rate whether or not the line
keeps up, exactly as a free-running camera does; the daemon's own Station runs it (capture thread, pipeline,
output bus with a fsynced result log) for the given time. Reported: frames offered, inspected, dropped,
throughput, and latency percentiles (pipeline time, and capture-to-verdict time including the queue wait).
"""
from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from edge_runtime.config import StationConfig
from edge_runtime.outputs.base import Output
from edge_runtime.records import InspectionResult, Verdict
from edge_runtime.schema import from_mapping

__all__ = ["run_sustained", "format_sustained"]


class TimingSink(Output):
    """Keeps what the report needs of each result (no images: a long run at 60 fps would hold gigabytes)."""

    role = "record"
    name = "timing-sink"

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.rows: list[tuple[str, float, float, float]] = []   # verdict, pipeline total ms, capture->verdict ms, t

    def publish(self, result: InspectionResult) -> None:
        done = time.time()
        with self.lock:
            self.rows.append((result.verdict.value, result.timings_ms.get("total", float("nan")),
                              (done - result.captured_at) * 1000.0, time.monotonic()))


def _percentiles(values: list[float]) -> dict | None:
    v = np.asarray([x for x in values if x == x], dtype=np.float64)
    if v.size == 0:
        return None
    p50, p95, p99 = np.percentile(v, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "max": float(v.max()), "count": int(v.size)}


def station_mapping(bundle_dir: Path, images: Path, fps: float, frames: int, threads: int, state_dir: Path,
                    precision: str | None, knn: str, capture_thread: bool, lines: int, workers: int = 1) -> dict:
    """The station file the benchmark runs (one line, or `lines` lines each with its own paced source)."""
    inference = {"threads": threads, "knn": knn, "workers": workers, **({"precision": precision} if precision else {})}

    def line(i: int) -> dict:
        return {"source": {"type": "paced", "path": str(images), "fps": fps, "frames": frames, "name": f"camera{i}"},
                "outputs": [{"type": "result_log", "path": str(state_dir / f"results{i}.jsonl")}]}

    base = {"bundle": str(bundle_dir), "inference": inference, "http": {"enabled": False},
            "state_dir": str(state_dir), "capture": {"thread": "auto" if capture_thread else "off"},
            "logging": {"stats_interval_s": 3600}}
    if lines == 1:
        return {**base, **line(0)}
    return {**base, "lines": [{"name": f"line{i}", **line(i)} for i in range(lines)]}


def run_sustained(bundle_dir: Path, images: Path, fps: float = 60.0, duration_s: float = 30.0, threads: int = 2,
                  precision: str | None = None, knn: str = "hnsw", capture_thread: bool = True,
                  lines: int = 1, workers: int = 1) -> dict:
    """Run the station on `lines` paced sources at `fps` for `duration_s`; the report as a plain dict."""
    from edge_runtime.bench import cpu_info, load_average, memory_status, software_info
    from edge_runtime.config import resolve_paths
    from edge_runtime.daemon import Station

    frames = max(1, int(round(fps * duration_s)))
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="edge-sustained-") as tmp:
        state = Path(tmp)
        mapping = station_mapping(Path(bundle_dir).resolve(), Path(images).resolve(), fps, frames, threads, state,
                                  precision, knn, capture_thread, lines, workers)
        cfg = resolve_paths(from_mapping(StationConfig, mapping, "<bench>"), state)
        station = Station(cfg)
        sinks = []
        for ln in station.lines:
            sink = TimingSink()
            ln.outputs.append(sink)
            ln.bus.outputs.append(sink)
            ln.bus.records.append(sink)
            sinks.append(sink)
        t0 = time.monotonic()
        station.run()
        wall = time.monotonic() - t0
        per_line = []
        for ln, sink in zip(station.lines, sinks):
            rows = sink.rows
            inspected = [r for r in rows if r[0] != Verdict.FAULT.value]
            src = getattr(ln._source, "source", ln._source)
            active = (rows[-1][3] - rows[0][3]) if len(rows) > 1 else None
            per_line.append({
                "line": ln.name or "line0", "threads": ln.cfg.inference.threads,
                "workers": ln.cfg.inference.workers, "threads_per_frame": ln.cfg.inference.frame_threads, "offered": frames, "delivered_by_source": getattr(src, "delivered", None),
                "inspected": len(inspected), "faults": len(rows) - len(inspected),
                "dropped": ln.dropped_frames, "accounted": len(rows) + ln.dropped_frames,
                "throughput_fps": (len(rows) - 1) / active if active else None,
                "pipeline_ms": _percentiles([r[1] for r in inspected]),
                "capture_to_verdict_ms": _percentiles([r[2] for r in inspected]),
                "verdicts": {v.value: sum(1 for r in rows if r[0] == v.value) for v in Verdict},
            })
    return {
        "mode": "sustained", "bundle": str(bundle_dir), "images": str(images), "fps": fps, "duration_s": duration_s,
        "lines": lines, "station_threads": threads, "workers": workers, "capture_thread": capture_thread, "knn": knn,
        "precision": precision, "wall_s": wall, "per_line": per_line,
        "total_inspected": sum(p["inspected"] for p in per_line),
        "total_dropped": sum(p["dropped"] for p in per_line),
        "machine": {"cpu": cpu_info(), "software": software_info(), "load_average_before": load_before,
                    "load_average_after": load_average(), "memory": memory_status()},
    }


def format_sustained(report: dict) -> str:
    cpu = report["machine"]["cpu"]
    out = [f"sustained: {report['lines']} line(s) x {report['fps']:g} fps for {report['duration_s']:g} s, "
           f"inference.threads {report['station_threads']} "
           f"({', '.join(str(p['threads']) for p in report['per_line'])} per line), workers "
           f"{report.get('workers', 1)} per line, capture thread "
           f"{'on' if report['capture_thread'] else 'off'}; cpu {cpu['model']} ({cpu['usable_cpus']} usable); "
           f"load before {report['machine']['load_average_before']}, after {report['machine']['load_average_after']}",
           "",
           f"{'line':<8}{'offered':>8}{'inspected':>10}{'dropped':>8}{'faults':>7}{'fps':>7}"
           f"{'p50 ms':>8}{'p99 ms':>8}{'e2e p50':>8}{'e2e p99':>8}"]
    for p in report["per_line"]:
        pm, e2e = p["pipeline_ms"] or {}, p["capture_to_verdict_ms"] or {}
        out.append(f"{p['line']:<8}{p['offered']:>8}{p['inspected']:>10}{p['dropped']:>8}{p['faults']:>7}"
                   f"{(p['throughput_fps'] or 0):>7.1f}{pm.get('p50', float('nan')):>8.1f}"
                   f"{pm.get('p99', float('nan')):>8.1f}{e2e.get('p50', float('nan')):>8.1f}"
                   f"{e2e.get('p99', float('nan')):>8.1f}")
    out.append("")
    out.append("p50/p99: pipeline time per frame; e2e: capture to verdict, queue wait and record included")
    return "\n".join(out)
