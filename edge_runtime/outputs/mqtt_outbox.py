"""The MQTT output's on-disk outbox: records wait here, in order, until the broker acknowledged them (PUBACK).

Why sqlite3 (stdlib) rather than append-only segment files: the outbox needs an ordered append, a delete of
acknowledged records from the front, a drop of the oldest when full and crash recovery. With segments that is
our own framing, torn-tail repair, an acknowledgement cursor file and compaction; sqlite gives all of it with a
transaction per operation, and the sequence (an AUTOINCREMENT rowid) is never reused, even after deletes.
WAL journal: an insert (the bus worker) never waits for a reader (the sender) and vice versa.
Each record is tagged with its line ('' for a single-line station), so one outbox keeps the records of every line
of a station in one order (edge_runtime/outputs/mqtt_station.py).
"""
from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from dataclasses import dataclass, field


class OutboxInUse(OSError):
    """Another outbox (another daemon, or another output of this one) holds this file."""


@dataclass
class OutboxCounters:
    appended: int = 0
    acknowledged: int = 0
    dropped: int = 0        # oldest records removed because the outbox was full: lost for the broker
    dropped_by_line: dict[str, int] = field(default_factory=dict)   # the same, per line tag


class Outbox:
    """A bounded FIFO of byte payloads in one sqlite file; safe to use from several threads.

    append() never blocks on the network; when `max_records` are queued it drops the oldest (counted, per line).
    peek(after, n) returns the next records in order, with their line tag; ack(seqs) deletes delivered ones.
    """

    def __init__(self, path: str, max_records: int, *, fsync: bool = True) -> None:
        self.path = path
        self.max_records = max_records
        self.counters = OutboxCounters()
        self._lock = threading.Lock()
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        # One sender per outbox: two daemons (two station files naming one `outbox:`) would each publish the
        # other's records under its own topic prefix, a part the other station inspected announced as this
        # station's result (probe 63: a station that inspected nothing published six OK records). The lock is a
        # file beside the outbox (flock), held while it is open and released by the kernel if the daemon dies.
        self._lock_fd = _lock(path + ".lock")
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: each committed append survives a power cut, like the fsync'd result log; NORMAL survives a crash
            # of the daemon and may lose the last appends on a power cut (the result log still has them).
            self._db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
            self._db.execute("CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
                             "queued_at REAL NOT NULL, payload BLOB NOT NULL, line TEXT NOT NULL DEFAULT '')")
            columns = [row[1] for row in self._db.execute("PRAGMA table_info(outbox)")]
            if "line" not in columns:   # an outbox written before records were tagged: all of its records are untagged
                self._db.execute("ALTER TABLE outbox ADD COLUMN line TEXT NOT NULL DEFAULT ''")
            # Who queued the records: a station publishes only records queued under its own topic prefix.
            self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self._size = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        except BaseException:
            os.close(self._lock_fd)
            raise

    def __len__(self) -> int:
        return self._size

    def append(self, payload: bytes, queued_at: float, line: str = "") -> int:
        """Queue one record; returns how many of the oldest were dropped to make room (0 normally)."""
        return self.append_many([(payload, queued_at, line)])

    def append_many(self, records: list[tuple[bytes, float] | tuple[bytes, float, str]]) -> int:
        """Queue records (payload, queued_at[, line]) in one transaction, one fsync (group commit); returns drops."""
        if not records:
            return 0
        rows = [(r[0], r[1], r[2] if len(r) > 2 else "") for r in records]
        with self._lock:
            dropped = from_queue = 0
            lost: list[str] = []
            self._db.execute("BEGIN IMMEDIATE")
            try:
                excess = self._size + len(rows) - self.max_records
                if excess > 0:
                    # Oldest first: those already queued, then (a burst larger than the outbox) the new ones.
                    from_queue = min(excess, self._size)
                    lost = [row[0] for row in self._db.execute(
                        "DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox ORDER BY seq LIMIT ?) RETURNING line",
                        (from_queue,)).fetchall()]
                    lost += [r[2] for r in rows[:excess - from_queue]]
                    rows = rows[excess - from_queue:]
                    dropped = excess
                self._db.executemany("INSERT INTO outbox (payload, queued_at, line) VALUES (?, ?, ?)", rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._size += len(rows) - from_queue
            self.counters.appended += len(rows)
            self.counters.dropped += dropped
            for line in lost:
                self.counters.dropped_by_line[line] = self.counters.dropped_by_line.get(line, 0) + 1
            return dropped

    def peek(self, after: int, limit: int) -> list[tuple[int, float, bytes, str]]:
        """Up to `limit` queued records with seq > `after`, oldest first: (seq, queued_at, payload, line)."""
        with self._lock:
            rows = self._db.execute("SELECT seq, queued_at, payload, line FROM outbox WHERE seq > ? ORDER BY seq "
                                    "LIMIT ?", (after, limit)).fetchall()
        return [(int(s), float(t), bytes(p), str(ln)) for s, t, p, ln in rows]

    def ack(self, seqs: list[int]) -> int:
        """Delete delivered records (a seq already dropped is ignored); returns how many were deleted."""
        if not seqs:
            return 0
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cur = self._db.executemany("DELETE FROM outbox WHERE seq = ?", [(s,) for s in seqs])
                deleted = cur.rowcount
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._size -= deleted
            self.counters.acknowledged += deleted
            return deleted

    def claim(self, topic_prefix: str) -> str | None:
        """Record that this outbox's records are queued under `topic_prefix`. Returns the prefix its queued records
        were queued under when that is another one (nothing is changed then), else None. An outbox reopened under
        another prefix (a station file's prefix edited, a state_dir copied to another station) had published the
        old records as the new prefix's results (probe 63)."""
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = 'topic_prefix'").fetchone()
            if row is not None and row[0] != topic_prefix and self._size:
                return str(row[0])
            self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('topic_prefix', ?)", (topic_prefix,))
            return None

    def line_tags(self) -> set[str]:
        """The line tags of the queued records ('' for a single-line station's)."""
        with self._lock:
            return {str(row[0]) for row in self._db.execute("SELECT DISTINCT line FROM outbox")}

    def oldest_queued_at(self) -> float | None:
        with self._lock:
            row = self._db.execute("SELECT queued_at FROM outbox ORDER BY seq LIMIT 1").fetchone()
        return None if row is None else float(row[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
            if self._lock_fd is not None:
                os.close(self._lock_fd)   # releases the flock
                self._lock_fd = None


def _lock(lock_path: str) -> int:
    """Take the outbox's lock file (exclusive, not waiting); OutboxInUse naming the holder's pid if taken."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        finally:
            os.close(fd)
        raise OutboxInUse(f"{lock_path}: the outbox is in use by another MQTT output (pid {holder}); give each "
                          f"station its own outbox (and state_dir)") from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
