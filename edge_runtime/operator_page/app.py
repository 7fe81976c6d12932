"""The page's routes (starlette): server-rendered HTML, a little plain JavaScript, JSON and server-sent events.

Read-only routes need no login. Every POST passes three checks before it does anything: a Host this page answers
to (DNS rebinding), an Origin (or Referer) equal to the page's own origin (cross-site requests), and, except for
the login itself, a session whose role allows the action plus the session's CSRF token in X-CSRF-Token.
"""
from __future__ import annotations

import asyncio
import html
import json
import time
from typing import Any, Callable
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from edge_runtime.http_endpoint import HttpConfig, StationStatus
from edge_runtime.operator_page.auth import SESSION_COOKIE, Session, Sessions, role_allows
from edge_runtime.operator_page.config import PageConfig
from edge_runtime.operator_page.feedback import Feedback, FeedbackError
from edge_runtime.operator_page.part_history import PartHistory
from edge_runtime.operator_page.static import CSS, JS

_MAX_BODY = 16 * 1024
UPDATE_PERIOD_S = 0.5    # live-view push period (see events())


def status_document(status: StationStatus, history: PartHistory) -> dict:
    """Counters, yield, rate, per-stage latency and health, for the page (JSON)."""
    lat = status.latency.summary() if status.latency is not None else {}
    counts = dict(history.shift_counts)
    inspected = counts.get("OK", 0) + counts.get("NG", 0) + counts.get("REVIEW", 0)
    shift_s = max(1e-9, time.time() - history.shift_started)
    recs = history.records(limit=50)
    rate = 0.0
    if len(recs) >= 2:
        span = recs[0]["time"] - recs[-1]["time"]
        rate = 60.0 * (len(recs) - 1) / span if span > 0 else 0.0
    outputs = {k: v for k, v in status.counters.items() if k.startswith("output")}
    return {"state": status.state, "reason": status.reason, "bundle_id": status.bundle_id, "frames": status.frames,
            "uptime_s": round(status.uptime_s, 1), "verdicts_since_start": status.verdicts,
            "shift": {"started": history.shift_started, "seconds": round(shift_s), "counts": counts,
                      "yield": (counts.get("OK", 0) / inspected) if inspected else None},
            "rate_per_min": round(rate, 1),
            "latency_ms": {k: {"p50": round(v["p50"], 2), "p95": round(v["p95"], 2)} for k, v in lat.items()
                           if isinstance(v, dict) and "p50" in v},
            "health": {"last_heartbeat_age_s": status.last_heartbeat_age_s, "faults": status.faults,
                       "last_fault": history.last_fault,
                       # A bundle in service has passed its golden self-test: the daemon loads none that fails it.
                       "self_test": "passed at load" if status.bundle_id else "no bundle in service",
                       "outputs": outputs, "counters": status.counters}}


def _page(title: str, body: str, session: Session | None, writable: bool, csrf: str = "") -> HTMLResponse:
    who = (f'{html.escape(session.user)} ({session.role}) <button id="logout">log out</button>' if session
           else ('<a href="/login">log in</a>' if writable else "read-only (no users configured)"))
    return HTMLResponse(f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<meta name="csrf" content="{html.escape(csrf)}"><style>{CSS}</style></head><body>
<nav><a href="/">Live</a> <a href="/history">History</a> <a href="/versions">Versions</a> <span class="who">{who}</span></nav>
{body}<script>{JS}</script></body></html>""")


def build_app(cfg: PageConfig, history: PartHistory, status: Callable[[], StationStatus],
              feedback: Feedback | None, stopping: Callable[[], bool] = lambda: False) -> Starlette:
    sessions = Sessions(cfg.users, cfg.session_timeout_s)
    hosts = HttpConfig(enabled=True, host=cfg.host, port=cfg.port, allowed_hosts=list(cfg.allowed_hosts))

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
        if origin is None and request.headers.get("referer"):
            parts = urlsplit(request.headers["referer"])
            origin = f"{parts.scheme}://{parts.netloc}"
        if origin is None or origin == "null":
            return refused(403, "cross-site check: the request has no Origin")
        if urlsplit(origin).netloc != host:
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

    async def body_json(request: Request) -> dict:
        raw = await request.body()
        if len(raw) > _MAX_BODY:
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

    # ---- read-only pages -----------------------------------------------------------------------------------
    async def live(request: Request) -> Response:
        if (bad := host_ok(request)) is not None:
            return bad
        s = session_of(request)
        last = history.latest()
        verdict = last["verdict"] if last else "-"
        score = f"{last['score']:.3f}" if last and last.get("score") is not None else "-"
        thr = f"{last['threshold']:.3f}" if last and last.get("threshold") is not None else "-"
        img = f'/img/{last["frame_id"]}/overlay.jpg' if last else ""
        shift = ('<button id="newshift">start a new shift</button>'
                 if s is not None and role_allows(s.role, "operator") else "")
        body = f"""<main class="live">
<section class="view"><img id="overlay" alt="latest part with heat map" src="{img}">
<div id="partlink">{f'<a href="/part/{last["frame_id"]}">part {last["frame_id"]}</a>' if last else 'no part yet'}</div></section>
<section class="side"><div id="verdict" class="verdict v-{verdict}">{verdict}</div>
<div class="score">score <b id="score">{score}</b> / threshold <b id="threshold">{thr}</b></div>
<canvas id="trend" width="520" height="180" data-points="0"></canvas>
<canvas id="hist" width="520" height="140" data-points="0"></canvas>
<table id="status" class="status"></table>{shift}</section></main>"""
        return _page("Live", body, s, sessions.writable, s.csrf if s else "")

    async def history_page(request: Request) -> Response:
        if (bad := host_ok(request)) is not None:
            return bad
        s = session_of(request)
        verdict = request.query_params.get("verdict") or None
        if verdict not in (None, "OK", "NG", "REVIEW", "FAULT"):
            return refused(400, "verdict must be OK, NG, REVIEW or FAULT")
        rows = []
        for r in history.records(verdict):
            sc = "-" if r.get("score") is None else f"{r['score']:.3f}"
            when = time.strftime("%H:%M:%S", time.localtime(r["time"]))
            rows.append(f'<a class="card v-{r["verdict"]}" href="/part/{r["frame_id"]}"><img loading="lazy" '
                        f'src="/img/{r["frame_id"]}/thumb.jpg" alt=""><span>#{r["frame_id"]} {r["verdict"]} {sc}'
                        f'<br>{when}</span></a>')
        filters = " ".join(f'<a class="filter{" on" if verdict == v else ""}" href="/history{("?verdict=" + v) if v else ""}">'
                           f'{v or "all"}</a>' for v in (None, "OK", "NG", "REVIEW", "FAULT"))
        body = f'<main><div class="filters">{filters}</div><div id="history" class="grid">{"".join(rows) or "no parts"}</div></main>'
        return _page("History", body, s, sessions.writable, s.csrf if s else "")

    async def part_page(request: Request) -> Response:
        if (bad := host_ok(request)) is not None:
            return bad
        s = session_of(request)
        fid = request.path_params["frame_id"]
        part = history.get(fid)
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
        sc = "-" if r.get("score") is None else f"{r['score']:.3f}"
        notes = "".join(f"<li>{html.escape(n)}</li>" for n in part.feedback)
        body = f"""<main><h2>Part {fid} <span class="verdict-s v-{r['verdict']}">{r['verdict']}</span></h2>
<p>score {sc} / threshold {r['threshold']:.3f}; source {html.escape(str(r.get('source')))}; bundle {html.escape(str(r['bundle_id']))}
{('; ' + html.escape(r['error'])) if r.get('error') else ''}</p>
<div class="actions">{buttons}</div><ul id="notes">{notes}</ul>
<img class="full" id="full" src="/img/{fid}/overlay.jpg" alt="overlay full size">
<dialog id="dlg"><div id="dlgbody"></div><div class="dlgbtns"><button id="apply" disabled>Apply</button>
<button id="cancel">Cancel</button></div></dialog></main>"""
        return _page(f"Part {fid}", body, s, sessions.writable, s.csrf if s else "")

    async def versions_page(request: Request) -> Response:
        if (bad := host_ok(request)) is not None:
            return bad
        s = session_of(request)
        if feedback is None:
            return _page("Versions", "<main>no state_dir: versions are not kept</main>", s, sessions.writable)
        vs = await run_in_threadpool(feedback.versions)
        eng = s is not None and role_allows(s.role, "engineer")
        rows = []
        for v in vs:
            name = html.escape(v["name"])
            last = "active" if v.get("active") else (
                f'<button class="rollback" data-name="{name}">roll back to this</button>' if eng else "")
            cells = [name, v.get("bundle_version"), v.get("bundle_id"), v.get("action"), v.get("by") or "",
                     json.dumps(v.get("bank")), json.dumps(v.get("threshold"))]
            rows.append(f'<tr class="{"active" if v.get("active") else ""}">'
                        + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + f"<td>{last}</td></tr>")
        rows = "".join(rows)
        audit = "".join(f"<li>{html.escape(json.dumps(a))}</li>" for a in await run_in_threadpool(feedback.audit))
        pending = len(feedback.pending_defects())
        recal = (f'<p>{pending} stored defect(s) waiting. <button id="recal">Recalibrate from stored defects</button></p>'
                 if eng and pending else f"<p>{pending} stored defect(s) waiting.</p>")
        body = (f'<main><h2>Bundle versions</h2><table class="versions"><tr><th>name</th><th>version</th><th>id</th>'
                f'<th>made by</th><th>who</th><th>bank</th><th>threshold</th><th></th></tr>{rows}</table>{recal}'
                f'<dialog id="dlg"><div id="dlgbody"></div><div class="dlgbtns"><button id="apply" disabled>Apply</button>'
                f'<button id="cancel">Cancel</button></div></dialog><h3>Audit log</h3><ul class="audit">{audit}</ul></main>')
        return _page("Versions", body, s, sessions.writable, s.csrf if s else "")

    async def image(request: Request) -> Response:
        if (bad := host_ok(request)) is not None:
            return bad
        part = history.get(request.path_params["frame_id"])
        kind = request.path_params["kind"]
        data = None if part is None else {"overlay": part.overlay_jpg, "thumb": part.thumb_jpg}.get(kind)
        if data is None:
            return Response(status_code=404)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    async def api_status(request: Request) -> Response:
        if (bad := host_ok(request)) is not None:
            return bad
        return JSONResponse(status_document(status(), history))

    async def api_parts(request: Request) -> Response:
        if (bad := host_ok(request)) is not None:
            return bad
        verdict = request.query_params.get("verdict") or None
        return JSONResponse(history.records(verdict, limit=int(request.query_params.get("limit", history.history))))

    async def events(request: Request) -> Response:
        if (bad := host_ok(request)) is not None:
            return bad

        async def stream():
            seen, last_status = -1, 0.0
            yield "retry: 2000\n\n"
            while not stopping() and not await request.is_disconnected():
                now = time.monotonic()
                # A new part goes out at once; the status (percentiles over the latency window) at most once a
                # second, so a viewer costs the station the same at 2 parts/s or 20.
                doc = {}
                if history.seq != seen:
                    seen, doc["latest"] = history.seq, history.latest()
                if now - last_status >= 1.0:
                    last_status, doc["status"] = now, status_document(status(), history)
                if doc:
                    yield f"data: {json.dumps(doc)}\n\n"
                # At most 2 views a second (the newest part wins), as fast as a person reads: a browser on the
                # station's own 2 cores redrawing 10 times a second cost inspection 15% (benchmarks/page_overhead).
                await asyncio.sleep(UPDATE_PERIOD_S)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ---- login -----------------------------------------------------------------------------------------------
    async def login_form(request: Request) -> Response:
        if (bad := host_ok(request)) is not None:
            return bad
        msg = html.escape(request.query_params.get("error", ""))
        body = (f'<main><h2>Log in</h2><p class="err">{msg}</p><form method="post" action="/login">'
                '<label>name <input name="name" id="name" autocomplete="username"></label> '
                '<label>password <input name="password" id="password" type="password" autocomplete="current-password">'
                '</label> <button id="login" type="submit">log in</button></form></main>')
        return _page("Log in", body, None, sessions.writable)

    async def login(request: Request) -> Response:
        bad = cross_site(request)
        if bad is not None:
            return bad
        if not sessions.writable:
            return refused(403, "the page is read-only: no users are configured in the station file")
        raw = await request.body()
        if len(raw) > _MAX_BODY:
            return refused(413, "request body too large")
        from urllib.parse import parse_qs

        form = {k: v[0] for k, v in parse_qs(raw.decode("utf-8", "replace")).items()}
        got = await run_in_threadpool(sessions.login, form.get("name", ""), form.get("password", ""))
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

    # ---- changes -------------------------------------------------------------------------------------------------
    def action(role: str, work: Callable[[Session, dict], Any]):
        async def endpoint(request: Request) -> Response:
            s, bad = await guarded(request, role)
            if bad is not None:
                return bad
            if feedback is None:
                return refused(409, "feedback needs a state_dir for the bundle versions")
            try:
                data = await body_json(request)
                return JSONResponse(await run_in_threadpool(work, s, data))
            except FeedbackError as exc:
                return refused(409, str(exc))
            except (KeyError, TypeError, ValueError) as exc:
                return refused(400, f"bad request: {type(exc).__name__}: {exc}")
        return endpoint

    def _fid(d: dict) -> int:
        return int(d["frame_id"])

    routes = [
        Route("/", live), Route("/history", history_page), Route("/part/{frame_id:int}", part_page),
        Route("/versions", versions_page), Route("/img/{frame_id:int}/{kind}.jpg", image),
        Route("/api/status", api_status), Route("/api/parts", api_parts), Route("/events", events),
        Route("/login", login_form, methods=["GET"]), Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/api/shift", action("operator", lambda s, d: (history.new_shift(), {"ok": True})[1]), methods=["POST"]),
        Route("/api/feedback/good/preview", action("operator", lambda s, d: feedback.preview_good(_fid(d), s.user)),
              methods=["POST"]),
        Route("/api/feedback/good/apply", action("operator", lambda s, d: feedback.apply(str(d["plan"]), s.user, "learn-good")),
              methods=["POST"]),
        Route("/api/feedback/bad", action("operator", lambda s, d: feedback.mark_bad(_fid(d), s.user)), methods=["POST"]),
        Route("/api/recalibrate/preview", action("engineer", lambda s, d: feedback.preview_recalibrate(s.user)),
              methods=["POST"]),
        Route("/api/recalibrate/apply", action("engineer", lambda s, d: feedback.apply_recalibrate(str(d["plan"]), s.user)),
              methods=["POST"]),
        Route("/api/rollback", action("engineer", lambda s, d: feedback.rollback(str(d["name"]), s.user)), methods=["POST"]),
    ]
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
