"""Two inspection lines in one daemon share one MQTT connection (the station's `mqtt:` section), against a real
Mosquitto: one client at the broker, both lines' records in order per line with nothing lost across a broker kill
and restart, each line's retained state and the node's state listing its lines."""
from __future__ import annotations

import json
import re
import time

from edge_runtime.config import load_station
from edge_runtime.outputs.mqtt_station import LineMqtt, StationMqtt
from extras import mqtt_broker

mb = mqtt_broker()

PREFIX = "acme/plant1/cell2/station9"
FRAMES = 60


def station_connections(broker) -> list[str]:
    """Client ids of the connections the station made (the broker log: 'New client connected ... as <id>')."""
    return re.findall(r"New client connected from \S+ as (edge-\S+)", (broker.dir / "mosquitto.log").read_text())


def test_two_lines_share_one_connection_and_lose_nothing_across_a_broker_kill(
        small_bundle, flange_test_folder, write_station, tmp_path, start_station, read_log):
    folder, _ = flange_test_folder
    broker = mb.Broker(tmp_path / "broker").start()
    sub = mb.Subscriber(broker.port, [f"{PREFIX}/+/result", f"{PREFIX}/+/state", f"{PREFIX}/state"],
                        client_id="plant-historian", persistent=True)
    broker.save()   # the historian's persistent session survives the crash below
    path = write_station(
        bundle=small_bundle, inference={"threads": 2},
        mqtt={"host": "127.0.0.1", "port": broker.port, "topic_prefix": PREFIX, "reconnect_min_s": 0.1,
              "reconnect_max_s": 0.5, "state_interval_s": 60.0},
        lines=[{"name": name, "source": {"type": "paced", "path": str(folder), "fps": 15, "frames": FRAMES}}
               for name in ("left", "right")])
    running = start_station(load_station(path))
    station = running.station
    try:
        assert isinstance(station.mqtt, StationMqtt)
        adapters = [o for line in station.lines for o in line.outputs if isinstance(o, LineMqtt)]
        assert [a.line for a in adapters] == ["left", "right"] and {id(a.station) for a in adapters} == {id(station.mqtt)}

        def got(s, line):
            return [r["frame_id"] for r in s.records(f"{PREFIX}/{line}/result")]

        assert sub.wait_for(lambda s: len(got(s, "left")) >= 5 and len(got(s, "right")) >= 5, timeout=60)
        node = json.loads(sub.payloads(f"{PREFIX}/state")[-1])
        assert node["online"] is True and node["lines"] == ["left", "right"]
        assert sub.wait_for(lambda s: all(json.loads(s.payloads(f"{PREFIX}/{n}/state")[-1]).get("state") == "ready"
                                          for n in ("left", "right") if s.payloads(f"{PREFIX}/{n}/state")))
        assert station_connections(broker) == [f"edge-{PREFIX.replace('/', '-')}"], "one connection for two lines"
        broker.kill()   # crash: records of both lines queue in the one outbox
        deadline = time.monotonic() + 30
        while station.mqtt.queued() < 10 and time.monotonic() < deadline:
            time.sleep(0.05)
        queued_during_outage = station.mqtt.queued()
        broker.start()  # same port, same persistence file
        assert running.join(120) == 0   # both paced sources end: the daemon drains its outbox and stops
        logs = {n: [r["frame_id"] for r in read_log(tmp_path / f"results-{n}.jsonl")] for n in ("left", "right")}
        for name in ("left", "right"):
            assert sub.wait_for(lambda s: set(logs[name]) <= set(got(s, name)), timeout=60), \
                f"{name}: {len(set(got(sub, name)))} of {len(logs[name])}; broker log: {broker.log_tail()}"
            kept, duplicates, out_of_order = mb.dedupe_in_order(got(sub, name))
            assert kept == logs[name], f"{name}: every record of the line, in its order"
            assert out_of_order == 0 and duplicates <= station.mqtt.cfg.max_inflight
        assert queued_during_outage >= 10, "records waited in the outbox while the broker was down"
        assert station.mqtt.dropped == 0 and station.mqtt.reconnects >= 1
        # One client id at the broker, before and after the crash: the reconnect is the same single connection.
        assert set(station_connections(broker)) == {f"edge-{PREFIX.replace('/', '-')}"}
        # The clean stop: every line and the node say offline (retained).
        assert sub.wait_for(lambda s: json.loads(s.payloads(f"{PREFIX}/state")[-1])["online"] is False)
        for name in ("left", "right"):
            assert json.loads(sub.payloads(f"{PREFIX}/{name}/state")[-1])["state"] == "offline"
        counters = station.lines[0].status().counters
        assert counters["mqtt_published"] >= len(logs["left"]) and counters["mqtt_outbox_dropped"] == 0
    finally:
        sub.close()
        broker.stop()


def test_a_trigger_command_reaches_the_line_it_names(small_bundle, flange_test_folder, write_station, tmp_path,
                                                     start_station):
    folder, _ = flange_test_folder
    broker = mb.Broker(tmp_path / "broker").start()
    sub = mb.Subscriber(broker.port, [f"{PREFIX}/+/result", f"{PREFIX}/+/state"], persistent=False)
    path = write_station(
        bundle=small_bundle,
        mqtt={"host": "127.0.0.1", "port": broker.port, "topic_prefix": PREFIX, "allow_trigger": True},
        lines=[{"name": name, "trigger": {"type": "software"},
                "source": {"type": "paced", "path": str(folder), "fps": 20}} for name in ("left", "right")])
    running = start_station(load_station(path))
    try:
        assert sub.wait_for(lambda s: all(s.payloads(f"{PREFIX}/{n}/state") and json.loads(
            s.payloads(f"{PREFIX}/{n}/state")[-1])["state"] == "ready" for n in ("left", "right")), timeout=60)
        for _ in range(2):
            sub.client.publish(f"{PREFIX}/right/cmd/trigger", b"go", qos=1)
        assert sub.wait_for(lambda s: len(s.payloads(f"{PREFIX}/right/result")) >= 2, timeout=60)
        time.sleep(0.5)
        assert sub.payloads(f"{PREFIX}/left/result") == [], "the command named the right line only"
        assert running.station.lines[0].counters.frames == 0 and running.station.lines[1].counters.frames >= 2
    finally:
        running.stop()
        sub.close()
        broker.stop()


def test_lines_with_one_line_keep_the_station_mqtt_section(small_bundle, flange_test_folder, write_station, tmp_path,
                                                           start_station, read_log):
    """`lines:` holding one line had returned before the station's MQTT connection was built: no result reached
    the broker while validate said valid and /healthz ready."""
    folder, _ = flange_test_folder
    broker = mb.Broker(tmp_path / "broker").start()
    sub = mb.Subscriber(broker.port, [f"{PREFIX}/+/result", f"{PREFIX}/state"], persistent=False)
    path = write_station(
        bundle=small_bundle, mqtt={"host": "127.0.0.1", "port": broker.port, "topic_prefix": PREFIX},
        lines=[{"name": "only", "source": {"type": "paced", "path": str(folder), "fps": 15, "frames": 6}}])
    running = start_station(load_station(path))
    try:
        assert isinstance(running.station.mqtt, StationMqtt)
        assert running.join(120) == 0
        logged = [r["frame_id"] for r in read_log(tmp_path / "results-only.jsonl")]
        # A slow device (4 fps under emulation) drops frames of a 15 fps source; each is counted.
        assert logged and len(logged) + running.station.lines[0].dropped_frames == 6
        assert sub.wait_for(lambda s: [r["frame_id"] for r in s.records(f"{PREFIX}/only/result")] == logged, timeout=30)
        assert json.loads(sub.payloads(f"{PREFIX}/state")[-1])["lines"] == ["only"]
    finally:
        sub.close()
        broker.stop()
