"""The one interface every frame source implements (camera, video/stream, image folder)."""
from __future__ import annotations

import abc

from edge_runtime.records import Frame
from edge_runtime.registry import Registry

# The frame sources a station file can name (`source: {type: ...}`): each source module registers its class.
SOURCES = Registry("source")


def escape_name(name: str, limit: int = 512) -> str:
    """A source name (file name, path, URL) safe for one line of a log or a line-oriented file.

    Control characters (a newline would forge a journal line), other non-printable characters, undecodable
    bytes (surrogate escapes) and backslashes are written as Python-style escapes, so the result is one line
    and unambiguous; names longer than `limit` characters are cut with a marker."""
    out = "".join(c if c.isprintable() and c != "\\" else c.encode("unicode_escape", "backslashreplace").decode("ascii")
                  for c in name)
    return out if len(out) <= limit else out[:limit] + f"...[{len(out) - limit} more]"


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

    def probe(self) -> None:
        """While the line waits (no trigger, no frame): raise SourceError if the source is gone, so READY drops
        then and not at the next part. Default: nothing to check."""
