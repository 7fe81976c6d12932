import threading

import numpy as np
import pytest

from edge_runtime.latency_stats import DEFAULT_BUCKETS_MS, LatencyStats


def test_summary_percentiles_over_the_window():
    stats = LatencyStats(window=100)
    for v in range(1, 101):
        stats.add({"features": float(v), "total": 2.0 * v})
    s = stats.summary()
    assert s["features"]["p50"] == pytest.approx(50.5)
    assert s["features"]["p95"] == pytest.approx(np.percentile(np.arange(1, 101), 95))
    assert s["features"]["p99"] == pytest.approx(99.01)
    assert s["features"]["max"] == 100.0 and s["features"]["count"] == 100
    assert s["total"]["max"] == 200.0


def test_window_slides_but_histogram_is_cumulative():
    stats = LatencyStats(window=3)
    for v in [1000.0, 1.0, 1.0, 1.0]:
        stats.add({"search": v})
    s = stats.summary()["search"]
    assert s["max"] == 1.0 and s["count"] == 3          # the slow frame left the window
    h = stats.histograms()["search"]
    assert h.count == 4 and h.sum_ms == pytest.approx(1003.0)  # ...but not the histogram
    assert stats.counts() == {"search": 4}


def test_bucket_boundaries_are_inclusive_and_cumulative():
    stats = LatencyStats()
    for v in [0.2, 0.5, 0.6, 1.0, 9999.0]:
        stats.add({"decode": v})
    h = stats.histograms()["decode"]
    by_bound = dict(zip(h.bounds_ms, h.bucket_counts))
    assert by_bound[0.5] == 2        # 0.2 and 0.5 (le is <=)
    assert by_bound[1.0] == 4
    assert by_bound[2500.0] == 4     # 9999 ms only lands in +Inf
    assert h.count == 5
    assert list(h.bucket_counts) == sorted(h.bucket_counts)


def test_prometheus_lines_in_seconds():
    stats = LatencyStats()
    stats.add({"total": 12.0})
    lines = stats.prometheus_lines()
    assert "# TYPE edge_stage_latency_seconds histogram" in lines
    assert 'edge_stage_latency_seconds_bucket{stage="total",le="0.01"} 0' in lines
    assert 'edge_stage_latency_seconds_bucket{stage="total",le="0.015"} 1' in lines
    assert 'edge_stage_latency_seconds_bucket{stage="total",le="+Inf"} 1' in lines
    assert 'edge_stage_latency_seconds_sum{stage="total"} 0.012' in lines
    assert 'edge_stage_latency_seconds_count{stage="total"} 1' in lines
    assert sum(1 for line in lines if line.startswith("edge_stage_latency_seconds_bucket")) == len(DEFAULT_BUCKETS_MS) + 1


def test_bad_values_are_rejected_not_recorded():
    stats = LatencyStats()
    stats.add({"total": float("nan"), "decode": -1.0, "search": float("inf"), "ok": 3.0})
    assert stats.rejected == 3
    assert set(stats.summary()) == {"ok"}


def test_empty_and_argument_checks():
    assert LatencyStats().summary() == {}
    with pytest.raises(ValueError):
        LatencyStats(window=0)
    with pytest.raises(ValueError):
        LatencyStats(buckets_ms=(5, 1))


def test_concurrent_add_and_read_lose_nothing():
    stats = LatencyStats(window=50)
    per_thread = 2000

    def writer():
        for i in range(per_thread):
            stats.add({"total": float(i % 40)})

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        stats.summary()
        stats.prometheus_lines()
    for t in threads:
        t.join()
    assert stats.histograms()["total"].count == 4 * per_thread
    assert stats.summary()["total"]["count"] == 50
