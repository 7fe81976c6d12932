"""The operator page holds a bounded number of sockets, none idle for long: uvicorn's limit_concurrency answers 503
to a request but accepts and keeps every socket, so idle ones took every file descriptor of the daemon (probe 80:
4,200 idle sockets on the page, the folder source could not list its images, 58 of 60 parts FAULT)."""
from __future__ import annotations

import http.client
import socket
import time
from types import SimpleNamespace

import pytest
from extras import require

require("starlette", "page")
require("uvicorn", "page")

from edge_runtime.operator_page import server as page_server  # noqa: E402
from edge_runtime.operator_page.config import PageConfig  # noqa: E402
from edge_runtime.operator_page.server import OperatorPage  # noqa: E402


def _closed(sock: socket.socket) -> bool:
    """True when the server closed `sock` (EOF or reset after whatever it sent)."""
    sock.settimeout(0.05)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return True
    except (socket.timeout, BlockingIOError):
        return False
    except OSError:
        return True


@pytest.fixture
def page(tmp_path, monkeypatch):
    monkeypatch.setattr(page_server, "PAGE_MAX_CONNECTIONS", 8)
    monkeypatch.setattr(page_server, "PAGE_REQUEST_TIMEOUT_S", 0.5, raising=False)
    line = SimpleNamespace(name=None, recipes=None, rollout=None, status=lambda: None, pipeline=None,
                           cfg=SimpleNamespace(bundle=str(tmp_path / "bundle"), state_dir=None))
    p = OperatorPage(PageConfig(enabled=True, port=0), [None])
    p.attach([line])
    p.start()
    yield p
    p.stop()


def test_idle_sockets_beyond_the_limit_are_closed_and_idle_ones_time_out(page):
    socks = [socket.create_connection(("127.0.0.1", page.port), timeout=5) for _ in range(40)]
    time.sleep(0.3)
    closed_at_once = sum(_closed(s) for s in socks)
    assert closed_at_once >= 40 - 8 - 2        # all but the 8 the page holds (before: none closed)
    # One dripping a header and the rest, sending nothing, are closed once they have begun no request for the timeout.
    drip = socket.create_connection(("127.0.0.1", page.port), timeout=5)
    drip.sendall(b"GET / HTTP/1.1\r\n")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not _closed(drip):
        try:
            drip.sendall(b"X: y\r\n")
        except OSError:
            break
        time.sleep(0.1)
    assert _closed(drip)
    assert all(_closed(s) for s in socks)
    # The page still serves a request once the idle ones are gone.
    conn = http.client.HTTPConnection("127.0.0.1", page.port, timeout=5)
    conn.request("GET", "/login", headers={"Host": "127.0.0.1"})
    assert conn.getresponse().status == 200
    for s in socks + [drip]:
        s.close()


def test_one_address_holds_a_bounded_number_of_live_views(tmp_path, monkeypatch):
    """Probe 104's note: each live view holds one of the page's sockets while open; one host opening as many as the
    page holds locked every operator out. Past STREAMS_PER_CLIENT from one address: 429 at once; a closed view
    gives its place back."""
    from edge_runtime.operator_page import app as page_app

    from edge_runtime.http_endpoint import StationStatus

    monkeypatch.setattr(page_app, "STREAMS_PER_CLIENT", 3)
    status = StationStatus(state="ready", bundle_id="x", uptime_s=1.0)
    line = SimpleNamespace(name=None, recipes=None, rollout=None, status=lambda: status, pipeline=None,
                           cfg=SimpleNamespace(bundle=str(tmp_path / "bundle"), state_dir=None))
    p = OperatorPage(PageConfig(enabled=True, port=0), [None])
    p.attach([line])
    p.start()

    def open_view():
        conn = http.client.HTTPConnection("127.0.0.1", p.port, timeout=5)
        conn.request("GET", "/events", headers={"Host": "127.0.0.1"})
        r = conn.getresponse()
        if r.status == 200:
            assert r.read1(100).startswith(b"retry:")
        return conn, r

    try:
        views = [open_view() for _ in range(3)]
        assert [r.status for _, r in views] == [200, 200, 200]
        conn, r = open_view()
        assert r.status == 429 and b"3 live views are open from this address" in r.read()
        conn.close()
        views[0][0].close()
        deadline = time.monotonic() + 10
        while True:
            conn, r = open_view()
            if r.status == 200 or time.monotonic() > deadline:
                break
            conn.close()
            time.sleep(0.2)
        assert r.status == 200, "a closed view gave its place back"
        for c, _ in views[1:] + [(conn, r)]:
            c.close()
    finally:
        p.stop()
