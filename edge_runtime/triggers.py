"""Trigger modes: when the daemon captures. One interface, `Trigger.wait(timeout) -> bool` (True = capture now).

free_run: always. software: `fire()` from POST /trigger or a serial `TRG` line. gpio: an edge on an input line
(libgpiod v2, imported only when a station uses it).
"""
from __future__ import annotations

import abc
import logging
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Literal, Protocol, Union

log = logging.getLogger(__name__)

SERIAL_TRIGGER_COMMAND = "TRG"


class TriggerError(RuntimeError):
    """The trigger input cannot be used (GPIO line busy or missing): the daemon faults and retries."""


# -- config ----------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class FreeRunTriggerConfig:
    type: Literal["free_run"] = "free_run"


@dataclass(kw_only=True)
class SoftwareTriggerConfig:
    type: Literal["software"] = "software"


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

    def validate(self) -> None:
        if isinstance(self.line, int) and self.line < 0:
            raise ValueError(f"line: offset must be >= 0, got {self.line}")
        if isinstance(self.line, str) and not self.line:
            raise ValueError("line: must be an offset or a line name")
        if self.debounce_ms < 0:
            raise ValueError(f"debounce_ms: must be >= 0, got {self.debounce_ms}")


TriggerConfig = Union[FreeRunTriggerConfig, SoftwareTriggerConfig, GpioTriggerConfig]


# -- triggers --------------------------------------------------------------------------------------------------


class Trigger(abc.ABC):
    name: str = "trigger"
    # Triggers that arrived while one was already waiting to be served: those parts were not captured separately.
    overruns: int = 0

    def open(self) -> None:
        """Acquire the input; raise TriggerError if it is not there."""

    @abc.abstractmethod
    def wait(self, timeout: float) -> bool:
        """True when a capture should happen now; False when nothing fired within `timeout` seconds."""

    @property
    def is_free_run(self) -> bool:
        """Free run captures continuously, so sources need not discard buffered frames."""
        return False

    def close(self) -> None:
        """Release the input."""


class FreeRunTrigger(Trigger):
    name = "free_run"

    def wait(self, timeout: float) -> bool:
        return True

    @property
    def is_free_run(self) -> bool:
        return True


class SoftwareTrigger(Trigger):
    """Thread-safe: fire() is called from the HTTP or serial thread, wait() from the inspection loop.

    Fires that arrive before the loop served the previous one coalesce into one capture and count as overruns,
    so a backlog never makes the station capture long after the part went by."""

    name = "software"

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._pending = False
        self.fired = 0
        self.overruns = 0

    def fire(self) -> None:
        with self._cond:
            self.fired += 1
            if self._pending:
                self.overruns += 1
            self._pending = True
            self._cond.notify_all()

    def handle_line(self, line: str) -> bool:
        """Fire if `line` is the serial trigger command (`TRG`, any case, surrounding whitespace ignored)."""
        if line.strip().upper() == SERIAL_TRIGGER_COMMAND:
            self.fire()
            return True
        return False

    def wait(self, timeout: float) -> bool:
        with self._cond:
            if not self._pending:
                self._cond.wait_for(lambda: self._pending, timeout=max(0.0, timeout))
            if self._pending:
                self._pending = False
                return True
            return False


class EdgeLine(Protocol):
    """The narrow slice of a GPIO input the trigger needs; `GpiodEdgeLine` is the real one."""

    def wait_edges(self, timeout: float) -> int:
        """Block up to `timeout` s; return the number of edges that arrived (0 on timeout) and consume them."""
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

    def wait_edges(self, timeout: float) -> int:
        if not self._request.wait_edge_events(timedelta(seconds=max(0.0, timeout))):
            return 0
        return len(self._request.read_edge_events())

    def close(self) -> None:
        self._request.release()


class FakeEdgeLine:
    """Test double for EdgeLine: `push_edge()` from the test, `wait_edges()` from the trigger."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._edges = 0
        self.closed = False

    def push_edge(self, count: int = 1) -> None:
        with self._cond:
            self._edges += count
            self._cond.notify_all()

    def wait_edges(self, timeout: float) -> int:
        with self._cond:
            self._cond.wait_for(lambda: self._edges > 0, timeout=max(0.0, timeout))
            edges, self._edges = self._edges, 0
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
        self.edges = 0
        self.overruns = 0

    def open(self) -> None:
        self.close()
        self._line = self._factory(self.cfg)

    def wait(self, timeout: float) -> bool:
        if self._line is None:
            self.open()
        assert self._line is not None
        try:
            count = self._line.wait_edges(timeout)
        except OSError as exc:
            raise TriggerError(f"gpio trigger: waiting for an edge on {self.cfg.chip} line {self.cfg.line!r} failed: {exc}") from exc
        if count <= 0:
            return False
        self.edges += count
        self.overruns += count - 1
        return True

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
        return SoftwareTrigger()
    if isinstance(cfg, GpioTriggerConfig):
        return GpioTrigger(cfg, line_factory)
    raise TypeError(f"no trigger for config {type(cfg).__name__}")
