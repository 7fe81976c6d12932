"""The operator's page against a running daemon: read-only without login, every write authenticated and same-origin,
feedback that takes a learned version into service at once and keeps it across a restart, rollback."""
from __future__ import annotations

import http.client
import json
import shutil
import time
from pathlib import Path

import cv2
import pytest

pytest.importorskip("starlette", reason="the page needs the optional extra: pip install 'patchcore-edge[page]'")

from edge_runtime.operator_page.auth import hash_password  # noqa: E402

PASSWORDS = {"vera": "view-pw", "otto": "operate-pw", "erin": "engineer-pw"}
HASHES = {name: hash_password(pw, n=2 ** 10) for name, pw in PASSWORDS.items()}  # cheap cost: tests only


class Client:
    """A browser-like client: keeps the session cookie, sends the page's Origin and CSRF token."""

    def __init__(self, port: int):
        self.port, self.cookie, self.csrf = port, None, ""
        self.origin = f"http://127.0.0.1:{port}"

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        h = dict(headers or {})
        if self.cookie:
            h["Cookie"] = self.cookie
        conn.request(method, path, body=body, headers=h)
        r = conn.getresponse()
        data = r.read()
        cookie = r.getheader("set-cookie")
        if cookie:
            self.cookie = cookie.split(";", 1)[0]
        conn.close()
        return r.status, data

    def login(self, name: str) -> None:
        status, _ = self.request("POST", "/login", f"name={name}&password={PASSWORDS[name]}".encode(),
                                 {"Origin": self.origin, "Content-Type": "application/x-www-form-urlencoded"})
        assert status == 303 and self.cookie
        _, page = self.request("GET", "/")
        self.csrf = page.decode().split('name="csrf" content="', 1)[1].split('"', 1)[0]

    def post(self, path: str, data: dict, origin: str | None = "same", csrf: bool = True):
        h = {"Content-Type": "application/json"}
        if origin is not None:
            h["Origin"] = self.origin if origin == "same" else origin
        if csrf:
            h["X-CSRF-Token"] = self.csrf
        status, body = self.request("POST", path, json.dumps(data).encode(), h)
        return status, json.loads(body or b"{}")

    def get_json(self, path: str):
        status, body = self.request("GET", path)
        assert status == 200, body
        return json.loads(body)


def wait_for(predicate, timeout: float = 30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            value = predicate()
        except ConnectionError:  # the page is still starting
            value = None
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("timed out")


@pytest.fixture
def page_station(device_bundle, tmp_path, write_station, free_port, start_station):
    """A daemon on a watched folder with the page on; returns (start(), folder, port, images)."""
    base = tmp_path / "bundle"
    shutil.copytree(device_bundle, base)
    folder = tmp_path / "in"
    folder.mkdir()
    good = cv2.imread(str(base / "golden" / "00_good.png"))
    marked = good.copy()
    cv2.circle(marked, (60, 80), 12, (0, 0, 255), -1)
    images = {"marked": tmp_path / "marked.png", "good": tmp_path / "good.png"}
    cv2.imwrite(str(images["marked"]), marked)
    cv2.imwrite(str(images["good"]), good)
    port = free_port()
    users = [{"name": n, "role": r, "password_hash": HASHES[n]} for n, r in
             (("vera", "viewer"), ("otto", "operator"), ("erin", "engineer"))]
    path = write_station(bundle=base, source={"type": "folder", "path": "in", "mode": "watch"}, state_dir="state",
                         inference={"threads": 1}, outputs=[{"type": "result_log", "path": "results.jsonl"}],
                         page={"enabled": True, "port": port, "users": users})
    return (lambda: start_station(path)), folder, port, images


def feed(folder: Path, image: Path, name: str, client: Client) -> dict:
    shutil.copyfile(image, folder / (name + ".tmp"))
    (folder / (name + ".tmp")).rename(folder / name)
    return wait_for(lambda: next((p for p in client.get_json("/api/parts") if p["source"].endswith(name)), None))


def test_unauthenticated_cross_site_and_role_checks(page_station):
    start, folder, port, images = page_station
    start()
    c = Client(port)
    wait_for(lambda: c.get_json("/api/status")["state"] == "ready")
    part = feed(folder, images["marked"], "a.png", c)
    assert part["verdict"] == "NG"
    assert c.request("GET", "/")[0] == 200 and c.request("GET", "/history?verdict=NG")[0] == 200
    assert c.request("GET", f"/img/{part['frame_id']}/overlay.jpg")[0] == 200
    broken = Path(folder).parent / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    faulted = feed(folder, broken, "broken.png", c)
    assert faulted["verdict"] == "FAULT"
    health = c.get_json("/api/status")["health"]
    assert health["last_fault"]["frame_id"] == faulted["frame_id"] and "broken.png" in health["last_fault"]["error"]
    assert [p["frame_id"] for p in c.get_json("/api/parts?verdict=FAULT")] == [faulted["frame_id"]]

    status, body = c.post("/api/feedback/good/preview", {"frame_id": part["frame_id"]})
    assert status == 401, body                                           # no session: refused
    c.login("otto")
    status, body = c.post("/api/feedback/good/preview", {"frame_id": part["frame_id"]}, origin="http://evil.example")
    assert status == 403 and "cross-site" in body["error"]               # a logged-in browser on another site
    status, body = c.post("/api/feedback/good/preview", {"frame_id": part["frame_id"]}, origin=None)
    assert status == 403 and "Origin" in body["error"]
    status, body = c.post("/api/feedback/good/preview", {"frame_id": part["frame_id"]}, csrf=False)
    assert status == 403 and "CSRF" in body["error"]
    status, body = c.post("/api/rollback", {"name": "base"})
    assert status == 403 and "engineer" in body["error"]                # operators cannot roll back
    assert c.get_json("/api/status")["shift"]["counts"]["NG"] == 1
    assert c.post("/api/shift", {})[0] == 200                            # a new shift: counters from zero
    assert c.get_json("/api/status")["shift"]["counts"]["NG"] == 0
    bad_host = c.request("GET", "/api/status", headers={"Host": "attacker.example"})
    assert bad_host[0] == 403                                            # DNS rebinding
    viewer = Client(port)
    viewer.login("vera")
    status, body = viewer.post("/api/feedback/good/preview", {"frame_id": part["frame_id"]})
    assert status == 403 and "viewer" in body["error"]
    assert not (Path(folder).parent / "state" / "bundles").exists(), "nothing was changed"


def test_page_is_read_only_without_users(device_bundle, tmp_path, write_station, free_port, start_station):
    (tmp_path / "in").mkdir()
    port = free_port()
    start_station(write_station(bundle=device_bundle, source={"type": "folder", "path": "in", "mode": "watch"},
                                state_dir="state", page={"enabled": True, "port": port}))
    c = Client(port)
    wait_for(lambda: c.get_json("/api/status")["state"] == "ready")
    status, body = c.post("/login", {})
    assert status == 403 and "read-only" in body["error"]
    status, body = c.post("/api/feedback/bad", {"frame_id": 1}, csrf=False)
    assert status == 403 and "read-only" in body["error"]


def test_feedback_learns_at_once_persists_across_restart_and_rolls_back(page_station):
    start, folder, port, images = page_station
    running = start()
    c = Client(port)
    wait_for(lambda: c.get_json("/api/status")["state"] == "ready")
    rejected = feed(folder, images["marked"], "a.png", c)
    assert rejected["verdict"] == "NG"
    c.login("otto")
    status, preview = c.post("/api/feedback/good/preview", {"frame_id": rejected["frame_id"]})
    assert status == 200, preview
    row = preview["variants"]["int8"]["images"][0]
    assert (row["verdict_before"], row["verdict_after"]) == ("NG", "OK") and not preview["conflicts"]
    status, applied = c.post("/api/feedback/good/apply", {"plan": preview["plan"]})
    assert status == 200, applied
    again = feed(folder, images["marked"], "b.png", c)                   # the same part, inspected again
    assert again["verdict"] == "OK" and again["bundle_id"] == applied["bundle_id"]
    status, body = c.post("/api/feedback/good/apply", {"plan": preview["plan"]})
    assert status == 409, "a preview is applied once"

    ok = feed(folder, images["good"], "c.png", c)
    status, body = c.post("/api/feedback/bad", {"frame_id": ok["frame_id"]})
    assert status == 200 and body["pending"] == 1
    running.stop()

    # Restart: the learned version is still the one in service.
    start()
    c2 = Client(port)
    wait_for(lambda: c2.get_json("/api/status")["bundle_id"] == applied["bundle_id"])
    assert feed(folder, images["marked"], "d.png", c2)["verdict"] == "OK"
    c2.login("erin")
    status, recal = c2.post("/api/recalibrate/preview", {})
    assert status == 200, recal
    assert recal["variants"]["int8"]["images"][0]["kind"] == "defect" and "recent" in recal
    # Undo: roll back to the workstation's bundle; the marked part is NG again.
    status, rolled = c2.post("/api/rollback", {"name": "base"})
    assert status == 200, rolled
    assert c2.get_json("/api/status")["bundle_id"] == rolled["bundle_id"]
    assert feed(folder, images["marked"], "e.png", c2)["verdict"] == "NG"
    _, versions = c2.request("GET", "/versions")
    assert versions.count(b"<td>learn-good</td>") == 1 and versions.count(b"<td>rollback</td>") == 1
    audit = (Path(folder).parent / "state" / "bundle_audit.jsonl").read_text().splitlines()
    assert [json.loads(x)["action"] for x in audit] == ["learn-good", "mark-defect", "rollback"]
    assert json.loads(audit[0])["who"] == "otto" and json.loads(audit[-1])["who"] == "erin"
