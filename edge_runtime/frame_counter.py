"""Frame ids that are never reused, even after kill -9 or a power cut, without an fsync per frame.

The counter file in state_dir holds a high-water mark: every id below it may have been handed out. Before an id at
or above the mark is used, the mark moves up by a block (default 1000) and is written durably (temporary file,
fsync, rename, fsync of the folder). A crash therefore loses at most one block of ids (a gap, never a repeat);
a clean stop writes the exact next id, so a restart continues without a gap.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

FRAME_COUNTER_FILE = "next_frame_id"
DEFAULT_BLOCK = 1000


class FrameCounterError(RuntimeError):
    """The counter cannot be made durable: ids could repeat after a crash, so the station must not inspect."""


class FrameCounter:
    """Hands out increasing frame ids; `state_dir=None` keeps them in memory only (ids restart after a restart)."""

    def __init__(self, state_dir: str | None, *, start_at: int = 0, block: int = DEFAULT_BLOCK) -> None:
        if block < 1:
            raise ValueError(f"block must be >= 1, got {block}")
        self.path = Path(state_dir) / FRAME_COUNTER_FILE if state_dir else None
        self.block = block
        self._next = start_at
        # ids below this are covered by the file on disk; None: not persisted
        self._reserved: int | None = None if self.path is None else start_at

    @property
    def next_id(self) -> int:
        return self._next

    def open(self) -> None:
        """Read the saved mark (continue after it) and reserve the first block. Raises FrameCounterError."""
        if self.path is None:
            log.warning("no state_dir: frame ids are not persisted and may repeat after a restart")
            return
        try:
            saved = int(self.path.read_text().strip())
        except FileNotFoundError:
            saved = 0
        except OSError as exc:
            raise FrameCounterError(f"frame counter {self.path}: cannot read ({exc.strerror or exc})") from None
        except ValueError:
            raise FrameCounterError(f"frame counter {self.path}: expected one integer; remove the file only if "
                                    f"no id above the result log's last one was sent") from None
        self._next = max(self._next, saved)
        self._reserve(self._next + self.block)

    def take(self) -> int:
        """The next id; reserves another block first when the current one is used up. Raises FrameCounterError."""
        if self._reserved is not None and self._next >= self._reserved:
            self._reserve(self._next + self.block)
        frame_id = self._next
        self._next += 1
        return frame_id

    def take_unpersisted(self) -> int:
        """The next id without reserving (only to answer a part with FAULT after a reservation failed)."""
        frame_id = self._next
        self._next += 1
        return frame_id

    def close(self) -> None:
        """Clean stop: save the exact next id (no gap after a restart). Errors are logged: the mark still holds."""
        if self.path is None or self._reserved is None:
            return
        try:
            self._write(self._next)
        except OSError as exc:
            if self._next > self._reserved:   # take_unpersisted answered parts past the saved mark
                log.error("frame counter %s: cannot save on stop (%s); ids %d-%d answered FAULT parts without being "
                          "saved: the next start continues after the result log's last id, or from %d if no log "
                          "holds them (those ids would then repeat)", self.path, exc, self._reserved, self._next - 1,
                          self._reserved)
            else:
                log.warning("frame counter %s: cannot save on stop (%s); the next start skips to %d", self.path, exc,
                            self._reserved)

    def _reserve(self, mark: int) -> None:
        try:
            self._write(mark)
        except OSError as exc:
            raise FrameCounterError(f"frame counter {self.path}: cannot reserve ids ({exc.strerror or exc})") from None
        self._reserved = mark

    def _write(self, value: int) -> None:
        assert self.path is not None
        folder = self.path.parent
        folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            os.write(fd, f"{value}\n".encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)  # atomic: a power cut leaves the old mark or the new one
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
