"""GPIO output lines (OK / NG / READY / ERROR / heartbeat) through the Linux GPIO character device, libgpiod v2.

Fail-safe wiring: every line is driven INACTIVE when requested, and OK is the energised state that is asserted only
for a part that was inspected and passed. A FAULT result, set_fault(), set_ready(False) and close() all drop OK.
close() drives every line inactive before releasing it. When the process dies, the kernel releases the lines and
they return to the driver's default state, which is usually an input (de-energised) but is driver-specific (some
SoC drivers keep the last level). A station that must survive a crashed or hung process therefore also wires the OK
relay through a watchdog fed by the `heartbeat` line: when the loop stops, the heartbeat stops toggling and OK drops.
"""
from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

from edge_runtime.outputs.base import Output, OutputError
from edge_runtime.records import InspectionResult, Verdict


@dataclass(kw_only=True)
class GpioLine:
    offset: int               # line offset on the chip (not the legacy global sysfs number)
    active_low: bool = False  # the kernel inverts: "asserted" drives the pin low

    def validate(self) -> None:
        if self.offset < 0:
            raise ValueError(f"offset: must be 0 or more, got {self.offset}")


@dataclass(kw_only=True)
class GpioConfig:
    type: Literal["gpio"] = "gpio"
    chip: str = "/dev/gpiochip0"
    ok: GpioLine | None = None
    ng: GpioLine | None = None
    ready: GpioLine | None = None
    error: GpioLine | None = None
    heartbeat: GpioLine | None = None  # toggled on every heartbeat() call, to feed an external watchdog
    pulse_ms: int = 0                  # 0: OK/NG hold their level until the next part; >0: pulse for this long
    consumer: str = "patchcore-edge"   # shown by `gpioinfo` as the owner of the lines

    def lines(self) -> dict[str, GpioLine]:
        """The configured lines by role."""
        roles = {"ok": self.ok, "ng": self.ng, "ready": self.ready, "error": self.error, "heartbeat": self.heartbeat}
        return {role: line for role, line in roles.items() if line is not None}

    def validate(self) -> None:
        lines = self.lines()
        if not lines:
            raise ValueError("configure at least one of ok, ng, ready, error, heartbeat")
        seen: dict[int, str] = {}
        for role, line in lines.items():
            if line.offset in seen:
                raise ValueError(f"{role}.offset: line {line.offset} is already used by {seen[line.offset]}")
            seen[line.offset] = role
        if self.pulse_ms < 0:
            raise ValueError(f"pulse_ms: must be 0 or more, got {self.pulse_ms}")
        if not self.chip:
            raise ValueError("chip: must not be empty")


class GpioLines(Protocol):
    """The narrow hardware interface GpioOutput drives; values are logical (True = asserted)."""

    def request(self, offsets: Mapping[int, bool]) -> None:
        """Claim lines as outputs, all driven inactive. `offsets` maps offset -> active_low."""

    def set_values(self, values: Mapping[int, bool]) -> None:
        """Drive the given lines (offset -> asserted)."""

    def release(self) -> None:
        """Give the lines back to the kernel."""


class LibgpiodLines:
    """GpioLines on libgpiod v2 (`gpiod` Python package >= 2); `gpiod` is imported only when lines are requested."""

    def __init__(self, chip: str, consumer: str) -> None:
        self.chip = chip
        self.consumer = consumer
        self._request = None
        self._value = None  # gpiod.line.Value, bound on request()
        self._gpiod_errors: tuple[type[BaseException], ...] = ()

    def request(self, offsets: Mapping[int, bool]) -> None:
        import gpiod
        from gpiod.line import Direction, Value

        self._value = Value
        # gpiod's own errors are not OSError; GpioLines callers only need to handle OSError/ValueError.
        self._gpiod_errors = (gpiod.RequestReleasedError, gpiod.ChipClosedError)
        config = {
            offset: gpiod.LineSettings(direction=Direction.OUTPUT, active_low=active_low, output_value=Value.INACTIVE)
            for offset, active_low in offsets.items()
        }
        self._request = gpiod.request_lines(self.chip, consumer=self.consumer, config=config)

    def set_values(self, values: Mapping[int, bool]) -> None:
        if self._request is None:
            raise OSError(f"GPIO lines on {self.chip} are not requested")
        value = self._value
        try:
            self._request.set_values({offset: value.ACTIVE if on else value.INACTIVE for offset, on in values.items()})
        except self._gpiod_errors as exc:
            raise OSError(f"GPIO request on {self.chip}: {exc}") from exc

    def release(self) -> None:
        request, self._request = self._request, None
        if request is not None:
            try:
                request.release()
            except self._gpiod_errors as exc:
                raise OSError(f"GPIO request on {self.chip}: {exc}") from exc


class FakeGpioLines:
    """GpioLines test double: keeps the logical state and records every change in order."""

    def __init__(self) -> None:
        self.active_low: dict[int, bool] = {}
        self.state: dict[int, bool] = {}            # logical value per requested offset
        self.events: list[tuple] = []               # ("request", {...}) / ("set", {...}) / ("release",)
        self.history: list[dict[int, bool]] = []    # full state after every request/set
        self.requested = False
        self.fail_with: Exception | None = None     # raised by the next request/set_values, then cleared

    def _maybe_fail(self) -> None:
        if self.fail_with is not None:
            exc, self.fail_with = self.fail_with, None
            raise exc

    def request(self, offsets: Mapping[int, bool]) -> None:
        self._maybe_fail()
        self.active_low = dict(offsets)
        self.state = {offset: False for offset in offsets}
        self.requested = True
        self.events.append(("request", dict(offsets)))
        self.history.append(dict(self.state))

    def set_values(self, values: Mapping[int, bool]) -> None:
        self._maybe_fail()
        if not self.requested:
            raise OSError("lines not requested")
        unknown = set(values) - set(self.state)
        if unknown:
            raise OSError(f"lines {sorted(unknown)} not requested")
        self.state.update(values)
        self.events.append(("set", dict(values)))
        self.history.append(dict(self.state))

    def release(self) -> None:
        self.requested = False
        self.state = {}
        self.events.append(("release",))

    def physical(self, offset: int) -> bool:
        """Electrical level (True = high) of a requested line, applying active_low like the kernel does."""
        return self.state[offset] != self.active_low[offset]


class GpioOutput(Output):
    """Drives OK/NG/READY/ERROR/heartbeat lines; OK is asserted only for an inspected OK part."""

    def __init__(self, cfg: GpioConfig, lines: GpioLines | None = None) -> None:
        self.cfg = cfg
        self.name = f"gpio:{cfg.chip}"
        self._lines: GpioLines = lines if lines is not None else LibgpiodLines(cfg.chip, cfg.consumer)
        self._offsets = {role: line.offset for role, line in cfg.lines().items()}
        self._lock = threading.Lock()  # publish() and the pulse timer both drive lines
        self._requested = False
        self._ok = self._ng = False
        self._ready = False
        self._fault_reason: str | None = None
        self._last_result_faulted = False
        self._heartbeat = False
        self._pulse_generation = 0
        self._pulse_timer: threading.Timer | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            if self._requested:
                return
            try:
                self._lines.request({line.offset: line.active_low for line in self.cfg.lines().values()})
            except (OSError, ValueError) as exc:  # gpiod raises OSError (no chip, busy line) or ValueError (offset)
                raise OutputError(f"GPIO {self.cfg.chip}: cannot request lines {sorted(self._offsets.values())}: {exc}") from exc
            self._requested = True
            self._ok = self._ng = self._ready = self._heartbeat = False
            self._drive_locked()

    def close(self) -> None:
        with self._lock:
            self._cancel_pulse_locked()
            self._ok = self._ng = self._ready = self._heartbeat = False
            self._fault_reason = None
            self._last_result_faulted = False
            if not self._requested:
                return
            errors = []
            try:
                self._drive_locked()  # safe state first, so the pins are inactive whatever release() does to them
            except OutputError as exc:
                errors.append(str(exc))
            try:
                self._lines.release()
            except OSError as exc:
                errors.append(f"GPIO {self.cfg.chip}: release failed: {exc}")
            self._requested = False
        if errors:
            raise OutputError("; ".join(errors))

    # -- Output ----------------------------------------------------------------------------------------------
    def publish(self, result: InspectionResult) -> None:
        with self._lock:
            self._cancel_pulse_locked()
            # OK only for a part that was inspected and passed; anything else leaves OK de-energised.
            self._ok = result.verdict is Verdict.OK
            self._ng = result.verdict is Verdict.NG
            self._last_result_faulted = result.verdict is Verdict.FAULT
            self._drive_locked()
            if self.cfg.pulse_ms > 0 and (self._ok or self._ng):
                self._pulse_generation += 1
                timer = threading.Timer(self.cfg.pulse_ms / 1000.0, self._end_pulse, args=(self._pulse_generation,))
                timer.daemon = True
                self._pulse_timer = timer
                timer.start()

    def set_ready(self, ready: bool) -> None:
        with self._lock:
            self._ready = bool(ready)
            if not self._ready:
                # A station that stopped inspecting must not leave the previous part's OK standing for the next.
                self._cancel_pulse_locked()
                self._ok = False
            self._drive_locked()

    def set_fault(self, reason: str | None) -> None:
        with self._lock:
            self._fault_reason = reason
            if reason is not None:
                self._cancel_pulse_locked()
                self._ok = False
            self._drive_locked()

    def heartbeat(self) -> None:
        if "heartbeat" not in self._offsets:
            return
        with self._lock:
            self._heartbeat = not self._heartbeat
            self._drive_locked(only=("heartbeat",))

    # -- internals -------------------------------------------------------------------------------------------
    def _end_pulse(self, generation: int) -> None:
        with self._lock:
            if generation != self._pulse_generation or not self._requested:
                return  # a newer part or close() took over the lines
            self._pulse_timer = None
            self._ok = self._ng = False
            try:
                self._drive_locked(only=("ok", "ng"))
            except OutputError:
                pass  # nothing to report to from a timer thread; the next publish() raises the same fault

    def _cancel_pulse_locked(self) -> None:
        self._pulse_generation += 1
        if self._pulse_timer is not None:
            self._pulse_timer.cancel()
            self._pulse_timer = None

    def _desired(self) -> dict[str, bool]:
        return {
            "ok": self._ok,
            "ng": self._ng,
            "ready": self._ready,
            "error": self._fault_reason is not None or self._last_result_faulted,
            "heartbeat": self._heartbeat,
        }

    def _drive_locked(self, only: tuple[str, ...] | None = None) -> None:
        if not self._requested:
            raise OutputError(f"GPIO {self.cfg.chip}: lines are not requested (start() failed or was not called)")
        desired = self._desired()
        values = {offset: desired[role] for role, offset in self._offsets.items() if only is None or role in only}
        if not values:
            return
        try:
            self._lines.set_values(values)
        except (OSError, ValueError) as exc:
            raise OutputError(f"GPIO {self.cfg.chip}: cannot set lines {values}: {exc}") from exc
