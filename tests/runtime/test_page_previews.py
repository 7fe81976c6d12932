"""A preview of 'this part is good' (or of a recalibration) costs the station one extractor thread at a time and a
bounded memory: probe 104's operator ran 6 previews at once, each holding the whole bundle's verified files (36 MB for
bottle) for the preview's 10 minutes; the daemon grew from 213 to 917 MB in 2 s and inspection p50 from 10 to 68 ms."""
from __future__ import annotations

import resource
import signal
import threading

import cv2
import pytest

from edge_runtime.bundle import Bundle
from edge_runtime.bundle_versions import VersionStore
from edge_runtime.operator_page import feedback as feedback_mod
from edge_runtime.operator_page.feedback import Feedback, FeedbackError
from edge_runtime.operator_page.part_history import PartHistory
from edge_runtime.pipeline import Pipeline
from edge_runtime.records import Frame


@pytest.fixture
def station(device_bundle, tmp_path):
    """(Feedback on the device bundle, the frame id of an NG part in its history)."""
    good = cv2.imread(str(device_bundle / "golden" / "00_good.png"))
    cv2.circle(good, (60, 80), 12, (0, 0, 255), -1)
    marked = tmp_path / "marked.png"
    cv2.imwrite(str(marked), good)
    in_service = Bundle.load(device_bundle)
    history = PartHistory()
    result = Pipeline(in_service).inspect(Frame(7, "marked.png", encoded=marked.read_bytes()))
    assert result.verdict.value == "NG"
    history.publish(result)
    fb = Feedback(VersionStore(device_bundle, tmp_path / "state", None), history, lambda: in_service,
                  reload=lambda bundle_id: None)
    return fb, 7


def test_a_kept_preview_holds_no_bundle_files_and_still_applies(station):
    fb, fid = station
    preview = fb.preview_good(fid, "erin", "engineer", 100.0)
    plan = fb._plans[preview["plan"]][2]
    assert plan.parent._verified == {}          # was: every file of the bundle, for PLAN_TTL_S
    # Applying reads the files again, checked against the manifest.
    assert fb.apply(preview["plan"], "erin", "learn-good", "engineer")["bundle_id"]


def test_one_preview_at_a_time_per_line(station, monkeypatch):
    fb, fid = station
    running, release = threading.Event(), threading.Event()
    real = feedback_mod.prepare

    def slow_prepare(*args, **kwargs):
        running.set()
        release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(feedback_mod, "prepare", slow_prepare)
    first: list = []
    t = threading.Thread(target=lambda: first.append(fb.preview_good(fid, "otto", "engineer", 100.0)))
    t.start()
    assert running.wait(30)
    try:
        with pytest.raises(FeedbackError, match="another preview"):
            fb.preview_good(fid, "anna", "engineer", 100.0)
    finally:
        release.set()
        t.join(60)
    assert first and first[0]["plan"]
    assert fb.preview_good(fid, "anna", "engineer", 100.0)["plan"]   # the next one runs once the first is done


def test_at_most_a_few_previews_are_kept(tmp_path):
    fb = Feedback(VersionStore(tmp_path / "base", tmp_path / "state"), PartHistory(), lambda: None, lambda b: None)
    ids = [fb._keep("otto", object(), [i], "learn-good", "operator") for i in range(3 * feedback_mod.PLANS_KEPT)]
    assert len(fb._plans) == feedback_mod.PLANS_KEPT
    assert list(fb._plans) == ids[-feedback_mod.PLANS_KEPT:]   # the newest, the one a person just saw, is kept
    with pytest.raises(FeedbackError, match="expired"):
        fb._apply(ids[0], "otto", "learn-good", "operator")



def test_an_escaped_part_is_stored_once_and_the_store_is_bounded(station, monkeypatch):
    """Probe 104's note: "this part was bad" wrote one more PNG at every click, with no bound on how many, and a
    recalibration reads all of them into memory."""
    fb, fid = station
    first = fb.mark_bad(fid, "otto")
    assert first["pending"] == 1
    assert fb.mark_bad(fid, "otto") == first and len(fb.pending_defects()) == 1   # a second click: no second copy
    monkeypatch.setattr(feedback_mod, "PENDING_DEFECTS_MAX", 3)
    for name in ("1_100.png", "2_101.png"):
        (fb.pending_dir / name).write_bytes(b"png")
    assert fb.mark_bad(fid, "otto")["pending"] == 3                               # stored already: answered
    (fb.pending_dir / first["stored"]).unlink()
    (fb.pending_dir / "3_102.png").write_bytes(b"png")                            # three others, none this part
    with pytest.raises(FeedbackError, match=r"3 escaped parts are stored already \(at most 3\)"):
        fb.mark_bad(fid, "otto")
    assert not (fb.pending_dir / first["stored"]).exists()


def test_an_escaped_part_whose_write_fails_is_not_stored(station):
    """Probe 113: a write cut short (disk full) left a torn PNG under the final name; the next click answered
    'stored' and every recalibration failed on it ('not a decodable PNG image') until someone deleted it."""
    fb, fid = station
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2000, hard))    # the disk fills after 2000 bytes
    try:
        with pytest.raises(FeedbackError, match="part 7 not stored: File too large"):
            fb.mark_bad(fid, "otto")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)
    assert list(fb.pending_dir.iterdir()) == []
    stored = fb.mark_bad(fid, "otto")                           # the disk has room again: stored whole
    assert cv2.imread(str(fb.pending_dir / stored["stored"])) is not None
