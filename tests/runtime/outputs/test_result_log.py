"""ResultLog: durable append, size rotation, torn-line recovery and disk-full behaviour on a real file system."""
from __future__ import annotations

import errno
import json
import math
import os

import pytest

from edge_runtime.outputs.base import OutputError
from edge_runtime.outputs.result_log import ResultLog, ResultLogConfig, encode_record, last_frame_id
from edge_runtime.records import InspectionResult, Verdict


def make_result(frame_id: int, verdict: Verdict = Verdict.OK, score: float | None = 1.25) -> InspectionResult:
    return InspectionResult(
        frame_id=frame_id, source=f"cam0/{frame_id}.png", verdict=verdict, score=score,
        normalized_score=None if score is None else 0.3, threshold=2.0, timings_ms={"total": 12.3456},
        bundle_id="bundle-1", error="decode failed" if verdict is Verdict.FAULT else None,
    )


def read_records(path) -> list[dict]:
    with open(path, "rb") as f:
        return [json.loads(line) for line in f.read().splitlines()]


def test_appends_one_json_record_per_result_and_fsyncs_each(tmp_path, monkeypatch):
    path = tmp_path / "logs" / "results.jsonl"   # parent folder is created on start
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    log = ResultLog(ResultLogConfig(path=str(path)))
    log.start()
    synced.clear()
    log.publish(make_result(1))
    assert len(synced) == 1, "a record must be fsync'd before publish() returns"
    log.publish(make_result(2, Verdict.NG, score=3.0))
    log.publish(make_result(3, Verdict.FAULT, score=None))
    log.close()
    records = read_records(path)
    assert [r["frame_id"] for r in records] == [1, 2, 3]
    assert [r["verdict"] for r in records] == ["OK", "NG", "FAULT"]
    assert records[2]["score"] is None and records[2]["error"] == "decode failed"
    assert records[0]["latency_ms"] == {"total": 12.346}


def test_fsync_never_does_not_sync_records(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd))
    log = ResultLog(ResultLogConfig(path=str(tmp_path / "r.jsonl"), fsync="never"))
    log.start()
    log.publish(make_result(1))
    log.close()
    assert synced == []
    assert [r["frame_id"] for r in read_records(tmp_path / "r.jsonl")] == [1]


def test_reopening_appends_and_never_truncates(tmp_path):
    path = tmp_path / "r.jsonl"
    for frame_id in (1, 2):
        log = ResultLog(ResultLogConfig(path=str(path)))
        log.start()
        log.publish(make_result(frame_id))
        log.close()
    assert [r["frame_id"] for r in read_records(path)] == [1, 2]


def test_non_finite_scores_are_logged_as_null(tmp_path):
    line = encode_record(make_result(5, Verdict.NG, score=math.nan))
    assert json.loads(line)["score"] is None
    assert line.endswith(b"\n") and line.count(b"\n") == 1


def test_rotates_by_size_keeping_n_backups(tmp_path):
    path = tmp_path / "r.jsonl"
    record_size = len(encode_record(make_result(10)))  # frame ids 10..99 all give records of this size
    log = ResultLog(ResultLogConfig(path=str(path), max_bytes=1024, backups=2))
    per_file = log.cfg.max_bytes // record_size
    log.start()
    total = per_file * 4 + 1
    for frame_id in range(10, 10 + total):
        log.publish(make_result(frame_id))
    log.close()
    current, b1, b2 = (read_records(p) for p in (path, f"{path}.1", f"{path}.2"))
    assert not os.path.exists(f"{path}.3"), "only `backups` rotated files are kept"
    for records in (b1, b2):
        assert len(records) == per_file
    assert os.path.getsize(f"{path}.1") <= log.cfg.max_bytes
    # Newest records in the live file, then .1, then .2; the oldest file was dropped.
    ids = [r["frame_id"] for r in b2 + b1 + current]
    assert ids == list(range(10 + total - len(ids), 10 + total))
    assert len(current) == 1


def test_last_frame_id_tolerates_a_torn_last_line(tmp_path):
    path = tmp_path / "r.jsonl"
    log = ResultLog(ResultLogConfig(path=str(path)))
    log.start()
    for frame_id in (7, 8, 9):
        log.publish(make_result(frame_id))
    log.close()
    with open(path, "ab") as f:          # power cut in the middle of record 10
        f.write(encode_record(make_result(10))[:25])
    assert last_frame_id(str(path)) == 9

    # A restarted log terminates the torn line, keeps every byte, and new records parse again.
    size_before = os.path.getsize(path)
    log = ResultLog(ResultLogConfig(path=str(path)))
    log.start()
    assert os.path.getsize(path) == size_before + 1
    log.publish(make_result(10))
    log.close()
    lines = path.read_bytes().splitlines()
    assert json.loads(lines[-1])["frame_id"] == 10
    assert last_frame_id(str(path)) == 10


def test_last_frame_id_skips_garbage_and_falls_back_to_backups(tmp_path):
    path = tmp_path / "r.jsonl"
    assert last_frame_id(str(path)) is None
    (tmp_path / "r.jsonl.1").write_bytes(encode_record(make_result(41)) + encode_record(make_result(42)))
    path.write_bytes(b"")                 # just rotated: the live file is empty
    assert last_frame_id(str(path)) == 42
    path.write_bytes(encode_record(make_result(43)) + b'{"frame_id": "x"}\n' + b"\x00\xffgarbage\n")
    assert last_frame_id(str(path)) == 43


def test_last_frame_id_reads_across_chunk_boundaries(tmp_path):
    path = tmp_path / "r.jsonl"
    # A valid record followed by >64 KiB of garbage lines: the reader must look further back than one chunk.
    path.write_bytes(encode_record(make_result(5)) + (b"x" * 1000 + b"\n") * 100)
    assert last_frame_id(str(path)) == 5


def test_disk_full_raises_output_error_and_recovers_without_losing_acknowledged_records(tmp_path, monkeypatch):
    path = tmp_path / "r.jsonl"
    log = ResultLog(ResultLogConfig(path=str(path)))
    log.start()
    log.publish(make_result(1))
    log.publish(make_result(2))

    real_write = os.write
    disk_full = {"on": True}

    def write_then_enospc(fd, data):
        # Like a real full disk: part of the record lands, then ENOSPC; only the log's fd is affected.
        if disk_full["on"] and fd == log._fd:
            real_write(fd, bytes(data[:10]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write_then_enospc)
    with pytest.raises(OutputError) as err:
        log.publish(make_result(3))
    assert str(path) in str(err.value) and "disk full" in str(err.value) and "frame 3" in str(err.value)
    with pytest.raises(OutputError):        # still full: keeps failing loudly, does not crash or hang
        log.publish(make_result(4))

    disk_full["on"] = False                 # space is back
    log.publish(make_result(5))
    log.close()
    records = read_records(path)            # every line parses: the torn partial records were removed
    assert [r["frame_id"] for r in records] == [1, 2, 5]
    assert last_frame_id(str(path)) == 5


def test_failed_fsync_is_not_acknowledged(tmp_path, monkeypatch):
    path = tmp_path / "r.jsonl"
    log = ResultLog(ResultLogConfig(path=str(path)))
    log.start()
    log.publish(make_result(1))
    real_fsync = os.fsync

    def failing_fsync(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OutputError, match="frame 2"):
        log.publish(make_result(2))
    monkeypatch.setattr(os, "fsync", real_fsync)
    log.publish(make_result(3))
    log.close()
    assert [r["frame_id"] for r in read_records(path)] == [1, 3]


def test_a_record_whose_fsync_failed_is_gone_before_publish_returns(tmp_path, monkeypatch):
    # The part went to the line as FAULT: a crash (or a halt and restart) before the next write must not leave
    # its OK record in the file, readable after restart as the verdict of a part the PLC was told FAULT.
    path = tmp_path / "r.jsonl"
    log = ResultLog(ResultLogConfig(path=str(path)))
    log.start()
    log.publish(make_result(1))
    real_fsync = os.fsync
    failed = []

    def fsync_fails_once(fd):
        if not failed:
            failed.append(fd)
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_fails_once)
    with pytest.raises(OutputError, match="frame 2"):
        log.publish(make_result(2))
    # No further publish, no close: what a crash right now leaves on disk.
    assert [r["frame_id"] for r in read_records(path)] == [1]
    assert last_frame_id(str(path)) == 1


def test_unwritable_location_names_the_path(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    log = ResultLog(ResultLogConfig(path=str(blocker / "r.jsonl")))
    with pytest.raises(OutputError, match=str(blocker)):
        log.start()


def test_config_validation():
    with pytest.raises(ValueError, match="max_bytes"):
        ResultLogConfig(path="x", max_bytes=10).validate()
    with pytest.raises(ValueError, match="backups"):
        ResultLogConfig(path="x", backups=-1).validate()


def test_review_record_carries_its_verdict_and_the_review_threshold(tmp_path):
    log = ResultLog(ResultLogConfig(path=str(tmp_path / "r.jsonl")))
    log.start()
    result = make_result(4, Verdict.REVIEW, score=1.9)
    result.review_threshold = 1.5
    log.publish(result)
    log.close()
    (record,) = read_records(tmp_path / "r.jsonl")
    assert record["verdict"] == "REVIEW" and record["review_threshold"] == 1.5 and record["threshold"] == 2.0


def test_external_rotation_rename_and_create_is_detected_on_the_next_write(tmp_path):
    """logrotate without copytruncate: rename the live file, create a new empty one, never tell the writer."""
    path = tmp_path / "results.jsonl"
    log = ResultLog(ResultLogConfig(path=str(path)))
    log.start()
    log.publish(make_result(1))
    os.rename(path, tmp_path / "results.jsonl.1")
    path.touch()
    log.publish(make_result(2))
    log.publish(make_result(3))
    os.rename(path, tmp_path / "results.jsonl.2")      # rotated again, this time no new file is created
    log.publish(make_result(4))
    log.close()
    assert [r["frame_id"] for r in read_records(tmp_path / "results.jsonl.1")] == [1]
    assert [r["frame_id"] for r in read_records(tmp_path / "results.jsonl.2")] == [2, 3]
    assert [r["frame_id"] for r in read_records(path)] == [4], "no record went into a renamed file"
    assert log.reopened == 2


def test_reopen_on_request_switches_to_the_new_file(tmp_path):
    path = tmp_path / "results.jsonl"
    log = ResultLog(ResultLogConfig(path=str(path)))
    log.start()
    log.publish(make_result(1))
    os.rename(path, tmp_path / "old.jsonl")
    log.reopen()                                       # SIGUSR1 from logrotate's postrotate
    assert path.exists(), "reopen creates the new file at once"
    log.publish(make_result(2))
    log.close()
    assert [r["frame_id"] for r in read_records(path)] == [2]


@pytest.mark.parametrize("kind", ["fifo", "link to /dev/null", "/dev/full"])
def test_a_path_that_is_not_a_regular_file_is_refused_at_start_and_when_swapped_in(tmp_path, kind):
    """With fsync: never nothing else fails on a FIFO or a device: every record would vanish while OK reached the
    line (probe 33). Refused when opened, naming what took the path; the records before it stay in the old file."""
    def make_bad(path):
        if kind == "fifo":
            os.mkfifo(path)
        elif kind == "link to /dev/null":
            os.symlink("/dev/null", path)
        else:
            os.symlink("/dev/full", path)
    expected = {"fifo": "a FIFO", "link to /dev/null": "a character device", "/dev/full": "a character device"}[kind]
    bad = tmp_path / "bad.jsonl"
    make_bad(bad)
    with pytest.raises(OutputError, match=rf"{bad}: cannot open: not a regular file \({expected} at its path\)"):
        ResultLog(ResultLogConfig(path=str(bad), fsync="never")).start()

    path = tmp_path / "results.jsonl"
    log = ResultLog(ResultLogConfig(path=str(path), fsync="never"))
    log.start()
    log.publish(make_result(1))
    os.rename(path, tmp_path / "results.jsonl.1")
    make_bad(path)
    with pytest.raises(OutputError, match=rf"frame 2 not logged: not a regular file \({expected}"):
        log.publish(make_result(2))
    os.unlink(path)
    log.publish(make_result(3))                       # a regular file again: records resume there
    log.close()
    assert [r["frame_id"] for r in read_records(tmp_path / "results.jsonl.1")] == [1]
    assert [r["frame_id"] for r in read_records(path)] == [3]


def test_one_file_takes_one_result_log(tmp_path):
    """Probe 60: two result logs on one file (two lines whose paths the station file spelled two ways) each kept
    their own end of the acknowledged records, and one's recovery from a failed write cut off the other's OK
    records. The second writer is refused (its parts are FAULT), and the file is free again once the first closes."""
    path = tmp_path / "r.jsonl"
    first = ResultLog(ResultLogConfig(path=str(path)))
    first.start()
    first.publish(make_result(1))
    second = ResultLog(ResultLogConfig(path=str(tmp_path / "." / "r.jsonl")))
    with pytest.raises(OutputError, match="another result log"):
        second.start()
    with pytest.raises(OutputError, match="another result log"):
        second.publish(make_result(2))
    first.publish(make_result(3))
    first.close()
    second.publish(make_result(4))
    second.close()
    assert [r["frame_id"] for r in read_records(path)] == [1, 3, 4]
