"""The inspection daemon: source -> Pipeline -> outputs, plus signals, watchdog, health and recovery.

Fail-safe rules enforced here: outputs start in their safe state; READY is raised only while a verified
bundle is loaded and frames arrive; a triggered part that was not inspected gets a FAULT result (never OK or
silence); the systemd watchdog is pinged from this loop, so a hung inference stops the pings and systemd
restarts us.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from edge_runtime import systemd_notify
from edge_runtime.bundle import Bundle, BundleError
from edge_runtime.config import StationConfig
from edge_runtime.features import FeatureError
from edge_runtime.http_endpoint import HttpEndpoint, StationStatus
from edge_runtime.latency_stats import LatencyStats
from edge_runtime.outputs import Output, OutputError, ResultLogConfig, SerialOutput, build_output, last_frame_id
from edge_runtime.pipeline import Pipeline
from edge_runtime.records import InspectionResult, Verdict
from edge_runtime.self_test import golden_check
from edge_runtime.sources import FrameSource, SourceError, build_source
from edge_runtime.triggers import SoftwareTrigger, Trigger, TriggerError, build_trigger

log = logging.getLogger("edge_runtime.daemon")

# Name of the file in state_dir that keeps the next frame id across restarts.
FRAME_COUNTER_FILE = "next_frame_id"
# WATCHDOG=1 at most this often when systemd set no WatchdogSec (then the pings only show liveness in tests).
DEFAULT_WATCHDOG_PERIOD_S = 1.0


def load_public_key(path: str | None) -> bytes | None:
    if not path:
        return None
    raw = Path(path).read_bytes()
    if len(raw) == 32:
        return raw
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_public_key

    return load_pem_public_key(raw).public_bytes(Encoding.Raw, PublicFormat.Raw)


def load_pipeline(cfg: StationConfig) -> Pipeline:
    """Verify the bundle (checksums, optional signature), build the pipeline and reproduce the golden scores."""
    try:
        key = load_public_key(cfg.security.bundle_public_key)
    except (OSError, ValueError, ImportError) as exc:
        raise BundleError(f"security.bundle_public_key {cfg.security.bundle_public_key}: cannot read key ({exc})") from None
    bundle = Bundle.load(cfg.bundle, public_key=key)
    inf = cfg.inference
    try:
        pipeline = Pipeline(bundle, precision=inf.precision, knn=inf.knn, threads=inf.threads,
                            providers=inf.providers, ef_search=inf.ef_search)
    except FeatureError as exc:
        raise BundleError(str(exc)) from None
    # Golden scores were recorded with the bundle's own preprocessing, so the self-test runs before the
    # station's ROI override is applied.
    failures = golden_check(bundle, pipeline)
    if failures:
        raise BundleError("self-test failed: " + "; ".join(failures))
    if cfg.roi is not None:
        pipeline.prep = type(pipeline.prep)(pipeline.prep.image_size, tuple(cfg.roi))
    pipeline.decode_limits = cfg.decode
    return pipeline


@dataclass
class Counters:
    frames: int = 0
    faults: int = 0
    source_errors: int = 0
    output_errors: int = 0
    reloads: int = 0
    reload_failures: int = 0
    missed_triggers: int = 0   # a trigger fired and no frame could be inspected for it (each also a FAULT result)


class Station:
    """One station: `run()` blocks until SIGTERM/SIGINT, `request_stop()` or an exhausted replay source."""

    def __init__(self, cfg: StationConfig, *, source: FrameSource | None = None, outputs: list[Output] | None = None,
                 trigger: Trigger | None = None):
        self.cfg = cfg
        self.outputs = outputs if outputs is not None else [build_output(o) for o in cfg.outputs]
        self.trigger = trigger if trigger is not None else build_trigger(cfg.trigger)
        if isinstance(self.trigger, SoftwareTrigger):
            # A PLC on the serial line may send "TRG" to capture one part.
            for out in self.outputs:
                if isinstance(out, SerialOutput) and out.cfg.accept_trigger:
                    out.on_line = self.trigger.handle_line
        self._source = source
        self.pipeline: Pipeline | None = None
        self.stats = LatencyStats(cfg.logging.stats_window)
        self.counters = Counters()
        self.verdicts = {v.value: 0 for v in Verdict}
        self.fault_reason: str | None = "starting"
        self.last_verdict: str | None = None
        self._ready = False
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._reload_lock = threading.Lock()
        self._reload_thread: threading.Thread | None = None
        self._reload_outcome: tuple[Pipeline | None, str | None] | None = None  # set by the reload thread
        self._next_frame_id = 0
        self._started = time.monotonic()
        self._last_heartbeat = time.monotonic()
        self._inspecting_since: float | None = None  # set while a frame is in Pipeline.inspect (health: stalled)
        self._watchdog_period = DEFAULT_WATCHDOG_PERIOD_S
        self._last_watchdog = float("-inf")
        self._http: HttpEndpoint | None = None

    # ---- control (signal handlers and tests) ----------------------------------------------------------------
    def request_stop(self) -> None:
        self._stop.set()

    def request_reload(self) -> None:
        self._reload.set()

    @property
    def http_port(self) -> int | None:
        """The bound HTTP port (useful with port 0), or None when the endpoint is not running."""
        return self._http.port if self._http is not None else None

    # ---- outputs ----------------------------------------------------------------------------------------------
    def _each_output(self, action: str, *args) -> None:
        for out in self.outputs:
            try:
                getattr(out, action)(*args)
            except OutputError as exc:
                self.counters.output_errors += 1
                log.error("output %s: %s failed: %s", out.name, action, exc)
            except Exception:  # one broken adapter must not stop the others or the inspection
                self.counters.output_errors += 1
                log.exception("output %s: %s raised", out.name, action)

    def _set_state(self, ready: bool, fault: str | None) -> None:
        if fault != self.fault_reason:
            if fault:
                log.error("FAULT: %s", fault)
            elif self.fault_reason:
                log.info("fault cleared (%s)", self.fault_reason)
            self._each_output("set_fault", fault)
            self.fault_reason = fault
            systemd_notify.status(f"fault: {fault}" if fault else "inspecting")
        if ready != self._ready:
            self._each_output("set_ready", ready)
            self._ready = ready

    # ---- status for /healthz and /metrics ----------------------------------------------------------------------
    def status(self) -> StationStatus:
        state = "ready" if self._ready else ("fault" if self.fault_reason else "not_ready")
        c = self.counters
        pipeline = self.pipeline
        return StationStatus(
            state=state, reason=self.fault_reason,
            bundle_id=pipeline.bundle.bundle_id if pipeline else None, frames=c.frames,
            last_verdict=self.last_verdict, uptime_s=time.monotonic() - self._started, verdicts=dict(self.verdicts),
            faults=c.faults + c.source_errors, skipped=getattr(self._source, "skipped", 0),
            last_heartbeat_age_s=time.monotonic() - self._last_heartbeat, latency=self.stats,
            busy_s=self._busy_s(), stall_after_s=self._stall_after_s(),
            counters={"source_errors": c.source_errors, "output_errors": c.output_errors, "reloads": c.reloads,
                      "reload_failures": c.reload_failures, "missed_triggers": c.missed_triggers,
                      "trigger_overruns": getattr(self.trigger, "overruns", 0)})

    def _busy_s(self) -> float | None:
        since = self._inspecting_since
        return None if since is None else time.monotonic() - since

    def _stall_after_s(self) -> float:
        if self.cfg.http.stall_after_s is not None:
            return self.cfg.http.stall_after_s
        deadline_ms = self.cfg.inference.deadline_ms
        return max(2.0, 5 * deadline_ms / 1000.0) if deadline_ms else 2.0

    # ---- bundle ------------------------------------------------------------------------------------------------
    def _load(self) -> bool:
        try:
            self.pipeline = load_pipeline(self.cfg)
        except Exception as exc:  # noqa: BLE001 - whatever breaks the load, the station must stay up in FAULT
            self.pipeline = None
            if not isinstance(exc, (BundleError, OSError)):
                log.exception("loading bundle %s failed unexpectedly", self.cfg.bundle)
            self._set_state(False, f"bundle {self.cfg.bundle}: {exc}")
            return False
        log.info("bundle %s loaded: variant %s, knn %s, threshold %.4f", self.pipeline.bundle.bundle_id,
                 self.pipeline.variant.name, self.pipeline.knn, self.pipeline.threshold)
        return True

    def _start_reload(self) -> None:
        """SIGHUP: load and self-test the bundle in a background thread while the old one keeps inspecting.

        Loading can take seconds on a small board; doing it here would stall the line and the watchdog pings."""
        if self._reload_thread is not None and self._reload_thread.is_alive():
            return  # the flag stays set: another reload follows the running one
        self._reload.clear()
        log.info("SIGHUP: reloading bundle %s", self.cfg.bundle)
        systemd_notify.notify(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
        self._reload_thread = threading.Thread(target=self._reload_worker, name="bundle-reload", daemon=True)
        self._reload_thread.start()

    def _reload_worker(self) -> None:
        try:
            outcome: tuple[Pipeline | None, str | None] = (load_pipeline(self.cfg), None)
        except Exception as exc:  # noqa: BLE001 - reported to the loop thread, which decides what to do
            if not isinstance(exc, (BundleError, OSError)):
                log.exception("reloading bundle %s failed unexpectedly", self.cfg.bundle)
            outcome = (None, str(exc))
        with self._reload_lock:
            self._reload_outcome = outcome

    def _apply_reload(self) -> None:
        """Runs in the loop thread: swap pipelines between frames and drive the outputs from one thread only."""
        with self._reload_lock:
            outcome, self._reload_outcome = self._reload_outcome, None
        if outcome is None:
            return
        new, error = outcome
        if new is None:
            self.counters.reload_failures += 1
            if self.pipeline is not None:
                # Keep inspecting with the verified old bundle rather than stopping the line.
                log.error("reload refused, keeping bundle %s: %s", self.pipeline.bundle.bundle_id, error)
            else:
                self._set_state(False, f"bundle {self.cfg.bundle}: {error}")
        else:
            self.pipeline = new
            self.counters.reloads += 1
            log.info("reloaded: bundle %s, variant %s, threshold %.4f", new.bundle.bundle_id, new.variant.name,
                     new.threshold)
            if self.fault_reason and self.fault_reason.startswith("bundle"):
                self._set_state(False, None)
        systemd_notify.ready()  # ends the RELOADING state either way

    # ---- frame ids ---------------------------------------------------------------------------------------------
    def _start_frame_id(self) -> int:
        """Continue after the newest id in the result log or the saved counter, so ids stay unique across restarts."""
        start = 0
        for o in self.cfg.outputs:
            if isinstance(o, ResultLogConfig):
                try:
                    last = last_frame_id(o.path)
                except OSError as exc:  # the result log itself reports this when it starts
                    log.warning("result log %s unreadable (%s); frame ids may repeat", o.path, exc)
                    continue
                if last is not None:
                    start = max(start, last + 1)
        if self.cfg.state_dir:
            path = Path(self.cfg.state_dir) / FRAME_COUNTER_FILE
            try:
                start = max(start, int(path.read_text().strip()))
            except FileNotFoundError:
                pass
            except (OSError, ValueError) as exc:
                log.warning("state %s unreadable (%s); frame ids continue from %d", path, exc, start)
        return start

    def _save_frame_counter(self) -> None:
        if not self.cfg.state_dir:
            return
        folder = Path(self.cfg.state_dir)
        tmp = folder / (FRAME_COUNTER_FILE + ".tmp")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tmp.write_text(f"{self._next_frame_id}\n")
            os.replace(tmp, folder / FRAME_COUNTER_FILE)  # atomic: a power cut leaves the old or the new value
        except OSError as exc:
            log.warning("cannot save the frame counter in %s: %s", folder, exc)

    def _take_frame_id(self) -> int:
        # The daemon numbers parts, not the source: a trigger that got no frame still consumes an id, so every
        # result on the line (including its FAULT) has its own id for the PLC to latch.
        frame_id = self._next_frame_id
        self._next_frame_id += 1
        return frame_id

    # ---- the loop ----------------------------------------------------------------------------------------------
    def _heartbeat(self) -> None:
        now = time.monotonic()
        self._last_heartbeat = now
        self._each_output("heartbeat")
        # Pinged from this thread only: if inference hangs, the pings stop and systemd restarts the service.
        if now - self._last_watchdog >= self._watchdog_period:
            self._last_watchdog = now
            systemd_notify.watchdog()

    def _publish(self, result: InspectionResult) -> None:
        deadline = self.cfg.inference.deadline_ms
        if deadline is not None and result.verdict is not Verdict.FAULT and result.timings_ms["total"] > deadline:
            # A verdict after the part has left the station is not a verdict for that part.
            result.verdict, result.error = Verdict.FAULT, f"deadline exceeded: {result.timings_ms['total']:.1f} ms > {deadline} ms"
        self.counters.frames += 1
        self.verdicts[result.verdict.value] += 1
        self.last_verdict = result.verdict.value
        if result.verdict is Verdict.FAULT:
            self.counters.faults += 1
            log.warning("frame %d %s: FAULT: %s", result.frame_id, result.source, result.error)
        else:
            self.stats.add(result.timings_ms)
        self._each_output("publish", result)

    def _publish_missed(self, pipeline: Pipeline, reason: str, started: float) -> None:
        """A trigger fired (a part is there) and no frame could be inspected: the line gets a FAULT for it."""
        self.counters.missed_triggers += 1
        source = getattr(self._source, "name", "source")
        self._publish(InspectionResult(
            frame_id=self._take_frame_id(), source=source, verdict=Verdict.FAULT, score=None, normalized_score=None,
            threshold=pipeline.threshold, timings_ms={"total": (time.perf_counter() - started) * 1000.0},
            bundle_id=pipeline.bundle.bundle_id, error=f"triggered part not inspected: {reason}"))

    def run(self) -> int:
        previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            handlers = {signal.SIGTERM: self.request_stop, signal.SIGINT: self.request_stop,
                        signal.SIGHUP: self.request_reload}
            for signum, action in handlers.items():
                previous[signum] = signal.signal(signum, lambda *_, act=action: act())
        try:
            return self._run()
        finally:
            for signum, handler in previous.items():
                # None: the old handler was not installed from Python; the default is the closest we can restore.
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

    def _run(self) -> int:
        interval = systemd_notify.watchdog_interval()
        # sd_watchdog_enabled(3) advises half the interval; a quarter leaves room for one slow frame.
        self._watchdog_period = interval / 4 if interval else DEFAULT_WATCHDOG_PERIOD_S
        # Outputs start in their safe state (not READY, no OK); fault_reason is already "starting" for /healthz.
        self._each_output("start")
        if self.cfg.http.enabled:
            fire = self.trigger.fire if isinstance(self.trigger, SoftwareTrigger) else None
            self._http = HttpEndpoint(self.cfg.http, self.status, fire)
            try:
                self._http.start()
                log.info("http endpoint on %s:%d", self.cfg.http.host, self._http.port)
            except OSError as exc:
                log.error("http endpoint %s:%d not started: %s", self.cfg.http.host, self.cfg.http.port, exc)
                self._http = None
        try:
            self._next_frame_id = self._start_frame_id()
            t0 = time.monotonic()
            self._load()
            # READY=1 tells systemd that start-up (including the self-test) is over; whether we inspect is on the
            # READY output line and /healthz. A bad bundle keeps us alive in a safe, explained FAULT state.
            systemd_notify.ready()
            log.info("start-up took %.2f s (%s)", time.monotonic() - t0, "ready" if self.pipeline else "FAULT")
            return self._loop()
        finally:
            self._shutdown()

    def _loop(self) -> int:
        rc_cfg = self.cfg.recovery
        backoff = rc_cfg.backoff_initial_s
        retry_at = 0.0
        source_open = False
        next_stats = time.monotonic() + self.cfg.logging.stats_interval_s
        if self._source is None:
            self._source = build_source(
                self.cfg.source, self._next_frame_id, state_dir=self.cfg.state_dir,
                result_logs=[o.path for o in self.cfg.outputs if isinstance(o, ResultLogConfig)])
        while not self._stop.is_set():
            self._heartbeat()
            if self._reload.is_set():
                self._start_reload()
            self._apply_reload()
            if time.monotonic() >= next_stats:
                next_stats = time.monotonic() + self.cfg.logging.stats_interval_s
                self._log_stats()
                self._save_frame_counter()
            pipeline = self.pipeline
            if pipeline is None:
                self._stop.wait(rc_cfg.read_timeout_s)
                continue
            if not source_open:
                if time.monotonic() < retry_at:
                    self._stop.wait(min(rc_cfg.read_timeout_s, retry_at - time.monotonic()))
                    continue
                try:
                    self._source.open()
                    self.trigger.open()
                    source_open = True
                    backoff = rc_cfg.backoff_initial_s
                    self._set_state(True, None)
                except (SourceError, TriggerError, OSError) as exc:
                    self.counters.source_errors += 1
                    self._set_state(False, f"source: {exc}")
                    self._close_source()
                    retry_at, backoff = time.monotonic() + backoff, min(backoff * 2, rc_cfg.backoff_max_s)
                    continue
            triggered = False
            started = time.perf_counter()
            try:
                if not self.trigger.wait(rc_cfg.read_timeout_s):
                    continue
                if not self.trigger.is_free_run:
                    triggered = True
                    started = time.perf_counter()
                    notify = getattr(self._source, "notify_trigger", None)
                    if notify is not None:
                        notify()  # a camera drops frames buffered before the trigger
                frame = self._source.read(rc_cfg.read_timeout_s)
            except (SourceError, TriggerError, OSError) as exc:
                # Camera lost: not-OK on the outputs, no verdict for anything, reopen with backoff.
                self.counters.source_errors += 1
                if triggered:
                    self._publish_missed(pipeline, f"source: {exc}", started)
                self._set_state(False, f"source: {exc}")
                self._close_source()
                source_open = False
                retry_at, backoff = time.monotonic() + backoff, min(backoff * 2, rc_cfg.backoff_max_s)
                continue
            if frame is None:
                if triggered:
                    self._publish_missed(pipeline, f"no frame within {rc_cfg.read_timeout_s:g} s of the trigger", started)
                if self._source.exhausted:
                    if rc_cfg.exit_when_exhausted:
                        log.info("source exhausted after %d frames", self.counters.frames)
                        break
                    self._stop.wait(rc_cfg.read_timeout_s)  # nothing more will come; do not spin
                continue
            if not self._ready and self.fault_reason is None:
                self._set_state(True, None)
            frame.frame_id = self._take_frame_id()
            # From here until its outputs are driven the frame is "in inspection": /healthz reports a stall when
            # this takes longer than http.stall_after_s (a hostile file in decode, an output that blocks).
            self._inspecting_since = time.monotonic()
            try:
                self._publish(pipeline.inspect(frame))
            finally:
                self._inspecting_since = None
        return 0

    def _log_stats(self) -> None:
        summary = self.stats.summary()
        if summary.get("total"):
            s = summary["total"]
            log.info("latency total ms p50 %.1f p95 %.1f p99 %.1f max %.1f over %d frames; verdicts %s",
                     s["p50"], s["p95"], s["p99"], s["max"], s["count"], self.verdicts)

    def _close_source(self) -> None:
        if self._source is not None:
            try:
                self._source.close()
            except Exception:
                log.exception("closing the source failed")
        try:
            self.trigger.close()
        except Exception:
            log.exception("closing the trigger failed")

    def _shutdown(self) -> None:
        systemd_notify.stopping()
        self._ready = False
        self._each_output("set_ready", False)
        self._close_source()
        self._each_output("close")  # every output returns to its safe state and flushes
        if self._http is not None:
            self._http.stop()
            self._http = None
        self._save_frame_counter()
        self._log_stats()
        log.info("stopped after %d frames (%s)", self.counters.frames, self.verdicts)
