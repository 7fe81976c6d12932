"""ModbusOutput against a real pymodbus TCP client on 127.0.0.1: register map, read-only policy, clean shutdown."""
from __future__ import annotations

import socket

import pytest
from pymodbus.client import ModbusTcpClient

from edge_runtime.outputs.base import OutputError
from edge_runtime.outputs.modbus_output import ModbusConfig, ModbusOutput
from edge_runtime.records import InspectionResult, Verdict

UNIT = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_result(frame_id: int, verdict: Verdict, score: float | None = 1.2345,
                norm: float | None = 0.25) -> InspectionResult:
    return InspectionResult(frame_id=frame_id, source="cam0", verdict=verdict, score=score, normalized_score=norm,
                            threshold=2.0, timings_ms={}, bundle_id="b")


@pytest.fixture
def server():
    out = ModbusOutput(ModbusConfig(host="127.0.0.1", port=free_port(), unit_id=UNIT))
    out.start()
    yield out
    out.close()


@pytest.fixture
def client(server):
    c = ModbusTcpClient("127.0.0.1", port=server.cfg.port, timeout=3, retries=0)
    assert c.connect()
    yield c
    c.close()


def coils(client) -> list[bool]:
    response = client.read_coils(0, count=4, device_id=UNIT)
    assert not response.isError(), response
    return response.bits[:4]


def registers(client) -> list[int]:
    response = client.read_holding_registers(0, count=7, device_id=UNIT)
    assert not response.isError(), response
    return response.registers


def test_safe_state_before_any_part(client):
    assert coils(client) == [False, False, False, False]
    assert registers(client) == [0, 0xFFFF, 0xFFFF, 0, 0, 0, 0], "no verdict, and no frame id yet"


def test_the_first_part_frame_id_0_changes_the_frame_registers(server, client):
    """Probe 79: registers 1-2 read 0 before any part, and the first part of a new state_dir (of every start
    without one) is frame 0: a PLC latching a verdict when the frame id changes never saw that part's."""
    server.set_ready(True)
    before = registers(client)[1:3]
    server.begin_part(0)
    server.publish(make_result(0, Verdict.OK))
    after = registers(client)
    assert after[1:3] == [0, 0] and after[1:3] != before, "the frame id changed with the first part"
    assert after[0] == 1


def test_ok_ng_and_fault_results(server, client):
    server.set_ready(True)
    server.publish(make_result(0x12345, Verdict.OK, 1.2345, 0.25))
    assert coils(client) == [True, False, True, False]
    assert registers(client) == [1, 0x0001, 0x2345, 1234, 250, 0, 0]

    server.publish(make_result(70000, Verdict.NG, 99.0, 1.0))
    assert coils(client) == [False, True, True, False], "NG clears OK"
    assert registers(client) == [2, 70000 >> 16, 70000 & 0xFFFF, 65535, 1000, 0, 0], "score is clipped"

    server.publish(make_result(70001, Verdict.FAULT, None, None))
    assert coils(client) == [False, False, True, True]
    assert registers(client) == [0, 1, 70001 & 0xFFFF, 0, 0, 0, 2]

    server.set_fault("camera lost")
    assert registers(client)[6] == 3
    server.publish(make_result(70002, Verdict.OK))
    assert coils(client) == [True, False, True, True], "an inspected OK part is OK; ERROR stays with the fault"
    server.set_fault(None)
    assert coils(client)[3] is False and registers(client)[6] == 0


def test_fault_and_not_ready_drop_ok(server, client):
    server.set_ready(True)
    server.publish(make_result(1, Verdict.OK))
    server.set_fault("bundle reload failed")
    c, r = coils(client), registers(client)
    assert c[0] is False and c[3] is True and r[0] == 0 and r[6] == 1
    server.set_fault(None)
    server.publish(make_result(2, Verdict.OK))
    server.set_ready(False)
    c, r = coils(client), registers(client)
    assert c[0] is False and c[2] is False and r[0] == 0


def all_coils(client) -> list[bool]:
    response = client.read_coils(0, count=6, device_id=UNIT)
    assert not response.isError(), response
    return response.bits[:6]


def test_review_is_its_own_coil_and_verdict_3_never_ok(server, client):
    server.set_ready(True)
    server.begin_part(1)
    server.publish(make_result(1, Verdict.OK))
    server.begin_part(2)
    server.publish(make_result(2, Verdict.REVIEW, 1.9, 0.475))
    ok, ng, ready, error, review, busy = all_coils(client)
    assert (ok, ng, review, busy) == (False, False, True, False), "REVIEW: its own coil, never OK"
    assert registers(client)[:5] == [3, 0, 2, 1900, 475]


def test_begin_part_withdraws_the_verdict_and_shows_busy_until_the_new_one(server, client):
    server.set_ready(True)
    server.begin_part(1)
    server.publish(make_result(1, Verdict.OK))
    assert all_coils(client)[0] is True
    server.begin_part(2)
    ok, ng, ready, error, review, busy = all_coils(client)
    assert (ok, ng, review, busy, ready) == (False, False, False, True, True)
    assert registers(client)[:3] == [0, 0, 1], "verdict withdrawn; the frame id changes only with the new verdict"
    server.publish(make_result(2, Verdict.OK))
    assert all_coils(client)[5] is False and registers(client)[:3] == [1, 0, 2]
    server.acknowledge()
    assert all_coils(client)[0] is False and registers(client)[0] == 0, "an ACK withdraws the verdict"


def test_discrete_and_input_registers_mirror_the_state(server, client):
    server.set_ready(True)
    server.publish(make_result(5, Verdict.NG, 3.0, 0.75))
    inputs = client.read_discrete_inputs(0, count=4, device_id=UNIT)
    assert inputs.bits[:4] == coils(client)
    input_regs = client.read_input_registers(0, count=7, device_id=UNIT)
    assert input_regs.registers == registers(client)


def test_heartbeat_counter_increments_and_wraps(server, client):
    server.heartbeat()
    server.heartbeat()
    assert registers(client)[5] == 2
    for _ in range(65534):
        server.heartbeat()
    assert registers(client)[5] == 0


def test_client_writes_are_rejected_by_default(server, client):
    server.publish(make_result(1, Verdict.NG))
    for response in (client.write_register(0, 1, device_id=UNIT),
                     client.write_registers(0, [1, 0, 0], device_id=UNIT),
                     client.write_coil(0, True, device_id=UNIT),
                     client.write_register(20, 7, device_id=UNIT)):
        assert response.isError() and response.exception_code == 1  # illegal function
    assert coils(client)[:2] == [False, True] and registers(client)[0] == 2


def test_allow_writes_opens_only_the_plc_area():
    out = ModbusOutput(ModbusConfig(host="127.0.0.1", port=free_port(), unit_id=UNIT, allow_writes=True))
    out.start()
    client = ModbusTcpClient("127.0.0.1", port=out.cfg.port, timeout=3, retries=0)
    try:
        assert client.connect()
        out.publish(make_result(1, Verdict.NG))
        for response in (client.write_register(0, 1, device_id=UNIT),      # verdict
                         client.write_registers(14, [1, 2, 3], device_id=UNIT),  # straddles station/PLC area
                         client.write_coil(0, True, device_id=UNIT)):
            assert response.isError() and response.exception_code == 2  # illegal address
        assert not client.write_registers(16, [11, 12], device_id=UNIT).isError()
        assert out.plc_registers()[:3] == [11, 12, 0]
        assert client.read_holding_registers(16, count=2, device_id=UNIT).registers == [11, 12]
        assert registers(client)[0] == 2 and coils(client)[:2] == [False, True]
    finally:
        client.close()
        out.close()


def test_unknown_unit_id_gets_an_exception_not_data(server, client):
    server.publish(make_result(1, Verdict.OK))
    response = client.read_coils(0, count=4, device_id=UNIT + 1)
    assert response.isError() and response.exception_code == 11  # gateway target failed to respond


def test_client_disconnects_do_not_disturb_the_server(server):
    server.publish(make_result(9, Verdict.NG))
    # A client that drops mid-request (connects, sends half a frame, resets).
    raw = socket.create_connection(("127.0.0.1", server.cfg.port))
    raw.sendall(b"\x00\x01\x00\x00\x00\x06")
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    raw.close()
    for _ in range(3):
        c = ModbusTcpClient("127.0.0.1", port=server.cfg.port, timeout=3, retries=0)
        assert c.connect()
        assert registers(c)[0] == 2
        c.close()
    server.heartbeat()
    server.publish(make_result(10, Verdict.OK))  # the daemon side never noticed


def test_close_releases_the_port_and_start_reports_a_busy_port():
    port = free_port()
    out = ModbusOutput(ModbusConfig(host="127.0.0.1", port=port))
    out.start()
    second = ModbusOutput(ModbusConfig(host="127.0.0.1", port=port))
    with pytest.raises(OutputError, match=f"{port}.*[Aa]ddress already in use"):
        second.start()
    out.close()
    with socket.socket() as s:               # the listening socket is gone
        s.bind(("127.0.0.1", port))
    again = ModbusOutput(ModbusConfig(host="127.0.0.1", port=port))
    again.start()
    again.close()


def test_publish_without_start_is_an_output_error():
    out = ModbusOutput(ModbusConfig(port=free_port()))
    with pytest.raises(OutputError, match="not running"):
        out.publish(make_result(1, Verdict.OK))


def test_plc_area_writes_that_change_a_value_are_logged_in_order_with_their_time():
    """The recipe register's history between two reads of the line (ModbusOutput.plc_writes): a change survives a
    PLC that rewrites the same values every cycle (those are not logged, so the bounded log keeps the change)."""
    import time as _time

    out = ModbusOutput(ModbusConfig(host="127.0.0.1", port=free_port(), unit_id=UNIT, allow_writes=True))
    out.start()
    client = ModbusTcpClient("127.0.0.1", port=out.cfg.port, timeout=3, retries=0)
    try:
        assert client.connect()
        t0 = _time.time()
        assert not client.write_register(16, 2, device_id=UNIT).isError()
        assert not client.write_registers(16, [1, 7], device_id=UNIT).isError()
        for _ in range(300):   # a PLC writing its area every cycle, unchanged
            assert not client.write_registers(16, [1, 7], device_id=UNIT).isError()
        # Function 23 (read/write multiple: many PLC drivers' cyclic exchange) and 22 (mask write) too.
        assert not client.readwrite_registers(read_address=0, read_count=4, write_address=16, values=[3],
                                              device_id=UNIT).isError()
        assert not client.mask_write_register(address=16, and_mask=0x0000, or_mask=0x0004, device_id=UNIT).isError()
        writes = out.plc_writes(0)
        assert [(w[3], w[4]) for w in writes] == [(16, [2]), (16, [1, 7]), (16, [3]), (16, [4])]
        assert writes[0][0] < writes[1][0] and t0 <= writes[0][2] <= writes[1][2] <= _time.time()
        assert out.plc_writes(writes[0][0]) == writes[1:]
    finally:
        client.close()
        out.close()


def test_write_clients_leave_other_admitted_clients_read_only():
    """Probe 79: with allow_writes every admitted client could write the PLC area, so a SCADA polling results
    switched the line's recipe (register 16). With write_clients only the PLC writes; the others still read."""
    out = ModbusOutput(ModbusConfig(host="127.0.0.1", port=free_port(), unit_id=UNIT, allow_writes=True,
                                    write_clients=["127.0.0.1"]))
    out.start()
    plc = ModbusTcpClient("127.0.0.1", port=out.cfg.port, timeout=3, retries=0, source_address=("127.0.0.1", 0))
    scada = ModbusTcpClient("127.0.0.1", port=out.cfg.port, timeout=3, retries=0, source_address=("127.0.0.2", 0))
    try:
        assert plc.connect() and scada.connect()
        assert not plc.write_register(16, 2, device_id=UNIT).isError()
        for response in (scada.write_register(16, 1, device_id=UNIT),
                         scada.write_registers(16, [1, 0], device_id=UNIT),
                         scada.mask_write_register(address=16, and_mask=0, or_mask=1, device_id=UNIT),
                         scada.readwrite_registers(read_address=0, read_count=1, write_address=16, values=[1],
                                                   device_id=UNIT)):
            assert response.isError() and response.exception_code == 1, response
        assert out.plc_registers()[0] == 2, "the PLC's recipe number stands"
        assert [w[4] for w in out.plc_writes(0)] == [[2]], "only the PLC's write reached the recipe manager"
        assert not scada.read_holding_registers(0, count=3, device_id=UNIT).isError(), "the SCADA still reads"
    finally:
        plc.close()
        scada.close()
        out.close()


def test_write_clients_are_checked_and_need_allow_writes():
    from edge_runtime.config import ConfigError, from_mapping

    with pytest.raises(ConfigError, match=r"write_clients\[0\]"):
        from_mapping(ModbusConfig, {"allow_writes": True, "write_clients": ["plc-1"]}, "modbus")
    with pytest.raises(ConfigError, match="write_clients: only with allow_writes"):
        from_mapping(ModbusConfig, {"write_clients": ["10.0.0.5"]}, "modbus")
    warned = ModbusConfig(host="0.0.0.0", allow_writes=True, allowed_clients=["10.0.0.0/24"]).warnings()
    assert any("write_clients" in w for w in warned)
    assert not any("write_clients" in w for w in ModbusConfig(
        host="0.0.0.0", allow_writes=True, allowed_clients=["10.0.0.0/24"], write_clients=["10.0.0.5"]).warnings())
