"""NgImageStore: what is kept, how overlays are coloured, safe names, and the folder bounds."""
from __future__ import annotations

import os
import re

import cv2
import numpy as np
import pytest

from edge_runtime.outputs.base import OutputError
from edge_runtime.outputs.ng_image_store import NgImageStore, NgImageStoreConfig, heat_overlay, safe_stem
from edge_runtime.records import InspectionResult, Verdict

H, W = 32, 48
THRESHOLD = 2.0


def make_result(frame_id: int, verdict: Verdict, source: str = "cam0", with_image: bool = True,
                with_map: bool = True, captured_at: float = 1_700_000_000.0) -> InspectionResult:
    image = np.zeros((H, W, 3), np.uint8)
    image[..., 0] = 255                     # pure red in RGB, as the pipeline hands it over
    amap = np.zeros((H, W), np.float32)
    amap[:, W // 2:] = 2 * THRESHOLD        # right half well above the threshold
    return InspectionResult(
        frame_id=frame_id, source=source, verdict=verdict, score=4.0, normalized_score=0.9, threshold=THRESHOLD,
        timings_ms={}, bundle_id="b", image=image if with_image else None,
        anomaly_map=amap if with_map and with_image else None, captured_at=captured_at + frame_id,
    )


def store(tmp_path, **overrides) -> NgImageStore:
    cfg = dict(dir=str(tmp_path / "ng"), format="png")
    cfg.update(overrides)
    s = NgImageStore(NgImageStoreConfig(**cfg))
    s.start()
    return s


def files(tmp_path) -> list[str]:
    return sorted(os.listdir(tmp_path / "ng"))


def test_ok_parts_are_not_kept(tmp_path):
    s = store(tmp_path)
    s.publish(make_result(1, Verdict.OK))
    assert files(tmp_path) == []


def test_ng_keeps_frame_and_overlay_named_by_frame_and_verdict(tmp_path):
    s = store(tmp_path)
    s.publish(make_result(12, Verdict.NG, source="/data/line1/part_0012.png"))
    names = files(tmp_path)
    assert len(names) == 2
    frame_name = next(n for n in names if "_overlay" not in n)
    overlay_name = next(n for n in names if "_overlay" in n)
    assert "_f12_" in frame_name and "_NG_" in frame_name and "part-0012" in frame_name
    assert overlay_name == frame_name.replace(".png", "_overlay.png")
    saved = cv2.imread(str(tmp_path / "ng" / frame_name))
    assert saved.shape == (H, W, 3)
    assert tuple(saved[0, 0]) == (0, 0, 255), "RGB red must be saved as red (BGR on disk)"


def test_a_deferred_heat_map_is_made_for_the_overlay_and_skipped_for_ok_parts(tmp_path):
    made = []

    def deferred(frame_id, verdict):
        r = make_result(frame_id, verdict)
        amap = r.anomaly_map
        r.anomaly_map = lambda: made.append(frame_id) or amap   # as the pipeline hands it over: made on first read
        return r

    s = store(tmp_path)
    s.publish(deferred(1, Verdict.OK))
    s.publish(deferred(2, Verdict.NG))
    assert made == [2]                                  # an OK part nobody looks at never pays for its map
    assert len([n for n in files(tmp_path) if "_overlay" in n]) == 1


def test_fault_frames_are_kept_only_when_decoded_and_enabled(tmp_path):
    s = store(tmp_path)
    s.publish(make_result(1, Verdict.FAULT, with_image=False))       # never decoded: nothing to keep
    assert files(tmp_path) == []
    s.publish(make_result(2, Verdict.FAULT, with_map=False))
    assert len(files(tmp_path)) == 1 and "_FAULT_" in files(tmp_path)[0]
    off = store(tmp_path, dir=str(tmp_path / "ng2"), save_faults=False)
    off.publish(make_result(3, Verdict.FAULT))
    assert os.listdir(tmp_path / "ng2") == []


def test_overlay_is_red_above_threshold_and_blue_where_normal():
    image = np.full((H, W, 3), 128, np.uint8)
    amap = np.zeros((H, W), np.float32)
    amap[:, 16:32] = THRESHOLD              # exactly at the threshold
    amap[:, 32:] = THRESHOLD / 2            # half way
    heat = heat_overlay(image, amap, THRESHOLD, alpha=1.0)   # alpha 1: the pure colour map
    b, g, r = (int(v) for v in heat[0, 40])
    normal = tuple(int(v) for v in heat[0, 0])
    at = tuple(int(v) for v in heat[0, 20])
    assert normal[0] > 100 and normal[1] == 0 and normal[2] == 0, f"zero anomaly is blue, got {normal}"
    assert at[2] > 200 and at[1] < 60 and at[0] < 10, f"the threshold is red, got {at}"
    assert not (r > 200 and g < 60), f"half the threshold is not red, got {(b, g, r)}"
    blended = heat_overlay(image, amap, THRESHOLD, alpha=0.5)
    assert blended.shape == image.shape and blended[0, 20, 2] > blended[0, 20, 0]


def test_overlay_tolerates_a_map_of_another_size_and_nan():
    image = np.zeros((H, W, 3), np.uint8)
    amap = np.full((8, 12), np.nan, np.float32)
    out = heat_overlay(image, amap, THRESHOLD)
    assert out.shape == (H, W, 3)


@pytest.mark.parametrize("source", ["../../etc/passwd", "/abs/dir/../x.png", "C:\\evil\\..\\x.bmp",
                                    "rtsp://user:pw@cam/stream?x=1", "", "..", "名前.png"])
def test_names_never_use_the_source_as_a_path(tmp_path, source):
    s = store(tmp_path)
    s.publish(make_result(3, Verdict.NG, source=source))
    names = files(tmp_path)
    assert len(names) == 2
    for name in names:
        assert re.fullmatch(r"[0-9T.Z]+_f3_NG_[A-Za-z0-9-]+(_overlay)?\.png", name), name
    # Nothing was written outside the store's folder.
    assert sorted(os.listdir(tmp_path)) == ["ng"]


def test_safe_stem():
    assert safe_stem("/data/a b/part 7.png") == "part-7"
    assert safe_stem("../..") == ""
    assert len(safe_stem("x" * 500)) == 40


def test_oldest_files_go_first_when_over_max_files(tmp_path):
    s = store(tmp_path, max_files=4)
    for frame_id in (1, 2, 3):
        s.publish(make_result(frame_id, Verdict.NG))
    names = files(tmp_path)
    assert len(names) == 4
    assert not any("_f1_" in n for n in names)
    assert sum("_f2_" in n for n in names) == 2 and sum("_f3_" in n for n in names) == 2


def test_max_bytes_bounds_the_folder(tmp_path):
    probe = store(tmp_path, dir=str(tmp_path / "probe"))
    probe.publish(make_result(1, Verdict.NG))
    pair_bytes = sum(os.path.getsize(tmp_path / "probe" / n) for n in os.listdir(tmp_path / "probe"))
    s = store(tmp_path, max_bytes=int(pair_bytes * 2.5))
    for frame_id in range(1, 6):
        s.publish(make_result(frame_id, Verdict.NG))
    total = sum(os.path.getsize(tmp_path / "ng" / n) for n in files(tmp_path))
    assert total <= pair_bytes * 2.5
    assert any("_f5_" in n for n in files(tmp_path)), "the newest part is kept"
    assert not any("_f1_" in n for n in files(tmp_path))


def test_restart_counts_existing_files_and_never_deletes_foreign_ones(tmp_path):
    s = store(tmp_path, max_files=10)
    for frame_id in (1, 2, 3):
        s.publish(make_result(frame_id, Verdict.NG))
    (tmp_path / "ng" / "operator-notes.txt").write_text("keep me")
    restarted = store(tmp_path, max_files=4)       # start() prunes what an earlier run left beyond the bound
    names = files(tmp_path)
    assert "operator-notes.txt" in names
    assert len([n for n in names if n.endswith(".png")]) == 4
    restarted.publish(make_result(4, Verdict.NG))
    names = files(tmp_path)
    assert "operator-notes.txt" in names and not any("_f2_" in n for n in names)



def test_a_foreign_name_that_only_adds_a_newline_is_never_deleted(tmp_path):
    """Probe 113: the own-name pattern ended in $, which matches before a final newline: a file named like an
    image of the store plus '\\n' was counted as the store's and deleted as its oldest."""
    (tmp_path / "ng").mkdir()
    foreign = "20000101T000000.000Z_f1_NG_cam0.png\n"
    (tmp_path / "ng" / foreign).write_bytes(b"not ours")
    s = store(tmp_path, max_files=2)
    for frame_id in (1, 2):
        s.publish(make_result(frame_id, Verdict.NG))
    assert foreign in files(tmp_path) and len(s._files) == 2

def test_write_failure_is_an_output_error_naming_the_path(tmp_path):
    s = store(tmp_path)
    os.rmdir(tmp_path / "ng")
    (tmp_path / "ng").write_text("a file where the folder was")
    with pytest.raises(OutputError, match=str(tmp_path / "ng")):
        s.publish(make_result(1, Verdict.NG))



def test_each_image_is_on_disk_before_it_takes_its_name(tmp_path, monkeypatch):
    """Probe 113: the temporary file was renamed unsynced; after a power cut the finished name (a new name, which
    ext4's rename heuristic does not cover) could hold an empty or half-written image."""
    import edge_runtime.outputs.ng_image_store as module
    events = []
    real_fsync, real_replace = module.os.fsync, module.os.replace
    monkeypatch.setattr(module.os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(module.os, "replace", lambda a, b: events.append(("replace", a)) or real_replace(a, b))
    s = store(tmp_path)
    s.publish(make_result(1, Verdict.NG))
    replaced = [a for kind, a in events if kind == "replace"]
    assert len(replaced) == 2
    for tmp in replaced:
        assert events.index(("fsync", tmp)) < events.index(("replace", tmp)), events


def test_a_write_a_crash_interrupted_is_removed_at_start(tmp_path):
    """Probe 113: a .part left by a crash or power cut mid-write was neither counted nor ever deleted."""
    (tmp_path / "ng").mkdir()
    torn = tmp_path / "ng" / "20231114T221321.000Z_f1_NG_cam0.png.part"
    torn.write_bytes(b"\x89PNG half")
    (tmp_path / "ng" / "upload.part").write_bytes(b"not ours")
    store(tmp_path)
    assert files(tmp_path) == ["upload.part"]

def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="max_files"):
        NgImageStoreConfig(dir="x", max_files=1).validate()
    with pytest.raises(ValueError, match="jpeg_quality"):
        NgImageStoreConfig(dir="x", jpeg_quality=0).validate()


def test_review_frames_are_kept_for_the_recheck(tmp_path):
    s = store(tmp_path)
    s.publish(make_result(3, Verdict.REVIEW))
    names = files(tmp_path)
    assert len(names) == 2 and all("_f3_REVIEW_" in n for n in names)
    s2 = store(tmp_path)                                # its own files are recognised after a restart
    assert len(s2._files) == 2
    s3 = store(tmp_path, dir=str(tmp_path / "other"), save_review=False)
    s3.publish(make_result(4, Verdict.REVIEW))
    assert os.listdir(tmp_path / "other") == []


def test_free_space_floor_deletes_own_oldest_then_refuses(tmp_path, monkeypatch):
    """The store never takes the file system below min_free_mb, whatever its own limits allow."""
    import edge_runtime.outputs.ng_image_store as module

    floor = int(9.99 * 2**20)
    capacity = {"bytes": floor + 10 * 2**20}            # a small file system: what is free = capacity - our files

    def used() -> int:
        return sum(os.path.getsize(tmp_path / "ng" / n) for n in os.listdir(tmp_path / "ng"))

    class Usage:
        def __init__(self, path):
            self.free = capacity["bytes"] - used()

    monkeypatch.setattr(module.shutil, "disk_usage", Usage)
    s = store(tmp_path, min_free_mb=9.99, max_files=1000)
    s.publish(make_result(1, Verdict.NG))
    assert len(files(tmp_path)) == 2
    capacity["bytes"] = used() + floor + 10              # the floor is almost reached: a new image needs room
    s.publish(make_result(2, Verdict.NG))
    assert not any("_f1_" in n for n in files(tmp_path)), "its own oldest images went to make room"
    assert any("_f2_" in n for n in files(tmp_path))
    capacity["bytes"] = 5 * 2**20                        # someone else filled the disk: nothing of ours can help
    with pytest.raises(OutputError, match=r"not saved: .* MiB free .*min_free_mb is 9.99"):
        s.publish(make_result(3, Verdict.NG))
    assert not any("_f3_" in n for n in files(tmp_path)) and s.refused_low_space == 1
