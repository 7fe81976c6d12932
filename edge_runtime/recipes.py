"""Recipes (product changeover): a line holds several bundles, one per product, and the line controller selects one.

Selection: a Modbus holding register in the PLC area (`modbus_register`, with the modbus output's
`allow_writes: true`), a serial line `RCP <number|name>` (serial output with `accept_trigger: true`), or
POST /recipe/<name> (`allow_http: true`). Every switch is verified before the line inspects with it: a recipe
not loaded yet is loaded from disk (checksums, signature, product, version floor, golden self-test), one loaded
before is self-tested again on its golden images. It is logged, acknowledged on the outputs that can show it
(serial `RCP <number> <name> OK <ms>` / `ERR <reason>`, Modbus holding registers 7-8) and timed.

While a switch runs the line is in FAULT (kind "recipe", READY dropped): a trigger is answered FAULT at once,
and after the switch any part triggered or captured before it ended is FAULT too, so no part is ever inspected
with the wrong recipe. A failed switch leaves the line in FAULT until a switch succeeds: the controller asked
for another product, so the old recipe must not go on passing parts.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from edge_runtime.line import Line
    from edge_runtime.pipeline import Pipeline

log = logging.getLogger("edge_runtime.recipes")

__all__ = ["RecipeConfig", "RecipesConfig", "RecipeSwitcher", "RECIPE_STATUS"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
# Modbus holding register 8 (and the serial word): where the last switch stands.
RECIPE_STATUS = {"none": 0, "switching": 1, "ok": 2, "failed": 3}


@dataclass(kw_only=True)
class RecipeConfig:
    name: str                  # the product's name (logs, HTTP, serial RCP <name>)
    number: int                # what the controller writes: Modbus register value, serial RCP <number>; 1..65535
    bundle: str                # the bundle directory for this product
    product: str | None = None  # the bundle's manifest `product` must be this (None: security.product, if set)

    def validate(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"name: expected 1-32 letters, digits, '_', '.', '-', got {self.name!r}")
        if not 1 <= self.number <= 65535:
            raise ValueError(f"number: must be 1..65535 (0 means 'no request' in the Modbus register), got {self.number}")
        if not self.bundle:
            raise ValueError("bundle: must name the bundle directory")


@dataclass(kw_only=True)
class RecipesConfig:
    recipes: list[RecipeConfig] = field(default_factory=list)
    initial: str | None = None          # the recipe at start (None: the first listed)
    modbus_register: int | None = None  # holding register 16..31 (the PLC area) the controller writes a number to
    allow_http: bool = False            # POST /recipe/<name> switches (off: the endpoint refuses)
    preload: bool = True                # load and self-test every recipe at start: a switch is a self-test + swap

    def validate(self) -> None:
        if not self.recipes:
            raise ValueError("recipes: list at least one recipe")
        for key in ("name", "number"):
            values = [getattr(r, key) for r in self.recipes]
            for v in values:
                if values.count(v) > 1:
                    raise ValueError(f"recipes: two recipes have {key} {v!r}")
        if self.initial is not None and self.initial not in [r.name for r in self.recipes]:
            raise ValueError(f"initial: expected one of {', '.join(r.name for r in self.recipes)}, got {self.initial!r}")
        if self.modbus_register is not None and not 16 <= self.modbus_register <= 31:
            raise ValueError(f"modbus_register: must be in the PLC area 16..31, got {self.modbus_register}")

    def initial_recipe(self) -> RecipeConfig:
        return next((r for r in self.recipes if r.name == self.initial), self.recipes[0])

    def find(self, key: str | int) -> RecipeConfig | None:
        """A recipe by name or number ('3' and 3 both find number 3)."""
        text = str(key).strip()
        for r in self.recipes:
            if r.name == text or str(r.number) == text:
                return r
        return None


def resolve_recipe_paths(recipes: RecipesConfig | None, key: str, absolute: Callable[[str, str], str]) -> None:
    if recipes is None:
        return
    for i, r in enumerate(recipes.recipes):
        r.bundle = absolute(f"{key}.recipes[{i}].bundle", r.bundle)


class RecipeSwitcher:
    """The recipes of one line. Requests come from any thread; the line's loop starts and applies switches
    (`poll()` from its housekeeping), so the pipeline is swapped between parts, never during one."""

    def __init__(self, line: "Line", cfg: RecipesConfig) -> None:
        self.line = line
        self.cfg = cfg
        self.active = cfg.initial_recipe()
        self.status = "none"
        self.switching_to = None
        self.last_switch_ms: float | None = None
        self.switches = 0
        self.switch_failures = 0
        self._pipelines: dict[str, "Pipeline"] = {}
        self._lock = threading.Lock()
        self._pending: tuple[RecipeConfig, str, bool] | None = None   # (recipe, origin, force reload)
        self._outcome: tuple[RecipeConfig, "Pipeline | None", str | None, float] | None = None
        self._thread: threading.Thread | None = None
        self._t0 = 0.0
        self._last_register = 0
        self._refusals: list[str] = []
        # Parts triggered (monotonic) or captured (wall clock) before these instants are FAULT.
        self.guard_mono = float("-inf")
        self.guard_wall = float("-inf")

    # ---- configuration of one recipe ----------------------------------------------------------------------
    def recipe_cfg(self, recipe: RecipeConfig):
        """The line's config with the recipe's bundle; its own version floor (state_dir/recipes/<name>)."""
        base = self.line.cfg
        security = dataclasses.replace(base.security, product=recipe.product or base.security.product)
        state = os.path.join(base.state_dir, "recipes", recipe.name) if base.state_dir else None
        return dataclasses.replace(base, bundle=recipe.bundle, security=security, state_dir=state)

    def load(self, recipe: RecipeConfig, load_threads: int | None = None) -> "Pipeline":
        from edge_runtime import bundle_loader

        pipeline = bundle_loader.load_pipeline(self.recipe_cfg(recipe), load_threads=load_threads)
        self._pipelines[recipe.name] = pipeline
        return pipeline

    def load_initial(self) -> "Pipeline":
        """At start: the initial recipe (raises BundleError like any load), then the others when preloading
        (one that fails is logged and retried from disk when selected)."""
        pipeline = self.load(self.active)
        if self.cfg.preload:
            for r in self.cfg.recipes:
                if r.name != self.active.name:
                    try:
                        self.load(r)
                    except Exception as exc:  # noqa: BLE001 - reported now, and again if the recipe is selected
                        log.error("%s: recipe %s (%s) not preloaded: %s", self._who(), r.name, r.bundle, exc)
        self.status = "ok"
        self._acknowledge("ok", self.active, None, None)
        return pipeline

    # ---- requests (any thread) ----------------------------------------------------------------------------
    def request(self, key: str | int, origin: str, force: bool = False) -> tuple[bool, str]:
        """Ask for recipe `key` (name or number). Returns (accepted, message); the switch runs on the line."""
        recipe = self.cfg.find(key)
        if recipe is None:
            message = f"unknown recipe {str(key)[:40]!r} (known: {', '.join(f'{r.number}={r.name}' for r in self.cfg.recipes)})"
            log.error("%s: recipe request from %s refused: %s", self._who(), origin, message)
            with self._lock:   # acknowledged from the line's thread, like every output call
                self._refusals.append(message)
            return False, message
        with self._lock:
            self._pending = (recipe, origin, force)
        log.info("%s: recipe %s (%d) requested by %s", self._who(), recipe.name, recipe.number, origin)
        return True, f"switching to {recipe.name}"

    def on_serial(self, line: str) -> bool:
        words = line.strip().split()
        if len(words) == 2 and words[0].upper() == "RCP":
            self.request(words[1], "serial")
            return True
        return False

    # ---- the line's loop ----------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self._thread is not None

    def poll(self) -> None:
        """From the line's housekeeping: read the Modbus request, start a pending switch, apply a finished one."""
        self._poll_register()
        with self._lock:
            refusals, self._refusals = self._refusals, []
            outcome, self._outcome = self._outcome, None
            pending = None
            if self._thread is None and outcome is None and self._pending is not None:
                pending, self._pending = self._pending, None
        for message in refusals:
            self._acknowledge("failed", None, None, message)
        if outcome is not None:
            self._finish(*outcome)
        elif pending is not None:
            self._start(*pending)

    def _poll_register(self) -> None:
        if self.cfg.modbus_register is None:
            return
        for out in self.line.outputs:
            regs = getattr(out, "plc_registers", None)
            if regs is None:
                continue
            value = regs()[self.cfg.modbus_register - 16]
            if value != self._last_register:
                self._last_register = value
                if value:
                    self.request(value, f"modbus register {self.cfg.modbus_register}")
            return

    def _start(self, recipe: RecipeConfig, origin: str, force: bool) -> None:
        self._t0 = time.monotonic()
        self.switching_to = recipe
        self.status = "switching"
        self.line._set_state(False, f"recipe: switching to {recipe.name} (requested by {origin})")
        self._acknowledge("switching", recipe, None, None)
        cached = None if force else self._pipelines.get(recipe.name)
        self._thread = threading.Thread(target=self._work, args=(recipe, cached), name=f"recipe:{recipe.name}",
                                        daemon=True)
        self._thread.start()

    def _work(self, recipe: RecipeConfig, cached: "Pipeline | None") -> None:
        from edge_runtime import bundle_loader

        try:
            if cached is not None:
                # Loaded and verified before: prove the model in memory still reproduces its golden scores.
                failures = bundle_loader.golden_check(cached.bundle, cached)
                if failures:
                    self._pipelines.pop(recipe.name, None)
                    raise RuntimeError("self-test failed: " + "; ".join(failures))
                outcome = (recipe, cached, None)
            else:
                outcome = (recipe, self.load(recipe), None)
        except Exception as exc:  # noqa: BLE001 - any failure leaves the line in FAULT, reported below
            outcome = (recipe, None, str(exc))
        with self._lock:
            self._outcome = (*outcome, (time.monotonic() - self._t0) * 1000.0)

    def _finish(self, recipe: RecipeConfig, pipeline: "Pipeline | None", error: str | None, ms: float) -> None:
        self._thread = None
        self.switching_to = None
        # Whatever was triggered or captured until now may be a part of either product: FAULT, never inspected.
        self.guard_mono, self.guard_wall = time.monotonic(), time.time()
        self.last_switch_ms = ms
        if pipeline is None:
            self.switch_failures += 1
            self.status = "failed"
            log.error("%s: recipe switch to %s failed after %.0f ms: %s", self._who(), recipe.name, ms, error)
            self.line._set_state(False, f"recipe: switch to {recipe.name} failed: {error}")
            self._acknowledge("failed", recipe, ms, error)
            return
        previous = self.active
        self.line.pipeline = pipeline
        self.active = recipe
        self.switches += 1
        self.status = "ok"
        log.info("%s: recipe %s -> %s (bundle %s) verified and active in %.1f ms", self._who(), previous.name,
                 recipe.name, pipeline.bundle.bundle_id, ms)
        self.line._set_state(True, self.line._record_fault)
        self._acknowledge("ok", recipe, ms, None)

    def stale(self, triggered_mono: float | None = None, captured_wall: float | None = None) -> str | None:
        """Why a part must be FAULT because it arrived before the last switch ended, or None."""
        if triggered_mono is not None and triggered_mono < self.guard_mono:
            return "part triggered during a recipe switch"
        if captured_wall is not None and captured_wall < self.guard_wall:
            return "frame captured during a recipe switch"
        return None

    # ---- report -------------------------------------------------------------------------------------------
    def _who(self) -> str:
        return f"line {self.line.name}" if self.line.name else "station"

    def _acknowledge(self, status: str, recipe: RecipeConfig | None, ms: float | None, error: str | None) -> None:
        self.line.bus.notify("recipe_changed", recipe.number if recipe else 0, recipe.name if recipe else "-",
                             status, ms, error)

    def counters(self) -> dict[str, float]:
        return {"recipe_switches": self.switches, "recipe_switch_failures": self.switch_failures}

    def describe(self) -> dict:
        return {"active": self.active.name, "number": self.active.number, "status": self.status,
                "switching_to": self.switching_to.name if self.switching_to else None,
                "last_switch_ms": self.last_switch_ms,
                "recipes": [{"name": r.name, "number": r.number, "loaded": r.name in self._pipelines}
                            for r in self.cfg.recipes]}
