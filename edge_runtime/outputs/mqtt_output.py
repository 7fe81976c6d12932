"""MQTT output: every inspection record to a plant broker (QoS 1, store-and-forward), station state retained.

Topics (`topic_prefix` names the station, e.g. `acme/plant1/line3/station7`; see README "MQTT"):

    <prefix>/result   one message per part, QoS `qos` (1), not retained: the result-log record, byte for byte
    <prefix>/state    retained, QoS 1: {"online", "state", "reason", "bundle_id", "counters", "outbox", ...};
                      published on connect (birth), on every change and every `state_interval_s`; the broker
                      publishes the last will {"online": false, "state": "offline"} when the station dies
    <prefix>/cmd/#    commands to the station (subscribed only when a handler is bound, e.g. signed rollout)

Store-and-forward: publish() (called by the output bus; it never waits on disk or network) hands the record to
an outbox writer thread and returns; the writer commits every record waiting in one transaction (group
commit: one fsync per batch, not per record) to a bounded sqlite outbox (edge_runtime/outputs/mqtt_outbox.py),
and only committed records are ever sent. One sender thread keeps a
window of up to `max_inflight` records published and deletes each from the outbox only on its PUBACK, so records
wait on disk while the broker is down or slow and leave in order when it is back. A fresh paho client is made for
every connection, so on a reconnect nothing is resent from paho's memory: the outbox is the one source, and the
unacknowledged window is republished in order. Duplicates are therefore only those QoS 1 allows (the broker got a
record, its PUBACK was lost): consumers de-duplicate on (topic prefix, frame_id), which is unique and increasing
per station (edge_runtime/frame_counter.py never reuses an id).

A full outbox drops its oldest records: counted (edge_mqtt_outbox_dropped_total, "outbox.dropped" in the state
message) and logged. paho-mqtt is imported only when the output starts.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal

from edge_runtime.outputs.base import OUTPUTS, Output, OutputError
from edge_runtime.outputs.mqtt_outbox import Outbox
from edge_runtime.outputs.result_log import encode_record
from edge_runtime.records import InspectionResult, Verdict

log = logging.getLogger(__name__)

_TOPIC_FORBIDDEN = set("+#\0")
# A connection the broker drops this soon after it began, SHORT_SESSIONS_TO_WARN times in a row, looks like another
# client taking the client id over (mosquitto drops the older session at once; both reconnect within a second).
SHORT_SESSION_S = 10.0
SHORT_SESSIONS_TO_WARN = 3


@dataclass(kw_only=True)
class MqttConfig:
    type: Literal["mqtt"] = "mqtt"
    host: str
    port: int = 1883                          # 8883 is the usual TLS port
    topic_prefix: str                         # e.g. acme/plant1/line3/station7: every topic starts with it
    client_id: str | None = None              # None: "edge-" + topic_prefix with "/" as "-" (unique per station)
    qos: Literal[0, 1] = 1                    # 1: at least once (store-and-forward needs the PUBACK); 0: fire and forget
    keepalive_s: int = 30                     # the broker declares the station dead (last will) after 1.5 x this
    tls_ca: str | None = None                 # CA file: TLS on when set
    tls_cert: str | None = None               # client certificate (mutual TLS), with tls_key
    tls_key: str | None = None
    username: str | None = None
    password_file: str | None = None          # the password, first line of this file (kept out of the station file)
    outbox: str | None = None                 # sqlite file; None: <state_dir>/mqtt-outbox.sqlite
    outbox_max_records: int = 100_000         # a full outbox drops its oldest record (counted, reported)
    outbox_fsync: bool = True                 # false: faster on SD cards; the last records may be lost on power cut
    max_inflight: int = 64                    # records published and not yet acknowledged
    state_interval_s: float = 10.0            # state (counters) republished at least this often
    reconnect_min_s: float = 0.5              # reconnect backoff: first wait, doubled up to the maximum
    reconnect_max_s: float = 10.0
    connect_timeout_s: float = 5.0
    close_timeout_s: float = 2.0              # on stop, wait this long for the outbox to drain (the rest stays queued)

    def validate(self) -> None:
        if not self.host:
            raise ValueError("host: must not be empty")
        if isinstance(self.qos, bool):
            raise ValueError(f"qos: expected 0 or 1, got {self.qos}")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port: must be 1..65535, got {self.port}")
        if not self.topic_prefix or self.topic_prefix.startswith("/") or self.topic_prefix.endswith("/"):
            raise ValueError(f"topic_prefix: expected a topic like 'plant/line/station' (no leading or trailing "
                             f"'/'), got {self.topic_prefix!r}")
        if _TOPIC_FORBIDDEN & set(self.topic_prefix):
            raise ValueError(f"topic_prefix: must not contain '+', '#' or NUL, got {self.topic_prefix!r}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert: tls_cert and tls_key go together (mutual TLS needs both)")
        if self.tls_cert is not None and self.tls_ca is None:
            raise ValueError("tls_ca: a client certificate needs tls_ca (TLS is on only with a CA file)")
        if self.password_file is not None and self.username is None:
            raise ValueError("password_file: needs username")
        if self.outbox_max_records < 1:
            raise ValueError(f"outbox_max_records: must be >= 1, got {self.outbox_max_records}")
        if not 1 <= self.max_inflight <= 1000:
            raise ValueError(f"max_inflight: must be 1..1000, got {self.max_inflight}")
        # At most 65535: CONNECT carries it in two bytes (probe 102: 100000 validated, then every connect failed
        # with paho's "'H' format requires 0 <= number <= 65535" and no record was ever sent).
        if not 5 <= self.keepalive_s <= 65535:
            raise ValueError(f"keepalive_s: must be 5..65535, got {self.keepalive_s}")
        if self.state_interval_s <= 0:
            raise ValueError(f"state_interval_s: must be > 0, got {self.state_interval_s}")
        if not 0 < self.reconnect_min_s <= self.reconnect_max_s:
            raise ValueError(f"reconnect_min_s: need 0 < reconnect_min_s <= reconnect_max_s, got "
                             f"{self.reconnect_min_s} and {self.reconnect_max_s}")
        if self.connect_timeout_s <= 0 or self.close_timeout_s < 0:
            raise ValueError("connect_timeout_s: must be > 0 (and close_timeout_s >= 0)")
        # Each is a thread wait (Event.wait, Thread.join), which raises OverflowError past threading.TIMEOUT_MAX
        # (~292 years): a huge one passed validate, then every connect failed and stopping logged a traceback.
        for key, limit in (("connect_timeout_s", 60.0), ("close_timeout_s", 60.0), ("reconnect_max_s", 3600.0)):
            if getattr(self, key) > limit:
                raise ValueError(f"{key}: must be at most {limit:g} s, got {getattr(self, key):g}")

    def resolve_paths(self, absolute: Callable[[str, str], str], where: str, state_dir: str) -> None:
        """Make file paths absolute (relative to the station file); the outbox defaults into the state dir."""
        for key in ("tls_ca", "tls_cert", "tls_key", "password_file", "outbox"):
            value = getattr(self, key)
            if value:
                setattr(self, key, absolute(f"{where}.{key}", value))
        if not self.outbox:
            self.outbox = os.path.join(state_dir, "mqtt-outbox.sqlite")

    def warnings(self) -> list[str]:
        if self.tls_ca is None and self.host not in ("127.0.0.1", "::1", "localhost"):
            if self.username:
                return [f"tls_ca: not set: the password for {self.username!r} crosses the network to {self.host} "
                        "in clear text"]
            return [f"tls_ca: not set: results go to {self.host} unencrypted and the broker is not authenticated"]
        return []

    @property
    def effective_client_id(self) -> str:
        return self.client_id or "edge-" + self.topic_prefix.replace("/", "-")


CommandHandler = Callable[[str, bytes], None]   # (sub-topic after <prefix>/cmd/, payload)
StateProvider = Callable[[], dict[str, Any]]


def online_state(ready: bool, fault: str | None, provider: StateProvider | None, name: str) -> dict[str, Any]:
    """The retained state message while online: ready / not_ready / fault, plus what the state provider adds."""
    state = "fault" if fault else ("ready" if ready else "not_ready")
    msg: dict[str, Any] = {"online": True, "state": state, "reason": fault, "time": time.time()}
    if provider is not None:
        try:
            msg.update(provider())
        except Exception:  # noqa: BLE001 - a broken provider must not stop the sender
            log.exception("%s: state provider failed", name)
    return msg


def state_news(holder, result: InspectionResult) -> bool:
    """Whether `result` changes what the retained state says, so it goes out at once rather than at the next
    state_interval_s: a bundle switch or rollback, or a part that is not OK after an OK one (the state's
    last_verdict said OK for up to state_interval_s after a FAULT, probe 111's note). `holder` keeps
    _last_bundle_id and _last_passed."""
    news = result.bundle_id != holder._last_bundle_id or (holder._last_passed and result.verdict is not Verdict.OK)
    holder._last_bundle_id, holder._last_passed = result.bundle_id, result.verdict is Verdict.OK
    return news


@OUTPUTS.register(MqttConfig)
class MqttOutput(Output):
    """Publishes records and state to a broker; see the module docstring. Never raises from publish() for a
    broker problem (records wait in the outbox); raises OutputError only when the outbox itself cannot be written."""

    role = "record"
    # Not `slow`: publish() only appends to a memory queue (the fsync is on the writer thread), so the bus calls
    # it inline and no record can be dropped from a bus worker queue in a burst.
    slow = False

    def __init__(self, cfg: MqttConfig) -> None:
        self.cfg = cfg
        self.name = f"mqtt:{cfg.host}:{cfg.port}/{cfg.topic_prefix}"
        self.result_topic = f"{cfg.topic_prefix}/result"
        self.state_topic = f"{cfg.topic_prefix}/state"
        self.cmd_topic = f"{cfg.topic_prefix}/cmd"
        self.outbox: Outbox | None = None
        self._state_provider: StateProvider | None = None
        self._command_handler: CommandHandler | None = None
        self._ready = False
        self._fault: str | None = "starting"
        self._state_dirty = threading.Event()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._acks: collections.deque[tuple[int, int]] = collections.deque()   # (session, mid) from paho's thread
        self._session = 0
        self._connected = False
        self._thread: threading.Thread | None = None
        self.published = 0            # records acknowledged by the broker
        self.reconnects = 0           # connections made after the first
        self.ignored_retained = 0     # retained commands the broker replayed, or empty ones (deleting a retained
        #                               command), not acted on
        self.connections = 0
        self._connected_since = 0.0       # time.monotonic() of the last connect
        self._short_sessions = 0          # connections in a row that the broker dropped soon after they began
        self._takeover_logged_at = -1e9
        self.last_error: str | None = None
        self._drop_logged_at = 0.0
        # (payload, queued_at, line tag), not yet committed; the tag is '' here, a line's name in StationMqtt.
        self._pending: collections.deque[tuple[bytes, float, str]] = collections.deque()
        self._pending_cond = threading.Condition()
        self._writer: threading.Thread | None = None
        self._writer_stop = False
        self.pending_dropped = 0
        self._front_dropped = 0           # records _enqueue dropped from the queue's front since the writer's batch
        self._last_bundle_id: str | None = None
        self._last_passed = False   # the last part published was OK (publish: the state follows a non-OK)
        self.outbox_errors = 0

    # -- wiring (the daemon) -----------------------------------------------------------------------------------
    def bind_state(self, provider: StateProvider) -> None:
        """A callable returning the station's state for <prefix>/state (bundle, counters); called on the sender."""
        self._state_provider = provider

    def bind_commands(self, handler: CommandHandler) -> None:
        """Subscribe to <prefix>/cmd/# and pass each command to `handler` (on paho's network thread: be quick)."""
        self._command_handler = handler

    # -- Output ------------------------------------------------------------------------------------------------
    def start(self) -> None:
        try:
            import paho.mqtt.client  # noqa: F401 - fail at start with a clear message, not in the sender
        except ImportError as exc:
            raise OutputError(f"{self.name}: paho-mqtt is not installed (pip install 'patchcore-edge[io]')") from exc
        assert self.cfg.outbox, "resolve_paths() sets the outbox path"
        for key in ("tls_ca", "tls_cert", "tls_key", "password_file"):
            path = getattr(self.cfg, key)
            if path and not os.access(path, os.R_OK):   # say it once, naming the key, not on every reconnect
                raise OutputError(f"{self.name}: {key} {path}: cannot read it")
        for warning in self.cfg.warnings():
            log.warning("%s: %s", self.name, warning)
        try:
            self.outbox = Outbox(self.cfg.outbox, self.cfg.outbox_max_records, fsync=self.cfg.outbox_fsync)
        except Exception as exc:  # sqlite3.Error, OSError
            raise OutputError(f"{self.name}: outbox {self.cfg.outbox}: cannot open: {exc}") from exc
        foreign = self._foreign_records()
        if foreign is not None:
            self.outbox.close()
            self.outbox = None
            raise OutputError(f"{self.name}: outbox {self.cfg.outbox}: {foreign}; deliver them from a station with "
                              "that configuration, or move the outbox away to drop them")
        if len(self.outbox):
            log.info("%s: %d records from before the restart wait in the outbox", self.name, len(self.outbox))
        self._stop.clear()
        self._writer_stop = False
        self._writer = threading.Thread(target=self._write, name="mqtt-outbox", daemon=True)
        self._writer.start()
        self._thread = threading.Thread(target=self._run, name="mqtt-sender", daemon=True)
        self._thread.start()

    def publish(self, result: InspectionResult) -> None:
        """Hand the record to the outbox writer (group commit: one fsync for all records waiting); returns at once."""
        if self.outbox is None:
            raise OutputError(f"{self.name}: not started")
        if state_news(self, result):
            self._state_changed()
        self._enqueue(result, "")

    def _enqueue(self, result: InspectionResult, line: str) -> None:
        """Hand one record, tagged with its line, to the outbox writer."""
        if self.outbox is None:
            raise OutputError(f"{self.name}: not started")
        payload = encode_record(result).rstrip(b"\n")
        with self._pending_cond:
            if len(self._pending) >= self.cfg.outbox_max_records:   # the disk itself is stuck: bound the memory
                self._pending.popleft()
                self.pending_dropped += 1
                self._front_dropped += 1
                self._log_drop()
            self._pending.append((payload, time.time(), line))
            self._pending_cond.notify()

    def _log_drop(self) -> None:
        now = time.monotonic()
        if now - self._drop_logged_at > 10.0:   # a long outage would otherwise log once per part
            self._drop_logged_at = now
            log.error("%s: outbox full (%d records): oldest dropped, %d lost so far", self.name,
                      self.cfg.outbox_max_records, self.dropped)

    def wait_committed(self, timeout: float) -> bool:
        """Block until every record publish() accepted is on disk (tests, benchmarks); False on timeout."""
        deadline = time.monotonic() + timeout
        while self._pending and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self._pending

    @property
    def dropped(self) -> int:
        return self.pending_dropped + (self.outbox.counters.dropped if self.outbox is not None else 0)

    def queued(self) -> int:
        """Records not yet acknowledged by the broker: on disk plus those waiting for the next commit."""
        return (len(self.outbox) if self.outbox is not None else 0) + len(self._pending)

    def _write(self) -> None:
        """The outbox writer thread: commits what publish() handed over, oldest first, then wakes the sender."""
        assert self.outbox is not None
        while True:
            with self._pending_cond:
                self._pending_cond.wait_for(lambda: self._pending or self._writer_stop)
                if not self._pending and self._writer_stop:
                    return
                batch = list(self._pending)
                self._front_dropped = 0
            try:
                dropped = self.outbox.append_many(batch)
            except Exception as exc:  # noqa: BLE001 - sqlite3.Error (disk full, I/O error): keep them, retry
                self.outbox_errors += 1
                self._note_error(f"outbox {self.cfg.outbox}: cannot write ({exc}); {len(batch)} records held in memory")
                with self._pending_cond:
                    if self._writer_stop:
                        return
                    self._pending_cond.wait(1.0)
                continue
            with self._pending_cond:
                # Records dropped from the queue's front during the commit were the batch's oldest, written all
                # the same: remove only the rest of the batch, never the records queued after it (probe 111: three
                # records queued during the commit on a full queue were removed unwritten, lost uncounted).
                written = min(self._front_dropped, len(batch))
                self.pending_dropped -= written
                for _ in range(len(batch) - written):
                    self._pending.popleft()
            if dropped:
                self._log_drop()
            self._wake.set()

    def set_ready(self, ready: bool) -> None:
        if ready != self._ready:
            self._ready = ready
            self._state_changed()

    def set_fault(self, reason: str | None) -> None:
        if reason != self._fault:
            self._fault = reason
            self._state_changed()

    def close(self) -> None:
        """Drain the outbox for up to close_timeout_s, say offline (a clean disconnect sends no last will), stop."""
        if self._writer is not None:
            with self._pending_cond:
                self._writer_stop = True
                self._pending_cond.notify()
            self._writer.join(10.0)   # what publish() accepted is on disk before we stop
            self._writer = None
            if self._pending:   # the outbox could not be written (disk full): these are lost, say so (probe 111)
                log.error("%s: %d records could not be written to the outbox %s and are lost for the broker (the "
                          "result log has them, if it could write)", self.name, len(self._pending), self.cfg.outbox)
        if self._thread is not None:
            self._stop.set()
            self._wake.set()
            self._thread.join(self.cfg.close_timeout_s + self.cfg.connect_timeout_s + 2.0)
            self._thread = None
        if self.outbox is not None:
            if len(self.outbox):
                log.warning("%s: %d records stay in the outbox for the next start", self.name, len(self.outbox))
            self.outbox.close()
            self.outbox = None

    def counters(self) -> dict[str, float]:
        return {"mqtt_published": self.published, "mqtt_reconnects": self.reconnects,
                "mqtt_outbox_dropped": self.dropped, "mqtt_outbox_errors": self.outbox_errors,
                "mqtt_retained_commands_ignored": self.ignored_retained}

    # -- what the state message says ---------------------------------------------------------------------------
    def state_message(self, online: bool = True) -> dict[str, Any]:
        if not online:
            return {"online": False, "state": "offline", "time": time.time()}
        msg = online_state(self._ready, self._fault, self._state_provider, self.name)
        if self.outbox is not None:
            oldest = self.outbox.oldest_queued_at()
            msg["outbox"] = {"queued": self.queued(), "dropped": self.dropped,
                             "oldest_age_s": None if oldest is None else round(time.time() - oldest, 3)}
        return msg

    def _state_changed(self) -> None:
        self._state_dirty.set()
        self._wake.set()

    # -- the sender thread -------------------------------------------------------------------------------------
    def _run(self) -> None:
        backoff, failing = self.cfg.reconnect_min_s, False
        while not self._stop.is_set():
            client = None
            try:
                client = self._connect()
            except Exception as exc:  # noqa: BLE001 - refused, DNS, TLS: wait and retry, never give up
                self._note_error(f"connect failed: {exc}")
            if client is not None:
                try:
                    self._serve(client)
                    backoff, failing = self.cfg.reconnect_min_s, False
                except Exception:  # noqa: BLE001 - sqlite3.Error reading the outbox (I/O error): had killed the
                    # sender for good, the connection kept open saying ready (probe 111); drop it, reconnect after
                    # the backoff (growing: not a traceback every half second while the disk stays broken)
                    if not failing:
                        log.exception("%s: sender failed; reconnecting", self.name)
                    failing = True
                    self.last_error = "sender failed"
                self._teardown(client)
                if self._stop.is_set():
                    return
            # Wait before the next try; records keep queueing on disk meanwhile.
            self._stop.wait(backoff)
            backoff = min(backoff * 2, self.cfg.reconnect_max_s)

    def _note_error(self, message: str) -> None:
        if message != self.last_error:
            log.warning("%s: %s", self.name, message)
        self.last_error = message

    def _connect(self):
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        cfg = self.cfg
        self._session += 1
        session = self._session
        connected = threading.Event()
        result: dict[str, Any] = {}
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cfg.effective_client_id,
                             protocol=mqtt.MQTTv311, clean_session=True)
        # Only what the window holds: paho's own queue would resend from memory on reconnect, out of our order.
        client.max_inflight_messages_set(cfg.max_inflight + 2 + 2 * self._state_topics())  # + state messages
        will_topic, will_payload = self._will()
        client.will_set(will_topic, will_payload, qos=1, retain=True)
        if cfg.username:
            password = None
            if cfg.password_file:
                with open(cfg.password_file, encoding="utf-8") as fh:
                    password = fh.readline().rstrip("\r\n")
            client.username_pw_set(cfg.username, password)
        if cfg.tls_ca:
            client.tls_set(ca_certs=cfg.tls_ca, certfile=cfg.tls_cert, keyfile=cfg.tls_key)

        def on_connect(_c, _u, _flags, reason_code, _props):
            result["rc"] = reason_code
            connected.set()

        def on_disconnect(_c, _u, _flags, reason_code, _props):
            if session == self._session:
                self._connected = False
                result.setdefault("disconnect", str(reason_code))
                self._wake.set()

        def on_publish(_c, _u, mid, _reason_code, _props):
            # paho's network thread, with paho's locks held: only hand the mid over (deque.append is atomic).
            self._acks.append((session, mid))
            self._wake.set()

        def on_message(_c, _u, msg):
            if msg.retain:
                # A retained command is the broker replaying an old order on every (re)connect: a trigger, a
                # recipe or a rollout nobody asked for now. Commands count only when sent live.
                self.ignored_retained += 1
                log.warning("%s: retained command on %s ignored (commands are acted on only when sent live; clear "
                            "it with an empty retained message)", self.name, msg.topic)
                return
            if not msg.payload:
                # An empty message is MQTT's way of deleting a retained one, and a subscriber already there gets
                # it live (retain flag cleared), like every message: clearing a retained trigger as the warning
                # above says had fired a second capture, a record for a part nobody triggered (probe 65). No
                # command is empty (a trigger's payload may be anything else, e.g. {"id": ...}).
                self.ignored_retained += 1
                log.warning("%s: empty message on %s ignored (it deletes a retained command; a command needs a "
                            "payload)", self.name, msg.topic)
                return
            try:
                self._on_command(msg.topic, bytes(msg.payload))
            except Exception:  # noqa: BLE001
                log.exception("%s: command %s failed", self.name, msg.topic)

        client.on_connect, client.on_disconnect = on_connect, on_disconnect
        client.on_publish, client.on_message = on_publish, on_message
        client.connect_timeout = cfg.connect_timeout_s
        try:
            client.connect(cfg.host, cfg.port, keepalive=cfg.keepalive_s)
        except (OSError, socket.timeout) as exc:
            raise ConnectionError(f"{cfg.host}:{cfg.port}: {exc}") from None
        client.loop_start()
        if not connected.wait(cfg.connect_timeout_s) or result["rc"].is_failure:
            rc = result.get("rc")
            client.loop_stop()
            client.disconnect()
            raise ConnectionError(f"{cfg.host}:{cfg.port}: broker refused: {rc}" if rc else
                                  f"{cfg.host}:{cfg.port}: no CONNACK within {cfg.connect_timeout_s:g} s")
        self._connected = True
        self._connected_since = time.monotonic()
        self.connections += 1
        if self.connections > 1:
            self.reconnects += 1
        if self.last_error:
            log.info("%s: connected (after: %s); %d records queued", self.name, self.last_error,
                     len(self.outbox) if self.outbox else 0)
        self.last_error = None
        for topic in self._subscriptions():
            client.subscribe(topic, qos=1)
        return client

    def _foreign_records(self) -> str | None:
        """Why the queued records are not this output's to publish, or None: queued under another topic prefix,
        or tagged by line (a multi-line station's) while this output publishes every record as <prefix>/result."""
        assert self.outbox is not None
        other = self.outbox.claim(self.cfg.topic_prefix)
        if other is not None:
            return (f"its {len(self.outbox)} records were queued under topic_prefix {other!r}, not this station's "
                    f"{self.cfg.topic_prefix!r}")
        tagged = sorted(t for t in self.outbox.line_tags() if t)
        if tagged and not self._publishes_line_tags():
            return (f"its records belong to lines {', '.join(tagged[:5])} of a multi-line station, and this station "
                    "would publish them all as its one line's results")
        return None

    def _publishes_line_tags(self) -> bool:
        """True where records tagged by line go to their line's topic (the station's shared connection)."""
        return False

    # -- what a subclass (the station's shared connection, mqtt_station.py) changes ---------------------------
    def _will(self) -> tuple[str, str]:
        """The last will (topic, payload): the broker publishes it, retained, when the connection dies. It is
        written at connect, so it cannot say when the station died: it says when it connected (`connected_at`),
        never a `time` a consumer would read as 'offline since'."""
        msg = self.state_message(online=False)
        msg["connected_at"] = msg.pop("time", time.time())
        return self.state_topic, json.dumps(msg)

    def _subscriptions(self) -> list[str]:
        return [self.cmd_topic + "/#"] if self._command_handler is not None else []

    def _on_command(self, topic: str, payload: bytes) -> None:
        """A message on a subscribed topic (paho's network thread: be quick)."""
        handler = self._command_handler
        if handler is not None and topic.startswith(self.cmd_topic + "/"):
            handler(topic[len(self.cmd_topic) + 1:], payload)

    def _result_topic(self, line: str) -> str:
        return self.result_topic

    def _acknowledged(self, lines: list[str]) -> None:
        """Records of these lines (one tag per record) were acknowledged by the broker."""

    def _serve(self, client) -> None:
        """Publish from the outbox while connected: a window of max_inflight records, deleted on their PUBACK."""
        assert self.outbox is not None
        cfg = self.cfg
        inflight: dict[int, tuple[int, str]] = {}     # mid -> (seq, line)
        last_sent = 0                     # seq of the last record handed to this connection
        next_state = 0.0
        stopping_at: float | None = None
        goodbye: list = []                # the offline state messages of a clean stop (paho MessageInfo)
        self._state_dirty.set()           # birth: the retained state says online as soon as we are connected
        session = self._session
        acked: list[tuple[int, str]] = []   # acknowledged by the broker, not yet deleted from the outbox
        while self._connected:
            self._wake.clear()
            while self._acks:
                s, mid = self._acks.popleft()
                if s == session and mid in inflight:
                    acked.append(inflight.pop(mid))
            if acked:
                # A delete writes too (the WAL): on a full disk it fails. Keep them and delete them on the next
                # turn; the error had killed the sender thread, nothing was published again until a restart while
                # the retained state still said ready (probe 111).
                try:
                    self.published += self.outbox.ack([seq for seq, _line in acked])
                except Exception as exc:  # noqa: BLE001 - sqlite3.Error: disk full, I/O error
                    self.outbox_errors += 1
                    self._note_error(f"outbox {cfg.outbox}: cannot delete {len(acked)} delivered records ({exc}); "
                                     "retrying")
                else:
                    self._acknowledged([line for _seq, line in acked])
                    acked = []
            if self._stop.is_set():
                if stopping_at is None:
                    stopping_at = time.monotonic()
                    # A clean disconnect sends no last will: the offline states must be out (acknowledged)
                    # before it, or the broker keeps the last "ready"/"not_ready" of each state topic.
                    goodbye = self._publish_state(client, online=False)
                if (not inflight and not self.outbox.peek(last_sent, 1) and all(m.is_published() for m in goodbye)) or \
                        time.monotonic() - stopping_at > cfg.close_timeout_s:
                    return
            now = time.monotonic()
            if self._state_dirty.is_set() or now >= next_state:
                if stopping_at is None:
                    self._state_dirty.clear()
                    self._publish_state(client)
                next_state = now + cfg.state_interval_s
            room = cfg.max_inflight - len(inflight)
            if room > 0:
                for seq, _queued, payload, line in self.outbox.peek(last_sent, room):
                    info = client.publish(self._result_topic(line), payload, qos=cfg.qos)
                    if info.rc != 0:   # the connection went away under us: republish from the outbox later
                        self._connected = False
                        break
                    inflight[info.mid] = (seq, line)
                    last_sent = seq
            self._wake.wait(0.5)
        self._note_error("connection lost" + (f" ({len(inflight)} records unacknowledged, resent on reconnect)"
                                              if inflight else ""))
        if not self._stop.is_set():
            self._note_short_session(time.monotonic() - self._connected_since)

    def _note_short_session(self, lasted_s: float) -> None:
        """A broker drops an MQTT 3.1.1 session without a reason when another client connects with its client id:
        two stations with one topic_prefix (the default client id comes from it) take the connection from each
        other every second or two, their retained states alternating ready / offline / fault for every consumer
        (probe 63). Each side sees only 'connection lost', so say what the pattern means."""
        self._short_sessions = self._short_sessions + 1 if lasted_s < SHORT_SESSION_S else 0
        now = time.monotonic()
        if self._short_sessions >= SHORT_SESSIONS_TO_WARN and now - self._takeover_logged_at > 60.0:
            self._takeover_logged_at = now
            log.error("%s: the broker dropped the connection %d times in a row within %g s of connecting: another "
                      "client with client_id %r is probably taking it over each time (a second station with the "
                      "same topic_prefix or client_id?); give each station its own", self.name,
                      self._short_sessions, SHORT_SESSION_S, self.cfg.effective_client_id)

    def _publish_state(self, client, online: bool = True) -> list:
        """Publish the retained state; returns paho's MessageInfo of each message."""
        payload = json.dumps(self.state_message(online), separators=(",", ":"), default=str)
        return [client.publish(self.state_topic, payload, qos=1, retain=True)]

    def _state_topics(self) -> int:
        """Retained state messages one _publish_state() sends (room for them beside the records in flight)."""
        return 1

    def _teardown(self, client) -> None:
        self._connected = False
        self._session += 1   # late callbacks of this client are ignored
        try:
            client.disconnect()
        except Exception:  # noqa: BLE001
            pass
        client.loop_stop()
        self._acks.clear()
