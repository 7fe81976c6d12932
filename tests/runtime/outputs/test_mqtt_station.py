"""The station's shared MQTT connection (edge_runtime/outputs/mqtt_station.py) against a real Mosquitto: the last
will marks the node offline naming its lines, commands reach the line they name, a full outbox drops the oldest
records whatever their line (counted per line), and the station file's `mqtt:` section and its conflicts."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from edge_runtime.config import load_station
from edge_runtime.outputs.mqtt_station import StationMqtt, StationMqttConfig
from edge_runtime.records import InspectionResult, Verdict
from edge_runtime.schema import ConfigError
from extras import mqtt_broker

REPO = Path(__file__).resolve().parents[3]
mb = mqtt_broker()

PREFIX = "acme/plant1/cell2/station9"


def make_result(frame_id: int) -> InspectionResult:
    return InspectionResult(frame_id=frame_id, source="cam", verdict=Verdict.OK, score=1.0, normalized_score=0.5,
                            threshold=2.0, timings_ms={"total": 10.0}, bundle_id="b1", captured_at=time.time())


def make_station(tmp_path: Path, port: int, lines=("left", "right"), **kw) -> StationMqtt:
    cfg = StationMqttConfig(host="127.0.0.1", port=port, topic_prefix=PREFIX, outbox=str(tmp_path / "outbox.sqlite"),
                            reconnect_min_s=0.1, reconnect_max_s=0.5, state_interval_s=60.0, **kw)
    cfg.validate()
    return StationMqtt(cfg, list(lines))


@pytest.fixture
def broker(tmp_path):
    b = mb.Broker(tmp_path / "broker").start()
    yield b
    b.stop()


def test_last_will_says_the_node_and_so_every_line_is_offline(tmp_path, broker):
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from edge_runtime.outputs.mqtt_station import StationMqtt, StationMqttConfig
        station = StationMqtt(StationMqttConfig(host="127.0.0.1", port={broker.port}, topic_prefix={PREFIX!r},
                                                outbox={str(tmp_path / 'child.sqlite')!r}), ["left", "right"])
        for name in ("left", "right"):
            a = station.adapter(name); a.start(); a.set_fault(None); a.set_ready(True)
        print("started", flush=True)
        time.sleep(120)
    """)
    sub = mb.Subscriber(broker.port, [f"{PREFIX}/state", f"{PREFIX}/+/state"], persistent=False)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "started"
        assert sub.wait_for(lambda s: all(s.payloads(f"{PREFIX}/{n}/state") and json.loads(
            s.payloads(f"{PREFIX}/{n}/state")[-1])["state"] == "ready" for n in ("left", "right")))
        assert json.loads(sub.payloads(f"{PREFIX}/state")[-1])["online"] is True
        child.kill()   # no clean disconnect: only the broker can say the station is gone
        child.wait(10)
        assert sub.wait_for(lambda s: json.loads(s.payloads(f"{PREFIX}/state")[-1])["state"] == "offline")
        will = json.loads(sub.payloads(f"{PREFIX}/state")[-1])
        assert will["online"] is False and will["lines"] == ["left", "right"]
        # The lines' retained states still read "ready": the node's death is what says they are offline
        # (Sparkplug: NDEATH implies DDEATH); the README tells consumers so.
        assert json.loads(sub.payloads(f"{PREFIX}/left/state")[-1])["state"] == "ready"
    finally:
        child.kill()
        sub.close()


def test_commands_reach_the_line_they_name(tmp_path, broker):
    station = make_station(tmp_path, broker.port, allow_trigger=True, allow_recipe=True)
    fired, rollout, recipes = [], [], []

    class Switcher:   # the RecipeSwitcher's request(), as the HTTP endpoint calls it
        def request(self, key, origin):
            recipes.append((key, origin))
            return True, "switching"

    station.adapter("right").bind_recipes(Switcher())
    station.adapter("left").bind_trigger(lambda: fired.append("left"))
    station.adapter("right").bind_trigger(lambda: fired.append("right"))
    station.adapter("right").bind_commands(lambda topic, payload: rollout.append((topic, payload)))
    for name in ("left", "right"):
        station.adapter(name).start()
    ctl = mb.Subscriber(broker.port, [], client_id="controller", persistent=False)
    try:
        assert ctl.wait_for(lambda s: station._connected)
        time.sleep(0.3)   # the SUBACK of the station's command subscription
        ctl.client.publish(f"{PREFIX}/right/cmd/trigger", b"go", qos=1)
        ctl.client.publish(f"{PREFIX}/right/cmd/rollout", b'{"bundle": "/b/v7"}', qos=1)
        ctl.client.publish(f"{PREFIX}/left/cmd/recipe", b"2", qos=1)      # no recipes on left: refused, counted
        ctl.client.publish(f"{PREFIX}/right/cmd/recipe", b"2", qos=1)     # a number selects by number
        ctl.client.publish(f"{PREFIX}/nosuchline/cmd/trigger", b"go", qos=1)
        assert ctl.wait_for(lambda s: fired and rollout and station.adapter("left").commands_refused == 1)
        time.sleep(0.3)
        assert fired == ["right"] and rollout == [("rollout", b'{"bundle": "/b/v7"}')]
        assert recipes == [(2, "mqtt")]
        assert station.adapter("left").counters()["mqtt_commands_refused"] == 1
    finally:
        ctl.close()
        for name in ("left", "right"):
            station.adapter(name).close()


def test_a_retained_command_is_never_acted_on_only_a_live_one(tmp_path, broker):
    """A controller (or a mistaken tool) that published cmd/trigger retained would have the broker replay it on
    every reconnect of the station: a trigger nobody sent now. Only live commands count."""
    ctl = mb.Subscriber(broker.port, [], client_id="controller", persistent=False)
    # (a non-empty payload: an empty retained message is MQTT's way of deleting the retained one)
    ctl.client.publish(f"{PREFIX}/right/cmd/trigger", b"go", qos=1, retain=True).wait_for_publish(10)
    station = make_station(tmp_path, broker.port, allow_trigger=True)
    fired = []
    station.adapter("right").bind_trigger(lambda: fired.append("right"))
    for name in ("left", "right"):
        station.adapter(name).start()
    try:
        assert ctl.wait_for(lambda s: station._connected)
        assert ctl.wait_for(lambda s: station.ignored_retained == 1), "the broker's replay was not seen"
        assert fired == []
        ctl.client.publish(f"{PREFIX}/right/cmd/trigger", b"go", qos=1)
        assert ctl.wait_for(lambda s: fired == ["right"])
        assert station.counters()["mqtt_retained_commands_ignored"] == 1
    finally:
        ctl.client.publish(f"{PREFIX}/right/cmd/trigger", b"", qos=1, retain=True)   # clears the retained one
        ctl.close()
        for name in ("left", "right"):
            station.adapter(name).close()


def test_clearing_a_retained_command_is_no_command(tmp_path, broker):
    """Probe 65: a trigger published retained while the station is subscribed reaches it live (the broker clears
    the retain flag for subscribers already there) and fires once; clearing it afterwards, with the empty retained
    message the station's own warning tells the operator to send, reached the station as a live empty trigger and
    fired a second capture: a result record for a part nobody triggered (right.jsonl held frames 0 and 1). An empty
    message is how MQTT deletes a retained one; it is no command (trigger, recipe or rollout)."""
    station = make_station(tmp_path, broker.port, allow_trigger=True, allow_recipe=True)
    fired, recipes, rollout = [], [], []

    class Switcher:
        def request(self, key, origin):
            recipes.append((key, origin))
            return False, "unknown"

    station.adapter("right").bind_trigger(lambda: fired.append("right"))
    station.adapter("right").bind_recipes(Switcher())
    station.adapter("left").bind_commands(lambda topic, payload: rollout.append((topic, payload)))
    for name in ("left", "right"):
        station.adapter(name).start()
    ctl = mb.Subscriber(broker.port, [], client_id="controller", persistent=False)
    try:
        assert ctl.wait_for(lambda s: station._connected)
        time.sleep(0.3)   # the SUBACK of the station's command subscription
        ctl.client.publish(f"{PREFIX}/right/cmd/trigger", b"go", qos=1, retain=True).wait_for_publish(10)
        assert ctl.wait_for(lambda s: fired == ["right"]), "a live trigger (retained by mistake) fires once"
        for topic in ("right/cmd/trigger", "right/cmd/recipe", "left/cmd/rollout"):
            ctl.client.publish(f"{PREFIX}/{topic}", b"", qos=1, retain=True).wait_for_publish(10)
        marker = b'{"bundle": "/b/v7"}'   # a live command after them: once it is in, so are they
        ctl.client.publish(f"{PREFIX}/left/cmd/rollout", marker, qos=1).wait_for_publish(10)
        assert ctl.wait_for(lambda s: ("rollout", marker) in rollout)
        assert fired == ["right"] and recipes == [] and rollout == [("rollout", marker)], \
            "the empty retained messages (clearing) were taken as commands"
        assert station.counters()["mqtt_retained_commands_ignored"] == 3
    finally:
        ctl.close()
        for name in ("left", "right"):
            station.adapter(name).close()


def test_commands_allowed_on_an_anonymous_connection_are_warned_about():
    """Probe 65: allow_trigger and allow_recipe on a station that connects without credentials (so to a broker that
    takes anonymous clients) passed validate with no warning, while any anonymous client could change the line's
    product over <prefix>/<line>/cmd/recipe (the OPC UA PrepareRecipe without users is warned about)."""
    def warned(**kw) -> list[str]:
        cfg = StationMqttConfig(host="127.0.0.1", topic_prefix=PREFIX, **kw)
        cfg.validate()
        return [w for w in cfg.warnings() if "cmd/" in w]

    assert warned() == []
    found = warned(allow_recipe=True)
    assert len(found) == 1 and "change a line's product" in found[0] and "anonymous" in found[0]
    assert "trigger captures" in warned(allow_trigger=True)[0]
    assert warned(allow_recipe=True, allow_trigger=True, username="station7") == []


def test_full_outbox_drops_the_oldest_of_any_line_counted_per_line(tmp_path):
    port = mb.free_port()   # the broker is down
    station = make_station(tmp_path, port, outbox_max_records=10)
    left, right = station.adapter("left"), station.adapter("right")
    left.start()
    right.start()
    try:
        for i in range(8):
            left.publish(make_result(i))
        assert station.wait_committed(10)
        for i in range(8):
            right.publish(make_result(i))
        assert station.wait_committed(10)
        assert len(station.outbox) == 10
        assert left.counters()["mqtt_outbox_dropped"] == 6 and right.counters()["mqtt_outbox_dropped"] == 0
        assert station.state_message()["outbox"]["dropped_by_line"] == {"left": 6}
        broker = mb.Broker(tmp_path / "broker", port=port).start()
        try:
            sub = mb.Subscriber(port, [f"{PREFIX}/+/result"], persistent=False)
            assert sub.wait_for(lambda s: len(station.outbox) == 0, timeout=30)
            sub.close()
        finally:
            broker.stop()
        assert left.counters()["mqtt_published"] == 2 and right.counters()["mqtt_published"] == 8
    finally:
        left.close()
        right.close()
    assert station.outbox is None, "the last line's close closes the connection and the outbox"


def write_station(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "station.yaml"
    path.write_text(textwrap.dedent(body))
    return path


LINES = """
    bundle: bundle
    lines:
      - {name: left, source: {type: folder, path: a}}
      - {name: right, source: {type: folder, path: b}}
"""


def test_station_file_mqtt_section_is_shared_by_the_lines(tmp_path):
    cfg = load_station(write_station(tmp_path, LINES + """
    mqtt: {host: broker.plant.local, topic_prefix: acme/s9, tls_ca: ca.pem, allow_trigger: true}
    """))
    assert isinstance(cfg.mqtt, StationMqttConfig) and cfg.mqtt.allow_trigger and not cfg.mqtt.allow_recipe
    assert cfg.mqtt.tls_ca == str(tmp_path / "ca.pem")
    assert cfg.mqtt.outbox == str(Path(cfg.state_dir) / "mqtt-outbox.sqlite")


@pytest.mark.parametrize("body, key, expected", [
    ("bundle: b\nsource: {type: folder, path: a}\nmqtt: {host: h, topic_prefix: p}\n", "mqtt:",
     "shared connection of a station with `lines:`"),
    (LINES + "    mqtt: {host: h, topic_prefix: p}\n    outputs: [{type: mqtt, host: h, topic_prefix: p}]\n",
     "outputs[0]:", "move this output there"),
    ("""
    bundle: bundle
    lines:
      - {name: left, source: {type: folder, path: a}}
      - {name: right, source: {type: folder, path: b}, outputs: [{type: mqtt, host: h, topic_prefix: p}]}
    """, "lines[1].outputs[0]:", "declare it once in the station's `mqtt:` section"),
    ("""
    bundle: bundle
    mqtt: {host: h, topic_prefix: p}
    lines:
      - {name: state, source: {type: folder, path: a}}
    """, "lines[0].name:", "'state' is a topic of the station itself"),
    (LINES + "    mqtt: {host: h, topic_prefix: p, allow_trigger: maybe}\n", "mqtt.allow_trigger", "expected"),
])
def test_station_file_mqtt_conflicts_name_the_key(tmp_path, body, key, expected):
    with pytest.raises(ConfigError) as err:
        load_station(write_station(tmp_path, body))
    assert key in str(err.value) and expected in str(err.value), str(err.value)


def test_validate_warns_about_the_shared_connection_in_clear(tmp_path, capsys):
    from edge_runtime import cli

    (tmp_path / "bundle").mkdir()
    station = write_station(tmp_path, LINES + """
    mqtt: {host: broker.plant.local, topic_prefix: acme/s9, username: s9}
    """)
    cli.main(["validate", str(station)])
    assert "mqtt.tls_ca: not set: the password for 's9' crosses the network" in capsys.readouterr().err


def test_an_outbox_from_before_the_line_tags_is_migrated_in_place(tmp_path):
    import sqlite3

    from edge_runtime.outputs.mqtt_outbox import Outbox

    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, queued_at REAL NOT NULL, "
               "payload BLOB NOT NULL)")
    db.execute("INSERT INTO outbox (payload, queued_at) VALUES (?, ?)", (b'{"frame_id": 1}', 1.0))
    db.commit()
    db.close()
    box = Outbox(str(path), 10)
    box.append(b'{"frame_id": 2}', 2.0, "left")
    assert [(p, line) for _s, _t, p, line in box.peek(0, 10)] == [(b'{"frame_id": 1}', ""),
                                                                    (b'{"frame_id": 2}', "left")]
    box.close()
