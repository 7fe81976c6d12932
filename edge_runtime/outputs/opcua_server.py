"""OPC UA server (asyncua): station state, last result, counters, a single-job trigger and a result-ready event.

A consumer of the result stream like the result log (the output bus hands it every record) plus the software
trigger the HTTP endpoint uses. Off unless a station lists `type: opcua`; 127.0.0.1 by default. The address space
borrows the concepts of OPC 40100 (Machine Vision), not its full information model:

    Objects/VisionSystem                      (40100: VisionSystemType)
      VisionSystemState  String               (40100 state machine: Operational / Preoperational / Error)
      StationState, Reason  String            ready / not_ready / fault, and why
      ActiveRecipe/BundleId, BundleVersion    (40100 RecipeManagement: the bundle is the station's recipe)
      LastResult/FrameId, Verdict, IsPass, Score, NormalizedScore, BundleId, ResultTime, Error
                                              (40100 ResultManagement / ResultType: ResultId, ResultState)
      Counters/Frames, OK, NG, REVIEW, FAULT
      StartSingleJob() -> Accepted            (40100 StartSingleJob: one inspection; only with a software trigger
                                               and `allow_trigger: true`; BadInvalidState when not ready)
      event ResultReadyEventType {FrameId, Verdict, Score, NormalizedScore, BundleId, IsPass}
                                              (40100 ResultReadyEventType), emitted by VisionSystem per part

The server runs its own asyncio loop on a thread; publish() only schedules the update on it (never blocks).
asyncua is imported only when the server starts.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Literal

from edge_runtime.outputs.base import Output, OutputError
from edge_runtime.records import InspectionResult, Verdict

log = logging.getLogger(__name__)

NAMESPACE_URI = "urn:patchcore-edge:vision-system"
# 40100's VisionSystemState names for our station states.
VISION_STATE = {"ready": "Operational", "not_ready": "Preoperational", "fault": "Error"}


@dataclass(kw_only=True)
class OpcUaConfig:
    type: Literal["opcua"] = "opcua"
    host: str = "127.0.0.1"          # loopback by default: the server has no user authentication or encryption
    port: int = 4840                 # 0 picks a free port (tests)
    allow_trigger: bool = False      # StartSingleJob fires the software trigger; off unless asked for
    state_interval_s: float = 1.0    # counters and bundle refreshed at least this often

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: must be 0..65535, got {self.port}")
        if not self.host:
            raise ValueError("host: must not be empty")
        if self.state_interval_s <= 0:
            raise ValueError(f"state_interval_s: must be > 0, got {self.state_interval_s}")


    def warnings(self) -> list[str]:
        """What `edge-runtime validate` and the start-up log say about an exposed server."""
        if self.host in ("127.0.0.1", "::1", "localhost"):
            return []
        found = [f"host {self.host}: the OPC UA server has no user authentication or encryption (security policy "
                 "None): anyone who reaches this address reads the station's results"]
        if self.allow_trigger:
            found.append(f"allow_trigger: StartSingleJob is allowed on {self.host}: anyone who reaches it can "
                         "trigger captures")
        return found


class OpcUaServer(Output):
    role = "record"

    def __init__(self, cfg: OpcUaConfig) -> None:
        self.cfg = cfg
        self.name = f"opcua:{cfg.host}:{cfg.port}"
        self.port: int | None = None          # the bound port once started
        self._state_provider: Callable[[], dict[str, Any]] | None = None
        self._fire: Callable[[], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._stopping: asyncio.Event | None = None
        self._start_error: BaseException | None = None
        self._ready = False
        self._fault: str | None = "starting"
        self.jobs_started = 0
        self.events_emitted = 0

    # -- wiring (the daemon) -----------------------------------------------------------------------------------
    def bind_state(self, provider: Callable[[], dict[str, Any]]) -> None:
        self._state_provider = provider

    def bind_trigger(self, fire: Callable[[], None]) -> None:
        """The station's software trigger (StartSingleJob fires it when allow_trigger is set)."""
        self._fire = fire

    # -- Output ------------------------------------------------------------------------------------------------
    def start(self) -> None:
        try:
            import asyncua  # noqa: F401
        except ImportError as exc:
            raise OutputError(f"{self.name}: asyncua is not installed (pip install 'patchcore-edge[opcua]')") from exc
        for warning in self.cfg.warnings():
            log.warning("%s: %s", self.name, warning)
        self._thread = threading.Thread(target=self._thread_main, name="opcua-server", daemon=True)
        self._thread.start()
        if not self._started.wait(30):
            raise OutputError(f"{self.name}: server did not start within 30 s")
        if self._start_error is not None:
            raise OutputError(f"{self.name}: cannot start: {self._start_error}") from self._start_error
        log.info("OPC UA server on opc.tcp://%s:%d", self.cfg.host, self.port)

    def publish(self, result: InspectionResult) -> None:
        self._schedule(self._on_result, result)

    def set_ready(self, ready: bool) -> None:
        self._ready = ready
        self._schedule(self._refresh_state)

    def set_fault(self, reason: str | None) -> None:
        self._fault = reason
        self._schedule(self._refresh_state)

    def close(self) -> None:
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stopping.set)
            except RuntimeError:
                pass
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def counters(self) -> dict[str, float]:
        return {"opcua_events": self.events_emitted, "opcua_jobs_started": self.jobs_started}

    # -- the server thread -------------------------------------------------------------------------------------
    def _schedule(self, coro_fn, *args) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._guard(coro_fn(*args))))
        except RuntimeError:   # the loop closed meanwhile (stopping)
            pass

    async def _guard(self, coro) -> None:
        try:
            await coro
        except Exception:  # noqa: BLE001 - one failed update must not stop the server
            log.exception("%s: update failed", self.name)

    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._start_error = exc
            self._started.set()
        finally:
            self._loop = None
            loop.close()

    async def _serve(self) -> None:
        from asyncua import Server, ua

        self._stopping = asyncio.Event()
        server = Server()
        await server.init()
        server.set_endpoint(f"opc.tcp://{self.cfg.host}:{self.cfg.port}/patchcore-edge/")
        server.set_server_name("patchcore-edge vision system")
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        idx = await server.register_namespace(NAMESPACE_URI)
        vs = await server.nodes.objects.add_object(idx, "VisionSystem")

        async def var(parent, name: str, value, vtype):
            return await parent.add_variable(idx, name, ua.Variant(value, vtype))

        S, D, I64, B = ua.VariantType.String, ua.VariantType.Double, ua.VariantType.Int64, ua.VariantType.Boolean
        self._vars = {
            "VisionSystemState": await var(vs, "VisionSystemState", "Preoperational", S),
            "StationState": await var(vs, "StationState", "not_ready", S),
            "Reason": await var(vs, "Reason", "starting", S),
        }
        recipe = await vs.add_object(idx, "ActiveRecipe")
        self._vars["BundleId"] = await var(recipe, "BundleId", "", S)
        self._vars["BundleVersion"] = await var(recipe, "BundleVersion", -1, I64)
        last = await vs.add_object(idx, "LastResult")
        self._last = {
            "FrameId": (await var(last, "FrameId", -1, I64), I64),
            "Verdict": (await var(last, "Verdict", "", S), S),
            "IsPass": (await var(last, "IsPass", False, B), B),
            "Score": (await var(last, "Score", float("nan"), D), D),
            "NormalizedScore": (await var(last, "NormalizedScore", float("nan"), D), D),
            "BundleId": (await var(last, "BundleId", "", S), S),
            "ResultTime": (await last.add_variable(idx, "ResultTime", ua.Variant(dt.datetime.now(dt.timezone.utc),
                                                                                  ua.VariantType.DateTime)),
                           ua.VariantType.DateTime),
            "Error": (await var(last, "Error", "", S), S),
        }
        counters = await vs.add_object(idx, "Counters")
        self._counters = {name: await var(counters, name, 0, I64) for name in ("Frames", *[v.value for v in Verdict])}
        self._types = (S, D, I64, B)

        async def start_single_job(parent):
            refused = self._start_single_job(ua)
            # asyncua turns a raised error into BadUnexpectedError: a StatusCode result reaches the client as is.
            return ua.StatusCode(refused) if refused is not None else [ua.Variant(True, B)]

        await vs.add_method(idx, "StartSingleJob", start_single_job, [], [B])
        etype = await server.create_custom_event_type(
            idx, "ResultReadyEventType", ua.ObjectIds.BaseEventType,
            [("FrameId", I64), ("Verdict", S), ("IsPass", B), ("Score", D), ("NormalizedScore", D), ("BundleId", S)])
        self._event = await server.get_event_generator(etype, vs)
        self._ua = ua
        async with server:
            self.port = self._bound_port(server)
            self._started.set()
            while not self._stopping.is_set():
                await self._refresh_state()
                try:
                    await asyncio.wait_for(self._stopping.wait(), self.cfg.state_interval_s)
                except asyncio.TimeoutError:
                    pass

    def _bound_port(self, server) -> int:
        if self.cfg.port:
            return self.cfg.port
        # port 0: ask the listening socket (asyncua's binary server keeps the asyncio server object).
        sockets = server.bserver._server.sockets
        return sockets[0].getsockname()[1]

    def _start_single_job(self, ua) -> int | None:
        """Fire the trigger; the status code why not, or None when fired."""
        if not self.cfg.allow_trigger:
            return ua.StatusCodes.BadUserAccessDenied
        if self._fire is None:
            return ua.StatusCodes.BadNotSupported   # the station's trigger is not 'software'
        if self._fault or not self._ready:
            return ua.StatusCodes.BadInvalidState   # the part would only be answered FAULT
        self._fire()
        self.jobs_started += 1
        return None

    async def _refresh_state(self) -> None:
        ua = getattr(self, "_ua", None)
        if ua is None:
            return
        S, _D, I64, _B = self._types
        summary: dict[str, Any] = {}
        if self._state_provider is not None:
            try:
                summary = self._state_provider()
            except Exception:  # noqa: BLE001
                log.exception("%s: state provider failed", self.name)
        state = "fault" if self._fault else ("ready" if self._ready else "not_ready")
        await self._vars["StationState"].write_value(ua.Variant(state, S))
        starting = self._fault == "starting"   # the daemon's state before its first bundle load is over
        await self._vars["VisionSystemState"].write_value(
            ua.Variant("Preoperational" if starting else VISION_STATE[state], S))
        await self._vars["Reason"].write_value(ua.Variant(self._fault or "", S))
        if summary.get("bundle_id"):
            await self._vars["BundleId"].write_value(ua.Variant(str(summary["bundle_id"]), S))
        if summary.get("bundle_version") is not None:
            await self._vars["BundleVersion"].write_value(ua.Variant(int(summary["bundle_version"]), I64))
        verdicts = summary.get("verdicts", {})
        if summary:
            await self._counters["Frames"].write_value(ua.Variant(int(summary.get("frames", 0)), I64))
            for v in Verdict:
                await self._counters[v.value].write_value(ua.Variant(int(verdicts.get(v.value, 0)), I64))

    async def _on_result(self, result: InspectionResult) -> None:
        ua = self._ua
        nan = float("nan")
        values = {"FrameId": result.frame_id, "Verdict": result.verdict.value, "IsPass": result.passed,
                  "Score": nan if result.score is None else float(result.score),
                  "NormalizedScore": nan if result.normalized_score is None else float(result.normalized_score),
                  "BundleId": result.bundle_id,
                  "ResultTime": dt.datetime.fromtimestamp(result.finished_at, dt.timezone.utc),
                  "Error": result.error or ""}
        for name, (node, vtype) in self._last.items():
            await node.write_value(ua.Variant(values[name], vtype))
        await self._refresh_state()
        event = self._event.event
        for name in ("FrameId", "Verdict", "IsPass", "Score", "NormalizedScore", "BundleId"):
            setattr(event, name, values[name])
        event.Severity = 100 if result.passed else 500
        await self._event.trigger(message=f"frame {result.frame_id}: {result.verdict.value}")
        self.events_emitted += 1
