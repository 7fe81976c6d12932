"""FrameCounter: ids are reserved durably in blocks before use, so a crash leaves a gap and never a repeat."""
from __future__ import annotations

import os

import pytest

from edge_runtime.frame_counter import FRAME_COUNTER_FILE, FrameCounter, FrameCounterError


def test_a_block_is_on_disk_before_its_first_id_is_used_and_fsyncs_are_per_block(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    counter = FrameCounter(str(tmp_path), block=10)
    counter.open()
    mark = lambda: int((tmp_path / FRAME_COUNTER_FILE).read_text())  # noqa: E731
    ids = []
    for _ in range(25):
        frame_id = counter.take()
        assert frame_id < mark(), "an id is used only once the file covers it"
        ids.append(frame_id)
    assert ids == list(range(25))
    assert len(synced) == 2 * 3, "three blocks, each: file + folder fsync; none per frame"


def test_a_crash_continues_after_the_reserved_block_a_clean_stop_without_a_gap(tmp_path):
    first = FrameCounter(str(tmp_path), block=100)
    first.open()
    used = [first.take() for _ in range(7)]
    # kill -9 here: close() never runs
    second = FrameCounter(str(tmp_path), block=100)
    second.open()
    assert second.take() == 100 and max(used) < 100
    second.close()
    third = FrameCounter(str(tmp_path), block=100)
    third.open()
    assert third.take() == 101, "a clean stop saves the exact next id"


def test_start_at_from_the_result_log_wins_when_it_is_ahead(tmp_path):
    counter = FrameCounter(str(tmp_path), start_at=5000, block=10)
    counter.open()
    assert counter.take() == 5000


def test_an_unwritable_state_dir_is_an_error_not_silent_reuse(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    counter = FrameCounter(str(blocker / "state"))
    with pytest.raises(FrameCounterError, match=r"frame counter .*file/state/next_frame_id: cannot read"):
        counter.open()
    counter = FrameCounter(str(tmp_path / "state"), block=2)
    counter.open()
    assert [counter.take(), counter.take()] == [0, 1]
    (tmp_path / "state" / FRAME_COUNTER_FILE).unlink()
    (tmp_path / "state").rmdir()
    (tmp_path / "state").write_text("")               # the state folder is gone: the next block cannot be saved
    with pytest.raises(FrameCounterError, match="cannot reserve ids"):
        counter.take()


def test_garbage_in_the_counter_file_is_an_error_naming_it(tmp_path):
    (tmp_path / FRAME_COUNTER_FILE).write_text("twelve\n")
    with pytest.raises(FrameCounterError, match=FRAME_COUNTER_FILE):
        FrameCounter(str(tmp_path)).open()
