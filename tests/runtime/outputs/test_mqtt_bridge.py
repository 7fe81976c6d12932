"""The README's many-stations shape, for real: a station publishes to its line broker, a Mosquitto bridge forwards
results and state to the plant broker and commands back down (two Mosquitto processes on free local ports)."""
from __future__ import annotations

import json
import time

from edge_runtime.outputs import MqttConfig, MqttOutput
from edge_runtime.records import InspectionResult, Verdict
from extras import mqtt_broker

mb = mqtt_broker()


def test_line_broker_bridged_to_plant_broker_carries_results_state_and_commands(tmp_path):
    plant = mb.Broker(tmp_path / "plant").start()
    line = mb.Broker(tmp_path / "line")
    # The bridge stanza of README "Many stations", minus TLS.
    line.conf.write_text(line.conf.read_text() + (
        f"connection plant-uplink\naddress 127.0.0.1:{plant.port}\nremote_clientid line3-bridge\n"
        "cleansession false\nbridge_protocol_version mqttv311\n"
        "topic acme/plant1/line3/+/result out 1\ntopic acme/plant1/line3/+/state out 1\n"
        "topic acme/plant1/line3/+/cmd/# in 1\n"))
    line.start()
    prefix = "acme/plant1/line3/station7"
    historian = mb.Subscriber(plant.port, ["acme/plant1/+/+/result", "acme/plant1/+/+/state"], persistent=False)
    commands: list[tuple[str, bytes]] = []
    out = MqttOutput(MqttConfig(host="127.0.0.1", port=line.port, topic_prefix=prefix,
                                outbox=str(tmp_path / "outbox.sqlite"), reconnect_min_s=0.1))
    out.bind_commands(lambda topic, payload: commands.append((topic, payload)))
    out.start()
    try:
        deadline = time.monotonic() + 20
        while not out._connected and time.monotonic() < deadline:
            time.sleep(0.05)
        # The bridge announces itself on the plant broker (retained notification) once connected and subscribed.
        bridge = mb.Subscriber(plant.port, ["$SYS/broker/connection/line3-bridge/state"], client_id="watch",
                               persistent=False)
        assert bridge.wait_for(lambda s: b"1" in s.payloads("$SYS/broker/connection/line3-bridge/state")), \
            line.log_tail()
        bridge.close()
        for i in range(20):
            out.publish(InspectionResult(frame_id=i, source="cam", verdict=Verdict.OK, score=1.0, normalized_score=0.2,
                                         threshold=2.0, timings_ms={}, bundle_id="b"))
        assert historian.wait_for(lambda s: len(s.payloads(f"{prefix}/result")) >= 20), plant.log_tail()
        assert [r["frame_id"] for r in historian.records(f"{prefix}/result")] == list(range(20))
        assert historian.wait_for(lambda s: s.payloads(f"{prefix}/state"))
        central = mb.Subscriber(plant.port, [], client_id="central", persistent=False)
        central.client.publish(f"{prefix}/cmd/rollout", json.dumps({"bundle": "/mnt/b"}), qos=1).wait_for_publish(10)
        central.close()
        deadline = time.monotonic() + 20
        while not commands and time.monotonic() < deadline:
            time.sleep(0.05)
        assert commands == [("rollout", b'{"bundle": "/mnt/b"}')]
    finally:
        out.close()
        historian.close()
        line.stop()
        plant.stop()
