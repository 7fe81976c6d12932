"""The one interface every frame source implements (camera, video/stream, image folder)."""
from __future__ import annotations

import abc

from edge_runtime.records import Frame


class SourceError(RuntimeError):
    """The source cannot deliver (camera gone, stream closed): the daemon faults and retries with backoff."""


class FrameSource(abc.ABC):
    name: str = "source"

    def open(self) -> None:
        """Acquire the device; raise SourceError if it is not there."""

    @abc.abstractmethod
    def read(self, timeout: float) -> Frame | None:
        """Next frame, or None when none arrived within `timeout` seconds. Raise SourceError on loss."""

    @property
    def exhausted(self) -> bool:
        """True when a finite source (replayed folder or file) has delivered everything."""
        return False

    def close(self) -> None:
        """Release the device."""
