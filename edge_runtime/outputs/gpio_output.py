"""GPIO output lines through the Linux GPIO character device, libgpiod v2: a per-part handshake with the PLC.

Lines (each optional): OK, NG, REVIEW (verdict lines), BUSY, RESULT_VALID (handshake), READY, ERROR, heartbeat
(outputs), and ACK (an input from the PLC).

Every part gets its own signal, whichever mode is used. Timing (pulse mode, the default, `pulse_ms: 200`):

    trigger / frame   _|‾|____________________________________|‾|_________
    BUSY              __|‾‾‾‾‾‾‾‾‾‾‾‾‾|________________________|‾‾‾‾‾‾‾‾‾‾
    OK | NG | REVIEW  ________________|‾‾‾‾‾ pulse_ms ‾‾‾|_______________
    RESULT_VALID      _________________|‾‾‾ pulse_ms ‾‾‾|________________
                        ^ begin_part    ^ publish        ^ pulse ends (or ACK, or the next part's begin_part)

- begin_part (a trigger fired, or a free-run frame is about to be inspected) drops RESULT_VALID first, then
  OK/NG/REVIEW, and asserts BUSY: the previous part's verdict never stands while the next part is captured.
- publish sets the verdict lines and drops BUSY in one write, then asserts RESULT_VALID in a second write, so a
  PLC that latches OK/NG on the rising edge of RESULT_VALID reads settled lines.
- Pulse mode (`pulse_ms > 0`): RESULT_VALID and the verdict line drop after pulse_ms (RESULT_VALID first).
  Level mode (`pulse_ms: 0`): they hold until the PLC acknowledges (ACK input rising edge, or a serial `ACK`
  line when the station has a serial output with accept_trigger), until the next part's begin_part, or until
  READY drops / a fault. Without a RESULT_VALID or BUSY line a PLC sampling levels in level mode still sees
  OK fall at every begin_part; wire RESULT_VALID (or use pulse mode) so it knows when to sample.
- Hold (`hold_ms: 20`): a PLC reads its inputs once per scan, so an answer shorter than a scan, or a gap between
  two answers shorter than one, is not seen. Answers can come back to back (a folded trigger's FAULT and the part's
  verdict, frames in flight finished together): begin_part and publish wait until the last answer has stood
  hold_ms and the lines have been down hold_ms before the next one. ACK, a fault and READY down withdraw at once.

Verdicts: OK is asserted only for an inspected good part. NG for an anomalous one. REVIEW (score in the review
band: a person re-checks the part) asserts the REVIEW line and NEVER OK; it also asserts NG when `review_as_ng`
is true, and by default (`review_as_ng` unset) exactly when no REVIEW line is configured, so a PLC wired only to
OK/NG rejects it. FAULT (not inspected) asserts no verdict line and raises ERROR until the next part.

Fail-safe wiring: every line is driven INACTIVE when requested, and OK is the energised state. A FAULT result,
set_fault(), set_ready(False) and close() all drop OK. close() drives every line inactive before releasing it.
When the process dies, the kernel releases the lines and they return to the driver's default state, which is
usually an input (de-energised) but is driver-specific (some SoC drivers keep the last level). A station that must
survive a crashed or hung process therefore also wires the OK relay through a watchdog fed by the `heartbeat`
line: when the loop stops, the heartbeat stops toggling and OK drops.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal, Protocol

from edge_runtime.outputs.base import OUTPUTS, Output, OutputError
from edge_runtime.records import InspectionResult, Verdict

log = logging.getLogger(__name__)

VERDICT_ROLES = ("ok", "ng", "review")
# Lines whose asserted state lets a part or the line go on: they must read not asserted when the daemon is dead.
PASS_ROLES = ("ok", "ready")
OUTPUT_ROLES = ("ok", "ng", "review", "busy", "result_valid", "ready", "error", "heartbeat")


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
    review: GpioLine | None = None        # score in the review band: a person re-checks the part (never OK)
    busy: GpioLine | None = None          # asserted from the trigger (begin_part) until the verdict is set
    result_valid: GpioLine | None = None  # asserted after the verdict lines settled; the PLC latches on its edge
    ready: GpioLine | None = None
    error: GpioLine | None = None
    heartbeat: GpioLine | None = None     # toggled on every heartbeat() call, to feed an external watchdog
    ack: GpioLine | None = None           # INPUT: a rising (asserted) edge from the PLC withdraws the verdict
    pulse_ms: int = 200                   # >0: verdict + RESULT_VALID pulse this long; 0: hold until ACK/next part
    hold_ms: int = 20                     # every answer stands, and the gap before the next lasts, at least this long
    review_as_ng: bool | None = None      # REVIEW also asserts NG; unset: only when no review line is configured
    consumer: str = "patchcore-edge"      # shown by `gpioinfo` as the owner of the lines
    # What a line the daemon does not hold reads (a dead process, a released pin): the driver board's pull resistors.
    # Pull-downs (systemd/INSTALL.md) read low. OK and READY must read not asserted then (PASS_ROLES).
    released: Literal["low", "high"] = "low"

    def lines(self) -> dict[str, GpioLine]:
        """The configured output lines by role."""
        roles = {role: getattr(self, role) for role in OUTPUT_ROLES}
        return {role: line for role, line in roles.items() if line is not None}

    def review_drives_ng(self) -> bool:
        return self.review is None if self.review_as_ng is None else self.review_as_ng

    def validate(self) -> None:
        lines = self.lines()
        if not lines:
            raise ValueError("configure at least one of " + ", ".join(OUTPUT_ROLES))
        seen: dict[int, str] = {}
        for role, line in [*lines.items(), *([("ack", self.ack)] if self.ack else [])]:
            if line.offset in seen:
                raise ValueError(f"{role}.offset: line {line.offset} is already used by {seen[line.offset]}")
            seen[line.offset] = role
        if self.pulse_ms < 0:
            raise ValueError(f"pulse_ms: must be 0 or more, got {self.pulse_ms}")
        if self.hold_ms < 0:
            raise ValueError(f"hold_ms: must be 0 or more, got {self.hold_ms}")
        if self.pulse_ms > 0 and self.hold_ms > self.pulse_ms:
            raise ValueError(f"hold_ms: must not exceed pulse_ms ({self.pulse_ms}), got {self.hold_ms}")
        if not self.chip:
            raise ValueError("chip: must not be empty")
        if self.released not in ("low", "high"):
            raise ValueError(f"released: must be low or high, got {self.released!r}")
        for role in PASS_ROLES:
            line = getattr(self, role)
            # An active-low OK line on a board with pull-downs (or an active-high one with pull-ups) reads asserted
            # when the process dies and the kernel releases the pin: the PLC reads OK / READY from a dead station.
            if line is not None and line.active_low == (self.released == "low"):
                raise ValueError(
                    f"{role}.active_low: an {'active-low' if line.active_low else 'active-high'} {role.upper()} line "
                    f"reads asserted when the daemon dies and releases it (released: {self.released}, the board's "
                    f"pull-{'downs' if self.released == 'low' else 'ups'}): wire {role.upper()} so that the released "
                    f"level is not asserted (active_low: {str(not line.active_low).lower()}), or set released to "
                    f"what the board's pull resistors really give")


class GpioLines(Protocol):
    """The narrow hardware interface GpioOutput drives; values are logical (True = asserted)."""

    def request(self, offsets: Mapping[int, bool]) -> None:
        """Claim lines as outputs, all driven inactive. `offsets` maps offset -> active_low."""

    def set_values(self, values: Mapping[int, bool]) -> None:
        """Drive the given lines (offset -> asserted)."""

    def watch(self, offset: int, active_low: bool, on_assert: Callable[[], None]) -> None:
        """Claim one input line and call `on_assert` (from another thread) on every edge to asserted."""

    def release(self) -> None:
        """Give the lines back to the kernel (outputs and the watched input)."""


class LibgpiodLines:
    """GpioLines on libgpiod v2 (`gpiod` Python package >= 2); `gpiod` is imported only when lines are requested."""

    def __init__(self, chip: str, consumer: str) -> None:
        self.chip = chip
        self.consumer = consumer
        self._request = None
        self._input = None          # the ACK input's request
        self._watcher: threading.Thread | None = None
        self._stop = threading.Event()
        self._value = None  # gpiod.line.Value, bound on request()
        self._gpiod_errors: tuple[type[BaseException], ...] = ()
        self.watch_failure: str | None = None  # why the ACK watcher ended on its own (GpioOutput.failure)

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

    def watch(self, offset: int, active_low: bool, on_assert: Callable[[], None]) -> None:
        import gpiod
        from gpiod.line import Direction, Edge

        settings = gpiod.LineSettings(direction=Direction.INPUT, edge_detection=Edge.RISING, active_low=active_low,
                                      debounce_period=timedelta(milliseconds=2))
        self._input = gpiod.request_lines(self.chip, consumer=self.consumer + "-ack", config={offset: settings})
        self._stop.clear()
        self.watch_failure = None
        request = self._input

        def run() -> None:
            while not self._stop.is_set():
                try:
                    if not request.wait_edge_events(timedelta(seconds=0.2)):
                        continue
                    request.read_edge_events()
                except Exception as exc:  # noqa: BLE001 - a released request ends the watcher; anything else is logged
                    if not self._stop.is_set():
                        # The input is gone: say so (GpioOutput.failure), a PLC's ACK no longer reaches the station.
                        self.watch_failure = f"ACK input lost, ACK is ignored until restart: {exc}"
                        log.exception("GPIO %s: ACK input watcher failed; ACK is ignored until restart", self.chip)
                    return
                try:
                    on_assert()
                except Exception:  # noqa: BLE001 - one failed withdrawal (EIO) must not end the watcher for good
                    log.exception("GPIO %s: handling an ACK failed; the watcher goes on", self.chip)

        self._watcher = threading.Thread(target=run, name=f"gpio-ack:{self.chip}", daemon=True)
        self._watcher.start()

    def release(self) -> None:
        self._stop.set()
        request, self._request = self._request, None
        inp, self._input = self._input, None
        if self._watcher is not None:
            self._watcher.join(1.0)
            self._watcher = None
        for req in (inp, request):
            if req is not None:
                try:
                    req.release()
                except self._gpiod_errors as exc:
                    raise OSError(f"GPIO request on {self.chip}: {exc}") from exc


@OUTPUTS.register(GpioConfig)
class GpioOutput(Output):
    """Drives the verdict, handshake, READY/ERROR and heartbeat lines; see the module docstring for the timing."""

    def __init__(self, cfg: GpioConfig, lines: GpioLines | None = None) -> None:
        self.cfg = cfg
        self.name = f"gpio:{cfg.chip}"
        self._lines: GpioLines = lines if lines is not None else LibgpiodLines(cfg.chip, cfg.consumer)
        self._offsets = {role: line.offset for role, line in cfg.lines().items()}
        self._lock = threading.Lock()  # the loop, the pulse timer and the ACK watcher all drive lines
        self._requested = False
        self._state = {role: False for role in OUTPUT_ROLES}
        # A write failed: the pins may not show _state (a verdict the station withdrew may still stand), so the
        # next write sets every line, not only the ones that changed, until one succeeds.
        self._unsure = False
        self._fault_reason: str | None = None
        self._last_result_faulted = False
        self._pulse_generation = 0
        self._pulse_timer: threading.Timer | None = None
        # The pulse timer could not withdraw the verdict: the pins may still show it (failure() reports it).
        self._pulse_failure: str | None = None
        self.acks = 0  # acknowledgements: ACK edges from the PLC, software triggers (each withdraws the verdict)
        # When the last answer went up and when it was last withdrawn (monotonic): the hold (module docstring).
        self._shown_at: float | None = None
        self._withdrawn_at: float | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            if self._requested:
                return
            try:
                self._lines.request({line.offset: line.active_low for line in self.cfg.lines().values()})
                if self.cfg.ack is not None:
                    self._lines.watch(self.cfg.ack.offset, self.cfg.ack.active_low, self.acknowledge)
            except (OSError, ValueError) as exc:  # gpiod raises OSError (no chip, busy line) or ValueError (offset)
                raise OutputError(f"GPIO {self.cfg.chip}: cannot request lines {sorted(self._offsets.values())}: {exc}") from exc
            self._requested = True
            self._state = {role: False for role in OUTPUT_ROLES}
            self._drive_locked()

    def close(self) -> None:
        with self._lock:
            self._cancel_pulse_locked()
            self._state = {role: False for role in OUTPUT_ROLES}
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
    def begin_part(self, frame_id: int) -> None:
        self._hold_shown()   # the last answer (a folded trigger's FAULT) stands hold_ms before it is withdrawn
        with self._lock:
            try:
                self._begin_locked()
            except OutputError as exc:
                # The last part's OK may still stand while this part is inspected: try once more at once (a
                # transient EIO), writing every line; a second failure is the bus's error to count and log.
                log.error("%s: withdrawing the last verdict failed, retrying: %s", self.name, exc)
                self._begin_locked()

    def _begin_locked(self) -> None:
        self._withdraw_locked()
        faulted, self._last_result_faulted = self._last_result_faulted, False
        self._state["busy"] = True
        self._drive_locked(only=("busy", "error"))
        if faulted:
            self._withdrawn_at = time.monotonic()   # ERROR of a FAULT answer dropped: the gap starts

    def publish(self, result: InspectionResult) -> None:
        v = result.verdict
        self._hold_shown()   # a publish with no begin_part before it replaces the last answer: it stands first
        with self._lock:
            self._cancel_pulse_locked()
            if self._state["result_valid"]:
                self._state["result_valid"] = False  # never show RESULT_VALID while the verdict lines change
                self._drive_locked(only=("result_valid",))
                self._withdrawn_at = time.monotonic()
        self._hold_gap()     # down for hold_ms since the last answer: the PLC sees two answers, not one long one
        with self._lock:
            # OK only for a part that was inspected and passed; anything else leaves OK de-energised.
            self._state["ok"] = v is Verdict.OK
            self._state["review"] = v is Verdict.REVIEW
            self._state["ng"] = v is Verdict.NG or (v is Verdict.REVIEW and self.cfg.review_drives_ng())
            self._state["busy"] = False
            self._last_result_faulted = v is Verdict.FAULT
            self._drive_locked(only=(*VERDICT_ROLES, "busy", "error"))
            self._state["result_valid"] = True
            self._drive_locked(only=("result_valid",))
            self._shown_at = time.monotonic()
            if self.cfg.pulse_ms > 0:
                self._pulse_generation += 1
                timer = threading.Timer(self.cfg.pulse_ms / 1000.0, self._end_pulse, args=(self._pulse_generation,))
                timer.daemon = True
                self._pulse_timer = timer
                timer.start()

    def acknowledge(self) -> None:
        with self._lock:
            self.acks += 1
            if self._requested:
                # Not a state call (the bus does not fault the line on it) and the ACK watcher has no caller.
                self._withdraw_or_hold("withdrawing the verdict on ACK failed", reraise=True)

    def set_ready(self, ready: bool) -> None:
        with self._lock:
            self._state["ready"] = bool(ready)
            if not ready:
                # A station that stopped inspecting must not leave the previous part's OK standing for the next.
                self._withdraw_locked()
                self._state["busy"] = False
            self._drive_locked()

    def set_fault(self, reason: str | None) -> None:
        with self._lock:
            self._fault_reason = reason
            if reason is not None:
                self._withdraw_locked()
            self._drive_locked()

    def heartbeat(self) -> None:
        if "heartbeat" not in self._offsets:
            return
        with self._lock:
            self._state["heartbeat"] = not self._state["heartbeat"]
            self._drive_locked(only=("heartbeat",))

    @property
    def state(self) -> dict[str, bool]:
        """Logical state by role (for tests and diagnostics)."""
        with self._lock:
            return {**self._state, "error": self._error_locked()}

    # -- internals -------------------------------------------------------------------------------------------
    def _showing_locked(self) -> bool:
        """An answer is up: RESULT_VALID, a verdict line, or the ERROR of a FAULT answer."""
        return self._state["result_valid"] or any(self._state[r] for r in VERDICT_ROLES) or self._last_result_faulted

    def _hold_shown(self) -> None:
        """Wait (without the lock: ACK and the pulse timer go on) until the answer up now has stood hold_ms."""
        with self._lock:
            if self._shown_at is None or not self._showing_locked():
                return
            remaining = self.cfg.hold_ms / 1000.0 - (time.monotonic() - self._shown_at)
        if remaining > 0:
            time.sleep(remaining)

    def _hold_gap(self) -> None:
        """Wait until the lines have been down hold_ms since the last answer was withdrawn."""
        with self._lock:
            if self._withdrawn_at is None:
                return
            remaining = self.cfg.hold_ms / 1000.0 - (time.monotonic() - self._withdrawn_at)
        if remaining > 0:
            time.sleep(remaining)

    def _withdraw_locked(self) -> None:
        """Drop RESULT_VALID, then the verdict lines (two writes: the PLC never sees valid with changing lines)."""
        self._cancel_pulse_locked()
        shown = self._state["result_valid"] or any(self._state[r] for r in VERDICT_ROLES)
        if self._state["result_valid"] or self._unsure:
            self._state["result_valid"] = False
            self._drive_locked(only=("result_valid",))
        if any(self._state[r] for r in VERDICT_ROLES) or self._unsure:
            for role in VERDICT_ROLES:
                self._state[role] = False
            self._drive_locked(only=VERDICT_ROLES)
        if shown:
            self._withdrawn_at = time.monotonic()

    def _end_pulse(self, generation: int) -> None:
        with self._lock:
            if generation != self._pulse_generation or not self._requested:
                return  # a newer part or close() took over the lines
            self._pulse_timer = None
            self._withdraw_or_hold("ending the verdict pulse failed")   # no caller to raise to from a timer thread

    def _cancel_pulse_locked(self) -> None:
        self._pulse_generation += 1
        if self._pulse_timer is not None:
            self._pulse_timer.cancel()
            self._pulse_timer = None

    def _withdraw_or_hold(self, what: str, reraise: bool = False) -> None:
        """Withdraw the verdict lines (lock held). If that fails OK may still stand: the pins owe the withdrawn state
        (every line is written on the next write), and failure() holds the line in FAULT until a write of every
        line succeeds (the heartbeat's, on the next loop, or the retry's)."""
        try:
            self._withdraw_locked()
        except OutputError as exc:
            self._state.update({role: False for role in (*VERDICT_ROLES, "result_valid")})
            self._pulse_failure = f"{what}, OK may still show: {exc}"
            log.error("%s: %s", self.name, self._pulse_failure)
            if reraise:
                raise

    def failure(self) -> str | None:
        with self._lock:
            if self._pulse_failure is not None:
                return self._pulse_failure
        # The ACK input died (chip or line gone): level-mode verdicts can no longer be acknowledged.
        return getattr(self._lines, "watch_failure", None)

    def _error_locked(self) -> bool:
        return self._fault_reason is not None or self._last_result_faulted

    def _drive_locked(self, only: tuple[str, ...] | None = None) -> None:
        if not self._requested:
            raise OutputError(f"GPIO {self.cfg.chip}: lines are not requested (start() failed or was not called)")
        desired = {**self._state, "error": self._error_locked()}
        if self._unsure:
            only = None
        values = {offset: desired[role] for role, offset in self._offsets.items() if only is None or role in only}
        if not values:
            return
        try:
            self._lines.set_values(values)
        except (OSError, ValueError) as exc:
            self._unsure = True
            raise OutputError(f"GPIO {self.cfg.chip}: cannot set lines {values}: {exc}") from exc
        self._unsure = False
        if only is None:   # every line written as the station means it: a failed pulse end is mended
            self._pulse_failure = None
