"""One MQTT connection for every line of a station (the station file's `mqtt:` section, with `lines:`): the station
is the edge node (one client, one last will, one outbox), its lines are its devices, as in Sparkplug B.

Topics (`topic_prefix` names the station; see README "MQTT", several lines):

    <prefix>/state              retained: the node. {"online": true, "state": "online", "lines": [...], "outbox"};
                                last will {"online": false, "state": "offline", "lines": [...]}. Offline implies
                                every line of the station is offline, whatever its own retained state says
                                (Sparkplug: NDEATH implies DDEATH of the node's devices)
    <prefix>/<line>/result      one message per part of that line: the line's result-log record, byte for byte
    <prefix>/<line>/state       retained: the line's state message (as the single-line <prefix>/state, plus "line")
    <prefix>/<line>/cmd/<name>  commands to one line: rollout (rollout enabled), trigger (`allow_trigger` and a
                                `software` trigger), recipe (`allow_recipe` and recipes; payload: name or number)

Every line's output bus holds a LineMqtt (a thin Output) that tags its records with the line's name and hands them
to the StationMqtt; the records of all lines wait in one bounded, ordered sqlite outbox and leave on one
connection in the order they were inspected (so in order per line). A full outbox drops the oldest records
whatever their line, counted per line; publish() never blocks inspection. The connection opens when the first
line's bus starts and closes (draining, lines and node said offline) when the last line's bus closes.
"""
from __future__ import annotations

import collections
import datetime as dt
import json
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from edge_runtime.outputs.base import Output, OutputError
from edge_runtime.safe_yaml import short_repr
from edge_runtime.outputs.mqtt_output import (CommandHandler, MqttConfig, MqttOutput, StateProvider, online_state,
                                               state_news)
from edge_runtime.records import InspectionResult

log = logging.getLogger(__name__)

# Sub-topics of <prefix> the station itself uses: a line with one of these names would be ambiguous to read.
RESERVED_LINE_NAMES = ("state", "result", "cmd")
LINE_COMMANDS = ("rollout", "trigger", "recipe")


@dataclass(kw_only=True)
class StationMqttConfig(MqttConfig):
    """The station file's `mqtt:` section: the broker settings of MqttConfig, once for every line, plus which
    commands a line takes over MQTT (both off by default, like the HTTP and OPC UA triggers)."""

    allow_trigger: bool = False    # <prefix>/<line>/cmd/trigger fires that line's `software` trigger
    allow_recipe: bool = False     # <prefix>/<line>/cmd/recipe (payload: recipe name or number) selects a recipe

    def warnings(self) -> list[str]:
        found = super().warnings()
        allowed = [key for key, on in (("allow_trigger", self.allow_trigger), ("allow_recipe", self.allow_recipe)) if on]
        if allowed and not self.username and not self.tls_cert:
            # The station cannot tell who published a command: only the broker can. A station that connects
            # without credentials is on a broker that takes anonymous clients, so any of them can (probe 65:
            # validate said "valid" with no warning, where the OPC UA server's PrepareRecipe is warned about).
            what = " and ".join(w for key, w in (("allow_trigger", "trigger captures"),
                                                  ("allow_recipe", "change a line's product")) if key in allowed)
            found.append(f"{'/'.join(allowed)}: the station connects to {self.host} without credentials (no "
                         f"username or tls_cert), so the broker takes anonymous clients: any of them can {what} "
                         f"through {self.topic_prefix}/<line>/cmd/; let only the line controller publish there "
                         "(broker ACL) and give the station a username")
        return found


def validate_station_mqtt(mqtt: StationMqttConfig | None, outputs: list, lines: list) -> None:
    """Checks across the station file (StationConfig.validate): where MQTT may be declared, and line names."""
    if mqtt is not None and not lines:
        raise ValueError("mqtt: the station-level section is the shared connection of a station with `lines:`; "
                         "a station without lines lists MQTT in `outputs:` (type: mqtt), as before")
    if not lines:
        return
    for j, out in enumerate(outputs or []):
        if getattr(out, "type", None) == "mqtt":
            raise ValueError(f"outputs[{j}]: with `lines:` the station's one MQTT connection is the `mqtt:` section "
                             f"(every line publishes under <topic_prefix>/<line>/); move this output there")
    for i, ln in enumerate(lines):
        for j, out in enumerate(ln.outputs or []):
            if getattr(out, "type", None) == "mqtt":
                raise ValueError(f"lines[{i}].outputs[{j}]: a line has no MQTT connection of its own: declare it "
                                 f"once in the station's `mqtt:` section, every line publishes under "
                                 f"<topic_prefix>/{ln.name}/")
        if mqtt is not None and ln.name in RESERVED_LINE_NAMES:
            raise ValueError(f"lines[{i}].name: {ln.name!r} is a topic of the station itself under mqtt.topic_prefix "
                             f"({', '.join(RESERVED_LINE_NAMES)}); choose another line name")


# Trigger ids are remembered for this long to refuse a second delivery of the same one: a redelivery follows a
# reconnect, which can take tens of seconds (probe 39: 11 s got a second answer); a PLC counter used as the id must
# not come round within it.
DUPLICATE_WINDOW_S = 60.0
# A bound on memory only, never the window: at 256 ids a line at 4.3 triggers/s forgot an id before 60 s, and a
# redelivery 44 s later was captured and answered OK as a part nobody triggered (probe 70). 16384 ids in 60 s is
# 273 triggers/s, above any line; past it the oldest are forgotten, logged.
RECENT_TRIGGERS = 16384
MAX_TRIGGER_PAYLOAD = 16384
# A sent_at above 1e8 x these is nano-, micro- or milliseconds (Unix seconds are ~1.7e9 now; 1e11 s is the year
# 5138).
SENT_AT_SCALES = (1e9, 1e6, 1e3)
FUTURE_SENT_AT_S = 1.0     # a sent_at further ahead than this is logged (it counts from arrival)


class LineMqtt(Output):
    """One line's view of the station's MQTT connection: an Output on that line's bus. Its records go to
    <prefix>/<line>/result through the shared outbox; its ready/fault and state provider make <prefix>/<line>/state."""

    role = "record"
    slow = False   # publish() only appends to the station's memory queue (the fsync is on its writer thread)

    def __init__(self, station: "StationMqtt", line: str) -> None:
        self.station = station
        self.line = line
        cfg = station.cfg
        self.name = f"mqtt:{cfg.host}:{cfg.port}/{cfg.topic_prefix}/{line}"
        self.state_topic = f"{cfg.topic_prefix}/{line}/state"
        self.result_topic = f"{cfg.topic_prefix}/{line}/result"
        self.open = False
        self.ready = False
        self.fault: str | None = "starting"
        self.published = 0                  # this line's records acknowledged by the broker
        self.commands_refused = 0
        self._state_provider: StateProvider | None = None
        self._handlers: dict[str, CommandHandler] = {}
        self._fire: Callable[..., bool | None] | None = None
        self._recent_triggers: collections.OrderedDict = collections.OrderedDict()  # id -> monotonic, oldest first
        self._withdraw: Callable[[], None] | None = None   # the line's bus.trigger_accepted
        self._recipes = None
        self._last_bundle_id: str | None = None
        self._last_passed = False   # the last part published was OK (state_news)

    # -- wiring: the Line binds these like on a single-line MqttOutput -----------------------------------------
    def bind_state(self, provider: StateProvider) -> None:
        self._state_provider = provider

    def bind_commands(self, handler: CommandHandler) -> None:
        """The line's rollout manager: <prefix>/<line>/cmd/rollout."""
        self._handlers["rollout"] = handler

    def bind_trigger(self, fire: Callable[..., bool | None], withdraw: Callable[[], None] | None = None) -> None:
        """The line's software trigger: <prefix>/<line>/cmd/trigger when `allow_trigger`; `withdraw`: the previous
        verdict withdrawn without a capture (a refused second delivery)."""
        self._fire = fire
        self._withdraw = withdraw

    def bind_recipes(self, switcher) -> None:
        """The line's RecipeSwitcher: <prefix>/<line>/cmd/recipe when `allow_recipe`."""
        self._recipes = switcher

    def accepts_commands(self) -> bool:
        cfg = self.station.cfg
        return bool(self._handlers or (cfg.allow_trigger and self._fire is not None)
                    or (cfg.allow_recipe and self._recipes is not None))

    # -- Output ------------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.open = True
        self.station.acquire(self)

    def publish(self, result: InspectionResult) -> None:
        if state_news(self, result):   # a switch, or a part not OK after an OK one: the line's state at once
            self.station._state_changed()
        self.station._enqueue(result, self.line)

    def set_ready(self, ready: bool) -> None:
        if ready != self.ready:
            self.ready = ready
            self.station._state_changed()

    def set_fault(self, reason: str | None) -> None:
        if reason != self.fault:
            self.fault = reason
            self.station._state_changed()

    def close(self) -> None:
        if self.open:
            self.open = False
            self.station.release(self)

    def counters(self) -> dict[str, float]:
        s = self.station
        return {"mqtt_published": self.published, "mqtt_reconnects": s.reconnects,
                "mqtt_outbox_dropped": s.dropped_for(self.line), "mqtt_outbox_errors": s.outbox_errors,
                "mqtt_commands_refused": self.commands_refused}

    # -- what <prefix>/<line>/state says -------------------------------------------------------------------------
    def state_message(self, online: bool) -> dict[str, Any]:
        if not online:
            return {"online": False, "state": "offline", "line": self.line, "time": time.time()}
        msg = online_state(self.ready, self.fault, self._state_provider, self.name)
        msg["line"] = self.line
        return msg

    # -- commands (paho's network thread: hand over, never wait) ----------------------------------------------
    def command(self, name: str, payload: bytes) -> None:
        cfg = self.station.cfg
        handler = self._handlers.get(name)
        if handler is not None:
            handler(name, payload)
        elif name == "trigger" and cfg.allow_trigger and self._fire is not None:
            self._trigger(payload)
        elif name == "recipe" and cfg.allow_recipe and self._recipes is not None:
            key: str | int = payload.decode("utf-8", "replace").strip()
            if isinstance(key, str) and key.isdigit():
                key = int(key)
            accepted, message = self._recipes.request(key, "mqtt")
            if not accepted:
                self.commands_refused += 1
        else:
            self.commands_refused += 1
            why = {"trigger": "needs mqtt.allow_trigger and a `software` trigger",
                   "recipe": "needs mqtt.allow_recipe and recipes on this line",
                   "rollout": "needs rollout.enabled"}.get(name, f"unknown command (known: {', '.join(LINE_COMMANDS)})")
            log.warning("%s: command %r refused: %s", self.name, name, why)

    def _trigger(self, payload: bytes) -> None:
        age, ident, problem = parse_trigger(payload)
        if problem is not None:
            log.warning("%s: trigger dated on arrival: %s", self.name, problem)
        now = time.monotonic()
        recent = self._recent_triggers
        while recent and now - next(iter(recent.values())) > DUPLICATE_WINDOW_S:
            recent.popitem(last=False)
        if ident is not None and ident in recent:
            # QoS 1 is at-least-once: a broker or a plant client resending after a reconnect delivers the same
            # trigger twice, and a second capture would answer one part twice. The previous verdict is withdrawn
            # all the same: whatever the PLC reads now is not an OK (probe 38).
            self.commands_refused += 1
            log.warning("%s: trigger id %r refused: delivered again within %g s", self.name, ident,
                        DUPLICATE_WINDOW_S)
            if self._withdraw is not None:
                self._withdraw()
            return
        if ident is not None:
            if len(recent) >= RECENT_TRIGGERS:
                forgotten, at = recent.popitem(last=False)
                log.warning("%s: over %d trigger ids within %g s: id %r, %.1f s old, forgotten (a redelivery of it "
                            "would be captured)", self.name, RECENT_TRIGGERS, DUPLICATE_WINDOW_S, forgotten, now - at)
            recent[ident] = now
        if (self._fire() if age is None else self._fire(sent_age_s=age)) is False:
            self.commands_refused += 1   # a backlog of triggers not served yet (logged by the trigger)


def parse_trigger(payload: bytes) -> tuple[float | None, object | None, str | None]:
    """(seconds since the plant sent it, its id, what could not be read) of a trigger whose payload is a JSON
    object (a UTF-8 byte-order mark, or the object sent as a JSON string, are read too) with `sent_at` (Unix
    seconds, milli-, micro- or nanoseconds, or ISO 8601 with its zone) and/or `id` (unique per trigger); (None,
    None, None) for any other payload (it fires as before).

    A broker that stalls holds a trigger as long as it likes (MQTT 3.1.1 has no expiry): an 8 s old trigger was
    captured as a fresh part (probe 37); with `sent_at` it is as old as it is."""
    text = payload.removeprefix(b"\xef\xbb\xbf").strip()
    if not text.startswith((b"{", b'"')):
        return None, None, None
    if len(text) > MAX_TRIGGER_PAYLOAD:
        return None, None, f"payload of {len(text)} bytes (over {MAX_TRIGGER_PAYLOAD}): not read"
    try:
        body = json.loads(text)
        if isinstance(body, str) and body.lstrip().startswith("{"):   # the object encoded twice
            body = json.loads(body)
    except (ValueError, RecursionError):
        return None, None, "payload starts like JSON but is not"
    if not isinstance(body, dict):
        return None, None, None
    ident = body.get("id")
    if ident is not None and not isinstance(ident, (str, int)) or isinstance(ident, bool):
        ident = json.dumps(ident, sort_keys=True)   # a float or an object is an id too: compared as written
    sent, problem = body.get("sent_at"), None
    when: float | None = None
    try:
        if isinstance(sent, str):
            parsed = dt.datetime.fromisoformat(sent)
            if parsed.tzinfo is None:
                problem = f"sent_at {sent!r} has no time zone"
            else:
                when = parsed.timestamp()
        elif isinstance(sent, (int, float)) and not isinstance(sent, bool) and math.isfinite(float(sent)):
            when = float(sent)
            for scale in SENT_AT_SCALES:   # ns, us, ms: whichever puts it near the Unix seconds of today
                if when > scale * 1e8:
                    when /= scale
                    break
        elif sent is not None:
            problem = f"sent_at {short_repr(sent)} is neither Unix time nor an ISO 8601 time"
    except (ValueError, OverflowError):
        problem = f"sent_at {short_repr(sent)} is not a time"
    age = None if when is None else time.time() - when
    if age is not None and age < -FUTURE_SENT_AT_S:
        problem = f"sent_at is {-age:.1f} s ahead of this station's clock (clocks apart, or another unit)"
    return age, ident, problem


class StationMqtt(MqttOutput):
    """The station's one connection (the edge node): MqttOutput's outbox, sender and reconnects, with records
    tagged by line and topics per line. Not on any bus itself: each line's LineMqtt starts and closes it."""

    def __init__(self, cfg: StationMqttConfig, line_names: list[str]) -> None:
        super().__init__(cfg)
        self.name = f"mqtt:{cfg.host}:{cfg.port}/{cfg.topic_prefix}"
        self.lines: dict[str, LineMqtt] = {name: LineMqtt(self, name) for name in line_names}
        self._users: set[str] = set()
        self._life = threading.Lock()
        self._fault = None            # the node is online while connected; the lines carry ready/fault
        self._ready = True
        self._acked_by_line: dict[str, int] = {}

    def adapter(self, line: str) -> LineMqtt:
        return self.lines[line]

    # -- life: the first line's bus starts the connection, the last one's close ends it --------------------------
    def acquire(self, adapter: LineMqtt) -> None:
        with self._life:
            first = not self._users
            self._users.add(adapter.line)
            if first:
                self.start()    # raises OutputError (outbox, paho missing): that line's bus logs and counts it
            else:
                self._state_changed()

    def release(self, adapter: LineMqtt) -> None:
        with self._life:
            self._users.discard(adapter.line)
            if not self._users:
                self.close()    # drains, says each line and the node offline, closes the outbox
            else:
                self._state_changed()   # this line's state goes offline now

    # -- tags and topics ---------------------------------------------------------------------------------------
    def publish(self, result: InspectionResult) -> None:   # pragma: no cover - records come through LineMqtt
        raise OutputError(f"{self.name}: the station's connection takes records through a line (LineMqtt)")

    def _publishes_line_tags(self) -> bool:
        return True

    def _result_topic(self, line: str) -> str:
        adapter = self.lines.get(line)
        # A record from an outbox written under another line layout (a line renamed or removed): keep its tag.
        return adapter.result_topic if adapter is not None else f"{self.cfg.topic_prefix}/{line or '_'}/result"

    def _acknowledged(self, lines: list[str]) -> None:
        for line in lines:
            adapter = self.lines.get(line)
            if adapter is not None:
                adapter.published += 1

    def dropped_for(self, line: str) -> int:
        """This line's records lost to a full outbox."""
        return self.outbox.counters.dropped_by_line.get(line, 0) if self.outbox is not None else 0

    # -- node state, will, commands ----------------------------------------------------------------------------
    def state_message(self, online: bool = True) -> dict[str, Any]:
        names = list(self.lines)
        if not online:
            return {"online": False, "state": "offline", "lines": names, "time": time.time()}
        msg: dict[str, Any] = {"online": True, "state": "online", "lines": names, "time": time.time()}
        if self.outbox is not None:
            oldest = self.outbox.oldest_queued_at()
            msg["outbox"] = {"queued": self.queued(), "dropped": self.dropped,
                             "dropped_by_line": dict(self.outbox.counters.dropped_by_line),
                             "oldest_age_s": None if oldest is None else round(time.time() - oldest, 3)}
        return msg

    def _publish_state(self, client, online: bool = True) -> list:
        # Lines first, node last: a consumer that sees the node online has every line's current state already.
        sent = []
        for adapter in self.lines.values():
            payload = json.dumps(adapter.state_message(online and adapter.open), separators=(",", ":"), default=str)
            sent.append(client.publish(adapter.state_topic, payload, qos=1, retain=True))
        return sent + super()._publish_state(client, online)

    def _state_topics(self) -> int:
        return len(self.lines) + 1

    def _subscriptions(self) -> list[str]:
        if any(a.accepts_commands() for a in self.lines.values()):
            return [f"{self.cfg.topic_prefix}/+/cmd/#"]
        return []

    def _on_command(self, topic: str, payload: bytes) -> None:
        prefix = self.cfg.topic_prefix + "/"
        if not topic.startswith(prefix):
            return
        parts = topic[len(prefix):].split("/")
        if len(parts) != 3 or parts[1] != "cmd":
            return
        adapter = self.lines.get(parts[0])
        if adapter is None:
            log.warning("%s: command for unknown line %r (lines: %s)", self.name, parts[0][:40], ", ".join(self.lines))
            return
        adapter.command(parts[2], payload)


def build_station_mqtt(cfg, line_names: list[str]) -> StationMqtt | None:
    """The station's shared connection for a StationConfig with `lines:` and `mqtt:`, else None."""
    mqtt = getattr(cfg, "mqtt", None)
    if mqtt is None or not getattr(cfg, "lines", None):
        return None
    return StationMqtt(mqtt, line_names)


def bind_line(shared: StationMqtt | None, line) -> None:
    """After a Line is built: what only the line object knows (its recipes) reaches its adapter."""
    if shared is not None and line.recipes is not None:
        shared.adapter(line.name).bind_recipes(line.recipes)
