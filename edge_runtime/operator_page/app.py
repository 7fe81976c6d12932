"""The page's routes (starlette): server-rendered HTML, a little plain JavaScript, JSON and server-sent events.

One page for every line of the station: `/lines` lists them (and is `/` with several lines); each line's live
view, history, parts, versions and feedback live under `/line/<name>/`; a single-line station also serves them
at `/`, `/history`, ... as before. A line name in a URL is looked up among the station's lines (404 otherwise).
Read-only routes need no login. Every POST passes three checks before it does anything: a Host this page answers
to (DNS rebinding), an Origin (or Referer) equal to the page's own origin (cross-site requests), and, except for
the login itself, a session whose role allows the action plus the session's CSRF token in X-CSRF-Token.
"""
from __future__ import annotations

import asyncio
import collections
import html
import json
import time
import weakref
from typing import Any, Callable
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.convertors import IntegerConvertor, register_url_convertor
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from edge_runtime.http_endpoint import HttpConfig, StationStatus
from edge_runtime.operator_page.auth import SESSION_COOKIE, Session, Sessions, role_allows
from edge_runtime.operator_page.config import PageConfig
from edge_runtime.operator_page.feedback import FeedbackError, check_learnable
from edge_runtime.operator_page.part_history import PartHistory
from edge_runtime.operator_page.server import LineView
from edge_runtime.operator_page.static import CSS, JS
from edge_runtime.records import Verdict

_MAX_BODY = 16 * 1024


class FrameIdConvertor(IntegerConvertor):
    """A frame id in a URL: at most 19 digits (a 64-bit id). Starlette's int took any run of digits, and int() of
    5000 of them raised (Python's 4300-digit limit): a 500 and a traceback in the station's log per request."""
    regex = "[0-9]{1,19}"


register_url_convertor("frame", FrameIdConvertor())
VERDICT_NAMES = tuple(v.value for v in Verdict)
LOGIN_FAILURES_ALLOWED = 5     # wrong passwords per client within LOGIN_WINDOW_S, then 429 until the window passes
LOGIN_WINDOW_S = 60.0


class FailedLogins:
    """Wrong-password counts per client address over a sliding window: a guessing client is refused before its
    password is hashed again, so it cannot spend the station's cores on scrypt (measured: 16 guessing threads took
    inspection p50 from 7 to 34 ms)."""

    def __init__(self, allowed: int = LOGIN_FAILURES_ALLOWED, window_s: float = LOGIN_WINDOW_S) -> None:
        self.allowed_failures, self.window_s = allowed, window_s
        self._failures: dict[str, list[float]] = {}

    def _recent(self, client: str, now: float) -> list[float]:
        times = [t for t in self._failures.get(client, []) if now - t < self.window_s]
        if times:
            self._failures[client] = times
        else:
            self._failures.pop(client, None)
        return times

    def allowed(self, client: str) -> bool:
        return len(self._recent(client, time.monotonic())) < self.allowed_failures

    def failed(self, client: str) -> None:
        if len(self._failures) > 10_000:   # many addresses: forget the oldest rather than grow without bound
            self._failures.pop(next(iter(self._failures)))
        self._failures.setdefault(client, []).append(time.monotonic())
UPDATE_PERIOD_S = 0.5    # live-view push period (see events()): per page, whatever the number of lines
STATUS_PERIOD_S = 1.0    # the viewed line's status document, at most this often
OVERVIEW_PERIOD_S = 2.0  # every line's summary (state, last verdict, yield, rate), at most this often
# Live-update streams one client address may hold: each holds one of the page's PAGE_MAX_CONNECTIONS sockets for as
# long as it is open, and one host opening 64 of them locked every operator out of the page (probe 104's note).
STREAMS_PER_CLIENT = 8


def shift_figures(history: PartHistory) -> tuple[dict, float | None, float]:
    """(counts this shift, yield or None, parts per minute over the last 50 parts) of one line's history."""
    counts = dict(history.shift_counts)
    inspected = counts.get("OK", 0) + counts.get("NG", 0) + counts.get("REVIEW", 0)
    recs = history.records(limit=50)
    rate = 0.0
    if len(recs) >= 2:
        span = recs[0]["time"] - recs[-1]["time"]
        rate = 60.0 * (len(recs) - 1) / span if span > 0 else 0.0
    return counts, (counts.get("OK", 0) / inspected) if inspected else None, round(rate, 1)


def status_document(status: StationStatus, history: PartHistory) -> dict:
    """Counters, yield, rate, per-stage latency and health of one line, for the page (JSON)."""
    lat = status.latency.summary() if status.latency is not None else {}
    counts, yield_, rate = shift_figures(history)
    shift_s = max(1e-9, time.time() - history.shift_started)
    outputs = {k: v for k, v in status.counters.items() if k.startswith("output")}
    return {"state": status.state, "reason": status.reason, "bundle_id": status.bundle_id, "frames": status.frames,
            "uptime_s": round(status.uptime_s, 1), "verdicts_since_start": status.verdicts,
            "shift": {"started": history.shift_started, "seconds": round(shift_s), "counts": counts,
                      "yield": yield_},
            "rate_per_min": rate,
            # Drift warnings in force (edge_runtime/drift_monitor.py): lighting, focus or material moving away from
            # the fit's conditions; the operator sees them beside the yield they may explain.
            "drift": sorted(status.drift.warnings.values()) if status.drift is not None else [],
            "latency_ms": {k: {"p50": round(v["p50"], 2), "p95": round(v["p95"], 2)} for k, v in lat.items()
                           if isinstance(v, dict) and "p50" in v},
            "health": {"last_heartbeat_age_s": status.last_heartbeat_age_s, "faults": status.faults,
                       "last_fault": history.last_fault,
                       # A bundle in service has passed its golden self-test: the daemon loads none that fails it.
                       "self_test": "passed at load" if status.bundle_id else "no bundle in service",
                       "outputs": outputs, "counters": status.counters}}


def overview_document(views: dict[str, LineView]) -> list[dict]:
    """Every line in a few fields (state, last verdict, yield, rate): the overview and the line selector."""
    out = []
    for name, v in views.items():
        st = v.status()
        counts, yield_, rate = shift_figures(v.history)
        last = v.history.latest()
        out.append({"name": name, "url": f"/line/{name}/", "state": st.state, "reason": st.reason,
                    "last_verdict": st.last_verdict, "last_frame_id": last["frame_id"] if last else None,
                    "yield": yield_, "rate_per_min": rate, "counts": counts, "frames": st.frames,
                    "bundle_id": st.bundle_id})
    return out


class LiveFeed:
    """What one open live view is sent each UPDATE_PERIOD_S: the viewed line's newest part when there is a new one,
    its status at most every STATUS_PERIOD_S, and (several lines) every line's summary at most every
    OVERVIEW_PERIOD_S. Never the other lines' parts: a page costs the station the same with 1 line or 8."""

    def __init__(self, view: LineView, overview: Callable[[], list[dict]] | None):
        self.view, self.overview = view, overview
        self.seen = -1
        self.last_status = self.last_overview = float("-inf")

    def next(self, now: float) -> dict:
        doc: dict[str, Any] = {}
        history = self.view.history
        if history.seq != self.seen:
            self.seen, doc["latest"] = history.seq, history.latest()
        if now - self.last_status >= STATUS_PERIOD_S:
            self.last_status, doc["status"] = now, status_document(self.view.status(), history)
        if self.overview is not None and now - self.last_overview >= OVERVIEW_PERIOD_S:
            self.last_overview, doc["lines"] = now, self.overview()
        return doc


def build_app(cfg: PageConfig, views: dict[str, LineView], stopping: Callable[[], bool] = lambda: False) -> Starlette:
    """`views`: the station's lines by URL name (one entry for a single-line station)."""
    sessions = Sessions(cfg.users, cfg.session_timeout_s)
    hosts = HttpConfig(enabled=True, host=cfg.host, port=cfg.port, allowed_hosts=list(cfg.allowed_hosts))
    single = next(iter(views.values())) if len(views) == 1 else None
    several = len(views) > 1

    def session_of(request: Request) -> Session | None:
        return sessions.get(request.cookies.get(SESSION_COOKIE))

    def refused(code: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=code)

    def cross_site(request: Request) -> JSONResponse | None:
        """None when the POST comes from this page itself; else the refusal."""
        host = request.headers.get("host")
        if not hosts.host_allowed(host):
            return refused(403, f"Host {host!r} is not this station's page")
        origin = request.headers.get("origin")
        try:
            if origin is None and request.headers.get("referer"):
                parts = urlsplit(request.headers["referer"])
                origin = f"{parts.scheme}://{parts.netloc}"
            if origin is None or origin == "null":
                return refused(403, "cross-site check: the request has no Origin")
            parts = urlsplit(origin)
        except ValueError:
            # 'http://[' is no URL: urlsplit raised, and each such request was a 500 and a traceback in the log.
            return refused(403, "cross-site check: the request's Origin or Referer is not a URL")
        if parts.netloc != host or parts.scheme != request.url.scheme:
            return refused(403, f"cross-site request refused (Origin {origin} is not this page)")
        return None

    async def guarded(request: Request, role: str) -> tuple[Session | None, JSONResponse | None]:
        bad = cross_site(request)
        if bad is not None:
            return None, bad
        if not sessions.writable:
            return None, refused(403, "the page is read-only: no users are configured in the station file")
        s = session_of(request)
        if s is None:
            return None, refused(401, "log in first")
        if request.headers.get("x-csrf-token") != s.csrf:
            return None, refused(403, "missing or wrong CSRF token")
        if not role_allows(s.role, role):
            return None, refused(403, f"{s.user} is {s.role}; this needs {role}")
        return s, None

    async def capped_body(request: Request) -> bytes | None:
        """The request body, or None when it is over _MAX_BODY: read in chunks and dropped at the cap, so an
        unauthenticated client cannot make the station buffer a body of any size."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > _MAX_BODY:
            return None
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > _MAX_BODY:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    async def body_json(request: Request) -> dict:
        raw = await capped_body(request)
        if raw is None:
            raise FeedbackError("request body too large")
        try:
            data = json.loads(raw or b"{}")
        except ValueError:
            raise FeedbackError("request body is not JSON") from None
        if not isinstance(data, dict):
            raise FeedbackError("request body must be a JSON object")
        return data

    def host_ok(request: Request) -> Response | None:
        if not hosts.host_allowed(request.headers.get("host")):
            return refused(403, "Host is not this station's page")
        return None

    def page(title: str, body: str, s: Session | None, base: str = "", current: LineView | None = None) -> HTMLResponse:
        who = (f'{html.escape(s.user)} ({s.role}) <button id="logout">log out</button>' if s
               else ('<a href="/login">log in</a>' if sessions.writable else "read-only (no users configured)"))
        lines = ""
        if several:
            options = "".join(f'<option value="{html.escape(n)}"{" selected" if current is v else ""}>{html.escape(n)}'
                              f'</option>' for n, v in views.items())
            choose = "" if current else '<option value="" selected>choose a line</option>'
            lines = (f'<a href="/lines">All lines</a> <select id="lineselect" aria-label="line">'
                     f'{choose}{options}</select> ')
        links = (f'<a href="{base}/">Live</a> <a href="{base}/history">History</a> <a href="{base}/versions">Versions</a> '
                 if current is not None else "")
        name = f" - {current.title}" if current is not None and current.title else ""
        return HTMLResponse(f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title + name)}</title>
<meta name="csrf" content="{html.escape(s.csrf if s else "")}"><meta name="base" content="{html.escape(base)}">
<style>{CSS}</style></head><body>
<nav>{lines}{links}<span class="who">{who}</span></nav>
{body}<script>{JS}</script></body></html>""")

    def per_line(handler: Callable[[Request, LineView, str], Any]):
        """The route for one line: /line/<name>/... (404 for a name that is not one of the station's lines), and
        the same path without the prefix on a single-line station."""
        async def endpoint(request: Request) -> Response:
            if (bad := host_ok(request)) is not None:
                return bad
            name = request.path_params.get("line")
            view, base = (single, "") if name is None else (views.get(name), f"/line/{name}")
            if view is None:
                return refused(404, f"this station has no line {name[:40]!r} (its lines: {', '.join(views)})")
            return await handler(request, view, base)
        return endpoint

    # ---- read-only pages -----------------------------------------------------------------------------------
    async def overview(request: Request) -> Response:
        if (bad := host_ok(request)) is not None:
            return bad
        s = session_of(request)
        rows = []
        for d in await run_in_threadpool(overview_document, views):
            yld = "-" if d["yield"] is None else f"{100 * d['yield']:.1f} %"
            verdict = d["last_verdict"] or "-"
            rows.append(f'<tr data-line="{html.escape(d["name"])}"><td><a href="{html.escape(d["url"])}">'
                        f'{html.escape(d["name"])}</a></td><td class="state">{html.escape(d["state"])}'
                        f'{(" (" + html.escape(d["reason"]) + ")") if d["reason"] else ""}</td>'
                        f'<td><span class="verdict-s v-{verdict}">{verdict}</span></td><td>{yld}</td>'
                        f'<td>{d["rate_per_min"]} /min</td><td>{d["frames"]}</td>'
                        f'<td>{html.escape(str(d["bundle_id"]))}</td></tr>')
        body = (f'<main><h2>Lines</h2><table id="overview" class="versions"><tr><th>line</th><th>state</th>'
                f'<th>last verdict</th><th>yield</th><th>rate</th><th>frames</th><th>bundle</th></tr>'
                f'{"".join(rows)}</table></main>')
        return page("Lines", body, s)

    async def api_lines(request: Request) -> Response:
        if (bad := host_ok(request)) is not None:
            return bad
        return JSONResponse(await run_in_threadpool(overview_document, views))

    async def live(request: Request, v: LineView, base: str) -> Response:
        s = session_of(request)
        last = v.history.latest()
        verdict = last["verdict"] if last else "-"
        score = f"{last['score']:.3f}" if last and last.get("score") is not None else "-"
        thr = f"{last['threshold']:.3f}" if last and last.get("threshold") is not None else "-"
        img = f'{base}/img/{last["frame_id"]}/overlay.jpg' if last else ""
        shift = ('<button id="newshift">start a new shift</button>'
                 if s is not None and role_allows(s.role, "operator") else "")
        heading = f'<h2 id="linename">{html.escape(v.title)}</h2>' if v.title else ""
        body = f"""<main class="live">
<section class="view">{heading}<img id="overlay" alt="latest part with heat map" src="{img}">
<div id="partlink">{f'<a href="{base}/part/{last["frame_id"]}">part {last["frame_id"]}</a>' if last else 'no part yet'}</div></section>
<section class="side"><div id="verdict" class="verdict v-{verdict}">{verdict}</div>
<div class="score">score <b id="score">{score}</b> / threshold <b id="threshold">{thr}</b></div>
<canvas id="trend" width="520" height="180" data-points="0"></canvas>
<canvas id="hist" width="520" height="140" data-points="0"></canvas>
<table id="status" class="status"></table>{shift}</section></main>"""
        return page("Live", body, s, base, v)

    async def history_page(request: Request, v: LineView, base: str) -> Response:
        s = session_of(request)
        verdict = request.query_params.get("verdict") or None
        if verdict not in (None, "OK", "NG", "REVIEW", "FAULT"):
            return refused(400, "verdict must be OK, NG, REVIEW or FAULT")
        rows = []
        for r in v.history.records(verdict):
            sc = "-" if r.get("score") is None else f"{r['score']:.3f}"
            when = time.strftime("%H:%M:%S", time.localtime(r["time"]))
            rows.append(f'<a class="card v-{r["verdict"]}" href="{base}/part/{r["frame_id"]}"><img loading="lazy" '
                        f'src="{base}/img/{r["frame_id"]}/thumb.jpg" alt=""><span>#{r["frame_id"]} {r["verdict"]} {sc}'
                        f'<br>{when}</span></a>')
        filters = " ".join(f'<a class="filter{" on" if verdict == f else ""}" href="{base}/history{("?verdict=" + f) if f else ""}">'
                           f'{f or "all"}</a>' for f in (None, "OK", "NG", "REVIEW", "FAULT"))
        body = f'<main><div class="filters">{filters}</div><div id="history" class="grid">{"".join(rows) or "no parts"}</div></main>'
        return page("History", body, s, base, v)

    async def part_page(request: Request, v: LineView, base: str) -> Response:
        s = session_of(request)
        fid = request.path_params["frame_id"]
        part = v.history.get(fid)
        if part is None:
            return HTMLResponse("part not in the history", status_code=404)
        r = part.record
        can = s is not None and role_allows(s.role, "operator")
        buttons = ""
        if can and part.frame is not None:
            if r["verdict"] in ("NG", "REVIEW"):
                buttons += f'<button id="good" data-frame="{fid}">This part is good</button>'
            if r["verdict"] == "OK":
                buttons += f'<button id="bad" data-frame="{fid}">This part was bad</button>'
            if buttons and v.feedback is None:
                buttons = f'<p class="err">{html.escape(v.no_feedback or "")}</p>'
        sc = "-" if r.get("score") is None else f"{r['score']:.3f}"
        thr = "-" if r.get("threshold") is None else f"{r['threshold']:.3f}"   # none: FAULT with no bundle in service
        notes = "".join(f"<li>{html.escape(n)}</li>" for n in part.feedback)
        body = f"""<main><h2>Part {fid} <span class="verdict-s v-{r['verdict']}">{r['verdict']}</span></h2>
<p>score {sc} / threshold {thr}; source {html.escape(str(r.get('source')))}; bundle {html.escape(str(r['bundle_id']))}
{('; ' + html.escape(r['error'])) if r.get('error') else ''}</p>
<div class="actions">{buttons}</div><ul id="notes">{notes}</ul>
<img class="full" id="full" src="{base}/img/{fid}/overlay.jpg" alt="overlay full size">
<dialog id="dlg"><div id="dlgbody"></div><div class="dlgbtns"><button id="apply" disabled>Apply</button>
<button id="cancel">Cancel</button></div></dialog></main>"""
        return page(f"Part {fid}", body, s, base, v)

    async def versions_page(request: Request, v: LineView, base: str) -> Response:
        s = session_of(request)
        feedback = v.feedback
        if feedback is None:
            return page("Versions", f'<main><p id="nofeedback">versions are not kept here: {html.escape(v.no_feedback or "")}'
                                    f'</p></main>', s, base, v)
        vs = await run_in_threadpool(feedback.versions)
        eng = s is not None and role_allows(s.role, "engineer")
        rows = []
        for ver in vs:
            name = html.escape(ver["name"])
            last = "active" if ver.get("active") else "made from an earlier release" if ver.get("other_base") else (
                f'<button class="rollback" data-name="{name}">roll back to this</button>' if eng else "")
            cells = [name, ver.get("bundle_version"), ver.get("bundle_id"), ver.get("action"), ver.get("by") or "",
                     json.dumps(ver.get("bank")), json.dumps(ver.get("threshold"))]
            rows.append(f'<tr class="{"active" if ver.get("active") else ""}">'
                        + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + f"<td>{last}</td></tr>")
        audit = "".join(f"<li>{html.escape(json.dumps(a))}</li>" for a in await run_in_threadpool(feedback.audit))
        pending = len(feedback.pending_defects())
        recal = (f'<p>{pending} stored defect(s) waiting. <button id="recal">Recalibrate from stored defects</button></p>'
                 if eng and pending else f"<p>{pending} stored defect(s) waiting.</p>")
        of = f" of recipe {html.escape(feedback.recipe)}" if hasattr(feedback, "recipe") else ""
        body = (f'<main><h2>Bundle versions{of}</h2><table class="versions"><tr><th>name</th><th>version</th><th>id</th>'
                f'<th>made by</th><th>who</th><th>bank</th><th>threshold</th><th></th></tr>{"".join(rows)}</table>{recal}'
                f'<dialog id="dlg"><div id="dlgbody"></div><div class="dlgbtns"><button id="apply" disabled>Apply</button>'
                f'<button id="cancel">Cancel</button></div></dialog><h3>Audit log</h3><ul class="audit">{audit}</ul></main>')
        return page("Versions", body, s, base, v)

    async def image(request: Request, v: LineView, base: str) -> Response:
        part = v.history.get(request.path_params["frame_id"])
        kind = request.path_params["kind"]
        data = None if part is None else {"overlay": part.overlay_jpg, "thumb": part.thumb_jpg}.get(kind)
        if data is None:
            return Response(status_code=404)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    async def api_status(request: Request, v: LineView, base: str) -> Response:
        return JSONResponse(status_document(v.status(), v.history))

    async def api_parts(request: Request, v: LineView, base: str) -> Response:
        verdict = request.query_params.get("verdict") or None
        if verdict is not None and verdict not in VERDICT_NAMES:
            return refused(400, f"verdict: expected one of {', '.join(VERDICT_NAMES)}, got {verdict[:20]!r}")
        text = request.query_params.get("limit", str(v.history.history))
        if not (text.isascii() and text.isdigit() and 1 <= int(text) <= 100_000):
            return refused(400, f"limit: expected a whole number 1-100000, got {text[:20]!r}")
        return JSONResponse(v.history.records(verdict, limit=int(text)))

    streams: collections.Counter = collections.Counter()   # open live-update streams per client address

    async def events(request: Request, v: LineView, base: str) -> Response:
        client = request.client.host if request.client else "?"
        if streams[client] >= STREAMS_PER_CLIENT:
            return refused(429, f"{STREAMS_PER_CLIENT} live views are open from this address already: close one")
        feed = LiveFeed(v, (lambda: overview_document(views)) if several else None)
        streams[client] += 1   # counted from here; given back once, when the stream ends or is dropped unstarted
        released = []

        def release() -> None:
            if not released:
                released.append(True)
                streams[client] -= 1
                if streams[client] <= 0:
                    del streams[client]

        async def stream():
            try:
                yield "retry: 2000\n\n"
                while not stopping() and not await request.is_disconnected():
                    # A new part goes out at once; the status (percentiles over the latency window) at most once a
                    # second, so a viewer costs the station the same at 2 parts/s or 20.
                    doc = feed.next(time.monotonic())
                    if doc:
                        yield f"data: {json.dumps(doc)}\n\n"
                    # At most 2 views a second (the newest part wins), as fast as a person reads: a browser on the
                    # station's own 2 cores redrawing 10 times a second cost inspection 15% (benchmarks/page_overhead).
                    await asyncio.sleep(UPDATE_PERIOD_S)
            finally:
                release()

        body = stream()
        # A client gone before its stream started never runs the generator's finally: the object's end releases.
        weakref.finalize(body, release)

        return StreamingResponse(body, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ---- login -----------------------------------------------------------------------------------------------
    login_gate = FailedLogins()
    login_lock = asyncio.Lock()

    async def login_form(request: Request) -> Response:
        if (bad := host_ok(request)) is not None:
            return bad
        msg = html.escape(request.query_params.get("error", ""))
        body = (f'<main><h2>Log in</h2><p class="err">{msg}</p><form method="post" action="/login">'
                '<label>name <input name="name" id="name" autocomplete="username"></label> '
                '<label>password <input name="password" id="password" type="password" autocomplete="current-password">'
                '</label> <button id="login" type="submit">log in</button></form></main>')
        return page("Log in", body, None)

    async def login(request: Request) -> Response:
        bad = cross_site(request)
        if bad is not None:
            return bad
        if not sessions.writable:
            return refused(403, "the page is read-only: no users are configured in the station file")
        raw = await capped_body(request)
        if raw is None:
            return refused(413, "request body too large")
        from urllib.parse import parse_qs

        form = {k: v[0] for k, v in parse_qs(raw.decode("utf-8", "replace")).items()}
        client = request.client.host if request.client else "?"
        if not login_gate.allowed(client):
            return refused(429, f"too many failed logins from {client}: wait {LOGIN_WINDOW_S:g} s")
        # One password check at a time: each is a deliberately costly scrypt, and the station's cores inspect parts.
        async with login_lock:
            # Again once its turn comes: checked only on arrival, 40 guesses sent at once were all hashed, not 5
            # (probe 104), so a client guessed 60 passwords a minute over the page's 64 connections.
            if not login_gate.allowed(client):
                return refused(429, f"too many failed logins from {client}: wait {LOGIN_WINDOW_S:g} s")
            got = await run_in_threadpool(sessions.login, form.get("name", ""), form.get("password", ""))
            if got is None:
                login_gate.failed(client)
        if got is None:
            return RedirectResponse("/login?error=wrong+name+or+password", status_code=303)
        sid, _ = got
        resp = RedirectResponse("/", status_code=303)
        resp.set_cookie(SESSION_COOKIE, sid, httponly=True, samesite="strict", max_age=int(cfg.session_timeout_s))
        return resp

    async def logout(request: Request) -> Response:
        s, bad = await guarded(request, "viewer")
        if bad is not None:
            return bad
        sessions.logout(request.cookies.get(SESSION_COOKIE))
        resp = JSONResponse({"ok": True})
        resp.delete_cookie(SESSION_COOKIE)
        return resp

    # ---- changes (one line's) -------------------------------------------------------------------------------------
    def action(role: str, work: Callable[[LineView, Session, dict], Any], needs_feedback: bool = True):
        async def endpoint(request: Request, v: LineView, base: str) -> Response:
            s, bad = await guarded(request, role)
            if bad is not None:
                return bad
            if needs_feedback and v.feedback is None:
                return refused(409, v.no_feedback or "feedback is not available on this line")
            try:
                data = await body_json(request)
                return JSONResponse(await run_in_threadpool(work, v, s, data))
            except FeedbackError as exc:
                return refused(409, str(exc))
            except (KeyError, TypeError, ValueError) as exc:
                return refused(400, f"bad request: {type(exc).__name__}: {exc}")
        return endpoint

    def _fid(d: dict) -> int:
        return int(d["frame_id"])

    line_routes = [
        ("/", live, ["GET"]), ("/history", history_page, ["GET"]), ("/part/{frame_id:frame}", part_page, ["GET"]),
        ("/versions", versions_page, ["GET"]), ("/img/{frame_id:frame}/{kind}.jpg", image, ["GET"]),
        ("/api/status", api_status, ["GET"]), ("/api/parts", api_parts, ["GET"]), ("/events", events, ["GET"]),
        ("/api/shift", action("operator", lambda v, s, d: (v.history.new_shift(), {"ok": True})[1],
                              needs_feedback=False), ["POST"]),
        ("/api/feedback/good/preview", action("operator", lambda v, s, d: v.feedback.preview_good(
            _fid(d), s.user, check_learnable(v.history, _fid(d), s.role, cfg.operator_learn_max),
            cfg.operator_learn_max)), ["POST"]),
        ("/api/feedback/good/apply",
         action("operator", lambda v, s, d: v.feedback.apply(str(d["plan"]), s.user, "learn-good", s.role)), ["POST"]),
        ("/api/feedback/bad", action("operator", lambda v, s, d: v.feedback.mark_bad(_fid(d), s.user)), ["POST"]),
        ("/api/recalibrate/preview", action("engineer", lambda v, s, d: v.feedback.preview_recalibrate(s.user)),
         ["POST"]),
        ("/api/recalibrate/apply",
         action("engineer", lambda v, s, d: v.feedback.apply_recalibrate(str(d["plan"]), s.user, s.role)), ["POST"]),
        ("/api/rollback", action("engineer", lambda v, s, d: v.feedback.rollback(str(d["name"]), s.user)), ["POST"]),
    ]
    routes = [Route("/lines", overview), Route("/api/lines", api_lines),
              Route("/login", login_form, methods=["GET"]), Route("/login", login, methods=["POST"]),
              Route("/logout", logout, methods=["POST"])]
    routes += [Route("/line/{line}" + path, per_line(handler), methods=methods) for path, handler, methods in line_routes]
    if single is not None:   # a single-line station: its line at the URLs it always had
        routes += [Route(path, per_line(handler), methods=methods) for path, handler, methods in line_routes]
    else:
        routes.append(Route("/", overview))
    return SecurityHeaders(Starlette(routes=routes))


class SecurityHeaders:
    """ASGI wrapper: the page is never framed (clickjacking of the feedback buttons) and loads nothing from elsewhere."""

    HEADERS = [(b"x-frame-options", b"DENY"), (b"x-content-type-options", b"nosniff"),
               (b"content-security-policy", b"default-src 'self'; img-src 'self'; style-src 'unsafe-inline'; "
                                            b"script-src 'unsafe-inline'; frame-ancestors 'none'")]

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                message = dict(message, headers=list(message.get("headers", [])) + self.HEADERS)
            await send(message)

        await self.app(scope, receive, send_with_headers)
