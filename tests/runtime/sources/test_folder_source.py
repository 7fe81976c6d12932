import threading
from pathlib import Path

import pytest

from edge_runtime.schema import ConfigError, convert
from edge_runtime.sources import FolderSource, FolderSourceConfig, SourceConfig, SourceError, build_source


class FakeClock:
    """Time that moves only when the source sleeps, so the watch tests do not depend on the machine's speed."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def drain(src: FolderSource, timeout: float = 0.0) -> list:
    frames = []
    while (frame := src.read(timeout)) is not None:
        frames.append(frame)
    return frames


def test_replay_reads_sorted_files_once_then_exhausted(tmp_path):
    write(tmp_path / "b.png", b"B")
    write(tmp_path / "a.jpg", b"A")
    write(tmp_path / "c.TIFF", b"C")
    write(tmp_path / "notes.txt", b"not an image")
    (tmp_path / "dir.png").mkdir()  # a folder with an image name is not a file to read
    src = FolderSource(FolderSourceConfig(path=str(tmp_path)), start_frame_id=41)
    src.open()
    assert not src.exhausted
    frames = drain(src)
    assert [f.encoded for f in frames] == [b"A", b"B", b"C"]
    assert [f.frame_id for f in frames] == [41, 42, 43]
    assert [Path(f.source).name for f in frames] == ["a.jpg", "b.png", "c.TIFF"]
    assert all(f.image is None for f in frames)
    assert src.exhausted
    assert src.read(0.5) is None


def test_replay_extension_filter(tmp_path):
    write(tmp_path / "a.png", b"A")
    write(tmp_path / "b.bmp", b"B")
    src = FolderSource(FolderSourceConfig(path=str(tmp_path), extensions=[".BMP"]))
    src.open()
    assert [f.encoded for f in drain(src)] == [b"B"]


def test_replay_loop_keeps_counting_frame_ids(tmp_path):
    write(tmp_path / "a.png", b"A")
    write(tmp_path / "b.png", b"B")
    src = FolderSource(FolderSourceConfig(path=str(tmp_path), loop=True))
    src.open()
    frames = [src.read(0) for _ in range(5)]
    assert [f.encoded for f in frames] == [b"A", b"B", b"A", b"B", b"A"]
    assert [f.frame_id for f in frames] == [0, 1, 2, 3, 4]
    assert not src.exhausted


def test_replay_loop_over_only_unreadable_files_ends_instead_of_spinning(tmp_path):
    link = tmp_path / "gone.png"
    link.symlink_to(tmp_path / "missing-target.png")  # dangling: listed by the OS, never readable
    write(tmp_path / "a.png", b"A")
    src = FolderSource(FolderSourceConfig(path=str(tmp_path), loop=True))
    src.open()
    (tmp_path / "a.png").unlink()  # listed at open(), gone when read
    assert src.read(0) is None
    assert src.exhausted
    assert src.skipped == 1


def test_unreadable_file_is_skipped_and_counted(tmp_path):
    write(tmp_path / "a.png", b"A")
    write(tmp_path / "b.png", b"B")
    write(tmp_path / "c.png", b"C")
    src = FolderSource(FolderSourceConfig(path=str(tmp_path)))
    src.open()
    (tmp_path / "b.png").unlink()  # vanished between listing and reading
    frames = drain(src)
    assert [f.encoded for f in frames] == [b"A", b"C"]
    assert [f.frame_id for f in frames] == [0, 1]  # no id is burnt on a skipped file
    assert src.skipped == 1


def test_corrupt_file_bytes_are_passed_on_for_the_decoder_to_fault(tmp_path):
    write(tmp_path / "broken.png", b"\x89PNG not really")
    src = FolderSource(FolderSourceConfig(path=str(tmp_path)))
    src.open()
    frame = src.read(0)
    assert frame.encoded == b"\x89PNG not really"
    assert src.skipped == 0


def test_symlink_escaping_the_folder_is_skipped(tmp_path):
    inside = tmp_path / "images"
    inside.mkdir()
    secret = write(tmp_path / "secret.png", b"SECRET")
    write(inside / "a.png", b"A")
    (inside / "b.png").symlink_to(secret)
    (inside / "c.png").symlink_to(inside / "a.png")  # a link that stays inside is fine
    src = FolderSource(FolderSourceConfig(path=str(inside)))
    src.open()
    frames = drain(src)
    assert [f.encoded for f in frames] == [b"A", b"A"]
    assert [Path(f.source).name for f in frames] == ["a.png", "c.png"]
    assert src.skipped == 1


def test_missing_folder_raises_source_error(tmp_path):
    src = FolderSource(FolderSourceConfig(path=str(tmp_path / "nope")))
    with pytest.raises(SourceError, match="nope"):
        src.open()


def test_watch_reads_new_file_only_after_size_is_stable(tmp_path):
    write(tmp_path / "old.png", b"OLD")  # there before the daemon started: not inspected
    clock = FakeClock()
    src = FolderSource(FolderSourceConfig(path=str(tmp_path), mode="watch", poll_interval_s=0.125),
                       start_frame_id=7, clock=clock, sleep=clock.sleep)
    src.open()
    assert src.read(0.0) is None

    partial = tmp_path / "part.png"
    write(partial, b"first half ")
    clock.sleep(0.125)
    assert src.read(0.0) is None        # first sighting
    with partial.open("ab") as f:
        f.write(b"second half")         # still being written at the next poll
    clock.sleep(0.125)
    assert src.read(0.0) is None        # size changed: not stable yet
    clock.sleep(0.0625)
    assert src.read(0.0) is None        # no poll before poll_interval_s has passed
    clock.sleep(0.0625)
    frame = src.read(0.0)               # unchanged across two polls: complete
    assert frame.encoded == b"first half second half"
    assert frame.frame_id == 7
    assert src.read(1.0) is None        # delivered once, and nothing else arrives
    assert not src.exhausted            # a watched folder never runs out


def test_watch_waits_for_empty_files_to_get_content(tmp_path):
    clock = FakeClock()
    src = FolderSource(FolderSourceConfig(path=str(tmp_path), mode="watch", poll_interval_s=0.125),
                       clock=clock, sleep=clock.sleep)
    src.open()
    (tmp_path / "new.png").touch()
    assert src.read(1.0) is None        # ten polls of a 0-byte file: the writer has only created it
    write(tmp_path / "new.png", b"DATA")
    assert src.read(1.0).encoded == b"DATA"


def test_watch_process_existing_and_rewritten_file(tmp_path):
    write(tmp_path / "old.png", b"OLD")
    clock = FakeClock()
    src = FolderSource(FolderSourceConfig(path=str(tmp_path), mode="watch", poll_interval_s=0.125, process_existing=True),
                       clock=clock, sleep=clock.sleep)
    src.open()
    assert src.read(1.0).encoded == b"OLD"
    # A camera PC that overwrites one file name per part: each new content is a new frame.
    write(tmp_path / "old.png", b"NEWER CONTENT")
    assert src.read(1.0).encoded == b"NEWER CONTENT"
    assert src.read(1.0) is None


def test_watch_skips_symlink_from_outside_once(tmp_path):
    watched = tmp_path / "watched"
    watched.mkdir()
    outside = write(tmp_path / "outside.png", b"OUTSIDE")
    clock = FakeClock()
    src = FolderSource(FolderSourceConfig(path=str(watched), mode="watch", poll_interval_s=0.125),
                       clock=clock, sleep=clock.sleep)
    src.open()
    (watched / "evil.png").symlink_to(outside)
    write(watched / "good.png", b"GOOD")
    frames = [src.read(1.0), src.read(1.0)]
    assert frames[0].encoded == b"GOOD"
    assert frames[1] is None
    assert src.skipped == 1             # counted once, not on every poll


def test_watch_picks_up_files_written_while_running(tmp_path):
    """Real threads and clock: a writer creates files in chunks while the source polls."""
    src = FolderSource(FolderSourceConfig(path=str(tmp_path), mode="watch", poll_interval_s=0.02))
    src.open()
    names = [f"img_{i:03d}.png" for i in range(5)]

    def writer() -> None:
        for i, name in enumerate(names):
            tmp = tmp_path / (name + ".part")       # not an image extension: never picked up
            tmp.write_bytes(bytes([i]) * 1000)
            tmp.rename(tmp_path / name)             # the usual atomic hand-over

    t = threading.Thread(target=writer)
    t.start()
    got = []
    for _ in range(200):
        frame = src.read(0.5)
        if frame is not None:
            got.append(frame)
        if len(got) == len(names):
            break
    t.join()
    assert sorted(Path(f.source).name for f in got) == names
    assert all(f.encoded == bytes([int(Path(f.source).stem[-3:])]) * 1000 for f in got)
    assert [f.frame_id for f in got] == list(range(len(names)))


def test_config_from_mapping_and_build_source(tmp_path):
    cfg = convert({"type": "folder", "path": str(tmp_path), "mode": "watch"}, SourceConfig, "source")
    assert isinstance(cfg, FolderSourceConfig)
    src = build_source(cfg, start_frame_id=5)
    assert isinstance(src, FolderSource) and src.next_frame_id == 5
    with pytest.raises(ConfigError, match="loop"):
        convert({"type": "folder", "path": "x", "mode": "watch", "loop": True}, SourceConfig, "source")
    with pytest.raises(ConfigError, match="'gif' is not supported"):
        convert({"type": "folder", "path": "x", "extensions": ["gif"]}, SourceConfig, "source")
    with pytest.raises(ConfigError, match=r"source\.path: required"):
        convert({"type": "folder"}, SourceConfig, "source")
