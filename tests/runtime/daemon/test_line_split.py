"""The daemon holds one Line per camera: the single-line Station still reads as before; the state is an enum."""
from __future__ import annotations

from edge_runtime.config import load_station
from edge_runtime.daemon import Line, Station, StationState
from doubles import RecordingOutput
from edge_runtime.sources import SourceError
from doubles import ScriptedSource
from edge_runtime.station_state import LineState

SCRIPTED = {"type": "scripted"}


def test_single_line_station_is_one_line_read_through(small_bundle, write_station, part_images_bytes):
    rec = RecordingOutput()
    station = Station(load_station(write_station(bundle=small_bundle, source=SCRIPTED)),
                      source=ScriptedSource(steps=part_images_bytes), outputs=[rec])
    assert len(station.lines) == 1 and isinstance(station.line, Line)
    assert station.state.state is StationState.STARTING
    assert station.run() == 0
    line = station.line
    # What code written against the one-camera Station reads is the line's own state.
    assert station.counters is line.counters and station.pipeline is line.pipeline
    assert station.trigger is line.trigger and station.outputs is line.outputs
    assert station.counters.frames == len(part_images_bytes) == len(rec.results)
    assert station.state.state is StationState.STOPPING


def test_state_enum_names_the_fault_kind():
    of = LineState.of
    assert of(stopping=False, fault_reason="starting", ready=False, busy=False, loaded=False).state is StationState.STARTING
    assert of(stopping=False, fault_reason=None, ready=True, busy=False, loaded=True).state is StationState.READY
    assert of(stopping=False, fault_reason=None, ready=True, busy=True, loaded=True).state is StationState.BUSY
    lost = of(stopping=False, fault_reason="source: camera gone", ready=False, busy=False, loaded=True)
    assert lost.state is StationState.FAULT and lost.fault_kind == "source" and str(lost) == "fault(source)"
    halted = of(stopping=False, fault_reason="halted: record: disk full", ready=False, busy=False, loaded=True)
    assert halted.fault_kind == "halted"
    assert of(stopping=True, fault_reason=None, ready=True, busy=False, loaded=True).state is StationState.STOPPING


def test_lost_camera_is_a_source_fault_state(small_bundle, write_station, part_images_bytes):
    rec = RecordingOutput()
    cfg = load_station(write_station(bundle=small_bundle, source=SCRIPTED,
                                     recovery={"read_timeout_s": 0.1, "backoff_initial_s": 5, "backoff_max_s": 5}))
    source = ScriptedSource(steps=[part_images_bytes[0], SourceError("camera unplugged")])
    station = Station(cfg, source=source, outputs=[rec])
    seen: list[LineState] = []
    # Watch the state from the line's own heartbeat (its thread), then stop once the fault shows.
    beat = station.line.on_heartbeat

    def watch(line):
        beat(line)
        seen.append(line.state)
        if line.state.state is StationState.FAULT:
            station.request_stop()

    station.line.on_heartbeat = watch
    station.run()
    faults = [s for s in seen if s.state is StationState.FAULT]
    assert faults and faults[0].fault_kind == "source" and "camera unplugged" in faults[0].reason
    assert rec.ready is False
