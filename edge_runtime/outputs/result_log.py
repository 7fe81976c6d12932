"""JSON-lines result log: one record per inspected (or faulted) part, the station's record of truth.

Each record is written with one unbuffered append and, by default, fsync'd before publish() returns, so a
record the daemon was told is written survives a power cut. The log rotates by size (log -> log.1 -> log.2 ...).

It is the station's critical record: the output bus writes it BEFORE any line output is driven for the part, and
a part whose record cannot be written (disk full, I/O error) is not OK: it goes to the line as FAULT
(`on_record_failure: fault`, the default), or the station also stops inspecting until it is restarted
(`on_record_failure: halt`). Either way /healthz reports the failure.

External rotation (logrotate's rename + create): before every append the log compares the open file's
(device, inode) with what the path names now, and reopens the path when they differ or the path is gone, so
no record goes into a renamed or deleted file. SIGUSR1 makes the daemon reopen it too (systemd/INSTALL.md).
"""
from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import stat
from dataclasses import dataclass
from typing import Any, Literal

from edge_runtime.outputs.base import OUTPUTS, Output, OutputError
from edge_runtime.records import InspectionResult

# How far back from the end last_frame_id() looks for a complete record before giving up on a file.
_TAIL_CHUNK = 64 * 1024
# Rotated files a log keeps at most: a rotation renames each in turn, on the inspection loop's thread.
MAX_BACKUPS = 1000


@dataclass(kw_only=True)
class ResultLogConfig:
    type: Literal["result_log"] = "result_log"
    path: str
    max_bytes: int = 50 * 1024 * 1024   # rotate before a record would take the log past this size
    backups: int = 5                    # rotated files kept (log.1 .. log.N), at least 1
    fsync: Literal["always", "never"] = "always"  # "never" trades durability for SD-card wear
    on_record_failure: Literal["fault", "halt"] = "fault"  # a part that cannot be recorded is FAULT; halt also stops

    def validate(self) -> None:
        if not self.path:
            raise ValueError("path: must not be empty")
        if self.max_bytes < 1024:
            raise ValueError(f"max_bytes: must be at least 1024, got {self.max_bytes}")
        if self.backups < 1:
            # 0 would delete the whole log at each rotation: the records of the parts just passed with it
            raise ValueError(f"backups: must be at least 1 (0 would delete every record at rotation), got {self.backups}")
        if self.backups > MAX_BACKUPS:
            # Each rotation looks for every backup in turn (probe 102: 9223372036854775807 validated, and the first
            # rotation held the inspection loop for ever: READY down, SIGTERM never answered).
            raise ValueError(f"backups: must be at most {MAX_BACKUPS}, got {self.backups}")


def _finite(value: Any) -> Any:
    """NaN/inf are not JSON; a non-finite score is logged as null rather than making the line unreadable."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def encode_record(result: InspectionResult) -> bytes:
    """One log line (ASCII JSON plus newline) for `result`."""
    text = json.dumps(_finite(result.to_record()), separators=(",", ":"), allow_nan=False, ensure_ascii=True)
    return text.encode("ascii") + b"\n"


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return kind
    return "not a file"


def fsync_dir(path: str) -> None:
    """Make a create or rename in `path`'s directory durable (the file's own fsync does not cover its name)."""
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_PROBE_FREE_BYTES = 64 * 1024   # room for a few hundred records before the probe calls the disk usable again


@OUTPUTS.register(ResultLogConfig)
class ResultLog(Output):
    """Append-only JSON-lines log with size rotation; raises OutputError (naming the path) when it cannot write."""

    role = "record"
    critical_record = True

    def __init__(self, cfg: ResultLogConfig) -> None:
        self.cfg = cfg
        self.path = cfg.path
        self.name = f"result_log:{cfg.path}"
        self._fd: int | None = None
        self._inode: tuple[int, int] | None = None  # (st_dev, st_ino) of the file _good_size refers to
        self._good_size = 0        # bytes of the current file that hold only acknowledged records
        self._failed = False       # the last write failed: the file may end in a torn, unacknowledged record
        self.reopened = 0          # external rotations detected
        # (frame_id, offset, inode) of the last acknowledged record: a superseding record of the same part whose
        # write fails takes it away too (_supersede_failed)
        self._last: tuple[int, int, tuple[int, int] | None] | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> None:
        try:
            self._open()
        except OSError as exc:
            raise OutputError(f"result log {self.path}: cannot open: {exc.strerror or exc}") from exc

    def close(self) -> None:
        self._close_fd()

    def reopen(self) -> None:
        """Close and reopen the path (SIGUSR1 after an external rotation); the next append goes to the new file."""
        self._close_fd()
        try:
            self._open()
        except OSError as exc:
            raise OutputError(f"result log {self.path}: cannot reopen: {exc.strerror or exc}") from exc

    # -- Output ----------------------------------------------------------------------------------------------
    def publish(self, result: InspectionResult) -> None:
        line = encode_record(result)
        try:
            if self._fd is not None and self._replaced():
                self._close_fd()  # rotated away by logrotate (or deleted): write to what the path names now
                self.reopened += 1
            if self._fd is None:
                self._open()
            # A superseding record stays in the file of the record it supersedes, past max_bytes if need be: rotated
            # away, that OK was out of reach of _supersede_failed and stayed on record when this write failed.
            supersedes = self._last is not None and self._last[0] == result.frame_id and self._last[2] == self._inode
            if self._good_size > 0 and self._good_size + len(line) > self.cfg.max_bytes and not supersedes:
                self._rotate()
            start = self._good_size
            self._append(line)
            self._last = (result.frame_id, start, self._inode)
        except OSError as exc:
            self._failed = True
            self._supersede_failed(result)
            self._cut_unacknowledged()
            self._close_fd()
            reason = exc.strerror or str(exc)
            if exc.errno == errno.ENOSPC:
                reason = f"disk full: {reason}"
            raise OutputError(f"result log {self.path}: frame {result.frame_id} not logged: {reason}") from exc

    def probe(self) -> None:
        """Raise OutputError unless a record could be written now (the file opens, its disk has room), without
        writing one: the station uses it to leave a record fault when the disk is fixed, with no part to spend."""
        try:
            if self._fd is None or self._replaced():
                self._close_fd()
                self._open()
            st = os.statvfs(os.path.dirname(os.path.abspath(self.path)))
            if st.f_bavail * st.f_frsize < _PROBE_FREE_BYTES:
                raise OSError(errno.ENOSPC, "disk full")
            if self.cfg.fsync == "always":
                os.fsync(self._fd)
        except OSError as exc:
            self._close_fd()
            raise OutputError(f"result log {self.path}: still cannot write: {exc.strerror or exc}") from exc

    # -- internals -------------------------------------------------------------------------------------------
    def _replaced(self) -> bool:
        """True when the path no longer names the open file (renamed, deleted or replaced by someone else)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return True
        return (st.st_dev, st.st_ino) != self._inode

    def _open(self) -> None:
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, exist_ok=True)
        existed = os.path.exists(self.path)
        # O_APPEND without O_TRUNC: an existing log is never cut short by opening it (read access: tail check).
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                # A FIFO, a device (a link to /dev/null) or a socket takes every write and keeps none: with
                # fsync: never nothing would fail, and OK would reach the line with no record anywhere.
                raise OSError(errno.EINVAL, f"not a regular file ({_file_kind(st.st_mode)} at its path)")
            try:
                # One writer per file: a second result log on it (another line, another daemon) keeps its own idea
                # of where the acknowledged records end, and its recovery from a failed write cut the other's
                # records off (probe 60: acknowledged OK records of one line deleted by the other's reopen).
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise OSError(errno.EBUSY, "another result log (a second line or daemon) is writing this file") from None
            inode = (st.st_dev, st.st_ino)
            size = st.st_size
            if self._failed and inode == self._inode and size > self._good_size:
                # Our own failed write left a partial (never acknowledged) record: cut exactly that off, so the
                # next record starts on a clean line. Bytes we did not write ourselves are never removed.
                os.ftruncate(fd, self._good_size)
                size = self._good_size
            if size > 0 and not self._ends_with_newline(fd, size):
                # A crash (or a writer we do not know) tore the last line: terminate it so it stays one unreadable
                # line that readers skip, instead of gluing the next record onto it.
                self._write_all(fd, b"\n")
                size += 1
            if not existed and self.cfg.fsync == "always":
                fsync_dir(self.path)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._inode, self._good_size, self._failed = fd, inode, size, False

    @staticmethod
    def _ends_with_newline(fd: int, size: int) -> bool:
        return os.pread(fd, 1, size - 1) == b"\n"

    def _append(self, line: bytes) -> None:
        assert self._fd is not None
        self._write_all(self._fd, line)
        if self.cfg.fsync == "always":
            os.fsync(self._fd)
        self._good_size += len(line)

    @staticmethod
    def _write_all(fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            if written <= 0:  # a regular file never does this; guard against a silent infinite loop
                raise OSError(errno.EIO, "write returned 0")
            view = view[written:]

    def _rotate(self) -> None:
        self._close_fd()
        for n in range(self.cfg.backups - 1, 0, -1):
            older = f"{self.path}.{n}"
            if os.path.exists(older):
                os.replace(older, f"{self.path}.{n + 1}")
        os.replace(self.path, f"{self.path}.1")
        if self.cfg.fsync == "always":
            fsync_dir(self.path)
        self._open()

    def _supersede_failed(self, result: InspectionResult) -> None:
        """A second record of the part just recorded is the bus's superseding FAULT record, written before any line
        output is driven: when it cannot be written, the superseded verdict (OK after a missed deadline) was never
        the line's answer and must not stay on record as it (probe 75: the line got FAULT, the log kept OK)."""
        if self._last is not None and self._last[0] == result.frame_id and self._last[2] == self._inode:
            self._good_size = min(self._good_size, self._last[1])
            self._last = None

    def _cut_unacknowledged(self) -> None:
        """Remove the record whose write or fsync just failed, now (best effort; _open cuts it otherwise).

        A failed fsync leaves the whole record readable in the file: it goes to the line as FAULT, and a crash or
        restart before the next open kept it there, a record of OK for a part the PLC was told FAULT (probe 75)."""
        if self._fd is None:
            return
        try:
            if os.fstat(self._fd).st_size > self._good_size:
                os.ftruncate(self._fd, self._good_size)
                if self.cfg.fsync == "always":
                    os.fsync(self._fd)
        except OSError:
            pass  # the disk refuses this too: _failed stays set, so the next _open cuts it

    def _close_fd(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.close(fd)
            except OSError:
                pass  # closing after a failed write can report the same error again; the fd is gone either way


def _last_frame_id_in(path: str) -> int | None:
    """frame_id of the last complete, parseable record in one file; torn or garbled lines are skipped."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return None
    with f:
        end = f.seek(0, os.SEEK_END)
        pos = end
        carry = b""
        while pos > 0:
            start = max(0, pos - _TAIL_CHUNK)
            f.seek(start)
            chunk = f.read(pos - start) + carry
            lines = chunk.split(b"\n")
            # The first piece may be the tail of a line that starts in an earlier chunk: keep it for the next round.
            carry = lines.pop(0) if start > 0 else b""
            for raw in reversed(lines):
                frame_id = _frame_id_of(raw)
                if frame_id is not None:
                    return frame_id
            pos = start
        return None


def _frame_id_of(raw: bytes) -> int | None:
    raw = raw.strip()
    if not raw:
        return None
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    frame_id = record.get("frame_id") if isinstance(record, dict) else None
    return frame_id if isinstance(frame_id, int) and not isinstance(frame_id, bool) else None


def last_frame_id(path: str) -> int | None:
    """The frame_id of the newest valid record in the log at `path` (or, if it was just rotated, its backups).

    A restarted daemon continues numbering after it, so frame ids in the log stay unique. None: no record yet.
    """
    candidates = [path]
    n = 1
    while os.path.exists(f"{path}.{n}"):
        candidates.append(f"{path}.{n}")
        n += 1
    for candidate in candidates:
        frame_id = _last_frame_id_in(candidate)
        if frame_id is not None:
            return frame_id
    return None
