"""The verdict does not wait for the heat map: it is made on first read, once, and is the same map as before."""
from __future__ import annotations

import threading

import cv2
import numpy as np

from edge_runtime import pipeline as pipeline_module
from edge_runtime import scoring
from edge_runtime.bundle import Bundle
from edge_runtime.pipeline import Pipeline
from edge_runtime.records import Frame, InspectionResult, Verdict


def _frame(bundle: Bundle) -> Frame:
    path = sorted(p for p in (bundle.root / "golden").rglob("*") if p.suffix in (".png", ".jpg"))[0]
    return Frame(frame_id=7, source=str(path), image=cv2.imread(str(path), cv2.IMREAD_COLOR))


def test_inspect_returns_its_verdict_before_the_heat_map_is_made(device_bundle, monkeypatch):
    bundle = Bundle.load(device_bundle)
    pipe = Pipeline(bundle, threads=1)
    made = []
    real = scoring.anomaly_map
    monkeypatch.setattr(pipeline_module.scoring, "anomaly_map", lambda *a, **k: made.append(1) or real(*a, **k))
    frame = _frame(bundle)
    result = pipe.inspect(frame)
    assert result.verdict in (Verdict.OK, Verdict.REVIEW, Verdict.NG)
    assert made == []                                   # the verdict and its timings came without a map
    heat = result.anomaly_map
    assert made == [1]
    assert result.anomaly_map is heat and made == [1]   # made once
    # The same map as the one scoring path makes for this frame, at the inspected region's size.
    expected = pipe.score_rgb(cv2.cvtColor(frame.image, cv2.COLOR_BGR2RGB), frame.source).anomaly_map
    assert heat.shape == frame.image.shape[:2] and heat.dtype == np.float32
    np.testing.assert_array_equal(heat, expected)


def test_a_faulted_frame_has_no_heat_map(device_bundle):
    pipe = Pipeline(Bundle.load(device_bundle), threads=1)
    result = pipe.inspect(Frame(frame_id=1, source="cam0", image=np.zeros((4, 4, 3), np.uint8)))
    assert result.verdict is Verdict.FAULT and result.anomaly_map is None


def test_concurrent_readers_share_one_map():
    calls = []
    gate = threading.Event()

    def make():
        calls.append(1)
        gate.wait(5)
        return np.full((3, 5), 2.0, np.float32)

    result = InspectionResult(1, "cam0", Verdict.NG, 3.0, 0.75, 2.0, {}, "b", anomaly_map=make)
    seen = []
    readers = [threading.Thread(target=lambda: seen.append(result.anomaly_map)) for _ in range(4)]
    for t in readers:
        t.start()
    gate.set()
    for t in readers:
        t.join(5)
    assert len(calls) == 1 and len(seen) == 4 and all(m is seen[0] for m in seen)


def test_an_array_given_directly_is_kept_as_it_is():
    amap = np.ones((2, 2), np.float32)
    result = InspectionResult(1, "cam0", Verdict.OK, 1.0, 0.25, 2.0, {}, "b", anomaly_map=amap)
    assert result.anomaly_map is amap
    assert InspectionResult(1, "cam0", Verdict.OK, 1.0, 0.25, 2.0, {}, "b").anomaly_map is None
