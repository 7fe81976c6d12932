"""A station whose lighting has drifted: every part is still inspected, and the drift warning reaches the log,
/healthz and /metrics; the same parts under the fit's lighting raise none."""
from __future__ import annotations

import logging
import re

import cv2
import numpy as np

from doubles import RecordingOutput
from extras import require
from edge_runtime.config import load_station
from edge_runtime.daemon import Station
from edge_runtime.http_endpoint import health_document, render_metrics
from edge_runtime.records import Verdict


def _station(tmp_path, small_bundle, write_station, synthetic_dataset, gain: float):
    folder = tmp_path / f"parts_{gain}"
    folder.mkdir()
    goods = sorted((synthetic_dataset / "test" / "good").glob("*.png"))
    for i in range(12):   # the test parts again and again, as a line sees the same product
        img = cv2.imread(str(goods[i % len(goods)]))
        cv2.imwrite(str(folder / f"{i:03d}.png"), np.clip(img * gain, 0, 255).astype(np.uint8))
    cfg = load_station(write_station(f"s{gain}.yaml", bundle=small_bundle, source={"type": "folder", "path": str(folder)},
                                     drift={"window": 6}))
    rec = RecordingOutput()
    station = Station(cfg, outputs=[rec])
    assert station.run() == 0
    return station, rec


def test_a_dimmer_lamp_raises_a_brightness_warning_and_parts_are_still_inspected(
        tmp_path, small_bundle, write_station, synthetic_dataset, caplog):
    with caplog.at_level(logging.WARNING, logger="edge_runtime.drift_monitor"):
        station, rec = _station(tmp_path, small_bundle, write_station, synthetic_dataset, gain=0.8)
    assert len(rec.results) == 12 and all(r.verdict is not Verdict.FAULT for r in rec.results)
    status = station.line.status()
    assert "brightness" in status.drift.warnings
    low, high = station.line.pipeline.quality_band.brightness.median_band(6)
    assert f"is outside {low:.1f}-{high:.1f} (+-5%), where the median of 6 training frames falls" in \
        status.drift.warnings["brightness"]
    assert any("brightness" in w for w in health_document(status)["drift"])
    assert station.line.plant_state()["drift"] == health_document(status)["drift"]   # MQTT state, OPC UA
    metrics = render_metrics(status)
    assert re.search(r'^edge_drift_warning\{check="brightness"\} 1$', metrics, re.M)
    assert re.search(r'^edge_drift_median\{value="brightness"\} ', metrics, re.M)
    assert "drift: median brightness of the last 6 parts" in caplog.text


def test_the_fits_own_lighting_raises_no_warning(tmp_path, small_bundle, write_station, synthetic_dataset):
    station, rec = _station(tmp_path, small_bundle, write_station, synthetic_dataset, gain=1.0)
    status = station.line.status()
    assert len(rec.results) == 12 and status.drift is not None and status.drift.warnings == {}
    assert "drift" not in health_document(status) and "drift" not in station.line.plant_state()
    assert re.search(r'^edge_drift_warning\{check="brightness"\} 0$', render_metrics(status), re.M)


def test_a_failed_lamp_faults_every_part_and_the_refused_frames_raise_the_warning(
        tmp_path, small_bundle, write_station, synthetic_dataset):
    station, rec = _station(tmp_path, small_bundle, write_station, synthetic_dataset, gain=0.2)
    assert len(rec.results) == 12
    assert all(r.verdict is Verdict.FAULT and "frame check: frame brightness" in r.error for r in rec.results)
    assert "brightness" in station.line.status().drift.warnings


def test_the_operator_page_shows_the_drift_warnings(tmp_path, small_bundle, write_station, synthetic_dataset):
    require("starlette", "page")
    from edge_runtime.operator_page.app import status_document
    from edge_runtime.operator_page.part_history import PartHistory

    station, _ = _station(tmp_path, small_bundle, write_station, synthetic_dataset, gain=0.8)
    doc = status_document(station.line.status(), PartHistory())
    assert doc["drift"] == health_document(station.line.status())["drift"] and doc["drift"]
