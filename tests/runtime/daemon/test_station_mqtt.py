"""The daemon with an MQTT output against a real Mosquitto broker: every result-log record is published, in order,
and the retained state carries the bundle in service, the counters and, after a clean stop, offline."""
from __future__ import annotations

import json
import shutil

from edge_runtime.config import load_station
from extras import mqtt_broker

mb = mqtt_broker()


def test_station_publishes_every_logged_record_and_its_state(device_bundle, tmp_path, write_station, start_station,
                                                             read_log):
    images = tmp_path / "images"
    images.mkdir()
    golden = sorted((device_bundle / "golden").glob("*.png"))
    for i in range(12):
        shutil.copyfile(golden[i % len(golden)], images / f"part_{i:03d}.png")
    broker = mb.Broker(tmp_path / "broker").start()
    prefix = "acme/p1/l1/s1"
    sub = mb.Subscriber(broker.port, [f"{prefix}/result", f"{prefix}/state"], persistent=False)
    try:
        station = write_station(
            name="station", bundle=device_bundle, source={"type": "folder", "path": str(images)},
            outputs=[{"type": "result_log", "path": "results.jsonl"},
                     {"type": "mqtt", "host": "127.0.0.1", "port": broker.port, "topic_prefix": prefix,
                      "reconnect_min_s": 0.1}])
        cfg = load_station(station)
        running = start_station(cfg)
        assert running.join(120) == 0
        logged = read_log(tmp_path / "results.jsonl")
        assert len(logged) == 12
        assert sub.wait_for(lambda s: len(s.payloads(f"{prefix}/result")) >= 12)
        assert sub.records(f"{prefix}/result") == logged     # the same records, in the same order
        states = sub.records(f"{prefix}/state")
        assert any(s.get("bundle_id") == logged[0]["bundle_id"] and s.get("bundle_version") == 1 for s in states)
        assert states[-1]["online"] is False                # the clean stop said so
    finally:
        sub.close()
        broker.stop()
