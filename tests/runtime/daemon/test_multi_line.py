"""Several cameras in one daemon: `lines:` in the station file, each line with its own source, bundle and outputs;
threads shared by rule; one HTTP endpoint labels every metric with its line; a single-line file is unchanged."""
from __future__ import annotations

import json
import re
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from edge_runtime.config import load_station
from edge_runtime.daemon import Station
from edge_runtime.schema import ConfigError


def two_line_station(write_station, small_bundle, folder, tmp_path, **more):
    other = tmp_path / "bundle_b"
    shutil.copytree(small_bundle, other)
    return write_station(
        bundle=small_bundle, inference={"threads": 2}, **more,
        lines=[{"name": "left", "source": {"type": "folder", "path": str(folder)}},
               {"name": "right", "bundle": str(other), "threads": 2,
                "source": {"type": "paced", "path": str(folder), "fps": 50, "frames": 10},
                "outputs": [{"type": "result_log", "path": "right.jsonl"}]}])


def test_two_lines_each_inspect_their_own_source_into_their_own_log(small_bundle, flange_test_folder, write_station,
                                                                     tmp_path, read_log):
    folder, index = flange_test_folder
    cfg = load_station(two_line_station(write_station, small_bundle, folder, tmp_path))
    left, right = cfg.lines
    assert left.outputs[0].path == str(tmp_path / "results-left.jsonl"), "a line's default log is its own"
    station = Station(cfg)
    assert [ln.name for ln in station.lines] == ["left", "right"]
    # inference.threads is the budget: 2 // 2 lines = 1 each, unless the line sets its own.
    assert [ln.cfg.inference.threads for ln in station.lines] == [1, 2]
    assert station.lines[0].cfg.state_dir != station.lines[1].cfg.state_dir
    assert station.run() == 0                       # both replays end: the daemon ends
    left_log, right_log = read_log(tmp_path / "results-left.jsonl"), read_log(tmp_path / "right.jsonl")
    assert len(left_log) == len(index)
    assert 0 < len(right_log) <= 10 and len(right_log) + station.lines[1].dropped_frames == 10
    assert {r["source"] for r in left_log} <= {str(folder / n) for n in index}
    # Frame ids are per line, never reused within one.
    for log in (left_log, right_log):
        ids = [r["frame_id"] for r in log]
        assert ids == sorted(set(ids))


def test_one_endpoint_labels_every_line(small_bundle, flange_test_folder, write_station, tmp_path, free_port,
                                        start_station):
    folder, _ = flange_test_folder
    port = free_port()
    path = write_station(
        bundle=small_bundle, http={"port": port, "allow_trigger": True},
        lines=[{"name": "a", "source": {"type": "paced", "path": str(folder), "fps": 20}},
               {"name": "b", "source": {"type": "paced", "path": str(folder), "fps": 20},
                "trigger": {"type": "software"}}])
    running = start_station(path)
    station = running.station
    deadline = time.monotonic() + 60
    while station.lines[0].counters.frames < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}"
    req = urllib.request.Request(f"{base}/trigger/b", method="POST")
    assert json.loads(urllib.request.urlopen(req, timeout=5).read()) == {"triggered": True, "line": "b"}
    while station.lines[1].counters.frames < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(urllib.request.Request(f"{base}/trigger/a", method="POST"), timeout=5)
    assert err.value.code == 409                   # line a runs free: no software trigger to fire
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(urllib.request.Request(f"{base}/trigger/zz", method="POST"), timeout=5)
    assert err.value.code == 404
    metrics = urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode()
    health = json.loads(urllib.request.urlopen(f"{base}/healthz", timeout=5).read())
    running.stop()
    frames = {m.group(1): int(m.group(2)) for m in re.finditer(r'^edge_frames_total\{line="(\w+)"\} (\d+)$', metrics, re.M)}
    assert set(frames) == {"a", "b"} and frames["a"] >= 2 and frames["b"] == 1
    assert metrics.count("# TYPE edge_frames_total counter") == 1, "one family, samples of both lines"
    assert re.search(r'^edge_dropped_frames_total\{line="a"\} \d+$', metrics, re.M)
    assert re.search(r'^edge_ready\{line="b"\} 1$', metrics, re.M)
    assert health["status"] == "ready" and set(health["lines"]) == {"a", "b"}


def test_lines_errors_name_the_key(write_station, small_bundle, tmp_path):
    with pytest.raises(ConfigError, match=r"lines: two lines are named 'a'"):
        load_station(write_station(bundle=small_bundle, lines=[{"name": "a", "source": {"type": "scripted"}}, {"name": "a", "source": {"type": "scripted"}}]))
    with pytest.raises(ConfigError, match=r"lines\[0\]\.name: expected 1-32 letters"):
        load_station(write_station(bundle=small_bundle, lines=[{"name": "a b", "source": {"type": "scripted"}}]))
    # Probe 113: 'a\n' passed ($ matches before a final newline): results-a\n.jsonl, a newline in every topic.
    with pytest.raises(ConfigError, match=r"lines\[0\]\.name: expected 1-32 letters"):
        load_station(write_station(bundle=small_bundle, lines=[{"name": "a\n", "source": {"type": "scripted"}}]))
    with pytest.raises(ConfigError, match=r"lines\[1\]\.bundle: required when the station names no bundle"):
        load_station(write_station(lines=[{"name": "a", "source": {"type": "scripted"}, "bundle": str(small_bundle)},
                                          {"name": "b", "source": {"type": "scripted"}}]))
    with pytest.raises(ConfigError, match=r"lines: two lines write the same result log"):
        load_station(write_station(bundle=small_bundle, lines=[
            {"name": "a", "source": {"type": "scripted"}, "outputs": [{"type": "result_log", "path": "x.jsonl"}]},
            {"name": "b", "source": {"type": "scripted"}, "outputs": [{"type": "result_log", "path": "x.jsonl"}]}]))
    with pytest.raises(ConfigError, match=r"source: required key is missing"):
        load_station(write_station(bundle=small_bundle))


@pytest.mark.parametrize("roi, why", [([-1, 0, 10, 10], "x, y >= 0"), ([0, 0, 0, 10], "w, h > 0"),
                                      ([0, 0, 10, -5], "w, h > 0"), ([0, 0, 10.5, 10], "expected an integer"),
                                      ([0, 0, 10], "expected 4 items")])
def test_a_line_roi_is_range_checked_like_the_stations(write_station, small_bundle, roi, why):
    """A line's roi overrides the station's and must pass the same check, named lines[i].roi."""
    with pytest.raises(ConfigError, match=rf"lines\[1\]\.roi(\[\d\])?: .*{re.escape(why)}"):
        load_station(write_station(bundle=small_bundle, lines=[
            {"name": "a", "source": {"type": "scripted"}, "roi": [0, 0, 10, 10]},
            {"name": "b", "source": {"type": "scripted"}, "roi": roi}]))


def test_a_station_file_with_more_lines_than_a_daemon_runs_is_refused_at_once(write_station):
    """Probe 100: 21,000 one-line entries kept `validate` busy for minutes (pairwise checks, then a bundle load each)."""
    from edge_runtime.lines_config import MAX_LINES

    many = [{"name": f"l{i}", "source": {"type": "scripted"}} for i in range(5000)]
    with pytest.raises(ConfigError, match=rf"lines: 5000 lines, at most {MAX_LINES} run in one daemon"):
        load_station(write_station(bundle="bundle", lines=many))
    load_station(write_station(bundle="bundle", lines=many[:MAX_LINES]))   # the cap itself is a valid station


def test_one_serial_port_serves_one_output(write_station, tmp_path):
    """Probe 60: two lines on one serial port validated and ran: the PLC read one line's RDY 1 after the faulted
    line's RDY 0, two answers 'RES 0 OK' and 'RES 0 FAULT', and a TRG meant for one line was served by the other."""
    import os

    by_id = tmp_path / "usb-FTDI-if00-port0"
    os.symlink("/dev/ttyUSB7", by_id)      # a /dev/serial/by-id name and the device it names are one port
    for second in ("/dev/ttyUSB7", str(by_id)):
        with pytest.raises(ConfigError, match=r"lines\[1\]\.outputs\[1\]\.port: serial port .* is already used by "
                                              r"lines\[0\]\.outputs\[1\]"):
            load_station(write_station(bundle="bundle", lines=[
                {"name": "a", "source": {"type": "scripted"},
                 "outputs": [{"type": "result_log", "path": "a.jsonl"}, {"type": "serial", "port": "/dev/ttyUSB7"}]},
                {"name": "b", "source": {"type": "scripted"},
                 "outputs": [{"type": "result_log", "path": "b.jsonl"}, {"type": "serial", "port": second}]}]))
    with pytest.raises(ConfigError, match=r"outputs\[1\]\.port: serial port /dev/ttyUSB7 is already used by outputs\[0\]"):
        load_station(write_station(bundle="bundle", source={"type": "scripted"}, outputs=[
            {"type": "serial", "port": "/dev/ttyUSB7"}, {"type": "serial", "port": "/dev/ttyUSB7", "baudrate": 9600}]))
    load_station(write_station(bundle="bundle", lines=[        # distinct ports stay fine
        {"name": "a", "source": {"type": "scripted"}, "outputs": [{"type": "serial", "port": "/dev/ttyUSB7"}]},
        {"name": "b", "source": {"type": "scripted"}, "outputs": [{"type": "serial", "port": "/dev/ttyUSB8"}]}]))


def test_two_spellings_of_one_result_log_are_refused(write_station, tmp_path):
    """Probe 60: validate compared result log paths as written: `x.jsonl` and `./x.jsonl`, or a line naming another
    line's default results-<name>.jsonl, passed, and both lines wrote one file with colliding frame ids."""
    import os

    def scripted():   # a new mapping each time: yaml.safe_dump writes a shared one as an anchor, refused
        return {"type": "scripted"}

    cases = [
        [{"name": "a", "source": scripted(), "outputs": [{"type": "result_log", "path": "x.jsonl"}]},
         {"name": "b", "source": scripted(), "outputs": [{"type": "result_log", "path": "./x.jsonl"}]}],
        [{"name": "a", "source": scripted()},
         {"name": "b", "source": scripted(), "outputs": [{"type": "result_log", "path": "results-a.jsonl"}]}],
        [{"name": "a", "source": scripted(), "outputs": [{"type": "result_log", "path": "sub/../x.jsonl"}]},
         {"name": "b", "source": scripted(), "outputs": [{"type": "result_log", "path": "x.jsonl"}]}],
    ]
    os.symlink(tmp_path, tmp_path / "link")
    cases.append([{"name": "a", "source": scripted(), "outputs": [{"type": "result_log", "path": "x.jsonl"}]},
                  {"name": "b", "source": scripted(), "outputs": [{"type": "result_log", "path": "link/x.jsonl"}]}])
    for lines in cases:
        with pytest.raises(ConfigError, match=r"lines\[1\]\.outputs\[0\]\.path: result log .* is the file "
                                              r"lines\[0\]\.outputs\[0\] already writes"):
            load_station(write_station(bundle="bundle", lines=lines))
    with pytest.raises(ConfigError, match=r"outputs\[1\]\.path: result log .* already writes"):
        load_station(write_station(bundle="bundle", source=scripted(), outputs=[
            {"type": "result_log", "path": "x.jsonl"}, {"type": "result_log", "path": "./x.jsonl", "fsync": "never"}]))


def test_an_ng_image_folder_that_a_source_reads_is_refused(write_station, tmp_path):
    """Probe 113: ng_images dir = the watch folder validated; the station read its own NG frames and overlays back
    as new parts (one bad bottle became 1,347 NG and FAULT records in 20 s)."""
    (tmp_path / "in").mkdir()
    with pytest.raises(ConfigError, match=r"outputs\[1\]\.dir: NG image folder .* is the folder source\.path reads"):
        load_station(write_station(bundle="bundle", source={"type": "folder", "path": "in", "mode": "watch"},
                                   outputs=[{"type": "result_log", "path": "r.jsonl"},
                                            {"type": "ng_images", "dir": "./in/"}]))
    # With lines: another line's folder, spelt another way, is refused too.
    with pytest.raises(ConfigError, match=r"lines\[1\]\.outputs\[1\]\.dir: NG image folder .* is the folder "
                                          r"lines\[0\]\.source\.path reads"):
        load_station(write_station(bundle="bundle", lines=[
            {"name": "a", "source": {"type": "folder", "path": "in", "mode": "watch"}},
            {"name": "b", "source": {"type": "scripted"},
             "outputs": [{"type": "result_log", "path": "b.jsonl"}, {"type": "ng_images", "dir": "sub/../in"}]}]))
    load_station(write_station(bundle="bundle", source={"type": "folder", "path": "in", "mode": "watch"},
                               outputs=[{"type": "result_log", "path": "r.jsonl"},
                                        {"type": "ng_images", "dir": "in/ng"}]))   # a sub-folder is never read


def test_one_ng_image_folder_for_two_stores_is_refused(write_station, tmp_path):
    """Probe 113: two lines naming one ng_images dir validated; their frame ids run in step, and two IP cameras'
    streams ending in the same path (.../Channels/101) gave one name for both lines' part 7 in one millisecond:
    the second line's image overwrote the first's, and each store bounded only its own files."""
    with pytest.raises(ConfigError, match=r"lines\[1\]\.outputs\[1\]\.dir: NG image folder .* is the folder "
                                          r"lines\[0\]\.outputs\[1\] already writes"):
        load_station(write_station(bundle="bundle", lines=[
            {"name": "a", "source": {"type": "scripted"},
             "outputs": [{"type": "result_log", "path": "a.jsonl"}, {"type": "ng_images", "dir": "ng"}]},
            {"name": "b", "source": {"type": "scripted"},
             "outputs": [{"type": "result_log", "path": "b.jsonl"}, {"type": "ng_images", "dir": "./ng"}]}]))
    load_station(write_station(bundle="bundle", lines=[
        {"name": "a", "source": {"type": "scripted"},
         "outputs": [{"type": "result_log", "path": "a.jsonl"}, {"type": "ng_images", "dir": "ng/a"}]},
        {"name": "b", "source": {"type": "scripted"},
         "outputs": [{"type": "result_log", "path": "b.jsonl"}, {"type": "ng_images", "dir": "ng/b"}]}]))


def test_a_line_whose_replay_ends_stops_while_the_others_go_on(small_bundle, flange_test_folder, write_station,
                                                              tmp_path, free_port, start_station, read_log,
                                                              wait_until):
    """Probe 106: line a's replay ended (exit_when_exhausted) while line b went on; line a stayed 'ready' on
    /healthz and POST /trigger/a answered 202 for parts its ended loop never answered nor recorded."""
    folder, index = flange_test_folder
    replay = tmp_path / "replay"
    replay.mkdir()
    for name in sorted(index)[:2]:
        shutil.copyfile(folder / name, replay / name)
    (tmp_path / "watch").mkdir()
    port = free_port()
    running = start_station(write_station(
        bundle=small_bundle, http={"port": port, "allow_trigger": True}, trigger={"type": "software"},
        state_dir=str(tmp_path / "state"),
        lines=[{"name": "a", "source": {"type": "folder", "path": str(replay)}},
               {"name": "b", "source": {"type": "folder", "mode": "watch", "path": str(tmp_path / "watch")}}]))
    station = running.station
    a, b = station.lines
    wait_until(lambda: a.state.state.value == "ready" and b.state.state.value == "ready", 60, "both lines ready")
    base = f"http://127.0.0.1:{port}"

    def trigger() -> int:
        try:
            return urllib.request.urlopen(urllib.request.Request(f"{base}/trigger/a", method="POST"), timeout=5).status
        except urllib.error.HTTPError as exc:
            return exc.code

    accepted = 0
    for n in range(3):   # two images, then a trigger the replay has no frame for (FAULT): the source is exhausted
        assert trigger() == 202
        accepted += 1
        wait_until(lambda: a.counters.frames == accepted, 60, f"part {accepted} answered")
    wait_until(lambda: a.stopping, 30, "line a stopped after its replay ended")
    assert trigger() == 503, "a line that no longer inspects accepts no part"
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{base}/healthz", timeout=5)
    health = json.loads(err.value.read())
    assert err.value.code == 503 and health["lines"]["a"]["status"] != "ready"
    assert health["lines"]["b"]["status"] == "ready" and not b.stopping, "the other line goes on"
    time.sleep(a._loop_stall_after_s() + 0.5)   # an ended loop is no stalled one
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{base}/healthz", timeout=5)
    health = json.loads(err.value.read())
    assert health["lines"]["a"]["status"] == "not_ready" and health["lines"]["a"]["reason"] == "stopping"
    assert running.stop() == 0
    records = read_log(tmp_path / "results-a.jsonl")
    assert len(records) == accepted and [r["verdict"] for r in records][-1] == "FAULT"


def _notifications(sock, into: list[str]) -> list[str]:
    """Every datagram waiting on the notify socket, appended to `into` (returned)."""
    sock.setblocking(False)
    while True:
        try:
            into.append(sock.recv(65536).decode())
        except BlockingIOError:
            return into


def test_systemd_hears_the_whole_station_not_the_last_line_that_spoke(small_bundle, write_station, tmp_path,
                                                                      start_station, notify_socket, monkeypatch,
                                                                      wait_until):
    """Probe 106: each line sent its own STATUS= and RELOADING=1 / READY=1. With line b's bundle refused, `systemctl
    status` said 'line a: inspecting' (line a's start-up cleared after b's fault); after SIGHUP the first line's
    reload done ended the unit's reloading while the other line still loaded."""
    from edge_runtime import bundle_loader
    from edge_runtime.bundle import Bundle

    broken = tmp_path / "bundle_b"
    shutil.copytree(small_bundle, broken)
    model = broken / Bundle.load(broken).variant().model_file
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    for name in ("wa", "wb"):
        (tmp_path / name).mkdir()
    running = start_station(write_station(
        bundle=small_bundle, trigger={"type": "software"}, state_dir=str(tmp_path / "state"),
        lines=[{"name": "a", "source": {"type": "folder", "mode": "watch", "path": str(tmp_path / "wa")}},
               {"name": "b", "bundle": str(broken), "source": {"type": "folder", "mode": "watch",
                                                                "path": str(tmp_path / "wb")}}]))
    a, b = running.station.lines
    seen: list[str] = []
    wait_until(lambda: a.state.state.value == "ready" and b.fault_reason is not None
               and "READY=1" in _notifications(notify_socket, seen), 60, "READY=1, a ready, b in FAULT")
    statuses = [m for m in _notifications(notify_socket, seen) if m.startswith("STATUS=")]
    assert statuses and statuses[-1].startswith("STATUS=line b: fault: bundle"), statuses

    # SIGHUP with b repaired: one reload for the unit, over when both lines have reloaded (b's load made slow).
    model.write_bytes((Path(small_bundle) / model.name).read_bytes())
    real = bundle_loader.load_pipeline

    def slow_for_b(cfg, *args, **kwargs):
        if cfg.bundle == str(broken):
            time.sleep(1.5)
        return real(cfg, *args, **kwargs)

    monkeypatch.setattr(bundle_loader, "load_pipeline", slow_for_b)
    seen.clear()
    running.station.request_reload()
    wait_until(lambda: "READY=1" in _notifications(notify_socket, seen), 60, "READY=1 after the reload")
    assert a.counters.reloads == 1 and b.counters.reloads == 1, \
        "READY=1 (the reload is over) only once every line's reload has ended"
    assert sum(m.startswith("RELOADING=1") for m in seen) == 1, seen
    wait_until(lambda: b.state.state.value == "ready", 30, "b ready on its repaired bundle")
    statuses = [m for m in _notifications(notify_socket, seen) if m.startswith("STATUS=")]
    assert statuses[-1] == "STATUS=inspecting", statuses
    assert running.stop() == 0


def test_a_reload_refused_on_one_line_names_the_line(small_bundle, write_station, tmp_path, start_station,
                                                     wait_until, caplog):
    """Probe 106: after SIGHUP the journal said 'reload refused, keeping bundle X' and 'reloaded: bundle Y' without a
    line: with two lines (on one bundle folder, or two), nobody could tell which line was left on which bundle."""
    from edge_runtime.bundle import Bundle

    other = tmp_path / "bundle_b"
    shutil.copytree(small_bundle, other)
    for name in ("wa", "wb"):
        (tmp_path / name).mkdir()
    running = start_station(write_station(
        bundle=small_bundle, trigger={"type": "software"}, state_dir=str(tmp_path / "state"),
        lines=[{"name": "a", "source": {"type": "folder", "mode": "watch", "path": str(tmp_path / "wa")}},
               {"name": "b", "bundle": str(other), "source": {"type": "folder", "mode": "watch",
                                                               "path": str(tmp_path / "wb")}}]))
    a, b = running.station.lines
    wait_until(lambda: a.state.state.value == "ready" and b.state.state.value == "ready", 60, "both lines ready")
    model = other / Bundle.load(other).variant().model_file
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    with caplog.at_level("INFO", logger="edge_runtime.daemon"):
        running.station.request_reload()
        wait_until(lambda: a.counters.reloads == 1 and b.counters.reload_failures == 1, 60, "both reloads over")
    assert running.stop() == 0
    text = caplog.text
    assert "line b: reload refused, keeping bundle" in text and "line a: reloaded: bundle" in text
    assert "line a: SIGHUP: reloading bundle" in text and "line b: SIGHUP: reloading bundle" in text
