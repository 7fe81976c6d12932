"""What a station tells the plant (MQTT state message, OPC UA variables): one summary of its StationStatus."""
from __future__ import annotations

from typing import Any

from edge_runtime.http_endpoint import StationStatus, stalled_reason


def station_summary(name: str, status: StationStatus) -> dict[str, Any]:
    """JSON-ready summary: station name, state and reason, bundle in service, part counters and verdict counts."""
    stalled = stalled_reason(status)   # MQTT and OPC UA must not report "ready" while the loop is stuck
    return {
        "station": name,
        "state": "stalled" if stalled else status.state,
        "reason": stalled or status.reason,
        "bundle_id": status.bundle_id,
        "bundle_version": status.bundle_version,
        "frames": status.frames,
        "verdicts": dict(status.verdicts),
        "last_verdict": status.last_verdict,
        "last_bundle_id": status.last_bundle_id,   # the bundle that scored it, not always bundle_id (a switch since)
        "faults": status.faults,
        "uptime_s": round(status.uptime_s, 1),
        "counters": dict(status.counters),
        **({"rollout": status.rollout} if status.rollout is not None else {}),
        # Drift warnings in force (edge_runtime/drift_monitor.py): the plant sees a lamp ageing before the scrap.
        **({"drift": sorted(status.drift.warnings.values())} if status.drift is not None and status.drift.warnings
           else {}),
    }
