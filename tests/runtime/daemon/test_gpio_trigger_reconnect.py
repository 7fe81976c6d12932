"""A GPIO trigger stays requested while the camera is reopened, so parts triggered meanwhile get a FAULT record.

libgpiod keeps no edges for a line that is not requested: releasing the trigger line whenever the source was lost
(or had not opened yet) made every part triggered during the reopen backoff vanish, with no record and no answer,
and a PLC that pairs answers with triggers in order then paired the next OK with a part never inspected (probe 62).
"""
from __future__ import annotations

import pytest

from doubles import RecordingOutput, ScriptedSource
from doubles.scripted_source import ScriptedSourceConfig
from edge_runtime.config import load_station
from edge_runtime.records import Verdict
from edge_runtime.sources import SourceError
from edge_runtime.triggers import FakeEdgeLine, GpioTrigger

SLOW_REOPEN = {"backoff_initial_s": 60.0, "backoff_max_s": 60.0, "read_timeout_s": 0.2}
GPIO = {"type": "gpio", "chip": "/dev/gpiochip0", "line": 17}


class Wire:
    """The trigger input: an edge reaches the line request open at that moment; with none open it is lost."""

    def __init__(self) -> None:
        self.current: FakeEdgeLine | None = None
        self.lost = 0
        self.requests = 0

    def factory(self, _cfg) -> FakeEdgeLine:
        self.requests += 1
        line = FakeEdgeLine()
        release = line.close

        def close() -> None:
            release()
            if self.current is line:
                self.current = None

        line.close = close
        self.current = line
        return line

    def edge(self) -> None:
        if self.current is None:
            self.lost += 1
        else:
            self.current.push_edge()


def _station(device_bundle, write_station, start_station, source, wire):
    cfg = load_station(write_station(bundle=device_bundle, source={"type": "scripted"}, trigger=GPIO,
                                     recovery=SLOW_REOPEN))
    rec = RecordingOutput()
    running = start_station(cfg, source=source, outputs=[rec], trigger=GpioTrigger(cfg.trigger, wire.factory))
    return running, rec


def test_edges_while_the_camera_is_reopened_are_answered_fault(device_bundle, good_part, write_station,
                                                               start_station, wait_until):
    wire = Wire()
    source = ScriptedSource(steps=[good_part, SourceError("camera unplugged"), good_part])
    running, rec = _station(device_bundle, write_station, start_station, source, wire)
    wait_until(lambda: rec.ready and wire.current is not None, what="READY")
    wire.edge()
    wait_until(lambda: len(rec.results) == 1, what="the first part")
    wire.edge()   # this part's capture fails: the camera is lost
    wait_until(lambda: len(rec.results) == 2 and source.close_calls >= 1, what="the lost part's FAULT")
    wait_until(lambda: "camera unplugged" in (running.station.line.fault_reason or ""), what="the source fault")
    for _ in range(3):   # parts that pass while the station waits to reopen the camera (60 s backoff)
        wire.edge()
        assert wire.lost == 0, "the trigger line was released while the camera is reopened: the edge is lost"
        n = len(rec.results)
        wait_until(lambda: len(rec.results) == n + 1, what="an answer to the part triggered during the reopen")
    running.stop()
    results = rec.results
    assert [r.frame_id for r in results] == [0, 1, 2, 3, 4]
    assert results[0].verdict is not Verdict.FAULT
    assert all(r.verdict is Verdict.FAULT for r in results[1:])
    assert all("station not ready" in r.error for r in results[2:])
    assert wire.requests == 1, "one line request for the whole run"


def test_edges_while_the_camera_has_not_opened_yet_are_answered_fault(device_bundle, good_part, write_station,
                                                                      start_station, wait_until):
    wire = Wire()
    source = ScriptedSource(ScriptedSourceConfig(steps=[good_part], open_errors=[SourceError("no camera")]))
    running, rec = _station(device_bundle, write_station, start_station, source, wire)
    wait_until(lambda: source.open_calls >= 1 and "no camera" in (running.station.line.fault_reason or ""),
               what="the failed open")
    wire.edge()
    assert wire.lost == 0, "the trigger line is not requested until the camera opens: the edge is lost"
    wait_until(lambda: len(rec.results) == 1, what="an answer to the part triggered before the camera opened")
    running.stop()
    assert rec.results[0].verdict is Verdict.FAULT and "no camera" in rec.results[0].error
