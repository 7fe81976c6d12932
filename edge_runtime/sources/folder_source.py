"""Image folder source: replays a folder of saved images, or watches one that a camera PC writes into.

It hands over file bytes only; decoding happens in the pipeline, so a corrupt file becomes a FAULT result.
"""
from __future__ import annotations

import logging
import os
import stat
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

from edge_runtime.records import Frame
from edge_runtime.sources.base import FrameSource, SourceError

log = logging.getLogger(__name__)

# The formats the decode stage (cv2.imdecode) reads; anything else in the folder is ignored.
SUPPORTED_EXTENSIONS = ("png", "jpg", "jpeg", "bmp", "tif", "tiff")


def _normalise_extension(ext: str) -> str:
    return ext.strip().lower().lstrip(".")


@dataclass(kw_only=True)
class FolderSourceConfig:
    type: Literal["folder"] = "folder"
    path: str                                   # the folder; files must stay inside it (symlinks are resolved)
    mode: Literal["replay", "watch"] = "replay"
    extensions: list[str] = field(default_factory=lambda: list(SUPPORTED_EXTENSIONS))
    loop: bool = False                          # replay only: start over after the last file
    poll_interval_s: float = 0.2                # watch only: time between directory scans
    process_existing: bool = False              # watch only: also inspect files already there at open()
    name: str | None = None

    def validate(self) -> None:
        if not self.path:
            raise ValueError("path: must name a folder")
        if not self.extensions:
            raise ValueError("extensions: must list at least one of " + ", ".join(SUPPORTED_EXTENSIONS))
        for ext in self.extensions:
            if _normalise_extension(ext) not in SUPPORTED_EXTENSIONS:
                raise ValueError(f"extensions: {ext!r} is not supported (supported: {', '.join(SUPPORTED_EXTENSIONS)})")
        if self.loop and self.mode != "replay":
            raise ValueError("loop: applies only to mode 'replay'")
        if self.poll_interval_s <= 0:
            raise ValueError("poll_interval_s: must be > 0")


# (size, mtime_ns): a file is ready when this is unchanged across two polls, so half-written files wait.
_Signature = tuple[int, int]


class FolderSource(FrameSource):
    def __init__(
        self,
        cfg: FolderSourceConfig,
        start_frame_id: int = 0,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        cfg.validate()
        self.cfg = cfg
        self.name = cfg.name or f"folder:{cfg.path}"
        self.skipped = 0                        # files that could not be read or resolve outside the folder
        self._next_id = start_frame_id
        self._extensions = {"." + _normalise_extension(e) for e in cfg.extensions}
        self._clock = clock
        self._sleep = sleep
        self._root: Path | None = None
        self._queue: deque[Path] = deque()
        self._replay_done = False
        self._frames_this_pass = 0
        # watch mode state
        self._pending: dict[Path, _Signature] = {}    # seen once with this signature, waiting for a second poll
        self._delivered: dict[Path, _Signature] = {}  # read (or skipped) with this signature
        self._last_poll: float | None = None
        self._rejected: set[Path] = set()             # resolve outside the folder; counted once

    @property
    def next_frame_id(self) -> int:
        return self._next_id

    # -- FrameSource -----------------------------------------------------------------------------------------

    def open(self) -> None:
        root = Path(self.cfg.path)
        try:
            resolved = root.resolve(strict=True)
        except OSError as exc:
            raise SourceError(f"folder source {self.cfg.path}: cannot open folder: {exc}") from exc
        if not resolved.is_dir():
            raise SourceError(f"folder source {self.cfg.path}: not a folder")
        self._root = resolved
        self._queue.clear()
        self._pending.clear()
        self._delivered.clear()
        self._replay_done = False
        self._frames_this_pass = 0
        self._last_poll = None
        self._rejected.clear()
        if self.cfg.mode == "replay":
            self._queue.extend(self._list_files())
            if not self._queue:
                log.warning("folder source %s: no %s files to replay", self.cfg.path, "/".join(sorted(self._extensions)))
        elif not self.cfg.process_existing:
            # Files already there were written before we started; treat them as delivered unless they change.
            for path, sig in self._scan().items():
                self._delivered[path] = sig

    def read(self, timeout: float) -> Frame | None:
        if self._root is None:
            self.open()
        deadline = self._clock() + max(0.0, timeout)
        while True:
            frame = self._next_frame()
            if frame is not None:
                return frame
            if self.exhausted:
                return None
            remaining = deadline - self._clock()
            if remaining <= 0:
                return None
            wait = remaining if self.cfg.mode == "replay" else self._until_next_poll()
            self._sleep(max(0.0, min(wait, remaining)))

    @property
    def exhausted(self) -> bool:
        return self.cfg.mode == "replay" and self._replay_done and not self._queue

    def close(self) -> None:
        self._root = None
        self._queue.clear()
        self._pending.clear()

    # -- internals -------------------------------------------------------------------------------------------

    def _next_frame(self) -> Frame | None:
        while True:
            if not self._queue:
                if self.cfg.mode == "replay":
                    if not self._refill_replay():
                        return None
                elif not self._poll_watch():
                    return None
            path = self._queue.popleft()
            frame = self._read_file(path)
            if frame is not None:
                return frame

    def _refill_replay(self) -> bool:
        if self._replay_done:
            return False
        if self.cfg.loop:
            files = self._list_files()
            if files and self._frames_this_pass:
                self._frames_this_pass = 0
                self._queue.extend(files)
                return True
            # Without this a folder of unreadable files would spin here forever.
            log.warning("folder source %s: no readable files left to loop over", self.cfg.path)
        self._replay_done = True
        return False

    def _until_next_poll(self) -> float:
        if self._last_poll is None:
            return 0.0
        return self._last_poll + self.cfg.poll_interval_s - self._clock()

    def _poll_watch(self) -> bool:
        """Scan when a poll is due; queue files whose signature matched the previous poll. True if any queued."""
        now = self._clock()
        # The tolerance keeps float rounding from postponing a poll by a whole interval.
        if self._last_poll is not None and now - self._last_poll < self.cfg.poll_interval_s - 1e-6:
            return False
        self._last_poll = now
        current = self._scan()
        # Forget files that went away, so the bookkeeping stays as large as the folder, not its history.
        for gone in set(self._delivered) - set(current):
            del self._delivered[gone]
        ready: list[tuple[int, str, Path]] = []
        next_pending: dict[Path, _Signature] = {}
        for path, sig in current.items():
            if self._delivered.get(path) == sig:
                continue
            # An empty file is usually one the writer has just created: wait for content.
            if sig[0] > 0 and self._pending.get(path) == sig:
                ready.append((sig[1], path.name, path))
                self._delivered[path] = sig
            else:
                next_pending[path] = sig
        self._pending = next_pending
        # Oldest first, so frames follow the order the camera PC wrote them in.
        self._queue.extend(p for _, _, p in sorted(ready))
        return bool(self._queue)

    def _scan(self) -> dict[Path, _Signature]:
        """Regular files inside the folder with a wanted extension, and their signatures."""
        assert self._root is not None
        try:
            entries = list(os.scandir(self._root))
        except OSError as exc:
            raise SourceError(f"folder source {self.cfg.path}: cannot list folder: {exc}") from exc
        found: dict[Path, _Signature] = {}
        for entry in entries:
            if os.path.splitext(entry.name)[1].lower() not in self._extensions:
                continue
            path = self._root / entry.name
            try:
                st = entry.stat()  # follows symlinks: the signature is the target's
            except OSError:
                continue  # vanished or a dangling link: nothing to inspect
            if not stat.S_ISREG(st.st_mode):
                continue
            # A plain entry of the resolved folder is inside it; only links need resolving (cheap on big folders).
            if entry.is_symlink() and not self._inside(path):
                continue
            found[path] = (st.st_size, st.st_mtime_ns)
        return found

    def _list_files(self) -> list[Path]:
        return sorted(self._scan(), key=lambda p: p.name)

    def _inside(self, path: Path) -> bool:
        """True when `path` (after resolving symlinks) lies inside the folder; counts and logs the ones that do not."""
        assert self._root is not None
        try:
            resolved = path.resolve(strict=True)
        except OSError:
            return True  # vanished since the scan: the read reports it
        if resolved.is_relative_to(self._root):
            return True
        if path not in self._rejected:
            # Once per file, not on every poll or replay pass.
            self._rejected.add(path)
            self.skipped += 1
            log.warning("folder source %s: skipping %s: it resolves to %s, outside the folder", self.cfg.path, path.name, resolved)
        return False

    def _read_file(self, path: Path) -> Frame | None:
        # Check again right before reading: the link may have been swapped since the scan.
        try:
            resolved = path.resolve(strict=True)
            if not resolved.is_relative_to(self._root):
                raise PermissionError(f"resolves to {resolved}, outside the folder")
            data = resolved.read_bytes()
        except OSError as exc:
            self.skipped += 1
            log.warning("folder source %s: skipping %s: %s", self.cfg.path, path.name, exc)
            return None
        frame = Frame(frame_id=self._next_id, source=str(path), encoded=data)
        self._next_id += 1
        self._frames_this_pass += 1
        return frame
