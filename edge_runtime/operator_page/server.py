"""The page in the daemon: its sink on the output bus, its feedback service, and uvicorn on a thread of its own.

The daemon calls `attach(station)` (the sink joins the outputs), `start()` after the bus starts and `stop()` at
shutdown. The page reads the station only through `status()`, `pipeline` and `request_reload()`.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time

from edge_runtime.bundle import Bundle
from edge_runtime.bundle_versions import VersionStore
from edge_runtime.operator_page.config import PageConfig
from edge_runtime.operator_page.feedback import Feedback
from edge_runtime.operator_page.part_history import PartHistory

log = logging.getLogger(__name__)
RELOAD_TIMEOUT_S = 180.0


class OperatorPage:
    def __init__(self, cfg: PageConfig, station) -> None:
        self.cfg = cfg
        self.station = station
        self.history = PartHistory(cfg.history, cfg.keep_frames, cfg.view_px, cfg.thumbnail_px)
        sc = station.cfg
        self.feedback = None
        if sc.state_dir:
            store = VersionStore(sc.bundle, sc.state_dir, cfg.station_signing_key)
            self.feedback = Feedback(store, self.history, self._current_bundle, self._reload,
                                     threads=1)  # one thread: learning must not take the inspection loop's cores
        self._server = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.port: int | None = None

    # ---- what the page reads / asks of the station ------------------------------------------------------------
    def _current_bundle(self) -> Bundle | None:
        p = self.station.pipeline
        return p.bundle if p is not None else None

    def _reload(self, bundle_id: str) -> None:
        """Ask the daemon to reload (its own verified path) and wait until `bundle_id` is in service."""
        failures = self.station.counters.reload_failures
        self.station.request_reload()
        deadline = time.monotonic() + RELOAD_TIMEOUT_S
        while time.monotonic() < deadline:
            p = self.station.pipeline
            if p is not None and p.bundle.bundle_id == bundle_id:
                return
            if self.station.counters.reload_failures > failures:
                raise RuntimeError("the daemon refused the new version (see its log); the previous one stays in service")
            time.sleep(0.05)
        raise RuntimeError(f"the new version was not in service within {RELOAD_TIMEOUT_S:.0f} s")

    # ---- lifecycle -------------------------------------------------------------------------------------------------
    def start(self) -> None:
        import uvicorn

        from edge_runtime.operator_page.app import build_app

        app = build_app(self.cfg, self.history, self.station.status, self.feedback, lambda: self._stopping)
        config = uvicorn.Config(app, host=self.cfg.host, port=self.cfg.port, log_level="warning", access_log=False,
                                lifespan="off", timeout_graceful_shutdown=2, ws="none")
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

    def stop(self) -> None:
        self._stopping = True
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(5)
        self._server = self._thread = None


def maybe_page(station):
    """The station's OperatorPage when `page.enabled`, else None. Its sink is appended to `station.outputs`."""
    cfg = getattr(station.cfg, "page", None)
    if cfg is None or not cfg.enabled:
        return None
    page = OperatorPage(cfg, station)
    station.outputs.append(page.history)
    return page


