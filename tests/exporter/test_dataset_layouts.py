"""Where fitting finds its images: a flat folder or the benchmark layout; calibration defects flat or by type;
the one line `edge-export fit` prints; the device -> INT8 target choice."""
from __future__ import annotations

import typing
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_runtime.config import Device
from export.cli import _resolve_int8_target, main as export_main
from export.dataset import (DatasetError, calibration_defects_by_type, calibration_images, describe_training_data,
                            evaluation_images, train_images)
from edge_runtime.station_init import DEVICE_INT8_TARGET, int8_target_for


def _images(folder: Path, n: int, prefix: str = "img", ext: str = ".png") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = folder / f"{prefix}_{i:03d}{ext}"
        cv2.imwrite(str(p), np.full((8, 8, 3), i, np.uint8))
        out.append(p)
    return out


def test_flat_folder_of_good_images_is_used_whole(tmp_path):
    made = _images(tmp_path / "good_parts", 5, ext=".jpg")
    (tmp_path / "good_parts" / "notes.txt").write_text("not an image")
    _images(tmp_path / "good_parts" / "old", 3)            # subfolders are not part of a flat folder
    assert train_images(tmp_path / "good_parts") == made
    line = describe_training_data(tmp_path / "good_parts", None)
    assert line.startswith(f"found 5 good images in {tmp_path / 'good_parts'} (flat folder): ")
    assert "no calibration defects" in line and "\n" not in line


def test_benchmark_layout_reads_train_good_only(tmp_path):
    made = _images(tmp_path / "train" / "good", 4)
    _images(tmp_path / "test" / "good", 2)
    _images(tmp_path, 3, prefix="stray")                   # the benchmark layout wins over stray top-level files
    assert train_images(tmp_path) == made
    line = describe_training_data(tmp_path, None)
    assert f"found 4 good images in {tmp_path / 'train' / 'good'} (benchmark layout" in line


def test_folder_with_images_only_in_subfolders_names_them(tmp_path):
    _images(tmp_path / "parts" / "good", 3)
    with pytest.raises(DatasetError, match=r"parts: no good images found, neither in the folder itself nor in train/good \(missing\)\. Expected layout: a flat folder.*subfolders: good"):
        train_images(tmp_path / "parts")
    with pytest.raises(DatasetError, match="does not exist"):
        train_images(tmp_path / "nope")
    _images(tmp_path / "one", 1)
    with pytest.raises(DatasetError, match="found 1 images; at least 2"):
        train_images(tmp_path / "one")


def test_calibration_defects_flat_or_by_type(tmp_path):
    flat = _images(tmp_path / "bad", 3)
    assert calibration_images(tmp_path / "bad") == flat
    assert list(calibration_defects_by_type(tmp_path / "bad")) == ["defect"]
    typed = tmp_path / "typed"
    for kind, n in (("scratch", 2), ("dent", 1), ("stain", 4)):
        _images(typed / kind, n, prefix=kind)
    by_type = calibration_defects_by_type(typed)
    assert {k: len(v) for k, v in by_type.items()} == {"dent": 1, "scratch": 2, "stain": 4}
    assert len(calibration_images(typed)) == 7
    _images(tmp_path / "good_parts", 6)
    line = describe_training_data(tmp_path / "good_parts", typed)
    assert line.endswith("; 7 defect images in 3 types for calibration")
    assert describe_training_data(tmp_path / "good_parts", tmp_path / "bad").endswith(
        "; 3 defect images in one untyped folder for calibration")


def test_calibration_defects_refuse_good_folder_and_empty(tmp_path):
    _images(tmp_path / "mvtec_test" / "good", 2)
    _images(tmp_path / "mvtec_test" / "crack", 2)
    with pytest.raises(DatasetError, match=r"mvtec_test/good: a 'good' folder among the calibration defects"):
        calibration_images(tmp_path / "mvtec_test")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty: no images found for threshold calibration"):
        calibration_images(tmp_path / "empty")
    with pytest.raises(DatasetError, match="calibration defects folder does not exist"):
        calibration_images(tmp_path / "missing")


def test_evaluation_images_from_two_flat_folders(tmp_path):
    good = _images(tmp_path / "g", 3)
    _images(tmp_path / "d" / "crack", 2)
    items = evaluation_images(tmp_path / "g", tmp_path / "d")
    assert [i.path for i in items[:3]] == good and {i.label for i in items[3:]} == {"crack"}
    assert all(i.mask is None for i in items)


def test_fit_cli_refuses_a_bad_layout_with_the_reason(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert export_main(["fit", str(tmp_path / "empty"), "--out", str(tmp_path / "b")]) == 2
    assert (f"{tmp_path / 'empty'}: no good images found, neither in the folder itself nor in train/good (missing). "
            "Expected layout: a flat folder of good images") in capsys.readouterr().err


def test_a_file_given_for_a_folder_is_named_as_a_file(tmp_path, capsys):
    """Probe 107: `fit part.png` said 'data directory does not exist' of a file that is there."""
    part = _images(tmp_path / "g", 1)[0]
    assert export_main(["fit", str(part), "--out", str(tmp_path / "b")]) == 2
    assert f"edge-export: error: {part}: is a file, not a folder (the data directory)" in capsys.readouterr().err
    with pytest.raises(DatasetError, match="img_000.png: is a file, not a folder \\(the calibration defects folder\\)"):
        calibration_images(part)
    with pytest.raises(DatasetError, match="img_000.png: is a file, not a folder \\(the folder of good images to"):
        evaluation_images(part, tmp_path / "g")
    assert export_main(["fit", str(tmp_path / "gone"), "--out", str(tmp_path / "b")]) == 2
    assert "gone: data directory does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    # Probe 107: --seed -1 ran the whole fit, then died in hnswlib with a TypeError traceback.
    (["fit", "D", "--seed", "-1"], "argument --seed: must be >= 0 and <= 4294967295, got -1"),
    # Probe 107: --bundle-version -5 was refused only after the fit, by the load of the bundle left in --out.
    (["fit", "D", "--bundle-version", "-5"], "argument --bundle-version: must be >= 0 and <= 9223372036854775807"),
    # Probe 107: evaluate took --threads 0, -3 and 999999, which the station and check refuse.
    (["evaluate", "B", "D", "--json", "j", "--threads", "0"], "argument --threads: must be 1-256, got 0"),
    (["evaluate", "B", "D", "--json", "j", "--threads", "999999"], "argument --threads: must be 1-256, got 999999"),
    # Probe 107: 'invalid _ef value' named a function, not what was expected.
    (["fit", "D", "--ef", "abc"], "argument --ef: expected an integer, got 'abc'"),
    (["fit", "D", "--ef-seeded", "wide"], "argument --ef-seeded: expected auto or an integer, got 'wide'"),
    (["evaluate", "B", "D", "--json", "j", "--seed-step", "1.5"], "argument --seed-step: expected an integer"),
    # Probe 107: a negative size read as an option: 'expected one argument'.
    (["fit", "D", "--input-size", "-32x32"], "argument --input-size: input size -32x32: both sides must be"),
])
def test_odd_values_are_refused_naming_the_option_before_any_work(args, message, tmp_path, capsys):
    argv = [a if a not in ("B", "D", "j") else str(tmp_path / a) for a in args]
    if args[0] == "fit":
        argv += ["--out", str(tmp_path / "b")]
    with pytest.raises(SystemExit) as stop:
        export_main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "b").exists()


def test_device_names_match_the_station_schema():
    assert set(DEVICE_INT8_TARGET) == set(typing.get_args(Device))
    from export.onnx_export import INT8_TARGETS

    assert set(DEVICE_INT8_TARGET.values()) <= set(INT8_TARGETS)
    with pytest.raises(ValueError, match="unknown device 'pi9'; known: x86"):
        int8_target_for("pi9")


class _Args:
    def __init__(self, device=None, station=None, int8_target=None):
        self.device, self.station, self.int8_target = device, station, int8_target


def test_int8_target_follows_the_device_the_station_or_the_override(tmp_path):
    target, why = _resolve_int8_target(_Args())
    assert target == "x86-avx2" and why.startswith("default: no --device/--station")
    assert _resolve_int8_target(_Args(device="pi5"))[0] == "arm"
    assert _resolve_int8_target(_Args(device="x86-vnni"))[0] == "x86-vnni"
    station = tmp_path / "station.yaml"
    station.write_text("device: jetson-orin\nbundle: b\nsource: {type: folder, path: imgs}\n")
    target, why = _resolve_int8_target(_Args(station=str(station)))
    assert target == "arm" and why == f"device jetson-orin from {station}"
    target, why = _resolve_int8_target(_Args(station=str(station), int8_target="x86-avx2"))
    assert target == "x86-avx2" and "overrides arm" in why
    station.write_text("bundle: b\nsource: {type: folder, path: imgs}\n")
    with pytest.raises(ValueError, match="no 'device:' key"):
        _resolve_int8_target(_Args(station=str(station)))
    station.write_text("device: pi9\nbundle: b\nsource: {type: folder, path: imgs}\n")
    with pytest.raises(ValueError, match=r"station.yaml: device: expected one of 'x86'"):
        _resolve_int8_target(_Args(station=str(station)))
    with pytest.raises(ValueError, match="give one"):
        _resolve_int8_target(_Args(device="pi5", station=str(station)))


def test_copies_hidden_files_and_subfolders_are_left_out_and_said(tmp_path):
    made = _images(tmp_path / "good", 4)
    (tmp_path / "good" / "img_000_copy.png").write_bytes(made[0].read_bytes())   # a copy made by hand
    (tmp_path / "good" / "._img_001.png").write_bytes(b"\x00\x05\x16\x07 macOS metadata")  # not an image at all
    _images(tmp_path / "good" / "batch2", 3)
    assert train_images(tmp_path / "good") == made
    line = describe_training_data(tmp_path / "good", None)
    assert line.startswith("found 4 good images")
    assert "1 byte-identical copy left out (img_000_copy.png = img_000.png)" in line
    assert "1 hidden file left out (._img_001.png)" in line
    assert "batch2/: 3" in line
    for i in range(1, 4):   # copies of one frame: the error says why a folder of 4 files holds 1 image
        made[i].write_bytes(made[0].read_bytes())
    with pytest.raises(DatasetError, match=r"good: found 1 images \(4 byte-identical copies of it left out, first: "
                                           r"img_000_copy\.png = img_000\.png\); at least 2"):
        train_images(tmp_path / "good")


def test_images_of_unread_types_beside_read_ones_are_said(tmp_path):
    """A folder of PNGs and a few WebPs: the WebPs are left out, and the line says so, naming one (probe 69: 4 of
    20 were dropped without a word)."""
    made = _images(tmp_path / "good", 4)
    (tmp_path / "good" / "img_009.webp").write_bytes(b"RIFF....WEBP")
    assert train_images(tmp_path / "good") == made
    line = describe_training_data(tmp_path / "good", None)
    assert line.startswith("found 4 good images")
    assert "1 file of other types left out (.webp; first: img_009.webp; the formats read are" in line


def test_a_folder_of_unsupported_image_types_names_them(tmp_path):
    (tmp_path / "parts").mkdir()
    for name in ("a.webp", "b.webp", "c.jp2"):
        (tmp_path / "parts" / name).write_bytes(b"x")
    with pytest.raises(DatasetError, match=r"found only files of other types: \.jp2, \.webp; the formats read are"):
        train_images(tmp_path / "parts")
