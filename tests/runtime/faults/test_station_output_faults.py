"""A failing output never stops inspection: the other outputs still get every result, and nothing turns into OK.

Runs the real Station loop (small bundle, scripted frames) with outputs that raise on every call, raise
something other than OutputError, or run out of disk in the middle of the run.
"""
from __future__ import annotations

import errno
import json
import os

import cv2
import numpy as np
import pytest

from edge_runtime.bundle import Bundle
from edge_runtime.config import StationConfig
from edge_runtime.daemon import Station
from edge_runtime.outputs import Output, ResultLog, ResultLogConfig
from doubles import RecordingOutput, RecordingOutputConfig
from edge_runtime.records import Verdict
from edge_runtime.schema import from_mapping
from doubles import ScriptedSource

EVERY_METHOD = ["start", "publish", "set_ready", "set_fault", "heartbeat", "close"]


@pytest.fixture(scope="module")
def steps(small_bundle) -> tuple[list, list[Verdict | None]]:
    """Frames with the verdict each must get (None: OK or NG, whatever the model says, but inspected)."""
    bundle = Bundle.load(small_bundle)
    good = bundle.path(bundle.variant().golden[0]["file"]).read_bytes()
    damaged = cv2.imdecode(np.frombuffer(good, np.uint8), cv2.IMREAD_COLOR)
    cv2.rectangle(damaged, (60, 60), (140, 140), (0, 0, 0), -1)
    frames = [good, good[: len(good) // 2], damaged, b"", np.zeros((64, 64, 2), np.uint8), good, b"GIF89a..."] * 3
    expect = [Verdict.OK, Verdict.FAULT, Verdict.NG, Verdict.FAULT, Verdict.FAULT, Verdict.OK, Verdict.FAULT] * 3
    return frames, expect


def station_config(bundle) -> StationConfig:
    return from_mapping(StationConfig, {
        "bundle": str(bundle), "source": {"type": "scripted"}, "outputs": [], "http": {"enabled": False},
        "inference": {"threads": 1}, "recovery": {"read_timeout_s": 0.05, "exit_when_exhausted": True},
    }, "test")


def run_station(bundle, frames, outputs) -> Station:
    station = Station(station_config(bundle), source=ScriptedSource(steps=list(frames)), outputs=outputs)
    assert station.run() == 0
    return station


def check_results(results, expect) -> None:
    assert [r.frame_id for r in results] == list(range(len(expect)))   # every frame, once, in order
    for result, want in zip(results, expect):
        if want is Verdict.FAULT:
            assert result.verdict is Verdict.FAULT and result.error, result   # never OK for a bad frame
        else:
            assert result.verdict is want, result


def test_output_failing_on_every_call_does_not_stop_inspection(small_bundle, steps, tmp_path):
    frames, expect = steps
    broken = RecordingOutput(RecordingOutputConfig(name="broken", fail_on=EVERY_METHOD))
    healthy = RecordingOutput(RecordingOutputConfig(name="healthy"))
    log = ResultLog(ResultLogConfig(path=str(tmp_path / "results.jsonl")))
    station = run_station(small_bundle, frames, [broken, log, healthy])   # the broken one is called first
    check_results(healthy.results, expect)
    assert [r.frame_id for r in broken.results] == list(range(len(frames)))   # it was tried for every frame
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [(r["frame_id"], r["verdict"]) for r in records] == [(r.frame_id, r.verdict.value) for r in healthy.results]
    assert station.counters.output_errors >= len(frames)
    assert healthy.closed and healthy.ready is False


class CrashingOutput(Output):
    """An adapter with a bug: raises something other than OutputError."""

    name = "crashing"

    def __init__(self) -> None:
        self.calls = 0

    def publish(self, result) -> None:
        self.calls += 1
        raise ZeroDivisionError("bug in an adapter")


def test_output_raising_a_non_output_error_does_not_stop_inspection(small_bundle, steps):
    frames, expect = steps
    crashing, healthy = CrashingOutput(), RecordingOutput()
    station = run_station(small_bundle, frames, [crashing, healthy])
    check_results(healthy.results, expect)
    assert crashing.calls == len(frames) and station.counters.output_errors == len(frames)


def test_result_log_disk_full_mid_run_loses_only_the_frames_it_reported(small_bundle, steps, tmp_path, monkeypatch):
    frames, expect = steps
    path = tmp_path / "results.jsonl"
    log = ResultLog(ResultLogConfig(path=str(path)))
    healthy = RecordingOutput()
    full_for = {5, 6, 7}          # frame ids published while the disk is full
    real_write = os.write

    def write(fd, data):
        if fd == log._fd and json.loads(bytes(data))["frame_id"] in full_for:
            real_write(fd, bytes(data[:7]))         # part of the record lands, as on a real full disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    station = run_station(small_bundle, frames, [log, healthy])
    # A part whose record could not be written is FAULT on the line (never OK): the PLC gets nothing the log lacks.
    check_results(healthy.results, [Verdict.FAULT if i in full_for else want for i, want in enumerate(expect)])
    assert all("not recorded" in r.error or expect[r.frame_id] is Verdict.FAULT
               for r in healthy.results if r.frame_id in full_for)
    lines = path.read_text().splitlines()
    records = [json.loads(line) for line in lines]          # every line parses: the torn records were cut off
    assert [r["frame_id"] for r in records] == [i for i in range(len(frames)) if i not in full_for]
    assert station.counters.output_errors == len(full_for)  # each lost record was reported, none silently
    assert all(r["verdict"] != "OK" for r in records if expect[r["frame_id"]] is Verdict.FAULT)
