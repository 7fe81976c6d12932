"""The station's page in the daemon: one uvicorn server for every line, each line with its own sink on its own
output bus, its own part history and its own feedback service (its own bundle versions).

The station builds it before its lines (`maybe_page(cfg, names)`), hands each line its sink (`sinks(name)`),
then `attach(lines)`, `start()` after the buses start and `stop()` at shutdown. The page reads each line only
through its `status()`, `pipeline`, `counters` and `request_reload()` (with recipes, also its `recipes` switcher).
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from edge_runtime.bundle import Bundle
from edge_runtime.bundle_versions import VersionStore
from edge_runtime.http_endpoint import StationStatus
from edge_runtime.operator_page.config import PageConfig
from edge_runtime.operator_page.feedback import Feedback
from edge_runtime.operator_page.part_history import PartHistory
from edge_runtime.operator_page.recipe_feedback import RecipeFeedback

log = logging.getLogger(__name__)
RELOAD_TIMEOUT_S = 180.0
PAGE_MAX_CONNECTIONS = 64   # operators' browsers (each holds one live-update stream); more get 503 at once
PAGE_REQUEST_TIMEOUT_S = 10.0  # a connection with no request begun and none in service for this long is closed
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 25\r\n"
         b"Connection: close\r\n\r\ntoo many connections, retry")
SINGLE_LINE = "line"   # the URL name of a station without `lines:` (as in /healthz and /recipe)

NO_STATE_DIR = "feedback needs a state_dir for the bundle versions"


@dataclass
class LineView:
    """One line as the page sees it."""
    name: str                                  # the URL name: /line/<name>/...
    title: str                                 # shown in the page's title and navigation
    history: PartHistory
    status: Callable[[], StationStatus]
    feedback: Feedback | RecipeFeedback | None
    no_feedback: str | None = None             # why `feedback` is None (shown on refusal)


class OperatorPage:
    def __init__(self, cfg: PageConfig, names: list[str | None]) -> None:
        self.cfg = cfg
        self.histories = {n or SINGLE_LINE: PartHistory(cfg.history, cfg.keep_frames, cfg.view_px, cfg.thumbnail_px)
                          for n in names}
        self.views: dict[str, LineView] = {}
        self._server = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.port: int | None = None

    def sinks(self, name: str | None) -> list:
        """The outputs the page adds to line `name`'s bus: its part history (the records the result log gets)."""
        return [self.histories[name or SINGLE_LINE]]

    @property
    def history(self) -> PartHistory:
        """The first line's history (a single-line station's only one)."""
        return next(iter(self.histories.values()))

    @property
    def feedback(self) -> Feedback | None:
        return next(iter(self.views.values())).feedback if self.views else None

    def attach(self, lines) -> None:
        """One view per line: its history, its status and its feedback on its own bundle versions."""
        for line in lines:
            name = line.name or SINGLE_LINE
            history = self.histories[name]
            feedback, why = None, None
            if not line.cfg.state_dir:
                why = NO_STATE_DIR
            elif line.recipes is not None:
                # The active recipe's own versions (state_dir/recipes/<recipe>), never another recipe's.
                feedback = RecipeFeedback(line, history, self.cfg.station_signing_key)
            else:
                # The line's own state_dir (state_dir/lines/<name> with `lines:`): its versions, pointer and audit.
                # The bundle the line loads now, not the one at start: after a committed rollout a learned version
                # was marked for the station file's bundle, the reload loaded the rollout's again, and the page
                # waited 180 s for a version that could never come into service (probe 70).
                store = VersionStore(lambda line=line: line.cfg.bundle, line.cfg.state_dir,
                                     self.cfg.station_signing_key)
                feedback = Feedback(store, history, _current_bundle(line), _reload(line),
                                    threads=1,  # one thread: learning must not take the inspection loops' cores
                                    held=_rollout_hold(line))
            self.views[name] = LineView(name, line.name or "", history, line.status, feedback, why)

    # ---- lifecycle -------------------------------------------------------------------------------------------------
    def start(self) -> None:
        import uvicorn

        from edge_runtime.operator_page.app import build_app

        app = build_app(self.cfg, self.views, lambda: self._stopping)
        # limit_concurrency: past it uvicorn answers 503 at once instead of holding more connections, so a flood of
        # clients cannot take every file descriptor the station needs for its parts and records.
        config = uvicorn.Config(app, host=self.cfg.host, port=self.cfg.port, log_level="warning", access_log=False,
                                lifespan="off", timeout_graceful_shutdown=2, ws="none", http=_bounded_protocol(),
                                limit_concurrency=PAGE_MAX_CONNECTIONS, timeout_keep_alive=5)
        self._server = uvicorn.Server(config)
        started = threading.Event()
        error: list[BaseException] = []

        def serve() -> None:
            try:
                asyncio.run(self._server.serve())
            except BaseException as exc:  # noqa: BLE001 - reported to start(); the station keeps inspecting
                error.append(exc)
            finally:
                started.set()

        self._thread = threading.Thread(target=serve, name="operator-page", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self._server.started:
            raise OSError(f"operator page did not start on {self.cfg.host}:{self.cfg.port}"
                          + (f": {error[0]}" if error else ""))
        sock = self._server.servers[0].sockets[0]
        self.port = sock.getsockname()[1]

    def start_logged(self) -> None:
        """start(), logging the address or why not: the station keeps inspecting without its page."""
        try:
            self.start()
            log.info("operator page on http://%s:%d/ (%d line%s)", self.cfg.host, self.port, len(self.views),
                     "" if len(self.views) == 1 else "s")
        except Exception as exc:  # noqa: BLE001 - the lines keep inspecting without their page
            log.error("operator page not started: %s", exc)

    def stop(self) -> None:
        self._stopping = True
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(5)
        self._server = self._thread = None


def _bounded_protocol():
    """uvicorn's h11 protocol holding at most PAGE_MAX_CONNECTIONS sockets, none of them idle for long.

    limit_concurrency answers 503 only to a request: uvicorn accepts and keeps every socket, and one that never
    sends a request (or drips a header) is kept for ever. 4,200 idle sockets on the page took every file descriptor
    of a daemon under LimitNOFILE=4096: the folder source could not list its images, 58 of 60 parts FAULT, and
    asyncio logged 60 MB of accept errors in 40 s (probe 80)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class BoundedH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > PAGE_MAX_CONNECTIONS:
                transport.write(_BUSY)
                transport.close()
                return
            self._seen_cycle = self.cycle
            self._idle_timer = self.loop.call_later(PAGE_REQUEST_TIMEOUT_S, self._close_if_idle)

        def _close_if_idle(self) -> None:
            # Kept while a response is in service (a live-update stream) or a request began since the last look;
            # idle keep-alive connections are closed by uvicorn's own timer before this one fires.
            busy = self.cycle is not None and not self.cycle.response_complete
            if (busy or self.cycle is not self._seen_cycle) and not self.transport.is_closing():
                self._seen_cycle = self.cycle
                self._idle_timer = self.loop.call_later(PAGE_REQUEST_TIMEOUT_S, self._close_if_idle)
            else:
                self.transport.close()

        def connection_lost(self, exc) -> None:
            timer = getattr(self, "_idle_timer", None)
            if timer is not None:
                timer.cancel()
            super().connection_lost(exc)

    return BoundedH11Protocol


# ---- what the page reads / asks of one line ------------------------------------------------------------------------
def _current_bundle(line) -> Callable[[], Bundle | None]:
    def current() -> Bundle | None:
        p = line.pipeline
        return p.bundle if p is not None else None
    return current


def _rollout_hold(line) -> Callable[[], str | None]:
    def held() -> str | None:
        """A version put in service while a rollout's candidate is staged or on probation would end its probation
        unseen (its parts count by the candidate's bundle id) and be dropped by its rollback."""
        rollout = getattr(line, "rollout", None)
        if rollout is not None and rollout.status in ("staging", "probation"):
            return (f"a signed rollout is {rollout.status} ({rollout.detail}); learn or roll back once it is "
                    "committed or rolled back")
        return None
    return held


def _reload(line) -> Callable[[str], None]:
    def reload(bundle_id: str) -> None:
        """Ask the line to reload (its own verified path) and wait until `bundle_id` is in service there."""
        failures = line.counters.reload_failures
        line.request_reload()
        deadline = time.monotonic() + RELOAD_TIMEOUT_S
        while time.monotonic() < deadline:
            p = line.pipeline
            if p is not None and p.bundle.bundle_id == bundle_id:
                return
            if line.counters.reload_failures > failures:
                raise RuntimeError("the daemon refused the new version (see its log); the previous one stays in service")
            time.sleep(0.05)
        raise RuntimeError(f"the new version was not in service within {RELOAD_TIMEOUT_S:.0f} s")
    return reload


def maybe_page(cfg, names: list[str | None]) -> OperatorPage | None:
    """The station's OperatorPage when `page.enabled`, else None; `names`: its lines' names (None: one line)."""
    page_cfg = getattr(cfg, "page", None)
    if page_cfg is None or not page_cfg.enabled:
        return None
    return OperatorPage(page_cfg, names)
