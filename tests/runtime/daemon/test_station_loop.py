"""The daemon loop in-process on the synthetic bundle: replay, camera loss, bad bundle, reload, deadline, triggers."""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from edge_runtime.bundle import Bundle
from edge_runtime.config import load_station
from edge_runtime.daemon import FRAME_COUNTER_FILE, Station
from edge_runtime.outputs import GpioConfig, GpioLine, GpioOutput
from doubles import RecordingOutput
from doubles.recording_output import RecordingOutputConfig
from doubles import FakeGpioLines
from edge_runtime.records import Verdict
from edge_runtime.sources import SourceError
from doubles import ScriptedSource
from edge_runtime.triggers import SoftwareTrigger

SCRIPTED = {"type": "scripted"}
FAST_RECOVERY = {"backoff_initial_s": 0.05, "backoff_max_s": 0.2, "read_timeout_s": 0.2}


def wait_until(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def relabelled_copy(bundle: Path, dest: Path) -> Path:
    """A copy of `bundle` under another product name, hence another bundle id (the same model and bank)."""
    import yaml

    from edge_runtime.bundle import MANIFEST, content_id

    shutil.copytree(bundle, dest)
    m = yaml.safe_load((dest / MANIFEST).read_text())
    m["product"] = "newer"
    m["bundle_id"] = content_id(m)
    (dest / MANIFEST).write_text(yaml.safe_dump(m, sort_keys=False))
    return dest


def corrupt(bundle: Path) -> Path:
    """Flip one byte of the default variant's model: the sha256 check must refuse the bundle."""
    model = bundle / Bundle.load(bundle).variant().model_file
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    return model


@pytest.fixture
def bundle_copy(small_bundle, tmp_path) -> Path:
    dest = tmp_path / "bundle"
    shutil.copytree(small_bundle, dest)
    return dest


@pytest.fixture(scope="module")
def part_images(flange_test_folder) -> dict[str, bytes]:
    """Encoded PNGs of a few test parts, by copied file name."""
    folder, index = flange_test_folder
    names = sorted(index)
    good = [n for n in names if n.startswith("good_")][:2]
    bad = [n for n in names if not n.startswith("good_")][:2]
    return {n: (folder / n).read_bytes() for n in good + bad}


def test_replay_every_image_once_with_the_pipeline_verdict(small_bundle, synthetic_dataset, flange_test_folder,
                                                          write_station, tmp_path, read_log):
    from export.evaluate import evaluate

    folder, index = flange_test_folder
    log_path = tmp_path / "results.jsonl"
    cfg = load_station(write_station(bundle=small_bundle, source={"type": "folder", "path": str(folder)},
                                     outputs=[{"type": "result_log", "path": "results.jsonl"}]))
    assert Station(cfg).run() == 0  # replay ends: exit_when_exhausted

    records = read_log(log_path)
    names = [Path(r["source"]).name for r in records]
    assert sorted(names) == sorted(index), "every image exactly once"
    assert [r["frame_id"] for r in records] == list(range(len(records)))

    # The exporter's evaluation with the same engine and search is the reference for scores and verdicts.
    expected = {row["file"]: row["score"] for row in evaluate(small_bundle, synthetic_dataset, "onnx-int8", "hnsw")["images"]}
    for r in records:
        want = expected[str(index[Path(r["source"]).name][0])]
        assert r["score"] == pytest.approx(want, rel=1e-4)
        assert r["verdict"] == ("NG" if r["score"] >= r["threshold"] else "OK")
    assert {r["verdict"] for r in records} == {"OK", "NG"}


def test_restart_continues_frame_ids_from_log_and_state(small_bundle, part_images, write_station, tmp_path, read_log):
    path = write_station(bundle=small_bundle, source=SCRIPTED, state_dir="state",
                         outputs=[{"type": "result_log", "path": "results.jsonl"}])
    for _ in range(2):
        assert Station(load_station(path), source=ScriptedSource(steps=list(part_images.values()))).run() == 0
    ids = [r["frame_id"] for r in read_log(tmp_path / "results.jsonl")]
    assert ids == list(range(2 * len(part_images)))
    assert (tmp_path / "state" / FRAME_COUNTER_FILE).read_text().strip() == str(len(ids))

    # Without the log the saved counter alone keeps ids unique.
    (tmp_path / "results.jsonl").unlink()
    rec = RecordingOutput()
    Station(load_station(path), source=ScriptedSource(steps=list(part_images.values())[:1]), outputs=[rec]).run()
    assert [r.frame_id for r in rec.results] == [len(ids)]


def test_camera_loss_faults_then_inspection_resumes(small_bundle, part_images, write_station):
    images = list(part_images.values())
    source = ScriptedSource(steps=[images[0], images[1], SourceError("camera unplugged"), images[2], images[3]])
    rec = RecordingOutput()
    cfg = load_station(write_station(bundle=small_bundle, source=SCRIPTED, recovery=FAST_RECOVERY))
    assert Station(cfg, source=source, outputs=[rec]).run() == 0

    results = rec.results
    assert [r.frame_id for r in results] == [0, 1, 2, 3], "no result for the lost frame, no id consumed"
    assert all(r.verdict is not Verdict.FAULT for r in results)
    assert source.open_calls == 2, "the source was reopened after the loss"

    calls = [(m, a) for m, a in rec.calls if m in ("publish", "set_fault", "set_ready")]
    lost = next(i for i, (m, a) in enumerate(calls) if m == "set_fault" and a and "camera unplugged" in a)
    before, after = calls[:lost], calls[lost:]
    assert [a.frame_id for m, a in before if m == "publish"] == [0, 1]
    assert after[1] == ("set_ready", False), "READY drops with the fault"
    cleared = after.index(("set_fault", None))
    assert ("set_ready", True) in after[cleared:]
    assert [a.frame_id for m, a in after[:cleared] if m == "publish"] == [], "nothing published while faulted"
    assert rec.calls[-1] == ("close", None) and rec.ready is False


def test_bad_bundle_start_stays_in_fault(bundle_copy, flange_test_folder, write_station, start_station):
    corrupt(bundle_copy)
    rec = RecordingOutput()
    cfg = load_station(write_station(bundle=bundle_copy, source={"type": "folder", "path": str(flange_test_folder[0])},
                                     http={"port": 0}, recovery=FAST_RECOVERY))
    running = start_station(cfg, outputs=[rec])
    station = running.station
    wait_until(lambda: station.fault_reason and station.fault_reason.startswith("bundle"), what="bundle fault")
    wait_until(lambda: rec.heartbeats >= 5, what="loop iterations")  # the loop keeps going (and pinging) in FAULT

    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://127.0.0.1:{station.http_port}/healthz", timeout=5)
    assert err.value.code == 503
    health = json.loads(err.value.read())
    assert health["status"] == "fault" and "sha256" in health["reason"]

    assert True not in rec.calls_to("set_ready") and rec.results == []
    assert "sha256" in rec.fault
    assert running.stop() == 0
    assert True not in rec.calls_to("set_ready") and rec.results == []


def test_reload_of_a_repaired_bundle_clears_the_fault(small_bundle, bundle_copy, part_images, write_station,
                                                      start_station):
    model = corrupt(bundle_copy)
    rec = RecordingOutput()
    cfg = load_station(write_station(bundle=bundle_copy, source=SCRIPTED, recovery=FAST_RECOVERY))
    running = start_station(cfg, source=ScriptedSource(steps=list(part_images.values())), outputs=[rec])
    wait_until(lambda: running.station.fault_reason and "sha256" in running.station.fault_reason, what="bundle fault")
    shutil.copyfile(small_bundle / model.name, model)
    running.station.request_reload()
    assert running.join() == 0, "after the reload it inspects the scripted frames and ends"
    assert len(rec.results) == len(part_images) and running.station.counters.reloads == 1
    assert rec.calls_to("set_fault")[-1] is None


def test_a_reload_says_whether_the_new_bundle_has_a_position_prior(bundle_copy, part_images, write_station,
                                                                    start_station, caplog):
    """The load line says it; a SIGHUP can bring a bundle whose golden images give none (or the other way round)."""
    caplog.set_level(logging.INFO, logger="edge_runtime")
    rec = RecordingOutput()
    cfg = load_station(write_station(bundle=bundle_copy, source=SCRIPTED, recovery=FAST_RECOVERY))
    source = ScriptedSource(steps=list(part_images.values()), start_frame_id=0)
    source.cfg.loop = True
    running = start_station(cfg, source=source, outputs=[rec])
    wait_until(lambda: len(rec.results) >= 1, what="first results")
    running.station.request_reload()
    wait_until(lambda: running.station.counters.reloads == 1, what="the reload")
    assert running.stop() == 0
    loaded = [r.getMessage() for r in caplog.records if " loaded: " in r.getMessage()]
    reloaded = [r.getMessage() for r in caplog.records if r.getMessage().startswith("reloaded: ")]
    assert loaded and "position prior on" in loaded[0]
    assert reloaded and "position prior on" in reloaded[0] and "knn hnsw" in reloaded[0], reloaded


def test_reload_with_a_corrupted_bundle_keeps_the_old_one(bundle_copy, part_images, write_station, start_station):
    rec = RecordingOutput()
    cfg = load_station(write_station(bundle=bundle_copy, source=SCRIPTED, recovery=FAST_RECOVERY))
    source = ScriptedSource(steps=list(part_images.values()), start_frame_id=0)
    source.cfg.loop = True  # endless frames
    running = start_station(cfg, source=source, outputs=[rec])
    station = running.station
    wait_until(lambda: len(rec.results) >= 2, what="first results")
    old_id = station.pipeline.bundle.bundle_id
    faults_before = len(rec.calls_to("set_fault"))

    corrupt(bundle_copy)
    station.request_reload()
    wait_until(lambda: station.counters.reload_failures == 1, what="the reload to be refused")
    n = len(rec.results)
    wait_until(lambda: len(rec.results) >= n + 2, what="inspection after the refused reload")
    assert running.stop() == 0

    assert station.counters.reloads == 0
    assert {r.bundle_id for r in rec.results} == {old_id}
    assert all(r.verdict is not Verdict.FAULT for r in rec.results)
    assert len(rec.calls_to("set_fault")) == faults_before, "a refused reload is not a station fault"
    assert rec.calls_to("set_ready")[:-1][-1] is True, "READY stayed up until the stop"


def test_a_stop_during_a_reload_waits_for_the_load_before_the_outputs_close(bundle_copy, part_images, write_station,
                                                                           start_station, monkeypatch):
    """The interpreter tearing down while onnxruntime loads a bundle on another thread aborted the process
    (probe 43: SIGTERM 150 ms after SIGHUP, exit -6, the unit left failed): shutdown waits for the load."""
    from edge_runtime import bundle_loader

    loading, events = threading.Event(), []
    real_load = bundle_loader.load_pipeline

    def slow_load(*args, **kwargs):
        if threading.current_thread().name == "bundle-reload":
            loading.set()
            time.sleep(1.0)
            events.append("reload finished")
        return real_load(*args, **kwargs)

    monkeypatch.setattr(bundle_loader, "load_pipeline", slow_load)
    rec = RecordingOutput()
    cfg = load_station(write_station(bundle=bundle_copy, source=SCRIPTED, recovery=FAST_RECOVERY))
    source = ScriptedSource(steps=list(part_images.values()))
    source.cfg.loop = True
    close = rec.close
    rec.close = lambda: (events.append("outputs closed"), close())
    running = start_station(cfg, source=source, outputs=[rec])
    wait_until(lambda: len(rec.results) >= 1, what="first result")
    running.station.request_reload()
    assert loading.wait(30), "the reload started"
    assert running.stop() == 0
    assert events == ["reload finished", "outputs closed"]


def test_a_reload_begun_before_a_rollout_install_never_puts_the_older_bundle_back(small_bundle, part_images,
                                                                                  write_station, start_station,
                                                                                  tmp_path, monkeypatch):
    """SIGHUP's reload reads the bundle path when it starts; a signed rollout installs a newer bundle (and moves
    the path) while it runs: the reload's outcome is stale and must not be applied over the rollout's."""
    import dataclasses

    from edge_runtime import bundle_loader
    from edge_runtime.pipeline import Pipeline

    newer = relabelled_copy(small_bundle, tmp_path / "newer")
    new_id = Bundle.load(newer).bundle_id
    rec = RecordingOutput()
    cfg = load_station(write_station(bundle=small_bundle, source=SCRIPTED, recovery=FAST_RECOVERY))
    source = ScriptedSource(steps=list(part_images.values()), start_frame_id=0)
    source.cfg.loop = True
    running = start_station(cfg, source=source, outputs=[rec])
    station = running.station
    wait_until(lambda: len(rec.results) >= 2, what="first results")
    old_id = station.pipeline.bundle.bundle_id
    started, release, real = threading.Event(), threading.Event(), bundle_loader.load_pipeline

    def slow_load(c, *args, **kwargs):
        c = dataclasses.replace(c)           # the path as it is now: what a load reads first
        started.set()
        release.wait(30)                     # the reload is still verifying when the rollout installs
        return real(c, *args, **kwargs)
    monkeypatch.setattr(bundle_loader, "load_pipeline", slow_load)
    station.request_reload()
    assert started.wait(30)
    monkeypatch.setattr(bundle_loader, "load_pipeline", real)
    station.cfg.bundle = str(newer)          # what the rollout does before it installs
    station.line.install_pipeline(Pipeline(Bundle.load(newer), threads=1))
    wait_until(lambda: station.pipeline.bundle.bundle_id == new_id, what="the rollout's bundle")
    release.set()
    time.sleep(2.0)                          # the stale reload has finished by now (and a fresh one run)
    n = len(rec.results)
    wait_until(lambda: len(rec.results) >= n + 2, what="more parts")
    assert running.stop() == 0
    assert station.pipeline.bundle.bundle_id == new_id != old_id
    assert {r.bundle_id for r in rec.results[n:]} == {new_id}


def test_deadline_turns_late_verdicts_into_faults(small_bundle, part_images, write_station):
    rec = RecordingOutput()
    cfg = load_station(write_station(bundle=small_bundle, source=SCRIPTED, inference={"deadline_ms": 0.001}))
    Station(cfg, source=ScriptedSource(steps=list(part_images.values())), outputs=[rec]).run()
    assert len(rec.results) == len(part_images)
    for r in rec.results:
        assert r.verdict is Verdict.FAULT and r.error.startswith("deadline exceeded")


class TriggeredCamera(ScriptedSource):
    """ScriptedSource that records, like a camera would need to, when the daemon announced a trigger."""

    def __init__(self, steps):
        super().__init__(steps=steps)
        self.events: list[str] = []

    def notify_trigger(self, at_wall=None, at=None) -> None:
        self.events.append("trigger")

    def read(self, timeout):
        self.events.append("read")
        return super().read(timeout)


def test_software_trigger_drains_and_faults_parts_it_could_not_inspect(small_bundle, part_images, write_station,
                                                                       start_station):
    images = list(part_images.values())
    camera = TriggeredCamera([images[0], None, SourceError("camera gone"), images[1]])
    rec = RecordingOutput()
    cfg = load_station(write_station(bundle=small_bundle, source=SCRIPTED, trigger={"type": "software"},
                                     recovery=FAST_RECOVERY))
    running = start_station(cfg, source=camera, outputs=[rec])
    trigger = running.station.trigger
    assert isinstance(trigger, SoftwareTrigger)
    wait_until(lambda: rec.ready, what="READY")
    time.sleep(0.3)
    assert rec.results == [] and camera.read_calls == 0, "no capture without a trigger"
    for n in range(1, 5):
        wait_until(lambda: running.station.status().state == "ready", what="READY before the next part")
        trigger.fire()
        wait_until(lambda: len(rec.results) >= n, what=f"result {n}")
    assert running.stop() == 0

    results = rec.results
    assert [r.frame_id for r in results] == [0, 1, 2, 3], "every triggered part has its own id"
    assert results[0].verdict is not Verdict.FAULT and results[3].verdict is not Verdict.FAULT
    assert results[1].verdict is Verdict.FAULT and "no frame within" in results[1].error
    assert results[2].verdict is Verdict.FAULT and "camera gone" in results[2].error
    assert camera.events[:2] == ["trigger", "read"] and camera.events.count("trigger") == camera.events.count("read") == 4


def test_sigterm_drops_ready_at_once_and_a_trigger_after_it_is_answered_fault(small_bundle, part_images,
                                                                              write_station):
    """SIGTERM delivered to another thread while the loop (the main thread) waits for a trigger: Python would run
    the handler only when that wait ends (probe 42: READY up and POST /trigger answered 202 for up to
    read_timeout_s after SIGTERM, and the part accepted then never answered). The signal relay acts at once."""
    images = list(part_images.values())
    camera = TriggeredCamera([images[0], images[1]])
    rec = RecordingOutput()
    # The longest trigger wait a station file takes: without the relay the handler would run only after 8 s.
    cfg = load_station(write_station(bundle=small_bundle, source=SCRIPTED, trigger={"type": "software"},
                                     recovery={**FAST_RECOVERY, "read_timeout_s": 8.0}))
    station = Station(cfg, source=camera, outputs=[rec])
    trigger = station.trigger
    seen: dict[str, object] = {}

    def plc():
        try:
            wait_until(lambda: rec.ready, what="READY")
            trigger.fire()
            assert rec.wait_for("publish", 1, timeout=60)
            # The loop's next round has begun (its heartbeat comes after the stop check): it is in the trigger wait.
            wait_until(lambda: ("heartbeat", None) in rec.calls[[n for n, _ in rec.calls].index("publish"):],
                       what="the loop's next round")
            signal.pthread_kill(threading.get_ident(), signal.SIGTERM)   # not the main thread
            wait_until(lambda: not rec.ready, timeout=4, what="READY down after SIGTERM")
            status = station.status()
            seen["state"] = (status.state, status.reason)
            seen["at_stop"] = {"results": len(rec.results), "closed": rec.closed}
            trigger.fire()   # e.g. a serial TRG that was already on its way
        except BaseException as exc:   # noqa: BLE001 - reported by the main thread
            seen["error"] = exc
            station.request_stop()
            trigger.fire()

    controller = threading.Thread(target=plc)
    controller.start()
    assert station.run() == 0
    controller.join()
    assert "error" not in seen, seen.get("error")
    assert seen == {"state": ("not_ready", "stopping"), "at_stop": {"results": 1, "closed": False}}
    names = [name for name, _ in rec.calls]
    assert len(rec.results) == 2, "the trigger that came after SIGTERM was answered"
    assert rec.results[0].verdict is not Verdict.FAULT
    assert rec.results[1].verdict is Verdict.FAULT and "stopping" in rec.results[1].error, "not inspected: READY was down"
    assert names.index("close") > max(i for i, n in enumerate(names) if n == "publish"), "answered before close"
    assert not rec.ready


def test_sigterm_drives_gpio_lines_inactive_and_releases_them(small_bundle, part_images, write_station):
    """A real SIGTERM to this process while Station.run() owns the main thread, as under systemd."""
    lines = FakeGpioLines()
    gpio = GpioOutput(GpioConfig(ok=GpioLine(offset=1), ng=GpioLine(offset=2), ready=GpioLine(offset=3),
                                 error=GpioLine(offset=4), heartbeat=GpioLine(offset=5)), lines=lines)
    rec = RecordingOutput()
    source = ScriptedSource(steps=list(part_images.values()))
    source.cfg.loop = True
    station = Station(load_station(write_station(bundle=small_bundle, source=SCRIPTED)), source=source,
                      outputs=[gpio, rec])
    previous = signal.getsignal(signal.SIGTERM)

    def terminate_after_results():
        rec.wait_for("publish", 3, timeout=60)
        os.kill(os.getpid(), signal.SIGTERM)

    killer = threading.Thread(target=terminate_after_results)
    killer.start()
    assert station.run() == 0
    killer.join()

    assert signal.getsignal(signal.SIGTERM) is previous, "run() restores the signal handlers it replaced"
    assert len(rec.results) >= 3 and rec.calls[-1] == ("close", None)
    assert any(state[3] for state in lines.history), "READY was on while inspecting"
    assert lines.events[-1] == ("release",)
    assert lines.history[-1] == {1: False, 2: False, 3: False, 4: False, 5: False}, "every line inactive before release"
    # OK was asserted only while the last published part was OK.
    ok_parts = [r for r in rec.results if r.verdict is Verdict.OK]
    assert any(state[1] for state in lines.history) == bool(ok_parts)


def test_healthz_never_reads_no_fault_and_not_ready_while_the_line_comes_up(small_bundle, part_images_bytes,
                                                                           write_station):
    """/healthz runs on its own thread: while the line clears "starting" and raises READY (outputs are driven in
    between), it must read the state before or after, never "not_ready" in passing (a CI failure)."""
    seen: list[str] = []

    class Probe(RecordingOutput):
        station: Station | None = None

        def set_ready(self, ready: bool) -> None:
            if ready and self.station is not None:
                seen.append(self.station.status().state)   # what /healthz answers at this very moment
            super().set_ready(ready)

    probe = Probe()
    cfg = load_station(write_station(bundle=small_bundle, source=SCRIPTED, recovery=FAST_RECOVERY))
    station = Station(cfg, source=ScriptedSource(steps=part_images_bytes[:2]), outputs=[probe])
    probe.station = station
    assert station.run() == 0
    assert seen and "not_ready" not in seen, seen


def test_a_second_daemon_on_the_same_state_dir_refuses_to_start(small_bundle, part_images, write_station,
                                                                  start_station, tmp_path, capsys):
    """Two daemons on one state_dir would inspect each part twice into one log and share a frame counter."""
    from edge_runtime.cli import main as runtime_main

    path = write_station(bundle=small_bundle, source={"type": "folder", "path": str(tmp_path / "in"), "mode": "watch"},
                         state_dir=str(tmp_path / "state"))
    (tmp_path / "in").mkdir()
    running = start_station(path)
    wait_until(lambda: running.station.status().state == "ready", what="the first daemon")
    assert runtime_main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"state_dir {tmp_path / 'state'} is in use by another edge-runtime (pid {os.getpid()})" in err
    assert running.stop() == 0
    second = start_station(path)                      # the lock goes with the first daemon
    wait_until(lambda: second.station.status().state == "ready", what="a daemon after the first stopped")
    assert second.stop() == 0


def test_a_state_dir_deleted_while_running_is_locked_again_so_a_second_daemon_still_refuses(
        small_bundle, write_station, start_station, tmp_path, capsys):
    """An operator's cleanup deleted the state_dir (and its lock) of a running daemon: a second daemon then started
    on the same station and handed out frame ids the first had used. The running one takes its lock again."""
    import shutil

    from edge_runtime.cli import main as runtime_main

    (tmp_path / "in").mkdir()
    path = write_station(bundle=small_bundle, source={"type": "folder", "path": str(tmp_path / "in"), "mode": "watch"},
                         state_dir=str(tmp_path / "state"))
    running = start_station(path)
    wait_until(lambda: running.station.status().state == "ready", what="the first daemon")
    shutil.rmtree(tmp_path / "state")
    wait_until(lambda: (tmp_path / "state" / "edge-runtime.lock").exists(), what="the lock taken again")
    assert runtime_main(["run", "--config", str(path)]) == 2
    assert "is in use by another edge-runtime" in capsys.readouterr().err
    assert running.station.status().state == "ready"
    assert running.stop() == 0


def test_a_daemon_that_lost_its_state_dir_to_another_stops_with_a_failure(small_bundle, write_station, start_station,
                                                                          tmp_path):
    """The lock file was deleted and another daemon took a new one before this one could: this one stops with
    exit 1 (a failure for systemd's Restart=on-failure), never runs on beside it."""
    from edge_runtime.daemon import STATE_LOCK_FILE, lock_state_dir

    (tmp_path / "in").mkdir()
    path = write_station(bundle=small_bundle, source={"type": "folder", "path": str(tmp_path / "in"), "mode": "watch"},
                         state_dir=str(tmp_path / "state"))
    running = start_station(path)
    wait_until(lambda: running.station.status().state == "ready", what="the daemon")
    (tmp_path / "state" / STATE_LOCK_FILE).unlink()
    other = lock_state_dir(str(tmp_path / "state"))                   # the other daemon, first to the new lock
    try:
        running._thread.join(15)
        assert not running.alive and running.exit_code == 1
    finally:
        os.close(other)


def test_a_trigger_during_shutdown_is_answered_or_refused_never_dropped(small_bundle, part_images, write_station,
                                                                       start_station):
    """Probe 67: serial TRGs sent in the second a SIGTERM stop took (the loop ended, the outputs still closing) were
    queued for a loop that had ended: no answer, no record, not counted. One that comes before the trigger closes is
    answered FAULT while the outputs are open; one after it is refused (counted), like a fire beyond MAX_FOLDED."""
    camera = TriggeredCamera([list(part_images.values())[0]])
    seen: dict[str, object] = {}

    class ClosingOutput(RecordingOutput):
        def close(self) -> None:   # the outputs close: a TRG still arriving on the serial line
            seen["fire_at_close"] = trigger.fire()
            super().close()

    rec = ClosingOutput()
    cfg = load_station(write_station(bundle=small_bundle, source=SCRIPTED, trigger={"type": "software"},
                                     recovery=FAST_RECOVERY))
    running = start_station(cfg, source=camera, outputs=[rec])
    station = running.station
    trigger = station.trigger
    wait_until(lambda: rec.ready, what="READY")
    trigger.fire()
    assert rec.wait_for("publish", 1, timeout=60)
    line = station.line
    close_source = line._close_source

    def close_source_after_a_late_trigger(*args, **kwargs):
        seen["fire_after_loop"] = trigger.fire()   # the loop has ended; the trigger is still open
        return close_source(*args, **kwargs)

    line._close_source = close_source_after_a_late_trigger
    assert running.stop() == 0
    assert seen == {"fire_after_loop": True, "fire_at_close": False}
    results = rec.results
    assert len(results) == 2, "the trigger that came after the loop ended got its own answer"
    assert results[1].verdict is Verdict.FAULT and "stopping" in results[1].error
    assert results[1].frame_id == results[0].frame_id + 1
    names = [name for name, _ in rec.calls]
    assert names.index("close") > max(i for i, n in enumerate(names) if n == "publish"), "answered before close"
    assert trigger.refused == 1 and station.status().counters["trigger_refused"] == 1


def test_a_trigger_folded_during_start_up_is_never_answered_on_a_serial_line_past_its_deadline(
        small_bundle, part_images, write_station):
    """Probe 67: a PLC that sends TRG, waits deadline_ms for the next RES line and then rejects the part and goes on,
    kept sending TRGs while a restarted station loaded its bundle (its serial port already open). When the loop
    began, the folded triggers' overrun FAULTs were dated by the newest trigger, so the serial worker's deadline
    expiry let them out seconds late: the PLC read each as a later part's answer, and every answer after the
    restart was two parts off, OK included. Each folded trigger is now dated by its own arrival."""
    class SerialLike(RecordingOutput):   # on a worker with the deadline as expiry, like the serial output
        slow = True

    camera = TriggeredCamera([list(part_images.values())[0]])
    direct, serial = RecordingOutput(), SerialLike(RecordingOutputConfig(name="serial-like"))
    cfg = load_station(write_station(bundle=small_bundle, source=SCRIPTED,
                                     trigger={"type": "software", "max_age_ms": 60000.0}, recovery=FAST_RECOVERY))
    station = Station(cfg, source=camera, outputs=[direct, serial])
    deadline_s = cfg.inference.deadline_ms / 1000.0
    station.trigger.fire(at=time.monotonic() - deadline_s - 3.0)   # read while the bundle loaded; timed out since
    station.trigger.fire()                                          # the part in front of the camera now
    codes: list[int] = []
    runner = threading.Thread(target=lambda: codes.append(station.run()), daemon=True)
    runner.start()
    assert direct.wait_for("publish", 2, timeout=60)
    station.request_stop()
    runner.join(60)
    assert codes == [0]
    overrun, part = direct.results
    assert overrun.verdict is Verdict.FAULT and "overrun" in overrun.error, "on record"
    assert part.verdict is not Verdict.FAULT
    assert [r.frame_id for r in serial.results] == [part.frame_id], "the timed-out part's answer never went out late"
    assert station.status().counters["output_expired"] == 1


def test_the_last_verdict_is_reported_with_the_bundle_that_scored_it_not_the_one_switched_to_since(
        small_bundle, part_images, write_station, start_station, tmp_path):
    """Probe 76: after a switch (a rollout, a SIGHUP reload, a recipe) and before the next part, the MQTT state and
    /healthz paired the last part's verdict with the bundle now in service, which never scored it."""
    from edge_runtime.http_endpoint import health_document
    from edge_runtime.pipeline import Pipeline

    newer = relabelled_copy(small_bundle, tmp_path / "newer")
    new_id = Bundle.load(newer).bundle_id
    rec = RecordingOutput()
    cfg = load_station(write_station(bundle=small_bundle, source=SCRIPTED, trigger={"type": "software"},
                                     recovery=FAST_RECOVERY))
    running = start_station(cfg, source=TriggeredCamera([list(part_images.values())[0]]), outputs=[rec])
    station = running.station
    wait_until(lambda: rec.ready, what="READY")
    station.trigger.fire()
    wait_until(lambda: len(rec.results) == 1, what="the part")
    scored_by = rec.results[0].bundle_id
    station.line.install_pipeline(Pipeline(Bundle.load(newer), threads=1))   # what a rollout does
    wait_until(lambda: station.pipeline.bundle.bundle_id == new_id, what="the switch")
    state, health = station.line.plant_state(), health_document(station.status())
    assert running.stop() == 0
    assert state["bundle_id"] == health["bundle_id"] == new_id != scored_by
    assert state["last_verdict"] == health["last_verdict"] == rec.results[0].verdict.value
    assert state["last_bundle_id"] == health["last_bundle_id"] == scored_by
