"""FakeGpioLines: the GpioLines test double (edge_runtime.outputs.gpio_output.GpioLines), driven in place of
libgpiod so the GPIO output's timing and fail-safe states can be checked without a GPIO chip."""
from __future__ import annotations

from typing import Callable, Mapping


class FakeGpioLines:
    """GpioLines test double: keeps the logical state and records every change in order."""

    def __init__(self) -> None:
        self.active_low: dict[int, bool] = {}
        self.state: dict[int, bool] = {}            # logical value per requested offset
        self.events: list[tuple] = []               # ("request", {...}) / ("set", {...}) / ("release",)
        self.history: list[dict[int, bool]] = []    # full state after every request/set
        self.requested = False
        self.fail_with: Exception | None = None     # raised by the next request/set_values, then cleared
        self.watched: dict[int, Callable[[], None]] = {}

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

    def watch(self, offset: int, active_low: bool, on_assert: Callable[[], None]) -> None:
        self.watched[offset] = on_assert

    def press(self, offset: int) -> None:
        """The PLC asserts the watched input `offset` (an edge to asserted)."""
        self.watched[offset]()

    def release(self) -> None:
        self.requested = False
        self.state = {}
        self.watched = {}
        self.events.append(("release",))

    def physical(self, offset: int) -> bool:
        """Electrical level (True = high) of a requested line, applying active_low like the kernel does."""
        return self.state[offset] != self.active_low[offset]
