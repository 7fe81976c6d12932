"""SerialOutput over a real pseudo-terminal pair: the line protocol, the port vanishing and coming back."""
from __future__ import annotations

import logging
import os
import select
import time
import tty

import pytest

from edge_runtime.outputs.base import OutputError
from edge_runtime.outputs.serial_output import ReceivedLines, SerialConfig, SerialOutput, result_line
from edge_runtime.records import InspectionResult, Verdict


def make_result(frame_id: int, verdict: Verdict, score: float | None = 1.23456, norm: float | None = 0.4) -> InspectionResult:
    return InspectionResult(frame_id=frame_id, source="cam0", verdict=verdict, score=score, normalized_score=norm,
                            threshold=2.0, timings_ms={}, bundle_id="b")


class Pty:
    """The PLC end: the master side of a pty whose slave the output opens (through a symlink, like by-id names)."""

    def __init__(self, link: str) -> None:
        self.master, slave = os.openpty()
        tty.setraw(self.master)
        self.slave_name = os.ttyname(slave)
        os.close(slave)  # the output opens the slave by name; the master keeps the pty alive
        self.link = link
        if os.path.lexists(link):
            os.unlink(link)
        os.symlink(self.slave_name, link)
        self._buffer = b""

    def read_lines(self, count: int, timeout: float = 5.0) -> list[str]:
        lines: list[str] = []
        while len(lines) < count:
            while b"\r\n" in self._buffer and len(lines) < count:
                line, self._buffer = self._buffer.split(b"\r\n", 1)
                lines.append(line.decode("ascii"))
            if len(lines) == count:
                break
            ready, _, _ = select.select([self.master], [], [], timeout)
            if not ready:
                raise AssertionError(f"no line from the output within {timeout}s; got {lines!r}")
            self._buffer += os.read(self.master, 4096)
        return lines

    def nothing_pending(self) -> bool:
        ready, _, _ = select.select([self.master], [], [], 0.05)
        return not ready and b"\r\n" not in self._buffer

    def vanish(self) -> None:
        self.close()                   # the adapter is unplugged: the slave's writes fail with EIO
        os.unlink(self.link)           # and its device name disappears

    def close(self) -> None:
        if self.master >= 0:
            os.close(self.master)
            self.master = -1


@pytest.fixture
def link(tmp_path):
    return str(tmp_path / "ttyPLC")


@pytest.fixture
def new_pty(link):
    """Creates PLC ends pointed to by `link`; closes them after the test."""
    made: list[Pty] = []

    def make() -> Pty:
        made.append(Pty(link))
        return made[-1]

    yield make
    for pty_end in made:
        pty_end.close()


def make_output(link: str, on_line=None, **overrides) -> SerialOutput:
    cfg = dict(port=link, baudrate=115200, timeout=1.0, reconnect_interval_s=0.0, heartbeat_interval_s=0.0)
    cfg.update(overrides)
    return SerialOutput(SerialConfig(**cfg), on_line=on_line)


def test_protocol_lines(link, new_pty):
    plc = new_pty()
    out = make_output(link)
    out.start()
    assert plc.read_lines(2) == ["RDY 0", "ERR 0"], "on connect the station announces its (safe) state"
    out.set_ready(True)
    out.publish(make_result(7, Verdict.OK, 1.23456, 0.4))
    out.publish(make_result(8, Verdict.NG, 12.5, 0.91234))
    out.publish(make_result(9, Verdict.FAULT, None, None))
    out.set_fault("camera\nlost: ü")
    out.set_fault(None)
    out.heartbeat()
    out.heartbeat()
    assert plc.read_lines(8) == [
        "RDY 1",
        "RES 7 OK 1.2346 0.400",
        "RES 8 NG 12.5000 0.912",
        "RES 9 FAULT - -",
        "ERR 1 camera lost: ?",
        "ERR 0",
        "HB 1",
        "HB 2",
    ]
    out.close()
    assert plc.read_lines(1) == ["RDY 0"]


def test_heartbeat_is_rate_limited(link, new_pty):
    plc = new_pty()
    out = make_output(link, heartbeat_interval_s=3600.0)
    out.start()
    plc.read_lines(2)
    for _ in range(5):
        out.heartbeat()
    assert plc.read_lines(1) == ["HB 1"]
    assert plc.nothing_pending()
    out.close()


def test_result_line_formats_non_finite_scores_as_dash():
    assert result_line(make_result(3, Verdict.NG, float("nan"), float("inf"))) == "RES 3 NG - -"


def test_port_vanishing_and_coming_back(link, new_pty):
    plc = new_pty()
    out = make_output(link)
    out.start()
    plc.read_lines(2)
    out.set_ready(True)
    out.publish(make_result(1, Verdict.OK))
    assert plc.read_lines(2) == ["RDY 1", "RES 1 OK 1.2346 0.400"]

    plc.vanish()
    with pytest.raises(OutputError, match="write failed"):
        out.publish(make_result(2, Verdict.OK))
    assert not out.connected
    # While gone: every result and state call is reported as an error (the result log keeps the results; the
    # state is kept and replayed on reconnect), so the station stays in FAULT: a state call that "worked" while
    # nothing reached the PLC had let READY flap back on the other outputs. Heartbeats retry quietly.
    with pytest.raises(OutputError, match="disconnected.*frame 3"):
        out.publish(make_result(3, Verdict.NG))
    out.heartbeat()
    with pytest.raises(OutputError, match="disconnected, ERR state kept for the reconnect"):
        out.set_fault("camera lost")
    with pytest.raises(OutputError, match="disconnected, RDY 0 kept for the reconnect"):
        out.set_ready(False)

    plc2 = new_pty()                          # replugged: the same name now points at a new device
    out.heartbeat()                           # the reconnect happens on the next call
    assert out.connected
    assert plc2.read_lines(3) == ["RDY 0", "ERR 1 camera lost", "HB 1"], "state is replayed on reconnect"
    out.set_fault(None)
    out.set_ready(True)
    out.publish(make_result(4, Verdict.OK))
    assert plc2.read_lines(3) == ["ERR 0", "RDY 1", "RES 4 OK 1.2346 0.400"]
    out.close()


def test_reconnect_attempts_are_rate_limited(link, new_pty):
    plc = new_pty()
    out = make_output(link, reconnect_interval_s=3600.0)
    out.start()
    plc.read_lines(2)
    plc.vanish()
    with pytest.raises(OutputError):
        out.publish(make_result(1, Verdict.OK))
    new_pty()                                 # back, but the next attempt is not due yet
    with pytest.raises(OutputError, match="disconnected"):
        out.publish(make_result(2, Verdict.OK))
    assert not out.connected
    out.close()


def test_start_without_port_raises_output_error_and_recovers(link, new_pty):
    out = make_output(link)
    with pytest.raises(OutputError, match="ttyPLC"):
        out.start()
    plc = new_pty()
    out.publish(make_result(1, Verdict.NG, 3.0, 0.8))
    assert plc.read_lines(3) == ["RDY 0", "ERR 0", "RES 1 NG 3.0000 0.800"]
    out.close()


def test_trg_line_from_the_plc_fires_the_software_trigger(link, new_pty):
    from edge_runtime.triggers import SoftwareTrigger

    plc = new_pty()
    trigger = SoftwareTrigger()
    out = make_output(link, timeout=0.2)
    out.on_line = trigger.handle_line
    out.start()
    try:
        plc.read_lines(2)                           # RDY 0, ERR 0 on connect
        assert not trigger.wait(0.3)                # nothing fires by itself
        os.write(plc.master, b"hello\r\nTRG\r\n")   # unknown lines are ignored, TRG fires
        assert trigger.wait(3.0)
        assert not trigger.wait(0.3)                # one TRG, one capture
    finally:
        out.close()


def test_station_wires_accept_trigger_serial_outputs_to_the_software_trigger(link, new_pty, tmp_path):
    from edge_runtime.config import StationConfig
    from edge_runtime.daemon import Station
    from edge_runtime.schema import from_mapping

    cfg = from_mapping(StationConfig, {"bundle": str(tmp_path), "source": {"type": "folder", "path": str(tmp_path)},
                                       "trigger": {"type": "software"},
                                       "outputs": [{"type": "serial", "port": link, "accept_trigger": True},
                                                   {"type": "serial", "port": link + "2"}]}, "station.yaml")
    station = Station(cfg)
    assert station.outputs[1].on_line is None
    assert station.outputs[0].on_line("trg") is True and station.trigger.wait(0.0) is not None
    assert station.outputs[0].on_line("HELLO") is False and station.trigger.wait(0.0) is None


def test_review_verdict_is_its_own_token_never_ok(link, new_pty):
    plc = new_pty()
    out = make_output(link)
    out.start()
    plc.read_lines(2)
    out.publish(make_result(7, Verdict.REVIEW, 1.9, 0.475))
    (line,) = plc.read_lines(1)
    assert line == "RES 7 REVIEW 1.9000 0.475" and " OK " not in line
    out.close()


class TriggerCounter:
    """The PLC-command handler the daemon installs, reduced to counting TRG lines (and refusing the rest)."""

    def __init__(self, fail_first: bool = False) -> None:
        self.trg = 0
        self.lines: list[str] = []
        self.fail_first = fail_first

    def __call__(self, line: str) -> bool:
        self.lines.append(line)
        if self.fail_first:
            self.fail_first = False
            raise RuntimeError("bug in the handler")
        if line == "TRG":
            self.trg += 1
            return True
        return False


def wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_trg_after_noise_and_split_by_a_read_timeout_still_fires(link, new_pty, caplog):
    plc = new_pty()
    handler = TriggerCounter()
    out = make_output(link, timeout=0.05, on_line=handler)
    out.start()
    try:
        plc.read_lines(2)
        with caplog.at_level(logging.WARNING, logger="edge_runtime.outputs.serial_output"):
            os.write(plc.master, b"\x00\xffTRG\r\n")            # line noise before the command
            assert wait_for(lambda: handler.trg == 1), handler.lines
            os.write(plc.master, b"TR")                          # split: the reader times out in between
            time.sleep(0.3)
            assert handler.trg == 1
            os.write(plc.master, b"G\r\n")
            assert wait_for(lambda: handler.trg == 2), handler.lines
            os.write(plc.master, b"x" * 300 + b"\nTRG\n")        # an overlong line is dropped, the next one counts
            assert wait_for(lambda: handler.trg == 3), handler.lines
        assert "\\x00\\xff" in caplog.text, "discarded noise is logged, escaped"
        assert all(len(r.getMessage()) < 400 for r in caplog.records), "log lines are bounded"
        assert out.rx_discarded_bytes >= 2 + 128
    finally:
        out.close()


def test_an_overlong_line_is_discarded_up_to_its_end_however_the_reads_split_it():
    """Probe 105: "RCP " + 130 bytes in one read and "TRG" in the next fired a capture (the overlong part was
    dropped and its tail read as a line of its own), while the same bytes in one read were one unknown line: no
    PLC sent that TRG. The tail of an overlong line is discarded with it, whatever the reads."""
    line = b"RCP " + b"A" * 130 + b"TRG\r\n"
    for split in (1, 60, 133, 134, 135, len(line) - 2):
        received = ReceivedLines()
        lines = received.feed(line[:split])[0] + received.feed(line[split:])[0]
        assert "TRG" not in lines, (split, lines)
        assert received.feed(b"TRG\r\n")[0] == ["TRG"], split      # the next line is read as before
    received = ReceivedLines()
    assert received.feed(b"x" * 129)[0] == [] and received.skipping
    assert received.feed(b"y" * 500)[0] == [] and received.skipping   # still the same line: still skipped
    assert received.feed(b"TRG\nACK\n")[0] == ["ACK"]


def test_an_exception_in_the_handler_is_reported_and_the_reader_goes_on(link, new_pty, caplog):
    plc = new_pty()
    handler = TriggerCounter(fail_first=True)
    out = make_output(link, timeout=0.05, on_line=handler)
    out.start()
    try:
        plc.read_lines(2)
        with caplog.at_level(logging.ERROR, logger="edge_runtime.outputs.serial_output"):
            os.write(plc.master, b"TRG\r\n")
            assert wait_for(lambda: out.rx_errors == 1)
            os.write(plc.master, b"TRG\r\n")
            assert wait_for(lambda: handler.trg == 1), "the receiver survived the exception"
        assert "bug in the handler" in caplog.text
        assert out.counters()["serial_rx_errors"] == 1
    finally:
        out.close()


def test_a_failing_read_reopens_the_port_with_a_new_reader(link, new_pty):
    plc = new_pty()
    handler = TriggerCounter()
    out = make_output(link, timeout=0.05, on_line=handler, reconnect_interval_s=0.0)
    out.start()
    plc.read_lines(2)
    first = out._serial

    def broken_read(size=1):
        raise OSError(5, "Input/output error")

    first.read = broken_read
    assert wait_for(lambda: out.rx_errors == 1 and not out.connected), "the failure is reported"
    out.heartbeat()                                   # the loop's next call reopens the port
    assert out.connected and out._serial is not first
    os.write(plc.master, b"TRG\r\n")
    assert wait_for(lambda: handler.trg == 1), "a new reader serves the reopened port"
    out.close()


def test_a_port_another_output_holds_is_refused_not_shared(new_pty, link):
    """Probe 60: a second opener of the same port (another line, another daemon) had interleaved its RES and RDY
    lines with the first one's and its receiver took half of the PLC's TRG bytes. The port is opened exclusively."""
    plc = new_pty()
    first = SerialOutput(SerialConfig(port=link))
    first.start()
    second = SerialOutput(SerialConfig(port=plc.slave_name))   # the same device, named without the link
    try:
        with pytest.raises(OutputError, match="cannot open port"):
            second.start()
        assert not second.connected
    finally:
        second.close()
        first.close()
    third = SerialOutput(SerialConfig(port=link))              # free again once the first one closed it
    third.start()
    assert third.connected
    third.close()


def test_a_timeout_select_cannot_take_is_refused_by_the_config():
    """probe 100: `timeout: 1.0e+300` validated; pyserial's select() then raised OverflowError after every write
    (a traceback per heartbeat) and in the receiver (TRG never read)."""
    from edge_runtime.schema import ConfigError, convert
    from edge_runtime.config import OutputConfig

    with pytest.raises(ConfigError, match=r"outputs\[0\]\.timeout: must be > 0 and <= 60 s"):
        convert({"type": "serial", "port": "/dev/ttyS0", "timeout": 1.0e300}, OutputConfig, "outputs[0]")
    assert convert({"type": "serial", "port": "/dev/ttyS0", "timeout": 60}, OutputConfig, "outputs[0]").timeout == 60
