"""Image folder source: replays a folder of saved images, or watches one that a camera PC writes into.

It hands over file bytes only; decoding happens in the pipeline, so a corrupt file becomes a FAULT result.

Watch mode, the convention for camera software (also in README.md):

1. Write each image under a temporary name and rename it into place when it is complete: `name.png.tmp`,
   `name.tmp`, `name.part` or a dotfile `.name.png`. Temporary names are never read (wrong extension, or
   hidden). A rename within one file system is atomic, so the station sees either nothing or the whole file.
2. Writing in place also works, more slowly: a file is handed over only when it looks complete (PNG ends with
   its IEND chunk, JPEG with its EOI marker, BMP has the size its header declares, TIFF's first directory lies
   inside the file) and its size and modification time did not change over one `poll_interval_s`. A file that
   stays incomplete for `incomplete_timeout_s` is handed over anyway, so a broken part becomes a FAULT record
   instead of silence.
3. One image per part, one name per image. A name whose content changes later (a camera PC overwriting
   `last.png`) is a new part.

How the folder is watched: on Linux with inotify (IN_CLOSE_WRITE, IN_MOVED_TO, IN_CREATE; ctypes on libc, no
dependency), so an idle folder of 20,000 old files costs nothing between parts. Elsewhere, or with
`watch_method: poll`, the folder's own modification time is checked every `poll_interval_s` and the folder is
listed only when it changed (and every `rescan_interval_s` as a safety net); only new or replaced entries
are stat'ed. The poll method sees new names and renamed-into-place files; an in-place overwrite of a name
already handed over is seen by inotify only.

Exactly once across restarts: the names handed over are acknowledged in a journal (JSON lines, fsync'd) when
the daemon asks for the next frame or closes the source, i.e. after that part's result was published. A
restarted daemon skips what the journal holds and inspects everything else, including parts written while it
was down or while the folder was unavailable. The journal lives in the station's `state_dir` (or `journal:`);
without either, consumed files are remembered in memory only (logged at open). A part whose record was written
but whose acknowledgement was not (killed in between, a window of a few milliseconds) is inspected again
after the restart: a part is never lost, and at most the one in flight is inspected twice.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import json
import logging
import os
import select
import stat
import struct
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

from edge_runtime.decode import DEFAULT_LIMITS, MAX_PIXELS
from edge_runtime.records import Frame
from edge_runtime.sources.base import SOURCES, FrameSource, SourceError, escape_name

log = logging.getLogger(__name__)

# The largest file the decoder accepts with the default limits (MAX_PIXELS at max_bytes_per_pixel, plus the
# metadata allowance): anything larger is refused from its size, before it is read into memory.
MAX_FILE_BYTES = int(MAX_PIXELS * DEFAULT_LIMITS.max_bytes_per_pixel) + DEFAULT_LIMITS.metadata_allowance_bytes

# The formats the decode stage (cv2.imdecode) reads; anything else in the folder is ignored.
SUPPORTED_EXTENSIONS = ("png", "jpg", "jpeg", "bmp", "tif", "tiff")
# Names a writer uses while the file is not complete: never read (see the module docstring).
TEMPORARY_SUFFIXES = (".tmp", ".part", ".partial", "~")


FUTURE_MTIME_S = 1.0   # watch + trigger: a file dated further ahead than this has a writer clock that cannot be trusted
# after_trigger: a file renamed or linked in after the trigger that came into being more than this before it is an
# earlier image (a file server's clock a little behind the station's must not fault every part)
BORN_BEFORE_SLACK_S = 0.5
BEFORE_TRIGGER_GRACE_S = 0.5   # before_trigger with no file before the trigger: one landing this soon after is its


_STATX_BTIME = 0x800
_statx = None   # libc's statx, looked up once (None: not looked up yet; False: not available)


JOURNAL_COMPACT_MIN = 4096   # a running watch compacts its journal once it holds this many entries more than it kept
REWRITE_WARN_S = 30.0   # the same file handed over again within this: warned about (_note_rewrite)


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "not a file"


def _open_nonblocking(path: str, flags: int) -> int:
    """open()'s opener for frame files: O_NONBLOCK, so a FIFO or device put under an image name after the scan
    (a rename over it) is opened at once instead of blocking the station until a writer comes; the caller's fstat
    then refuses it. No effect on reading a regular file."""
    return os.open(path, flags | os.O_NONBLOCK)


def _birth_time_ns(path: Path) -> int | None:
    """A file's birth time from statx(2) (glibc >= 2.28, Linux >= 4.11) when the file system records it, else
    None. struct statx: stx_mask at offset 0, stx_btime {tv_sec int64, tv_nsec uint32} at offset 80."""
    global _statx
    if _statx is None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            _statx = libc.statx
            _statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
            _statx.restype = ctypes.c_int
        except (OSError, AttributeError):
            _statx = False
    if _statx is False:
        return None
    buf = ctypes.create_string_buffer(256)
    if _statx(-100, os.fsencode(path), 0, _STATX_BTIME, buf) != 0:   # -100: AT_FDCWD
        return None
    if not struct.unpack_from("I", buf, 0)[0] & _STATX_BTIME:
        return None
    sec, nsec = struct.unpack_from("qI", buf, 80)
    return sec * 1_000_000_000 + nsec


def _normalise_extension(ext: str) -> str:
    return ext.strip().lower().lstrip(".")


def is_temporary_name(name: str) -> bool:
    """True for names a writer uses before renaming into place: dotfiles and the TEMPORARY_SUFFIXES."""
    return name.startswith(".") or name.lower().endswith(TEMPORARY_SUFFIXES)


@dataclass(kw_only=True)
class FolderSourceConfig:
    type: Literal["folder"] = "folder"
    path: str                                   # the folder; files must stay inside it (symlinks are resolved)
    mode: Literal["replay", "watch"] = "replay"
    extensions: list[str] = field(default_factory=lambda: list(SUPPORTED_EXTENSIONS))
    loop: bool = False                          # replay only: start over after the last file
    poll_interval_s: float = 0.2                # watch only: how often files being written are checked again
    process_existing: bool = False              # watch only: on the very first start (no journal yet), also
                                                # inspect files already there; later starts always inspect what
                                                # the journal does not hold
    watch_method: Literal["auto", "inotify", "poll"] = "auto"  # auto: inotify where the platform has it
    rescan_interval_s: float = 10.0             # poll method: list the folder at least this often
    incomplete_timeout_s: float = 10.0          # a file that stays incomplete this long is handed over (FAULT)
    journal: str | None = None                  # watch only: acknowledged files; default: in the station's state_dir
    # watch + a trigger: when the camera PC writes a part's image. after_trigger: the trigger comes first (the
    # PLC fires camera and station together), so a file already there is an earlier part's late image and is
    # left out. before_trigger: the camera PC writes the image, then triggers; the newest file written before the
    # trigger is the part's, older ones left out. Either way a file is never another part's verdict.
    image_arrives: Literal["after_trigger", "before_trigger"] = "after_trigger"
    image_max_age_s: float = 2.0                # before_trigger: the part's image is at most this old at the trigger
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
        if self.rescan_interval_s < self.poll_interval_s:
            raise ValueError(f"rescan_interval_s: must be >= poll_interval_s ({self.poll_interval_s}), got {self.rescan_interval_s}")
        if self.incomplete_timeout_s <= 0:
            raise ValueError(f"incomplete_timeout_s: must be > 0, got {self.incomplete_timeout_s}")
        if self.journal is not None and self.mode != "watch":
            raise ValueError("journal: applies only to mode 'watch'")
        if not self.image_max_age_s > 0:
            raise ValueError(f"image_max_age_s: must be > 0, got {self.image_max_age_s}")


# (size, mtime_ns, inode): what identifies one version of one file.
_Signature = tuple[int, int, int]

_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def looks_complete(path: Path, size: int) -> bool:
    """True when the file's bytes end the way a finished image of its format ends (see the module docstring).

    Formats it cannot judge are treated as complete; the stability check still applies to them."""
    ext = path.suffix.lower()
    try:
        with open(path, "rb", opener=_open_nonblocking) as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                return False   # swapped for a FIFO or device since the scan: the next scan leaves it out
            head = fh.read(16)
            if ext == ".png":
                fh.seek(max(0, size - len(_PNG_END)))
                return fh.read(len(_PNG_END)) == _PNG_END
            if ext in (".jpg", ".jpeg"):
                fh.seek(max(0, size - 64))
                return fh.read(64).rstrip(b"\x00").endswith(b"\xff\xd9")
            if ext == ".bmp":
                return len(head) >= 6 and struct.unpack("<I", head[2:6])[0] == size
            if ext in (".tif", ".tiff") and len(head) >= 8 and head[:4] in (b"II*\x00", b"MM\x00*"):
                end = "<" if head[:2] == b"II" else ">"
                (ifd,) = struct.unpack(end + "I", head[4:8])
                if ifd + 2 > size:
                    return False
                fh.seek(ifd)
                (count,) = struct.unpack(end + "H", fh.read(2))
                if ifd + 2 + 12 * count + 4 > size:
                    return False
                # The directory may come first (PIL and tifffile write it before the pixels): the strips must lie
                # inside the file too (probe 112: an in-place TIFF paused half-written was read, FAULT, then OK).
                return _tiff_data_end(fh, end, fh.read(12 * count)) <= size
    except (OSError, struct.error):
        return False
    return True


def _tiff_data_end(fh, end: str, entries: bytes) -> int:
    """The byte just past the last strip or tile the TIFF directory `entries` point at (0: none declared)."""
    values: dict[int, tuple[int, ...]] = {}
    for i in range(0, len(entries) - 11, 12):
        tag, kind, n = struct.unpack(end + "HHI", entries[i:i + 8])
        if tag not in (273, 279, 324, 325) or kind not in (3, 4):   # Strip/TileOffsets, Strip/TileByteCounts
            continue
        width = 2 if kind == 3 else 4
        if n * width <= 4:
            raw = entries[i + 8:i + 8 + n * width]
        else:
            fh.seek(struct.unpack(end + "I", entries[i + 8:i + 12])[0])
            raw = fh.read(n * width)
            if len(raw) < n * width:
                return sys.maxsize   # the list itself lies past the end: not written yet
        values[tag] = struct.unpack(f"{end}{n}{'H' if kind == 3 else 'I'}", raw)
    offsets, counts = values.get(273) or values.get(324, ()), values.get(279) or values.get(325, ())
    return max((at + n for at, n in zip(offsets, counts)), default=0)


# ---- inotify (Linux), through ctypes -----------------------------------------------------------------------

IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_UNMOUNT = 0x00002000
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = getattr(os, "O_CLOEXEC", 0o2000000)
_EVENT = struct.Struct("iIII")


class InotifyWatch:
    """One inotify watch on a folder: names that were closed after writing or moved in.

    `events()` returns (names, overflowed); raises SourceError when the folder itself went away."""

    def __init__(self, folder: Path) -> None:
        libc = _libc()
        if libc is None:
            raise OSError(errno.ENOSYS, "inotify is not available on this platform")
        fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        # IN_CREATE too: symlinks and hard links made in the folder produce no close-write.
        mask = IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR
        if libc.inotify_add_watch(fd, os.fsencode(folder), mask) < 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, f"inotify_add_watch {folder}: {os.strerror(err)}")
        self.fd = fd
        self.folder = folder

    def wait(self, timeout: float) -> bool:
        """Block until an event is pending or `timeout` seconds passed; True if one is pending."""
        ready, _, _ = select.select([self.fd], [], [], max(0.0, timeout))
        return bool(ready)

    def events(self) -> tuple[list[str], bool]:
        names: list[str] = []
        overflowed = False
        while True:
            try:
                buf = os.read(self.fd, 64 * 1024)
            except BlockingIOError:
                return names, overflowed
            pos = 0
            while pos + _EVENT.size <= len(buf):
                _, mask, _, length = _EVENT.unpack_from(buf, pos)
                raw = buf[pos + _EVENT.size: pos + _EVENT.size + length].rstrip(b"\x00")
                pos += _EVENT.size + length
                if mask & IN_Q_OVERFLOW:
                    overflowed = True
                elif mask & (IN_DELETE_SELF | IN_MOVE_SELF | IN_UNMOUNT | IN_IGNORED):
                    raise SourceError(f"folder source {escape_name(str(self.folder))}: the folder was removed, moved or unmounted")
                elif raw:
                    names.append(os.fsdecode(raw))

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        libc.inotify_init1.argtypes = [ctypes.c_int]
        libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        return libc
    except (OSError, AttributeError):
        return None


# ---- the journal of acknowledged files ---------------------------------------------------------------------

class Journal:
    """Append-only JSON lines {"name", "size", "mtime_ns"}: files whose result was published. fsync'd per line."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.done: set[tuple[str, int, int]] = set()
        self.existed = False
        self.kept = 0          # entries kept by the last compaction: the journal is compacted again past twice that
        self._fd: int | None = None

    def load(self) -> None:
        if self.path is None or self._fd is not None:
            return
        try:
            text = self.path.read_text(encoding="utf-8", errors="surrogateescape")
            self.existed = True
        except FileNotFoundError:
            text = ""
        except OSError as exc:
            raise SourceError(f"folder journal {escape_name(str(self.path))}: cannot read: {exc}") from exc
        for number, line in enumerate(text.splitlines(), 1):
            try:
                entry = json.loads(line)
                self.done.add((entry["name"], int(entry["size"]), int(entry["mtime_ns"])))
            except (ValueError, KeyError, TypeError):
                # A line cut by a power loss: the file it named is inspected again, never skipped by mistake.
                log.warning("folder journal %s: line %d unreadable, ignored", escape_name(str(self.path)), number)

    def compact(self, present: set[str]) -> None:
        """Rewrite the journal with the entries of files still in the folder (atomic), then open it for appends."""
        if self.path is None:
            return
        self.done = {key for key in self.done if key[0] in present}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp")
            with open(tmp, "w", encoding="utf-8", errors="surrogateescape") as fh:
                for key in sorted(self.done):
                    fh.write(_journal_line(key))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
            self.close()   # the replaced file's fd
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        except OSError as exc:
            raise SourceError(f"folder journal {escape_name(str(self.path))}: cannot write: {exc}") from exc
        self.existed = True
        self.kept = len(self.done)

    def outgrown(self) -> bool:
        """More entries than twice those kept at the last compaction (at least JOURNAL_COMPACT_MIN more): a daemon
        that runs for months beside a camera PC that deletes inspected images would otherwise keep one entry per
        part, in memory and on disk (probe 78: 1 part/s is 2.6 M entries, ~630 MB of RSS and ~200 MB of journal a
        month). Compacting when it doubles keeps the cost of the listing at O(1) per part."""
        return len(self.done) - self.kept > max(JOURNAL_COMPACT_MIN, self.kept)

    def add(self, key: tuple[str, int, int]) -> None:
        self.done.add(key)
        if self._fd is None:
            return
        try:
            os.write(self._fd, _journal_line(key).encode("utf-8", "surrogateescape"))
            os.fsync(self._fd)
        except OSError as exc:
            raise SourceError(f"folder journal {escape_name(str(self.path))}: cannot append: {exc}") from exc

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def _journal_line(key: tuple[str, int, int]) -> str:
    # json.dumps escapes control characters: a name with a newline stays on its line.
    return json.dumps({"name": key[0], "size": key[1], "mtime_ns": key[2]}) + "\n"


def _newest(result_log: str, field, tail: int = 256 * 1024):
    """field(record) of the newest record of a result log (JSON lines) for which it parses, or None."""
    try:
        with open(result_log, "rb") as fh:
            end = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, end - tail))
            lines = fh.read().split(b"\n")
    except OSError:
        return None
    for raw in reversed(lines):
        try:
            return field(json.loads(raw))
        except (ValueError, KeyError, TypeError):
            continue  # torn last line, or not a record
    return None


def last_record(result_log: str, tail: int = 256 * 1024) -> tuple[str, float] | None:
    """(source, captured_at) of the newest parseable record in a result log (JSON lines), or None."""
    return _newest(result_log, lambda r: (str(r["source"]), float(r["captured_at"])), tail)


def newest_record_time(result_log: str, tail: int = 256 * 1024) -> float | None:
    """`time` (when it was written) of the newest parseable record in a result log, or None."""
    return _newest(result_log, lambda r: float(r["time"]), tail)


def default_journal_path(state_dir: str, folder: str) -> Path:
    """<state_dir>/folder-<hash of the folder path>.journal: one journal per watched folder."""
    digest = hashlib.sha256(os.fsencode(os.path.abspath(folder))).hexdigest()[:16]
    return Path(state_dir) / f"folder-{digest}.journal"


@SOURCES.register(FolderSourceConfig)
class FolderSource(FrameSource):
    def __init__(
        self,
        cfg: FolderSourceConfig,
        start_frame_id: int = 0,
        *,
        state_dir: str | None = None,
        result_logs: list[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        """`state_dir`: where the journal lives by default. `result_logs`: the station's result logs; at start the
        newest record tells whether the part in flight at a crash was recorded (then it is not inspected again).
        `sleep` is for tests with a fake `clock`: when given, the source never blocks on inotify but sleeps
        with it and then reads pending events without waiting."""
        cfg.validate()
        self.cfg = cfg
        self.name = escape_name(cfg.name or f"folder:{cfg.path}")
        self.skipped = 0                        # files that could not be read or resolve outside the folder
        self.stale = 0                          # watch + trigger: files written before the trigger, left out
        self._stale_files: set[tuple[str, int]] = set()  # (name, inode) left out at the last trigger: still out
                                                         # while written on after it
        self._seen: dict[str, float] = {}       # queued names -> when first seen (clock): seen before a trigger = old
        self._hold_from_ns: int | None = None   # before_trigger: files appearing from then on wait for the next trigger
        self._trigger_open = False              # a trigger was notified and no file handed over for it yet
        self._cutoff_ns: int | None = None      # after_trigger: the last trigger (wall ns); files born before it are not its
        self._next_id = start_frame_id
        self._extensions = {"." + _normalise_extension(e) for e in cfg.extensions}
        self._clock = clock
        self._sleep = sleep
        self._root: Path | None = None
        self._queue: deque[Path] = deque()
        self._replay_done = False
        self._frames_this_pass = 0
        # watch mode state
        journal_path = Path(cfg.journal) if cfg.journal else (
            default_journal_path(state_dir, cfg.path) if state_dir and cfg.mode == "watch" else None)
        self._journal = Journal(journal_path)
        self._result_logs = list(result_logs or [])
        self._started = False                          # the journal is loaded and compacted once per process
        self._known: dict[str, int] = {}               # names seen in the folder -> inode, so listings stat only news
        self._candidates: dict[str, tuple[_Signature | None, float]] = {}  # name -> (last signature, first seen)
        self._in_flight: tuple[str, int, int] | None = None  # handed over, acknowledged at the next read/close
        self._watch: InotifyWatch | None = None
        self._dir_mtime: int | None = None
        self._last_check: float | None = None
        self._last_rescan = float("-inf")
        self._rejected: set[str] = set()               # resolve outside the folder; counted once
        self._not_files: set[str] = set()              # FIFOs, sockets, devices under image names; logged once
        self._subfolders: set[str] = set()             # sub-folders seen (their images are not read); logged once
        self._handed: dict[str, tuple[int, float]] = {}  # name -> (inode, clock) of its last hand-over
        self._rewritten: set[str] = set()                # handed over again in place (same inode) since last read
        # signature -> (name, sample digest) of recent hand-overs (_handed_as)
        self._handed_files: dict[_Signature, tuple[str, bytes | None]] = {}
        # What the watch cost, for tests and diagnostics.
        self.listings = 0
        self.stats = 0

    @property
    def next_frame_id(self) -> int:
        return self._next_id

    @property
    def acknowledges_reads(self) -> bool:
        """Watch mode: a read journals the file handed over before it as done (capture_queue.wrap_source)."""
        return self.cfg.mode == "watch"

    @property
    def watch_method(self) -> str | None:
        """'inotify' or 'poll' while watching, None otherwise."""
        if self._root is None or self.cfg.mode != "watch":
            return None
        return "inotify" if self._watch is not None else "poll"

    # -- FrameSource -----------------------------------------------------------------------------------------

    def open(self) -> None:
        self.close()
        root = Path(self.cfg.path)
        try:
            resolved = root.resolve(strict=True)
        except OSError as exc:
            raise SourceError(f"folder source {escape_name(self.cfg.path)}: cannot open folder: {exc}") from exc
        if not resolved.is_dir():
            raise SourceError(f"folder source {escape_name(self.cfg.path)}: not a folder")
        self._root = resolved
        st = resolved.stat()
        self._root_id = (st.st_dev, st.st_ino)   # probe(): the folder opened, not another one in its place
        self._replay_done = False
        self._frames_this_pass = 0
        self._rejected.clear()
        if self.cfg.mode == "replay":
            self._queue.extend(self._list_files())
            if not self._queue:
                log.warning("folder source %s: no %s files to replay", escape_name(self.cfg.path),
                            "/".join(sorted(self._extensions)))
            return
        self._open_watch()

    def probe(self) -> None:
        """Watch mode: the folder is still there and is the one opened (an unmounted share leaves its empty mount
        point, another inode). A folder removed while a triggered line waited had left READY up until the next
        trigger (probe 63)."""
        if self.cfg.mode != "watch" or self._root is None:
            return
        try:
            st = os.stat(self._root)
        except OSError as exc:
            raise SourceError(f"folder source {escape_name(self.cfg.path)}: the folder is gone: {exc.strerror or exc}") from exc
        if (st.st_dev, st.st_ino) != self._root_id:
            raise SourceError(f"folder source {escape_name(self.cfg.path)}: the folder was replaced (unmounted, or "
                              "removed and made again) while the line waited")

    def read(self, timeout: float) -> Frame | None:
        self._acknowledge()
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
            if self.cfg.mode == "replay":
                self._pause(remaining)
            else:
                self._wait_watch(remaining)

    @property
    def exhausted(self) -> bool:
        return self.cfg.mode == "replay" and self._replay_done and not self._queue

    def notify_trigger(self, at_wall: float | None = None, at: float | None = None) -> None:
        """Watch mode on a triggered line: the trigger fired at `at_wall` (time.time()) / `at` (this source's clock,
        time.monotonic(); both default to now). Which files not yet inspected may be this part's image depends on
        `image_arrives` (see the config); the others are left out: journalled as handled, counted in `stale`,
        logged, never another part's verdict.

        A file is from before the trigger when this source saw it before the trigger (while still being written,
        say), else by when it appeared (_appeared_ns: its birth time, else its ctime), which the file system sets
        (a writer cannot set it; copies that keep old timestamps do not fool it). A file dated more than
        FUTURE_MTIME_S ahead of this clock (a file server whose clock runs fast) is left out with an error. A file
        left out stays out while it is still being written after the trigger (same name and inode)."""
        if self.cfg.mode != "watch" or self._root is None:
            return
        self._acknowledge()
        cutoff_ns = int((time.time() if at_wall is None else at_wall) * 1e9)
        cutoff = self._clock() if at is None else at
        future_ns = time.time_ns() + int(FUTURE_MTIME_S * 1e9)
        seen = {**self._seen, **{name: first for name, (_, first) in self._candidates.items()}}
        pending = set(seen)
        if self._watch is not None:
            names, overflowed = self._watch.events()   # what arrived since the last look: no listing needed
            pending |= {n for n in names if self._wanted(n)}
            if overflowed:
                self._rescan()
                pending |= set(self._candidates)
        else:
            entries = self._list_entries()
            pending |= {name for name, inode in entries.items() if self._known.get(name) != inode}
            self._known = entries
        self._queue.clear()
        self._seen.clear()
        self._stale_files = set()
        self._trigger_open = True
        self._cutoff_ns = cutoff_ns if self.cfg.image_arrives == "after_trigger" else None
        self._hold_from_ns = cutoff_ns if self.cfg.image_arrives == "before_trigger" else None
        now = self._clock()
        before, ahead, keep = [], [], {}
        for name in sorted(pending):
            sig = self._signature(name)
            if sig is None or (name, sig[0], sig[1]) in self._journal.done:
                continue
            appeared = self._appeared_ns(name)
            if appeared is None:
                continue
            if appeared > future_ns:
                ahead.append((appeared, name, sig))
            elif appeared < cutoff_ns or seen.get(name, cutoff) < cutoff:
                before.append((appeared, name, sig))
            else:
                # Appeared since the trigger: after_trigger, this part's image (checked as usual); before_trigger,
                # this part's within the grace, else held for the next one (_hold_from_ns).
                keep[name] = (None, now)
        if self.cfg.image_arrives == "before_trigger":
            newest = max(before) if before else None
            if newest is not None and cutoff_ns - newest[0] <= self.cfg.image_max_age_s * 1e9:
                before.remove(newest)              # the camera PC wrote it, then triggered: this part's
                keep[newest[1]] = (None, now)
            else:
                # Nothing written before: a trigger that overtook its file (another network path) gets the file
                # that lands within the grace; later ones wait for the next trigger.
                self._hold_from_ns = cutoff_ns + int(BEFORE_TRIGGER_GRACE_S * 1e9)
        self._candidates = keep
        for _, name, sig in before + ahead:
            self._journal.add((name, sig[0], sig[1]))
            self._stale_files.add((name, sig[2]))
        where = escape_name(self.cfg.path)
        if before:
            self.stale += len(before)
            appeared, name, _ = max(before)
            hint = (f"not the newest within image_max_age_s {self.cfg.image_max_age_s:g} s of the trigger"
                    if self.cfg.image_arrives == "before_trigger" else
                    "an earlier part's late image is never this part's; if the camera PC writes the image before it "
                    "triggers, set source.image_arrives: before_trigger")
            log.warning("folder source %s: %d file(s) from before the trigger left out (newest: %s, appeared "
                        "%.2f s before it): %s", where, len(before), escape_name(name),
                        max(0, cutoff_ns - appeared) / 1e9, hint)
        if ahead:
            self.stale += len(ahead)
            appeared, name, _ = ahead[0]
            log.error("folder source %s: %d file(s) dated in the future left out (first: %s, %.1f s ahead of this "
                      "clock): the file server's clock runs ahead, so its files cannot be told from older ones; "
                      "sync the clocks (NTP)", where, len(ahead), escape_name(name), (appeared - time.time_ns()) / 1e9)

    def _appeared_ns(self, name: str) -> int | None:
        """When the file appeared: its birth time where the file system keeps one (statx: ext4, xfs, btrfs,
        tmpfs), so a file created before the trigger and still written after it is still from before; else its
        ctime (last change). Both are set by the file system, never by the writer."""
        path = self._root / name
        born = _birth_time_ns(path)
        if born is not None:
            return born
        try:
            return os.stat(path).st_ctime_ns
        except OSError:
            return None

    def close(self) -> None:
        try:
            self._acknowledge()
        finally:
            self._root = None
            self._queue.clear()
            self._candidates.clear()
            if self._watch is not None:
                self._watch.close()
                self._watch = None

    # -- watch mode ------------------------------------------------------------------------------------------

    def _open_watch(self) -> None:
        assert self._root is not None
        if self.cfg.watch_method in ("auto", "inotify"):
            try:
                self._watch = InotifyWatch(self._root)
            except OSError as exc:
                if self.cfg.watch_method == "inotify":
                    raise SourceError(f"folder source {escape_name(self.cfg.path)}: cannot watch with inotify: {exc}") from exc
                log.info("folder source %s: inotify unavailable (%s); polling every %g s",
                         escape_name(self.cfg.path), exc, self.cfg.poll_interval_s)
        # The watch is set up before listing, so nothing written in between is missed.
        entries = self._list_entries()
        first_start = not self._started
        baseline = False
        if first_start:
            self._journal.load()
            if self._journal.path is None:
                log.warning("folder source %s: no state_dir or journal configured: files consumed are remembered "
                            "until the daemon stops, and parts written while it is down are not inspected",
                            escape_name(self.cfg.path))
            # Files there before the very first start are not parts (unless process_existing): journal them.
            baseline = not self.cfg.process_existing and not self._journal.existed
        # No journal, yet the result log holds parts: not a first start but a lost journal (state_dir deleted or
        # another one). Files written after the newest record arrived while the daemon was down: parts, inspected
        # (probe 67: such a file was journalled as "there before the first start", no record, no answer).
        recorded_until = self._recorded_until() if baseline else None
        self._known = {}
        for name, inode in entries.items():
            self._known[name] = inode
            if baseline and recorded_until is not None:
                sig = self._signature(name)
                if sig is not None and sig[1] / 1e9 > recorded_until:
                    log.warning("folder source %s: no journal, but %s was written after the result log's newest "
                                "record: inspected as a part that arrived while the daemon was down",
                                escape_name(self.cfg.path), escape_name(name))
                    self._candidates.setdefault(name, (None, self._clock()))
                elif sig is not None:
                    self._journal.done.add((name, sig[0], sig[1]))
            elif baseline:
                sig = self._signature(name)
                if sig is not None:
                    self._journal.done.add((name, sig[0], sig[1]))
            else:
                self._candidates.setdefault(name, (None, self._clock()))
        if first_start:
            self._adopt_recorded(entries)
            self._journal.compact(set(entries))
            self._started = True
        self._dir_mtime = self._folder_mtime()
        self._last_rescan = self._clock()
        self._last_check = None

    def _recorded_until(self) -> float | None:
        """The wall time of the newest record in the station's result logs (None: no record, a first start)."""
        newest = None
        for result_log in self._result_logs:
            at = newest_record_time(result_log)
            if at is not None and (newest is None or at > newest):
                newest = at
        return newest

    def _adopt_recorded(self, entries: dict[str, int]) -> None:
        """A crash between writing a part's record and acknowledging it leaves that part (only the newest record
        can be in this state) unacknowledged: find it by the result log's newest record and acknowledge it."""
        assert self._root is not None
        for result_log in self._result_logs:
            newest = last_record(result_log)
            if newest is None:
                continue
            source, captured_at = newest
            for name in entries:
                if escape_name(str(self._root / name)) != source:
                    continue
                sig = self._signature(name)
                # The same version: not rewritten after it was read (mtime not after the capture, 1 s slack).
                if sig is not None and sig[1] / 1e9 <= captured_at + 1.0 and (name, sig[0], sig[1]) not in self._journal.done:
                    self._journal.done.add((name, sig[0], sig[1]))
                    log.info("folder source %s: %s was recorded before the restart; not inspected again",
                             escape_name(self.cfg.path), escape_name(name))
                    self._candidates.pop(name, None)

    def _wait_watch(self, remaining: float) -> None:
        """Wait for events (inotify) or the next poll, at most `remaining` seconds; collect candidates."""
        interval = self.cfg.poll_interval_s
        until_check = 0.0 if self._last_check is None else self._last_check + interval - self._clock()
        if self._watch is not None and not self._candidates and self._sleep is None:
            wait = remaining  # nothing being written: sleep until an event, however long
        else:
            wait = min(remaining, max(0.0, until_check))
        if self._watch is not None:
            if self._sleep is None:
                self._watch.wait(wait)
            else:
                self._sleep(wait)
            names, overflowed = self._watch.events()
            if overflowed:
                log.warning("folder source %s: inotify queue overflowed; listing the folder", escape_name(self.cfg.path))
                self._rescan()
            now = self._clock()
            for name in names:
                if self._wanted(name):
                    self._candidates.setdefault(name, (None, now))
                else:
                    self._note_subfolder(name, lambda: (self._root / name).is_dir())
        else:
            self._pause(wait)
            self._poll_folder()

    def _pause(self, seconds: float) -> None:
        (self._sleep or time.sleep)(max(0.0, seconds))

    def _poll_folder(self) -> None:
        """Poll method: list the folder when its mtime changed or the rescan interval passed."""
        now = self._clock()
        if self._last_check is not None and now - self._last_check < self.cfg.poll_interval_s - 1e-6:
            return
        mtime = self._folder_mtime()
        if mtime != self._dir_mtime or now - self._last_rescan >= self.cfg.rescan_interval_s:
            self._dir_mtime = mtime
            self._rescan()

    def _rescan(self) -> None:
        entries = self._list_entries()
        now = self._clock()
        self._last_rescan = now
        for name, inode in entries.items():
            if self._known.get(name) != inode:  # new, or replaced by a rename into place
                self._candidates.setdefault(name, (None, now))
        self._known = entries

    def _check_candidates(self) -> None:
        """Every poll_interval_s: hand over candidates that are complete and unchanged since the last check."""
        now = self._clock()
        if self._last_check is not None and now - self._last_check < self.cfg.poll_interval_s - 1e-6:
            return
        self._last_check = now
        ready: list[tuple[int, str]] = []
        for name, (previous, first_seen) in list(self._candidates.items()):
            sig = self._signature(name)
            if sig is None:
                del self._candidates[name]  # gone, not a regular file, or outside the folder
                continue
            if (name, sig[0], sig[1]) in self._journal.done:
                del self._candidates[name]
                continue
            if (name, sig[2]) in self._stale_files:
                # Left out at the trigger and written on since (no temp file + rename): still that earlier file (a
                # camera that rewrites one name in place for each part loses the next part too: FAULT, logged).
                del self._candidates[name]
                self._journal.add((name, sig[0], sig[1]))   # counted once, when it was left out
                log.warning("folder source %s: %s, left out at the trigger, was written on after it: still left out",
                            escape_name(self.cfg.path), escape_name(name))
                continue
            if self._hold_from_ns is not None and (self._appeared_ns(name) or 0) >= self._hold_from_ns:
                continue   # before_trigger: written after this part's trigger, so the next part's image
            path = self._root / name
            # An empty file may still be being written; one that stays empty past the timeout is a part with no
            # image (FAULT "empty file"), never a candidate forever.
            stable = previous == sig and (sig[0] > 0 or now - first_seen >= self.cfg.incomplete_timeout_s)
            if stable and (looks_complete(path, sig[0]) or now - first_seen >= self.cfg.incomplete_timeout_s):
                if not looks_complete(path, sig[0]):
                    log.warning("folder source %s: %s still incomplete after %g s; handing it over to be faulted",
                                escape_name(self.cfg.path), escape_name(name), self.cfg.incomplete_timeout_s)
                del self._candidates[name]
                if self._born_before_trigger(name, sig) or self._handed_as(name, sig):
                    continue
                ready.append((sig[1], name))
                self._seen[name] = first_seen
                self._note_rewrite(name, sig, now)
            else:
                self._candidates[name] = (sig, first_seen)
        # Oldest first, so frames follow the order the camera PC wrote them in.
        self._queue.extend(self._root / name for _, name in sorted(ready))

    def _born_before_trigger(self, name: str, sig: _Signature) -> bool:
        """after_trigger: a file that arrived after the trigger (renamed or linked in) but came into being before
        it is an earlier image, not this part's: left out (journalled, counted, logged), as notify_trigger leaves
        out the files already there. A late image written under a temporary name before the trigger and renamed in
        after it, or a link to an earlier part's image, had been inspected as this part (probe 62: OK). A file
        written again in place (same name and inode as one handed over) keeps its first birth time and is dated by
        its last write instead."""
        if self._cutoff_ns is None:
            return False
        handed = self._handed.get(name)
        if handed is not None and handed[0] == sig[2]:
            born = sig[1]   # rewritten in place: its mtime
        else:
            born = self._appeared_ns(name)
        if born is None or born >= self._cutoff_ns - int(BORN_BEFORE_SLACK_S * 1e9):
            return False
        self._journal.add((name, sig[0], sig[1]))
        self._stale_files.add((name, sig[2]))
        self.stale += 1
        log.warning("folder source %s: %s arrived after the trigger but came into being %.2f s before it (renamed "
                    "or linked in): an earlier image, never this part's; left out", escape_name(self.cfg.path),
                    escape_name(name), (self._cutoff_ns - born) / 1e9)
        return True

    def _handed_as(self, name: str, sig: _Signature) -> bool:
        """The same file (inode, size and mtime) already handed over under another name, then renamed or linked to
        this one (a camera PC writing under a temporary name with an image extension): the same image, not a new
        part; left out (journalled, counted, logged). Else noted. Probe 112: cam_0001_writing.png, renamed to
        cam_0001.png after it was inspected, was inspected again: one image, two NG records, nothing logged."""
        seen, digest = self._handed_files.get(sig), self._sample_digest(name)
        # The content too: a deleted file's inode is reused, and copies that keep the camera's timestamps (FAT: 2 s)
        # of fixed-size frames (BMP, raw) can match in size and mtime: a new part then, not the same image.
        if seen is not None and seen[0] != name and digest is not None and digest == seen[1]:
            earlier = seen[0]
            self._journal.add((name, sig[0], sig[1]))
            self.skipped += 1
            log.warning("folder source %s: %s is %s, already inspected under that name (renamed or linked after it "
                        "was read): the same image, not a new part; left out. Write images under a temporary name "
                        "the folder source ignores (name.png.tmp, .name.png) and rename them when complete",
                        escape_name(self.cfg.path), escape_name(name), escape_name(earlier))
            return True
        self._handed_files[sig] = (name, digest)
        if len(self._handed_files) > 4096:   # bounded: the oldest go first
            del self._handed_files[next(iter(self._handed_files))]
        return False

    def _sample_digest(self, name: str) -> bytes | None:
        """A digest of the file's first and last 64 KiB (`_handed_as`): what tells two frames of one size and time
        apart; None when it cannot be read (never taken as the same image)."""
        try:
            fd = os.open(self._root / name, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except OSError:
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            h = hashlib.blake2b(os.pread(fd, 1 << 16, 0), digest_size=16)
            size = os.fstat(fd).st_size
            h.update(os.pread(fd, 1 << 16, max(0, size - (1 << 16))))
            return h.digest()
        except OSError:
            return None
        finally:
            os.close(fd)

    def _note_rewrite(self, name: str, sig: _Signature, now: float) -> None:
        """Warn when the same file (name and inode) is handed over again soon after: a new part to the line, but
        more likely a camera that fills a file of its final size slowly (preallocated), read before it was done,
        which gives one part two verdicts. The warning says how to write images so that cannot happen."""
        last = self._handed.get(name)
        if last is not None and last[0] == sig[2]:
            self._rewritten.add(name)   # written again in place: dated by its mtime, not its birth (_arrived_wall)
        else:
            self._rewritten.discard(name)
        if last is not None and last[0] == sig[2] and now - last[1] < REWRITE_WARN_S:
            log.warning("folder source %s: %s was written again %.1f s after it was handed over (same file): inspected "
                        "again as a new part; if the camera writes slowly into a file of its final size, the first "
                        "read was of an unfinished image: write each image to a temporary name and rename it into "
                        "place", escape_name(self.cfg.path), escape_name(name), now - last[1])
        self._handed[name] = (sig[2], now)
        if len(self._handed) > 4096:   # bounded: only recent hand-overs matter
            for key in [k for k, (_, t) in self._handed.items() if now - t >= REWRITE_WARN_S]:
                del self._handed[key]
                self._rewritten.discard(key)

    def _signature(self, name: str) -> _Signature | None:
        assert self._root is not None
        path = self._root / name
        self.stats += 1
        try:
            st = os.stat(path)  # follows symlinks: the signature is the target's
            is_link = os.path.islink(path)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode):
            if name not in self._not_files and not stat.S_ISDIR(st.st_mode):
                # A FIFO, socket or device under an image name is no part, but not a silent skip either.
                self._not_files.add(name)
                self.skipped += 1
                log.warning("folder source %s: %s is not a regular file (%s): left out, no part inspected",
                            escape_name(self.cfg.path), escape_name(name), _file_kind(st.st_mode))
            return None
        if is_link and not self._inside(path):
            return None
        return st.st_size, st.st_mtime_ns, st.st_ino

    def _acknowledge(self) -> None:
        """The daemon came back for more (or closes): the frame handed over last has its result published."""
        if self._in_flight is not None:
            key, self._in_flight = self._in_flight, None
            self._journal.add(key)
            if self._journal.outgrown():
                self._compact_journal()

    def _compact_journal(self) -> None:
        """Drop the journal's entries of files no longer in the folder (deleted or moved away after inspection), as
        a restart does. Only while the folder is the one opened: an unmounted share's empty mount point would
        drop every entry and have its files inspected again when it returns."""
        assert self._root is not None
        try:
            st = os.stat(self._root)
        except OSError:
            return
        if (st.st_dev, st.st_ino) != self._root_id:
            return
        self._journal.compact(set(self._list_entries()))

    def _folder_mtime(self) -> int | None:
        assert self._root is not None
        try:
            return os.stat(self._root).st_mtime_ns
        except OSError as exc:
            raise SourceError(f"folder source {escape_name(self.cfg.path)}: folder unavailable: {exc}") from exc

    # -- shared ----------------------------------------------------------------------------------------------

    def _wanted(self, name: str) -> bool:
        return not is_temporary_name(name) and os.path.splitext(name)[1].lower() in self._extensions

    def _note_subfolder(self, name: str, is_dir: Callable[[], bool]) -> None:
        """Only images directly in the folder are parts: a camera PC that files them in dated sub-folders had every
        part ignored without a word (probe 112). Each sub-folder is named once."""
        if name not in self._subfolders and not is_temporary_name(name) and is_dir():
            self._subfolders.add(name)
            log.warning("folder source %s: %s is a sub-folder: its images are not read (only images directly in the "
                        "folder are parts)", escape_name(self.cfg.path), escape_name(name))

    def _list_entries(self) -> dict[str, int]:
        """Wanted names in the folder -> inode (from the directory listing itself: no stat per file)."""
        assert self._root is not None
        self.listings += 1
        try:
            with os.scandir(self._root) as it:
                entries = {}
                for e in it:
                    if self._wanted(e.name):
                        entries[e.name] = e.inode()
                    else:
                        self._note_subfolder(e.name, e.is_dir)
                return entries
        except OSError as exc:
            raise SourceError(f"folder source {escape_name(self.cfg.path)}: cannot list folder: {exc}") from exc

    def _next_frame(self) -> Frame | None:
        while True:
            if not self._queue:
                if self.cfg.mode == "replay":
                    if not self._refill_replay():
                        return None
                else:
                    self._check_candidates()
                    if not self._queue:
                        return None
                    if self._trigger_open:
                        self._trigger_open = False
                        ambiguous = self._ambiguous_for_trigger()
                        if ambiguous is not None:
                            return ambiguous
            path = self._queue.popleft()
            first_seen = self._seen.pop(path.name, None)
            frame = self._read_file(path)
            if frame is not None:
                if self.cfg.mode == "watch":
                    frame.arrived_at = self._arrived_wall(path.name, first_seen)
                return frame

    def _ambiguous_for_trigger(self) -> Frame | None:
        """The first hand-over after a trigger: when more than one image is there for it (ready, or arrived and
        still being checked; not those held for the next trigger), which one is this part's cannot be told: a
        FAULT naming them, instead of the oldest one's verdict. An earlier part's late image that lands after the
        next trigger beside that part's own image had been inspected as that part (probe 62: a missing hole passed
        OK with the late good image's score). The files are left out at the next trigger (from before it)."""
        names = [p.name for p in self._queue]
        for name in self._candidates:
            if name in names:
                continue
            if self._hold_from_ns is not None and (self._appeared_ns(name) or 0) >= self._hold_from_ns:
                continue   # before_trigger: the next part's image
            names.append(name)
        if len(names) < 2:
            return None
        shown = ", ".join(escape_name(n) for n in names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        reason = (f"{len(names)} images arrived for one trigger ({shown}): which one is this part's cannot be told "
                  "(an earlier part's late image beside this part's own?)")
        log.warning("folder source %s: %s", escape_name(self.cfg.path), reason)
        frame = Frame(frame_id=self._next_id, source=escape_name(str(self._root / names[0])), encoded=None,
                      unreadable=reason)
        self._next_id += 1
        self._frames_this_pass += 1
        return frame

    def _arrived_wall(self, name: str, first_seen: float | None) -> float | None:
        """When the file arrived (wall clock): the earlier of when this source first saw it and when it appeared
        (birth time, else ctime). A recipe switch faults files that arrived before it ended (Recipes.stale)."""
        times = []
        if first_seen is not None:   # this source's clock -> wall clock
            times.append(time.time() - max(0.0, self._clock() - first_seen))
        if name in self._rewritten:
            self._rewritten.discard(name)
            # Written again in place: the inode keeps its first birth time, so this version is dated by its last
            # write (mtime) instead (else every part of a camera that rewrites one file would be FAULT after the
            # first switch). When that write began is not known: write images to new names where switches happen.
            try:
                times.append(os.stat(self._root / name).st_mtime_ns / 1e9)
            except OSError:
                pass
        else:
            appeared = self._appeared_ns(name)
            if appeared is not None:
                times.append(appeared / 1e9)
        return min(times) if times else None

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
            log.warning("folder source %s: no readable files left to loop over", escape_name(self.cfg.path))
        self._replay_done = True
        return False

    def _list_files(self) -> list[Path]:
        """Replay: regular files with a wanted extension inside the folder, sorted by name."""
        assert self._root is not None
        files = []
        for name in sorted(self._list_entries()):
            path = self._root / name
            try:
                if not stat.S_ISREG(os.stat(path).st_mode):
                    continue
            except OSError:
                continue  # vanished or a dangling link: nothing to inspect
            if os.path.islink(path) and not self._inside(path):
                continue
            files.append(path)
        return files

    def _inside(self, path: Path) -> bool:
        """True when `path` (after resolving symlinks) lies inside the folder; counts and logs the ones that do not."""
        assert self._root is not None
        try:
            resolved = path.resolve(strict=True)
        except OSError:
            return True  # vanished since the scan: the read reports it
        if resolved.is_relative_to(self._root):
            return True
        if path.name not in self._rejected:
            # Once per file, not on every poll or replay pass.
            self._rejected.add(path.name)
            self.skipped += 1
            log.warning("folder source %s: skipping %s: it resolves to %s, outside the folder",
                        escape_name(self.cfg.path), escape_name(path.name), escape_name(str(resolved)))
        return False

    def _read_file(self, path: Path) -> Frame | None:
        # Check again right before reading: the link may have been swapped since the scan.
        try:
            resolved = path.resolve(strict=True)
        except OSError as exc:   # gone since the scan (deleted, renamed): no part to answer for
            self.skipped += 1
            log.warning("folder source %s: skipping %s: %s", escape_name(self.cfg.path), escape_name(path.name), exc)
            return None
        unreadable = None
        data = b""
        st = None
        try:
            if not resolved.is_relative_to(self._root):
                raise PermissionError(f"resolves to {escape_name(str(resolved))}, outside the folder")
            with open(resolved, "rb", opener=_open_nonblocking) as fh:
                st = os.fstat(fh.fileno())
                if not stat.S_ISREG(st.st_mode):
                    # Put in place of the file after the scan: never read (a FIFO would block, a device never end);
                    # the part it stands for is answered FAULT like any unreadable one.
                    unreadable = f"is not a regular file ({_file_kind(st.st_mode)})"
                    log.warning("folder source %s: %s %s", escape_name(self.cfg.path), escape_name(path.name),
                                unreadable)
                elif st.st_size > MAX_FILE_BYTES:   # refused before reading: a multi-GB file would stall the loop
                    unreadable = (f"file of {st.st_size} bytes is over the {MAX_FILE_BYTES} byte limit of a frame "
                                  f"({MAX_PIXELS} pixels at {DEFAULT_LIMITS.max_bytes_per_pixel:g} bytes each)")
                else:
                    data = fh.read()
        except OSError as exc:
            # A part the camera PC wrote and the station cannot read (permissions, I/O error, no file descriptors
            # left) is still a part: answered FAULT and recorded, never skipped in silence.
            unreadable = f"cannot be read: {exc.strerror or exc}"
            log.warning("folder source %s: %s %s", escape_name(self.cfg.path), escape_name(path.name), unreadable)
        if self.cfg.mode == "watch":
            if st is None:   # not opened: its signature from the path, so the FAULT is acknowledged like a read
                try:
                    st = os.stat(resolved)
                except OSError:
                    pass
            if st is not None:
                # The version read is the one acknowledged: a later rewrite is a new part.
                self._in_flight = (path.name, st.st_size, st.st_mtime_ns)
        # The name travels into logs, records and error messages: escaped once, here.
        frame = Frame(frame_id=self._next_id, source=escape_name(str(path)),
                      encoded=None if unreadable is not None else data, unreadable=unreadable)
        self._next_id += 1
        self._frames_this_pass += 1
        return frame
