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
