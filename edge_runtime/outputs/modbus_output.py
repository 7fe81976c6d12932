"""Modbus TCP server output: the station publishes its state in registers and coils that PLCs poll.

Register map (stable; addresses are 0-based protocol addresses, unit id from the config):

    Coils (also mirrored as discrete inputs 0-3 for PLCs that only poll inputs)
      0  OK      true only for a part that was inspected and passed
      1  NG      the last part was inspected and is anomalous
      2  READY   the station inspects
      3  ERROR   a station fault is active or the last part was not inspected (FAULT)
      4  REVIEW  the last part scored in the review band: a person re-checks it (never OK)
      5  BUSY    a part was triggered and its verdict is not out yet (OK/NG/REVIEW are false meanwhile)
      6-15       reserved, read as false
    Holding registers (also mirrored as input registers 0-15)
      0    verdict of the last part: 0 none/fault/busy/acknowledged, 1 OK, 2 NG, 3 REVIEW (never a pass)
      1-2  frame id of the last part, uint32, high word first (register 1); it changes with every part,
           together with register 0 (one update), so a PLC latches a new verdict when it changes;
           0xFFFF 0xFFFF until the first part since the server started (the first part's id is 0)
      3    raw score x 1000, clipped to 0..65535 (0 when not inspected)
      4    normalised score x 1000 (500 at the threshold, 1000 max)
      5    heartbeat counter, +1 per inspection-loop iteration, uint16, wraps
      6    fault code bits: 1 = station fault (set_fault), 2 = the last part was not inspected (FAULT)
      7    recipe: number of the active recipe (or of the one being switched to / that failed), 0 none
      8    recipe status: 0 none, 1 switching (the line is in FAULT meanwhile), 2 verified and active, 3 failed
      9-15 reserved, read as 0
      16-31 PLC area: writable by clients only with `allow_writes: true`; the station never interprets it

All station-owned addresses are read-only for clients: a write is answered with exception 1 (illegal function)
while `allow_writes` is false or the client is not in `write_clients` (when listed), and with exception 2 (illegal address) outside the PLC area when it is true.
Per part: begin_part (the trigger) clears OK/NG/REVIEW and verdict register 0 and sets BUSY; publish sets the
verdict, frame id and scores at once and clears BUSY; an ACK from the PLC (GPIO or serial) clears the verdict
again. Like the GPIO output, a FAULT result, set_fault() and set_ready(False) drop OK (coil 0 false, verdict 0).
The server runs on its own asyncio loop in a background thread; client connects and disconnects never reach the
inspection thread.
"""
from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
import math
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Literal

from edge_runtime.client_filter import ClientFilter, is_loopback, parse_networks
from edge_runtime.outputs.base import OUTPUTS, Output, OutputError
from edge_runtime.records import InspectionResult, Verdict

log = logging.getLogger(__name__)

STATION_REGISTERS = 16      # holding/input registers 0..15 and coils 0..15 belong to the station
# Frame id registers 1-2 before any part: not 0, which is the first part's id (a new state_dir, or every start
# without one), so that part changes them too; a PLC latching on a change had missed its verdict (probe 79).
NO_FRAME = 0xFFFF
PLC_AREA_START = 16
PLC_AREA_SIZE = 16
PLC_WRITE_LOG = 256   # PLC-area changes kept for plc_writes (the line reads them at least once a round)

COIL_OK, COIL_NG, COIL_READY, COIL_ERROR, COIL_REVIEW, COIL_BUSY = 0, 1, 2, 3, 4, 5
HR_VERDICT, HR_FRAME_HI, HR_FRAME_LO, HR_SCORE, HR_NORM, HR_HEARTBEAT, HR_FAULT, HR_RECIPE, HR_RECIPE_STATUS = range(9)
VERDICT_NONE, VERDICT_OK, VERDICT_NG, VERDICT_REVIEW = 0, 1, 2, 3
FAULT_STATION, FAULT_NOT_INSPECTED = 1, 2

# Modbus function codes by what they touch (read / write).
_READ_BITS = {1, 2}
_WRITE_FUNCTIONS = {5, 6, 15, 16, 22, 23}
_START_TIMEOUT_S = 10.0
# The address of the client whose request the action hook is serving (set per request task by the handler).
_PEER: contextvars.ContextVar[str | None] = contextvars.ContextVar("modbus_peer", default=None)


# When the server is full, a connection silent for this share of idle_timeout_s gives its slot to a new client
# (30 s of the default 60: a PLC polling every few seconds keeps its slot; 5 s had evicted one polling every 6 s).
EVICT_IDLE_SHARE = 0.5


@dataclass(kw_only=True)
class ModbusConfig:
    type: Literal["modbus"] = "modbus"
    host: str = "127.0.0.1"   # 0.0.0.0 to serve the plant network; the default keeps it local
    port: int = 5020          # 502 needs CAP_NET_BIND_SERVICE
    unit_id: int = 1          # 0 answers every unit id
    allow_writes: bool = False  # true: clients may write the PLC area (holding registers 16-31), nothing else
    max_connections: int = 8    # more clients are disconnected at once; connected PLCs keep their connection
    idle_timeout_s: float = 60.0  # a client that sends nothing for this long is disconnected
    # Addresses or networks ("10.0.0.5", "10.0.0.0/24") that may connect; others are closed at once and take no
    # slot. Empty: any address (firewall the port then): otherwise a client polling every few seconds from
    # anywhere can hold slots a reconnecting PLC needs.
    allowed_clients: list[str] = field(default_factory=list)
    # With allow_writes: addresses or networks that may write the PLC area (the recipe register); other admitted
    # clients (a SCADA, a historian) read only. Empty: every admitted client may write.
    write_clients: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port: must be 1..65535, got {self.port}")
        if not 0 <= self.unit_id <= 247:
            raise ValueError(f"unit_id: must be 0..247, got {self.unit_id}")
        if not 1 <= self.max_connections <= 256:
            raise ValueError(f"max_connections: must be 1..256, got {self.max_connections}")
        if not 0 < self.idle_timeout_s <= 3600:
            raise ValueError(f"idle_timeout_s: must be > 0 and <= 3600, got {self.idle_timeout_s}")
        self.client_networks()
        try:
            parse_networks(self.write_clients)
        except ValueError as exc:
            raise ValueError(str(exc).replace("allowed_clients[", "write_clients[", 1)) from None
        if self.write_clients and not self.allow_writes:
            raise ValueError("write_clients: only with allow_writes: true (without it no client writes)")

    def client_networks(self) -> list:
        """allowed_clients parsed (edge_runtime.client_filter)."""
        return parse_networks(self.allowed_clients)

    def warnings(self) -> list[str]:
        """What `edge-runtime validate` and the start-up log say about a server on the plant network."""
        found = []
        if self.host in ("::", "[::]"):
            # asyncio makes every IPv6 listening socket IPv6-only: "::" is not dual-stack here.
            found.append("host ::: the Modbus server then takes IPv6 clients only; an IPv4 PLC cannot connect (use "
                         "0.0.0.0 for IPv4)")
        if not is_loopback(self.host) and not self.allowed_clients:
            found.append(f"host {self.host} without allowed_clients: any client that reaches this address reads the "
                         "results" + (" and writes the PLC area" if self.allow_writes else "")
                         + " and can hold connection slots a reconnecting PLC needs; list the PLCs in "
                           "allowed_clients, or firewall the port")
        if self.allow_writes and not is_loopback(self.host) and not self.write_clients:
            found.append(f"host {self.host}: allow_writes without write_clients: every client admitted to read (a "
                         "SCADA, a historian) can also write the PLC area, the recipe register included; list the "
                         "PLC in write_clients")
        return found


def _scaled(value: float | None, upper: int = 65535) -> int:
    if value is None or not math.isfinite(value):
        return 0
    return int(min(max(round(value * 1000), 0), upper))


def _bind_problem(host: str, port: int) -> str | None:
    """Why listening on host:port fails (pymodbus only logs it), or None if a plain bind works."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does
            probe.bind(address)
    except OSError as exc:
        return str(exc)
    return None


@OUTPUTS.register(ModbusConfig)
class ModbusOutput(Output):
    """A Modbus TCP server (pymodbus) serving the station state; see the module docstring for the map."""

    def __init__(self, cfg: ModbusConfig) -> None:
        self.cfg = cfg
        self.name = f"modbus:{cfg.host}:{cfg.port}"
        self._lock = threading.Lock()  # the inspection thread writes the state, the server loop reads it
        self._coils = [False] * STATION_REGISTERS
        self._registers = [0] * STATION_REGISTERS
        self._registers[HR_FRAME_HI] = self._registers[HR_FRAME_LO] = NO_FRAME
        self._station_fault = False
        self._last_faulted = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server = None
        self._plc_area: list[int] | None = None  # the live holding-register list of the server, for plc_registers()
        # Every write to the PLC area, timed, so a value the PLC wrote and undid between two reads of the line is
        # still seen (plc_writes): a recipe number written for one part and reset at once must fault that part.
        self._plc_writes: collections.deque = collections.deque(maxlen=PLC_WRITE_LOG)
        self._plc_write_seq = 0
        self._start_error: str | None = None     # why the last start() failed (the state calls' errors name it)
        self._writers = ClientFilter(parse_networks(cfg.write_clients), f"modbus {cfg.host}:{cfg.port} write",
                                     key="write_clients", refused="a write")

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        try:
            from pymodbus.server import ModbusTcpServer  # noqa: F401 - fail early, with a clear message
        except ImportError as exc:
            raise OutputError(f"modbus {self.cfg.host}:{self.cfg.port}: pymodbus is not installed ({exc})") from exc
        for warning in self.cfg.warnings():
            log.warning("modbus %s:%d: %s", self.cfg.host, self.cfg.port, warning)
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=self._run_loop, args=(loop,), name=f"modbus-{self.cfg.port}", daemon=True)
        thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._serve(), loop).result(_START_TIMEOUT_S)
        except Exception as exc:  # listen failed (port in use, bad host) or the loop did not come up
            self._stop_loop(loop, thread)
            reason = _bind_problem(self.cfg.host, self.cfg.port) or str(exc)
            self._start_error = reason
            raise OutputError(f"modbus {self.cfg.host}:{self.cfg.port}: cannot start server: {reason}") from exc
        self._loop, self._thread = loop, thread
        self._start_error = None

    def close(self) -> None:
        with self._lock:
            self._coils = [False] * STATION_REGISTERS
            self._registers[HR_VERDICT] = VERDICT_NONE
        loop, thread, server = self._loop, self._thread, self._server
        self._loop = self._thread = self._server = None
        if loop is None or thread is None:
            return
        if server is not None:
            try:
                asyncio.run_coroutine_threadsafe(server.shutdown(), loop).result(_START_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - stopping the loop below closes the listener anyway
                pass
        self._stop_loop(loop, thread)

    # -- Output ----------------------------------------------------------------------------------------------
    def publish(self, result: InspectionResult) -> None:
        inspected_ok = result.verdict is Verdict.OK
        with self._lock:
            self._last_faulted = result.verdict is Verdict.FAULT
            self._coils[COIL_OK] = inspected_ok
            self._coils[COIL_NG] = result.verdict is Verdict.NG
            self._coils[COIL_REVIEW] = result.verdict is Verdict.REVIEW
            self._coils[COIL_BUSY] = False
            self._registers[HR_VERDICT] = {Verdict.OK: VERDICT_OK, Verdict.NG: VERDICT_NG,
                                           Verdict.REVIEW: VERDICT_REVIEW}.get(result.verdict, VERDICT_NONE)
            frame = result.frame_id & 0xFFFFFFFF
            self._registers[HR_FRAME_HI] = frame >> 16
            self._registers[HR_FRAME_LO] = frame & 0xFFFF
            inspected = result.verdict is not Verdict.FAULT
            self._registers[HR_SCORE] = _scaled(result.score) if inspected else 0
            self._registers[HR_NORM] = _scaled(result.normalized_score) if inspected else 0
            self._update_fault_locked()
        self._check_running()

    def begin_part(self, frame_id: int) -> None:
        with self._lock:
            self._withdraw_locked()
            self._last_faulted = False
            self._coils[COIL_BUSY] = True
            self._update_fault_locked()
        self._check_running()

    def acknowledge(self) -> None:
        with self._lock:
            self._withdraw_locked()

    def set_ready(self, ready: bool) -> None:
        with self._lock:
            self._coils[COIL_READY] = bool(ready)
            if not ready:
                self._drop_ok_locked()
                self._coils[COIL_BUSY] = False
        self._check_running()   # a server that never listened (port taken) tells the PLC nothing: a failure

    def set_fault(self, reason: str | None) -> None:
        with self._lock:
            self._station_fault = reason is not None
            if reason is not None:
                self._drop_ok_locked()
            self._update_fault_locked()
        self._check_running()

    def heartbeat(self) -> None:
        with self._lock:
            self._registers[HR_HEARTBEAT] = (self._registers[HR_HEARTBEAT] + 1) & 0xFFFF

    # -- for the daemon and tests ----------------------------------------------------------------------------
    def recipe_changed(self, number: int, name: str, status: str, ms: float | None, error: str | None) -> None:
        """Registers 7-8: the recipe and where its switch stands (edge_runtime/recipes.py RECIPE_STATUS)."""
        from edge_runtime.recipes import RECIPE_STATUS

        with self._lock:
            if number or status != "failed":   # an unknown number keeps showing the recipe in service
                self._registers[HR_RECIPE] = number & 0xFFFF
            self._registers[HR_RECIPE_STATUS] = RECIPE_STATUS.get(status, 0)

    def snapshot(self) -> tuple[list[bool], list[int]]:
        """(coils 0-15, holding registers 0-15) as clients see them now."""
        with self._lock:
            return list(self._coils), list(self._registers)

    def plc_writes(self, after: int) -> list[tuple[int, float, float, int, list[int]]]:
        """(sequence, monotonic, wall, address, values) of each PLC-area write with a sequence number above
        `after`, oldest first (the newest PLC_WRITE_LOG are kept)."""
        with self._lock:
            return [w for w in self._plc_writes if w[0] > after]

    def plc_registers(self) -> list[int]:
        """Holding registers 16-31 as last written by a client (zeros unless allow_writes)."""
        area = self._plc_area
        return [0] * PLC_AREA_SIZE if area is None else list(area[PLC_AREA_START:PLC_AREA_START + PLC_AREA_SIZE])

    # -- internals -------------------------------------------------------------------------------------------
    def _withdraw_locked(self) -> None:
        self._coils[COIL_OK] = self._coils[COIL_NG] = self._coils[COIL_REVIEW] = False
        self._registers[HR_VERDICT] = VERDICT_NONE

    def _drop_ok_locked(self) -> None:
        self._coils[COIL_OK] = False
        if self._registers[HR_VERDICT] == VERDICT_OK:
            self._registers[HR_VERDICT] = VERDICT_NONE

    def _update_fault_locked(self) -> None:
        code = (FAULT_STATION if self._station_fault else 0) | (FAULT_NOT_INSPECTED if self._last_faulted else 0)
        self._registers[HR_FAULT] = code
        self._coils[COIL_ERROR] = code != 0

    def _check_running(self) -> None:
        thread = self._thread
        if thread is None:
            why = f"its start failed: {self._start_error}" if self._start_error else "not started"
            raise OutputError(f"modbus {self.cfg.host}:{self.cfg.port}: server is not running ({why})")
        if not thread.is_alive():
            raise OutputError(f"modbus {self.cfg.host}:{self.cfg.port}: server thread stopped; PLCs see stale data")

    @staticmethod
    def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            loop.close()

    @staticmethod
    def _stop_loop(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
        async def _cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(_cancel_all(), loop).result(_START_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - best effort; the loop is stopped regardless
            pass
        loop.call_soon_threadsafe(loop.stop)
        thread.join(_START_TIMEOUT_S)

    async def _serve(self) -> None:
        # pymodbus 3.16: a SimDevice with 4 separate blocks (coils, discrete inputs, holding, input registers)
        # replaces the deprecated ModbusDeviceContext; the action hook serves our state and vets writes.
        from pymodbus.server import ModbusTcpServer
        from pymodbus.simulator import DataType, SimData, SimDevice

        def bits(count: int) -> list:
            return [SimData(0, count=count, values=False, datatype=DataType.BITS)]

        def registers(count: int) -> list:
            return [SimData(0, count=count, values=0, datatype=DataType.REGISTERS)]

        devices = [SimDevice(id=self.cfg.unit_id, action=self._on_access,
                             simdata=(bits(STATION_REGISTERS), bits(STATION_REGISTERS),
                                      registers(PLC_AREA_START + PLC_AREA_SIZE), registers(STATION_REGISTERS)))]
        if self.cfg.unit_id != 0:
            # Unit id 0 in pymodbus catches every other id: answer those with "gateway target did not respond"
            # instead of an internal error.
            devices.append(SimDevice(id=0, action=self._on_unknown_unit, simdata=(bits(16), bits(16),
                                                                                registers(1), registers(1))))
        server = _bounded_server_class()(devices, address=(self.cfg.host, self.cfg.port),
                                         max_connections=self.cfg.max_connections,
                                         idle_timeout_s=self.cfg.idle_timeout_s,
                                         clients=ClientFilter(self.cfg.client_networks(), "modbus"))
        await server.serve_forever(background=True)
        self._server = server

    def connection_count(self) -> int:
        """Client connections the server holds now (bounded by max_connections)."""
        server = self._server
        return len(server.active_connections) if server is not None else 0

    async def _on_unknown_unit(self, func_code, start_address, address, count, current, set_values):
        from pymodbus.constants import ExcCodes

        return ExcCodes.GATEWAY_NO_RESPONSE

    async def _on_access(self, func_code: int, start_address: int, address: int, count: int,
                         current: list[int], set_values: list | None):
        """pymodbus SimDevice action: runs on the server loop for every request, before it is answered."""
        from pymodbus.constants import ExcCodes

        if func_code in _WRITE_FUNCTIONS and set_values is not None:
            if not self.cfg.allow_writes:
                return ExcCodes.ILLEGAL_FUNCTION
            if not self._writers.admits(_PEER.get()):
                # A client admitted to read is not the PLC: probe 79, a second client switched the recipe.
                return ExcCodes.ILLEGAL_FUNCTION
            is_register_write = func_code in {6, 16, 22, 23}
            if not is_register_write or address < PLC_AREA_START or address + count > PLC_AREA_START + PLC_AREA_SIZE:
                return ExcCodes.ILLEGAL_ADDRESS
            self._plc_area = current
            values = [int(v) for v in set_values[:count]]
            # Writes that change something (a PLC that writes its whole area every cycle would otherwise push a
            # change out of the bounded log before the line reads it), whatever the function: pymodbus hands the
            # final values here for a mask write (22) and the write half of read/write multiple (23) too.
            if values != [int(v) for v in current[address:address + count]]:
                with self._lock:
                    self._plc_write_seq += 1
                    self._plc_writes.append((self._plc_write_seq, time.monotonic(), time.time(), address, values))
            return None
        with self._lock:
            coils, regs = list(self._coils), list(self._registers)
        if func_code in _READ_BITS or func_code in {5, 15}:
            # Bit blocks are packed 16 coils per register, coil 0 in bit 0.
            current[0] = sum(1 << i for i, on in enumerate(coils) if on)
        else:
            current[0:STATION_REGISTERS] = regs
            if func_code in {3, 6, 16, 22, 23}:
                self._plc_area = current
        return None


def _bounded_server_class():
    """ModbusTcpServer with bounded connections and idle time (pymodbus 3.16 has neither option).

    Each connection costs a file descriptor; unbounded, a flood of idle clients exhausts the daemon's
    descriptors and the camera or result log fails next. Over `max_connections` a new client is closed at once,
    so PLCs already connected (and polling) keep their connection through a flood; a client silent for
    `idle_timeout_s` is closed by a sweep on the server loop, which frees slots held by stale or idle sockets.
    When full, a newcomer takes the slot of the connection silent the longest if that one has been silent for
    half of idle_timeout_s, so a PLC reconnecting after a cable fault waits at most that long, not the full idle
    timeout, behind a flood of idle sockets. Only a complete request counts as activity: bytes that never make
    one (a header dripped a byte at a time) keep no slot."""
    from pymodbus.server import ModbusTcpServer
    from pymodbus.server.requesthandler import ServerRequestHandler

    class _Handler(ServerRequestHandler):
        def __init__(self, *args) -> None:
            super().__init__(*args)
            self.last_activity = asyncio.get_running_loop().time()

        def connection_made(self, transport) -> None:
            server = self.server
            peer = transport.get_extra_info("peername")
            if not server.clients.admits(peer[0] if peer else None):
                server.active_connections.pop(self.unique_id, None)
                transport.close()
                return
            if len(server.active_connections) > server.max_connections:
                # Full: the connection silent the longest makes room if it has been silent for evict_idle_s (half
                # the idle timeout); else the newcomer is refused. Thirty idle sockets had locked a PLC that
                # reconnected out for up to idle_timeout_s.
                now = asyncio.get_running_loop().time()
                others = [h for h in server.active_connections.values() if h is not self]
                idlest = min(others, key=lambda h: h.last_activity, default=None)
                if idlest is not None and now - idlest.last_activity >= server.evict_idle_s:
                    server.evicted += 1
                    idlest.close()
                else:
                    server.rejected += 1
                    server.active_connections.pop(self.unique_id, None)
                    transport.close()
                    return
            self.last_activity = asyncio.get_running_loop().time()
            self.peer = peer[0] if peer else None
            super().connection_made(transport)
            server.start_sweeper()

        async def handle_request(self):
            _PEER.set(getattr(self, "peer", None))   # this request's task only: the action hook reads it
            await super().handle_request()

        def callback_data(self, data: bytes, addr: tuple | None = None) -> int:
            used = super().callback_data(data, addr)
            if self.last_pdu is not None:
                # Activity is a whole request, not a byte: a client dripping a header that never completes (one
                # byte every few seconds) had kept all 8 slots "active" and a reconnecting PLC out for ever.
                self.last_activity = asyncio.get_running_loop().time()
            return used

    class _BoundedServer(ModbusTcpServer):
        def __init__(self, *args, max_connections: int, idle_timeout_s: float, clients: ClientFilter,
                     **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.clients = clients
            self.max_connections = max_connections
            self.idle_timeout_s = idle_timeout_s
            self.evict_idle_s = EVICT_IDLE_SHARE * idle_timeout_s
            self.rejected = 0
            self.evicted = 0
            self._sweeper: asyncio.Task | None = None

        def callback_new_connection(self):
            return _Handler(self, self.trace_packet, self.trace_pdu, self.trace_connect)

        def start_sweeper(self) -> None:
            if self._sweeper is None or self._sweeper.done():
                self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

        async def _sweep(self) -> None:
            # Runs while clients are connected; checks a few times per idle period.
            period = min(1.0, self.idle_timeout_s / 4)
            while self.active_connections:
                await asyncio.sleep(period)
                cutoff = asyncio.get_running_loop().time() - self.idle_timeout_s
                for handler in list(self.active_connections.values()):
                    if handler.last_activity < cutoff:
                        handler.close()

    return _BoundedServer
