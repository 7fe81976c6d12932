"""The inspection daemon: source -> Pipeline -> outputs, plus signals, watchdog, health and recovery.

Fail-safe rules enforced here: outputs start in their safe state; READY is raised only while a verified
bundle is loaded and frames arrive; every frame that is not inspected becomes a FAULT (never OK); the
systemd watchdog is pinged from this loop, so a hung inference stops the pings and systemd restarts us.
"""
from __future__ import annotations

import logging
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
from edge_runtime.outputs import Output, OutputError, ResultLogConfig, build_output, last_frame_id
from edge_runtime.pipeline import Pipeline
from edge_runtime.records import InspectionResult, Verdict
from edge_runtime.self_test import golden_check
from edge_runtime.sources import FrameSource, SourceError, build_source
from edge_runtime.triggers import SoftwareTrigger, Trigger, TriggerError, build_trigger

log = logging.getLogger("edge_runtime.daemon")


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
    except (OSError, ValueError) as exc:
        raise BundleError(f"security.bundle_public_key {cfg.security.bundle_public_key}: cannot read key ({exc})") from None
    bundle = Bundle.load(cfg.bundle, public_key=key)
    inf = cfg.inference
    try:
        pipeline = Pipeline(bundle, precision=inf.precision, knn=inf.knn, threads=inf.threads,
                            providers=inf.providers, ef_search=inf.ef_search)
    except FeatureError as exc:
        raise BundleError(str(exc)) from None
    if cfg.roi is not None:
        pipeline.prep = type(pipeline.prep)(pipeline.prep.image_size, tuple(cfg.roi))
    failures = golden_check(bundle, pipeline)
    if failures:
        raise BundleError("self-test failed: " + "; ".join(failures))
    return pipeline


@dataclass
class Counters:
    frames: int = 0
    faults: int = 0
    source_errors: int = 0
    output_errors: int = 0
    reloads: int = 0
    reload_failures: int = 0


class Station:
    def __init__(self, cfg: StationConfig, *, source: FrameSource | None = None, outputs: list[Output] | None = None,
                 trigger: Trigger | None = None):
        self.cfg = cfg
        self.outputs = outputs if outputs is not None else [build_output(o) for o in cfg.outputs]
        self.trigger = trigger if trigger is not None else build_trigger(cfg.trigger)
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
        self._started = time.monotonic()
        self._last_heartbeat = time.monotonic()
        self._http: HttpEndpoint | None = None

    # ---- control (signal handlers and tests) ----------------------------------------------------------------
    def request_stop(self) -> None:
        self._stop.set()

    def request_reload(self) -> None:
        self._reload.set()

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
        return StationStatus(
            state=state, reason=self.fault_reason,
            bundle_id=self.pipeline.bundle.bundle_id if self.pipeline else None, frames=c.frames,
            last_verdict=self.last_verdict, uptime_s=time.monotonic() - self._started, verdicts=dict(self.verdicts),
            faults=c.faults + c.source_errors, skipped=getattr(self._source, "skipped", 0),
            last_heartbeat_age_s=time.monotonic() - self._last_heartbeat, latency=self.stats,
            counters={"source_errors": c.source_errors, "output_errors": c.output_errors, "reloads": c.reloads,
                      "reload_failures": c.reload_failures})

    # ---- bundle ------------------------------------------------------------------------------------------------
    def _load(self) -> bool:
        try:
            self.pipeline = load_pipeline(self.cfg)
        except (BundleError, OSError) as exc:
            self.pipeline = None
            self._set_state(False, f"bundle {self.cfg.bundle}: {exc}")
            return False
        log.info("bundle %s loaded: variant %s, knn %s, threshold %.4f", self.pipeline.bundle.bundle_id,
                 self.pipeline.variant.name, self.pipeline.knn, self.pipeline.threshold)
        return True

    def _do_reload(self) -> None:
        self._reload.clear()
        log.info("SIGHUP: reloading bundle %s", self.cfg.bundle)
        try:
            new = load_pipeline(self.cfg)
        except (BundleError, OSError) as exc:
            self.counters.reload_failures += 1
            if self.pipeline is not None:
                # Keep inspecting with the verified old bundle rather than stopping the line.
                log.error("reload refused, keeping bundle %s: %s", self.pipeline.bundle.bundle_id, exc)
            else:
                self._set_state(False, f"bundle {self.cfg.bundle}: {exc}")
            return
        self.pipeline = new
        self.counters.reloads += 1
        log.info("reloaded: bundle %s, threshold %.4f", new.bundle.bundle_id, new.threshold)
        if self.fault_reason and self.fault_reason.startswith("bundle"):
            self._set_state(False, None)

    # ---- the loop ----------------------------------------------------------------------------------------------
    def _heartbeat(self) -> None:
        self._last_heartbeat = time.monotonic()
        self._each_output("heartbeat")
        systemd_notify.watchdog()

    def _start_frame_id(self) -> int:
        for o in self.cfg.outputs:
            if isinstance(o, ResultLogConfig):
                last = last_frame_id(o.path)
                if last is not None:
                    return last + 1
        return 0

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

    def run(self) -> int:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: self.request_stop())
            signal.signal(signal.SIGINT, lambda *_: self.request_stop())
            signal.signal(signal.SIGHUP, lambda *_: self.request_reload())
        self._each_output("start")
        self._set_state(False, "starting")
        if self.cfg.http.enabled:
            fire = self.trigger.fire if isinstance(self.trigger, SoftwareTrigger) else None
            self._http = HttpEndpoint(self.cfg.http, self.status, fire)
            try:
                self._http.start()
                log.info("http endpoint on %s:%d", self.cfg.http.host, self._http.port)
            except OSError as exc:
                log.error("http endpoint %s:%d not started: %s", self.cfg.http.host, self.cfg.http.port, exc)
                self._http = None
        t0 = time.monotonic()
        self._load()
        # READY=1 tells systemd that start-up (including the self-test) is over; whether we inspect is on the
        # READY output line and /healthz. A bad bundle keeps us alive in a safe, explained FAULT state.
        systemd_notify.ready()
        log.info("start-up took %.2f s (%s)", time.monotonic() - t0, "ready" if self.pipeline else "FAULT")
        try:
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
            self._source = build_source(self.cfg.source, self._start_frame_id())
        while not self._stop.is_set():
            self._heartbeat()
            if self._reload.is_set():
                self._do_reload()
            if time.monotonic() >= next_stats:
                next_stats = time.monotonic() + self.cfg.logging.stats_interval_s
                self._log_stats()
            if self.pipeline is None:
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
                    retry_at, backoff = time.monotonic() + backoff, min(backoff * 2, rc_cfg.backoff_max_s)
                    continue
            try:
                if not self.trigger.wait(rc_cfg.read_timeout_s):
                    continue
                frame = self._source.read(rc_cfg.read_timeout_s)
            except (SourceError, TriggerError, OSError) as exc:
                # Camera lost: not-OK on the outputs, no verdict for anything, reopen with backoff.
                self.counters.source_errors += 1
                self._set_state(False, f"source: {exc}")
                self._close_source()
                source_open = False
                retry_at, backoff = time.monotonic() + backoff, min(backoff * 2, rc_cfg.backoff_max_s)
                continue
            if frame is None:
                if self._source.exhausted and rc_cfg.exit_when_exhausted:
                    log.info("source exhausted after %d frames", self.counters.frames)
                    break
                continue
            if not self._ready and self.fault_reason is None:
                self._set_state(True, None)
            self._publish(self.pipeline.inspect(frame))
        return 0

    def _log_stats(self) -> None:
        summary = self.stats.summary()
        if summary.get("total"):
            s = summary["total"]
            log.info("latency total ms p50 %.1f p95 %.1f p99 %.1f max %.1f over %d frames; verdicts %s",
                     s["p50"], s["p95"], s["p99"], s["max"], s["count"], self.verdicts)

    def _close_source(self) -> None:
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
        if self._source is not None:
            self._close_source()
        self._each_output("close")  # every output returns to its safe state and flushes
        if self._http is not None:
            self._http.stop()
        self._log_stats()
        log.info("stopped after %d frames (%s)", self.counters.frames, self.verdicts)
