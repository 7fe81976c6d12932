"""The verdict the PLC sees is per part, on time and recorded: the station loop with real outputs where possible."""
from __future__ import annotations

import json
import os
import re
import select
import threading
import time
import tty
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from pymodbus.client import ModbusTcpClient

from edge_runtime.config import load_station
from edge_runtime.daemon import Station
from edge_runtime.outputs import GpioConfig, GpioLine, GpioOutput, ResultLog, build_output
from doubles import RecordingOutput
from doubles import FakeGpioLines, FullDiskLog
from edge_runtime.records import Frame, Verdict
from edge_runtime.sources import CameraSource, SourceError
from doubles import ScriptedSource

SCRIPTED = {"type": "scripted"}
FAST_RECOVERY = {"backoff_initial_s": 0.05, "backoff_max_s": 0.2, "read_timeout_s": 0.2}


def wait_until(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def images(flange_test_folder) -> list[bytes]:
    folder, index = flange_test_folder
    names = sorted(index)
    return [(folder / n).read_bytes() for n in [n for n in names if n.startswith("good_")][:2] + names[:2]]


def looping(steps) -> ScriptedSource:
    source = ScriptedSource(steps=list(steps))
    source.cfg.loop = True
    return source


def publishes_follow_their_begin_part(calls) -> bool:
    """Every publish(frame N) comes right after begin_part(N), with no other part's publish in between."""
    pending = None
    for method, arg in calls:
        if method == "begin_part":
            pending = arg
        elif method == "publish":
            if arg.frame_id != pending:
                return False
            pending = None
    return True


def test_every_part_is_announced_to_the_outputs_before_it_is_inspected(small_bundle, images, write_station):
    rec = RecordingOutput()
    cfg = load_station(write_station(bundle=small_bundle, source=SCRIPTED))
    Station(cfg, source=ScriptedSource(steps=images), outputs=[rec]).run()
    assert [r.frame_id for r in rec.results] == list(range(len(images)))
    assert rec.calls_to("begin_part") == list(range(len(images)))
    assert publishes_follow_their_begin_part(rec.calls)


def test_level_mode_gpio_drops_ok_between_consecutive_ok_parts_in_the_real_loop(small_bundle, images, write_station):
    from edge_runtime.bundle import Bundle

    bundle = Bundle.load(small_bundle)
    good = [bundle.path(bundle.variant().golden[0]["file"]).read_bytes()] * 3   # three OK parts in a row
    lines = FakeGpioLines()
    gpio = GpioOutput(GpioConfig(ok=GpioLine(offset=1), ng=GpioLine(offset=2), ready=GpioLine(offset=3),
                                 result_valid=GpioLine(offset=4), pulse_ms=0), lines)
    rec = RecordingOutput()
    cfg = load_station(write_station(bundle=small_bundle, source=SCRIPTED))
    Station(cfg, source=ScriptedSource(steps=good), outputs=[gpio, rec]).run()
    assert [r.verdict for r in rec.results] == [Verdict.OK] * 3
    ok = [state[1] for state in lines.history if state]
    assert sum(1 for a, b in zip(ok, ok[1:]) if not a and b) == 3, "OK rises once per part: a PLC sees each one"


class TriggeredCamera(ScriptedSource):
    """A camera in trigger mode: optionally slow to deliver the frame (exposure, transfer)."""

    def __init__(self, steps, read_delay_s: float = 0.0, open_errors=()):
        super().__init__(steps=list(steps))
        self._open_errors = list(open_errors)
        self.read_delay_s = read_delay_s

    def notify_trigger(self, at_wall=None, at=None) -> None:
        pass

    def read(self, timeout):
        if self.read_delay_s:
            time.sleep(self.read_delay_s)
        return super().read(timeout)


def test_a_trigger_fired_during_backoff_is_answered_fault_at_once_never_served_late(small_bundle, images,
                                                                                    write_station, start_station):
    camera = TriggeredCamera(images, open_errors=[SourceError("camera away")] * 3)
    rec = RecordingOutput()
    cfg = load_station(write_station(bundle=small_bundle, source=SCRIPTED, trigger={"type": "software"},
                                     recovery={"backoff_initial_s": 0.5, "backoff_max_s": 1.0,
                                               "read_timeout_s": 0.2}))
    running = start_station(cfg, source=camera, outputs=[rec])
    station = running.station
    wait_until(lambda: station.fault_reason and "camera away" in station.fault_reason, what="camera fault")
    station.trigger.fire()
    wait_until(lambda: len(rec.results) == 1, what="the answer to the trigger")
    (answer,) = rec.results
    assert answer.verdict is Verdict.FAULT and "station not ready" in answer.error and "camera away" in answer.error
    wait_until(lambda: station.status().state == "ready", what="the camera back")
    station.trigger.fire()
    wait_until(lambda: len(rec.results) == 2, what="the next part")
    assert running.stop() == 0
    assert rec.results[1].verdict is not Verdict.FAULT, "the new trigger is inspected"
    assert len(rec.results) == 2, "the old trigger was not served again after the recovery"


def test_a_trigger_older_than_max_age_is_fault_and_not_captured(small_bundle, images, write_station, start_station):
    camera = TriggeredCamera(images)
    rec = RecordingOutput()
    cfg = load_station(write_station(bundle=small_bundle, source=SCRIPTED,
                                     trigger={"type": "software", "max_age_ms": 250}, recovery=FAST_RECOVERY))
    running = start_station(cfg, source=camera, outputs=[rec])
    wait_until(lambda: running.station.status().state == "ready", what="READY")
    running.station.trigger.fire(at=time.monotonic() - 1.0)   # a part that went by a second ago
    wait_until(lambda: len(rec.results) == 1, what="the answer")
    assert running.stop() == 0
    (answer,) = rec.results
    assert answer.verdict is Verdict.FAULT and "trigger expired" in answer.error and "max_age_ms 250" in answer.error
    assert camera.read_calls == 0, "nothing captured for a part that is gone"
    assert running.station.counters.expired_triggers == 1


def test_deadline_runs_from_the_trigger_including_a_slow_capture(small_bundle, images, write_station,
                                                                 start_station):
    camera = TriggeredCamera(images, read_delay_s=0.3)   # the frame arrives 300 ms after the trigger
    rec = RecordingOutput()
    cfg = load_station(write_station(bundle=small_bundle, source=SCRIPTED, trigger={"type": "software"},
                                     inference={"deadline_ms": 200}, recovery={"read_timeout_s": 1.0}))
    running = start_station(cfg, source=camera, outputs=[rec])
    wait_until(lambda: running.station.status().state == "ready", what="READY")
    running.station.trigger.fire()
    wait_until(lambda: len(rec.results) == 1, what="the result")
    assert running.stop() == 0
    (result,) = rec.results
    assert result.verdict is Verdict.FAULT and "from trigger to output" in result.error
    assert result.score is not None, "it was inspected, but too late for the part"


def test_post_trigger_is_503_while_the_station_cannot_inspect(bundle_copy, write_station, start_station):
    from edge_runtime.bundle import Bundle

    model = bundle_copy / Bundle.load(bundle_copy).variant().model_file
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF                 # the sha256 check refuses the bundle
    model.write_bytes(bytes(data))
    rec = RecordingOutput()
    cfg = load_station(write_station(bundle=bundle_copy, source=SCRIPTED, trigger={"type": "software"},
                                     http={"port": 0, "allow_trigger": True}, recovery=FAST_RECOVERY))
    running = start_station(cfg, source=TriggeredCamera([]), outputs=[rec])
    station = running.station
    wait_until(lambda: station.fault_reason and "sha256" in station.fault_reason, what="bundle fault")
    req = urllib.request.Request(f"http://127.0.0.1:{station.http_port}/trigger", method="POST", data=b"")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=5)
    assert err.value.code == 503 and "sha256" in json.loads(err.value.read())["error"]
    assert station.trigger.fired == 0
    station.trigger.fire()                      # a serial TRG in the same state: answered FAULT at once
    wait_until(lambda: len(rec.results) == 1, what="the FAULT answer")
    assert rec.results[0].verdict is Verdict.FAULT and "station not ready" in rec.results[0].error
    assert running.stop() == 0


@pytest.fixture
def bundle_copy(small_bundle, tmp_path):
    import shutil

    dest = tmp_path / "bundle"
    shutil.copytree(small_bundle, dest)
    return dest


def test_disk_full_result_log_makes_every_part_fault_and_health_says_so(small_bundle, images, write_station,
                                                                        start_station, tmp_path):
    rec = RecordingOutput()
    cfg = load_station(write_station(bundle=small_bundle, source=SCRIPTED, http={"port": 0},
                                     outputs=[{"type": "result_log", "path": str(tmp_path / "results.jsonl"), "fsync": "never"}]))
    running = start_station(cfg, source=looping(images[:1]), outputs=[FullDiskLog(cfg.outputs[0]), rec])
    station = running.station
    wait_until(lambda: len(rec.results) >= 5, what="parts")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://127.0.0.1:{station.http_port}/healthz", timeout=5)
    assert err.value.code == 503
    health = json.loads(err.value.read())
    assert health["status"] == "fault" and "record" in health["reason"] and "disk full" in health["reason"]
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{station.http_port}/metrics", timeout=5).read().decode()
    assert "edge_record_failures_total" in metrics
    assert running.stop() == 0
    assert rec.results and all(r.verdict is Verdict.FAULT and "not recorded" in r.error for r in rec.results), \
        "the PLC got no verdict the log lacks"


def test_on_record_failure_halt_stops_inspecting(small_bundle, images, write_station, start_station, tmp_path):
    rec = RecordingOutput()
    cfg = load_station(write_station(bundle=small_bundle, source=SCRIPTED, recovery=FAST_RECOVERY,
                                     trigger={"type": "software"},
                                     outputs=[{"type": "result_log", "path": str(tmp_path / "results.jsonl"), "fsync": "never",
                                               "on_record_failure": "halt"}]))
    camera = TriggeredCamera(images)
    running = start_station(cfg, source=camera, outputs=[FullDiskLog(cfg.outputs[0]), rec])
    station = running.station
    wait_until(lambda: station.status().state == "ready", what="READY")
    station.trigger.fire()
    wait_until(lambda: station.fault_reason and station.fault_reason.startswith("halted"), what="halt")
    reads = camera.read_calls
    station.trigger.fire()
    wait_until(lambda: len(rec.results) == 2, what="the answer to the next trigger")
    assert running.stop() == 0
    assert [r.verdict for r in rec.results] == [Verdict.FAULT, Verdict.FAULT]
    assert "station not ready (halted: record" in rec.results[1].error and camera.read_calls == reads
    assert rec.ready is False and "halted" in rec.fault


class HangingLog(ResultLog):
    """The real result log, whose writes block while `hang` is set (a hung disk or network share)."""

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.hang = threading.Event()
        self.release = threading.Event()

    def _append(self, line: bytes) -> None:
        if self.hang.is_set():
            self.release.wait(30)
        super()._append(line)


def test_a_loop_stuck_in_a_blocking_call_drops_ready_on_the_outputs_until_it_runs_again(
        small_bundle, images, write_station, start_station, tmp_path):
    """The loop cannot drop READY while it is stuck: the daemon's stall guard does (probe 35: READY up for as long
    as a record write hung), and the line's own state comes back when the loop runs again."""
    rec = RecordingOutput()
    cfg = load_station(write_station(bundle=small_bundle, source=SCRIPTED, http={"port": 0, "stall_after_s": 0.5},
                                     outputs=[{"type": "result_log", "path": str(tmp_path / "results.jsonl")}]))
    log = HangingLog(cfg.outputs[0])
    running = start_station(cfg, source=looping(images[:2]), outputs=[log, rec])
    wait_until(lambda: rec.ready and len(rec.results) >= 2, what="inspecting")
    log.hang.set()
    wait_until(lambda: not rec.ready, what="READY down while the record write hangs", timeout=10)
    assert "inspection stalled" in rec.fault
    answered = len(rec.results)
    time.sleep(0.6)
    assert len(rec.results) == answered and not rec.ready, "nothing answered, READY stays down"
    log.hang.clear()
    log.release.set()
    wait_until(lambda: rec.ready and rec.fault is None and len(rec.results) > answered + 2,
               what="READY back once the loop runs", timeout=10)
    assert running.stop() == 0


def test_a_slow_part_inside_its_deadline_never_drops_ready(small_bundle, images, write_station, start_station,
                                                           tmp_path):
    """http.stall_after_s set low (for /healthz) must not make the stall guard flap READY on parts answered inside
    their deadline (probe 36: stall_after_s 0.3 and a 0.7 s record write dropped READY on every part)."""
    class SlowLog(ResultLog):
        def _append(self, line: bytes) -> None:
            time.sleep(0.7)
            super()._append(line)

    rec = RecordingOutput()
    cfg = load_station(write_station(bundle=small_bundle, source=SCRIPTED, http={"port": 0, "stall_after_s": 0.3},
                                     outputs=[{"type": "result_log", "path": str(tmp_path / "results.jsonl")}]))
    running = start_station(cfg, source=looping(images[:2]), outputs=[SlowLog(cfg.outputs[0]), rec])
    wait_until(lambda: rec.ready, what="READY")
    wait_until(lambda: len(rec.results) >= 4, what="four slow parts", timeout=30)
    assert running.stop() == 0
    readies = rec.calls_to("set_ready")
    after = readies[readies.index(True):]
    assert False not in after[:-1], f"READY flapped: {readies}"   # (the stop drops it, last)
    assert all(r.verdict is not Verdict.FAULT for r in rec.results[:4])


def test_a_failing_record_takes_ready_down_until_the_log_can_be_written_again(small_bundle, images, write_station,
                                                                              start_station, tmp_path):
    log_path = tmp_path / "records" / "results.jsonl"
    rec = RecordingOutput()
    cfg = load_station(write_station(bundle=small_bundle, source=SCRIPTED, recovery=FAST_RECOVERY,
                                     trigger={"type": "software"},
                                     outputs=[{"type": "result_log", "path": str(log_path)}]))
    running = start_station(cfg, source=TriggeredCamera(images), outputs=[build_output(cfg.outputs[0]), rec])
    station = running.station
    wait_until(lambda: station.status().state == "ready", what="READY")
    log_path.unlink()
    log_path.mkdir()                                   # the record path is now a directory: no record can be written
    station.trigger.fire()
    wait_until(lambda: len(rec.results) == 1, what="the first part")
    wait_until(lambda: rec.ready is False, what="READY down")
    assert rec.results[0].verdict is Verdict.FAULT and "not recorded" in rec.results[0].error
    assert station.status().state == "fault" and "record" in station.fault_reason
    time.sleep(1.5)                                    # the station probes the log once a second: still broken
    assert rec.ready is False
    log_path.rmdir()                                   # the operator fixes it; no part needs to come for READY
    wait_until(lambda: rec.ready is True and station.fault_reason is None, what="READY back")
    station.trigger.fire()
    wait_until(lambda: len(rec.results) == 2, what="the next part")
    assert running.stop() == 0
    assert rec.results[1].verdict is not Verdict.FAULT
    assert [json.loads(line)["frame_id"] for line in log_path.read_text().splitlines()] == [rec.results[1].frame_id]


def test_a_recipe_switch_does_not_raise_ready_while_the_camera_is_lost(small_bundle, images, write_station,
                                                                       start_station):
    rec = RecordingOutput()
    cfg = load_station(write_station(bundle=small_bundle, source=SCRIPTED, trigger={"type": "software"},
                                     recovery={"backoff_initial_s": 5.0, "backoff_max_s": 5.0, "read_timeout_s": 0.1}))
    camera = TriggeredCamera(images, open_errors=[SourceError("camera away")] * 50)
    running = start_station(cfg, source=camera, outputs=[rec])
    station = running.station
    wait_until(lambda: station.fault_reason and "camera away" in station.fault_reason, what="camera fault")
    station._resume()                                  # what a recipe switch (or any cleared condition) calls
    assert station.fault_reason and "camera away" in station.fault_reason
    assert rec.ready is not True and station.status().state == "fault"
    assert running.stop() == 0


def test_a_gpio_chip_that_stops_taking_writes_faults_the_line_on_the_other_outputs(small_bundle, images,
                                                                                    write_station, start_station):
    """A dead GPIO expander may leave the last OK on its pins: the station cannot withdraw it, so every other
    output says FAULT with READY down until the chip takes writes again."""
    lines = FakeGpioLines()
    dead = threading.Event()
    original = lines.set_values

    def set_values(values):
        if dead.is_set():
            raise OSError(5, "Input/output error")
        original(values)
    lines.set_values = set_values
    gpio = GpioOutput(GpioConfig(ok=GpioLine(offset=1), ng=GpioLine(offset=2), ready=GpioLine(offset=3),
                                 pulse_ms=0), lines)
    rec = RecordingOutput()
    cfg = load_station(write_station(bundle=small_bundle, source=SCRIPTED, recovery=FAST_RECOVERY,
                                     trigger={"type": "software"}))
    running = start_station(cfg, source=TriggeredCamera(images), outputs=[gpio, rec])
    station = running.station
    wait_until(lambda: station.status().state == "ready" and rec.ready, what="READY")
    dead.set()
    station.trigger.fire()
    wait_until(lambda: len(rec.results) == 1, what="the part")
    wait_until(lambda: rec.ready is False, what="READY down on the other outputs")
    assert station.status().state == "fault" and "output gpio" in station.fault_reason
    dead.clear()                                   # the chip is back: the next state write succeeds
    station.trigger.fire()
    wait_until(lambda: len(rec.results) == 2, what="the next part")
    wait_until(lambda: rec.ready is True and station.fault_reason is None, what="READY back")
    assert running.stop() == 0


class ReviewStation(Station):
    """Every inspected part scores in the review band (stands in for a bundle whose band holds these parts)."""

    def _load(self) -> bool:
        loaded = super()._load()
        if loaded:
            inspect = self.pipeline.inspect

            def inspect_in_band(frame):
                result = inspect(frame)
                if result.verdict is not Verdict.FAULT:
                    result.verdict, result.review_threshold = Verdict.REVIEW, result.score * 0.5
                return result

            self.pipeline.inspect = inspect_in_band
        return loaded


def test_review_never_drives_an_ok_output_on_any_adapter(small_bundle, images, write_station, tmp_path, free_port):
    master, slave = os.openpty()
    tty.setraw(master)
    port = free_port()
    lines = FakeGpioLines()
    try:
        cfg = load_station(write_station(
            bundle=small_bundle, source=SCRIPTED, http={"port": 0},
            outputs=[{"type": "result_log", "path": "results.jsonl"},
                     {"type": "serial", "port": os.ttyname(slave), "heartbeat_interval_s": 60},
                     {"type": "modbus", "host": "127.0.0.1", "port": port},
                     {"type": "ng_images", "dir": "ng", "min_free_mb": 0}]))
        gpio = GpioOutput(GpioConfig(ok=GpioLine(offset=1), ng=GpioLine(offset=2), pulse_ms=0), lines)
        rec = RecordingOutput()
        station = ReviewStation(cfg, source=looping(images[:2]),
                                outputs=[build_output(o) for o in cfg.outputs] + [gpio, rec])
        thread = threading.Thread(target=station.run, daemon=True)
        thread.start()
        wait_until(lambda: len(rec.results) >= 4, what="parts")
        client = ModbusTcpClient("127.0.0.1", port=port, timeout=3, retries=0)
        assert client.connect()
        regs = client.read_holding_registers(0, count=1, device_id=1).registers
        bits = client.read_coils(0, count=6, device_id=1).bits
        client.close()
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{station.http_port}/metrics", timeout=5).read().decode()
        station.request_stop()
        thread.join(30)
        serial_text = b""
        while True:
            ready, _, _ = select.select([master], [], [], 0.2)
            if not ready:
                break
            serial_text += os.read(master, 65536)
    finally:
        os.close(master)
        os.close(slave)

    n = len(rec.results)
    assert all(r.verdict is Verdict.REVIEW for r in rec.results)
    assert not any(state.get(1) for state in lines.history), "GPIO OK never asserted"
    assert any(state.get(2) for state in lines.history), "without a REVIEW line, REVIEW shows on NG"
    assert regs[0] in (0, 3) and bits[0] is False, "Modbus: verdict 3 (or withdrawn while busy), OK coil false"
    res = [line.split() for line in serial_text.decode().split("\r\n") if line.startswith("RES ")]
    assert res and all(fields[2] == "REVIEW" for fields in res), "serial RES carries REVIEW, never OK"
    records = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(records) == n and all(r["verdict"] == "REVIEW" and r["review_threshold"] for r in records)
    assert any("_REVIEW_" in name for name in os.listdir(tmp_path / "ng")), "REVIEW frames kept for the re-check"
    review_count = re.search(r'^edge_verdicts_total\{verdict="REVIEW"\} (\d+)$', metrics, re.M)
    assert review_count and 1 <= int(review_count.group(1)) <= n, "/metrics counts REVIEW"
    assert 'edge_verdicts_total{verdict="OK"} 0' in metrics


def test_a_watch_folder_file_written_before_the_trigger_is_never_the_next_parts_image(small_bundle, flange_test_folder,
                                                                                       write_station, start_station,
                                                                                       tmp_path):
    """Triggered line, watch folder: part A's image arrives after its trigger timed out (A: FAULT). Part B's trigger
    must not take A's late file as B's image; B gets the file written after its own trigger."""
    folder, index = flange_test_folder
    good = next(n for n in sorted(index) if n.startswith("good_"))
    bad = next(n for n in sorted(index) if n.startswith("missing_hole_"))   # NG on every test bundle
    watch = tmp_path / "incoming"
    watch.mkdir()
    rec = RecordingOutput()
    cfg = load_station(write_station(bundle=small_bundle, trigger={"type": "software"},
                                     source={"type": "folder", "path": str(watch), "mode": "watch",
                                             "poll_interval_s": 0.05},
                                     recovery={"read_timeout_s": 0.5}))
    running = start_station(cfg, outputs=[rec])
    station = running.station
    wait_until(lambda: station.status().state == "ready", what="READY")
    station.trigger.fire()                                               # part A: no image in time
    wait_until(lambda: len(rec.results) == 1, what="part A's answer")
    (watch / "partA.png").write_bytes((folder / good).read_bytes())     # A's image, late
    time.sleep(0.2)
    station.trigger.fire()                                               # part B
    time.sleep(0.1)
    (watch / "partB.png").write_bytes((folder / bad).read_bytes())      # B's image, after B's trigger
    wait_until(lambda: len(rec.results) == 2, what="part B's answer")
    assert running.stop() == 0
    a, b = rec.results
    assert a.verdict is Verdict.FAULT and "no frame within" in a.error
    assert b.source.endswith("partB.png"), f"part B was answered from {b.source}"
    assert b.verdict is Verdict.NG
    assert station.status().counters["stale_files"] == 1              # A's late file, left out and counted


def test_the_part_whose_id_could_not_be_reserved_is_fault_never_ok(small_bundle, images, write_station,
                                                                  start_station, tmp_path):
    """The frame counter cannot save its next block (state_dir full): the line halts, and the part that hit it is
    answered FAULT on an id from memory, not inspected and answered OK or NG."""
    from edge_runtime.frame_counter import FrameCounterError

    rec = RecordingOutput()
    cfg = load_station(write_station(bundle=small_bundle, source=SCRIPTED, trigger={"type": "software"},
                                     state_dir=str(tmp_path / "state"), recovery=FAST_RECOVERY))
    running = start_station(cfg, source=TriggeredCamera(images), outputs=[rec])
    line = running.station.lines[0]
    wait_until(lambda: running.station.status().state == "ready", what="READY")

    def full(*_):
        raise FrameCounterError("frame counter state/next_frame_id: cannot reserve ids (No space left on device)")

    line.frame_ids.take = full
    running.station.trigger.fire()
    wait_until(lambda: len(rec.results) == 1, what="the part's answer")
    assert running.stop() == 0
    (answer,) = rec.results
    assert answer.verdict is Verdict.FAULT and "halted" in answer.error and "cannot reserve ids" in answer.error


def test_an_output_that_cannot_start_keeps_the_station_out_of_ready(small_bundle, images, write_station, tmp_path,
                                                                     start_station):
    """A Modbus server whose port is taken never listens (the PLC polls nothing), and a result log that cannot be
    opened records nothing: neither may leave the station READY, before any part or after one (READY had come up
    until the first part, and a Modbus server that never started stayed "ready" for good)."""
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    (tmp_path / "a_file").write_text("not a folder")
    try:
        for outputs, why in (([{"type": "result_log", "path": "results.jsonl"},
                               {"type": "modbus", "host": "127.0.0.1", "port": port}], "modbus"),
                             ([{"type": "result_log", "path": str(tmp_path / "a_file" / "results.jsonl")}],
                              "result log")):
            rec = RecordingOutput()
            cfg = load_station(write_station(bundle=small_bundle, source=SCRIPTED, trigger={"type": "software"},
                                             outputs=outputs, recovery=FAST_RECOVERY))
            running = start_station(cfg, source=TriggeredCamera(images), outputs=[build_output(o) for o in cfg.outputs]
                                    + [rec])
            station = running.station
            wait_until(lambda: station.status().state == "fault", what=f"FAULT for the {why} that did not start")
            time.sleep(0.5)                                            # a few loop rounds: no flapping back
            assert station.status().state == "fault" and why in station.status().reason
            assert True not in rec.calls_to("set_ready"), "READY never raised"
            station.trigger.fire()
            wait_until(lambda: len(rec.results) == 1, what="the part's answer")
            if why == "result log":      # unrecorded: FAULT; a dead Modbus server: the others get the real verdict
                assert rec.results[0].verdict is Verdict.FAULT
            time.sleep(0.3)
            assert station.status().state == "fault" and True not in rec.calls_to("set_ready")
            assert running.stop() == 0
    finally:
        taken.close()


class HangingSource(ScriptedSource):
    """A source whose read blocks past its timeout (a FIFO, a hung network share), until released."""

    def __init__(self, steps):
        super().__init__(steps=list(steps))
        self.cfg.loop = True
        self.hang = threading.Event()
        self.release = threading.Event()

    def read(self, timeout):
        if self.hang.is_set():
            self.release.wait(60)
        return super().read(timeout)


def test_a_loop_stuck_outside_the_inspection_is_reported_stalled_everywhere(small_bundle, images, write_station,
                                                                           start_station):
    """/healthz, and the plant state MQTT and OPC UA publish, say "stalled" when the loop stops going round
    wherever it hangs, not only inside an inspection (a blocking source read was reported ready)."""
    from edge_runtime.http_endpoint import stalled_reason

    source = HangingSource(images)
    rec = RecordingOutput()
    cfg = load_station(write_station(bundle=small_bundle, source=SCRIPTED, recovery=FAST_RECOVERY,
                                     http={"enabled": False, "stall_after_s": 0.5}))
    running = start_station(cfg, source=source, outputs=[rec])
    station = running.station
    line = station.lines[0]
    wait_until(lambda: len(rec.results) >= 2, what="parts")
    assert stalled_reason(line.status()) is None
    source.hang.set()
    limit = 2 * 0.2 + 0.5 + 1.0
    wait_until(lambda: stalled_reason(line.status()) is not None, timeout=limit + 10, what="stalled")
    assert "inspection loop stalled" in stalled_reason(line.status())
    assert line.status().last_heartbeat_age_s > limit
    plant = line.plant_state()
    assert plant["state"] == "stalled" and "inspection loop stalled" in plant["reason"]
    source.release.set()
    wait_until(lambda: stalled_reason(line.status()) is None, what="going round again")
    assert running.stop() == 0


class DroppingCamera(ScriptedSource):
    """A free-running camera whose capture dropped two frames before its third frame (the line was busy)."""

    def __init__(self, steps):
        super().__init__(steps=list(steps))
        self.reads = 0

    def read(self, timeout):
        self.reads += 1
        return super().read(timeout)

    def take_dropped(self) -> int:
        return 2 if self.reads == 3 else 0


@pytest.mark.parametrize("every_frame_is_a_part", [True, False])
def test_dropped_frames_of_a_hardware_triggered_camera_are_parts_answered_fault(
        small_bundle, images, write_station, start_station, every_frame_is_a_part):
    rec = RecordingOutput()
    cfg = load_station(write_station(bundle=small_bundle, source=SCRIPTED, recovery=FAST_RECOVERY,
                                     capture={"every_frame_is_a_part": every_frame_is_a_part}))
    running = start_station(cfg, source=DroppingCamera(images[:4]), outputs=[rec])
    wait_until(lambda: len(rec.results) >= (6 if every_frame_is_a_part else 4), what="the parts")
    assert running.stop() == 0
    ids = [r.frame_id for r in rec.results]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)          # one id each, in capture order
    verdicts = [r.verdict for r in rec.results]
    if every_frame_is_a_part:                                        # frames 1, 2, [2 dropped], 3, 4
        assert verdicts[2:4] == [Verdict.FAULT, Verdict.FAULT] and "frame dropped" in rec.results[2].error
        assert Verdict.FAULT not in verdicts[:2] + verdicts[4:6]
    else:
        assert Verdict.FAULT not in verdicts[:4]


def test_a_serial_port_that_vanishes_holds_the_line_in_fault_until_it_is_back(small_bundle, images, write_station,
                                                                              start_station, tmp_path):
    """No READY flapping while the port is gone (begin_part and state calls that reach nothing are failures), and
    the line comes back by itself when the port does, with no part needed (a line that is not READY gets none
    from an HTTP trigger)."""
    link = str(tmp_path / "ttyPLC")

    def plug() -> int:
        master, slave = os.openpty()
        tty.setraw(master)
        name = os.ttyname(slave)
        os.close(slave)
        if os.path.lexists(link):
            os.unlink(link)
        os.symlink(name, link)
        return master

    master = plug()
    rec = RecordingOutput()
    cfg = load_station(write_station(bundle=small_bundle, source=SCRIPTED, trigger={"type": "software"},
                                     outputs=[{"type": "result_log", "path": "results.jsonl"},
                                              {"type": "serial", "port": link, "reconnect_interval_s": 0.2,
                                               "heartbeat_interval_s": 60}],
                                     recovery=FAST_RECOVERY))
    running = start_station(cfg, source=TriggeredCamera(images), outputs=[build_output(o) for o in cfg.outputs] + [rec])
    station = running.station
    try:
        wait_until(lambda: station.status().state == "ready", what="READY")
        os.close(master)                                              # unplugged
        master = None
        os.unlink(link)
        station.trigger.fire()                                        # a part: its RES cannot be sent
        wait_until(lambda: station.status().state == "fault", what="FAULT for the lost port")
        readies = len(rec.calls_to("set_ready"))
        for _ in range(3):
            station.trigger.fire()
            time.sleep(0.3)
        assert station.status().state == "fault" and "serial" in station.status().reason
        assert True not in rec.calls_to("set_ready")[readies:], "READY never came back while the port was gone"
        master = plug()                                               # plugged back
        wait_until(lambda: station.status().state == "ready", timeout=10, what="READY again without a part")
    finally:
        assert running.stop() == 0
        if master is not None:
            os.close(master)


def test_where_every_frame_is_a_part_a_line_that_cannot_inspect_answers_each_frame_fault_as_it_comes(
        small_bundle, images, write_station, start_station):
    """Halted (or a failed recipe switch): the frames still come, each a part; each gets its FAULT with its own id
    as it comes, not a burst of late answers when the line is back (or none while it is halted)."""
    rec = RecordingOutput()
    cfg = load_station(write_station(bundle=small_bundle, source=SCRIPTED, recovery=FAST_RECOVERY,
                                     capture={"every_frame_is_a_part": True}))
    class Camera(ScriptedSource):     # a camera at 20 fps: its frames go by (a watch folder's files would wait)
        live = True

        def read(self, timeout):
            time.sleep(0.05)
            return super().read(timeout)

    camera = Camera(steps=list(images))
    camera.cfg.loop = True
    running = start_station(cfg, source=camera, outputs=[rec])
    line = running.station.lines[0]
    wait_until(lambda: len(rec.results) >= 2, what="parts")
    line._halt("test: halted")
    n = len(rec.results)
    wait_until(lambda: sum("station not ready (halted" in (r.error or "") for r in rec.results[n:]) >= 5,
               what="frames answered FAULT while halted, as they come")
    assert running.stop() == 0
    assert all(r.verdict is Verdict.FAULT for r in rec.results[n + 1:])
    ids = [r.frame_id for r in rec.results]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


def test_a_modbus_server_whose_port_is_freed_later_starts_and_the_line_comes_back(small_bundle, images,
                                                                                  write_station, start_station):
    import socket

    taken = socket.socket()
    taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    cfg = load_station(write_station(bundle=small_bundle, source=SCRIPTED, trigger={"type": "software"},
                                     outputs=[{"type": "result_log", "path": "results.jsonl"},
                                              {"type": "modbus", "host": "127.0.0.1", "port": port}],
                                     recovery=FAST_RECOVERY))
    running = start_station(cfg, source=TriggeredCamera(images), outputs=[build_output(o) for o in cfg.outputs])
    station = running.station
    try:
        wait_until(lambda: "modbus" in (station.status().reason or ""), what="FAULT: the port is taken")
        time.sleep(1.5)                                                 # retried: still taken, still FAULT
        assert station.status().state == "fault" and "modbus" in station.status().reason
    finally:
        taken.close()
    wait_until(lambda: station.status().state == "ready", timeout=15, what="READY once the server could start")
    client = ModbusTcpClient("127.0.0.1", port=port, timeout=3, retries=0)
    assert client.connect()
    client.close()
    assert running.stop() == 0


def test_a_software_trigger_withdraws_the_previous_verdict_before_it_returns(small_bundle, write_station,
                                                                              free_port):
    """POST /trigger answers 202 (a serial TRG returns) only after the previous part's verdict is withdrawn: a
    PLC reading coil 0 right after its trigger read the previous part's OK until the loop got to begin_part
    (probe 35: 2 in 40)."""
    from edge_runtime.records import InspectionResult

    port = free_port()
    cfg = load_station(write_station(bundle=small_bundle, source=SCRIPTED, trigger={"type": "software"},
                                     outputs=[{"type": "modbus", "host": "127.0.0.1", "port": port}]))
    station = Station(cfg, source=ScriptedSource(steps=[]), outputs=[build_output(o) for o in cfg.outputs])
    (line,) = station.lines
    line.start_outputs()   # the loop is not running: nothing but the trigger can withdraw the verdict
    client = ModbusTcpClient("127.0.0.1", port=port, timeout=3, retries=0)
    try:
        assert client.connect()
        line.bus.begin_part(7)
        line.bus.publish(InspectionResult(frame_id=7, source="cam", verdict=Verdict.OK, score=1.0,
                                          normalized_score=0.2, threshold=2.0, timings_ms={}, bundle_id="b"))
        assert client.read_coils(0, count=1, device_id=1).bits[0], "part 7's OK shows"
        line.trigger.fire()
        assert not client.read_coils(0, count=1, device_id=1).bits[0], "the OK stood after the next trigger"
        assert client.read_holding_registers(0, count=1, device_id=1).registers == [0]
    finally:
        client.close()
        line.bus.close()


class VanishedWatchFolder(TriggeredCamera):
    """A watch folder removed or unmounted while the line was idle: the trigger's notify finds it gone."""

    def notify_trigger(self, at_wall=None, at=None) -> None:
        if self.open_calls == 1:
            raise SourceError("folder source /srv/parts: the folder was removed, moved or unmounted")


def test_a_source_lost_when_the_trigger_is_noted_answers_that_part_fault(small_bundle, images, write_station,
                                                                         start_station):
    # Probe 63: a watch folder removed while the line was idle was noticed only by the next trigger's
    # notify_trigger, outside the read's error handling: that part had its frame id and BUSY, but no record and no
    # answer (RES, Modbus, MQTT); the PLC's next answer belonged to a later trigger.
    camera = VanishedWatchFolder(images)
    rec = RecordingOutput()
    cfg = load_station(write_station(bundle=small_bundle, source=SCRIPTED, trigger={"type": "software"},
                                     recovery=FAST_RECOVERY))
    running = start_station(cfg, source=camera, outputs=[rec])
    station = running.station
    wait_until(lambda: station.status().state == "ready", what="READY")
    station.trigger.fire()
    wait_until(lambda: len(rec.results) == 1, timeout=5.0, what="the answer to the trigger")
    assert running.stop() == 0
    (answer,) = rec.results
    assert answer.verdict is Verdict.FAULT and "the folder was removed" in answer.error
    assert rec.calls_to("begin_part") == [answer.frame_id], "the part begun is the part answered"


def test_a_watch_folder_removed_while_the_line_waits_drops_ready_before_any_trigger(small_bundle, tmp_path,
                                                                                   write_station, start_station):
    """Probe 63: READY (and /healthz 'ready') stayed up for as long as nobody triggered after the folder was
    removed; the line now notices while it waits, and comes back when the folder does."""
    folder = tmp_path / "watch"
    folder.mkdir()
    cfg = load_station(write_station(bundle=small_bundle, source={"type": "folder", "path": str(folder),
                                                                  "mode": "watch"},
                                     trigger={"type": "software"}, recovery=FAST_RECOVERY))
    running = start_station(cfg)
    station = running.station
    wait_until(lambda: station.status().state == "ready", what="READY")
    folder.rmdir()
    wait_until(lambda: station.status().state == "fault", timeout=5.0, what="FAULT without a trigger")
    assert "the folder is gone" in (station.status().reason or "")
    folder.mkdir()
    wait_until(lambda: station.status().state == "ready", timeout=5.0, what="READY again")
    assert running.stop() == 0


class FlakyLineOutput(RecordingOutput):
    """A line output that finds a failure of its own while `broken` is set (Output.failure(): a GPIO pulse timer
    that could not drop OK), and works again once it is cleared."""

    def __init__(self, broken: bool = False) -> None:
        super().__init__()
        self.name = "plc"
        self.broken = threading.Event()
        if broken:
            self.broken.set()

    def failure(self) -> str | None:
        return "pins stuck" if self.broken.is_set() else None


def withdrawn_with(station, rec, what: str) -> int:
    """Take the bundle out of service (a rollout's failed probation); returns how many READY calls came before."""
    station.line.withdraw_pipeline("failed its probation")
    wait_until(lambda: station.pipeline is None and "failed its probation" in (station.fault_reason or ""),
               what=f"the bundle withdrawn ({what} still failing)")
    return len(rec.calls_to("set_ready"))


def test_a_line_output_back_while_no_bundle_is_loaded_does_not_raise_ready(small_bundle, images, write_station,
                                                                         start_station):
    """The output fault clearing was enough for READY (and /healthz "ready") with no bundle to inspect on."""
    plc, rec = FlakyLineOutput(), RecordingOutput()
    cfg = load_station(write_station(bundle=small_bundle, source=SCRIPTED, trigger={"type": "software"},
                                     recovery=FAST_RECOVERY))
    running = start_station(cfg, source=TriggeredCamera(images), outputs=[plc, rec])
    station = running.station
    wait_until(lambda: station.status().state == "ready" and rec.ready, what="READY")
    plc.broken.set()
    wait_until(lambda: "output plc" in (station.fault_reason or ""), what="the output fault")
    readies = withdrawn_with(station, rec, "the output")
    plc.broken.clear()
    wait_until(lambda: station.line._output_fault is None, what="the output working again")
    time.sleep(0.3)                                    # a few loop rounds
    assert True not in rec.calls_to("set_ready")[readies:], "READY never raised without a bundle"
    status = station.status()
    assert status.state == "fault" and "failed its probation" in status.reason
    station.trigger.fire()
    wait_until(lambda: len(rec.results) == 1, what="the part's answer")
    assert running.stop() == 0
    assert rec.results[0].verdict is Verdict.FAULT and "station not ready" in rec.results[0].error


def test_a_record_writable_again_while_no_bundle_is_loaded_does_not_raise_ready(small_bundle, images, write_station,
                                                                              start_station, tmp_path):
    log_path = tmp_path / "records" / "results.jsonl"
    rec = RecordingOutput()
    cfg = load_station(write_station(bundle=small_bundle, source=SCRIPTED, recovery=FAST_RECOVERY,
                                     trigger={"type": "software"},
                                     outputs=[{"type": "result_log", "path": str(log_path)}]))
    running = start_station(cfg, source=TriggeredCamera(images), outputs=[build_output(cfg.outputs[0]), rec])
    station = running.station
    wait_until(lambda: station.status().state == "ready", what="READY")
    log_path.unlink()
    log_path.mkdir()                                   # no record can be written
    station.trigger.fire()
    wait_until(lambda: station.line._record_fault is not None, what="the record fault")
    readies = withdrawn_with(station, rec, "the record")
    log_path.rmdir()                                   # the station's probe finds the log writable again
    wait_until(lambda: station.line._record_fault is None, what="the record writable again")
    time.sleep(0.3)
    assert True not in rec.calls_to("set_ready")[readies:], "READY never raised without a bundle"
    status = station.status()
    assert status.state == "fault" and "failed its probation" in status.reason
    assert running.stop() == 0


def test_a_reload_after_a_withdrawn_bundle_keeps_a_line_output_fault(small_bundle, images, write_station,
                                                                     start_station):
    """The reload set the fault to the camera's or the record's only: a still-broken output read as healthy, and
    the next part raised READY on it."""
    plc, rec = FlakyLineOutput(), RecordingOutput()
    cfg = load_station(write_station(bundle=small_bundle, source=SCRIPTED, trigger={"type": "software"},
                                     recovery=FAST_RECOVERY))
    running = start_station(cfg, source=TriggeredCamera(images), outputs=[plc, rec])
    station = running.station
    wait_until(lambda: station.status().state == "ready" and rec.ready, what="READY")
    plc.broken.set()
    wait_until(lambda: "output plc" in (station.fault_reason or ""), what="the output fault")
    readies = withdrawn_with(station, rec, "the output")
    station.request_reload()                           # SIGHUP: the station file's bundle, verified again
    wait_until(lambda: station.pipeline is not None and station.counters.reloads == 1, what="the reload")
    time.sleep(0.3)
    status = station.status()
    assert status.state == "fault" and "output plc: pins stuck" in status.reason, "the output is still broken"
    station.trigger.fire()
    wait_until(lambda: len(rec.results) == 1, what="the part's answer")
    time.sleep(0.3)
    assert True not in rec.calls_to("set_ready")[readies:], "READY never raised on a broken output"
    assert station.status().state == "fault"
    plc.broken.clear()                                 # the output works again: bundle and camera are there
    wait_until(lambda: station.status().state == "ready" and rec.ready, what="READY back")
    assert running.stop() == 0


def test_a_line_output_back_before_the_camera_ever_opened_does_not_raise_ready(small_bundle, images,
                                                                               write_station):
    """Start-up with a line output that did not start (a Modbus port still held): the output came back before the
    camera's first open and READY went up with no camera, for as long as that open took."""
    plc, rec = FlakyLineOutput(broken=True), RecordingOutput()
    camera = TriggeredCamera(images, open_errors=[SourceError("camera away")] * 3)
    cfg = load_station(write_station(bundle=small_bundle, source=SCRIPTED, trigger={"type": "software"},
                                     recovery=FAST_RECOVERY))
    station = Station(cfg, source=camera, outputs=[plc, rec])
    loaded, load = threading.Event(), station.line.load_hook

    def slow_load() -> bool:                           # a bundle that takes a while to load (a small board)
        loaded.wait(30)
        return load()

    station.line.load_hook = slow_load
    thread = threading.Thread(target=station.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: "output plc" in (station.fault_reason or ""), what="the output fault at start")
        plc.broken.clear()                             # back while the bundle loads
        loaded.set()
        wait_until(lambda: camera.open_calls >= 1 and "camera away" in (station.fault_reason or ""),
                   what="the camera's first open failing")
        assert True not in rec.calls_to("set_ready"), "READY never raised before the camera opened"
        wait_until(lambda: station.status().state == "ready" and rec.ready, what="READY once the camera opens")
    finally:
        station.request_stop()
        thread.join(30)


def test_a_reload_after_a_withdrawn_bundle_raises_ready_without_waiting_for_a_part(small_bundle, images,
                                                                                   write_station, start_station):
    """After a withdrawal the reload left READY down until the next part was inspected; a line triggered only over
    HTTP gets 503 while READY is down, so it never sent that part and stayed out of service."""
    rec = RecordingOutput()
    cfg = load_station(write_station(bundle=small_bundle, source=SCRIPTED, trigger={"type": "software"},
                                     recovery=FAST_RECOVERY))
    running = start_station(cfg, source=TriggeredCamera(images), outputs=[rec])
    station = running.station
    wait_until(lambda: station.status().state == "ready" and rec.ready, what="READY")
    readies = withdrawn_with(station, rec, "nothing else")
    assert station.status().state == "fault"
    station.request_reload()                           # SIGHUP: the station file's bundle, verified again
    wait_until(lambda: station.status().state == "ready" and rec.ready, what="READY back with no part inspected")
    assert True in rec.calls_to("set_ready")[readies:]
    assert rec.results == [], "no part was needed to bring READY back"
    station.trigger.fire()                             # and the line inspects again
    wait_until(lambda: len(rec.results) == 1, what="the part's answer")
    assert running.stop() == 0


def test_a_reload_after_a_withdrawn_bundle_does_not_raise_ready_with_the_watch_folder_gone(small_bundle, tmp_path,
                                                                                           write_station,
                                                                                           start_station):
    """While no bundle was loaded the line never probed its source: a watch folder removed then was not noticed,
    and the reload that ended it raised READY (and /healthz 'ready') on a line with nothing to read from."""
    folder = tmp_path / "watch"
    folder.mkdir()
    rec = RecordingOutput()
    cfg = load_station(write_station(bundle=small_bundle, source={"type": "folder", "path": str(folder),
                                                                  "mode": "watch"},
                                     trigger={"type": "software"}, recovery={**FAST_RECOVERY, "read_timeout_s": 0.5}))
    running = start_station(cfg, outputs=[rec])
    station = running.station
    wait_until(lambda: station.status().state == "ready" and rec.ready, what="READY")
    readies = withdrawn_with(station, rec, "nothing else")
    folder.rmdir()
    # The line without a bundle notices (no fixed sleep: a loaded CI machine runs fewer rounds in a given time).
    wait_until(lambda: (station.line._source_fault or "").startswith("source:"), what="the folder's loss seen")
    station.request_reload()                           # SIGHUP: the station file's bundle, verified again
    wait_until(lambda: station.pipeline is not None and station.counters.reloads == 1, what="the reload")
    time.sleep(0.3)
    assert True not in rec.calls_to("set_ready")[readies:], "READY never raised with the watch folder gone"
    status = station.status()
    assert status.state == "fault" and status.reason.startswith("source: folder source")
    folder.mkdir()
    wait_until(lambda: station.status().state == "ready" and rec.ready, what="READY once the folder is back")
    assert running.stop() == 0


class PluggedCamera:
    """An OpenCV capture of a USB camera at `node`: opens while the node is there, grabs new frames until read
    after an unplug (a real handle reports the loss only when it is used)."""

    def __init__(self, node) -> None:
        self.node = node

    def isOpened(self) -> bool:
        return self.node.exists()

    def set(self, prop, value) -> bool:
        return True

    def get(self, prop) -> float:
        return 0.0

    def grab(self) -> bool:
        return self.node.exists()

    def retrieve(self):
        return True, np.random.default_rng().integers(0, 256, (64, 64, 3), dtype=np.uint8)

    def read(self):
        return self.retrieve()

    def release(self) -> None:
        pass


def test_a_camera_unplugged_while_a_triggered_line_waits_drops_ready_before_any_trigger(small_bundle, write_station,
                                                                                       start_station):
    """Probe 101: READY stayed up on the outputs (and /healthz 'ready') for as long as nobody triggered after the
    USB camera was unplugged, as for a removed watch folder (probe 63); the line now notices while it waits, and
    comes back when the camera does."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        pytest.skip("no writable /dev/shm for a stand-in camera node")
    node = shm / f"edge-runtime-test-camera-{os.getpid()}"
    node.touch()
    try:
        rec = RecordingOutput()
        cfg = load_station(write_station(bundle=small_bundle, source={"type": "camera", "device": str(node)},
                                         trigger={"type": "software"}, recovery=FAST_RECOVERY))
        camera = CameraSource(cfg.source, capture_factory=lambda *a: PluggedCamera(node))
        running = start_station(cfg, source=camera, outputs=[rec])
        station = running.station
        wait_until(lambda: station.status().state == "ready" and rec.ready, what="READY")
        node.unlink()
        wait_until(lambda: station.status().state == "fault" and not rec.ready, timeout=5.0,
                   what="FAULT without a trigger")
        assert "the camera is gone" in (station.line._source_fault or "") or "no such device" in station.fault_reason
        node.touch()
        wait_until(lambda: station.status().state == "ready" and rec.ready, timeout=5.0, what="READY again")
        assert rec.results == [], "no part was triggered"
        assert running.stop() == 0
    finally:
        node.unlink(missing_ok=True)


class SlowToRaiseReady(RecordingOutput):
    """A line output whose READY write takes `delay_s` (a slow port): the loop is that late to its first frame."""

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s = delay_s

    def set_ready(self, ready: bool) -> None:
        if ready:
            time.sleep(self.delay_s)
        super().set_ready(ready)


def test_a_frame_held_in_the_capture_slot_past_its_deadline_is_fault_after_a_clock_step_back(
        small_bundle, images, write_station, start_station):
    """Probe 101: the deadline of a free-running frame ran from its wall-clock capture stamp only. A wall clock
    stepped back (NTP) while the frame waited in the capture slot dated it after now: a frame the loop took 0.6 s
    late, past its 200 ms deadline, was inspected and answered OK as if fresh. The capture thread's monotonic
    stamp bounds it."""
    stepped_back = Frame(frame_id=0, source="cam", encoded=images[0], captured_at=time.time() + 30.0)
    camera = ScriptedSource(steps=[stepped_back])
    camera.live = True                                 # a camera: read by a capture thread into its slot
    rec = SlowToRaiseReady(0.6)
    cfg = load_station(write_station(bundle=small_bundle, source=SCRIPTED, trigger={"type": "free_run"},
                                     inference={"deadline_ms": 200}, capture={"every_frame_is_a_part": True},
                                     recovery=FAST_RECOVERY))
    running = start_station(cfg, source=camera, outputs=[rec])
    assert rec.wait_for("publish", 1, timeout=30.0), "the frame is answered"
    assert running.stop() == 0
    (answer,) = rec.results
    assert answer.verdict is Verdict.FAULT and "deadline exceeded" in (answer.error or ""), answer
