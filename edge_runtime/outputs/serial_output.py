"""Serial (RS-232/RS-485/USB-serial) output: one ASCII line per event, for a PLC or a line controller to parse.

Line protocol (ASCII, fields separated by one space, every line ends with CR LF):

    RES <frame_id> <OK|NG|FAULT> <score> <norm>   one inspected (or not inspected) part
                                                  score: raw image score, 4 decimals ("12.3457");
                                                  norm: normalised score, 3 decimals, 0.500 at the threshold;
                                                  either is "-" when the part was not inspected (FAULT)
    RDY <1|0>                                     READY: 1 while the station inspects, 0 otherwise
    ERR 1 <reason>                                a station fault; reason is printable ASCII, at most 64 chars
    ERR 0                                         the fault cleared
    HB <n>                                        heartbeat, n counts 0..65535 and wraps

From the PLC (only with `accept_trigger: true` and a `software` trigger): `TRG` captures and inspects one part.

Only RES <id> OK means a pass: a PLC that misses a line, reads FAULT or times out must treat the part as not-OK.
After the port comes back (USB-serial unplugged and replugged), RDY and ERR are sent again so the PLC resyncs.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Callable, Literal

from edge_runtime.outputs.base import Output, OutputError
from edge_runtime.records import InspectionResult

_REASON_MAX = 64


@dataclass(kw_only=True)
class SerialConfig:
    type: Literal["serial"] = "serial"
    port: str                           # e.g. /dev/ttyUSB0, or a stable /dev/serial/by-id/... link
    baudrate: int = 115200
    timeout: float = 1.0                # write timeout in seconds: a stalled port raises instead of blocking
    reconnect_interval_s: float = 2.0   # at most one reopen attempt per interval while the port is gone
    heartbeat_interval_s: float = 1.0   # HB lines at most this often (heartbeat() is called every loop)
    accept_trigger: bool = False        # a "TRG" line from the PLC fires the station's software trigger

    def validate(self) -> None:
        if not self.port:
            raise ValueError("port: must not be empty")
        if self.baudrate <= 0:
            raise ValueError(f"baudrate: must be positive, got {self.baudrate}")
        if self.timeout <= 0:
            raise ValueError(f"timeout: must be positive, got {self.timeout}")
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


class SerialOutput(Output):
    """Writes the line protocol to a serial port; reconnects on its own when the port comes back."""

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

    def set_ready(self, ready: bool) -> None:
        self._ready = bool(ready)
        # While the port is gone the state is kept and replayed on reconnect, so nothing is lost for the PLC
        # (a reconnect made here has already sent the new state).
        was_connected = self.connected
        if self._connect(force=False) and was_connected:
            self._write_line(f"RDY {int(self._ready)}")

    def set_fault(self, reason: str | None) -> None:
        self._fault = None if reason is None else _ascii_reason(reason)
        was_connected = self.connected
        if self._connect(force=False) and was_connected:
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
            port = serial.Serial(self.cfg.port, self.cfg.baudrate, timeout=self.cfg.timeout,
                                 write_timeout=self.cfg.timeout)
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

    def _read_lines(self, port) -> None:
        """Receiver thread for one connection: it ends when the port is closed, replaced or vanishes."""
        while self._serial is port:
            try:
                raw = port.readline()  # returns after cfg.timeout with b"" when the PLC is quiet
            except Exception:  # noqa: BLE001 - a vanished port fails in driver-specific ways; the writer reconnects
                return
            line = raw.decode("ascii", "replace").strip()
            if line and self.on_line is not None:
                self.on_line(line)

    def _disconnect(self) -> None:
        port, self._serial = self._serial, None
        if port is not None:
            try:
                port.close()
            except Exception:  # noqa: BLE001 - closing a vanished port can fail in driver-specific ways; it is gone
                pass
