"""The one interface every output implements (result log, GPIO, serial, Modbus, NG image store).

Fail-safe contract: an output starts in its safe state (not OK, not READY), and close() returns it there.
A result whose verdict is not OK must never be signalled as a pass (REVIEW and FAULT included).

Per-part sequence, driven by the output bus (edge_runtime/output_bus.py) from the inspection loop:

    begin_part(frame_id)   a trigger fired or inspection of a free-run frame starts: the previous part's
                           verdict is withdrawn (OK/NG/REVIEW dropped) and BUSY is shown
    publish(result)        the verdict of exactly that part
    acknowledge()          the PLC acknowledged the verdict (GPIO ACK input, serial ACK): withdraw it

Each output declares where it sits in that order: `critical_record` outputs (the result log) are written
before any line output is driven, because a part whose record cannot be written is not OK; `role = "line"`
outputs tell the PLC; `role = "record"` outputs (images) come after, off the critical path. `slow` outputs
may block (a serial port the PLC stopped reading, a disk) and are driven from their own worker thread.
"""
from __future__ import annotations

import abc
from typing import ClassVar, Literal

from edge_runtime.records import InspectionResult
from edge_runtime.registry import Registry

# The outputs a station file can name (`outputs: [{type: ...}]`): each output module registers its class.
OUTPUTS = Registry("output")


class OutputError(RuntimeError):
    """An output could not deliver; the daemon logs it, counts it and keeps inspecting."""


class Output(abc.ABC):
    name: str = "output"
    role: ClassVar[Literal["line", "record"]] = "line"
    critical_record: ClassVar[bool] = False   # written before line outputs; a failure makes the part FAULT
    slow: ClassVar[bool] = False              # may block: the bus drives it from a worker thread

    def start(self) -> None:
        """Open the device and drive the safe state (not OK, not READY)."""

    def begin_part(self, frame_id: int) -> None:
        """A new part: withdraw the previous verdict (no OK/NG/REVIEW) and show BUSY where there is a BUSY signal."""

    @abc.abstractmethod
    def publish(self, result: InspectionResult) -> None:
        """Signal one inspected (or faulted) part."""

    def wants(self, result: InspectionResult) -> bool:
        """Whether publish(result) would do anything: a record output on a worker is not handed the parts it
        ignores, so they never take a place in its bounded queue from the parts it keeps."""
        return True

    def acknowledge(self) -> None:
        """The PLC acknowledged the last verdict: withdraw it (handshake mode)."""

    def set_ready(self, ready: bool) -> None:
        """READY: the station inspects. False whenever a bundle, camera or internal fault stops inspection."""

    def set_fault(self, reason: str | None) -> None:
        """ERROR line/flag on with a reason; None clears it."""

    def heartbeat(self) -> None:
        """Called once per loop iteration of the inspection thread, so a hung loop stops the heartbeat."""

    def reopen(self) -> None:
        """Reopen files after an external log rotation (SIGUSR1)."""

    def close(self) -> None:
        """Return to the safe state and release the device."""

    def failure(self) -> str | None:
        """A fault the output found on its own, outside any call the station made (GPIO: the timer that ends a
        verdict pulse could not drop OK). A line output's failure holds the line in FAULT (READY down) until it
        clears; None (the default) when there is none."""
        return None
