"""RecordingOutput: an Output test double that records every call, so daemon tests can check what the line saw."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Literal

from edge_runtime.outputs.base import OUTPUTS, Output, OutputError
from edge_runtime.records import InspectionResult


@dataclass(kw_only=True)
class RecordingOutputConfig:
    type: Literal["recording"] = "recording"
    name: str = "recording"
    # Methods that raise OutputError instead of recording: "start", "begin_part", "publish", "acknowledge",
    # "set_ready", "set_fault", "heartbeat", "reopen", "close". Lets daemon tests check that a failing output does
    # not stop inspection.
    fail_on: list[str] = field(default_factory=list)

    def validate(self) -> None:
        allowed = {"start", "begin_part", "publish", "acknowledge", "set_ready", "set_fault", "heartbeat", "reopen",
                   "close"}
        unknown = sorted(set(self.fail_on) - allowed)
        if unknown:
            raise ValueError(f"fail_on: unknown method {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")


@OUTPUTS.register(RecordingOutputConfig)
class RecordingOutput(Output):
    """Records (method, argument) for every call in order; thread-safe so a daemon thread can drive it."""

    def __init__(self, cfg: RecordingOutputConfig | None = None) -> None:
        self.cfg = cfg or RecordingOutputConfig()
        self.name = self.cfg.name
        self.fail_on: set[str] = set(self.cfg.fail_on)  # tests may change it while running
        self.calls: list[tuple[str, Any]] = []
        self._cond = threading.Condition()

    def _record(self, method: str, arg: Any = None) -> None:
        with self._cond:
            self.calls.append((method, arg))
            self._cond.notify_all()
        if method in self.fail_on:
            raise OutputError(f"{self.name}: {method} failed (fail_on)")

    # -- Output ----------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._record("start")

    def begin_part(self, frame_id: int) -> None:
        self._record("begin_part", frame_id)

    def publish(self, result: InspectionResult) -> None:
        self._record("publish", result)

    def acknowledge(self) -> None:
        self._record("acknowledge")

    def reopen(self) -> None:
        self._record("reopen")

    def set_ready(self, ready: bool) -> None:
        self._record("set_ready", bool(ready))

    def set_fault(self, reason: str | None) -> None:
        self._record("set_fault", reason)

    def heartbeat(self) -> None:
        self._record("heartbeat")

    def close(self) -> None:
        self._record("close")

    # -- views for assertions --------------------------------------------------------------------------------
    def calls_to(self, method: str) -> list[Any]:
        with self._cond:
            return [arg for name, arg in self.calls if name == method]

    @property
    def results(self) -> list[InspectionResult]:
        return self.calls_to("publish")

    @property
    def ready(self) -> bool:
        """The last READY state signalled (False before any set_ready, like a real output's safe state)."""
        states = self.calls_to("set_ready")
        return states[-1] if states else False

    @property
    def fault(self) -> str | None:
        reasons = self.calls_to("set_fault")
        return reasons[-1] if reasons else None

    @property
    def heartbeats(self) -> int:
        return len(self.calls_to("heartbeat"))

    @property
    def closed(self) -> bool:
        return bool(self.calls_to("close"))

    def wait_for(self, method: str, count: int = 1, timeout: float = 5.0) -> bool:
        """Block until `method` was called at least `count` times; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: sum(1 for name, _ in self.calls if name == method) >= count, timeout)
