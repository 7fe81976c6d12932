"""MqttOutput against a real Mosquitto broker started on a free port: records in order, retained state, last will,
store-and-forward across a broker that hangs, is killed and restarts, a bounded outbox and the station schema."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from edge_runtime.config import load_station
from edge_runtime.output_bus import OutputBus
from edge_runtime.outputs import MqttConfig, MqttOutput, OutputError, build_output
from edge_runtime.outputs.result_log import encode_record
from edge_runtime.records import InspectionResult, Verdict
from edge_runtime.schema import ConfigError
from extras import mqtt_broker

REPO = Path(__file__).resolve().parents[3]
mb = mqtt_broker()

PREFIX = "acme/plant1/line3/station7"
RESULT, STATE = f"{PREFIX}/result", f"{PREFIX}/state"


def make_result(frame_id: int, verdict: Verdict = Verdict.OK) -> InspectionResult:
    return InspectionResult(frame_id=frame_id, source="cam0", verdict=verdict, score=1.5 + frame_id / 1000,
                            normalized_score=0.3, threshold=2.0, timings_ms={"total": 12.5}, bundle_id="b1",
                            captured_at=time.time())


def make_output(tmp_path: Path, port: int, **kw) -> MqttOutput:
    cfg = MqttConfig(host="127.0.0.1", port=port, topic_prefix=PREFIX, outbox=str(tmp_path / "outbox.sqlite"),
                     reconnect_min_s=0.1, reconnect_max_s=0.5, state_interval_s=60.0, **kw)
    cfg.validate()
    return MqttOutput(cfg)


@pytest.fixture
def broker(tmp_path):
    b = mb.Broker(tmp_path / "broker").start()
    yield b
    b.stop()


def frame_ids(sub) -> list[int]:
    return [r["frame_id"] for r in sub.records(RESULT)]


def test_records_are_the_result_log_lines_in_order_and_state_is_retained(tmp_path, broker):
    sub = mb.Subscriber(broker.port, [RESULT, STATE], persistent=False)
    out = make_output(tmp_path, broker.port)
    out.bind_state(lambda: {"bundle_id": "b1", "frames": 3})
    out.start()
    try:
        out.set_ready(True)
        out.set_fault(None)
        results = [make_result(i, Verdict.OK if i % 3 else Verdict.NG) for i in range(30)]
        for r in results:
            out.publish(r)
        assert sub.wait_for(lambda s: len(s.payloads(RESULT)) >= 30)
        assert sub.payloads(RESULT) == [encode_record(r).rstrip(b"\n") for r in results]
        assert sub.wait_for(lambda s: out.outbox is not None and len(out.outbox) == 0)
        assert out.counters()["mqtt_published"] == 30
        assert sub.wait_for(lambda s: any(json.loads(p).get("state") == "ready" for p in s.payloads(STATE)))
    finally:
        out.close()
        sub.close()
    # A late subscriber gets the retained state at once: the clean stop said offline.
    late = mb.Subscriber(broker.port, [STATE], client_id="late", persistent=False)
    try:
        assert late.wait_for(lambda s: s.payloads(STATE))
        topic, payload, _, retained = late.messages[0]
        assert retained and json.loads(payload)["online"] is False
    finally:
        late.close()


def test_last_will_marks_a_killed_station_offline(tmp_path, broker):
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from edge_runtime.outputs import MqttConfig, MqttOutput
        out = MqttOutput(MqttConfig(host="127.0.0.1", port={broker.port}, topic_prefix={PREFIX!r},
                                    outbox={str(tmp_path / 'child.sqlite')!r}))
        out.start(); out.set_fault(None); out.set_ready(True)
        print("started", flush=True)
        time.sleep(120)
    """)
    sub = mb.Subscriber(broker.port, [STATE], persistent=False)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "started"
        assert sub.wait_for(lambda s: any(json.loads(p).get("state") == "ready" for p in s.payloads(STATE)))
        child.kill()   # no clean disconnect: only the broker can say the station is gone
        child.wait(10)
        assert sub.wait_for(lambda s: json.loads(s.payloads(STATE)[-1]) .get("state") == "offline")
        will = json.loads(sub.payloads(STATE)[-1])
        assert will["online"] is False
        # Written at connect: it says so, and has no 'time' to be read as the moment the station died.
        assert "time" not in will and will["connected_at"] < time.time()
    finally:
        child.kill()
        sub.close()


def test_broker_hung_killed_and_restarted_mid_run_loses_nothing(tmp_path):
    broker = mb.Broker(tmp_path / "broker").start()
    sub = mb.Subscriber(broker.port, [RESULT], client_id="plant-historian", persistent=True)
    broker.save()   # the historian's persistent session survives the crash below
    out = make_output(tmp_path, broker.port)
    out.start()
    total = 600
    produced = threading.Event()
    max_queued = 0

    def produce():
        for i in range(total):
            out.publish(make_result(i))
            time.sleep(0.004)
        produced.set()

    producer = threading.Thread(target=produce)
    try:
        producer.start()
        assert sub.wait_for(lambda s: len(s.payloads(RESULT)) >= 100)
        broker.pause()      # hung: the station's records stay unacknowledged, then queue on disk
        seen = len(sub.payloads(RESULT))
        time.sleep(0.5)     # what the broker had sent before it hung has arrived now
        assert len(sub.payloads(RESULT)) >= seen
        broker.kill()       # crash
        while not produced.is_set() and out.queued() < 150:
            max_queued = max(max_queued, out.queued())
            time.sleep(0.02)
        max_queued = max(max_queued, out.queued())
        broker.start()      # same port, same persistence file
        producer.join(60)
        assert sub.wait_for(lambda s: len(set(frame_ids(s))) >= total, timeout=60), \
            f"got {len(set(frame_ids(sub)))} of {total}; broker log: {broker.log_tail()}"
        kept, duplicates, out_of_order = mb.dedupe_in_order(frame_ids(sub))
        assert kept == list(range(total))          # every record, in order
        assert out_of_order == 0
        assert duplicates <= out.cfg.max_inflight  # at most the unacknowledged window is sent twice
        assert max_queued > 0                      # records did wait on disk while the broker was gone
        assert out.counters()["mqtt_reconnects"] >= 1 and out.counters()["mqtt_outbox_dropped"] == 0
        assert sub.wait_for(lambda s: out.queued() == 0)
    finally:
        out.close()
        sub.close()
        broker.stop()


def test_full_outbox_drops_the_oldest_counts_it_and_delivers_the_rest_in_order(tmp_path):
    port = mb.free_port()   # nothing listens yet: the broker is down
    out = make_output(tmp_path, port, outbox_max_records=10)
    out.start()
    try:
        for i in range(25):
            out.publish(make_result(i))
        assert out.wait_committed(10)
        assert len(out.outbox) == 10 and out.queued() == 10
        assert out.counters()["mqtt_outbox_dropped"] == 15
        assert out.state_message()["outbox"]["dropped"] == 15
        broker = mb.Broker(tmp_path / "broker", port=port).start()
        try:
            sub = mb.Subscriber(port, [RESULT], persistent=False)
            # Records published before the subscriber came are not for it; wait for the outbox to drain instead.
            assert sub.wait_for(lambda s: len(out.outbox) == 0, timeout=30)
            sub.close()
        finally:
            broker.stop()
        assert out.counters()["mqtt_published"] == 10
    finally:
        out.close()


def test_outbox_survives_a_restart_of_the_station(tmp_path):
    port = mb.free_port()
    out = make_output(tmp_path, port, close_timeout_s=0.1)
    out.start()
    for i in range(40):
        out.publish(make_result(i))
    out.close()   # broker down all along: the 40 records stay on disk
    broker = mb.Broker(tmp_path / "broker", port=port).start()
    sub = mb.Subscriber(port, [RESULT], persistent=False)
    again = make_output(tmp_path, port)
    again.start()
    try:
        again.publish(make_result(40))
        assert sub.wait_for(lambda s: len(frame_ids(s)) >= 41)
        assert frame_ids(sub) == list(range(41))
    finally:
        again.close()
        sub.close()
        broker.stop()


def test_a_hung_broker_never_blocks_the_output_bus(tmp_path, broker):
    out = make_output(tmp_path, broker.port)
    bus = OutputBus([out])
    bus.start()
    try:
        assert mb.Subscriber(broker.port, [RESULT], persistent=False).wait_for(lambda s: out._connected)
        broker.pause()
        for i in range(200):
            bus.publish(make_result(i))   # returns: the record goes to the worker, then to the disk outbox
        deadline = time.monotonic() + 30
        while bus.pending() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert bus.pending() == 0 and bus.counters.dropped == 0 and bus.counters.errors == 0
        assert out.wait_committed(10) and len(out.outbox) >= 200 - out.cfg.max_inflight
    finally:
        broker.stop()   # resumes (SIGCONT) and stops it
        bus.close()


def write_station(tmp_path: Path, outputs: str) -> Path:
    path = tmp_path / "station.yaml"
    path.write_text(textwrap.dedent("""
        bundle: bundle
        source: {type: folder, path: images}
        outputs:
    """) + textwrap.indent(textwrap.dedent(outputs), "  "))
    return path


def test_station_file_mqtt_section_resolves_paths_and_defaults(tmp_path):
    cfg = load_station(write_station(tmp_path, """
        - type: mqtt
          host: broker.plant.local
          topic_prefix: acme/plant1/line3/station7
          username: station7
          password_file: secrets/mqtt.pw
          tls_ca: certs/ca.pem
    """))
    mqtt = cfg.outputs[0]
    assert isinstance(mqtt, MqttConfig) and mqtt.qos == 1 and mqtt.port == 1883
    assert mqtt.password_file == str(tmp_path / "secrets" / "mqtt.pw")
    assert mqtt.tls_ca == str(tmp_path / "certs" / "ca.pem")
    assert mqtt.outbox == str(Path(cfg.state_dir) / "mqtt-outbox.sqlite")
    assert mqtt.effective_client_id == "edge-acme-plant1-line3-station7"
    assert isinstance(build_output(mqtt), MqttOutput)


@pytest.mark.parametrize("body, key, expected", [
    ("host: b\ntopic_prefix: a/+/c", "outputs[0]", "must not contain '+'"),
    ("host: b\ntopic_prefix: /a", "outputs[0].topic_prefix", "no leading or trailing"),
    ("host: b\ntopic_prefix: a\nqos: 2", "outputs[0].qos", "expected one of 0, 1, got 2"),
    ("host: b\ntopic_prefix: a\ntls_cert: c.pem", "outputs[0].tls_cert", "tls_cert and tls_key go together"),
    ("topic_prefix: a", "outputs[0].host", "required key is missing"),
    # probe 100: 1.0e+300 validated; every connect then failed (Event.wait OverflowError) and stopping logged a
    # traceback (Thread.join)
    ("host: b\ntopic_prefix: a\nconnect_timeout_s: 1.0e+300", "outputs[0].connect_timeout_s", "at most 60 s"),
    ("host: b\ntopic_prefix: a\nclose_timeout_s: 1.0e+300", "outputs[0].close_timeout_s", "at most 60 s"),
    ("host: b\ntopic_prefix: a\nreconnect_max_s: 1.0e+300", "outputs[0].reconnect_max_s", "at most 3600 s"),
    # probe 102: qos 1.0 validated and the sender thread died at its first publish (paho shifts qos as an int);
    # keepalive_s 100000 validated and every connect failed (CONNECT carries it in two bytes)
    ("host: b\ntopic_prefix: a\nqos: 1.0", "outputs[0].qos", "expected one of 0, 1, got 1.0"),
    ("host: b\ntopic_prefix: a\nqos: 0.0", "outputs[0].qos", "expected one of 0, 1, got 0.0"),
    ("host: b\ntopic_prefix: a\nkeepalive_s: 100000", "outputs[0].keepalive_s", "must be 5..65535"),
])
def test_station_file_mqtt_errors_name_the_key(tmp_path, body, key, expected):
    with pytest.raises(ConfigError) as err:
        load_station(write_station(tmp_path, "- type: mqtt\n" + textwrap.indent(body, "  ") + "\n"))
    assert key in str(err.value) and expected in str(err.value)


def test_validate_warns_about_a_password_in_clear_and_start_names_an_unreadable_file(tmp_path, capsys):
    from edge_runtime import cli

    (tmp_path / "images").mkdir()
    station = write_station(tmp_path, """
        - type: mqtt
          host: broker.plant.local
          topic_prefix: acme/s7
          username: station7
          password_file: missing.pw
    """)
    assert cli.main(["validate", str(station)]) == 1      # valid; its bundle is not here
    err = capsys.readouterr().err
    assert "outputs[0].tls_ca: not set: the password for 'station7' crosses the network" in err
    out = build_output(load_station(station).outputs[0])
    with pytest.raises(OutputError) as exc:
        out.start()
    assert f"password_file {tmp_path / 'missing.pw'}: cannot read it" in str(exc.value)


def test_two_outputs_on_one_outbox_file_the_second_is_refused_naming_the_first(tmp_path):
    # Probe 63: two station files naming one `outbox:` (each with its own state_dir) both started; after a broker
    # outage station B, which had inspected nothing, published station A's six OK records under B's own topic
    # prefix. One outbox has one sender: the second start is refused while the first holds it.
    port = mb.free_port()
    first = make_output(tmp_path, port, close_timeout_s=0.1)
    first.start()
    other_cfg = MqttConfig(host="127.0.0.1", port=port, topic_prefix="acme/plant1/line4/station9",
                           outbox=str(tmp_path / "outbox.sqlite"))
    other_cfg.validate()
    second = MqttOutput(other_cfg)
    try:
        with pytest.raises(OutputError, match=r"in use by another MQTT output \(pid \d+\)"):
            second.start()
    finally:
        first.close()
    second.start()   # the first has let go of it: a restart of the station takes its own outbox again
    second.close()


def test_two_stations_on_one_client_id_are_named_as_the_cause_of_the_dropped_connections(tmp_path, broker, caplog):
    """Probe 63: two stations with one topic_prefix (so one default client id) took the broker session from each
    other every second or two, their retained states alternating for every consumer, and each logged only
    'connection lost'. The repeated short sessions are now logged as an error naming the client id."""
    import logging

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = make_output(tmp_path / "a", broker.port), make_output(tmp_path / "b", broker.port)
    assert first.cfg.effective_client_id == second.cfg.effective_client_id
    with caplog.at_level(logging.ERROR, logger="edge_runtime.outputs.mqtt_output"):
        first.start()
        second.start()
        try:
            deadline = time.monotonic() + 60
            while "taking it over each time" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            first.close()
            second.close()
    assert f"another client with client_id {first.cfg.effective_client_id!r} is probably taking it over" in caplog.text


def test_one_station_alone_keeps_its_connection_and_logs_no_takeover(tmp_path, broker, caplog):
    import logging

    out = make_output(tmp_path, broker.port)
    with caplog.at_level(logging.ERROR, logger="edge_runtime.outputs.mqtt_output"):
        out.start()
        try:
            for i in range(3):
                out.publish(make_result(i))
            time.sleep(3)
        finally:
            out.close()
    assert out.connections == 1 and "taking it over" not in caplog.text


def test_an_outbox_queued_under_another_prefix_or_by_lines_is_not_published_as_this_stations(tmp_path):
    """Probe 63: an outbox reopened under another topic_prefix (a prefix edited, a state_dir copied) published its
    records as the new prefix's results, and a multi-line station's outbox reopened by a single-line one published
    every line's records as that station's. Such an outbox is refused at start, naming why; nothing is sent."""
    from edge_runtime.outputs.mqtt_outbox import Outbox

    path = tmp_path / "outbox.sqlite"
    old = Outbox(str(path), 100)
    assert old.claim("acme/plant1/line9/station2") is None
    old.append(b'{"frame_id": 0, "verdict": "OK"}', time.time())
    old.close()
    out = make_output(tmp_path, mb.free_port())          # PREFIX, another station's name
    with pytest.raises(OutputError, match=r"1 records were queued under topic_prefix 'acme/plant1/line9/station2', "
                                          r"not this station's 'acme/plant1/line3/station7'"):
        out.start()
    reopened = Outbox(str(path), 100)                    # the lock was released; the records are still there
    assert len(reopened) == 1
    reopened.ack([s for s, *_ in reopened.peek(0, 10)])
    assert reopened.claim(PREFIX) is None                # empty: any station may take it over
    reopened.append(b'{"frame_id": 1, "verdict": "OK"}', time.time(), line="left")
    reopened.close()
    with pytest.raises(OutputError, match="its records belong to lines left of a multi-line station"):
        make_output(tmp_path, mb.free_port()).start()


def test_a_delete_that_fails_on_a_full_disk_is_retried_and_the_sender_goes_on(tmp_path, broker):
    # probe 111: the outbox's delete of an acknowledged record raised "database or disk is full" on the sender
    # thread, which died: nothing was published again until a restart, the retained state still said ready.
    import sqlite3
    sub = mb.Subscriber(broker.port, [RESULT], persistent=False)
    out = make_output(tmp_path, broker.port)
    out.start()
    try:
        assert sub.wait_for(lambda s: out._connected)
        real, failures = out.outbox.ack, [1]

        def ack(seqs):
            if failures:
                failures.pop()
                raise sqlite3.OperationalError("database or disk is full")
            return real(seqs)

        out.outbox.ack = ack
        out.publish(make_result(1))
        assert sub.wait_for(lambda s: not failures and frame_ids(s) == [1])
        for i in range(2, 6):
            out.publish(make_result(i))
        assert sub.wait_for(lambda s: frame_ids(s) == [1, 2, 3, 4, 5] and out.queued() == 0)
        assert out._thread.is_alive() and out.counters()["mqtt_published"] == 5
        assert out.counters()["mqtt_outbox_errors"] == 1
    finally:
        out.close()
        sub.close()


def test_records_queued_while_a_commit_runs_on_a_full_memory_queue_are_not_lost(tmp_path):
    # probe 111: with the outbox's disk stuck, the memory queue filled and each new record dropped the oldest, which
    # the writer's batch held; when the commit then went through, the writer removed as many records from the
    # queue's front as it had written: the new ones, never written, lost uncounted.
    import sqlite3
    port = mb.free_port()   # broker down: everything stays in the outbox
    out = make_output(tmp_path, port, outbox_max_records=10)
    out.start()
    try:
        real = out.outbox.append_many
        entered, release, calls = threading.Event(), threading.Event(), []

        def append_many(records):
            calls.append(len(records))
            if len(calls) == 1:
                raise sqlite3.OperationalError("database or disk is full")
            entered.set()
            release.wait(10)
            return real(records)

        out.outbox.append_many = append_many
        for i in range(10):
            out.publish(make_result(i))
        assert entered.wait(10)            # the writer commits its batch (frames 0..9) ...
        for i in range(10, 13):
            out.publish(make_result(i))    # ... while three more come: the queue is full, 0..2 go
        release.set()
        assert out.wait_committed(10)
        queued = [json.loads(p)["frame_id"] for _s, _t, p, _l in out.outbox.peek(0, 100)]
        assert queued == list(range(3, 13))
        assert out.dropped == 3
    finally:
        out.close()


def test_an_outbox_read_error_drops_the_connection_and_the_sender_comes_back(tmp_path, broker):
    # probe 111: "disk I/O error" reading the outbox killed the sender thread; its connection stayed up, the retained
    # state said ready and no record was published again until a restart.
    import sqlite3
    sub = mb.Subscriber(broker.port, [RESULT], persistent=False)
    out = make_output(tmp_path, broker.port)
    out.start()
    try:
        assert sub.wait_for(lambda s: out._connected)
        real, failures = out.outbox.peek, [1]

        def peek(after, limit):
            if failures:
                failures.pop()
                raise sqlite3.OperationalError("disk I/O error")
            return real(after, limit)

        out.outbox.peek = peek
        for i in range(1, 4):
            out.publish(make_result(i))
        assert sub.wait_for(lambda s: frame_ids(s) == [1, 2, 3] and out.queued() == 0)
        assert out._thread.is_alive() and not failures
    finally:
        out.close()
        sub.close()


def test_records_the_outbox_could_not_take_before_a_stop_are_reported_lost(tmp_path, caplog):
    # probe 111: with the outbox's disk full, records waited in memory; a stop then dropped them without a word.
    import sqlite3
    out = make_output(tmp_path, mb.free_port(), close_timeout_s=0.1)
    out.start()

    def append_many(records):
        raise sqlite3.OperationalError("database or disk is full")

    out.outbox.append_many = append_many
    for i in range(3):
        out.publish(make_result(i))
    out.close()
    assert any("3 records could not be written to the outbox" in r.getMessage() and r.levelname == "ERROR"
               for r in caplog.records)


def test_the_retained_state_follows_a_part_that_is_not_ok_after_an_ok_one(tmp_path, broker):
    """Probe 111's note: after an OK part, a FAULT while the line stayed ready left the retained state's
    last_verdict at OK for up to state_interval_s (60 s here); the state goes out at once on such a change."""
    sub = mb.Subscriber(broker.port, [STATE], persistent=False)
    status = {"bundle_id": "b1", "last_verdict": None}
    out = make_output(tmp_path, broker.port)
    out.bind_state(lambda: dict(status))
    out.start()
    try:
        out.set_fault(None)
        out.set_ready(True)
        status["last_verdict"] = "OK"
        out.publish(make_result(1, Verdict.OK))
        out.set_fault("x")                            # any change: the state with last_verdict OK goes out
        out.set_fault(None)
        assert sub.wait_for(lambda s: any(json.loads(p).get("last_verdict") == "OK" for p in s.payloads(STATE)))
        status["last_verdict"] = "FAULT"
        out.publish(make_result(2, Verdict.FAULT))
        assert sub.wait_for(lambda s: json.loads(s.payloads(STATE)[-1]).get("last_verdict") == "FAULT", timeout=5)
    finally:
        out.close()
        sub.close()
