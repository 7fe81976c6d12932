"""Recipe selection over GPIO: the PLC sets binary-coded select lines, then pulses STROBE; the station reads the
number, switches (edge_runtime/recipes.py) and raises an ACK output line once the new recipe is verified and active.

The handshake, as a PLC programmer sees it (`recipes.gpio` in the station file):

    SELECT0..N-1  ==X===== number (bit 0 = select[0]) =====X=====
    STROBE        ______|‾‾‾‾|____________________________________   read on the rising (asserted) edge
    ACK           ‾‾‾‾‾‾‾|_____________________|‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾   dropped at the strobe, raised when the recipe
    READY (gpio)  ‾‾‾‾‾‾‾‾|____________________|‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾   strobed last is verified and active

The select lines must be stable before STROBE rises (the kernel debounces every input by `debounce_ms`); they are
read at the strobe and again `debounce_ms` (at least 2 ms) later, and two different numbers are a FAULT naming
both (lines still changing: 1 -> 2 read mid-change is 0 or 3, another recipe), never a switch. A strobe
while a switch runs is queued like any request: the newest number wins, and ACK rises only for the switch the last
strobe asked for. A number that is no recipe (0 included: no select line set) puts the line in FAULT with a message
naming the number, and ACK stays low until a strobe selects a recipe that switches well. The lines are behind a
narrow interface (`RecipeLines`): libgpiod v2 on the device, a test double in the tests.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from edge_runtime.recipes import RecipeSwitcher

log = logging.getLogger("edge_runtime.recipe_gpio")

MAX_SELECT_LINES = 16   # recipe numbers are 1..65535


@dataclass(kw_only=True)
class RecipeGpioConfig:
    chip: str = "/dev/gpiochip0"
    select: list[int] = field(default_factory=list)   # input line offsets, bit 0 first: number = sum(bit_i << i)
    strobe: int                    # input line offset: its rising (asserted) edge reads the select lines
    ack: int | None = None         # output line offset: asserted once the strobed recipe is verified and active
    active_low: bool = False       # the select and strobe inputs are asserted low (e.g. open-collector PLC outputs)
    ack_active_low: bool = False   # the ACK output is asserted low
    debounce_ms: float = 5.0       # kernel debounce of every input line (relay or long-cable bounce)
    consumer: str = "patchcore-edge-recipe"   # shown by `gpioinfo` as the owner of the lines

    def validate(self) -> None:
        if not self.chip:
            raise ValueError("chip: must not be empty")
        if not 1 <= len(self.select) <= MAX_SELECT_LINES:
            raise ValueError(f"select: expected 1..{MAX_SELECT_LINES} line offsets (bit 0 first), got {len(self.select)}")
        seen: dict[int, str] = {}
        named = [(f"select[{i}]", o) for i, o in enumerate(self.select)] + [("strobe", self.strobe)]
        if self.ack is not None:
            named.append(("ack", self.ack))
        for key, offset in named:
            if offset < 0:
                raise ValueError(f"{key}: line offset must be 0 or more, got {offset}")
            if offset in seen:
                raise ValueError(f"{key}: line {offset} is already used by {seen[offset]}")
            seen[offset] = key
        if not 0 <= self.debounce_ms <= 1000:
            raise ValueError(f"debounce_ms: must be 0..1000, got {self.debounce_ms}")

    def largest_number(self) -> int:
        return (1 << len(self.select)) - 1


class RecipeLines(Protocol):
    """The narrow hardware interface; values are logical (True = asserted, active_low applied by the kernel)."""

    def request(self, cfg: RecipeGpioConfig) -> None:
        """Claim the select and strobe lines as debounced inputs and the ACK line (if any) as an output, inactive."""

    def watch_strobe(self, on_strobe: Callable[[], None]) -> None:
        """Call `on_strobe` (from another thread) on every edge of STROBE to asserted."""

    def read(self, offsets: Sequence[int]) -> list[bool]:
        """The select lines' values now, in the order given."""

    def set_ack(self, asserted: bool) -> None:
        """Drive the ACK line (no-op without one)."""

    def release(self) -> None:
        """Give every line back to the kernel (ACK inactive first)."""


class LibgpiodRecipeLines:
    """RecipeLines on libgpiod v2 (`gpiod` >= 2); imported only when a station selects recipes over GPIO."""

    def __init__(self) -> None:
        self._request = None
        self._cfg: RecipeGpioConfig | None = None
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    def request(self, cfg: RecipeGpioConfig) -> None:
        import gpiod
        from gpiod.line import Direction, Edge, Value

        debounce = timedelta(milliseconds=cfg.debounce_ms)
        config: dict = {tuple(cfg.select): gpiod.LineSettings(direction=Direction.INPUT, active_low=cfg.active_low,
                                                              debounce_period=debounce),
                        cfg.strobe: gpiod.LineSettings(direction=Direction.INPUT, edge_detection=Edge.RISING,
                                                       active_low=cfg.active_low, debounce_period=debounce)}
        if cfg.ack is not None:
            config[cfg.ack] = gpiod.LineSettings(direction=Direction.OUTPUT, active_low=cfg.ack_active_low,
                                                 output_value=Value.INACTIVE)
        self._cfg = cfg
        self._request = gpiod.request_lines(cfg.chip, consumer=cfg.consumer, config=config)

    def watch_strobe(self, on_strobe: Callable[[], None]) -> None:
        request = self._request
        self._stop.clear()

        def run() -> None:
            while not self._stop.is_set():
                try:
                    if request.wait_edge_events(timedelta(seconds=0.2)):
                        for _ in request.read_edge_events():
                            on_strobe()
                except Exception:  # noqa: BLE001 - a released request ends the watcher; anything else is logged
                    if not self._stop.is_set():
                        log.exception("recipe GPIO: STROBE watcher failed; GPIO recipe selection is off until restart")
                    return

        self._watcher = threading.Thread(target=run, name="recipe-gpio-strobe", daemon=True)
        self._watcher.start()

    def read(self, offsets: Sequence[int]) -> list[bool]:
        from gpiod.line import Value

        return [v == Value.ACTIVE for v in self._request.get_values(list(offsets))]

    def set_ack(self, asserted: bool) -> None:
        from gpiod.line import Value

        if self._cfg is not None and self._cfg.ack is not None and self._request is not None:
            self._request.set_value(self._cfg.ack, Value.ACTIVE if asserted else Value.INACTIVE)

    def release(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(1.0)
            self._watcher = None
        request, self._request = self._request, None
        if request is not None:
            try:
                self.set_ack(False)
            except Exception:  # noqa: BLE001 - released anyway below; the kernel takes the line back
                pass
            request.release()


class RecipeGpioSelector:
    """Reads a number on every strobe, asks the switcher for it and drives ACK from the outcome."""

    def __init__(self, switcher: "RecipeSwitcher", cfg: RecipeGpioConfig, lines: RecipeLines | None = None) -> None:
        self.switcher = switcher
        self.cfg = cfg
        self.lines: RecipeLines = lines if lines is not None else LibgpiodRecipeLines()
        self._lock = threading.Lock()
        self._generation = 0     # the strobe whose outcome drives ACK; an older switch's outcome is ignored
        self.strobes = 0

    def open(self) -> None:
        """Claim the lines (raises OSError/ValueError when they are missing or busy); ACK starts low."""
        self.lines.request(self.cfg)
        self.lines.watch_strobe(self.on_strobe)

    def close(self) -> None:
        self.lines.release()

    def read_number(self) -> int:
        values = self.lines.read(self.cfg.select)
        return sum(1 << i for i, on in enumerate(values) if on)

    def on_strobe(self) -> None:
        """STROBE rose (the watcher's thread): the select lines hold the number."""
        number = self.read_number()
        # Read again one debounce period later: lines still settling (a PLC that sets them and STROBE in one scan,
        # a slow relay) can read as a number between the old and the new, another product's recipe, and ACK would
        # rise for it (probe 65, by reading).
        time.sleep(max(self.cfg.debounce_ms, 2.0) / 1000.0)
        again = self.read_number()
        key: int | str = number
        if again != number:
            key = f"select lines changing ({number}, then {again})"
            number = again
        with self._lock:
            self.strobes += 1
            self._generation += 1
            generation = self._generation
            self.lines.set_ack(False)
        origin = f"gpio strobe (select lines read {number})"
        # An unsteady reading is no recipe: the line FAULTs naming both numbers until a steady strobe.
        waiter = self.switcher.submit(key, origin, fault_if_unknown=True, from_plc=True)
        waiter.add_done_callback(lambda f: self._outcome(generation, f))

    def _outcome(self, generation: int, waiter) -> None:
        outcome, message = waiter.result()
        with self._lock:
            if generation != self._generation:
                return   # a newer strobe asked for another number: only its outcome raises ACK
            if outcome == "ok":
                self.lines.set_ack(True)
        if outcome != "ok":
            log.error("recipe GPIO: strobe %d: %s; ACK stays low", generation, message)
