"""The one interface every line output implements (result log, GPIO, serial, Modbus, NG image store).

Fail-safe contract: an output starts in its safe state (not OK, not READY), and close() returns it there.
A result whose verdict is not OK must never be signalled as a pass.
"""
from __future__ import annotations

import abc

from edge_runtime.records import InspectionResult


class OutputError(RuntimeError):
    """An output could not deliver; the daemon logs it, counts it and keeps inspecting."""


class Output(abc.ABC):
    name: str = "output"

    def start(self) -> None:
        """Open the device and drive the safe state (not OK, not READY)."""

    @abc.abstractmethod
    def publish(self, result: InspectionResult) -> None:
        """Signal one inspected (or faulted) part."""

    def set_ready(self, ready: bool) -> None:
        """READY: the station inspects. False whenever a bundle, camera or internal fault stops inspection."""

    def set_fault(self, reason: str | None) -> None:
        """ERROR line/flag on with a reason; None clears it."""

    def heartbeat(self) -> None:
        """Called once per loop iteration of the inspection thread, so a hung loop stops the heartbeat."""

    def close(self) -> None:
        """Return to the safe state and release the device."""
