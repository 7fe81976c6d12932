"""The operator page answers what any client on the plant network may send, and every record the line makes, without
a 500: each 500 is an 'Exception in ASGI application' traceback (~46 lines) in the station's log, and a page whose
JSON fails stops updating."""
from __future__ import annotations

import http.client
import json
import math
from types import SimpleNamespace

import pytest
from extras import require

require("starlette", "page")
require("uvicorn", "page")

from edge_runtime.operator_page.config import PageConfig  # noqa: E402
from edge_runtime.operator_page.server import OperatorPage  # noqa: E402
from edge_runtime.records import InspectionResult, Verdict  # noqa: E402


@pytest.fixture
def page(tmp_path):
    line = SimpleNamespace(name=None, recipes=None, rollout=None, status=lambda: None, pipeline=None,
                           cfg=SimpleNamespace(bundle=str(tmp_path / "bundle"), state_dir=None))
    p = OperatorPage(PageConfig(enabled=True, port=0), [None])
    p.attach([line])
    p.start()
    yield p
    p.stop()


def _get(page: OperatorPage, path: str, headers: dict | None = None, method: str = "GET", body: bytes | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", page.port, timeout=10)
    conn.request(method, path, body=body, headers={"Host": f"127.0.0.1:{page.port}", **(headers or {})})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, data


def test_a_part_faulted_with_no_bundle_in_service_is_on_the_page_as_the_result_log_writes_it(page):
    """Probe 104: a trigger while no bundle was in service (bundle missing at start) is answered FAULT with threshold
    NaN. /api/parts then answered 500 ('Out of range float values are not JSON compliant') for as long as the part
    was among the last `history` parts, and the live view, which reads /api/parts before it opens its event stream,
    never updated, even after the bundle was back. The result log writes the threshold as null; so does the page."""
    page.history.publish(InspectionResult(
        frame_id=0, source="folder:in", verdict=Verdict.FAULT, score=None, normalized_score=None, threshold=math.nan,
        timings_ms={"total": 2.0}, bundle_id="none", error="triggered part not inspected: station not ready"))
    status, body = _get(page, "/api/parts?limit=200")
    assert status == 200, body
    assert json.loads(body)[0]["threshold"] is None
    status, body = _get(page, "/part/0")
    assert status == 200 and b"threshold -" in body
    # The live stream carries JSON a browser parses (JSON.parse refuses NaN).
    latest = page.history.latest()
    assert json.loads(json.dumps(latest, allow_nan=False))["verdict"] == "FAULT"


@pytest.mark.parametrize("headers", [{"Origin": "http://["}, {"Referer": "http://[x/login"}])
def test_an_origin_or_referer_that_is_no_url_is_refused_not_a_server_error(page, headers):
    """Probe 104: urlsplit raised 'Invalid IPv6 URL' on the cross-site check of any POST, logged in: a 500 and a
    46-line traceback per request; 500 such requests wrote 1.6 MB (23,000 lines) to the log in a second."""
    status, body = _get(page, "/login", headers, method="POST", body=b"name=a&password=b")
    assert status == 403 and b"not a URL" in body


@pytest.mark.parametrize("path", ["/part/", "/img/", "/line/line/part/"])
def test_a_frame_id_of_thousands_of_digits_is_not_found_not_a_server_error(page, path):
    """Probe 104: int() of a 5000-digit frame id raised (Python's 4300-digit limit): a 500 and a traceback."""
    status, _ = _get(page, path + "9" * 5000 + ("/thumb.jpg" if path == "/img/" else ""))
    assert status == 404
    status, _ = _get(page, path + "12" + ("/thumb.jpg" if path == "/img/" else ""))
    assert status == 404                 # an id of the right size is still looked up (not in the history)


def test_wrong_passwords_sent_at_once_are_hashed_no_more_than_the_gate_allows(tmp_path):
    """Probe 104: the failed-login gate was checked when a request arrived, before it queued for the one scrypt at a
    time; 40 guesses sent at once were all hashed (all 303), not 5, so a client guessed ~60 passwords a minute."""
    import threading

    from edge_runtime.operator_page.app import LOGIN_FAILURES_ALLOWED
    from edge_runtime.operator_page.auth import hash_password
    from edge_runtime.operator_page.config import PageUser

    line = SimpleNamespace(name=None, recipes=None, rollout=None, status=lambda: None, pipeline=None,
                           cfg=SimpleNamespace(bundle=str(tmp_path / "bundle"), state_dir=None))
    users = [PageUser(name="otto", role="operator", password_hash=hash_password("right", n=2 ** 12))]
    p = OperatorPage(PageConfig(enabled=True, port=0, users=users), [None])
    p.attach([line])
    p.start()
    try:
        codes: list[int] = []

        def guess(i: int) -> None:
            codes.append(_get(p, "/login", {"Origin": f"http://127.0.0.1:{p.port}",
                                            "Content-Type": "application/x-www-form-urlencoded"},
                              method="POST", body=f"name=otto&password=guess{i}".encode())[0])

        threads = [threading.Thread(target=guess, args=(i,)) for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(codes) == [303] * LOGIN_FAILURES_ALLOWED + [429] * (20 - LOGIN_FAILURES_ALLOWED)
    finally:
        p.stop()
