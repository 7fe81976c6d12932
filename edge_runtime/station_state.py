"""The state of one inspection line as an enum (starting, ready, busy, fault(kind), stopping), not a parsed string.

`LineState.of()` derives it from what the line keeps (its fault reason, READY flag, the frame in inspection);
/healthz, the page and MQTT read this instead of matching on the reason text.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass


class StationState(str, enum.Enum):
    STARTING = "starting"   # bundle not loaded yet, source not open yet
    READY = "ready"         # inspecting, waiting for the next part
    BUSY = "busy"           # a frame is in inspection now
    FAULT = "fault"         # not inspecting: `kind` says why (bundle, source, record, halted, recipe, ...)
    STOPPING = "stopping"   # shutting down; outputs back to their safe state


# Fault reasons start with the part of the station that failed ("source: camera gone", "bundle /x: bad
# checksum", "halted: record: ..."); these are the kinds a consumer can switch on.
FAULT_KINDS = ("halted", "bundle", "source", "record", "recipe", "starting")


@dataclass(frozen=True)
class LineState:
    state: StationState
    fault_kind: str | None = None   # set when state is FAULT
    reason: str | None = None       # the human-readable reason (logged, shown on /healthz)

    @classmethod
    def of(cls, *, stopping: bool, fault_reason: str | None, ready: bool, busy: bool, loaded: bool) -> "LineState":
        if stopping:
            return cls(StationState.STOPPING, None, fault_reason)
        if fault_reason == "starting" or (fault_reason is None and not loaded):
            return cls(StationState.STARTING, None, fault_reason)
        if fault_reason:
            kind = next((k for k in FAULT_KINDS if fault_reason.startswith(k)), "other")
            return cls(StationState.FAULT, kind, fault_reason)
        if busy:
            return cls(StationState.BUSY)
        return cls(StationState.READY if ready else StationState.STARTING)

    def __str__(self) -> str:
        return f"fault({self.fault_kind})" if self.state is StationState.FAULT else self.state.value
