"""One inspection line: a camera's source -> Pipeline -> output bus, with its own frame counter, trigger, stats and state.

The daemon (edge_runtime/daemon.py) holds one Line per camera plus the shared listeners (HTTP, signals, watchdog).
A line's jobs live in named places: the output bus (edge_runtime/output_bus.py: record first, then the line,
then the images; one failure policy; slow outputs on workers), the frame counter (edge_runtime/frame_counter.py:
ids never reused), the triggers (edge_runtime/triggers.py: timestamped, expiring events).

Fail-safe rules enforced here: outputs start in their safe state; READY is raised only while a verified bundle is
loaded and frames arrive; every trigger is a part and gets exactly one answer: its verdict, or a FAULT result when
it cannot be served (no frame, camera lost, line in fault or backoff, trigger older than max_age_ms, folded
into a newer trigger); the verdict is withdrawn on the line outputs (begin_part) before the next part is captured;
a part whose record cannot be written is FAULT; the line's loop reports each round to the daemon, which pings the
systemd watchdog only while every line goes round, so a hung inference stops the pings and systemd restarts us.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from edge_runtime import bundle_loader, systemd_notify
from edge_runtime.bundle import BundleError, StationMismatch
from edge_runtime.capture_queue import is_live, wrap_source
from edge_runtime.config import StationConfig, trigger_warnings
from edge_runtime.drift_monitor import DriftMonitor
from edge_runtime.frame_counter import FrameCounter, FrameCounterError
from edge_runtime.http_endpoint import StationStatus, stall_reason
from edge_runtime.inflight import Finished, InFlight
from edge_runtime.latency_stats import LatencyStats
from edge_runtime.output_bus import BusCounters, OutputBus, RecordFailure
from edge_runtime.outputs import Output, ResultLogConfig, SerialOutput, build_output, last_frame_id
from edge_runtime.pipeline import Pipeline
from edge_runtime.plant_report import station_summary
from edge_runtime.recipes import RecipeSwitcher
from edge_runtime.records import Frame, InspectionResult, Verdict
from edge_runtime.rollout import RolloutManager
from edge_runtime.sources import FrameSource, SourceError, build_source
from edge_runtime.station_state import LineState
from edge_runtime.triggers import MAX_FOLDED, SoftwareTrigger, Trigger, TriggerError, TriggerEvent, build_trigger

log = logging.getLogger("edge_runtime.daemon")

__all__ = ["Counters", "Line", "MAX_MISSED_ANSWERS", "SERIAL_ACK_COMMAND"]
# At most this many FAULT answers for triggers folded into one (the rest are counted and logged); a software
# trigger refuses more than that (triggers.MAX_FOLDED), so only GPIO edges can exceed it.
MAX_MISSED_ANSWERS = MAX_FOLDED
OUTPUT_RETRY_S = 1.0   # a failed line output is told the station's state again this often (it may be back)
# A bundle load still running at stop (SIGHUP reload, recipe switch) is waited for this long: the interpreter tearing
# down while onnxruntime builds a session on another thread aborts the process (SIGABRT, probe 43).
BACKGROUND_LOAD_JOIN_S = 30.0
STALL_GUARD_LOCK_S = 0.5   # guard_stall waits this long for a state call in progress on the loop
# With frames in flight (inference.workers > 1) the loop reads the next frame this long at a time, so that a
# finished frame's verdict goes out within this much of the inspection's end.
INFLIGHT_POLL_S = 0.002
SERIAL_ACK_COMMAND = "ACK"


@dataclass
class Counters:
    frames: int = 0
    faults: int = 0
    source_errors: int = 0
    reloads: int = 0
    reload_failures: int = 0
    missed_triggers: int = 0   # a trigger fired and no frame could be inspected for it (each also a FAULT result)
    expired_triggers: int = 0  # of those: older than max_age_ms when the loop reached them
    bus: BusCounters = field(default_factory=BusCounters, repr=False)  # the output bus's own counters

    @property
    def output_errors(self) -> int:
        return self.bus.errors


class Line:
    """One camera's inspection line. The daemon calls `start()` (frame counter, bundle), then `loop()` (blocks
    until `request_stop()` or an exhausted replay source; one thread per line), then `shutdown()`.

    `name`: the line's label in logs and metrics (None: a single-line station, logs as before).
    `on_heartbeat(line)`: called each time the loop goes round (the daemon's watchdog).
    `load_hook`: replaces `_load` at start (the single-line Station routes it through its own `_load`).
    `on_systemd(line, event)`: set by a daemon of several lines, which tells systemd for the whole unit what the
    line would have sent itself ("status": its fault changed; "reloading" / "reloaded": a SIGHUP reload).
    `sinks`: outputs added after the configured ones (the station's operator page: this line's part history).
    """

    def __init__(self, cfg: StationConfig, *, source: FrameSource | None = None, outputs: list[Output] | None = None,
                 trigger: Trigger | None = None, name: str | None = None,
                 on_heartbeat: Callable[["Line"], None] | None = None, sinks: list[Output] | None = None):
        self.cfg = cfg
        self.name = name
        self.on_heartbeat = on_heartbeat
        self.load_hook: Callable[[], bool] | None = None
        self.on_systemd: Callable[["Line", str], None] | None = None
        self.outputs = outputs if outputs is not None else [build_output(o) for o in cfg.outputs]
        self.rollout: RolloutManager | None = None
        if cfg.rollout.enabled:   # a sink of records too: it watches the first parts of a new bundle
            self.rollout = RolloutManager(cfg.rollout, cfg.state_dir or "state", load=self._load_offered,
                                          install=self.install_pipeline, current=self._serving,
                                          set_bundle_path=lambda path: setattr(self.cfg, "bundle", path),
                                          withdraw=self.withdraw_pipeline, condemn=self.condemn_bundle)
            self.outputs = [*self.outputs, self.rollout]
        if sinks:   # the station's operator page: it reads the same result stream as the line's outputs
            self.outputs = [*self.outputs, *sinks]
        deadline = cfg.inference.deadline_ms
        self.bus = OutputBus(self.outputs, late_after_s=deadline / 1000.0)
        self.trigger = trigger if trigger is not None else build_trigger(cfg.trigger)
        self._trigger_open = False   # the trigger input is requested (see _ensure_trigger)
        if isinstance(self.trigger, SoftwareTrigger):
            # The previous part's verdict is withdrawn before POST /trigger answers 202 (or a TRG returns): a PLC
            # reading coil 0 right after its trigger read the previous part's OK (probe 35, 2 in 40).
            self.trigger.on_fire = self.bus.trigger_accepted
        for out in self.outputs:
            # A PLC on the serial line may send "TRG" (capture one part) and "ACK" (withdraw the verdict).
            if isinstance(out, SerialOutput) and out.cfg.accept_trigger:
                out.on_line = self._on_serial_line
            if hasattr(out, "bind_state"):   # MQTT, OPC UA: state, bundle and counters for the plant
                out.bind_state(self.plant_state)
            if hasattr(out, "bind_trigger") and isinstance(self.trigger, SoftwareTrigger):
                # OPC UA StartSingleJob and MQTT cmd/trigger, like POST /trigger
                out.bind_trigger(self.trigger.fire, withdraw=self.bus.trigger_accepted)
            if hasattr(out, "bind_commands") and self.rollout is not None:
                out.bind_commands(self.rollout.on_command)   # MQTT <prefix>/cmd/rollout
        self._source = source
        self.pipeline: Pipeline | None = None
        self._condemned: dict[str, str] = {}   # bundle id -> why none of its verdicts may go out (condemn_bundle)
        # Several bundles, one per product, selected by the line controller (edge_runtime/recipes.py).
        self.recipes = RecipeSwitcher(self, cfg.recipes) if getattr(cfg, "recipes", None) else None
        for out in self.outputs if self.recipes is not None else []:
            if hasattr(out, "bind_recipes"):   # OPC UA PrepareRecipe, MQTT cmd/recipe: select through the switcher
                out.bind_recipes(self.recipes)
        self.stats = LatencyStats(cfg.logging.stats_window)
        self.drift: DriftMonitor | None = None   # rolling drift warnings of the bundle in service (drift_monitor.py)
        self.counters = Counters(bus=self.bus.counters)
        self.verdicts = {v.value: 0 for v in Verdict}
        self.fault_reason: str | None = "starting"
        self.last_verdict: str | None = None
        self.last_bundle_id: str | None = None   # the bundle that scored last_verdict ("none": no bundle loaded)
        self._ready = False
        # (ready, fault reason) as one value for /healthz and state(), written once per change: the HTTP thread
        # must never see the fault cleared before READY is up ("not_ready" in passing, seen in CI).
        self._health: tuple[bool, str | None] = (False, "starting")
        # What the outputs were last told (outputs start not READY), and the stall the guard shows instead of the
        # line's state while the loop is stuck (guard_stall); _set_state and the guard drive them under one lock.
        self._driven_ready, self._driven_fault = False, "starting"
        self._stall_shown: str | None = None
        self._state_lock = threading.RLock()
        self._halted: str | None = None       # set: the station stays in FAULT and inspects nothing until restart
        self._record_fault: str | None = None  # the last part could not be recorded (on_record_failure: fault)
        # The camera / trigger input is lost and not yet reopened; "starting" until its first open, so a fault that
        # clears before then cannot raise READY with no camera.
        self._source_fault: str | None = "starting"
        self._output_fault: str | None = None  # a line output failed to show a verdict or state (bus)
        # Why no bundle is loaded (a failed load, a withdrawn one): held while pipeline is None, so another fault
        # clearing cannot raise READY with nothing to inspect on.
        self._bundle_fault: str | None = None
        self._next_record_probe = 0.0
        self._stop = threading.Event()
        self._shut_down = False
        self._reload = threading.Event()
        self._reopen = threading.Event()
        self._reload_lock = threading.Lock()
        self._reload_thread: threading.Thread | None = None
        self._reload_outcome: tuple[Pipeline | None, Exception | None] | None = None  # set by the reload thread
        self._install_generation = 0   # rollout installs so far: a reload begun before the last one is stale
        self._trim_pending = False     # a reload dropped the old pipeline: release its heap on the next iteration
        self.frame_ids = FrameCounter(None)
        self._dropped_since_stats = 0
        self._missed_taken = 0   # _count_dropped: a source's own `missed` already taken (no capture thread)
        self._started = time.monotonic()
        self._last_heartbeat = time.monotonic()
        self._loop_running = False             # the loop has gone round once (before: loading, not stalled)
        self._next_output_retry = 0.0          # _check_outputs: next retry of a failed line output (monotonic)
        self._inspecting_since: float | None = None  # set while a frame is in Pipeline.inspect (health: stalled)
        self._inflight: InFlight | None = None       # free run with inference.workers > 1 (edge_runtime/inflight.py)
        self._begun: int | None = None               # with frames in flight: the part the outputs were told began

    # ---- control (signal handlers and tests) ----------------------------------------------------------------
    def request_stop(self) -> None:
        """Stop: READY goes down now, not when the loop notices (a part in inspection is still answered, and a
        trigger that arrives from here on is answered FAULT, or refused with 503 over HTTP)."""
        self._stop.set()
        if self.rollout is not None:
            self.rollout.stopping()
        # From the signal relay or another line's thread: a loop blocked inside a state call holds the lock, and
        # shutdown drives the safe state anyway; do not wait on it for long.
        self._drop_ready(STALL_GUARD_LOCK_S)

    def _drop_ready(self, timeout: float = -1) -> None:
        """READY down on the outputs (the fault as it is); gives up after `timeout` s waiting for a state call."""
        if not self._state_lock.acquire(timeout=timeout):
            return
        try:
            self._ready = False
            self._health = (False, self.fault_reason)
            self._drive_state()
        finally:
            self._state_lock.release()

    def request_reload(self) -> None:
        self._reload.set()

    def request_reopen(self) -> None:
        """SIGUSR1: reopen log files (after an external rotation), from the loop thread."""
        self._reopen.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def state(self) -> LineState:
        """The line's state as an enum (see edge_runtime/station_state.py)."""
        ready, reason = self._health
        return LineState.of(stopping=self._stop.is_set(), fault_reason=reason, ready=ready,
                            busy=self._inspecting_since is not None, loaded=self.pipeline is not None)

    def _tag(self, text: str) -> str:
        return f"line {self.name}: {text}" if self.name else text

    def _on_serial_line(self, line: str) -> bool:
        """A line from the PLC on the serial port (receiver thread): TRG fires the trigger, ACK acknowledges."""
        command = line.strip().upper()
        if self.recipes is not None and self.recipes.on_serial(line):
            return True
        if command == SERIAL_ACK_COMMAND:
            self.bus.acknowledge()
            return True
        if isinstance(self.trigger, SoftwareTrigger):
            # Fired even while the station cannot inspect: the loop answers it with a FAULT result at once.
            return self.trigger.handle_line(line)
        return False

    # ---- state -------------------------------------------------------------------------------------------------
    def _set_state(self, ready: bool, fault: str | None) -> None:
        if self._halted:
            ready, fault = False, self._halted  # only a restart clears a halt
        if self._stop.is_set():
            ready = False   # stopping: READY stays down (request_stop)
        with self._state_lock:
            if fault != self.fault_reason:
                if fault:
                    log.error(self._tag("FAULT: %s"), fault)
                elif self.fault_reason:
                    log.info(self._tag("fault cleared (%s)"), self.fault_reason)
                self.fault_reason = fault
                self._systemd("status")
            self._ready = ready
            self._health = (self._ready, self.fault_reason)
            self._drive_state()

    def _systemd(self, event: str) -> None:
        """STATUS=, RELOADING=1 or READY=1 to systemd: the line's own, or through the daemon (on_systemd)."""
        if self.on_systemd is not None:
            self.on_systemd(self, event)
        elif event == "status":
            systemd_notify.status(self._tag(f"fault: {self.fault_reason}" if self.fault_reason else "inspecting"))
        elif event == "reloading":
            systemd_notify.reloading()
        else:
            systemd_notify.ready()

    def _drive_state(self) -> None:
        """READY and the fault on the outputs: the line's own state, except READY down and the stall as the fault
        while the stall guard says the loop is stuck. Only changes are sent. Caller holds _state_lock."""
        fault = self._stall_shown or self.fault_reason
        ready = self._ready and self._stall_shown is None
        if fault != self._driven_fault:
            self.bus.set_fault(fault)
            self._driven_fault = fault
        if ready != self._driven_ready:
            self.bus.set_ready(ready)
            self._driven_ready = ready

    def guard_stall(self) -> None:
        """The daemon's stall guard (its own thread, a few times a second): a loop stuck in a blocking call (a hung
        disk or network share, an output that blocks) cannot drop READY itself, and a PLC that feeds parts on
        READY kept feeding a station that answered nothing (probe 35: READY up for as long as the hang lasted;
        systemd's watchdog restarts it only after WatchdogSec, and without systemd never). READY goes down with
        the stall as the fault on the outputs, and comes back with the line's own state when the loop runs."""
        if self._stop.is_set():
            return   # stopping: shutdown drives the outputs to their safe state itself
        # Not before the deadline: http.stall_after_s may be set low for /healthz, and a part still inside its
        # deadline is not a stall on the line (probe 36: stall_after_s 0.3 flapped READY on every slow record).
        busy_limit = max(self._stall_after_s(), self.cfg.inference.deadline_ms / 1000.0)
        reason = stall_reason(self._busy_s(), busy_limit, time.monotonic() - self._last_heartbeat,
                              self._loop_stall_after_s() if self._loop_running else None)
        if not self._state_lock.acquire(timeout=STALL_GUARD_LOCK_S):
            return   # the loop is inside a state call that blocks: the watchdog (pings stopped) is what is left
        try:
            if (reason is None) == (self._stall_shown is None):
                return
            if reason is not None:
                log.error(self._tag("READY down until the loop goes round again: %s"), reason)
            else:
                log.info(self._tag("inspection loop runs again (%s)"), self._stall_shown)
            self._stall_shown = reason
            self._drive_state()
        finally:
            self._state_lock.release()

    def _holding_fault(self) -> str | None:
        """What still holds the line in FAULT whatever else cleared (no bundle, a lost camera, an unwritable record,
        a failed line output, a recipe), or None."""
        # Read off the pipeline itself, whoever left it None (a load hook, a recipe): no READY without a bundle.
        bundle = (self._bundle_fault or "bundle: none loaded") if self.pipeline is None else None
        return (bundle or self._source_fault or self._record_fault or self._output_fault
                or (self.recipes.hold_reason() if self.recipes is not None else None))

    def _resume(self) -> None:
        """Inspecting again after a condition cleared (a recipe switch, a reload, a record), unless another one
        still holds the line: no bundle, a lost camera or an unwritable record keeps READY down whatever else
        cleared."""
        fault = self._holding_fault()
        self._set_state(fault is None, fault)

    def _check_outputs(self) -> None:
        """READY down and FAULT while a line output cannot be driven (the others say so); back when it can."""
        now = time.monotonic()
        if self._output_fault is not None and now >= self._next_output_retry:
            self._next_output_retry = now + OUTPUT_RETRY_S
            with self._state_lock:
                self.bus.retry_failed_lines(self._driven_ready, self._driven_fault)
        failure = self.bus.line_output_fault()
        if failure is not None:
            reason = f"output {failure}"
            if reason != self._output_fault:
                self._output_fault = reason
                self._set_state(False, reason)
        elif self._output_fault is not None:
            log.info(self._tag("line outputs work again (%s)"), self._output_fault)
            self._output_fault = None
            self._resume()

    def _halt(self, reason: str) -> None:
        if self._halted is None:
            self._halted = f"halted: {reason}"
            self._set_state(False, self._halted)

    # ---- status for /healthz and /metrics ----------------------------------------------------------------------
    def status(self) -> StationStatus:
        # A fault wins over READY: a station that cannot record its parts is not healthy even while it runs.
        ready, reason = self._health
        state = "fault" if reason else ("ready" if ready else "not_ready")
        if self._stop.is_set() and not reason:
            reason = "stopping"   # not a fault: says why, e.g. in the 503 POST /trigger gets
        c = self.counters
        pipeline = self.pipeline
        counters = {"source_errors": c.source_errors, "reloads": c.reloads, "reload_failures": c.reload_failures,
                    "missed_triggers": c.missed_triggers, "expired_triggers": c.expired_triggers,
                    "trigger_overruns": getattr(self.trigger, "overruns", 0),
                    "trigger_refused": getattr(self.trigger, "refused", 0),
                    "dropped_frames": self.dropped_frames,
                    "stale_files": getattr(self._source, "stale", 0)}   # watch + trigger: files left out
        counters.update(self.bus.output_counters())
        if self.recipes is not None:
            counters.update(self.recipes.counters())
        return StationStatus(
            state=state, reason=reason,
            bundle_id=pipeline.bundle.bundle_id if pipeline else None, frames=c.frames,
            last_verdict=self.last_verdict, last_bundle_id=self.last_bundle_id, uptime_s=time.monotonic() - self._started, verdicts=dict(self.verdicts),
            faults=c.faults + c.source_errors, skipped=getattr(self._source, "skipped", 0),
            last_heartbeat_age_s=time.monotonic() - self._last_heartbeat, latency=self.stats, counters=counters,
            busy_s=self._busy_s(), stall_after_s=self._stall_after_s(),
            loop_stall_after_s=self._loop_stall_after_s() if self._loop_running else None,
            bundle_version=pipeline.bundle.bundle_version if pipeline else None,
            rollout=self.rollout.report() if self.rollout is not None else None,
            drift=self.drift.state() if self.drift is not None and pipeline is not None
            and self.drift.bundle_id == pipeline.bundle.bundle_id else None)

    def plant_state(self) -> dict:
        """The line's state for the plant (MQTT state message, OPC UA): edge_runtime/plant_report.py."""
        return station_summary(self.cfg.name, self.status())

    def install_pipeline(self, pipeline: Pipeline) -> None:
        """Swap in a verified pipeline between two frames (signed rollout), through the reload path."""
        with self._reload_lock:
            # A reload (SIGHUP) started before this read the bundle path as it was: its outcome is stale now.
            self._install_generation += 1
            self._reload_outcome = (pipeline, None)

    def _serving(self) -> Pipeline | None:
        """The pipeline in service once the loop applies what is pending (a rollout's install or withdrawal, a
        reload): the rollout's `current`. The loop swaps between two frames; an offer taken meanwhile, right after a
        rollback, had taken the failed candidate still in self.pipeline as the bundle to return to (probe 114)."""
        with self._reload_lock:
            pending = self._reload_outcome
        if pending is not None and pending[0] is not None:
            return None if pending[0] == "withdraw" else pending[0]
        return self.pipeline

    def condemn_bundle(self, bundle_id: str, reason: str) -> None:
        """No verdict from this bundle is published from now on (any thread): a part inspected on it but not yet
        answered is FAULT. A rollout's candidate that failed its probation, before the loop swaps it out."""
        self._condemned[bundle_id] = reason

    def withdraw_pipeline(self, reason: str) -> None:
        """Take the bundle out of service between two frames: the line is FAULT (READY down) until a verified bundle
        is installed or reloaded. A rollout's candidate that failed probation with nothing to return to."""
        with self._reload_lock:
            self._install_generation += 1
            self._reload_outcome = ("withdraw", reason)

    def _load_offered(self, path: str, current: Pipeline | None) -> Pipeline:
        """A rollout's candidate through the same verification as a reload, on one thread beside the loop."""
        return bundle_loader.load_pipeline(dataclasses.replace(self.cfg, bundle=path),
                                           current.bundle if current else None, load_threads=1)

    def _busy_s(self) -> float | None:
        since = self._inspecting_since
        return None if since is None else time.monotonic() - since

    def _stall_after_s(self) -> float:
        if self.cfg.http.stall_after_s is not None:
            return self.cfg.http.stall_after_s
        deadline_ms = self.cfg.inference.deadline_ms
        return max(2.0, deadline_ms / 1000.0)   # past the deadline the part is FAULT anyway

    def _loop_stall_after_s(self) -> float:
        """Longest healthy gap between two rounds of the loop: a wait for the trigger and one for the frame (each
        up to recovery.read_timeout_s), an inspection up to the stall limit, the source's own longest blocking
        call (a stream's open_timeout_s, a camera's open_timeout_ms: a slow reopen is not a stall), and a second
        of slack."""
        src = getattr(self.cfg, "source", None)
        own = max([getattr(src, k, None) or 0 for k in ("open_timeout_s", "read_timeout_s")]
                  + [(getattr(src, k, None) or 0) / 1000 for k in ("open_timeout_ms", "read_timeout_ms")])
        return 2 * self.cfg.recovery.read_timeout_s + self._stall_after_s() + own + 1.0

    # ---- bundle ------------------------------------------------------------------------------------------------
    def _load_failure(self, error) -> str:
        """The FAULT reason: a station-file key that does not suit the bundle is the station file's fault."""
        if isinstance(error, StationMismatch):
            return f"{error} (bundle {self.cfg.bundle})"
        return f"bundle {self.cfg.bundle}: {error}"

    def _load(self) -> bool:
        try:
            self.pipeline = (self.recipes.load_initial() if self.recipes is not None
                             else bundle_loader.load_pipeline(self.cfg))
        except Exception as exc:  # noqa: BLE001 - whatever breaks the load, the station must stay up in FAULT
            self.pipeline = None
            if not isinstance(exc, (BundleError, OSError)):
                log.exception(self._tag("loading bundle %s failed unexpectedly"), self.cfg.bundle)
            self._bundle_fault = self._load_failure(exc)
            self._set_state(False, self._bundle_fault)
            return False
        self._bundle_fault = None
        log.info(self._tag("bundle %s loaded: variant %s, knn %s, threshold %.4f, position prior %s"),
                 self.pipeline.bundle.bundle_id, self.pipeline.variant.name, self.pipeline.knn,
                 self.pipeline.threshold, getattr(self.pipeline, "prior_note", "off"))
        return True

    def _start_reload(self) -> None:
        """SIGHUP: load and self-test the bundle in a background thread while the old one keeps inspecting.

        Loading can take seconds on a small board; doing it here would stall the line and the watchdog pings."""
        if self._reload_thread is not None and self._reload_thread.is_alive():
            return  # the flag stays set: another reload follows the running one
        self._reload.clear()
        log.info(self._tag("SIGHUP: reloading bundle %s"), self.cfg.bundle)
        self._systemd("reloading")
        self._reload_thread = threading.Thread(target=self._reload_worker, name="bundle-reload", daemon=True)
        self._reload_thread.start()

    def _join_loads(self) -> None:
        """Wait for a bundle load still running on its own thread (its outcome is dropped: the loop has ended)."""
        workers = [self._reload_thread, self.recipes.worker if self.recipes is not None else None]
        for worker in workers:
            if worker is None or not worker.is_alive():
                continue
            log.info(self._tag("stopping: waiting for %s to finish loading"), worker.name)
            worker.join(BACKGROUND_LOAD_JOIN_S)
            if worker.is_alive():
                log.warning(self._tag("%s still loading after %.0f s; exiting anyway"), worker.name,
                            BACKGROUND_LOAD_JOIN_S)

    def _reload_worker(self) -> None:
        current = self.pipeline
        with self._reload_lock:
            generation = self._install_generation
        # After a rollout the line runs its staged copy; a station file's bundle changed since (a symlink switched to
        # a new release) is what SIGHUP loads (rollout.py, "station").
        path = self.rollout.reload_bundle(self.cfg.bundle) if self.rollout is not None else self.cfg.bundle
        try:
            # One thread while loading and self-testing: the inspection loop keeps its cores.
            outcome: tuple[Pipeline | None, Exception | None] = (
                bundle_loader.load_pipeline(dataclasses.replace(self.cfg, bundle=path),
                                            current.bundle if current is not None else None, load_threads=1), None)
        except Exception as exc:  # noqa: BLE001 - reported to the loop thread, which decides what to do
            if not isinstance(exc, (BundleError, OSError)):
                log.exception(self._tag("reloading bundle %s failed unexpectedly"), path)
            outcome = (None, exc)
        with self._reload_lock:
            if outcome[0] is not None and path != self.cfg.bundle:
                if generation == self._install_generation and self.rollout.reloaded(path):
                    self.cfg.bundle = path   # the station file's bundle from now on (a reload, a rollback's way back)
                else:
                    generation = -1      # a rollout began meanwhile: this reload is superseded
            if generation != self._install_generation:
                # A rollout installed a newer bundle while this reload ran: applying this one would put the
                # older bundle back in service. The reload runs again on what the station names now.
                log.info(self._tag("reload superseded by a rollout install; reloading again"))
                self._reload.set()
                return
            self._reload_outcome = outcome

    def _apply_reload(self) -> None:
        """Runs in the loop thread: swap pipelines between frames and drive the outputs from one thread only."""
        if self._trim_pending:
            # The old pipeline is gone by now (the loop took the new one): hand its memory back to the OS.
            self._trim_pending = False
            bundle_loader.release_freed_memory()
        with self._reload_lock:
            outcome, self._reload_outcome = self._reload_outcome, None
        if outcome is None:
            return
        new, error = outcome
        if new == "withdraw":
            self.pipeline = None
            self._trim_pending = True
            log.error(self._tag("bundle withdrawn: %s"), error)
            self._bundle_fault = f"bundle: {error}"
            self._set_state(False, self._bundle_fault)
        elif new is None:
            self.counters.reload_failures += 1
            if self.pipeline is not None:
                # Keep inspecting with the verified old bundle rather than stopping the line.
                log.error(self._tag("reload refused, keeping bundle %s: %s"), self.pipeline.bundle.bundle_id, error)
            else:
                self._bundle_fault = self._load_failure(error)
                self._set_state(False, self._bundle_fault)
        else:
            had_none = self.pipeline is None
            self.pipeline = new
            self._bundle_fault = None
            self.counters.reloads += 1
            # The loop still holds the old pipeline until its next iteration: trim after that (see above).
            self._trim_pending = True
            # Tagged with the line, as every bundle line here: two lines on one bundle folder may end a SIGHUP on
            # different bundles (one refused), and the journal said which bundle, not which line (probe 106).
            log.info(self._tag("reloaded: bundle %s, variant %s, knn %s, threshold %.4f, position prior %s"),
                     new.bundle.bundle_id, new.variant.name, new.knn, new.threshold, getattr(new, "prior_note", "off"))
            if had_none:
                # A reload clears only the bundle's own fault: a lost camera, a failing record or a line output
                # stays the fault. With nothing else holding the line READY comes back now, not at the next part:
                # a line triggered only over HTTP gets 503 while READY is down and would never send that part.
                self._resume()
        self._systemd("reloaded")  # ends the RELOADING state either way

    # ---- frame ids ---------------------------------------------------------------------------------------------
    def _open_frame_counter(self) -> None:
        """Continue after the newest id in the result log and the saved counter, so ids are never reused."""
        start = 0
        for o in self.cfg.outputs:
            if isinstance(o, ResultLogConfig):
                try:
                    last = last_frame_id(o.path)
                except OSError as exc:  # the result log itself reports this when it starts
                    log.warning("result log %s unreadable (%s)", o.path, exc)
                    continue
                if last is not None:
                    start = max(start, last + 1)
        self.frame_ids = FrameCounter(self.cfg.state_dir, start_at=start)
        try:
            self.frame_ids.open()
        except FrameCounterError as exc:
            self._halt(str(exc))

    def _take_frame_id(self) -> int:
        # The daemon numbers parts, not the source: a trigger that got no frame still consumes an id, so every
        # result on the line (including its FAULT) has its own id for the PLC to latch.
        try:
            return self.frame_ids.take()
        except FrameCounterError as exc:
            self._halt(str(exc))   # this part still gets its FAULT answer, with an id from memory
            return self.frame_ids.take_unpersisted()

    # ---- the loop ----------------------------------------------------------------------------------------------
    def _heartbeat(self) -> None:
        now = time.monotonic()
        self._last_heartbeat = now
        self._loop_running = True
        self.bus.heartbeat()
        # The daemon pings the watchdog only once every line has gone round: if inference hangs, the pings stop
        # and systemd restarts the service.
        if self.on_heartbeat is not None:
            self.on_heartbeat(self)

    def _publish(self, result: InspectionResult, started: float | None) -> None:
        """One part's answer through the output bus: record, then line, then images."""
        condemned = self._condemned.get(result.bundle_id)
        if condemned is not None and result.verdict is not Verdict.FAULT:
            # Inspected on a bundle condemned meanwhile (failed its probation): frames in flight or admitted
            # before the loop swapped it out get no verdict from it.
            result = dataclasses.replace(result, verdict=Verdict.FAULT,
                                         error=f"bundle {result.bundle_id} {condemned} before this part's verdict "
                                               "went out")
        if self._halted and result.verdict is not Verdict.FAULT:
            # A halted line drives no OK/NG/REVIEW, not even for the part whose id reservation halted it (inspected
            # on an id from memory) or one inspected before the halt and answered after it.
            result = dataclasses.replace(result, verdict=Verdict.FAULT,
                                         error=f"{self._halted} before this part's verdict went out")
        failure = self.bus.publish(result, started=started, deadline_ms=self.cfg.inference.deadline_ms)
        self.counters.frames += 1
        self.verdicts[result.verdict.value] += 1
        self.last_verdict = result.verdict.value
        self.last_bundle_id = result.bundle_id
        if result.verdict is Verdict.FAULT:
            self.counters.faults += 1
            log.warning(self._tag("frame %d %s: FAULT: %s"), result.frame_id, result.source, result.error)
        else:
            self.stats.add(result.timings_ms)
        self._observe_drift(result)   # a frame the frame check refused still tells what the camera sees
        if failure is not None:
            self._record_failed(failure)
        elif self._record_fault is not None:
            self._record_fault = None
            self._resume()                      # the record works again
        self._check_outputs()

    def _observe_drift(self, result: InspectionResult) -> None:
        pipeline = self.pipeline
        if pipeline is None or pipeline.bundle.bundle_id != result.bundle_id:
            return   # answered on a bundle no longer in service: not evidence about the one that is
        if self.drift is None or self.drift.bundle_id != result.bundle_id:   # a new bundle: fresh windows
            good = pipeline.variant.info.get("threshold_info", {}).get("good_scores", {})
            self.drift = DriftMonitor(self.cfg.drift, good.get("p50") if isinstance(good, dict) else None,
                                      pipeline.quality_band, result.bundle_id)
        self.drift.observe(result)

    def _record_failed(self, failure: RecordFailure) -> None:
        reason = f"record: {failure.output}: {failure.reason}"
        if failure.halt:
            self._halt(reason)
        else:
            # Every part is FAULT until a record can be written again: READY down, so the controller does not
            # feed the station parts it can only reject (the loop still answers any trigger, and probes the log).
            self._record_fault = reason
            self._set_state(False, reason)

    def _answer_fault(self, reason: str, started: float, frame_id: int | None = None,
                      frame: Frame | None = None) -> None:
        """A trigger fired (a part is there) and it cannot be inspected: the line gets a FAULT result for it. With
        the frame that was read for it, the record names its file or camera and capture time (the audit trail)."""
        self.counters.missed_triggers += 1
        if frame_id is None:
            frame_id = self._take_frame_id()
            self.bus.begin_part(frame_id)
        pipeline = self.pipeline
        what = "part" if self.trigger.is_free_run else "triggered part"
        self._publish(InspectionResult(
            frame_id=frame_id, source=frame.source if frame is not None else getattr(self._source, "name", "source"),
            verdict=Verdict.FAULT, score=None,
            normalized_score=None, threshold=pipeline.threshold if pipeline else math.nan,
            timings_ms={"total": (time.monotonic() - started) * 1000.0},
            bundle_id=pipeline.bundle.bundle_id if pipeline else "none", error=f"{what} not inspected: {reason}",
            captured_at=frame.captured_at if frame is not None else 0.0),
            started)

    def _refuse_triggers(self, reason: str, timeout: float) -> None:
        """While the station cannot inspect, wait up to `timeout` s and answer every trigger that arrives at once
        with FAULT, instead of serving it late when the station is back."""
        if isinstance(self.trigger, SoftwareTrigger):
            event = self.trigger.wait(timeout)   # wakes on a fire: the answer goes out at once
            events = [] if event is None else [event]
        else:
            # Woken by an edge too: edges drained before a fixed sleep were answered after it, up to two
            # read_timeout_s after their trigger, past the controller's timeout (probe 77: 1.7 s at 1 s).
            began = time.monotonic()
            events = self.trigger.drain(timeout)
            if not events:   # a trigger that cannot wait (not requested, free run) returns at once
                self._stop.wait(max(0.0, timeout - (time.monotonic() - began)))
        for event in events:
            self._answer_missed(event)   # the folded ones: at most MAX_MISSED_ANSWERS, the rest counted and logged
            self._answer_fault(f"station not ready ({reason})", event.at)

    def _fault_frames(self, reason: str, timeout: float) -> None:
        """Free run where every frame is a part, while the line cannot inspect: each frame read (and each one the
        capture dropped) is answered FAULT as it comes, for up to `timeout` s. A lost source is left to the
        regular path, which reopens it."""
        deadline = time.monotonic() + timeout
        while not self._stop.is_set() and (remaining := deadline - time.monotonic()) > 0:
            try:
                frame = self._source.read(remaining)
            except (SourceError, TriggerError, OSError):
                return
            if frame is None:
                return
            for _ in range(self._count_dropped()):
                self._answer_fault(f"frame dropped while the station could not inspect ({reason})", time.monotonic())
            frame_id = self._take_frame_id()
            self.bus.begin_part(frame_id)
            self._answer_fault(f"station not ready ({reason})", time.monotonic(), frame_id, frame)

    def _answer_missed(self, event: TriggerEvent) -> None:
        for n in range(min(event.missed, MAX_MISSED_ANSWERS)):
            # Dated by its own trigger: the serial line never sends an answer past that part's deadline (the
            # controller has timed out on it and would read it as the next part's; output_bus.py).
            at = event.folded_at[n] if n < len(event.folded_at) else event.at
            self._answer_fault("trigger overrun: a newer trigger arrived before this one was served", at)
        if event.missed > MAX_MISSED_ANSWERS:
            self.counters.missed_triggers += event.missed - MAX_MISSED_ANSWERS
            log.error("%d more triggers folded into one were not answered individually", event.missed - MAX_MISSED_ANSWERS)

    def _expired(self, event: TriggerEvent) -> bool:
        max_age = self.trigger.max_age_ms
        age = event.age_ms()
        if max_age is None or age <= max_age:
            return False
        self.counters.expired_triggers += 1
        self._answer_fault(f"trigger expired: {age:.0f} ms old when the loop reached it > max_age_ms {max_age:g}",
                           event.at)
        return True

    def start_outputs(self) -> None:
        """Every output started in its safe state (not READY, no OK); called once, before `start()`. A record that
        did not start holds READY down (FAULT) until it can be written (probed as after a failed record)."""
        failure = self.bus.start()
        if failure is not None:
            self._record_fault = f"record: {failure}"
            self._set_state(False, self._record_fault)
        self._check_outputs()

    def start(self) -> None:
        """Frame counter opened, bundle loaded and self-tested. A bad bundle leaves the line alive in an explained
        FAULT state."""
        for warning in self.cfg.frame_check.warnings() + trigger_warnings(self.cfg):
            log.warning(self._tag("%s"), warning)
        self._open_frame_counter()
        t0 = time.monotonic()
        if self.rollout is not None:   # the rolled-out bundle, or the previous one after a crash in probation
            self.cfg.bundle = self.rollout.startup_bundle(self.cfg.bundle)
        (self.load_hook or self._load)()
        if self.rollout is not None:
            self.rollout.line_loaded()
        if self.recipes is not None:
            self.recipes.open_inputs()   # GPIO recipe select lines, once the initial recipe is in
        log.info(self._tag("start-up took %.2f s (%s)"), time.monotonic() - t0, "ready" if self.pipeline else "FAULT")

    def _housekeeping(self, next_stats: float) -> float:
        self._heartbeat()
        self._check_outputs()       # a slow output's worker may have failed (or recovered) since the last part
        if self.recipes is not None:
            if self._reload.is_set():
                # SIGHUP with recipes: the recipe asked for last, again from disk, verified like any switch.
                self._reload.clear()
                self.recipes.reload_latest("SIGHUP")
            self.recipes.poll()
        if self._reload.is_set():
            self._start_reload()
        self._apply_reload()
        if self._reopen.is_set():
            self._reopen.clear()
            log.info("SIGUSR1: reopening log files")
            self.bus.reopen()
        if self._record_fault is not None and time.monotonic() >= self._next_record_probe:
            # READY is down, so parts may not come to prove the disk fixed: ask the log itself, once a second.
            self._next_record_probe = time.monotonic() + 1.0
            if self.bus.probe_records() is None:
                log.info(self._tag("record writable again (%s)"), self._record_fault)
                self._record_fault = None
                self._resume()
        if time.monotonic() >= next_stats:
            next_stats = time.monotonic() + self.cfg.logging.stats_interval_s
            self._log_stats()
        return next_stats

    def loop(self) -> int:
        """Inspect until stopped or the replay source is exhausted (exit_when_exhausted). Returns 0."""
        rc_cfg = self.cfg.recovery
        backoff = rc_cfg.backoff_initial_s
        retry_at = 0.0
        source_open = False
        next_stats = time.monotonic() + self.cfg.logging.stats_interval_s
        if self._source is None:
            self._source = build_source(
                self.cfg.source, self.frame_ids.next_id, state_dir=self.cfg.state_dir,
                result_logs=[o.path for o in self.cfg.outputs if isinstance(o, ResultLogConfig)])
        # A free-running live source gets a capture thread: capture overlaps inspection, drops are counted.
        self._source = wrap_source(self._source, self.cfg.capture, self.trigger.is_free_run)
        workers = self.cfg.inference.workers
        if workers > 1 and self.trigger.is_free_run:
            self._inflight = InFlight(workers, self.name or "line")
        elif workers > 1:
            log.info(self._tag("inference.workers %d: a triggered line inspects one part at a time"), workers)
        while not self._stop.is_set():
            next_stats = self._housekeeping(next_stats)
            pipeline = self.pipeline
            if pipeline is None or self._halted or (self.recipes is not None and self.recipes.status != "ok"):
                self._drain_inflight()   # frames captured before this: their answers first, in order
                # No bundle, halted, or a recipe switch running or failed: every trigger gets FAULT at once, and
                # so does every frame where each is a part (not a burst of late answers when the line is back).
                self._ensure_trigger_quietly()   # a GPIO trigger's edges are seen (and answered) while it lasts
                if source_open:
                    try:
                        # A source lost meanwhile (a watch folder removed) is its own fault now: the reload or
                        # recipe switch that ends this raised READY on it until the next idle probe.
                        self._probe_source()
                    except (SourceError, TriggerError, OSError) as exc:
                        self._lose_source(exc)
                        source_open = False
                        retry_at, backoff = time.monotonic() + backoff, min(backoff * 2, rc_cfg.backoff_max_s)
                if (source_open and self.trigger.is_free_run and self.cfg.capture.every_frame_is_a_part
                        and is_live(getattr(self._source, "source", self._source))):
                    # A live camera's frames go by (each a part); a watch folder's files wait for the line.
                    self._fault_frames(self.fault_reason or "no bundle", rc_cfg.read_timeout_s)
                else:
                    self._refuse_triggers(self.fault_reason or "no bundle", rc_cfg.read_timeout_s)
                continue
            if not source_open:
                # The trigger input stays requested while the source is reopened: a GPIO line released meanwhile
                # keeps no edges, so parts triggered then had no record and no answer (probe 62).
                self._ensure_trigger_quietly()
                if time.monotonic() < retry_at:
                    self._refuse_triggers(self.fault_reason or "source reopening",
                                          min(rc_cfg.read_timeout_s, max(0.0, retry_at - time.monotonic())))
                    continue
                try:
                    self._ensure_trigger()
                    self._source.open()
                    source_open = True
                    backoff = rc_cfg.backoff_initial_s
                    self._source_fault = None
                    self._resume()
                except (SourceError, TriggerError, OSError) as exc:
                    self._lose_source(exc)
                    retry_at, backoff = time.monotonic() + backoff, min(backoff * 2, rc_cfg.backoff_max_s)
                    continue
            try:
                outcome = self._serve_one(pipeline)
            except (SourceError, TriggerError, OSError) as exc:
                # Camera lost: not-OK on the outputs, no verdict for anything, reopen with backoff.
                self._drain_inflight()   # frames captured before the loss were good frames: answered first
                self._lose_source(exc)
                source_open = False
                retry_at, backoff = time.monotonic() + backoff, min(backoff * 2, rc_cfg.backoff_max_s)
                continue
            if outcome == "exhausted":
                if rc_cfg.exit_when_exhausted:
                    log.info(self._tag("source exhausted after %d frames"), self.counters.frames)
                    break
                self._stop.wait(rc_cfg.read_timeout_s)  # nothing more will come; do not spin
        self._drain_inflight()
        if not self.trigger.is_free_run:
            # A trigger accepted while the stop came in is answered, not left for a controller to time out on.
            self._refuse_triggers("stopping", 0.0)
        else:
            self._stop_capture()
        self._loop_running = False   # ended, not stalled: its rounds stop for good (/healthz, the stall guard)
        return 0

    def _lose_source(self, exc: Exception) -> None:
        """The camera or trigger input failed (to open, or while open): its own fault, not-OK on the outputs, the
        source closed for a reopen with backoff (the trigger stays, unless it is what failed)."""
        self.counters.source_errors += 1
        self._source_fault = f"source: {exc}"
        self._set_state(False, self._source_fault)
        self._close_source(trigger=isinstance(exc, TriggerError))

    def _stop_capture(self) -> None:
        """The loop has ended: the capture thread stops, and the frames it got after the last one the loop read
        are counted as dropped (and answered FAULT where every frame is a part), not discarded at close."""
        stop = getattr(self._source, "stop_capture", None)
        if not callable(stop):
            return
        stop()
        dropped = self._count_dropped()
        if self.cfg.capture.every_frame_is_a_part:
            for _ in range(dropped):
                self._answer_fault("frame captured while the station stopped: a part not inspected", time.monotonic())

    def _serve_one(self, pipeline: Pipeline) -> str:
        """Wait for one trigger (or free-run frame) and answer it. Returns "idle", "served" or "exhausted".

        Raises SourceError/TriggerError/OSError when the camera or trigger input is lost (after answering a
        triggered part with FAULT)."""
        timeout = self.cfg.recovery.read_timeout_s
        event = self.trigger.wait(timeout)
        if event is None:
            self._probe_source()
            return "idle"
        if self._inflight is not None:   # free run with inference.workers > 1
            return self._serve_in_flight(pipeline)
        if self.trigger.is_free_run:
            frame = self._source.read(timeout)
            if frame is None:
                if self._source.exhausted:
                    return "exhausted"
                self._probe_source()
                return "idle"
            frame_id, started, stale = self._admit(frame)
            self.bus.begin_part(frame_id)
            if stale:
                self._answer_fault(stale, started, frame_id, frame)
                return "served"
            return self._inspect(pipeline, frame, frame_id, started)
        self._answer_missed(event)
        if self._stop.is_set():
            # READY is down (request_stop): a serial or MQTT trigger sent after it gets FAULT, not an inspection
            # the outputs close on before the PLC has read it (probe 43).
            self._answer_fault("station not ready (stopping)", event.at)
            return "served"
        if self._expired(event):
            return "served"
        stale = self.recipes.stale(triggered_mono=event.at) if self.recipes is not None else None
        if stale:
            self._answer_fault(stale, event.at)
            return "served"
        frame_id = self._take_frame_id()
        self.bus.begin_part(frame_id)   # the previous verdict is withdrawn before this part is captured
        notify = getattr(self._source, "notify_trigger", None)
        try:
            if notify is not None:
                # A camera drops frames buffered before the trigger; a watch folder, files written before it. It
                # may find the source gone (a watch folder removed or unmounted while the line was idle): this
                # part, already begun with its id, is answered FAULT like a failed read (probe 63: no record).
                notify(at_wall=time.time() - (time.monotonic() - event.at), at=event.at)
            frame = self._source.read(timeout)
        except (SourceError, TriggerError, OSError) as exc:
            self._answer_fault(f"source: {exc}", event.at, frame_id)
            raise
        if frame is None:
            self._answer_fault(f"no frame within {timeout:g} s of the trigger", event.at, frame_id)
            return "exhausted" if self._source.exhausted else "served"
        # before_trigger: the image may have been written before a switch the trigger came after.
        stale = self.recipes.stale(arrived_wall=frame.arrived_at) if self.recipes is not None else None
        if stale:
            self._answer_fault(stale, event.at, frame_id, frame)
            return "served"
        return self._inspect(pipeline, frame, frame_id, event.at)

    def _probe_source(self) -> None:
        """While the line waits: a source lost meanwhile (a watch folder removed or unmounted) raises SourceError
        now, dropping READY, instead of at the next part (probe 63: READY stayed up with the folder gone)."""
        probe = getattr(self._source, "probe", None)
        if callable(probe):
            probe()

    def _admit(self, frame: Frame) -> tuple[int, float, str | None]:
        """A free-running frame read: drops before it counted (and, when every frame is a part, answered FAULT
        first, in order), its id, its start (the deadline runs from capture: the frame's wall-clock stamp mapped
        onto the monotonic clock, or its monotonic stamp where that is earlier), and why it must be FAULT (recipe
        switch)."""
        dropped = self._count_dropped()
        if dropped and self.cfg.capture.every_frame_is_a_part:
            # Every one gets its id and record, however many (each is a part the controller counts): a FAULT
            # answer costs a record, not an inspection.
            self._drain_inflight()   # the frames in flight were captured before the dropped ones
            for _ in range(dropped):
                self._answer_fault("frame dropped before inspection (the line was busy or not ready): a part not "
                                   "inspected", time.monotonic())
        frame_id = self._take_frame_id()
        started = time.monotonic() - max(0.0, time.time() - frame.captured_at)
        if frame.captured_mono is not None:
            # A wall clock stepped back while the frame waited in the capture slot dated it after now: a frame held
            # past its deadline (the loop late) was inspected and answered OK as if fresh (probe 101).
            started = min(started, frame.captured_mono)
        stale = (self.recipes.stale(captured_wall=frame.captured_at, arrived_wall=frame.arrived_at,
                                    captured_mono=started) if self.recipes is not None else None)
        return frame_id, started, stale

    def _inspect(self, pipeline: Pipeline, frame: Frame, frame_id: int, started: float) -> str:
        if not self._ready and self.fault_reason is None:
            self._set_state(True, None)
        frame.frame_id = frame_id
        # From here until its outputs are driven the frame is "in inspection": /healthz reports a stall when
        # this takes longer than http.stall_after_s (a hostile file in decode, an output that blocks).
        self._inspecting_since = time.monotonic()
        try:
            self._publish(pipeline.inspect(frame), started)
        finally:
            self._inspecting_since = None
        return "served"

    # ---- free run with several frames in flight (inference.workers > 1) ----------------------------------------
    def _serve_in_flight(self, pipeline: Pipeline) -> str:
        """Publish what has finished, then hand the next frame to a free worker (or wait for the oldest)."""
        inflight = self._inflight
        self._publish_finished(inflight.finished())
        if inflight.full:
            # Wait without a timeout, like one worker does: a hung inspection stops the loop and the heartbeat.
            self._publish_finished(inflight.finished(wait_oldest=True))
            return "served"
        frame = self._source.read(INFLIGHT_POLL_S if len(inflight) else self.cfg.recovery.read_timeout_s)
        if frame is None:
            if self._source.exhausted:
                self._drain_inflight()
                return "exhausted"
            return "served" if len(inflight) else "idle"
        frame_id, started, stale = self._admit(frame)
        if stale:
            self._drain_inflight()
            self.bus.begin_part(frame_id)
            self._answer_fault(stale, started, frame_id, frame)
            return "served"
        if not self._ready and self.fault_reason is None:
            self._set_state(True, None)
        frame.frame_id = frame_id
        inflight.submit(pipeline, frame, frame_id, started)
        self._begin_oldest()
        return "served"

    def _begin_oldest(self) -> None:
        """The outputs hear begin_part for the oldest frame in flight, i.e. right after the previous verdict went
        out (or when a frame enters an empty queue): the verdict is withdrawn while the next part is inspected,
        exactly as with one worker, and every part's begin_part comes before its verdict and after the last one."""
        inflight = self._inflight
        head = inflight.oldest_id if inflight is not None else None
        if head is not None and head != self._begun:
            self.bus.begin_part(head)
            self._begun = head
        self._inspecting_since = inflight.oldest_since if inflight is not None else None

    def _publish_finished(self, done: list[Finished]) -> None:
        """Answers of finished frames, in capture order, then begin_part for the next one in flight."""
        for f in done:
            if self._begun != f.frame_id:   # a later frame of the same batch: its begin_part follows the last verdict
                self.bus.begin_part(f.frame_id)
            self._begun = None
            self._publish(f.result, f.started)   # FAULT if the line halted while it was in flight (_publish)
        self._begin_oldest()

    def _drain_inflight(self) -> None:
        if self._inflight is not None and len(self._inflight):
            self._publish_finished(self._inflight.drain())

    @property
    def dropped_frames(self) -> int:
        """Frames a free-running source produced that were never inspected: replaced in the capture queue while
        the line was busy, or missed by the source itself (edge_dropped_frames_total)."""
        src = self._source
        dropped = getattr(src, "dropped", None)
        return int(dropped if dropped is not None else getattr(src, "missed", 0) or 0)

    def _count_dropped(self) -> int:
        take = getattr(self._source, "take_dropped", None)
        if take is not None:
            n = take()
        else:
            # Read without a capture thread (capture.thread: off), a source may still report what it missed (a paced
            # replay): those are drops too, answered FAULT where every frame is a part (probe 72: /metrics only).
            missed = int(getattr(self._source, "missed", 0) or 0)
            # A count below the one taken is a reopened source counting from 0 again: all of it is new.
            n, self._missed_taken = (missed - self._missed_taken if missed >= self._missed_taken else missed), missed
        if n:
            self._dropped_since_stats += n
            # Per part at debug level (the frame before this part); totals at warning level with the stats.
            log.debug(self._tag("%d frame(s) dropped before frame %d (source faster than inspection)"), n,
                      self.frame_ids.next_id)
        return n

    def _log_stats(self) -> None:
        summary = self.stats.summary()
        if summary.get("total"):
            s = summary["total"]
            log.info(self._tag("latency total ms p50 %.1f p95 %.1f p99 %.1f max %.1f over %d frames; verdicts %s; "
                               "dropped frames %d"),
                     s["p50"], s["p95"], s["p99"], s["max"], s["count"], self.verdicts, self.dropped_frames)
        if self._dropped_since_stats:
            log.warning(self._tag("%d frame(s) dropped since the last report (%d in all): the source delivers "
                                  "faster than the line inspects"), self._dropped_since_stats, self.dropped_frames)
            self._dropped_since_stats = 0

    def _ensure_trigger(self) -> None:
        """The trigger input requested, once: re-requesting a GPIO line drops the edges it holds."""
        if not self._trigger_open:
            self.trigger.open()
            self._trigger_open = True

    def _ensure_trigger_quietly(self) -> None:
        """_ensure_trigger() where the line cannot inspect anyway: a failure is reported when the source opens."""
        try:
            self._ensure_trigger()
        except (TriggerError, OSError):
            pass

    def _answer_stopping(self) -> None:
        if self.trigger.is_free_run:
            return
        try:
            self._refuse_triggers("stopping", 0.0)
        except Exception:  # noqa: BLE001 - shutdown goes on: the outputs must still reach their safe state
            log.exception(self._tag("answering triggers at stop failed"))

    def _close_source(self, trigger: bool = True) -> None:
        if self._source is not None:
            try:
                self._source.close()
            except Exception:
                log.exception("closing the source failed")
        if not trigger:
            return
        self._trigger_open = False
        try:
            self.trigger.close()
        except Exception:
            log.exception("closing the trigger failed")

    def shutdown(self) -> None:
        """Every output back to its safe state and flushed; source closed; counter saved. Once: a line whose replay
        ended is shut down by the daemon then; the stop calls this for every line again."""
        if self._shut_down:
            return
        self._shut_down = True
        self._stop.set()
        self._drop_ready()
        if self._inflight is not None:
            self._drain_inflight()   # a no-op after loop(): it drained on the way out
            self._inflight.close()
        self._answer_stopping()      # GPIO edges still held by the line about to be released
        self._close_source()
        # A serial or MQTT trigger that came after the loop ended and before the trigger closed (software triggers
        # refuse fires from here on): answered FAULT while the outputs are still open, not left unanswered.
        self._answer_stopping()
        if self.recipes is not None:
            self.recipes.close_inputs()
        self._join_loads()
        self.bus.close()  # every output returns to its safe state and flushes
        self.frame_ids.close()
        self._log_stats()
        log.info(self._tag("stopped after %d frames (%s)"), self.counters.frames, self.verdicts)