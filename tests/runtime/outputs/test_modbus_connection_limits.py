"""The Modbus TCP server bounds its connections and their idle time: a flood of idle sockets from the plant
network cannot exhaust the daemon's file descriptors, and a polling PLC keeps being served through it."""
from __future__ import annotations

import os
import socket
import time

from pathlib import Path

import pytest
import yaml
from pymodbus.client import ModbusTcpClient

from edge_runtime.outputs.modbus_output import ModbusConfig, ModbusOutput
from edge_runtime.records import InspectionResult, Verdict
from edge_runtime.schema import ConfigError, from_mapping

UNIT = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def wait_until(predicate, what: str, limit_s: float = 20.0) -> None:
    end = time.monotonic() + limit_s
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def server():
    out = ModbusOutput(ModbusConfig(host="127.0.0.1", port=free_port(), unit_id=UNIT, max_connections=8,
                                    idle_timeout_s=1.0))
    out.start()
    yield out
    out.close()


def test_flood_of_idle_connections_keeps_the_server_bounded_and_the_plc_served(server):
    plc = ModbusTcpClient("127.0.0.1", port=server.cfg.port, timeout=3, retries=0)
    assert plc.connect()
    server.publish(InspectionResult(frame_id=7, source="cam", verdict=Verdict.NG, score=1.0, normalized_score=0.6,
                                    threshold=1.0, timings_ms={}, bundle_id="b"))
    fds_before = open_fds()
    idle: list[socket.socket] = []
    try:
        for i in range(300):  # bounded: 300 clients that connect and never send a request
            idle.append(socket.create_connection(("127.0.0.1", server.cfg.port), timeout=5))
            if i % 50 == 0:
                # The PLC, connected before the flood, keeps polling through it.
                assert plc.read_holding_registers(0, count=3, device_id=UNIT).registers == [2, 0, 7]
        wait_until(lambda: server.connection_count() <= 8, "the server to shed connections over the limit")
        # Client side holds 300 sockets in this process; the server side at most 8 (plus a few for the runtime).
        wait_until(lambda: open_fds() - fds_before <= 300 + 8 + 4, "server-side sockets to be closed")
        assert plc.read_holding_registers(0, count=3, device_id=UNIT).registers == [2, 0, 7]
    finally:
        for s in idle:
            s.close()
        plc.close()


def test_a_plc_reconnecting_into_a_full_server_takes_an_idle_sockets_slot():
    """Idle sockets filling every slot had locked a PLC that reconnected out until the idle sweep (up to
    idle_timeout_s, 60 s by default)."""
    out = ModbusOutput(ModbusConfig(host="127.0.0.1", port=free_port(), unit_id=UNIT, max_connections=8,
                                    idle_timeout_s=60.0))
    out.start()
    idle: list[socket.socket] = []
    try:
        out._server.evict_idle_s = 0.3              # half the idle timeout in service (30 s); short here
        for _ in range(8):
            idle.append(socket.create_connection(("127.0.0.1", out.cfg.port), timeout=5))
        wait_until(lambda: out.connection_count() == 8, "the slots to fill")
        refused = socket.create_connection(("127.0.0.1", out.cfg.port), timeout=5)
        assert refused.recv(10) == b"", "every slot was used less than 0.3 s ago: the newcomer is closed at once"
        refused.close()
        assert out._server.rejected == 1
        time.sleep(0.5)
        plc = ModbusTcpClient("127.0.0.1", port=out.cfg.port, timeout=3, retries=0)
        assert plc.connect()
        assert not plc.read_holding_registers(0, count=1, device_id=UNIT).isError()
        assert out._server.evicted == 1 and out.connection_count() <= 8
        plc.close()
    finally:
        for s in idle:
            s.close()
        out.close()


def test_idle_client_is_disconnected_after_idle_timeout(server):
    raw = socket.create_connection(("127.0.0.1", server.cfg.port), timeout=10)
    try:
        wait_until(lambda: server.connection_count() == 1, "the connection to register")
        # Silent for longer than idle_timeout_s (1 s): the server closes it, the client reads EOF.
        assert raw.recv(10) == b""
        wait_until(lambda: server.connection_count() == 0, "the server to forget the connection")
    finally:
        raw.close()


def test_limits_are_validated():
    with pytest.raises(ConfigError, match="modbus.max_connections: must be 1..256, got 0"):
        from_mapping(ModbusConfig, {"max_connections": 0}, "modbus")
    with pytest.raises(ConfigError, match="modbus.idle_timeout_s: must be > 0"):
        from_mapping(ModbusConfig, {"idle_timeout_s": -1}, "modbus")


def test_the_unit_sets_a_descriptor_limit_above_what_the_bounded_listeners_can_hold():
    from pathlib import Path

    from edge_runtime.http_endpoint import HttpConfig

    unit = (Path(__file__).parents[3] / "systemd" / "edge-runtime.service").read_text()
    limits = [line.split("=", 1)[1] for line in unit.splitlines() if line.startswith("LimitNOFILE=")]
    assert len(limits) == 1, "LimitNOFILE must be set once, deliberately"
    nofile = int(limits[0])
    listeners = HttpConfig().max_connections + ModbusConfig().max_connections
    assert listeners + 256 <= nofile <= 65536


def test_allowed_clients_keeps_other_addresses_out_of_the_slots():
    """With allowed_clients, a client from another address is closed at once and holds no slot: a flood that
    polls every few seconds from elsewhere can no longer lock a reconnecting PLC out."""
    out = ModbusOutput(ModbusConfig(host="127.0.0.1", port=free_port(), unit_id=UNIT, max_connections=2,
                                    idle_timeout_s=60.0, allowed_clients=["127.0.0.1"]))
    out.start()
    strangers: list[socket.socket] = []
    try:
        for _ in range(5):   # from 127.0.0.2 (any 127/8 address is this machine's loopback)
            s = socket.create_connection(("127.0.0.1", out.cfg.port), timeout=5, source_address=("127.0.0.2", 0))
            strangers.append(s)
        for s in strangers:   # closed by the server: the read sees end of stream
            s.settimeout(5)
            assert s.recv(1) == b""
        assert out.connection_count() == 0 and out._server.clients.refused == 5
        plc = ModbusTcpClient("127.0.0.1", port=out.cfg.port, timeout=3, retries=0)
        assert plc.connect()
        out.publish(InspectionResult(frame_id=3, source="cam", verdict=Verdict.OK, score=0.5, normalized_score=0.3,
                                     threshold=1.0, timings_ms={}, bundle_id="b"))
        assert plc.read_holding_registers(0, count=3, device_id=UNIT).registers == [1, 0, 3]
        plc.close()
    finally:
        for s in strangers:
            s.close()
        out.close()


def test_allowed_clients_entries_are_checked_when_the_station_file_is_read():
    cfg = from_mapping(ModbusConfig, {"allowed_clients": ["10.0.0.5", "10.1.0.0/16", "fd00::/8"]}, "station.yaml")
    assert [str(n) for n in cfg.client_networks()] == ["10.0.0.5/32", "10.1.0.0/16", "fd00::/8"]
    with pytest.raises(ConfigError, match=r"allowed_clients\[1\]: 'plc-1' is not an IP address or network"):
        from_mapping(ModbusConfig, {"allowed_clients": ["10.0.0.5", "plc-1"]}, "station.yaml")


def test_validate_warns_about_an_open_modbus_server_and_an_ipv6_only_wildcard(tmp_path, capsys):
    from edge_runtime.cli import main as cli_main

    def station(modbus: dict) -> Path:
        path = tmp_path / "station.yaml"
        frames = tmp_path / "frames"
        frames.mkdir(exist_ok=True)
        path.write_text(yaml.safe_dump({"bundle": str(tmp_path / "no-bundle-here"),
                                        "source": {"type": "folder", "path": str(frames)},
                                        "outputs": [{"type": "modbus", **modbus}]}))
        return path

    # exit 1: valid, but the bundle it names is not here
    assert cli_main(["validate", str(station({"host": "0.0.0.0", "allow_writes": True}))]) == 1
    err = capsys.readouterr().err
    assert "outputs[0].host 0.0.0.0 without allowed_clients: any client that reaches this address reads the " \
           "results and writes the PLC area" in err
    assert cli_main(["validate", str(station({"host": "::", "allowed_clients": ["fd00::/8"]}))]) == 1
    err = capsys.readouterr().err
    assert "an IPv4 PLC cannot connect (use 0.0.0.0 for IPv4)" in err and "without allowed_clients" not in err
    assert cli_main(["validate", str(station({"host": "0.0.0.0", "allowed_clients": ["10.0.0.5"]}))]) == 1
    assert "modbus" not in capsys.readouterr().err
    assert ModbusConfig().warnings() == []                      # loopback, the default


def test_bytes_that_never_complete_a_request_keep_no_slot():
    """Probe 79: eight sockets each dripping a byte of a request header that never completes counted as active,
    so none was ever idle enough to give its slot: a PLC that reconnected was refused for as long as they dripped
    (75 s on a running station, with no end). Only whole requests count as activity now."""
    out = ModbusOutput(ModbusConfig(host="127.0.0.1", port=free_port(), unit_id=UNIT, max_connections=8,
                                    idle_timeout_s=60.0))
    out.start()
    drips: list[socket.socket] = []
    try:
        out._server.evict_idle_s = 0.5              # half the idle timeout in service (30 s); short here
        for _ in range(8):
            drips.append(socket.create_connection(("127.0.0.1", out.cfg.port), timeout=5))
        wait_until(lambda: out.connection_count() == 8, "the slots to fill")
        header = bytes([0, 1, 0, 0, 0xFF, 0xFF])    # MBAP of a 65535-byte request: it never completes
        deadline = time.monotonic() + 1.5
        k = 0
        while time.monotonic() < deadline:          # a byte on every socket every 0.1 s, well inside 0.5 s
            for s in drips:
                s.send(header[k:k + 1] if k < len(header) else b"\x00")
            k += 1
            time.sleep(0.1)
        plc = ModbusTcpClient("127.0.0.1", port=out.cfg.port, timeout=3, retries=0)
        assert plc.connect()
        response = plc.read_holding_registers(0, count=1, device_id=UNIT)
        assert not response.isError(), "the PLC took the slot of a socket that sent no request"
        assert out._server.evicted >= 1
        plc.close()
    finally:
        for s in drips:
            s.close()
        out.close()


def test_a_client_that_polls_keeps_its_slot_as_active():
    """Whole requests still count: a client polling faster than the eviction age is never evicted."""
    out = ModbusOutput(ModbusConfig(host="127.0.0.1", port=free_port(), unit_id=UNIT, max_connections=1,
                                    idle_timeout_s=60.0))
    out.start()
    try:
        out._server.evict_idle_s = 0.5
        plc = ModbusTcpClient("127.0.0.1", port=out.cfg.port, timeout=3, retries=0)
        assert plc.connect()
        for _ in range(8):
            assert not plc.read_holding_registers(0, count=1, device_id=UNIT).isError()
            time.sleep(0.1)
        other = socket.create_connection(("127.0.0.1", out.cfg.port), timeout=5)
        assert other.recv(10) == b"", "the polling PLC's slot is not given away"
        other.close()
        assert not plc.read_holding_registers(0, count=1, device_id=UNIT).isError()
        plc.close()
    finally:
        out.close()
