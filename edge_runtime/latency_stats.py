"""Per-stage latency: sliding-window percentiles for the log and /healthz, cumulative histograms for Prometheus.

Thread-safe: the inspection loop adds while the HTTP thread reads.
"""
from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass

import numpy as np

# Millisecond buckets: an inspection stage takes from well under 1 ms (decision) to seconds (a cold model).
DEFAULT_BUCKETS_MS: tuple[float, ...] = (
    0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 75, 100, 150, 250, 500, 1000, 2500,
)


@dataclass(frozen=True)
class Histogram:
    """A snapshot of one stage's cumulative histogram. `bucket_counts[i]` counts samples <= bounds_ms[i]."""

    bounds_ms: tuple[float, ...]
    bucket_counts: tuple[int, ...]     # cumulative, as Prometheus wants; +Inf is `count`
    count: int
    sum_ms: float


class _Stage:
    def __init__(self, window: int, n_buckets: int) -> None:
        self.window: deque[float] = deque(maxlen=window)
        self.buckets = [0] * n_buckets   # per bucket, not cumulative; summed on export
        self.count = 0
        self.sum_ms = 0.0


class LatencyStats:
    def __init__(self, window: int = 1000, buckets_ms: tuple[float, ...] = DEFAULT_BUCKETS_MS) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if list(buckets_ms) != sorted(set(buckets_ms)) or not buckets_ms:
            raise ValueError("buckets_ms must be strictly increasing and non-empty")
        self.window = window
        self.buckets_ms = tuple(float(b) for b in buckets_ms)
        self._stages: dict[str, _Stage] = {}
        self._lock = threading.Lock()
        self.rejected = 0   # NaN, infinite or negative timings: a clock bug, kept out of the statistics

    def add(self, timings_ms: dict[str, float]) -> None:
        """Record one frame's per-stage timings (the `timings_ms` of an InspectionResult)."""
        with self._lock:
            for stage, value in timings_ms.items():
                value = float(value)
                if not math.isfinite(value) or value < 0:
                    self.rejected += 1
                    continue
                st = self._stages.get(stage)
                if st is None:
                    st = self._stages[stage] = _Stage(self.window, len(self.buckets_ms))
                st.window.append(value)
                st.count += 1
                st.sum_ms += value
                # First bucket whose upper bound holds the value; beyond the last one only +Inf (count) has it.
                idx = int(np.searchsorted(self.buckets_ms, value, side="left"))
                if idx < len(st.buckets):
                    st.buckets[idx] += 1

    def summary(self) -> dict[str, dict[str, float]]:
        """{stage: {p50, p95, p99, max, count}} over the last `window` frames; count is the window's size."""
        with self._lock:
            windows = {stage: np.fromiter(st.window, dtype=np.float64) for stage, st in self._stages.items()}
        out: dict[str, dict[str, float]] = {}
        for stage, values in windows.items():
            if values.size == 0:
                continue
            p50, p95, p99 = np.percentile(values, [50, 95, 99])
            out[stage] = {"p50": float(p50), "p95": float(p95), "p99": float(p99), "max": float(values.max()),
                          "count": int(values.size)}
        return out

    def histograms(self) -> dict[str, Histogram]:
        """Cumulative (since start) histograms per stage."""
        with self._lock:
            snap = {stage: (list(st.buckets), st.count, st.sum_ms) for stage, st in self._stages.items()}
        out = {}
        for stage, (buckets, count, total) in snap.items():
            cumulative = tuple(int(c) for c in np.cumsum(buckets))
            out[stage] = Histogram(self.buckets_ms, cumulative, count, total)
        return out

    def counts(self) -> dict[str, int]:
        """Frames recorded per stage since start."""
        with self._lock:
            return {stage: st.count for stage, st in self._stages.items()}

    def prometheus_lines(self, metric: str = "edge_stage_latency_seconds") -> list[str]:
        """Text exposition of the histograms, in seconds (the Prometheus base unit), labelled by stage."""
        lines = [
            f"# HELP {metric} Inspection pipeline stage latency.",
            f"# TYPE {metric} histogram",
        ]
        for stage, h in sorted(self.histograms().items()):
            label = f'stage="{escape_label(stage)}"'
            for bound, cum in zip(h.bounds_ms, h.bucket_counts):
                lines.append(f'{metric}_bucket{{{label},le="{_fmt(bound / 1000.0)}"}} {cum}')
            lines.append(f'{metric}_bucket{{{label},le="+Inf"}} {h.count}')
            lines.append(f"{metric}_sum{{{label}}} {_fmt(h.sum_ms / 1000.0)}")
            lines.append(f"{metric}_count{{{label}}} {h.count}")
        return lines


def escape_label(value: str) -> str:
    """Prometheus label value escaping: backslash, double quote and newline."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _fmt(value: float) -> str:
    return repr(float(value))
