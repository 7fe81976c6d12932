"""OPC UA server (asyncua): station state, last result, counters, a single-job trigger and a result-ready event.

A consumer of the result stream like the result log (the output bus hands it every record) plus the software
trigger the HTTP endpoint uses. Off unless a station lists `type: opcua`; 127.0.0.1 by default. The address space
borrows the concepts of OPC 40100 (Machine Vision), not its full information model:

    Objects/VisionSystem                      (40100: VisionSystemType)
      VisionSystemState  String               (40100 state machine: Operational / Preoperational / Error)
      StationState, Reason  String            ready / not_ready / fault, and why
      ActiveRecipe/BundleId, BundleVersion    (40100 RecipeManagement: the bundle is the station's recipe)
      ActiveRecipe/ExternalId, Number, SwitchStatus   with recipes: the product's recipe name and number, and
                                              where its last switch stands (ok / switching / failed)
      LastResult/FrameId, Verdict, IsPass, Score, NormalizedScore, BundleId, ResultTime, Error
                                              (40100 ResultManagement / ResultType: ResultId, ResultState);
                                              Verdict empty and IsPass false from a part's trigger to its result,
                                              IsPass false whenever the station is not ready
      Counters/Frames, OK, NG, REVIEW, FAULT
      StartSingleJob() -> Accepted            (40100 StartSingleJob: one inspection; only with a software trigger
                                               and `allow_trigger: true`; BadInvalidState when not ready)
      PrepareRecipe(ExternalId: String) -> IsCompleted: Boolean, Error: Int32, Message: String
                                              (40100 RecipeManagement PrepareRecipe, with the external id as a
                                               plain string: a recipe name or number of station `recipes:`).
                                               Only with `allow_recipe: true` (otherwise the method is absent).
                                               It returns when the switch is over: Error 0 verified and active;
                                               -1 unknown recipe (refused, nothing changes); -2 switch failed (the
                                               line stays in FAULT); -3 no outcome within recipe_timeout_s;
                                               -4 superseded by a later request. (40100: < 0 application errors.)
      event ResultReadyEventType {FrameId, Verdict, Score, NormalizedScore, BundleId, IsPass}
                                              (40100 ResultReadyEventType), emitted by VisionSystem per part

The server runs its own asyncio loop on a thread; publish() only schedules the update on it (never blocks).
asyncua is imported only when the server starts.

Security (off by default, as before): `security_policy` None (a closed cell network only), Basic256Sha256_Sign or
Basic256Sha256_SignAndEncrypt with the server's `certificate` and `private_key` (files checked at config load);
`trusted_clients` (a folder of client certificates) refuses any other client certificate; `users` (name +
scrypt `password_hash` from `edge-runtime hash-password`) turns anonymous access off and needs a signing policy,
so a password never crosses the network in clear text.
"""
from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import threading
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from edge_runtime.outputs.base import OUTPUTS, Output, OutputError
from edge_runtime.records import InspectionResult, Verdict

log = logging.getLogger(__name__)

NAMESPACE_URI = "urn:patchcore-edge:vision-system"
# 40100's VisionSystemState names for our station states.
VISION_STATE = {"ready": "Operational", "not_ready": "Preoperational", "fault": "Error"}


# Client connections the server holds (a socket, a task and a processor each); more are closed at once. A connection
# that has no session this long after it opened is closed (discovery, GetEndpoints, is over well within it).
OPCUA_MAX_CONNECTIONS = 32
OPCUA_SESSION_TIMEOUT_S = 10.0
# The largest request taken, in chunks of the 64 KiB receive buffer: the station's reads, browses and method calls
# are a few KiB; asyncua took 100 MiB a request, every chunk kept until the last one came.
OPCUA_MAX_REQUEST_BYTES = 1 << 20
# Messages read from one client and not yet served: past this, the server stops reading from it until it has served
# them, and while the client does not read its answers (the socket's buffer over asyncio's high-water mark).
OPCUA_MAX_QUEUED = 16
# What a client sends a server (OPC UA Part 6, 7.1.2): Hello, then secure channel and messages.
CLIENT_MESSAGE_TYPES = frozenset({b"HEL", b"OPN", b"MSG", b"CLO"})


def _install_connection_bounds() -> None:
    """asyncua's binary server, with at most OPCUA_MAX_CONNECTIONS connections and none without a session for long.

    asyncua accepts every connection and keeps one that never says Hello for ever: 4,200 idle sockets took every
    file descriptor of a daemon under LimitNOFILE=4096, the folder source could not list its images, 127 of 180
    parts FAULT, READY down, 78 MB of asyncio accept errors logged (probe 80). Server.start() builds its
    BinaryServer by name, so the bounded one is put in its place (every OPC UA server of the process is bounded)."""
    import asyncua
    import asyncua.server.server as ua_server
    from asyncua.common.utils import Buffer, NotEnoughData
    from asyncua.server.binary_server_asyncio import BinaryServer, OPCUAProtocol
    from asyncua.ua.ua_binary import header_from_binary

    if getattr(ua_server.BinaryServer, "bounded", False):
        return
    # The bounds replace asyncua 1.1's message loop (data_received feeding `messages`, `_process_one_msg`): a
    # release that moved them would leave the server unbounded or deaf, so it is refused by name instead.
    missing = [n for n in ("_process_one_msg", "data_received", "connection_made") if not hasattr(OPCUAProtocol, n)]
    if missing:
        raise RuntimeError(f"asyncua {getattr(asyncua, '__version__', '?')}: its OPCUAProtocol has no "
                           f"{', '.join(missing)}; the OPC UA output is tested on asyncua 1.1 (pip install "
                           "'asyncua>=1.1.5,<1.2')")

    class BoundedProtocol(OPCUAProtocol):
        def connection_made(self, transport) -> None:
            self._writable = asyncio.Event()   # cleared while the client leaves its answers unread
            self._writable.set()
            super().connection_made(transport)
            if len(self.clients) > OPCUA_MAX_CONNECTIONS:
                if not _refusals.seen(self.peer_name):
                    log.warning("OPC UA: connection from %s closed: %d connections already open", self.peer_name,
                                OPCUA_MAX_CONNECTIONS)
                transport.close()
                return
            self._no_session = asyncio.get_running_loop().call_later(OPCUA_SESSION_TIMEOUT_S, self._close_sessionless)

        def data_received(self, data) -> None:
            # asyncua's own loop queued each message with a Buffer over all the bytes left, then copied those for
            # the next: n messages in one read held n copies of the read (probe 105: 128 KiB of 9-byte messages
            # from one socket took 870 MiB, and each logged a traceback, 31 MB of log). Each message here holds its
            # own bytes, and one that no client sends closes the connection.
            buffer = self._buffer + data if self._buffer else data
            start = 0
            while len(buffer) - start >= 8:
                try:
                    header = header_from_binary(Buffer(buffer, start))
                except NotEnoughData:   # a secure message's channel id not in yet
                    break
                if header.MessageType not in CLIENT_MESSAGE_TYPES or header.body_size < 1:
                    self._refuse(f"a message of type {header.MessageType!r} and {header.packet_size} bytes")
                    return
                end = start + header.header_size + header.body_size
                if end > len(buffer):
                    break
                self.messages.put_nowait((header, Buffer(buffer[start + header.header_size:end])))
                start = end
            self._buffer = buffer[start:]
            # What is left is one incomplete chunk, which may not exceed the server's receive buffer (OPC UA Part 6).
            # asyncua waited for any declared size, appending every read to one bytes object: one client streaming
            # a chunk that never ends grew the daemon by 190 MiB in 25 s and, copying it under the GIL at every
            # read, slowed the inspection loop from 23 to 262 ms a part (p95 1077 ms; 4 of 80 FAULT; probe 80).
            if len(self._buffer) > self.limits.max_recv_buffer:
                self._refuse(f"a message chunk over {self.limits.max_recv_buffer} bytes")
            self._flow()

        async def _process_one_msg(self, header, buf) -> None:
            await self._writable.wait()   # no more answers while the client leaves the last ones unread
            if self.transport.is_closing():
                return   # refused: what it sent after that is not served
            try:
                await super()._process_one_msg(header, buf)
            except Exception as exc:  # noqa: BLE001 - asyncua logged a traceback per bad message and read on
                self._refuse(f"a message it cannot take ({type(exc).__name__}: {str(exc)[:100]})")
            finally:
                self._flow()

        def pause_writing(self) -> None:
            self._writable.clear()
            self._flow()

        def resume_writing(self) -> None:
            self._writable.set()
            self._flow()

        def _flow(self) -> None:
            """Read from the client only while it reads its answers and few of its requests wait: asyncua read all
            it sent and wrote every answer into the socket's buffer, so a client that pipelined requests and read
            no answer grew the daemon without end (probe 105: 141 -> 365 MiB in 35 s, growing)."""
            transport = self.transport
            if transport is None or transport.is_closing():
                return
            hold = not self._writable.is_set() or self.messages.qsize() >= OPCUA_MAX_QUEUED
            if hold and transport.is_reading():
                transport.pause_reading()
            elif not hold and not transport.is_reading():
                transport.resume_reading()

        def _refuse(self, what: str) -> None:
            log.warning("OPC UA: connection from %s closed: %s", self.peer_name, what)
            self._buffer = b""
            self.transport.abort()   # its unread answers too: close() would wait for the client to read them

        def _close_sessionless(self) -> None:
            if self.processor is not None and self.processor.session is None:
                self.transport.close()

        def connection_lost(self, ex) -> None:
            timer = getattr(self, "_no_session", None)
            if timer is not None:
                timer.cancel()
            super().connection_lost(ex)

    class BoundedBinaryServer(BinaryServer):
        bounded = True

        def __init__(self, internal_server, hostname, port, limits) -> None:
            # asyncua's limit is 100 MiB a request (1,601 chunks, kept until the last one): 4 anonymous clients
            # writing 90 MiB each grew the daemon by 580 MiB and stalled other threads up to 74 ms (probe 105).
            # A longer request is answered BadRequestTooLarge once OPCUA_MAX_REQUEST_BYTES of chunks are in.
            limits = dataclasses.replace(
                limits, max_message_size=OPCUA_MAX_REQUEST_BYTES,
                max_chunk_count=-(-OPCUA_MAX_REQUEST_BYTES // limits.max_recv_buffer))
            super().__init__(internal_server, hostname, port, limits)

        def _make_protocol(self):
            return BoundedProtocol(iserver=self.iserver, policies=self._policies, clients=self.clients,
                                   closing_tasks=self.closing_tasks, limits=self.limits)

    ua_server.BinaryServer = BoundedBinaryServer


class _Refusals:
    """Addresses already logged as refused: one line each for the first 64, then one line saying more were."""

    def __init__(self, limit: int = 64) -> None:
        self._seen: set = set()
        self._limit = limit

    def seen(self, peer) -> bool:
        host = peer[0] if peer else None
        if host in self._seen or len(self._seen) > self._limit:
            return True
        self._seen.add(host)
        if len(self._seen) > self._limit:
            log.warning("OPC UA: more addresses refused for too many connections; no longer logged")
            return True
        return False


_refusals = _Refusals()


# PrepareRecipe's Error output (40100: 0 OK, < 0 application-specific) for RecipeSwitcher.submit()'s outcomes.
RECIPE_ERRORS = {"ok": 0, "unknown": -1, "failed": -2, "timeout": -3, "superseded": -4, "refused": -5}

SecurityPolicyName = Literal["None", "Basic256Sha256_Sign", "Basic256Sha256_SignAndEncrypt"]


@dataclass(kw_only=True)
class OpcUaUser:
    name: str
    password_hash: str               # scrypt$N$r$p$<salt>$<hash> from `edge-runtime hash-password`; never the password

    def validate(self) -> None:
        from edge_runtime.operator_page.auth import parse_hash

        if not self.name or len(self.name) > 64:
            raise ValueError(f"name: expected 1-64 characters, got {self.name!r}")
        parse_hash(self.password_hash)   # ValueError names password_hash and the expected form


@dataclass(kw_only=True)
class OpcUaConfig:
    type: Literal["opcua"] = "opcua"
    host: str = "127.0.0.1"          # loopback by default (policy None: no encryption, anonymous access)
    port: int = 4840                 # 0 picks a free port (tests)
    allow_trigger: bool = False      # StartSingleJob fires the software trigger; off unless asked for
    state_interval_s: float = 1.0    # counters and bundle refreshed at least this often
    security_policy: SecurityPolicyName = "None"   # None: a closed cell network only
    certificate: str | None = None   # the server's application certificate (DER or PEM); needed unless policy None
    private_key: str | None = None   # its private key (PEM or DER, unencrypted); keep it readable by the daemon only
    trusted_clients: str | None = None   # folder of client certificates: any other client certificate is refused
    users: list[OpcUaUser] = field(default_factory=list)   # none: anonymous access; some: only these users
    allow_recipe: bool = False       # PrepareRecipe selects the line's recipe; off (the method is absent) unless asked
    recipe_timeout_s: float = 300.0  # PrepareRecipe answers Error -3 if the switch is not over by then

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: must be 0..65535, got {self.port}")
        if not self.host:
            raise ValueError("host: must not be empty")
        if self.state_interval_s <= 0:
            raise ValueError(f"state_interval_s: must be > 0, got {self.state_interval_s}")
        if not 0 < self.recipe_timeout_s <= 3600:
            raise ValueError(f"recipe_timeout_s: must be > 0 and <= 3600 s, got {self.recipe_timeout_s}")
        if self.security_policy == "None":
            for key in ("certificate", "private_key", "trusted_clients"):
                if getattr(self, key):
                    raise ValueError(f"{key}: only used with security_policy Basic256Sha256_Sign or "
                                     f"Basic256Sha256_SignAndEncrypt (security_policy is None)")
            if self.users:
                raise ValueError("users: need security_policy Basic256Sha256_Sign or Basic256Sha256_SignAndEncrypt: "
                                 "with policy None the passwords would cross the network in clear text")
        else:
            for key in ("certificate", "private_key"):
                if not getattr(self, key):
                    raise ValueError(f"{key}: required with security_policy {self.security_policy}")
        names = [u.name for u in self.users]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"users: two users are named {name!r}")

    def resolve_paths(self, absolute: Callable[[str, str], str], where: str, state_dir: str) -> None:
        """Paths relative to the station file; each file must be there and readable now (at config load), so a
        wrong path is reported with its key, not as a TLS error at the first client."""
        for key in ("certificate", "private_key", "trusted_clients"):
            value = getattr(self, key)
            if not value:
                continue
            path = absolute(f"{where}.{key}", value)
            setattr(self, key, path)
            if key == "trusted_clients":
                if not os.path.isdir(path):
                    raise ValueError(f"{key}: {path}: not a folder (of trusted client certificates)")
            elif not os.path.isfile(path):
                raise ValueError(f"{key}: {path}: no such file")
            elif not os.access(path, os.R_OK):
                raise ValueError(f"{key}: {path}: not readable by this user")

    def warnings(self) -> list[str]:
        """What `edge-runtime validate` and the start-up log say about an exposed server."""
        if self.host in ("127.0.0.1", "::1", "localhost"):
            return []
        if self.security_policy == "None":
            found = [f"host {self.host}: the OPC UA server has no user authentication or encryption (security policy "
                     "None): anyone who reaches this address reads the station's results; use it on a closed cell "
                     "network only"]
        elif not self.users and not self.trusted_clients:
            found = [f"host {self.host}: security_policy {self.security_policy} without users or trusted_clients: "
                     "the channel is protected, but any client with any certificate reads the station's results"]
        else:
            found = []
        if self.allow_trigger:
            found.append(f"allow_trigger: StartSingleJob is allowed on {self.host}: anyone who reaches it can "
                         "trigger captures")
        if self.allow_recipe and not self.users:
            found.append(f"allow_recipe: PrepareRecipe is allowed on {self.host} without users: anyone who reaches "
                         "it can change the line's product")
        return found


@OUTPUTS.register(OpcUaConfig)
class OpcUaServer(Output):
    role = "record"

    def __init__(self, cfg: OpcUaConfig) -> None:
        self.cfg = cfg
        self.name = f"opcua:{cfg.host}:{cfg.port}"
        self.port: int | None = None          # the bound port once started
        self._state_provider: Callable[[], dict[str, Any]] | None = None
        self._fire: Callable[[], bool | None] | None = None
        self._recipes = None                   # the line's RecipeSwitcher (edge_runtime/recipes.py), when it has one
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._stopping: asyncio.Event | None = None
        self._start_error: BaseException | None = None
        self._ready = False
        self._fault: str | None = "starting"
        self.jobs_started = 0
        self.recipe_calls = 0
        self.events_emitted = 0

    # -- wiring (the daemon) -----------------------------------------------------------------------------------
    def bind_state(self, provider: Callable[[], dict[str, Any]]) -> None:
        self._state_provider = provider

    def bind_trigger(self, fire: Callable[[], bool | None], withdraw: Callable[[], None] | None = None) -> None:
        """The station's software trigger (StartSingleJob fires it when allow_trigger is set; firing withdraws the
        previous verdict itself, so `withdraw` is not needed here)."""
        self._fire = fire

    def bind_recipes(self, switcher) -> None:
        """The line's RecipeSwitcher: PrepareRecipe selects through it when `allow_recipe` is set."""
        self._recipes = switcher

    # -- Output ------------------------------------------------------------------------------------------------
    def start(self) -> None:
        try:
            import asyncua  # noqa: F401
        except ImportError as exc:
            raise OutputError(f"{self.name}: asyncua is not installed (pip install 'patchcore-edge[opcua]')") from exc
        for warning in self.cfg.warnings():
            log.warning("%s: %s", self.name, warning)
        # asyncua logs at INFO every request (a Read: ~110 bytes), 16 lines per connection and ~1100 lines at start
        # (probe 78: a SCADA reading once a second wrote ~10 MB a day, 97% of the station's log, into the journal,
        # whose size limit then rotated the station's own lines out within days). Its warnings still show.
        logging.getLogger("asyncua").setLevel(max(logging.WARNING, logging.getLogger().level))
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

    def verdict_withdrawn(self) -> None:
        """A part was triggered or begins (output bus): LastResult no longer shows a current verdict."""
        self._schedule(self._withdraw_last)

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
        counters = {"opcua_events": self.events_emitted, "opcua_jobs_started": self.jobs_started}
        if self.cfg.allow_recipe:   # only where the method exists
            counters["opcua_recipe_calls"] = self.recipe_calls
        return counters

    def recipe_changed(self, number: int, name: str, status: str, ms: float | None, error: str | None) -> None:
        """The line's recipe acknowledgement (edge_runtime/recipes.py): ActiveRecipe/ExternalId, Number, SwitchStatus."""
        self._schedule(self._on_recipe, number, name, status)

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
        await self._secure(server, ua)
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
        self._vars["ExternalId"] = await var(recipe, "ExternalId", "", S)
        self._vars["Number"] = await var(recipe, "Number", 0, I64)
        self._vars["SwitchStatus"] = await var(recipe, "SwitchStatus", "none", S)
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
            await self._withdraw_last()   # before the call returns: the previous part's IsPass is not the answer
            refused = self._start_single_job(ua)
            # asyncua turns a raised error into BadUnexpectedError: a StatusCode result reaches the client as is.
            return ua.StatusCode(refused) if refused is not None else [ua.Variant(True, B)]

        await vs.add_method(idx, "StartSingleJob", start_single_job, [], [B])
        if self.cfg.allow_recipe:
            await self._add_prepare_recipe(vs, idx, ua)
        etype = await server.create_custom_event_type(
            idx, "ResultReadyEventType", ua.ObjectIds.BaseEventType,
            [("FrameId", I64), ("Verdict", S), ("IsPass", B), ("Score", D), ("NormalizedScore", D), ("BundleId", S)])
        self._event = await server.get_event_generator(etype, vs)
        self._ua = ua
        _install_connection_bounds()
        async with server:
            self.port = self._bound_port(server)
            self._started.set()
            while not self._stopping.is_set():
                await self._refresh_state()
                try:
                    await asyncio.wait_for(self._stopping.wait(), self.cfg.state_interval_s)
                except asyncio.TimeoutError:
                    pass

    async def _secure(self, server, ua) -> None:
        """Security policy, certificate and key, trusted clients and users (see the module docstring)."""
        cfg = self.cfg
        policy = {"None": ua.SecurityPolicyType.NoSecurity,
                  "Basic256Sha256_Sign": ua.SecurityPolicyType.Basic256Sha256_Sign,
                  "Basic256Sha256_SignAndEncrypt": ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt}
        server.set_security_policy([policy[cfg.security_policy]])
        if cfg.security_policy != "None":
            try:
                await server.load_certificate(cfg.certificate)
            except Exception as exc:  # noqa: BLE001 - reported by start() with the key
                raise OutputError(f"certificate {cfg.certificate}: cannot load it: {exc}") from exc
            try:
                await server.load_private_key(cfg.private_key)
            except Exception as exc:  # noqa: BLE001
                raise OutputError(f"private_key {cfg.private_key}: cannot load it: {exc}") from exc
        if cfg.trusted_clients:
            from pathlib import Path

            from asyncua.crypto.truststore import TrustStore
            from asyncua.crypto.validator import CertificateValidator, CertificateValidatorOptions

            store = TrustStore([Path(cfg.trusted_clients)], [])
            await store.load()
            # Trust: the certificate is one of the folder's (or signed by one); its dates; not the URI check (a
            # self-signed client certificate names its own application URI, which we do not configure).
            options = CertificateValidatorOptions.TRUSTED | CertificateValidatorOptions.TIME_RANGE
            server.set_certificate_validator(CertificateValidator(options, store))
        # asyncua always accepts a secure channel with policy None (the spec wants discovery, GetEndpoints, on
        # it) and, without a check of ours, then activates a session on it too, whatever policy the server
        # demands: a client that skips the endpoint check would read everything in clear. Our user manager
        # refuses to activate a session on a channel without the client's certificate, i.e. with policy None.
        server.iserver.user_manager = _SessionGate(cfg.users, require_secure_channel=cfg.security_policy != "None")
        server.set_identity_tokens([ua.UserNameIdentityToken] if cfg.users else [ua.AnonymousIdentityToken])

    async def _add_prepare_recipe(self, vs, idx, ua) -> None:
        def arg(name: str, vtype, text: str):
            a = ua.Argument()
            a.Name, a.DataType, a.ValueRank = name, ua.NodeId(vtype.value), -1
            a.Description = ua.LocalizedText(text)
            return a

        V = ua.VariantType

        async def prepare_recipe(parent, external_id):
            value = external_id.Value if isinstance(external_id, ua.Variant) else external_id
            outcome = await self._prepare_recipe(ua, "" if value is None else str(value))
            if isinstance(outcome, int):
                return ua.StatusCode(outcome)
            error, message = outcome
            return [ua.Variant(error == 0, V.Boolean), ua.Variant(error, V.Int32), ua.Variant(message, V.String)]

        await vs.add_method(
            idx, "PrepareRecipe", prepare_recipe,
            [arg("ExternalId", V.String, "the recipe's name or number (station file recipes:)")],
            [arg("IsCompleted", V.Boolean, "true: the recipe is verified and active"),
             arg("Error", V.Int32, "0 OK; -1 unknown recipe; -2 switch failed (line in FAULT); -3 timeout; "
                                   "-4 superseded"),
             arg("Message", V.String, "what happened, in words")])

    async def _prepare_recipe(self, ua, key: str) -> tuple[int, str] | int:
        """Select recipe `key` and wait (on the server's loop, not blocking it) until the switch is over.
        Returns (Error, Message), or a status code when the call cannot be served at all."""
        switcher = self._recipes
        if switcher is None:
            return ua.StatusCodes.BadNotSupported   # this line has no recipes
        self.recipe_calls += 1
        waiter = switcher.submit(key[:64], "opcua")
        try:
            outcome, message = await asyncio.wait_for(asyncio.wrap_future(waiter), self.cfg.recipe_timeout_s)
        except asyncio.TimeoutError:
            outcome, message = "timeout", f"the switch to {key[:64]!r} was not over within {self.cfg.recipe_timeout_s} s"
        # ActiveRecipe shows the outcome before the caller reads it (the line's acknowledgement, recipe_changed,
        # may reach us later through the output bus's worker: it writes the same values).
        recipe = switcher.cfg.find(key[:64]) if outcome in ("ok", "failed") else None
        if recipe is not None:
            await self._on_recipe(recipe.number, recipe.name, outcome)
        else:
            await self._refresh_state()
        return RECIPE_ERRORS[outcome], message

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
        if self._fire() is False:
            return ua.StatusCodes.BadTooManyOperations   # a backlog of triggers not served yet: not captured
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
        reason = self._fault or ""
        if summary.get("state") == "stalled":   # the loop is stuck: no part will be answered (plant_report)
            state, reason = "fault", str(summary.get("reason") or "stalled")
        await self._vars["StationState"].write_value(ua.Variant(state, S))
        starting = self._fault == "starting"   # the daemon's state before its first bundle load is over
        await self._vars["VisionSystemState"].write_value(
            ua.Variant("Preoperational" if starting else VISION_STATE[state], S))
        await self._vars["Reason"].write_value(ua.Variant(reason, S))
        if state != "ready":
            # A station that cannot inspect has no passing part to show (probe 37: IsPass True through a stall).
            await self._last["IsPass"][0].write_value(ua.Variant(False, self._last["IsPass"][1]))
        verdicts = summary.get("verdicts", {})
        if summary:
            # No bundle in service (withdrawn after a failed probation, a load that failed): empty and -1, as before
            # the first load, not the last bundle's id (probe 76: a withdrawn candidate's id stayed while FAULT).
            bundle_version = summary.get("bundle_version")
            await self._vars["BundleId"].write_value(ua.Variant(str(summary.get("bundle_id") or ""), S))
            await self._vars["BundleVersion"].write_value(
                ua.Variant(-1 if bundle_version is None else int(bundle_version), I64))
            await self._counters["Frames"].write_value(ua.Variant(int(summary.get("frames", 0)), I64))
            for v in Verdict:
                await self._counters[v.value].write_value(ua.Variant(int(verdicts.get(v.value, 0)), I64))

    async def _on_recipe(self, number: int, name: str, status: str) -> None:
        ua = getattr(self, "_ua", None)
        if ua is None:
            return
        S, _D, I64, _B = self._types
        if number or status != "failed":   # a refused unknown number keeps showing the recipe in service
            await self._vars["ExternalId"].write_value(ua.Variant(name, S))
            await self._vars["Number"].write_value(ua.Variant(int(number), I64))
            await self._vars["SwitchStatus"].write_value(ua.Variant(status, S))
        await self._refresh_state()

    async def _withdraw_last(self) -> None:
        """Verdict empty and IsPass false until the next result: a client reading right after a trigger read the
        previous part's OK (probe 37: 8 of 16 reads after StartSingleJob)."""
        ua = getattr(self, "_ua", None)
        if ua is None:
            return
        for name, value in (("IsPass", False), ("Verdict", "")):
            node, vtype = self._last[name]
            await node.write_value(ua.Variant(value, vtype))

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


class _SessionGate:
    """asyncua user manager, asked when a session is activated: refused on a channel without the client's
    certificate (policy None) when the server demands a signing policy; with `users`, only a configured user whose
    password matches its scrypt hash (edge_runtime/operator_page/auth.py); otherwise anonymous read access."""

    def __init__(self, users: list[OpcUaUser], *, require_secure_channel: bool) -> None:
        self._hashes = {u.name: u.password_hash for u in users}
        self._require_secure_channel = require_secure_channel

    def get_user(self, iserver, username=None, password=None, certificate=None):
        from asyncua.crypto.permission_rules import User, UserRole

        from edge_runtime.operator_page.auth import check_password

        if self._require_secure_channel and not certificate:   # asyncua passes b"" for a None channel
            log.warning("OPC UA: session refused: its secure channel has security policy None (no client "
                        "certificate); this server demands a signing policy")
            return None
        if not self._hashes:
            return User(role=UserRole.User)
        stored = self._hashes.get(username or "")
        if stored is None or password is None:
            return None
        if isinstance(password, bytes):
            password = password.decode("utf-8", "replace")
        if not check_password(password, stored):
            log.warning("OPC UA: user %r refused: wrong password", username[:64])
            return None
        return User(role=UserRole.User, name=username)
