"""The daemon driving real line protocols: serial RES lines over a pty, Modbus TCP to a pymodbus client, and
sd_notify datagrams on a real AF_UNIX socket."""
from __future__ import annotations

import os
import select
import time
import tty

import pytest
from pymodbus.client import ModbusTcpClient

from edge_runtime.config import load_station
from edge_runtime.outputs import build_output
from doubles import RecordingOutput
from edge_runtime.records import Verdict
from doubles import ScriptedSource

SCRIPTED = {"type": "scripted"}
UNIT = 1


@pytest.fixture(scope="module")
def part_images(flange_test_folder) -> list[bytes]:
    folder, index = flange_test_folder
    names = sorted(index)
    return [(folder / n).read_bytes() for n in [n for n in names if n.startswith("good_")][:2] + names[:2]]


def looping(images: list[bytes]) -> ScriptedSource:
    source = ScriptedSource(steps=images)
    source.cfg.loop = True
    return source


def read_pty_until(master: int, done, timeout: float = 60.0) -> list[str]:
    """CR LF lines from the pty master until done(lines) or the writer closes and the buffer is empty."""
    buffer, lines = b"", []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not done(lines):
        ready, _, _ = select.select([master], [], [], 0.2)
        if not ready:
            continue
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the slave side is closed and everything was read
            break
        buffer += chunk
        *complete, buffer = buffer.split(b"\r\n")
        lines += [c.decode("ascii") for c in complete]
    return lines


def test_serial_res_lines_match_the_results(small_bundle, part_images, write_station, start_station):
    master, slave = os.openpty()
    tty.setraw(master)
    try:
        port = os.ttyname(slave)
        rec = RecordingOutput()
        cfg = load_station(write_station(bundle=small_bundle, source=SCRIPTED,
                                         outputs=[{"type": "serial", "port": port, "heartbeat_interval_s": 0.05}]))
        running = start_station(cfg, source=ScriptedSource(steps=part_images),
                                outputs=[build_output(o) for o in cfg.outputs] + [rec])
        n = len(part_images)
        lines = read_pty_until(master, lambda ls: sum(l.startswith("RES ") for l in ls) == n and ls[-1] == "RDY 0")
        assert running.join() == 0
    finally:
        os.close(master)
        os.close(slave)

    res = [line.split(" ") for line in lines if line.startswith("RES ")]
    assert [int(r[1]) for r in res] == list(range(len(part_images)))
    for fields, result in zip(res, rec.results):
        assert fields[2] == result.verdict.value and result.verdict is not Verdict.FAULT
        assert fields[3] == f"{result.score:.4f}" and fields[4] == f"{result.normalized_score:.3f}"
    first_res = next(i for i, line in enumerate(lines) if line.startswith("RES "))
    assert "RDY 1" in lines[:first_res], "READY is announced before the first result"
    assert any(line.startswith("HB ") for line in lines), "heartbeats come from the loop"
    assert lines[-1] == "RDY 0", "the station says it stopped"


def test_modbus_client_reads_the_station_state(small_bundle, part_images, write_station, start_station, free_port):
    port = free_port()
    rec = RecordingOutput()
    cfg = load_station(write_station(bundle=small_bundle, source=SCRIPTED,
                                     outputs=[{"type": "modbus", "host": "127.0.0.1", "port": port, "unit_id": UNIT}]))
    running = start_station(cfg, source=looping(part_images), outputs=[build_output(o) for o in cfg.outputs] + [rec])
    client = ModbusTcpClient("127.0.0.1", port=port, timeout=3, retries=0)
    try:
        deadline = time.monotonic() + 30
        while not client.connect():
            assert time.monotonic() < deadline, "modbus server did not come up"
            time.sleep(0.1)
        while len(rec.results) < 3:
            assert time.monotonic() < deadline, "no results"
            time.sleep(0.05)
        heartbeats = []
        frames = []
        for _ in range(3):
            regs = client.read_holding_registers(0, count=7, device_id=UNIT)
            assert not regs.isError(), regs
            frame_id = (regs.registers[1] << 16) | regs.registers[2]
            verdict = next(r.verdict for r in rec.results if r.frame_id == frame_id)
            # 0 while the next part is being inspected (BUSY): its verdict is withdrawn, the frame id still old.
            assert regs.registers[0] in (0, {Verdict.OK: 1, Verdict.NG: 2}[verdict])
            assert regs.registers[6] == 0, "no fault while inspecting"
            heartbeats.append(regs.registers[5])
            frames.append(frame_id)
            coils = client.read_coils(0, count=4, device_id=UNIT)
            assert not coils.isError(), coils
            assert coils.bits[2] is True and coils.bits[3] is False, "READY on, ERROR off"
            time.sleep(0.3)
        assert heartbeats == sorted(heartbeats) and heartbeats[-1] > heartbeats[0], "the loop ticks the heartbeat"
        assert frames[-1] > frames[0], "the frame id register follows the parts"
    finally:
        client.close()
    assert running.stop() == 0
    probe = ModbusTcpClient("127.0.0.1", port=port, timeout=1, retries=0)
    assert not probe.connect(), "the server is gone after the stop"
    probe.close()


def test_sd_notify_ready_after_self_test_watchdog_from_loop_stopping_at_end(small_bundle, part_images, write_station,
                                                                          start_station, notify_socket, monkeypatch):
    # A 0.2 s WatchdogSec for this process: the loop pings every 0.05 s.
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    cfg = load_station(write_station(bundle=small_bundle, source=SCRIPTED))
    running = start_station(cfg, source=looping(part_images), outputs=[RecordingOutput()])
    station = running.station
    messages: list[str] = []
    loaded_at_ready = None
    while True:
        msg = notify_socket.recv(4096).decode()
        messages.append(msg)
        if msg == "READY=1" and loaded_at_ready is None:
            # The pipeline is set before READY is sent: this is the self-test having passed.
            loaded_at_ready = station.pipeline is not None
        if messages.count("WATCHDOG=1") >= 5 and station.counters.frames >= 2:
            station.request_stop()
        if msg == "STOPPING=1":
            break
    assert running.join() == 0

    assert loaded_at_ready is True
    ready = messages.index("READY=1")
    assert "WATCHDOG=1" not in messages[:ready], "no watchdog pings before start-up completed"
    assert messages[ready:].count("WATCHDOG=1") >= 5
    assert any(m.startswith("STATUS=") for m in messages)
    assert messages[-1] == "STOPPING=1"
