"""Trigger modes: when the daemon captures. One interface, `Trigger.wait(timeout) -> TriggerEvent | None`.

free_run: always. software: `fire()` from POST /trigger or a serial `TRG` line. gpio: an edge on an input line
(libgpiod v2, imported only when a station uses it).

Every trigger is a part in front of the camera, so every trigger gets an answer. A TriggerEvent carries when the
trigger arrived (time.monotonic(); the kernel's edge timestamp for GPIO) and how many earlier triggers were folded
into it because the loop was busy (`missed`). The station answers each missed one with a FAULT result, a trigger
older than `max_age_ms` when the loop gets to it with a FAULT result (the part has moved on: capturing now would
inspect the wrong part), and triggers that arrive while it cannot inspect (fault, backoff, no bundle) with
FAULT results at once (`drain()`), never with a late capture.
"""
from __future__ import annotations

import abc
import logging
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Literal, Protocol, Union

from edge_runtime.freeze_watch import FREEZE_WATCH, FreezeWatch

log = logging.getLogger(__name__)

SERIAL_TRIGGER_COMMAND = "TRG"
# At most this many triggers fold into one waiting capture (each answered FAULT as an overrun by the line); a fire
# beyond that is refused, so that every trigger the station says it accepted gets its own answer and record
# (probe 47: four OPC UA clients calling StartSingleJob back to back had 2067 calls accepted, 958 answered).
MAX_FOLDED = 16
DEFAULT_MAX_AGE_MS = 250.0   # a trigger the loop reaches later than this is answered FAULT instead of captured


class TriggerError(RuntimeError):
    """The trigger input cannot be used (GPIO line busy or missing): the daemon faults and retries."""


# -- config ----------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class FreeRunTriggerConfig:
    type: Literal["free_run"] = "free_run"


@dataclass(kw_only=True)
class SoftwareTriggerConfig:
    type: Literal["software"] = "software"
    max_age_ms: float = DEFAULT_MAX_AGE_MS    # older when the loop reaches it: FAULT for that part, no capture

    def validate(self) -> None:
        if self.max_age_ms <= 0:
            raise ValueError(f"max_age_ms: must be > 0, got {self.max_age_ms}")


@dataclass(kw_only=True)
class GpioTriggerConfig:
    type: Literal["gpio"] = "gpio"
    chip: str = "/dev/gpiochip0"
    line: int | str                            # offset on the chip, or the line's name
    edge: Literal["rising", "falling", "both"] = "rising"
    bias: Literal["as_is", "pull_up", "pull_down", "disabled"] = "as_is"
    active_low: bool = False
    debounce_ms: float = 0.0                   # kernel debounce, for mechanical switches
    consumer: str = "edge-runtime-trigger"
    max_age_ms: float = DEFAULT_MAX_AGE_MS    # older when the loop reaches it: FAULT for that part, no capture

    def validate(self) -> None:
        if self.max_age_ms <= 0:
            raise ValueError(f"max_age_ms: must be > 0, got {self.max_age_ms}")
        if isinstance(self.line, int) and self.line < 0:
            raise ValueError(f"line: offset must be >= 0, got {self.line}")
        if isinstance(self.line, str) and not self.line:
            raise ValueError("line: must be an offset or a line name")
        # As recipes.gpio.debounce_ms: a kernel debounce past a second only delays every part; and a huge one passed
        # validate, then raised OverflowError building the timedelta at the trigger's open (a traceback, no station).
        if not 0 <= self.debounce_ms <= 1000:
            raise ValueError(f"debounce_ms: must be 0..1000, got {self.debounce_ms}")


TriggerConfig = Union[FreeRunTriggerConfig, SoftwareTriggerConfig, GpioTriggerConfig]


# -- triggers --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TriggerEvent:
    """One trigger to serve: `at` is when it arrived (time.monotonic() seconds), `missed` how many earlier
    triggers were folded into it (parts that get no capture of their own: the station answers them FAULT)."""

    at: float
    missed: int = 0
    # When each folded trigger arrived (oldest first; may be shorter than `missed`): their FAULT answers are dated
    # by their own trigger, so one whose deadline passed while the loop could not serve (a start-up's bundle load)
    # is recorded but never sent on a serial line as the answer to a later part (probe 67).
    folded_at: tuple[float, ...] = ()

    def age_ms(self, now: float | None = None) -> float:
        return ((time.monotonic() if now is None else now) - self.at) * 1000.0


class Trigger(abc.ABC):
    name: str = "trigger"
    # Triggers that arrived while one was already waiting to be served: those parts were not captured separately.
    overruns: int = 0
    max_age_ms: float | None = None   # None: triggers do not expire (free run)

    def open(self) -> None:
        """Acquire the input; raise TriggerError if it is not there."""

    @abc.abstractmethod
    def wait(self, timeout: float) -> TriggerEvent | None:
        """The trigger to serve now, or None when nothing fired within `timeout` seconds."""

    def drain(self, timeout: float = 0.0) -> list[TriggerEvent]:
        """Triggers waiting now, or the first to arrive within `timeout` s (the station answers them FAULT at once
        while it cannot inspect); [] at once where the trigger cannot wait (the caller sleeps instead)."""
        return []

    @property
    def is_free_run(self) -> bool:
        """Free run captures continuously, so sources need not discard buffered frames."""
        return False

    def close(self) -> None:
        """Release the input."""


class FreeRunTrigger(Trigger):
    name = "free_run"

    def wait(self, timeout: float) -> TriggerEvent | None:
        return TriggerEvent(at=time.monotonic())

    @property
    def is_free_run(self) -> bool:
        return True


class SoftwareTrigger(Trigger):
    """Thread-safe: fire() is called from the HTTP or serial thread, wait() from the inspection loop.

    Fires that arrive before the loop served the previous one coalesce into one capture and count as overruns,
    so a backlog never makes the station capture long after the part went by."""

    name = "software"

    def __init__(self, cfg: SoftwareTriggerConfig | None = None, freeze_watch: FreezeWatch | None = None) -> None:
        self.max_age_ms = (cfg or SoftwareTriggerConfig()).max_age_ms
        if freeze_watch is None:   # the process's own, ticking on its thread (a test passes one it drives)
            freeze_watch = FREEZE_WATCH
            freeze_watch.start()
        self._freeze_watch = freeze_watch
        # Called in the firing thread before the trigger is queued (the line: withdraw the previous verdict).
        self.on_fire: Callable[[], None] | None = None
        self._cond = threading.Condition()
        self._pending: float | None = None   # arrival time of the newest unserved fire
        self._missed = 0
        self._folded: list[float] = []       # arrival times of the fires folded into it, oldest first
        self.fired = 0
        self.overruns = 0
        self.refused = 0
        # Set by close() (the station stops): a fire after it is refused, never queued for a loop that has ended
        # (probe 67: serial TRGs sent in the second a stop took were left with no answer and no record).
        self._closed = False

    def fire(self, at: float | None = None, sent_age_s: float | None = None) -> bool:
        """A part is there now (`at`: its time.monotonic(), default: when it was read, or the start of a freeze
        of this process it was read right after: FreezeWatch; `sent_age_s`: how long ago the sender says it sent
        the trigger, when it says so: a broker that held it counts against max_age too).

        False: refused, MAX_FOLDED triggers already wait for the loop (the caller says so: 503, a bad status)."""
        if at is None:
            now = time.monotonic()
            at = self._freeze_watch.earliest(now)
            if sent_age_s is not None and sent_age_s > 0:
                at = min(at, now - sent_age_s)
        if self._closed:
            with self._cond:
                self.refused += 1
            log.warning("trigger refused: the station is stopping (%d refused so far)", self.refused)
            return False
        if self.on_fire is not None:
            self.on_fire()   # before the loop can capture: nothing of the previous part is readable after this
        with self._cond:
            if self._pending is not None and self._missed >= MAX_FOLDED:
                self.refused += 1
                if self.refused == 1 or self.refused % 100 == 0:
                    log.warning("trigger refused: %d triggers already wait for the inspection loop (%d refused "
                                "so far)", MAX_FOLDED + 1, self.refused)
                return False
            self.fired += 1
            if self._pending is not None:
                self.overruns += 1
                self._missed += 1
                self._folded.append(self._pending)
            self._pending = at
            self._cond.notify_all()
        return True

    def handle_line(self, line: str) -> bool:
        """Fire if `line` is the serial trigger command (`TRG`, any case, surrounding whitespace ignored)."""
        if line.strip().upper() == SERIAL_TRIGGER_COMMAND:
            self.fire()
            return True
        return False

    def wait(self, timeout: float) -> TriggerEvent | None:
        with self._cond:
            if self._pending is None:
                self._cond.wait_for(lambda: self._pending is not None, timeout=max(0.0, timeout))
            if self._pending is None:
                return None
            event = TriggerEvent(at=self._pending, missed=self._missed, folded_at=tuple(self._folded))
            self._pending, self._missed, self._folded = None, 0, []
            return event

    def drain(self, timeout: float = 0.0) -> list[TriggerEvent]:
        event = self.wait(timeout)
        return [] if event is None else [event]

    def open(self) -> None:
        self._closed = False

    def close(self) -> None:
        """From now on fire() refuses (False); triggers already fired stay for drain() to answer."""
        self._closed = True


class EdgeLine(Protocol):
    """The narrow slice of a GPIO input the trigger needs; `GpiodEdgeLine` is the real one."""

    def wait_edges(self, timeout: float) -> list[float]:
        """Block up to `timeout` s; return the time.monotonic() of each edge that arrived (none on timeout),
        oldest first, and consume them."""
        ...

    def close(self) -> None: ...


class GpiodEdgeLine:
    """Edge events from one input line through libgpiod v2 (`gpiod` Python package, imported here only)."""

    def __init__(self, cfg: GpioTriggerConfig) -> None:
        try:
            import gpiod
            from gpiod.line import Bias, Direction, Edge
        except ImportError as exc:
            raise TriggerError("gpio trigger: the 'gpiod' package (libgpiod v2 bindings) is not installed") from exc
        settings = gpiod.LineSettings(
            direction=Direction.INPUT,
            edge_detection={"rising": Edge.RISING, "falling": Edge.FALLING, "both": Edge.BOTH}[cfg.edge],
            bias={"as_is": Bias.AS_IS, "pull_up": Bias.PULL_UP, "pull_down": Bias.PULL_DOWN, "disabled": Bias.DISABLED}[cfg.bias],
            active_low=cfg.active_low,
            debounce_period=timedelta(milliseconds=cfg.debounce_ms),
        )
        try:
            self._request = gpiod.request_lines(cfg.chip, consumer=cfg.consumer, config={cfg.line: settings})
        except Exception as exc:  # OSError for a missing chip or busy line, ValueError for an unknown line name
            raise TriggerError(f"gpio trigger: cannot request line {cfg.line!r} on {cfg.chip}: {exc}") from exc

    def wait_edges(self, timeout: float) -> list[float]:
        if not self._request.wait_edge_events(timedelta(seconds=max(0.0, timeout))):
            return []
        # libgpiod v2 stamps events with CLOCK_MONOTONIC by default: the same clock as time.monotonic().
        return [event.timestamp_ns / 1e9 for event in self._request.read_edge_events()]

    def close(self) -> None:
        self._request.release()


class FakeEdgeLine:
    """Test double for EdgeLine: `push_edge()` from the test, `wait_edges()` from the trigger."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._edges: list[float] = []
        self.closed = False

    def push_edge(self, count: int = 1, at: float | None = None) -> None:
        with self._cond:
            self._edges += [time.monotonic() if at is None else at] * count
            self._cond.notify_all()

    def wait_edges(self, timeout: float) -> list[float]:
        with self._cond:
            self._cond.wait_for(lambda: bool(self._edges), timeout=max(0.0, timeout))
            edges, self._edges = self._edges, []
            return edges

    def close(self) -> None:
        self.closed = True


EdgeLineFactory = Callable[[GpioTriggerConfig], EdgeLine]


class GpioTrigger(Trigger):
    """Captures on an edge. Several edges read together (the loop was busy) give one capture and count as overruns."""

    name = "gpio"

    def __init__(self, cfg: GpioTriggerConfig, line_factory: EdgeLineFactory | None = None) -> None:
        cfg.validate()
        self.cfg = cfg
        self._factory: EdgeLineFactory = line_factory or GpiodEdgeLine
        self._line: EdgeLine | None = None
        self.max_age_ms = cfg.max_age_ms
        self.edges = 0
        self.overruns = 0

    def open(self) -> None:
        self.close()
        self._line = self._factory(self.cfg)

    def wait(self, timeout: float) -> TriggerEvent | None:
        if self._line is None:
            self.open()
        assert self._line is not None
        try:
            edges = self._line.wait_edges(timeout)
        except OSError as exc:
            raise TriggerError(f"gpio trigger: waiting for an edge on {self.cfg.chip} line {self.cfg.line!r} failed: {exc}") from exc
        if not edges:
            return None
        self.edges += len(edges)
        self.overruns += len(edges) - 1
        # The newest edge is the part in front of the camera now; the earlier ones were missed.
        return TriggerEvent(at=edges[-1], missed=len(edges) - 1, folded_at=tuple(edges[:-1]))

    def drain(self, timeout: float = 0.0) -> list[TriggerEvent]:
        if self._line is None:
            return []  # not requested: the kernel keeps no edges for us
        try:
            event = self.wait(timeout)
        except TriggerError:
            return []
        return [] if event is None else [event]

    def close(self) -> None:
        if self._line is not None:
            line, self._line = self._line, None
            try:
                line.close()
            except OSError as exc:
                log.warning("gpio trigger: release failed: %s", exc)


def build_trigger(cfg: TriggerConfig, line_factory: EdgeLineFactory | None = None) -> Trigger:
    if isinstance(cfg, FreeRunTriggerConfig):
        return FreeRunTrigger()
    if isinstance(cfg, SoftwareTriggerConfig):
        return SoftwareTrigger(cfg)
    if isinstance(cfg, GpioTriggerConfig):
        return GpioTrigger(cfg, line_factory)
    raise TypeError(f"no trigger for config {type(cfg).__name__}")
