"""One HTTP endpoint for every line of a multi-line daemon: /healthz per line and overall, /metrics with a
`line` label on every sample, POST /trigger/<line> for a line with a software trigger; and the recipe
endpoints: GET /recipe, POST /recipe/<name> (one line) or /recipe/<line>/<name> (several lines).

A single-line station without recipes keeps the plain endpoint (edge_runtime/http_endpoint.py), as before.
"""
from __future__ import annotations

import json
import re
from http import HTTPStatus
from typing import Callable

from edge_runtime.http_endpoint import (HttpConfig, HttpEndpoint, StationStatus, health_document, render_metrics,
                                        stalled_reason)
from edge_runtime.latency_stats import escape_label

__all__ = ["LinesHttpEndpoint", "RecipeHttpEndpoint", "aggregate_status", "render_lines_metrics"]

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (.*)$")


def aggregate_status(statuses: dict[str, StationStatus], uptime_s: float) -> StationStatus:
    """The station as a whole: ready only while every line is; a fault of any line is the station's fault."""
    states = [s.state for s in statuses.values()]
    state = "fault" if "fault" in states else ("ready" if all(x == "ready" for x in states) else "not_ready")
    reasons = [f"line {n}: {s.reason}" for n, s in statuses.items() if s.reason]
    verdicts: dict[str, int] = {}
    counters: dict[str, float] = {}
    for s in statuses.values():
        for k, v in s.verdicts.items():
            verdicts[k] = verdicts.get(k, 0) + v
        for k, v in s.counters.items():
            counters[k] = counters.get(k, 0) + v
    busy = [s.busy_s for s in statuses.values() if s.busy_s is not None]
    stalled = [n for n, s in statuses.items() if stalled_reason(s)]
    ages = [s.last_heartbeat_age_s for s in statuses.values() if s.last_heartbeat_age_s is not None]
    # A line whose loop stopped going round: the station's heartbeat age and limit are that line's.
    stuck = [s for s in statuses.values() if s.loop_stall_after_s is not None and s.last_heartbeat_age_s is not None
             and s.last_heartbeat_age_s > s.loop_stall_after_s]
    return StationStatus(
        state=state, reason="; ".join(reasons) or None,
        bundle_id=",".join(sorted({s.bundle_id for s in statuses.values() if s.bundle_id})) or None,
        frames=sum(s.frames for s in statuses.values()),
        last_verdict=None, uptime_s=uptime_s, verdicts=verdicts,
        faults=sum(s.faults for s in statuses.values()), skipped=sum(s.skipped for s in statuses.values()),
        last_heartbeat_age_s=stuck[0].last_heartbeat_age_s if stuck else (max(ages) if ages else None),
        loop_stall_after_s=stuck[0].loop_stall_after_s if stuck else None,
        # A line stalled outside an inspection is busy with nothing: max() of no busy line had raised, and /healthz
        # and /metrics answered 'station status unavailable' while one line's loop was stuck (probe 106).
        busy_s=max(busy, default=None),
        stall_after_s=min((statuses[n].stall_after_s for n in stalled), default=max(
            (s.stall_after_s for s in statuses.values()), default=2.0)),
        counters=counters)


def render_lines_metrics(statuses: dict[str, StationStatus]) -> str:
    """Every line's metrics in one exposition, `line="<name>"` on each sample, each family's samples together."""
    families: dict[str, list[str]] = {}
    order: list[str] = []
    for name, status in statuses.items():
        label = f'line="{escape_label(name)}"'
        family = None
        for text in render_metrics(status).splitlines():
            if text.startswith("# HELP ") or text.startswith("# TYPE "):
                family = text.split()[2]
                if family not in families:
                    families[family] = []
                    order.append(family)
                if not any(h == text for h in families[family] if h.startswith("#")):
                    families[family].insert(sum(1 for h in families[family] if h.startswith("#")), text)
                continue
            m = _SAMPLE.match(text)
            if m is None or family is None:
                continue
            metric, labels, value = m.groups()
            families[family].append(f"{metric}{{{label}{',' + labels if labels else ''}}} {value}")
    return "\n".join(line for f in order for line in families[f]) + "\n"


def _json(code: int, doc: dict) -> tuple[int, str, bytes]:
    return code, "application/json", json.dumps(doc).encode()


class RecipeHttpEndpoint(HttpEndpoint):
    """The station endpoint plus GET /recipe and POST /recipe/[<line>/]<name>. `switchers()` -> {line name or
    "line": RecipeSwitcher}; POST is refused unless that line's `recipes.allow_http` is true."""

    def __init__(self, cfg: HttpConfig, status_provider: Callable[[], StationStatus],
                 fire_trigger: Callable[[], bool | None] | None, switchers: Callable[[], dict],
                 line_name: str | None = None) -> None:
        super().__init__(cfg, status_provider, fire_trigger, line_name)
        self._switchers = switchers

    def handle_get(self, path: str) -> tuple[int, str, bytes]:
        if path == "/recipe":
            return _json(HTTPStatus.OK, {name: sw.describe() for name, sw in self._switchers().items()})
        return super().handle_get(path)

    def handle_post(self, path: str) -> tuple[int, str, bytes]:
        if not path.startswith("/recipe/"):
            return super().handle_post(path)
        switchers = self._switchers()
        parts = path[len("/recipe/"):].split("/")
        if len(parts) == 1 and len(switchers) == 1:
            line, recipe = next(iter(switchers)), parts[0]
        elif len(parts) == 2:
            line, recipe = parts
        else:
            return _json(HTTPStatus.NOT_FOUND, {"error": "POST /recipe/<name>, or /recipe/<line>/<name> with several lines"})
        switcher = switchers.get(line)
        if switcher is None:
            return _json(HTTPStatus.NOT_FOUND, {"error": f"no line {line[:40]!r} with recipes (lines: {', '.join(switchers)})"})
        if not switcher.cfg.allow_http:
            return _json(HTTPStatus.FORBIDDEN, {"error": "recipe selection over HTTP is disabled (recipes.allow_http)"})
        accepted, message = switcher.request(recipe, "http")
        if not accepted:   # 404: no such recipe; 409: the PLC selects this line's recipe, and another one
            status = HTTPStatus.NOT_FOUND if switcher.cfg.find(recipe) is None else HTTPStatus.CONFLICT
            return _json(status, {"accepted": False, "error": message})
        # Accepted, not done: the switch is verified on the line; GET /recipe shows when it is active (or failed).
        return _json(HTTPStatus.ACCEPTED, {"accepted": True, "line": line, "recipe": recipe, "message": message})


class LinesHttpEndpoint(RecipeHttpEndpoint):
    """The endpoint of a multi-line daemon. `line_statuses()` -> {line name: StationStatus};
    `fire(name)` fires that line's software trigger: None when it has none, False when it refused the trigger."""

    def __init__(self, cfg: HttpConfig, line_statuses: Callable[[], dict[str, StationStatus]],
                 overall: Callable[[], StationStatus], fire: Callable[[str], bool],
                 switchers: Callable[[], dict] | None = None) -> None:
        super().__init__(cfg, overall, None, switchers or dict)
        self._line_statuses = line_statuses
        self._fire_line = fire

    def handle_get(self, path: str) -> tuple[int, str, bytes]:
        if path not in ("/healthz", "/metrics"):
            return super().handle_get(path)
        try:
            statuses = self._line_statuses()
            overall = self._provider()
        except Exception:  # noqa: BLE001 - the status must never take the endpoint down
            return super().handle_get(path)   # answers 503 / 500 with the reason
        if path == "/metrics":
            return HTTPStatus.OK, "text/plain; version=0.0.4; charset=utf-8", render_lines_metrics(statuses).encode()
        doc = health_document(overall)
        doc["lines"] = {name: health_document(s) for name, s in statuses.items()}
        healthy = overall.state == "ready" and not any(stalled_reason(s) for s in statuses.values())
        return (HTTPStatus.OK if healthy else HTTPStatus.SERVICE_UNAVAILABLE), "application/json", json.dumps(doc).encode()

    def handle_post(self, path: str) -> tuple[int, str, bytes]:
        if not path.startswith("/trigger"):
            return super().handle_post(path)
        if not self.cfg.allow_trigger:
            return super().handle_post("/trigger")    # 403: disabled
        name = path[len("/trigger/"):] if path.startswith("/trigger/") else ""
        statuses = self._line_statuses()
        if name not in statuses:
            doc = {"error": f"POST /trigger/<line> with one of: {', '.join(statuses)}"}
            return HTTPStatus.NOT_FOUND, "application/json", json.dumps(doc).encode()
        status = statuses[name]
        if status.state != "ready":
            doc = {"triggered": False, "error": f"line {name} not ready, part not captured ({(status.reason or status.state)[:200]})"}
            return HTTPStatus.SERVICE_UNAVAILABLE, "application/json", json.dumps(doc).encode()
        fired = self._fire_line(name)
        if fired is None:
            doc = {"error": f"line {name}'s trigger is not 'software'"}
            return HTTPStatus.CONFLICT, "application/json", json.dumps(doc).encode()
        if not fired:
            doc = {"triggered": False, "error": f"line {name}: trigger refused: a backlog of triggers it has not "
                                                "served yet, part not captured"}
            return HTTPStatus.SERVICE_UNAVAILABLE, "application/json", json.dumps(doc).encode()
        return HTTPStatus.ACCEPTED, "application/json", json.dumps({"triggered": True, "line": name}).encode()
