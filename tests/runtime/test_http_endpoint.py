import json
import urllib.error
import urllib.request

import pytest

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
