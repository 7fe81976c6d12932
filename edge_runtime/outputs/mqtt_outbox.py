"""The MQTT output's on-disk outbox: records wait here, in order, until the broker acknowledged them (PUBACK).

Why sqlite3 (stdlib) rather than append-only segment files: the outbox needs an ordered append, a delete of
acknowledged records from the front, a drop of the oldest when full and crash recovery. With segments that is
our own framing, torn-tail repair, an acknowledgement cursor file and compaction; sqlite gives all of it with a
transaction per operation, and the sequence (an AUTOINCREMENT rowid) is never reused, even after deletes.
WAL journal: an insert (the bus worker) never waits for a reader (the sender) and vice versa.
"""
from __future__ import annotations

import os
import sqlite3
import threading
from dataclasses import dataclass


@dataclass
class OutboxCounters:
    appended: int = 0
    acknowledged: int = 0
    dropped: int = 0        # oldest records removed because the outbox was full: lost for the broker


class Outbox:
    """A bounded FIFO of byte payloads in one sqlite file; safe to use from several threads.

    append() never blocks on the network; when `max_records` are queued it drops the oldest (counted).
    peek(after, n) returns the next records in order; ack(seqs) deletes delivered ones.
    """

    def __init__(self, path: str, max_records: int, *, fsync: bool = True) -> None:
        self.path = path
        self.max_records = max_records
        self.counters = OutboxCounters()
        self._lock = threading.Lock()
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: each committed append survives a power cut, like the fsync'd result log; NORMAL survives a crash
        # of the daemon and may lose the last appends on a power cut (the result log still has them).
        self._db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
        self._db.execute("CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
                         "queued_at REAL NOT NULL, payload BLOB NOT NULL)")
        self._size = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]

    def __len__(self) -> int:
        return self._size

    def append(self, payload: bytes, queued_at: float) -> int:
        """Queue one record; returns how many of the oldest were dropped to make room (0 normally)."""
        return self.append_many([(payload, queued_at)])

    def append_many(self, records: list[tuple[bytes, float]]) -> int:
        """Queue records (payload, queued_at) in one transaction, one fsync (group commit); returns drops."""
        if not records:
            return 0
        with self._lock:
            dropped = from_queue = 0
            self._db.execute("BEGIN IMMEDIATE")
            try:
                excess = self._size + len(records) - self.max_records
                if excess > 0:
                    # Oldest first: those already queued, then (a burst larger than the outbox) the new ones.
                    from_queue = min(excess, self._size)
                    self._db.execute("DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox ORDER BY seq LIMIT ?)",
                                     (from_queue,))
                    records = records[excess - from_queue:]
                    dropped = excess
                self._db.executemany("INSERT INTO outbox (payload, queued_at) VALUES (?, ?)", records)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._size += len(records) - from_queue
            self.counters.appended += len(records)
            self.counters.dropped += dropped
            return dropped

    def peek(self, after: int, limit: int) -> list[tuple[int, float, bytes]]:
        """Up to `limit` queued records with seq > `after`, oldest first: (seq, queued_at, payload)."""
        with self._lock:
            rows = self._db.execute("SELECT seq, queued_at, payload FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
                                    (after, limit)).fetchall()
        return [(int(s), float(t), bytes(p)) for s, t, p in rows]

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

    def oldest_queued_at(self) -> float | None:
        with self._lock:
            row = self._db.execute("SELECT queued_at FROM outbox ORDER BY seq LIMIT 1").fetchone()
        return None if row is None else float(row[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
