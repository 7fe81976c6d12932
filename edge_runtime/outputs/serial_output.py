"""Serial (RS-232/RS-485/USB-serial) output: one ASCII line per event, for a PLC or a line controller to parse.

Line protocol (ASCII, fields separated by one space, every line ends with CR LF):

    RES <frame_id> <OK|NG|REVIEW|FAULT> <score> <norm>
                                                  one inspected (or not inspected) part; REVIEW: the score is
                                                  in the review band, a person re-checks the part (not a pass)
                                                  score: raw image score, 4 decimals ("12.3457");
                                                  norm: normalised score, 3 decimals, 0.500 at the threshold;
                                                  either is "-" when the part was not inspected (FAULT)
    RDY <1|0>                                     READY: 1 while the station inspects, 0 otherwise
    ERR 1 <reason>                                a station fault; reason is printable ASCII, at most 64 chars
    ERR 0                                         the fault cleared
    HB <n>                                        heartbeat, n counts 0..65535 and wraps
    RCP <number> <name> <BUSY|OK|ERR> [ms|reason] recipe switch acknowledged: BUSY when it starts, OK <ms> when
                                                  verified and active, ERR <reason> when refused or failed

From the PLC (only with `accept_trigger: true`): `TRG` captures and inspects one part (with a `software`
trigger); `RCP <number|name>` selects a recipe (station file `recipes:`); `ACK` acknowledges the last verdict, which withdraws it on the handshake outputs (GPIO level mode,
Modbus). Received bytes are buffered across reads and split at CR or LF, so a command split by a read timeout
still arrives whole; bytes that are not printable ASCII are discarded (and logged, escaped), so noise on the
line before a command does not hide it; a line that is not a command is logged and ignored; a line longer than
128 bytes without CR/LF is discarded up to the next line end. A failing read reopens the port (and its reader);
an exception in the handler is logged and counted, and the reader goes on.

Writes happen on the output bus's worker thread for this output (it is `slow`), with `timeout` as the write
timeout: a PLC that stops reading never stalls the inspection loop; what could not be written is counted
(edge_output_dropped_total, edge_output_late_total) and logged.

Only RES <id> OK means a pass: a PLC that misses a line, reads FAULT or times out must treat the part as not-OK.
After the port comes back (USB-serial unplugged and replugged), RDY and ERR are sent again so the PLC resyncs.
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable, Literal

from edge_runtime.outputs.base import OUTPUTS, Output, OutputError
from edge_runtime.records import InspectionResult

log = logging.getLogger(__name__)

_REASON_MAX = 64
_RX_LINE_MAX = 128      # longest line accepted from the PLC
_LOG_BYTES_MAX = 64     # discarded bytes shown in a log message


def escape_bytes(data: bytes, limit: int = _LOG_BYTES_MAX) -> str:
    """Bytes as printable ASCII for a log line (\\xNN escapes), cut at `limit` bytes with the total noted."""
    shown = data[:limit].decode("ascii", "backslashreplace")
    shown = "".join(ch if 32 <= ord(ch) < 127 else f"\\x{ord(ch):02x}" for ch in shown)
    return shown + (f"...({len(data)} bytes)" if len(data) > limit else "")


class ReceivedLines:
    """Bytes from the PLC -> complete lines, across reads.

    A line ends at CR or LF. Within a line, bytes that are not printable ASCII are discarded. A partial line
    stays for the next read unless it is longer than _RX_LINE_MAX: then it is discarded, and so is the rest of
    it up to the next line end. Its tail was read as a line of its own: "RCP " + 130 bytes in one read and "TRG"
    in the next fired a capture, the same bytes in one read did not (probe 105); a PLC never sent that TRG."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.skipping = False      # inside an overlong line: discard up to its end

    def clear(self) -> None:
        self.buffer.clear()
        self.skipping = False

    def feed(self, chunk: bytes) -> tuple[list[str], list[bytes]]:
        """(command lines as text, discarded bytes for the log) of what `chunk` completes."""
        buffer = self.buffer
        buffer += chunk
        lines: list[str] = []
        discarded: list[bytes] = []
        while True:
            ends = [i for i in (buffer.find(b"\r"), buffer.find(b"\n")) if i >= 0]
            if not ends:
                break
            end = min(ends)
            raw = bytes(buffer[:end])
            del buffer[:end + 1]
            if self.skipping:      # the end of an overlong line: none of it is a command
                self.skipping = False
                if raw:
                    discarded.append(raw)
                continue
            kept = bytes(b for b in raw if 32 <= b < 127)
            if len(kept) != len(raw):
                discarded.append(bytes(b for b in raw if not 32 <= b < 127))
            text = kept.decode("ascii").strip()
            if text:
                lines.append(text)
        if len(buffer) > _RX_LINE_MAX:
            discarded.append(bytes(buffer))
            buffer.clear()
            self.skipping = True
        return lines, discarded


SERIAL_BAUD_MAX = 12_000_000
SERIAL_TIMEOUT_MAX_S = 60.0


@dataclass(kw_only=True)
class SerialConfig:
    type: Literal["serial"] = "serial"
    port: str                           # e.g. /dev/ttyUSB0, or a stable /dev/serial/by-id/... link
    baudrate: int = 115200
    timeout: float = 1.0                # write timeout in seconds: a stalled port raises instead of blocking
    reconnect_interval_s: float = 2.0   # at most one reopen attempt per interval while the port is gone
    heartbeat_interval_s: float = 1.0   # HB lines at most this often (heartbeat() is called every loop)
    accept_trigger: bool = False        # read lines from the PLC: "TRG" fires the software trigger, "ACK" acks

    def validate(self) -> None:
        if not self.port:
            raise ValueError("port: must not be empty")
        # The fastest USB serial adapters run 12 Mbaud; a larger rate validated, then every open failed and the
        # port stayed disconnected (probe 102).
        if not 0 < self.baudrate <= SERIAL_BAUD_MAX:
            raise ValueError(f"baudrate: must be 1..{SERIAL_BAUD_MAX}, got {self.baudrate}")
        # At most a minute: pyserial hands the timeout to select(), which raised OverflowError past time_t for a
        # huge one (validate passed; every write and read then failed with a traceback); a write stalled longer
        # answers no part within any controller's timeout anyway.
        if not 0 < self.timeout <= SERIAL_TIMEOUT_MAX_S:
            raise ValueError(f"timeout: must be > 0 and <= {SERIAL_TIMEOUT_MAX_S:g} s, got {self.timeout}")
        if self.reconnect_interval_s < 0 or self.heartbeat_interval_s < 0:
            raise ValueError("reconnect_interval_s and heartbeat_interval_s must be 0 or more")


def _number(value: float | None, decimals: int) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.{decimals}f}"


def _ascii_reason(reason: str) -> str:
    """A reason the PLC can parse: printable ASCII, one line, bounded length."""
    cleaned = "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in reason.replace("\r", " ").replace("\n", " "))
    return cleaned.strip()[:_REASON_MAX] or "fault"


def result_line(result: InspectionResult) -> str:
    """The RES line (without CR LF) for one result."""
    return (f"RES {result.frame_id} {result.verdict.value} "
            f"{_number(result.score, 4)} {_number(result.normalized_score, 3)}")


@OUTPUTS.register(SerialConfig)
class SerialOutput(Output):
    """Writes the line protocol to a serial port; reconnects on its own when the port comes back."""

    slow = True  # a stalled port blocks for up to `timeout`: the output bus drives it from a worker thread

    def __init__(self, cfg: SerialConfig, on_line: Callable[[str], object] | None = None) -> None:
        self.cfg = cfg
        # Lines received from the PLC go here (the daemon passes SoftwareTrigger.handle_line for "TRG").
        self.on_line = on_line
        self.name = f"serial:{cfg.port}"
        self._serial = None                  # serial.Serial while connected
        self._serial_errors: tuple[type[BaseException], ...] = (OSError,)
        self._last_attempt: float | None = None  # monotonic time of the last open attempt
        self._ready = False
        self._fault: str | None = None
        self._heartbeats = 0
        self._last_heartbeat: float | None = None
        self._closed = False
        self._open_error = "not opened"  # why the port is not connected, for error messages
        self._lock = threading.RLock()       # the writer and the receiver both may drop a vanished port
        self.rx_errors = 0                   # receive failures and handler exceptions (each logged)
        self.rx_discarded_bytes = 0          # noise and unknown lines from the PLC (each logged)

    @property
    def connected(self) -> bool:
        return self._serial is not None

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._closed = False
        self._ready = False
        self._connect(force=True)
        if self._serial is None:
            raise OutputError(f"serial {self.cfg.port}: cannot open port: {self._open_error}")

    def close(self) -> None:
        self._closed = True
        if self._serial is not None:
            try:
                self._write_line("RDY 0")  # best effort: tell the PLC we stopped before the line goes quiet
            except OutputError:
                pass
        self._disconnect()

    # -- Output ----------------------------------------------------------------------------------------------
    def publish(self, result: InspectionResult) -> None:
        self._ensure_connected(f"result for frame {result.frame_id} not sent")
        self._write_line(result_line(result))

    def begin_part(self, frame_id: int) -> None:
        # Nothing to send (the RES line is the answer), but the bus must hear that the PLC cannot be told about
        # this part: a silent success here cleared the port's failure on every part and READY flapped back.
        self._ensure_connected(f"part {frame_id} begun with no line to the PLC")

    def set_ready(self, ready: bool) -> None:
        self._ready = bool(ready)
        # While the port is gone the state is kept and replayed on reconnect, so nothing is lost for the PLC
        # (a reconnect made here has already sent the new state).
        # Still raised while disconnected: the PLC has not been told, and the bus must keep the line in FAULT
        # (READY shown elsewhere flapping back on a no-op success was a probe finding).
        was_connected = self.connected
        self._ensure_connected(f"RDY {int(self._ready)} kept for the reconnect")
        if was_connected:
            self._write_line(f"RDY {int(self._ready)}")

    def set_fault(self, reason: str | None) -> None:
        self._fault = None if reason is None else _ascii_reason(reason)
        was_connected = self.connected
        self._ensure_connected("ERR state kept for the reconnect")
        if was_connected:
            self._write_line(self._fault_line())

    def heartbeat(self) -> None:
        now = time.monotonic()
        if self._last_heartbeat is not None and now - self._last_heartbeat < self.cfg.heartbeat_interval_s:
            return
        if not self._connect(force=False):
            return  # the reconnect attempt is the useful work here; the PLC sees the silence as a fault
        self._last_heartbeat = now
        self._heartbeats = (self._heartbeats + 1) & 0xFFFF
        self._write_line(f"HB {self._heartbeats}")

    # -- internals -------------------------------------------------------------------------------------------
    def recipe_changed(self, number: int, name: str, status: str, ms: float | None, error: str | None) -> None:
        """A recipe switch started (BUSY), finished (OK <ms>) or failed (ERR <reason>); see edge_runtime/recipes.py."""
        word = {"switching": "BUSY", "ok": "OK", "failed": "ERR"}.get(status)
        if word is None:
            return
        tail = f" {_ascii_reason(error)}" if error else (f" {ms:.0f}" if ms is not None else "")
        self._write_line(f"RCP {number} {_ascii_reason(name)} {word}{tail}")

    def recipe_reply(self, number: int, name: str, status: str, ms: float | None, error: str | None) -> None:
        """The answer to this port's own RCP that switched nothing (already active: OK 0; refused: ERR <reason>)."""
        self.recipe_changed(number, name, status, ms, error)

    def _fault_line(self) -> str:
        return "ERR 0" if self._fault is None else f"ERR 1 {self._fault}"

    def _ensure_connected(self, what: str) -> None:
        if not self._connect(force=False):
            raise OutputError(f"serial {self.cfg.port}: disconnected, {what}: {self._open_error}")

    def _connect(self, force: bool) -> bool:
        """True when connected; otherwise try to reopen, at most once per reconnect_interval_s."""
        if self._serial is not None:
            return True
        if self._closed:
            self._open_error = "output closed"
            return False
        now = time.monotonic()
        if not force and self._last_attempt is not None and now - self._last_attempt < self.cfg.reconnect_interval_s:
            return False
        self._last_attempt = now
        try:
            import serial  # pyserial: imported here so stations without a serial output do not need it
        except ImportError as exc:
            self._open_error = f"pyserial is not installed ({exc})"
            return False
        self._serial_errors = (serial.SerialException, OSError)
        try:
            # exclusive (POSIX: flock): a port another process (a second daemon, a terminal left open) already
            # holds is refused, not shared: its lines would interleave with ours and its reads take the PLC's
            # commands (probe 60).
            extra = {"exclusive": True} if os.name == "posix" else {}
            port = serial.Serial(self.cfg.port, self.cfg.baudrate, timeout=self.cfg.timeout,
                                 write_timeout=self.cfg.timeout, **extra)
        except (*self._serial_errors, ValueError) as exc:  # ValueError: settings the driver rejects
            self._open_error = str(exc)
            return False
        self._serial = port
        self._open_error = "not connected"
        if self.on_line is not None:
            threading.Thread(target=self._read_lines, args=(port,), name=f"serial-rx:{self.cfg.port}",
                             daemon=True).start()
        try:
            # Resync the PLC: it may have missed state changes while the port was gone.
            self._write_line(f"RDY {int(self._ready)}")
            self._write_line(self._fault_line())
        except OutputError:
            return False
        return True

    def _write_line(self, line: str) -> None:
        port = self._serial
        if port is None:
            raise OutputError(f"serial {self.cfg.port}: disconnected, {line.split(' ', 1)[0]} not sent")
        try:
            port.write(line.encode("ascii") + b"\r\n")
            port.flush()
        except self._serial_errors as exc:
            # The port vanished (unplugged adapter, closed pty) or stalled: report once and reopen later.
            self._open_error = str(exc)
            self._disconnect()
            self._last_attempt = time.monotonic()
            raise OutputError(f"serial {self.cfg.port}: write failed, port marked disconnected: {exc}") from exc

    def counters(self) -> dict[str, int]:
        """Monotonic counters for /metrics."""
        return {"serial_rx_errors": self.rx_errors, "serial_rx_discarded_bytes": self.rx_discarded_bytes}

    def _read_lines(self, port) -> None:
        """Receiver thread for one connection: it ends when the port is closed, replaced or vanishes.

        A failing read drops the port (the next heartbeat reopens it, which starts a new receiver); any other
        exception is logged and counted and the receiver goes on with an empty buffer."""
        received = ReceivedLines()
        while self._serial is port:
            try:
                try:
                    # read() returns what arrived, or b"" after cfg.timeout when the PLC is quiet
                    chunk = port.read(max(1, getattr(port, "in_waiting", 0) or 0))
                except Exception as exc:  # noqa: BLE001 - a vanished port fails in driver-specific ways
                    if self._serial is port:
                        self.rx_errors += 1
                        log.error("serial %s: receive failed, reopening the port: %s", self.cfg.port, exc)
                        self._drop(port, f"receive failed: {exc}")
                    return
                if not chunk:
                    continue
                lines, discarded = received.feed(chunk)
                for junk in discarded:
                    self.rx_discarded_bytes += len(junk)
                    log.warning("serial %s: discarded %d byte(s) from the PLC: %s", self.cfg.port, len(junk),
                                escape_bytes(junk))
                for line in lines:
                    handled = self.on_line(line) if self.on_line is not None else False
                    if not handled:
                        self.rx_discarded_bytes += len(line)
                        log.warning("serial %s: ignored unknown line from the PLC: %s", self.cfg.port,
                                    escape_bytes(line.encode("ascii")))
            except Exception:  # noqa: BLE001 - a bug in a handler must not silently end the receiver
                self.rx_errors += 1
                received.clear()
                log.exception("serial %s: receiving from the PLC failed; the receiver continues", self.cfg.port)

    def _drop(self, port, reason: str) -> None:
        """Forget `port` if it is still the current one (the receiver saw it fail)."""
        with self._lock:
            if self._serial is port:
                self._open_error = reason
                self._disconnect()
                self._last_attempt = time.monotonic()

    def _disconnect(self) -> None:
        port, self._serial = self._serial, None
        if port is not None:
            try:
                port.close()
            except Exception:  # noqa: BLE001 - closing a vanished port can fail in driver-specific ways; it is gone
                pass
