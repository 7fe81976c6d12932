"""Writing a bundle never loses one: recalibrate, adapt and fit write beside --out and move in only when complete,
an old bundle is set aside until the new one is in place, and nothing of the user's is deleted (demo --fresh)."""
from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest

from edge_runtime import bundle as bundle_mod
from edge_runtime.bank_adapt import AdaptError, InputImage, prepare
from edge_runtime.bundle import Bundle
from export.cli import main as export_main

REPO = Path(__file__).resolve().parents[2]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def calibration_set(synthetic_dataset: Path, folder: Path) -> Path:
    for kind in ("scratch", "dent"):
        (folder / kind).mkdir(parents=True)
        for p in sorted((synthetic_dataset / "test" / kind).glob("*.png"))[:2]:
            shutil.copy(p, folder / kind / p.name)
    return folder


def test_a_failed_recalibration_leaves_the_bundle_at_out_and_no_copy(small_bundle, synthetic_dataset, tmp_path):
    defects = calibration_set(synthetic_dataset, tmp_path / "defects")
    out = tmp_path / "recal"
    assert export_main(["recalibrate", str(small_bundle), "--out", str(out), "--calibration-defects", str(defects)]) == 0
    before = Bundle.load(out).bundle_id
    whole = next((defects / "scratch").iterdir()).read_bytes()
    (defects / "scratch" / "cut.png").write_bytes(whole[:len(whole) // 2])
    assert export_main(["recalibrate", str(small_bundle), "--out", str(out), "--calibration-defects", str(defects),
                        "--overwrite"]) == 2
    assert Bundle.load(out).bundle_id == before and leftovers(tmp_path) == []
    assert export_main(["recalibrate", str(small_bundle), "--out", str(tmp_path / "new"),
                        "--calibration-defects", str(defects)]) == 2
    assert not (tmp_path / "new").exists() and leftovers(tmp_path) == []   # no copy of the source that looks recalibrated


def test_install_keeps_the_old_bundle_and_the_new_one_when_out_cannot_be_moved(small_bundle, tmp_path, monkeypatch):
    out = tmp_path / "mnt"                                    # as a mount point: the folder itself cannot be renamed
    shutil.copytree(small_bundle, out)
    stage = bundle_mod.staging_dir(out)
    shutil.copytree(small_bundle, stage, dirs_exist_ok=True)
    real = os.rename

    def rename(src, dst):
        if Path(src) == out.resolve():
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))
        return real(src, dst)

    monkeypatch.setattr(bundle_mod.os, "rename", rename)
    with pytest.raises(OSError, match=f"the new bundle is complete in {stage}"):
        bundle_mod.install_bundle(stage, out, True, {})
    assert Bundle.load(out) and Bundle.load(stage)          # both intact: nothing lost


def test_out_that_is_the_current_folder_is_refused_before_any_work(small_bundle, synthetic_dataset, tmp_path,
                                                                     monkeypatch, capsys):
    out = tmp_path / "bundle"
    shutil.copytree(small_bundle, out)
    monkeypatch.chdir(out)
    assert export_main(["fit", str(synthetic_dataset), "--out", ".", "--overwrite"]) == 2
    assert "is or contains the current folder" in capsys.readouterr().err
    assert Bundle.load(out) and leftovers(tmp_path) == []


def test_adapt_never_touches_a_folder_of_the_users_and_a_failure_leaves_nothing(device_bundle, tmp_path):
    mine = tmp_path / "v2.partial" / "notes.txt"               # named as the old staging folder was
    mine.parent.mkdir()
    mine.write_text("mine")
    good = device_bundle / "golden" / "01_good.png"
    plan = prepare(device_bundle, [InputImage.from_file(good)], [], threads=1)
    with pytest.raises(AdaptError, match="no-such-key.pem: cannot load"):
        plan.write(tmp_path / "v2", signing_key=tmp_path / "no-such-key.pem")
    assert not (tmp_path / "v2").exists() and leftovers(tmp_path) == []
    assert plan.write(tmp_path / "v2").root == tmp_path / "v2"
    assert mine.read_text() == "mine"


def test_demo_fresh_deletes_only_a_demo_folder(tmp_path, capsys):
    work = tmp_path / "work"
    (work / "photos").mkdir(parents=True)
    (work / "photos" / "line3.jpg").write_bytes(b"mine")
    assert export_main(["demo", "--workdir", str(work), "--fresh"]) == 2
    assert "holds other things too (first: photos)" in capsys.readouterr().err
    assert (work / "photos" / "line3.jpg").read_bytes() == b"mine"


def test_a_calibration_defect_of_another_size_is_refused_before_the_fit(synthetic_dataset, tmp_path, capsys):
    defects = calibration_set(synthetic_dataset, tmp_path / "defects")
    odd = next((defects / "dent").iterdir())
    cv2.imwrite(str(odd), cv2.resize(cv2.imread(str(odd)), (200, 150)))
    t0 = time.monotonic()
    assert export_main(["fit", str(synthetic_dataset), "--out", str(tmp_path / "b"), "--calibration-defects",
                        str(defects), "--backbone", "lite0"]) == 2
    err = capsys.readouterr().err
    assert f"calibration defect {odd} is 200x150" in err and time.monotonic() - t0 < 20
    assert not (tmp_path / "b").exists() and leftovers(tmp_path) == []


def test_a_stopped_fit_leaves_no_staging_folder(synthetic_dataset, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "export.cli", "fit", str(synthetic_dataset), "--out",
                             str(tmp_path / "b")], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not leftovers(tmp_path) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)                                      # until it has made its staging folder
    assert leftovers(tmp_path), "the fit never started writing"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 128 + signal.SIGTERM
    assert leftovers(tmp_path) == [] and not (tmp_path / "b").exists()


def test_ctrl_c_stops_a_fit_with_one_line_and_leaves_nothing(synthetic_dataset, tmp_path):
    """Probe 107: Ctrl-C mid-fit printed a KeyboardInterrupt traceback (exit -2)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "export.cli", "fit", str(synthetic_dataset), "--out",
                             str(tmp_path / "b")], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not leftovers(tmp_path) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)                                      # until it has made its staging folder
    assert leftovers(tmp_path), "the fit never started writing"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 128 + signal.SIGINT
    err = proc.stderr.read()
    assert "Traceback" not in err and err.splitlines()[-1] == (
        f"edge-export: fit: stopped (Ctrl-C); nothing half-written is left in {tmp_path / 'b'}")
    assert leftovers(tmp_path) == [] and not (tmp_path / "b").exists()


def test_an_out_no_folder_can_be_made_in_is_named_as_given(synthetic_dataset, tmp_path, capsys):
    """Probe 107: the error named only the hidden staging folder ('.b.partial-<pid>-<hex>: Not a directory')."""
    afile = tmp_path / "notes.txt"
    afile.write_text("x")
    assert export_main(["fit", str(synthetic_dataset), "--out", str(afile / "b"), "--backbone", "lite0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"edge-export: error: {afile / 'b'}: cannot write a bundle there: no new folder can be made in "
                   f"{afile} (Not a directory)")
    assert leftovers(tmp_path) == []


def test_a_fit_names_what_a_run_killed_outright_left_and_deletes_none_of_it(synthetic_dataset, tmp_path, capsys):
    data = tmp_path / "good"
    data.mkdir()
    for p in sorted((synthetic_dataset / "train" / "good").glob("*.png"))[:4]:
        shutil.copy(p, data / p.name)
    whole = next(data.iterdir()).read_bytes()
    (data / "zz_cut.png").write_bytes(whole[:len(whole) // 2])   # the fit stops early, after staging
    left = tmp_path / ".b.partial-1-abcdef"                   # SIGKILL leaves what no handler can remove
    left.mkdir()
    assert export_main(["fit", str(data), "--out", str(tmp_path / "b")]) == 2
    assert f"WARNING: {left} was left by a run that was stopped outright" in capsys.readouterr().err
    assert left.is_dir() and leftovers(tmp_path) == [left.name]


def test_a_second_demo_run_says_it_reuses_the_bundle(tmp_path, capsys, monkeypatch):
    import export.demo as demo

    work = tmp_path / "demo"
    (work / "data" / "flange" / "train").mkdir(parents=True)
    (work / "bundle").mkdir()
    (work / "bundle" / "manifest.yaml").write_text("created: '2026-12-01T10:00:00+00:00'\n")
    monkeypatch.setattr(demo, "fit", lambda *a, **k: pytest.fail("a second run must not refit"))
    monkeypatch.setattr(demo, "write_sample_frames", lambda *a, **k: None)
    monkeypatch.setattr(demo.subprocess, "call", lambda *a, **k: 3)      # the daemon part is not under test here
    assert demo.run_demo(work) == 3
    assert "[demo] reusing the bundle fitted 2026-12-01T10:00:00+00:00 in" in capsys.readouterr().out


def test_a_calibration_defect_that_is_a_copy_of_a_good_image_is_refused_before_the_fit(synthetic_dataset, tmp_path,
                                                                                       capsys):
    """A good image left among the defects scores like the good parts: the zero-escape point fell under them and a
    REVIEW band held every good part, written with exit 0 (probe 103: bottle, 24 good images and 4 defects, one of
    them a copy of good/005.png). Refused, naming both files, before any work; a copy outside --max-train's subset
    is a good part too."""
    defects = calibration_set(synthetic_dataset, tmp_path / "defects")
    good = sorted((synthetic_dataset / "train" / "good").glob("*.png"))[-1]
    shutil.copy(good, defects / "scratch" / "also_bad.png")
    t0 = time.monotonic()
    assert export_main(["fit", str(synthetic_dataset), "--out", str(tmp_path / "b"), "--calibration-defects",
                        str(defects), "--max-train", "2"]) == 2
    err = capsys.readouterr().err
    assert (f"calibration defect {defects / 'scratch' / 'also_bad.png'} is a byte-identical copy of the good image "
            f"{good}") in err and time.monotonic() - t0 < 20
    assert not (tmp_path / "b").exists() and leftovers(tmp_path) == []
