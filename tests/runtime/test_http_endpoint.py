import http.client
import json
import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from edge_runtime import cli
from edge_runtime.http_endpoint import HttpConfig, HttpEndpoint, StationStatus
from edge_runtime.latency_stats import LatencyStats
from edge_runtime.schema import ConfigError, from_mapping
from edge_runtime.triggers import SoftwareTrigger


def request(endpoint: HttpEndpoint, path: str, method: str = "GET", data: bytes | None = None):
    """(status code, content type, body) of a real HTTP request to the endpoint."""
    req = urllib.request.Request(f"http://127.0.0.1:{endpoint.port}{path}", method=method, data=data)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.headers.get("Content-Type"), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("Content-Type"), err.read()


class Station:
    """A provider the tests change between requests."""

    def __init__(self):
        self.latency = LatencyStats()
        self.status = StationStatus(state="not_ready", reason="loading bundle", uptime_s=1.5)
        self.fail = False

    def __call__(self) -> StationStatus:
        if self.fail:
            raise RuntimeError("daemon state broken")
        return self.status


@pytest.fixture
def station():
    return Station()


@pytest.fixture
def serve(station):
    started = []

    def _serve(trigger=None, **cfg):
        ep = HttpEndpoint(HttpConfig(port=0, **cfg), station, fire_trigger=trigger.fire if trigger else None)
        ep.start()
        started.append(ep)
        return ep

    yield _serve
    for ep in started:
        ep.stop()


def test_healthz_is_503_until_ready_then_200(serve, station):
    ep = serve()
    code, ctype, body = request(ep, "/healthz")
    assert code == 503 and ctype == "application/json"
    doc = json.loads(body)
    assert doc == {"status": "not_ready", "reason": "loading bundle", "bundle_id": None, "frames": 0,
                   "last_verdict": None, "uptime_s": 1.5}

    station.status = StationStatus(state="ready", bundle_id="bolt-v3", frames=12, last_verdict="NG", uptime_s=60.0)
    code, _, body = request(ep, "/healthz")
    assert code == 200
    doc = json.loads(body)
    assert doc["status"] == "ready" and doc["bundle_id"] == "bolt-v3" and doc["frames"] == 12
    assert doc["last_verdict"] == "NG"

    station.status = StationStatus(state="fault", reason="camera lost", bundle_id="bolt-v3")
    code, _, body = request(ep, "/healthz")
    assert code == 503 and json.loads(body)["reason"] == "camera lost"


def test_healthz_when_provider_fails_is_fault(serve, station):
    ep = serve()
    station.fail = True
    code, _, body = request(ep, "/healthz")
    assert code == 503 and json.loads(body)["status"] == "fault"
    code, _, _ = request(ep, "/metrics")
    assert code == 500


def parse_samples(text: str) -> dict[str, float]:
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_metrics_exposition(serve, station):
    station.latency.add({"features": 12.0, "total": 20.0})
    station.latency.add({"features": 40.0, "total": 60.0})
    station.status = StationStatus(
        state="ready", bundle_id='line "A"', frames=5, verdicts={"OK": 3, "NG": 1, "FAULT": 1}, faults=2, skipped=4,
        last_heartbeat_age_s=0.25, latency=station.latency, uptime_s=10.0, counters={"output_errors": 7},
    )
    ep = serve()
    code, ctype, body = request(ep, "/metrics")
    assert code == 200 and ctype.startswith("text/plain; version=0.0.4")
    text = body.decode()
    samples = parse_samples(text)
    assert samples['edge_verdicts_total{verdict="OK"}'] == 3
    assert samples['edge_verdicts_total{verdict="NG"}'] == 1
    assert samples['edge_verdicts_total{verdict="FAULT"}'] == 1
    assert samples["edge_frames_total"] == 5
    assert samples["edge_faults_total"] == 2
    assert samples["edge_skipped_total"] == 4
    assert samples["edge_output_errors_total"] == 7
    assert samples["edge_ready"] == 1 and samples["edge_fault"] == 0
    assert samples["edge_last_heartbeat_age_seconds"] == 0.25
    assert samples['edge_bundle_info{bundle_id="line \\"A\\""}'] == 1
    assert samples['edge_stage_latency_seconds_bucket{stage="features",le="0.015"}'] == 1
    assert samples['edge_stage_latency_seconds_bucket{stage="features",le="0.05"}'] == 2
    assert samples['edge_stage_latency_seconds_count{stage="total"}'] == 2
    assert "# TYPE edge_verdicts_total counter" in text
    assert "# TYPE edge_stage_latency_seconds histogram" in text


def test_metrics_before_any_frame_show_zero_verdicts_and_not_ready(serve, station):
    ep = serve()
    samples = parse_samples(request(ep, "/metrics")[2].decode())
    assert samples['edge_verdicts_total{verdict="OK"}'] == 0
    assert samples['edge_verdicts_total{verdict="FAULT"}'] == 0
    assert samples["edge_ready"] == 0
    assert "edge_last_heartbeat_age_seconds" not in samples


def test_trigger_forbidden_unless_allowed(serve):
    trig = SoftwareTrigger()
    ep = serve(trigger=trig)  # allow_trigger defaults to false
    code, _, _ = request(ep, "/trigger", method="POST", data=b"")
    assert code == 403
    assert trig.wait(0.0) is None


def test_trigger_fires_when_allowed(serve, station):
    station.status = StationStatus(state="ready")
    trig = SoftwareTrigger()
    ep = serve(trigger=trig, allow_trigger=True)
    code, _, body = request(ep, "/trigger", method="POST", data=b"{}")
    assert code == 202 and json.loads(body) == {"triggered": True}
    assert trig.wait(0.0) is not None


def test_a_trigger_refused_for_its_backlog_is_503_not_202(serve, station):
    """A 202 promises an answer and a record; beyond MAX_FOLDED waiting triggers none would come (probe 47)."""
    from edge_runtime.triggers import MAX_FOLDED

    station.status = StationStatus(state="ready")
    trig = SoftwareTrigger()
    ep = serve(trigger=trig, allow_trigger=True)
    codes = [request(ep, "/trigger", method="POST", data=b"")[0] for _ in range(MAX_FOLDED + 3)]
    assert codes == [202] * (MAX_FOLDED + 1) + [503] * 2
    assert trig.wait(0.0).missed == MAX_FOLDED


def test_a_station_whose_lines_holds_one_line_takes_its_trigger_by_name_too(station):
    """POST /trigger/<line> (the path of a station with several lines) had been 404 for `lines:` with one line."""
    station.status = StationStatus(state="ready")
    trig = SoftwareTrigger()
    ep = HttpEndpoint(HttpConfig(port=0, allow_trigger=True), station, fire_trigger=trig.fire, line_name="left")
    ep.start()
    try:
        assert request(ep, "/trigger/right", method="POST", data=b"")[0] == 404
        assert trig.wait(0.0) is None
        code, _, body = request(ep, "/trigger/left", method="POST", data=b"")
        assert code == 202 and json.loads(body) == {"triggered": True} and trig.wait(0.0) is not None
    finally:
        ep.stop()


def test_trigger_is_503_and_not_fired_while_the_station_is_not_ready(serve, station):
    trig = SoftwareTrigger()
    ep = serve(trigger=trig, allow_trigger=True)
    for state, reason in (("not_ready", "loading bundle"), ("fault", "source: camera unplugged")):
        station.status = StationStatus(state=state, reason=reason)
        code, _, body = request(ep, "/trigger", method="POST", data=b"")
        assert code == 503 and json.loads(body)["triggered"] is False and reason in json.loads(body)["error"]
    assert trig.wait(0.0) is None and trig.fired == 0, "a trigger the station cannot serve is not queued"


def test_trigger_allowed_but_station_not_software_triggered(serve):
    ep = serve(allow_trigger=True)
    code, _, _ = request(ep, "/trigger", method="POST", data=b"")
    assert code == 409


def test_unknown_paths_and_methods(serve):
    trig = SoftwareTrigger()
    ep = serve(trigger=trig, allow_trigger=True)
    assert request(ep, "/nope")[0] == 404
    assert request(ep, "/healthz", method="POST", data=b"")[0] == 404
    assert request(ep, "/trigger")[0] == 404           # GET does not fire
    assert request(ep, "/trigger", method="DELETE")[0] == 501
    assert trig.wait(0.0) is None


def test_port_is_exposed_and_stop_frees_it(station):
    ep = HttpEndpoint(HttpConfig(port=0), station)
    with pytest.raises(RuntimeError):
        ep.port
    ep.start()
    port = ep.port
    assert port > 0
    ep.stop()
    again = HttpEndpoint(HttpConfig(port=port), station)  # the port is free again
    again.start()
    try:
        assert request(again, "/healthz")[0] == 503
    finally:
        again.stop()


def test_config():
    cfg = from_mapping(HttpConfig, {"port": 9100, "allow_trigger": True}, "http")
    assert cfg.host == "127.0.0.1" and cfg.port == 9100 and cfg.allow_trigger and cfg.enabled
    with pytest.raises(ConfigError, match="port"):
        from_mapping(HttpConfig, {"port": 70000}, "http")
    with pytest.raises(ConfigError, match="unknown key 'type'"):
        from_mapping(HttpConfig, {"type": "http"}, "http")


# ---- bounded connections ---------------------------------------------------------------------------------------

def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_flood_of_idle_connections_is_bounded_and_health_still_answers(serve, station):
    station.status = StationStatus(state="ready", bundle_id="b", uptime_s=1.0)
    ep = serve(max_connections=8, idle_timeout_s=0.5)
    threads_before, fds_before = threading.active_count(), _open_fds()
    idle: list[socket.socket] = []
    try:
        for _ in range(300):  # bounded: 300 idle clients that connect and never send a request
            s = socket.create_connection(("127.0.0.1", ep.port), timeout=5)
            idle.append(s)
        # The server holds at most max_connections of them (a thread and an fd each); the rest were turned away.
        assert ep.active_connections <= 8
        assert threading.active_count() - threads_before <= 8 + 1
        # Client side: 300 fds in this process; server side: at most 8 more (plus a few for the interpreter).
        assert _open_fds() - fds_before <= 300 + 8 + 4
        # A turned-away client reads a 503, not a hang. Which ones were turned away depends on how fast the 300
        # connections came (a slot frees after idle_timeout_s): the ones right after the first 8 were, on any machine.
        answers = [s.recv(200) for s in idle[8:40]]
        assert any(a.startswith(b"HTTP/1.1 503") for a in answers), answers[:3]
        assert all(a.startswith(b"HTTP/1.1 503") or a == b"" for a in answers), answers
        # The idle ones time out and free their slots, so health answers while all 300 sockets are still open.
        deadline = time.monotonic() + 30
        while True:
            code, _, body = request(ep, "/healthz")
            if code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert code == 200 and json.loads(body)["status"] == "ready"
        assert ep.rejected_connections > 0
    finally:
        for s in idle:
            s.close()


def test_clients_dripping_their_request_byte_by_byte_cannot_hold_the_endpoint(serve, station):
    """Slowloris: one header byte every 0.3 s never trips a per-recv timeout; the whole exchange has a deadline."""
    station.status = StationStatus(state="ready", bundle_id="b", uptime_s=1.0)
    ep = serve(max_connections=2, idle_timeout_s=1.0)
    stop = threading.Event()

    def drip() -> None:
        try:
            with socket.create_connection(("127.0.0.1", ep.port), timeout=5) as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\n")
                while not stop.is_set():
                    s.sendall(b"X")
                    time.sleep(0.3)
        except OSError:
            pass   # the server shut the socket: what this test wants

    drippers = [threading.Thread(target=drip, daemon=True) for _ in range(2)]
    for t in drippers:
        t.start()
    try:
        time.sleep(0.5)                              # both slots are taken by the drippers
        deadline = time.monotonic() + 10
        while True:
            code = request(ep, "/healthz")[0]
            if code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert code == 200, "slow clients held every slot past the deadline"
    finally:
        stop.set()


def test_clients_from_unlisted_addresses_take_no_slot_and_health_answers_at_once(serve, station):
    """A slow-client flood had kept /healthz at 503; with allowed_clients the flood's sockets (from another
    address) are closed before they take a slot, so the listed monitor is answered at once, mid-flood."""
    station.status = StationStatus(state="ready", bundle_id="b", uptime_s=1.0)
    ep = serve(max_connections=2, idle_timeout_s=30.0, allowed_clients=["127.0.0.1"])
    flood: list[socket.socket] = []
    try:
        for _ in range(20):   # from 127.0.0.2 (any 127/8 address is this machine's loopback)
            flood.append(socket.create_connection(("127.0.0.1", ep.port), timeout=5, source_address=("127.0.0.2", 0)))
        for s in flood:
            assert s.recv(200) == b""        # closed unanswered: no 503, no slot, no thread
        code, _, body = request(ep, "/healthz")
        assert code == 200 and json.loads(body)["status"] == "ready"
        assert ep.rejected_connections == 0       # no client was turned away for want of a slot
        assert ep._server.clients.refused == 20
    finally:
        for s in flood:
            s.close()


def test_allowed_clients_are_validated():
    assert from_mapping(HttpConfig, {"allowed_clients": ["10.0.0.7", "10.0.0.0/24"]}, "http").allowed_clients
    with pytest.raises(ConfigError, match=r"http.allowed_clients\[0\]: 'monitor' is not an IP address or network"):
        from_mapping(HttpConfig, {"allowed_clients": ["monitor"]}, "http")


def test_connection_limits_are_validated():
    with pytest.raises(ConfigError, match="http.max_connections: must be 1..1024, got 0"):
        from_mapping(HttpConfig, {"max_connections": 0}, "http")
    with pytest.raises(ConfigError, match="http.idle_timeout_s: must be > 0"):
        from_mapping(HttpConfig, {"idle_timeout_s": 0}, "http")


def test_a_host_the_socket_cannot_encode_is_refused_by_validate(tmp_path, device_bundle, capsys):
    """Probe 100: http.host "x\\ud800" (a YAML escape) validated, then run died with bind's TypeError 'encoding of
    hostname failed' and a traceback; a 64-character label the same (run: a clean error, but validate said valid)."""
    for host in ("x\ud800", "a" * 64 + ".example", "a..b"):
        with pytest.raises(ConfigError, match=r"http.host: .* is not a host name or address"):
            from_mapping(HttpConfig, {"host": host}, "http")
    (tmp_path / "images").mkdir()
    station = tmp_path / "station.yaml"
    station.write_text(f"bundle: {device_bundle}\nsource: {{type: folder, path: images}}\n"
                       'http: {host: "x\\ud800", port: 0}\nstate_dir: state\n')
    assert cli.main(["validate", str(station)]) == 2
    assert "http.host: 'x\\ud800' is not a host name or address" in capsys.readouterr().err
    assert cli.main(["run", "--config", str(station)]) == 2


# ---- Origin / Host (cross-site requests, DNS rebinding) --------------------------------------------------------

def raw_request(endpoint: HttpEndpoint, path: str, method: str = "GET", headers: dict | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", endpoint.port, timeout=10)
    try:
        conn.request(method, path, body=b"" if method == "POST" else None, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_cross_site_origin_cannot_fire_the_trigger(serve, station):
    station.status = StationStatus(state="ready", bundle_id="b", frames=0, last_verdict=None, uptime_s=1.0)
    trig = SoftwareTrigger()
    ep = serve(trigger=trig, allow_trigger=True)
    here = f"127.0.0.1:{ep.port}"
    code, body = raw_request(ep, "/trigger", "POST", {"Host": here, "Origin": "http://evil.example"})
    assert code == 403 and b"cross-site request refused" in body
    code, _ = raw_request(ep, "/trigger", "POST", {"Host": here, "Origin": "null"})
    assert code == 403
    assert trig.wait(0.0) is None
    # Same origin, or no Origin at all (curl, a PLC gateway), still works.
    assert raw_request(ep, "/trigger", "POST", {"Host": here, "Origin": f"http://{here}"})[0] == 202
    assert raw_request(ep, "/trigger", "POST", {"Host": here})[0] == 202


def test_foreign_host_name_is_refused_on_trigger_and_metrics(serve):
    trig = SoftwareTrigger()
    ep = serve(trigger=trig, allow_trigger=True, allowed_hosts=["station-7.plant.lan"])
    # DNS rebinding: the attacker's name resolved to 127.0.0.1, the browser sends the attacker's Host.
    for path, method in (("/trigger", "POST"), ("/metrics", "GET")):
        code, body = raw_request(ep, path, method, {"Host": f"rebind.evil.example:{ep.port}"})
        assert code == 403 and b"is not a name of this station" in body
    assert trig.wait(0.0) is None
    for host in (f"127.0.0.1:{ep.port}", f"localhost:{ep.port}", f"[::1]:{ep.port}", "10.0.0.5",
                 f"STATION-7.plant.lan:{ep.port}"):
        assert raw_request(ep, "/metrics", "GET", {"Host": host})[0] == 200, host
    # Health is for probes and stays open.
    assert raw_request(ep, "/healthz", "GET", {"Host": "anything.example"})[0] == 503


def test_listening_beyond_loopback_without_authentication_warns(station, caplog, tmp_path, capsys):
    assert HttpConfig(host="127.0.0.1").warnings() == []
    with caplog.at_level(logging.WARNING, logger="edge_runtime.http_endpoint"):
        HttpEndpoint(HttpConfig(host="0.0.0.0", port=0, allow_trigger=True), station)
    text = caplog.text
    assert "http.host 0.0.0.0: the endpoint has no authentication" in text
    assert "POST /trigger is allowed" in text
    station_file = tmp_path / "station.yaml"
    station_file.write_text("bundle: b\nsource: {type: folder, path: x}\nhttp: {host: 0.0.0.0}\n")
    assert cli.main(["validate", str(station_file)]) == 1     # valid; bundle b and folder x are not here
    assert "warning: " in capsys.readouterr().err


def test_a_taken_http_port_stops_the_start_with_the_reason_and_no_part_is_inspected(tmp_path, device_bundle, capsys):
    # Another process on the port would answer /healthz for this station; running on without the endpoint hid it
    # behind one ERROR line while the plant's monitor saw the other process.
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"not inspected")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        station = tmp_path / "station.yaml"
        station.write_text(f"bundle: {device_bundle}\nsource: {{type: folder, path: images}}\n"
                           f"outputs: [{{type: result_log, path: results.jsonl}}]\n"
                           f"http: {{port: {port}}}\nstate_dir: state\n")
        assert cli.main(["run", "--config", str(station)]) == 1
    err = capsys.readouterr().err
    assert f"http endpoint 127.0.0.1:{port} cannot listen" in err and "ss -ltnp 'sport = :" in err
    log = tmp_path / "results.jsonl"
    assert not log.exists() or log.read_text() == ""


def test_an_http_host_that_is_no_address_here_is_not_blamed_on_another_process(tmp_path, device_bundle, capsys):
    """Probe 73: http.host 10.255.255.1 (no address of the machine) stopped the start with 'another process holds
    the port (`ss -ltnp 'sport = :0'` names it)'."""
    (tmp_path / "images").mkdir()
    station = tmp_path / "station.yaml"
    station.write_text(f"bundle: {device_bundle}\nsource: {{type: folder, path: images}}\n"
                       "http: {host: 192.0.2.1, port: 0}\nstate_dir: state\n")   # 192.0.2.0/24: documentation only
    assert cli.main(["run", "--config", str(station)]) == 1
    err = capsys.readouterr().err
    assert "http endpoint 192.0.2.1:0 cannot listen" in err and "another process" not in err
    assert "http.host 192.0.2.1 is not an address of this machine" in err


def test_lines_health_and_metrics_name_a_line_whose_loop_stalled_outside_an_inspection():
    """Probe 106: one of two lines whose loop stopped going round with no frame in inspection (a source read on a hung
    share) made the station's aggregate raise (max() of no busy line): /healthz answered only 'station status
    unavailable (internal error)' and /metrics 503, with a traceback per request, while one line was stuck."""
    from edge_runtime.lines_http import LinesHttpEndpoint, aggregate_status

    statuses = {"a": StationStatus(state="ready", last_heartbeat_age_s=9.0, loop_stall_after_s=5.0),
                "b": StationStatus(state="ready", last_heartbeat_age_s=0.1, loop_stall_after_s=5.0)}
    endpoint = LinesHttpEndpoint(HttpConfig(port=0), lambda: statuses, lambda: aggregate_status(statuses, 1.0),
                                 lambda name: True)
    code, _, body = endpoint.handle_get("/healthz")
    doc = json.loads(body)
    assert code == 503 and doc["status"] == "stalled" and "last went round 9.0 s ago" in doc["reason"]
    assert doc["lines"]["a"]["status"] == "stalled" and doc["lines"]["b"]["status"] == "ready"
    code, _, body = endpoint.handle_get("/metrics")
    assert code == 200 and 'edge_ready{line="b"} 1' in body.decode()


def test_a_trigger_whose_body_never_came_whole_is_not_fired(serve, station):
    """Probe 104: a POST /trigger declaring 100 bytes and dripping them never tripped the per-recv timeout; the reaper
    shut the socket at the deadline, the read returned what had come, and the trigger fired 5.5 s after it was sent
    for a request that got no answer (a client retrying would capture a second part)."""
    station.status = StationStatus(state="ready", bundle_id="b", uptime_s=1.0)
    trig = SoftwareTrigger()
    ep = serve(trigger=trig, allow_trigger=True, idle_timeout_s=1.0)
    with socket.create_connection(("127.0.0.1", ep.port), timeout=5) as s:
        s.sendall(b"POST /trigger HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n")
        deadline = time.monotonic() + 5
        try:
            while time.monotonic() < deadline:
                s.sendall(b"x")
                time.sleep(0.3)
        except OSError:
            pass                              # shut by the reaper
        s.settimeout(2)
        try:
            answer = s.recv(1000)
        except OSError:
            answer = b""
    assert answer == b""                      # no answer...
    time.sleep(0.3)
    assert trig.wait(0.0) is None             # ...and no part captured for it
    code, _, _ = request(ep, "/trigger", method="POST", data=b"{}")
    assert code == 202 and trig.wait(0.0) is not None   # a whole request still fires


def test_clients_that_leave_before_their_answer_cost_no_traceback(serve, station, capfd):
    """Probe 104: socketserver printed a 25-line traceback to stderr (the journal) for every client that reset its
    connection before the answer: 200 such requests wrote 5000 lines."""
    import struct

    station.status = StationStatus(state="ready", bundle_id="b", uptime_s=1.0)
    ep = serve()
    for _ in range(20):
        s = socket.create_connection(("127.0.0.1", ep.port), timeout=5)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))   # close = reset
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        s.close()
    deadline = time.monotonic() + 5
    while ep.active_connections and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    assert "Traceback" not in capfd.readouterr().err
    assert request(ep, "/healthz")[0] == 200
