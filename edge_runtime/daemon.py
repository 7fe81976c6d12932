"""The inspection daemon: N inspection lines (edge_runtime/line.py, one per camera) plus what they share.

Shared here: signals (SIGTERM/SIGINT stop, SIGHUP reloads every line's bundle, SIGUSR1 reopens log files), the
systemd notifications (READY=1 once every line has loaded and self-tested its bundle; WATCHDOG=1 only while
every line's loop goes round, so one hung inference stops the pings and systemd restarts us) and the HTTP
endpoint (/healthz, /metrics, POST /trigger). Each line keeps its own source, pipeline, output bus, frame
counter, trigger, stats and state.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import signal
import threading
import time
from typing import Callable

from edge_runtime import systemd_notify
from edge_runtime.bundle_loader import load_pipeline, load_public_key, release_freed_memory
from edge_runtime.config import StationConfig
from edge_runtime.frame_counter import FRAME_COUNTER_FILE
from edge_runtime.http_endpoint import HttpEndpoint, StationStatus
from edge_runtime.lines_config import line_station_configs
from edge_runtime.lines_http import LinesHttpEndpoint, RecipeHttpEndpoint, aggregate_status
from edge_runtime.nn_search import device_blas
from edge_runtime.line import MAX_MISSED_ANSWERS, SERIAL_ACK_COMMAND, Counters, Line
from edge_runtime.operator_page.server import maybe_page
from edge_runtime.outputs import Output, build_output
from edge_runtime.outputs.mqtt_station import bind_line, build_station_mqtt
from edge_runtime.sources import FrameSource
from edge_runtime.station_state import LineState, StationState
from edge_runtime.triggers import SoftwareTrigger, Trigger

log = logging.getLogger("edge_runtime.daemon")

__all__ = ["FRAME_COUNTER_FILE", "Counters", "Line", "LineState", "Station", "StationState", "load_pipeline",
           "load_public_key", "release_freed_memory", "MAX_MISSED_ANSWERS", "SERIAL_ACK_COMMAND"]
# WATCHDOG=1 at most this often when systemd set no WatchdogSec (then the pings only show liveness in tests).
DEFAULT_WATCHDOG_PERIOD_S = 1.0
STATE_LOCK_FILE = "edge-runtime.lock"
STATE_LOCK_CHECK_S = 1.0     # how often the running daemon checks that its state_dir lock is still in place
STALL_GUARD_PERIOD_S = 0.25  # how often the stall guard looks at each line (READY down within this of the moment
                             # the stall rule holds: a frame in inspection past max(stall_after_s, deadline), or
                             # the loop not round for its longest healthy gap)


class SignalRelay:
    """Signals acted on within milliseconds, wherever the main thread is.

    Python runs a signal handler only when the main thread next executes bytecode; the main thread is the single
    line's loop, which can sit up to `recovery.read_timeout_s` (1 s) in a trigger wait. A SIGTERM then left READY
    up and POST /trigger answering 202 for that long, and a part accepted in that window was never answered
    (probe 42). The C-level handler writes each signal's number to a wake-up pipe at once, from whichever thread
    the kernel interrupted; this thread reads it and calls the action (the actions only set events or drive
    outputs under their own locks). The Python-level handler does nothing: the relay has done it already."""

    def __init__(self, handlers: dict[int, Callable[[], None]]) -> None:
        self._handlers = {int(k): v for k, v in handlers.items()}
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)   # signal.set_wakeup_fd needs it: a full pipe must not block
        self._previous_fd = -1
        self._thread: threading.Thread | None = None

    @staticmethod
    def python_handler(signum, frame) -> None:   # noqa: ARG004 - the relay thread has acted on it
        return None

    def start(self) -> None:
        self._previous_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._relay, name="signals", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        signal.set_wakeup_fd(self._previous_fd)
        os.close(self._write)   # the relay reads end-of-file and ends
        if self._thread is not None:
            self._thread.join(1.0)

    def _relay(self) -> None:
        try:
            while data := os.read(self._read, 64):
                for signum in data:
                    action = self._handlers.get(signum)
                    if action is None:
                        continue
                    try:
                        action()
                    except Exception:   # noqa: BLE001 - one failing action must not end signal handling
                        log.exception("acting on signal %d", signum)
        finally:
            os.close(self._read)


class StateDirBusy(RuntimeError):
    """The station's state_dir is held by another daemon, or cannot be used at all (read-only, not ours)."""


class HttpPortBusy(RuntimeError):
    """http.enabled, but the endpoint cannot listen (the port is taken). The daemon does not start: /healthz is
    how the plant sees a station, and another process answering on that port would speak for this one."""


def lock_state_dir(state_dir: str | None) -> int | None:
    """An exclusive lock on <state_dir>/edge-runtime.lock, held until the process exits or the fd is closed.

    Two daemons on one state_dir would inspect every part twice into the same result log and hand out frame ids
    from one counter both think is theirs (an id could repeat). Raises StateDirBusy naming the holder's pid."""
    if not state_dir:
        return None
    path = os.path.join(state_dir, STATE_LOCK_FILE)
    try:
        os.makedirs(state_dir, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as exc:   # read-only, full, or not ours: a clear exit, not a traceback
        raise StateDirBusy(f"state_dir {state_dir} cannot be used ({path}: {exc.strerror or exc}): the station keeps "
                           "its frame counter, journals and recipe selection there; give it a writable folder") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise StateDirBusy(f"state_dir {state_dir} is in use by another edge-runtime (pid {holder}); give each "
                           "station its own state_dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class Station:
    """The daemon: `run()` blocks until SIGTERM/SIGINT, `request_stop()` or every line's replay source ended.

    `source`, `outputs`, `trigger` (tests, benchmarks) replace what the station file would build for its line.
    With one line, the line's attributes (pipeline, counters, trigger, fault_reason, ...) read through the
    Station as before the split, so code written against the single-line Station keeps working.
    """

    def __init__(self, cfg: StationConfig, *, source: FrameSource | None = None, outputs: list[Output] | None = None,
                 trigger: Trigger | None = None):
        self.cfg = cfg
        # One operator page for every line (page.enabled): each line's bus gets the page's sink for that line.
        self.page = maybe_page(cfg, [ln.name for ln in getattr(cfg, "lines", None) or []] or [None])
        self.lines: list[Line] = self._build_lines(cfg, source=source, outputs=outputs, trigger=trigger)
        if self.page is not None:
            self.page.attach(self.lines)
        if len(self.lines) == 1:
            # A subclass (or a test) that overrides Station._load still decides how the single line loads.
            self.lines[0].load_hook = self._load
        else:
            for line in self.lines:
                line.on_systemd = self._systemd
        self._systemd_lock = threading.Lock()
        self._reloading: set[int] = set()       # lines (by index) whose SIGHUP reload has not ended yet
        self._stop = threading.Event()
        self._started = time.monotonic()
        self._watchdog_period = DEFAULT_WATCHDOG_PERIOD_S
        self._last_watchdog = float("-inf")
        self._beat_lock = threading.Lock()
        self._beaten: set[int] = set()          # lines (by index) that went round since the last ping
        self._running: set[int] = set()         # lines whose loop still runs
        self._http: HttpEndpoint | None = None
        self._state_lock: int | None = None    # fd holding <state_dir>/edge-runtime.lock while running
        self._lock_lost = False                 # another daemon took the state_dir: run() exits 1
        self._background_stop = threading.Event()   # stops the state-lock watcher and the stall guard
        # The watcher and shutdown both use the lock's fd: one at a time, so the watcher never checks (and never
        # closes) an fd number shutdown has already closed and the process may have reused for another file.
        self._state_lock_guard = threading.Lock()

    def _build_lines(self, cfg: StationConfig, **overrides) -> list[Line]:
        configs = line_station_configs(cfg)
        # `mqtt:` with lines: one connection, each line's bus gets its adapter (edge_runtime/outputs/mqtt_station.py);
        # `lines:` with one line keeps it too (it had been dropped without a word: no results on the broker).
        self.mqtt = build_station_mqtt(cfg, [name for name, _ in configs])
        if len(configs) == 1 and self.mqtt is None:
            name, line_cfg = configs[0]
            return [Line(line_cfg, name=name, on_heartbeat=self._beat, sinks=self._page_sinks(name), **overrides)]
        if any(v is not None for v in overrides.values()):
            raise ValueError("source, outputs and trigger overrides apply to a station without `lines:` only")
        lines = [Line(line_cfg, name=name, on_heartbeat=self._beat, sinks=self._page_sinks(name),
                      outputs=None if self.mqtt is None else
                      [*map(build_output, line_cfg.outputs), self.mqtt.adapter(name)]) for name, line_cfg in configs]
        for line in lines:
            bind_line(self.mqtt, line)
        return lines

    def _page_sinks(self, name: str | None) -> list[Output]:
        return self.page.sinks(name) if self.page is not None else []

    # ---- the single line, read through the station (compatibility with the one-camera Station) -------------------
    @property
    def line(self) -> Line:
        return self.lines[0]

    def __getattr__(self, name: str):
        # Only reached for names the Station itself lacks (pipeline, counters, trigger, fault_reason, bus, ...).
        if name.startswith("__") or name == "lines":
            raise AttributeError(name)
        return getattr(self.lines[0], name)

    def _load(self) -> bool:
        return self.lines[0]._load()

    def _reload_worker(self) -> None:
        self.lines[0]._reload_worker()

    def _apply_reload(self) -> None:
        self.lines[0]._apply_reload()

    # ---- control (signal handlers and tests) ----------------------------------------------------------------
    def request_stop(self) -> None:
        self._stop.set()
        for line in self.lines:
            line.request_stop()

    def request_reload(self) -> None:
        for line in self.lines:
            line.request_reload()

    def request_reopen(self) -> None:
        """SIGUSR1: reopen log files (after an external rotation), from each line's thread."""
        for line in self.lines:
            line.request_reopen()

    @property
    def http_port(self) -> int | None:
        """The bound HTTP port (useful with port 0), or None when the endpoint is not running."""
        return self._http.port if self._http is not None else None

    # ---- status for /healthz and /metrics ----------------------------------------------------------------------
    def status(self) -> StationStatus:
        """The station's status: its line's, or every line's together (ready only while all are)."""
        if len(self.lines) > 1:
            return aggregate_status(self.line_statuses(), time.monotonic() - self._started)
        status = self.lines[0].status()
        status.uptime_s = time.monotonic() - self._started
        return status

    def line_statuses(self) -> dict[str, StationStatus]:
        return {line.name or "line": line.status() for line in self.lines}

    def line_by_name(self, name: str) -> Line | None:
        return next((line for line in self.lines if line.name == name), None)

    def _fire_line(self, name: str) -> bool | None:
        """None: no such line or no software trigger; else whether the trigger accepted the fire."""
        line = self.line_by_name(name)
        if line is None or not isinstance(line.trigger, SoftwareTrigger):
            return None
        return line.trigger.fire()

    @property
    def state(self) -> LineState:
        """The station's state: its line's; with several lines the first line in fault, else the first not ready."""
        states = [line.state for line in self.lines]
        for wanted in (StationState.FAULT, StationState.STOPPING, StationState.STARTING, StationState.BUSY):
            found = next((s for s in states if s.state is wanted), None)
            if found is not None:
                return found
        return states[0]

    # ---- watchdog ------------------------------------------------------------------------------------------------
    def _keep_state_lock(self) -> None:
        """The state_dir lock must stay where another daemon looks for it: a state_dir deleted (or its lock file)
        while running let a second daemon start on the same station and reuse frame ids. Re-taken at once; if
        another daemon got there first, this one stops (a dead process reads not-OK; the other keeps the line)."""
        with self._state_lock_guard:
            if not self._background_stop.is_set():
                self._check_state_lock()

    def _check_state_lock(self) -> None:
        fd, state_dir = self._state_lock, self.cfg.state_dir
        if fd is None or not state_dir:
            return
        path = os.path.join(state_dir, STATE_LOCK_FILE)
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return
        except OSError:
            pass
        log.error("state_dir lock %s was removed while running: taking it again", path)
        try:
            new = lock_state_dir(state_dir)
        except (StateDirBusy, OSError) as exc:
            log.error("stopping (exit 1): %s", exc)
            self._lock_lost = True
            self.request_stop()
            return
        self._state_lock = new
        os.close(fd)   # the lock on the deleted file guarded nothing any more

    def _watch_state_lock(self) -> None:
        """Its own thread: every STATE_LOCK_CHECK_S, whatever the lines are waiting on."""
        while not self._background_stop.wait(STATE_LOCK_CHECK_S):
            self._keep_state_lock()

    def _beat(self, line: Line) -> None:
        """A line's loop went round (called from that line's thread). Ping once every running line has."""
        with self._beat_lock:
            self._beaten.add(self.lines.index(line))
            if not self._running <= self._beaten:
                return
            now = time.monotonic()
            if now - self._last_watchdog < self._watchdog_period:
                return
            self._last_watchdog = now
            self._beaten.clear()
        systemd_notify.watchdog()

    def _systemd(self, line: Line, event: str) -> None:
        """One unit, several lines (Line.on_systemd): STATUS= names every line in fault, else "inspecting"; one
        RELOADING=1 when the first line's reload begins, READY=1 when the last one's ends. Each line had sent its
        own: `systemctl status` showed the last line whose fault changed ("line a: inspecting" while line b was
        in FAULT), and the first reload done ended the unit's reload while another line still loaded (probe 106)."""
        with self._systemd_lock:
            index = self.lines.index(line)
            if event == "reloading":
                if not self._reloading:
                    systemd_notify.reloading()
                self._reloading.add(index)
            elif event in ("reloaded", "ended"):   # ended: a line whose loop ended never applies its reload
                begun = index in self._reloading
                self._reloading.discard(index)
                if not self._reloading and (begun or event == "reloaded"):
                    systemd_notify.ready()
            else:
                faults = [f"line {ln.name}: fault: {ln.fault_reason}" for ln in self.lines if ln.fault_reason]
                systemd_notify.status("; ".join(faults) or "inspecting")

    def _guard_stalls(self) -> None:
        """Its own thread: READY down on a line's outputs while its loop is stuck (Line.guard_stall)."""
        while not self._background_stop.wait(STALL_GUARD_PERIOD_S):
            for line in self.lines:
                try:
                    line.guard_stall()
                except Exception:   # noqa: BLE001 - the guard must outlive one line's failing output
                    log.exception("stall guard: line %s", line.name)

    def _line_ended(self, line: Line) -> None:
        with self._beat_lock:
            self._running.discard(self.lines.index(line))

    # ---- run -----------------------------------------------------------------------------------------------------
    def run(self) -> int:
        previous: dict[int, object] = {}
        relay = None
        if threading.current_thread() is threading.main_thread():
            handlers = {signal.SIGTERM: self.request_stop, signal.SIGINT: self.request_stop,
                        signal.SIGHUP: self.request_reload, signal.SIGUSR1: self.request_reopen}
            relay = SignalRelay(handlers)
            for signum in handlers:
                previous[signum] = signal.signal(signum, relay.python_handler)
            relay.start()
        try:
            return self._run()
        finally:
            for signum, handler in previous.items():
                # None: the old handler was not installed from Python; the default is the closest we can restore.
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
            if relay is not None:
                relay.stop()

    def _fire_trigger(self):
        trigger = self.lines[0].trigger
        return trigger.fire if isinstance(trigger, SoftwareTrigger) else None

    def recipe_switchers(self) -> dict:
        """{line name ("line" for a single line): RecipeSwitcher} of the lines that have recipes."""
        return {line.name or "line": line.recipes for line in self.lines if line.recipes is not None}

    def _make_http(self) -> HttpEndpoint:
        if len(self.lines) > 1:
            return LinesHttpEndpoint(self.cfg.http, self.line_statuses, self.status, self._fire_line,
                                     self.recipe_switchers)
        name = self.lines[0].name   # `lines:` with one line: POST /trigger/<name> as well
        if self.lines[0].recipes is not None:
            return RecipeHttpEndpoint(self.cfg.http, self.status, self._fire_trigger(), self.recipe_switchers, name)
        return HttpEndpoint(self.cfg.http, self.status, self._fire_trigger(), name)

    def _run(self) -> int:
        with device_blas(self.cfg.inference.knn):
            rc = self._run_pinned()
        return 1 if self._lock_lost else rc   # a failure for systemd (Restart=on-failure), not a clean stop

    def _run_pinned(self) -> int:
        self._state_lock = lock_state_dir(self.cfg.state_dir)   # before any output or file is touched
        if self._state_lock is not None:
            threading.Thread(target=self._watch_state_lock, name="state-lock", daemon=True).start()
        interval = systemd_notify.watchdog_interval()
        # sd_watchdog_enabled(3) advises half the interval; a quarter leaves room for one slow frame.
        self._watchdog_period = interval / 4 if interval else DEFAULT_WATCHDOG_PERIOD_S
        try:
            # Outputs start in their safe state (not READY, no OK); fault_reason is already "starting" for /healthz.
            for line in self.lines:
                line.start_outputs()
            if self.page is not None:
                self.page.start_logged()
            if self.cfg.http.enabled:
                self._http = self._make_http()
                try:
                    self._http.start()
                    log.info("http endpoint on %s:%d", self.cfg.http.host, self._http.port)
                except OSError as exc:
                    port, host = self.cfg.http.port, self.cfg.http.host
                    # Only a taken port is another process's doing (probe 73: an http.host that is no address here
                    # was reported as "another process holds the port", with `ss ... sport = :0` for port 0).
                    if exc.errno == errno.EADDRINUSE:
                        why = (f"another process holds the port (`ss -ltnp 'sport = :{port}'` names it); stop it, or "
                               "set http.port in the station file (0 picks a free port; http.enabled: false runs "
                               "without /healthz)")
                    elif exc.errno == errno.EACCES:
                        why = (f"port {port} is below 1024, which needs CAP_NET_BIND_SERVICE: set http.port in the "
                               "station file to 1024 or above")
                    else:
                        why = (f"http.host {host} is not an address of this machine (`ip -brief address` lists them): "
                               "set it in the station file (127.0.0.1: this machine only; 0.0.0.0: every address)")
                    raise HttpPortBusy(f"http endpoint {host}:{port} cannot listen ({exc.strerror or exc}): {why}"
                                       ) from None
            t0 = time.monotonic()
            threading.Thread(target=self._guard_stalls, name="stall-guard", daemon=True).start()
            for line in self.lines:
                line.start()
            # READY=1 tells systemd that start-up (including the self-tests) is over; whether we inspect is on the
            # READY output lines and /healthz. A bad bundle keeps a line alive in a safe, explained FAULT state.
            systemd_notify.ready()
            if len(self.lines) > 1:
                log.info("start-up of %d lines took %.2f s", len(self.lines), time.monotonic() - t0)
            return self._run_lines()
        finally:
            self._shutdown()

    def _run_lines(self) -> int:
        self._running = set(range(len(self.lines)))
        if len(self.lines) == 1:
            try:
                return self.lines[0].loop()   # the one line runs in the caller's thread, as it always did
            finally:
                self._line_ended(self.lines[0])
        errors: list[BaseException] = []

        def run_line(line: Line) -> None:
            try:
                line.loop()
            except BaseException as exc:  # noqa: BLE001 - re-raised in the daemon's thread below
                log.exception("line %s stopped on an unexpected error", line.name)
                errors.append(exc)
                self.request_stop()
            finally:
                self._line_ended(line)
                if not self._stop.is_set():
                    # Its replay ended while the other lines go on: it stops now (READY down, a trigger answered
                    # or refused, outputs safe), not when they do; it had stayed 'ready' on /healthz and its outputs
                    # and accepted POST /trigger with 202 for parts nothing would answer or record (probe 106).
                    self._systemd(line, "ended")
                    line.request_stop()
                    line.shutdown()

        threads = [threading.Thread(target=run_line, args=(line,), name=f"line:{line.name}", daemon=True)
                   for line in self.lines]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(0.2)   # short joins: the main thread stays free to run signal handlers
        if errors:
            raise errors[0]
        return 0

    def _shutdown(self) -> None:
        systemd_notify.stopping()
        if self.page is not None:
            self.page.stop()
        for line in self.lines:
            line.shutdown()
        if self._http is not None:
            self._http.stop()
            self._http = None
        self._background_stop.set()
        with self._state_lock_guard:
            lock, self._state_lock = self._state_lock, None
        if lock is not None:
            os.close(lock)
