"""`edge-runtime run` as a real process: sd_notify on a real socket, SIGTERM leaves a complete log, SIGHUP with a
corrupted bundle keeps inspecting with the old one."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from edge_runtime.bundle import Bundle

REPO = Path(__file__).resolve().parents[3]


def daemon_command(station: Path) -> list[str]:
    script = shutil.which("edge-runtime")
    prefix = [script] if script else [sys.executable, "-m", "edge_runtime.cli"]
    return prefix + ["run", "--config", str(station)]


class Notifications:
    """A real AF_UNIX datagram socket standing in for systemd's NOTIFY_SOCKET, read continuously like systemd does.

    (A datagram socket nobody reads fills after net.unix.max_dgram_qlen messages, and then a blocking sendto in
    the daemon would stall its loop.)"""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self._cond = threading.Condition()
        self._seen = 0  # messages already offered to wait_for()
        self._closed = False
        self._reader = threading.Thread(target=self._read, name="notify-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._closed:
            try:
                msg = self.sock.recv(4096).decode()
            except socket.timeout:
                continue
            except OSError:
                return
            with self._cond:
                self.messages.append(msg)
                self._cond.notify_all()

    def wait_for(self, predicate, timeout: float = 60.0) -> str:
        """The next message (after those already examined) that matches."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                while self._seen < len(self.messages):
                    msg = self.messages[self._seen]
                    self._seen += 1
                    if predicate(msg):
                        return msg
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"no matching notification; got {self.messages}"
                self._cond.wait(remaining)

    def close(self) -> None:
        self._closed = True
        self._reader.join(5)
        self.sock.close()


@pytest.fixture
def notifications(tmp_path):
    n = Notifications(tmp_path / "notify.sock")
    yield n
    n.close()


@pytest.fixture
def spawn(notifications):
    procs: list[subprocess.Popen] = []

    def start(station: Path, **env: str) -> subprocess.Popen:
        environment = dict(os.environ, NOTIFY_SOCKET=str(notifications.path), **env)
        proc = subprocess.Popen(daemon_command(station), cwd=REPO, env=environment, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()


def wait_for_lines(path: Path, count: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_bytes().count(b"\n") >= count):
        assert proc.poll() is None, f"daemon exited early:\n{proc.stdout.read().decode()}"
        assert time.monotonic() < deadline, f"{path} did not reach {count} lines"
        time.sleep(0.05)


def stop(proc: subprocess.Popen) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(30)
    return rc, proc.stdout.read().decode()


def metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def test_sigterm_flushes_a_complete_log_and_notifies_systemd(small_bundle, flange_test_folder, write_station,
                                                              tmp_path, notifications, spawn, read_log, free_port):
    port = free_port()
    station = write_station(bundle=small_bundle, http={"port": port},
                            source={"type": "folder", "path": str(flange_test_folder[0]), "loop": True},
                            outputs=[{"type": "result_log", "path": "results.jsonl"}])
    proc = spawn(station, WATCHDOG_USEC="400000")  # WatchdogSec=0.4: pings every 0.1 s
    notifications.wait_for(lambda m: m == "READY=1")
    try:
        health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5).read())
    except urllib.error.HTTPError as exc:  # 503 until the source is open: the body still says why
        assert exc.code == 503
        health = json.loads(exc.read())
    assert health["status"] in ("ready", "fault")  # the source may still be opening
    wait_for_lines(tmp_path / "results.jsonl", 5, proc)
    notifications.wait_for(lambda m: m == "WATCHDOG=1")
    rc, output = stop(proc)
    assert rc == 0, output
    notifications.wait_for(lambda m: m == "STOPPING=1", timeout=10)

    records = read_log(tmp_path / "results.jsonl")  # every line complete, valid JSON
    assert [r["frame_id"] for r in records] == list(range(len(records)))
    assert all(r["verdict"] in ("OK", "NG") for r in records)
    msgs = notifications.messages
    ready = msgs.index("READY=1")
    assert "WATCHDOG=1" not in msgs[:ready] and msgs[ready:].count("WATCHDOG=1") >= 1
    assert msgs[-1] == "STOPPING=1"
    assert f"stopped after {len(records)} frames" in output


def test_sighup_with_a_corrupted_bundle_keeps_the_old_one(small_bundle, flange_test_folder, write_station, tmp_path,
                                                          notifications, spawn, read_log, free_port):
    bundle = tmp_path / "bundle"
    shutil.copytree(small_bundle, bundle)
    port = free_port()
    station = write_station(bundle="bundle", http={"port": port},
                            source={"type": "folder", "path": str(flange_test_folder[0]), "loop": True},
                            outputs=[{"type": "result_log", "path": "results.jsonl"}])
    proc = spawn(station)
    notifications.wait_for(lambda m: m == "READY=1")
    log_path = tmp_path / "results.jsonl"
    wait_for_lines(log_path, 3, proc)

    model = bundle / Bundle.load(bundle).variant().model_file
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    proc.send_signal(signal.SIGHUP)
    notifications.wait_for(lambda m: m.startswith("RELOADING=1"))
    notifications.wait_for(lambda m: m == "READY=1")  # the reload is over (refused)
    n = log_path.read_bytes().count(b"\n")
    wait_for_lines(log_path, n + 3, proc)
    assert metric(port, "edge_reload_failures_total") == 1 and metric(port, "edge_reloads_total") == 0
    assert urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5).status == 200
    rc, output = stop(proc)
    assert rc == 0, output
    assert "reload refused, keeping bundle" in output and "sha256" in output

    records = read_log(log_path)
    assert len({r["bundle_id"] for r in records}) == 1
    assert all(r["verdict"] in ("OK", "NG") for r in records), "inspection went on with the old bundle"


def test_invalid_station_file_exits_2_naming_file_and_key(small_bundle, write_station, spawn):
    station = write_station(bundle=small_bundle, source={"type": "folder", "path": "imgs"},
                            inference={"precision": "int4"})
    proc = spawn(station)
    assert proc.wait(60) == 2
    output = proc.stdout.read().decode()
    assert f"{station}: inference.precision: expected one of 'int8', 'fp32', got 'int4'" in output


class PlcPty:
    """The PLC end of a pty the daemon's serial output writes RES lines to; survives the daemon being killed."""

    def __init__(self) -> None:
        import tty

        self.master, self._slave = os.openpty()   # keeping the slave open: no EIO while no daemon holds it
        tty.setraw(self.master)
        tty.setraw(self._slave)
        self.port = os.ttyname(self._slave)
        self._buffer = b""
        self.lines: list[str] = []

    def read_until(self, done, timeout: float = 60.0) -> None:
        import select

        deadline = time.monotonic() + timeout
        while not done(self.lines):
            assert time.monotonic() < deadline, f"PLC saw only {self.lines[-5:]}"
            ready, _, _ = select.select([self.master], [], [], 0.2)
            if ready:
                self._buffer += os.read(self.master, 65536)
                *complete, self._buffer = self._buffer.split(b"\r\n")
                self.lines += [c.decode("ascii", "replace") for c in complete]

    def res_ids(self) -> list[int]:
        return [int(line.split()[1]) for line in self.lines if line.startswith("RES ")]

    def close(self) -> None:
        os.close(self.master)
        os.close(self._slave)


def test_frame_ids_are_never_reused_across_kill_9_without_a_result_log(small_bundle, flange_test_folder,
                                                                         write_station, tmp_path, spawn):
    plc = PlcPty()
    try:
        # No result log and no state_dir in the file: the default state folder keeps the counter.
        station = write_station(source={"type": "folder", "path": str(flange_test_folder[0]), "loop": True},
                                bundle=small_bundle, recovery={"exit_when_exhausted": False},
                                outputs=[{"type": "serial", "port": plc.port, "heartbeat_interval_s": 60}])
        seen = 0
        for _ in range(3):
            proc = spawn(station)
            plc.read_until(lambda lines: sum(line.startswith("RES ") for line in lines) >= seen + 5)
            proc.kill()                             # kill -9: no clean shutdown, no counter save
            proc.wait(30)
            seen = len(plc.res_ids())
        ids = plc.res_ids()
        assert len(ids) == len(set(ids)), f"ids sent twice after a crash: {sorted(i for i in set(ids) if ids.count(i) > 1)}"
        assert (tmp_path / "state" / "next_frame_id").exists()
    finally:
        plc.close()


def test_sigusr1_reopens_the_result_log_after_logrotate(small_bundle, flange_test_folder, write_station, tmp_path,
                                                       notifications, spawn, read_log):
    station = write_station(bundle=small_bundle, source={"type": "folder", "path": str(flange_test_folder[0]),
                                                         "loop": True},
                            recovery={"exit_when_exhausted": False},
                            outputs=[{"type": "result_log", "path": "results.jsonl"}])
    proc = spawn(station)
    log_path = tmp_path / "results.jsonl"
    wait_for_lines(log_path, 3, proc)
    os.rename(log_path, tmp_path / "results.jsonl.1")         # logrotate: rename, create, then postrotate
    log_path.touch()
    proc.send_signal(signal.SIGUSR1)
    wait_for_lines(log_path, 3, proc)                         # the daemon lives on and writes the new file
    rc, output = stop(proc)
    assert rc == 0, output
    old, new = read_log(tmp_path / "results.jsonl.1"), read_log(log_path)
    ids = [r["frame_id"] for r in old + new]
    assert ids == list(range(len(ids))), "every record in exactly one of the two files, in order"
    assert "SIGUSR1: reopening log files" in output


def test_a_trigger_that_waited_through_a_freeze_of_the_process_is_fault_not_a_late_capture(
        small_bundle, flange_test_folder, write_station, notifications, spawn, read_log, free_port):
    """SIGSTOP (a cgroup freeze, a VM pause, swap): a POST /trigger sent meanwhile waits in the kernel and is read
    on SIGCONT. Dated when read, it passed max_age and the deadline and the part then in front of the camera was
    answered OK seconds late (probe 35); it is as old as the freeze, so FAULT (expired)."""
    port = free_port()
    station = write_station(bundle=small_bundle, http={"port": port, "allow_trigger": True},
                            trigger={"type": "software", "max_age_ms": 250},
                            source={"type": "paced", "path": str(flange_test_folder[0]), "fps": 30},
                            outputs=[{"type": "result_log", "path": "results.jsonl"}])
    log_path = station.parent / "results.jsonl"
    proc = spawn(station)
    notifications.wait_for(lambda m: m == "READY=1")
    deadline = time.monotonic() + 60
    while True:   # inspecting (the source open): a trigger now gets a verdict
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
            break
        except urllib.error.HTTPError:
            assert time.monotonic() < deadline, "the station never became ready"
            time.sleep(0.1)
    req = urllib.request.Request(f"http://127.0.0.1:{port}/trigger", method="POST", data=b"")
    assert urllib.request.urlopen(req, timeout=5).status == 202
    wait_for_lines(log_path, 1, proc)
    assert read_log(log_path)[0]["verdict"] != "FAULT", "a fresh trigger is inspected"

    proc.send_signal(signal.SIGSTOP)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:   # the kernel accepts it
            conn.sendall(b"POST /trigger HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n")
            time.sleep(1.5)
            proc.send_signal(signal.SIGCONT)
            conn.settimeout(10)
            assert b" 202 " in conn.recv(4096).split(b"\r\n", 1)[0] + b" "
    finally:
        proc.send_signal(signal.SIGCONT)
    wait_for_lines(log_path, 2, proc)
    second = read_log(log_path)[1]
    assert second["verdict"] == "FAULT" and "trigger expired" in second["error"], second
    rc, out = stop(proc)
    assert rc == 0, out
    assert "did not run for" in out
