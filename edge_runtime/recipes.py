"""Recipes (product changeover): a line holds several bundles, one per product, and the line controller selects one.

Selection: a Modbus holding register in the PLC area (`modbus_register`, with the modbus output's
`allow_writes: true`), a serial line `RCP <number|name>` (serial output with `accept_trigger: true`), or
POST /recipe/<name> (`allow_http: true`), MQTT `<prefix>/<line>/cmd/recipe` (`allow_recipe`), or the OPC UA method
VisionSystem/PrepareRecipe (opcua output `allow_recipe: true`; it answers once the switch is over), or GPIO select
lines plus a strobe (`gpio:`, edge_runtime/recipe_gpio.py; a number that is no recipe puts the line in FAULT). Every switch is verified before the line inspects with it: a recipe
not loaded yet is loaded from disk (checksums, signature, product, version floor, golden self-test), one loaded
before is self-tested again on its golden images. It is logged, acknowledged on the outputs that can show it
(serial `RCP <number> <name> OK <ms>` / `ERR <reason>`, Modbus holding registers 7-8) and timed.

While a switch runs the line is in FAULT (kind "recipe", READY dropped): a trigger is answered FAULT at once,
and after the switch any part triggered or captured before it ended is FAULT too, so no part is ever inspected
with the wrong recipe. A failed switch leaves the line in FAULT until a switch succeeds: the controller asked
for another product, so the old recipe must not go on passing parts.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import logging
import os
import re
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from edge_runtime.recipe_gpio import RecipeGpioConfig, RecipeGpioSelector
from edge_runtime.outputs.result_log import ResultLogConfig, fsync_dir, last_frame_id

if TYPE_CHECKING:
    from edge_runtime.line import Line
    from edge_runtime.pipeline import Pipeline

log = logging.getLogger("edge_runtime.recipes")

__all__ = ["RecipeConfig", "RecipesConfig", "RecipeSwitcher", "RECIPE_STATUS"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}\Z")   # \Z: $ lets a final newline in (probe 113)
# In the line's state_dir: the recipe active and the PLC's last choice, resumed after a restart.
SELECTION_FILE = "recipe_selected.json"
UNSAVED_SUFFIX = ".unsaved"   # the selection file set aside when a newer one could not be written

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
    gpio: RecipeGpioConfig | None = None  # select lines + strobe from the PLC (edge_runtime/recipe_gpio.py)

    def validate(self) -> None:
        if not self.recipes:
            raise ValueError("recipes: list at least one recipe")
        for key in ("name", "number"):
            values = [getattr(r, key) for r in self.recipes]
            for v in values:
                if values.count(v) > 1:
                    raise ValueError(f"recipes: two recipes have {key} {v!r}")
        for r in self.recipes:
            other = next((o for o in self.recipes if o is not r and str(o.number) == r.name), None)
            if other is not None:
                # find() takes a name or a number: the PLC's register or select lines reading other.number (and
                # serial RCP, MQTT, OPC UA naming it) would select this recipe, another product (probe 64).
                raise ValueError(f"recipes: recipe {r.name!r} (number {r.number}) is named like recipe {other.name}'s "
                                 f"number {other.number}: a request for {other.number} would select {r.name!r}; "
                                 "rename it (a name that is a number must be the recipe's own number)")
        if self.initial is not None and self.initial not in [r.name for r in self.recipes]:
            raise ValueError(f"initial: expected one of {', '.join(r.name for r in self.recipes)}, got {self.initial!r}")
        if self.modbus_register is not None and not 16 <= self.modbus_register <= 31:
            raise ValueError(f"modbus_register: must be in the PLC area 16..31, got {self.modbus_register}")
        if self.gpio is not None:
            largest = self.gpio.largest_number()
            for r in self.recipes:
                if r.number > largest:
                    raise ValueError(f"gpio.select: {len(self.gpio.select)} select lines encode numbers up to "
                                     f"{largest}, but recipe {r.name} has number {r.number}")

    def initial_recipe(self) -> RecipeConfig:
        return next((r for r in self.recipes if r.name == self.initial), self.recipes[0])

    def find(self, key: str | int) -> RecipeConfig | None:
        """A recipe by name or number ('3' and 3 both find number 3)."""
        text = str(key).strip()
        for r in self.recipes:
            if r.name == text or str(r.number) == text:
                return r
        return None


def check_distinct_product(cfg: RecipesConfig, recipe: RecipeConfig, bundle) -> None:
    """Refuse (BundleError) the bundle of `recipe` when another recipe's bundle folder holds a bundle of the same
    product (or the same bundle): the station could not tell which product each recipe inspects, and a PLC that
    selects one product would get the other's verdicts acknowledged as its own (probe 64: recipe cap-b's folder
    held cap-a's bundle, no recipe named a `product:`; Modbus register 7 read 2, status 2 'verified and active', and
    cap-b's parts were inspected OK with cap-a's bundle). Checked on every load and switch, whatever `product:`
    says, so it holds where no recipe names one; a folder that cannot be read is checked when it is loaded."""
    from edge_runtime.bundle import BundleError

    for other in cfg.recipes:
        if other.name == recipe.name:
            continue
        theirs = _bundle_identity(other.bundle)
        if theirs is None:
            continue
        same_id = theirs[0] == bundle.bundle_id
        if same_id or (bundle.product is not None and theirs[1] == bundle.product):
            what = f"the same bundle ({bundle.bundle_id})" if same_id else f"a bundle of the same product {bundle.product!r}"
            raise BundleError(f"recipe {recipe.name}: its bundle ({bundle.root}) and recipe {other.name}'s "
                              f"({other.bundle}) are {what}: the station cannot tell which product each recipe "
                              "inspects; give each recipe its own product's bundle (edge-export fit --product) and "
                              "name it in the recipe's `product:`")


# folder -> (manifest's stat signature, (bundle_id, product)): parsing a manifest takes ~40 ms, and every load and
# switch asks about every other recipe's folder; a manifest changed, replaced or moved has another signature.
_IDENTITIES: dict[str, tuple[tuple[int, int, int, int], tuple[str, str | None]]] = {}


def _bundle_identity(folder: str) -> tuple[str, str | None] | None:
    """(bundle_id, product) of the bundle in `folder` as its manifest says now, or None if it cannot be read."""
    from edge_runtime.bundle import MANIFEST, Bundle, BundleError

    try:
        st = os.stat(os.path.join(folder, MANIFEST))
    except OSError:
        return None
    signature = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
    cached = _IDENTITIES.get(folder)
    if cached is not None and cached[0] == signature:
        return cached[1]
    try:
        theirs = Bundle.load(folder, verify=False)
    except (BundleError, OSError):
        return None
    _IDENTITIES[folder] = (signature, (theirs.bundle_id, theirs.product))
    return _IDENTITIES[folder][1]


def resolve_recipe_paths(recipes: RecipesConfig | None, key: str, absolute: Callable[[str, str], str]) -> None:
    if recipes is None:
        return
    for i, r in enumerate(recipes.recipes):
        r.bundle = absolute(f"{key}.recipes[{i}].bundle", r.bundle)


def recipe_station_config(base, recipe: RecipeConfig):
    """The line's config `base` with the recipe's bundle and product; its own version floor and device-made
    versions (state_dir/recipes/<name>)."""
    security = dataclasses.replace(base.security, product=recipe.product or base.security.product)
    state = os.path.join(base.state_dir, "recipes", recipe.name) if base.state_dir else None
    return dataclasses.replace(base, bundle=recipe.bundle, security=security, state_dir=state)


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
        self._lock = threading.RLock()   # submit() holds it around request()
        self._pending: tuple[RecipeConfig, str, bool] | None = None   # (recipe, origin, force reload)
        self._requested_at: tuple[float, float] | None = None   # (monotonic, wall) of a request not yet switched
        self._outcome: tuple[RecipeConfig, "Pipeline | None", str | None, float] | None = None
        # Callers that wait for the outcome (OPC UA PrepareRecipe): those of the pending request, those of the
        # running switch. Each gets (ok, message) once that switch is over, or refused if another request wins.
        self._pending_waiters: list[Future] = []
        self._running_waiters: list[Future] = []
        self._thread: threading.Thread | None = None
        self._t0 = 0.0
        self._last_register = 0
        self._register_unchanged_at: tuple[float, float] | None = None   # last read of the register (mono, wall)
        self._write_seq = 0   # the Modbus server's PLC-area writes taken so far (ModbusOutput.plc_writes)
        self._unsaved: str | None = None   # why the selection could not be recorded (parts FAULT meanwhile)
        self._unknown = False              # after a restart, which recipe was in service is unknown (not saved)
        self._unsaved_fault = False        # READY dropped for it
        self._refusals: list[str] = []
        self._invalid: str | None = None   # the newest request named no recipe and must fault the line (GPIO)
        # A Modbus register or GPIO select lines hold the PLC's choice as a level: while the PLC has chosen, the
        # line runs that recipe, and another source (HTTP, MQTT, OPC UA, serial) is refused unless it names the
        # same one; otherwise it would leave the line on a product other than the one the PLC's register shows.
        self.plc_choice: tuple[str, RecipeConfig | None] | None = None   # (what the PLC asked for, that recipe)
        self._requested_name: str | None = None   # the newest accepted request (saved: resumed after a restart)
        # Parts triggered (monotonic) or captured (wall clock) before these instants are FAULT.
        self.guard_mono = float("-inf")
        self.guard_wall = float("-inf")
        self._resume_selection()
        self.gpio = RecipeGpioSelector(self, cfg.gpio) if cfg.gpio is not None else None

    # ---- the selection across restarts ------------------------------------------------------------------------
    def _selection_file(self) -> str | None:
        state_dir = getattr(self.line.cfg, "state_dir", None)
        return os.path.join(state_dir, SELECTION_FILE) if state_dir else None

    def _resume_selection(self) -> None:
        """A restarted line resumes the PLC's last choice, else the recipe it ran: starting on `initial` instead
        would inspect another product until the PLC writes its number again (its register reads 0 after a
        restart, and a PLC that writes it only at changeover never does)."""
        path = self._selection_file()
        if not path:
            return
        try:
            with open(path, encoding="utf-8") as fh:
                doc = json.loads(fh.read(4096))
        except FileNotFoundError:
            if os.path.exists(path + UNSAVED_SUFFIX):
                self._selection_unknown(path, "the selection was not recorded before the restart")
            elif (inspected := self._inspected_before()) is not None:
                # Not a first start: the state_dir was lost, replaced or is another one (a station run by hand
                # beside its service's StateDirectory). Starting on `initial` passed the other product's parts
                # with READY up (probe 67: the PLC had chosen bottle-b, the restarted line said OK on bottle-a).
                self._selection_unknown(path, f"missing, yet {inspected} holds parts this line inspected (the "
                                              "state_dir was lost or is another one; first start with recipes: "
                                              "name the recipe once)")
            return
        except (OSError, ValueError) as exc:
            doc = exc
        if not isinstance(doc, dict):
            why = doc if isinstance(doc, Exception) else f"not a JSON object: {type(doc).__name__}"
            self._selection_unknown(path, f"unreadable ({why})")
            return
        guard = doc.get("guard_wall")
        if isinstance(guard, (int, float)) and math.isfinite(guard):
            # Images that arrived before the last switch ended are still the previous product's after a restart
            # (a backlog in a watch folder): the guard survives it, or the resumed recipe would pass them.
            self.guard_wall = float(guard)
            # That switch ended before this start: a frame captured from now on (monotonic) is after it, whatever
            # the wall clock says (stepped back since, a guard saved under an RTC that ran years ahead).
            self.guard_mono = time.monotonic()
        saved_active = self.cfg.find(doc.get("active", "")) if isinstance(doc.get("active"), str) else None
        recipe = saved_active
        requested = doc.get("requested")
        if isinstance(requested, str) and self.cfg.find(requested) is not None:
            # The controller's newest request (HTTP, serial, MQTT, OPC UA) stands, switched or not before the stop.
            recipe = self.cfg.find(requested)
            self._requested_name = requested
        plc = doc.get("plc")
        if isinstance(plc, str):
            # The PLC's choice decides, not the recipe that was active: its switch may have failed or not run
            # before the stop (a line back on the old recipe had passed parts of the product the PLC chose).
            self.plc_choice = (plc, self.cfg.find(plc))
            recipe = self.plc_choice[1]
            if recipe is None:   # a number that is no recipe: FAULT until the PLC writes a known one
                self._invalid = f"the PLC asked for {plc!r} before the restart: no such recipe"
                self._requested_at = (time.monotonic(), time.time())
                log.error("%s: %s", self._who(), self._invalid)
                return
        if recipe is None:
            # Names no recipe of this station file (one renamed since, a number): which product is unknown.
            self._selection_unknown(path, f"names no recipe of this line ({json.dumps(doc)[:120]})")
            return
        if recipe is not saved_active:
            # A switch was requested and had not ended before the stop: the start-up load is that switch, and
            # whatever arrived before it may be either product.
            self.guard_wall = max(self.guard_wall, time.time())
        if recipe is not self.active:
            log.warning("%s: resuming recipe %s, %s before the restart (%s)", self._who(), recipe.name,
                        "the PLC's choice" if isinstance(plc, str) else
                        "active" if recipe is saved_active else "requested", path)
        self.active = recipe

    def _inspected_before(self) -> str | None:
        """The line's result log that holds a record, if any: the line ran before this start."""
        for out in getattr(self.line.cfg, "outputs", None) or []:
            if isinstance(out, ResultLogConfig):
                try:
                    if last_frame_id(out.path) is not None:
                        return out.path
                except OSError:   # unreadable: the result log reports it when it starts
                    continue
        return None

    def _selection_unknown(self, path: str, why: str) -> None:
        """Which product the line was on is unknown after a restart: the initial recipe could pass another
        product's parts (the PLC's register reads 0 after a restart). FAULT until a request names the recipe, and
        the file is left as it is until then, so another restart does not take a guess for the truth."""
        self._unknown = True
        self._invalid = (f"{path}: {why}: which recipe was in service is unknown; name it (the PLC's register, "
                         f"HTTP, serial, MQTT or OPC UA) to go on")
        self._requested_at = (time.monotonic(), time.time())
        self.guard_wall = max(self.guard_wall, time.time())
        log.error("%s: %s", self._who(), self._invalid)

    def _save_selection(self) -> None:
        path = self._selection_file()
        if not path or self._unknown:
            return
        with self._lock:
            doc = {"active": self.active.name, "plc": self.plc_choice[0] if self.plc_choice else None,
                   "requested": self._requested_name,
                   "guard_wall": self.guard_wall if math.isfinite(self.guard_wall) else None}
        tmp = path + ".tmp"
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(json.dumps(doc))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            fsync_dir(path)   # the rename itself survives a power loss
            self._unsaved = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path + UNSAVED_SUFFIX)
        except OSError as exc:
            # Not recorded, a restart would resume the product before it: every part FAULT until a save works
            # (stale(); retried and READY dropped from poll()), and the old file is set aside (a rename needs no
            # space on a full disk), so that a restart meanwhile knows it does not know.
            if self._unsaved is None:
                log.error("%s: cannot record the recipe selection in %s: %s: parts are FAULT until it can be "
                          "recorded", self._who(), path, exc)
                try:
                    if os.path.exists(path):
                        os.replace(path, path + UNSAVED_SUFFIX)
                    else:
                        open(path + UNSAVED_SUFFIX, "a").close()
                except OSError as mark:
                    log.error("%s: cannot mark %s as out of date either (%s): a restart would resume it",
                              self._who(), path, mark)
            self._unsaved = f"{path}: {exc.strerror or exc}"

    # ---- configuration of one recipe ----------------------------------------------------------------------
    def recipe_cfg(self, recipe: RecipeConfig):
        return recipe_station_config(self.line.cfg, recipe)

    def load(self, recipe: RecipeConfig, load_threads: int | None = None) -> "Pipeline":
        from edge_runtime import bundle_loader

        pipeline = bundle_loader.load_pipeline(self.recipe_cfg(recipe), load_threads=load_threads)
        check_distinct_product(self.cfg, recipe, pipeline.bundle)
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
        self._save_selection()   # the recipe in service and its guard, for the next restart
        self._acknowledge("ok", self.active, None, None)
        return pipeline

    # ---- requests (any thread) ----------------------------------------------------------------------------
    def request(self, key: str | int, origin: str, force: bool = False,
                fault_if_unknown: bool = False, from_plc: bool = False,
                since: tuple[float, float] | None = None) -> tuple[bool, str]:
        """Ask for recipe `key` (name or number). Returns (accepted, message); the switch runs on the line.
        An unknown recipe is refused and changes nothing, unless `fault_if_unknown` (a controller that cannot read
        a refusal, GPIO): then the line goes to FAULT until a switch succeeds, like a failed switch.
        `from_plc`: the request comes from the line's Modbus register or GPIO select lines (see plc_choice).
        Another source naming the recipe already active (and no switch under way) changes nothing: each switch
        holds parts FAULT, and repeating the PLC's own recipe over HTTP had faulted 15 of 98 parts.
        `since` (monotonic, wall): the request may have been made as early as this (a register read late); parts
        triggered or captured from then on are FAULT (stale())."""
        return self._request(key, origin, force, fault_if_unknown, from_plc, since)[:2]

    def _mark_requested(self, since: tuple[float, float] | None) -> None:
        """From `since` (default now) a part may be the new product: FAULT until the switch is over (stale()).
        Called with the lock held."""
        at = since or (time.monotonic(), time.time())
        if self._requested_at is None:
            self._requested_at = at
        else:
            self._requested_at = (min(self._requested_at[0], at[0]), min(self._requested_at[1], at[1]))

    def _request(self, key: str | int, origin: str, force: bool, fault_if_unknown: bool,
                 from_plc: bool, since: tuple[float, float] | None = None) -> tuple[bool, str, bool]:
        """request(), plus whether a switch was queued."""
        recipe = self.cfg.find(key)
        with self._lock:
            changed = from_plc and (self.plc_choice is None or self.plc_choice[0] != str(key)[:40])
            if from_plc:
                self.plc_choice = (str(key)[:40], recipe)
            chosen = self.plc_choice
        if changed:
            self._save_selection()
        if not from_plc and chosen is not None and recipe is not chosen[1]:
            asked = f"{chosen[1].number}={chosen[1].name}" if chosen[1] is not None else f"{chosen[0]!r}, no recipe"
            message = (f"the PLC selects this line's recipe ({self._plc_name()} asks for {asked}); "
                       f"{origin} may only name that one")
            # Answered to the requester only: the PLC's acknowledgement (Modbus register 8, serial, GPIO ACK) keeps
            # showing its own switch, which stands (it had read 'failed' after every refusal).
            log.error("%s: recipe request from %s for %s refused: %s", self._who(), origin, str(key)[:40], message)
            return False, message, False
        if recipe is None:
            message = f"unknown recipe {str(key)[:40]!r} (known: {', '.join(f'{r.number}={r.name}' for r in self.cfg.recipes)})"
            log.error("%s: recipe request from %s refused: %s", self._who(), origin, message)
            with self._lock:   # acknowledged from the line's thread, like every output call
                self._refusals.append(message)
                if fault_if_unknown:   # the newest request wins: a queued switch is dropped
                    self._invalid = f"{origin}: {message}"
                    self._pending = None
                    self._mark_requested(since)   # the old recipe must not pass what follows
                    superseded, self._pending_waiters = self._pending_waiters, []
                else:
                    superseded = []
            for waiter in superseded:
                _resolve(waiter, "superseded", f"superseded by an unknown recipe from {origin}")
            return False, message, False
        with self._lock:
            if not (from_plc or force) and recipe is self.active and self.status == "ok" \
                    and self._pending is None and self.switching_to is None and self._invalid is None:
                return True, f"{recipe.name} is already active", False
            self._invalid = None
            self._pending = (recipe, origin, force)
            # From now on a part may be the new product: FAULT until the switch is over (see stale()), even before
            # the loop starts the switch.
            self._mark_requested(since)
            self._requested_name = recipe.name
            self._unknown = False   # named now: it is saved again from here
            superseded, self._pending_waiters = self._pending_waiters, []
        for waiter in superseded:   # the controller changed its mind before that switch started
            _resolve(waiter, "superseded", f"superseded by a request for {recipe.name} from {origin}")
        self._save_selection()   # a restart before the switch ends resumes this request, not the old recipe
        log.info("%s: recipe %s (%d) requested by %s", self._who(), recipe.name, recipe.number, origin)
        return True, f"switching to {recipe.name}", True

    def reload_latest(self, origin: str) -> None:
        """SIGHUP: the recipe the controller asked for last, from disk again: the pending request if one waits
        (made a forced reload), else the one being switched to, else the active one. Reloading the active recipe
        instead would undo a switch the controller asked for and was acknowledged."""
        with self._lock:
            if self._pending is not None:
                recipe, first_origin, _ = self._pending
                self._pending = (recipe, first_origin, True)
                log.info("%s: %s: the requested recipe %s will be read from disk", self._who(), origin, recipe.name)
                return
            plc = self.plc_choice[1] if self.plc_choice is not None else None
            target = plc or self.switching_to or self.active
        self.request(target.name, origin, force=True)

    def submit(self, key: str | int, origin: str, fault_if_unknown: bool = False, from_plc: bool = False) -> Future:
        """Ask for recipe `key` and get a Future of (outcome, message), resolved when the switch is over. outcome:
        "ok" (verified and active), "unknown" (no such recipe: refused, nothing changes), "refused" (the PLC
        selects this line's recipe, and it is another one), "failed" (the line stays in FAULT, see above) or
        "superseded" (another request came before this one started)."""
        waiter: Future = Future()
        with self._lock:   # one lock with the request: a poll() in between cannot start it without this waiter
            accepted, message, queued = self._request(key, origin, False, fault_if_unknown, from_plc)
            if queued:
                self._pending_waiters.append(waiter)
        if not accepted:
            _resolve(waiter, "unknown" if self.cfg.find(key) is None else "refused", message)
        elif not queued:
            _resolve(waiter, "ok", message)
        return waiter

    def _plc_name(self) -> str:
        return f"Modbus register {self.cfg.modbus_register}" if self.cfg.modbus_register is not None else \
            "the GPIO select lines"

    def on_serial(self, line: str) -> bool:
        words = line.strip().split()
        if not words or words[0].upper() != "RCP":
            return False
        # Every RCP gets a line back: a PLC waiting for RCP ... OK|ERR before it triggers had timed out on one that
        # changed nothing or was refused, silence it cannot tell from a lost line (probe 66). Those answers go to
        # the serial requester only (recipe_reply); a switch is acknowledged to every output (recipe_changed), an
        # unknown recipe too (poll()).
        if len(words) != 2:
            self.line.bus.notify("recipe_reply", 0, "-", "failed", None, "expected RCP <number|name>")
            return True
        accepted, message, queued = self._request(words[1], "serial", False, False, False)
        recipe = self.cfg.find(words[1])
        if recipe is not None and not queued:   # already active, or the PLC's register / select lines choose
            self.line.bus.notify("recipe_reply", recipe.number, recipe.name, "ok" if accepted else "failed",
                                 0.0 if accepted else None, None if accepted else message)
        return True

    # ---- the line's loop ----------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self._thread is not None

    def poll(self) -> None:
        """From the line's housekeeping: read the Modbus request, start a pending switch, apply a finished one."""
        if self._unsaved is not None:
            self._save_selection()   # retried: a disk freed, a mount back
            if self._unsaved is not None and not self._unsaved_fault:
                self._resume_line()
        if self._unsaved is None and self._unsaved_fault:
            log.info("%s: recipe selection recorded again", self._who())
            if self.status == "ok" and self._thread is None and self._invalid is None:
                self._resume_line()
            self._unsaved_fault = False
        self._poll_register()
        with self._lock:
            refusals, self._refusals = self._refusals, []
            outcome, self._outcome = self._outcome, None
            pending = None
            if self._thread is None and outcome is None and self._pending is not None:
                pending, self._pending = self._pending, None
                self._running_waiters, self._pending_waiters = self._pending_waiters, []
        for message in refusals:
            self._acknowledge("failed", None, None, message)
        if outcome is not None:
            self._finish(*outcome)
        elif pending is not None:
            self._start(*pending)
        with self._lock:
            invalid = self._invalid if self._thread is None and self._pending is None else None
            self._invalid = None if invalid else self._invalid
        if invalid:
            # The controller asked for a product we do not have: the old recipe must not go on passing parts.
            self.switch_failures += 1
            self.status = "failed"
            self.guard_mono, self.guard_wall = time.monotonic(), time.time()
            with self._lock:
                if self._pending is None:
                    self._requested_at = None
            self.line._set_state(False, f"recipe: {invalid}")

    # ---- GPIO select lines (edge_runtime/recipe_gpio.py) --------------------------------------------------
    def open_inputs(self) -> None:
        """Claim the GPIO select lines, if configured; lines that cannot be claimed put the line in FAULT."""
        if self.gpio is None:
            return
        try:
            self.gpio.open()
        except Exception as exc:  # noqa: BLE001 - OSError/ValueError from gpiod, ImportError without it
            message = (f"recipe: gpio select lines {self.cfg.gpio.select} / strobe {self.cfg.gpio.strobe} on "
                       f"{self.cfg.gpio.chip}: {exc}")
            self.status = "failed"
            self.line._set_state(False, message)

    @property
    def worker(self) -> threading.Thread | None:
        """The thread loading or checking the recipe being switched to, if a switch is running."""
        return self._thread

    def close_inputs(self) -> None:
        if self.gpio is not None:
            try:
                self.gpio.close()
            except Exception as exc:  # noqa: BLE001 - stopping anyway
                log.warning("%s: releasing the recipe GPIO lines failed: %s", self._who(), exc)

    def _poll_register(self) -> None:
        if self.cfg.modbus_register is None:
            return
        for out in self.line.outputs:
            regs = getattr(out, "plc_registers", None)
            if regs is None:
                continue
            register = self.cfg.modbus_register
            writes = getattr(out, "plc_writes", None)
            taken = writes(self._write_seq) if writes is not None else []
            lost_since = None
            if taken and taken[0][0] > self._write_seq + 1:
                # Changes fell out of the server's bounded log since the last read: one may have been a recipe
                # number. The PLC's present choice is verified again, and parts from the last read on are FAULT.
                log.warning("%s: %d PLC-area writes were not seen (more changes between two reads than the log "
                            "keeps): re-verifying recipe register %d", self._who(), taken[0][0] - self._write_seq - 1,
                            register)
                lost_since = self._register_unchanged_at or (time.monotonic(), time.time())
                self._last_register = -1   # the present value is requested again
            for seq, mono, wall, address, values in taken:
                # Each write in order, dated when the server took it: a number written and reset between two
                # reads (one part of another product on a mixed line) still faults the parts from then on.
                self._write_seq = seq
                if address <= register < address + len(values) and values[register - address] != self._last_register:
                    self._last_register = values[register - address]
                    if self._last_register:
                        self.request(self._last_register, f"modbus register {register}", fault_if_unknown=True,
                                     from_plc=True, since=lost_since or (mono, wall))
                        lost_since = None
            before = (time.monotonic(), time.time())
            value = regs()[self.cfg.modbus_register - 16]
            if lost_since is not None and value:
                self._last_register = -1
                self._register_unchanged_at = lost_since
            elif lost_since is not None:
                # The lost changes may have held a changeover the PLC has cleared again (it reads 0 now): which
                # product is unknown. FAULT from the last read until the PLC writes its number again.
                with self._lock:
                    self._mark_requested(lost_since)
                    self._invalid = (f"modbus register {register}: changes were lost between two reads and it "
                                     "reads 0 now: write the recipe number again")
                    self._pending = None
                self._last_register = 0
            if value != self._last_register:
                self._last_register = value
                if value:
                    # A PLC writing a number it means can read no refusal: an unknown one faults the line (as the
                    # GPIO select lines do) instead of the old recipe passing the new product. The PLC wrote it at
                    # some time after the last read that still showed the old value: parts from then on are FAULT.
                    self.request(value, f"modbus register {self.cfg.modbus_register}", fault_if_unknown=True,
                                 from_plc=True, since=self._register_unchanged_at or before)
            self._register_unchanged_at = before
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
            if cached is not None and bundle_loader.bundle_on_disk(self.recipe_cfg(recipe)) != cached.bundle.bundle_id:
                # A new version was installed in the recipe's folder since it was preloaded: that one, from disk.
                log.info("%s: recipe %s: the bundle on disk changed since it was preloaded; loading it",
                         self._who(), recipe.name)
                self._pipelines.pop(recipe.name, None)
                cached = None
            if cached is not None:
                # Another recipe's folder may have been given this product's bundle since this one was loaded.
                check_distinct_product(self.cfg, recipe, cached.bundle)
                # Loaded and verified before, and still what is on disk: prove the model in memory still
                # reproduces its golden scores.
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
        try:
            self._apply(recipe, pipeline, error, ms)
        finally:
            with self._lock:
                waiters, self._running_waiters = self._running_waiters, []
            for waiter in waiters:   # after the line's state and outputs show the outcome
                if pipeline is None:
                    _resolve(waiter, "failed", f"switch to {recipe.name} failed: {error}")
                else:
                    _resolve(waiter, "ok", f"{recipe.name} active in {ms:.0f} ms")

    def _apply(self, recipe: RecipeConfig, pipeline: "Pipeline | None", error: str | None, ms: float) -> None:
        self._thread = None
        self.switching_to = None
        # Whatever was triggered or captured until now may be a part of either product: FAULT, never inspected.
        self.guard_mono, self.guard_wall = time.monotonic(), time.time()
        with self._lock:
            if self._pending is None:   # a request that came in meanwhile keeps its parts FAULT until it is done
                self._requested_at = None
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
        self._save_selection()
        log.info("%s: recipe %s -> %s (bundle %s) verified and active in %.1f ms", self._who(), previous.name,
                 recipe.name, pipeline.bundle.bundle_id, ms)
        self._resume_line()   # READY again, unless the camera is still lost or the record still failing
        self._acknowledge("ok", recipe, ms, None)

    def hold_reason(self) -> str | None:
        """Why the line must stay FAULT for its recipe whatever else cleared (Line._resume), or None."""
        if self._unsaved is not None:
            return (f"recipe: selection not recorded ({self._unsaved}): a restart could resume the wrong "
                    "product")
        if self.status in ("switching", "failed") or self._invalid is not None or self._thread is not None:
            current = self.line.fault_reason
            return current if current and current.startswith("recipe:") else f"recipe: {self._invalid or self.status}"
        return None

    def _resume_line(self) -> None:
        """READY again after a switch, unless the selection could not be recorded (then FAULT, see poll())."""
        if self._unsaved is not None:
            self._unsaved_fault = True
            self.line._set_state(False, f"recipe: selection not recorded ({self._unsaved}): a restart could resume "
                                        "the wrong product")
        else:
            self.line._resume()

    def stale(self, triggered_mono: float | None = None, captured_wall: float | None = None,
              arrived_wall: float | None = None, captured_mono: float | None = None) -> str | None:
        """Why a part must be FAULT because it arrived before the last switch ended, or after a switch was
        requested and before it started (it may be the new product), or None.

        `arrived_wall` is when the part's image came into being where the source knows it (a watch folder's file:
        when it appeared): an image that was there before the switch ended is from before it, however late it is
        read. The request rule reads the hand-over time (`captured_wall`), the later of the two, so that an early
        file date never lets a part through while a request waits.

        The Modbus register is read again first: a PLC writes the recipe and triggers the part at once, and the
        loop may wake on the trigger before its housekeeping has read the register."""
        self._poll_register()
        if self._unsaved is not None:
            return f"recipe selection not recorded ({self._unsaved}): a restart could resume the wrong product"
        requested = self._requested_at
        # The capture is compared on both clocks: a wall clock stepped back (NTP at boot) must not date a frame
        # from after the request before it.
        if requested is not None and ((triggered_mono is not None and triggered_mono >= requested[0])
                                      or (captured_mono is not None and captured_mono >= requested[0])
                                      or (captured_wall is not None and captured_wall >= requested[1])):
            return "part triggered after a recipe switch was requested"
        if triggered_mono is not None and triggered_mono < self.guard_mono:
            return "part triggered during a recipe switch"
        # A frame handed over in this process is dated on the monotonic clock: on the wall clock, one stepped back
        # after the switch (NTP) would date every later frame before it and fault them all, for as long as the step.
        if captured_mono is not None:
            if captured_mono < self.guard_mono:
                return "frame captured during a recipe switch"
        elif captured_wall is not None and captured_wall < self.guard_wall:
            return "frame captured during a recipe switch"
        if arrived_wall is not None and arrived_wall < self.guard_wall:
            return (f"image arrived {self.guard_wall - arrived_wall:.2f} s before the last recipe switch ended: it may "
                    "be the previous product's")
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


def _resolve(waiter: Future, outcome: str, message: str) -> None:
    if not waiter.done():   # a waiter that gave up (timeout) may have cancelled it
        try:
            waiter.set_result((outcome, message))
        except Exception:  # noqa: BLE001 - cancelled meanwhile: nobody is waiting any more
            pass
