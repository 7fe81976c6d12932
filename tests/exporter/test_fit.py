"""Fitting on the embedded data: layout errors, odd inputs, and that defects outscore good parts."""
import json
import shutil

import cv2
import numpy as np
import pytest
import yaml

from edge_runtime.bundle import Bundle
from edge_runtime.pipeline import Pipeline
from edge_runtime.preprocess import load_image
from export.cli import main as export_main
from export.dataset import DatasetError, train_images
from export.evaluate import evaluate


def test_wrong_layout_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetError, match=r"train/good: missing\. Expected layout"):
        train_images(tmp_path)
    assert export_main(["fit", str(tmp_path), "--out", str(tmp_path / "b")]) == 2
    assert "train/good: missing" in capsys.readouterr().err
    (tmp_path / "train" / "good").mkdir(parents=True)
    with pytest.raises(DatasetError, match="found 0 images"):
        train_images(tmp_path)


def test_bundle_manifest_pins_the_score(small_bundle):
    m = yaml.safe_load((small_bundle / "manifest.yaml").read_text())
    assert m["features"]["dim"] == 152 and m["features"]["grid"] == [28, 28]
    assert m["score"]["k"] == 1 and m["score"]["distance"] == "l2"
    assert m["preprocessing"]["image_size"] == 224
    assert set(m["variants"]) == {"fp32", "int8"}
    for v in m["variants"].values():
        assert v["threshold"] > 0 and v["golden"] and v["threshold_info"]["good_scores"]["n"] >= 1
        assert v["model"] in m["files"] and v["index"] in m["files"]
    assert m["index"]["ef_search"] >= 1 and m["backbone"]["weights_sha256"]
    for name in ("manifest.yaml",):
        assert name not in m["files"]
    assert all(len(f["sha256"]) == 64 for f in m["files"].values())


def test_every_defect_scores_above_every_good_image(small_bundle, synthetic_dataset):
    r = evaluate(small_bundle, synthetic_dataset, "onnx-int8", "hnsw")
    good = [i["score"] for i in r["images"] if i["label"] == "good"]
    bad = [i["score"] for i in r["images"] if i["label"] != "good"]
    assert min(bad) > max(good)
    assert r["image_auroc"] == 1.0 and r["pixel_auroc"] > 0.9
    assert set(r["per_defect"]) == {"dent", "missing_hole", "missing_piece", "scratch", "stain"}


def test_grayscale_and_odd_sized_inputs(small_bundle, synthetic_dataset, tmp_path):
    pipe = Pipeline(Bundle.load(small_bundle), "fp32", "exact")
    src = sorted((synthetic_dataset / "test" / "good").glob("*.png"))[0]
    rgb = load_image(src)
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    odd = cv2.resize(rgb, (301, 187))
    for img, path in ((gray, tmp_path / "gray.png"), (cv2.cvtColor(odd, cv2.COLOR_RGB2BGR), tmp_path / "odd.jpg")):
        cv2.imwrite(str(path), img)
        s = pipe.score_rgb(load_image(path))
        assert np.isfinite(s.score) and s.anomaly_map.shape == (224, 224)
    # A grayscale data set (like magnetic_tile) fits too.
    gray_set = tmp_path / "grayset"
    for sub in ("train/good",):
        (gray_set / sub).mkdir(parents=True)
    for i, p in enumerate(sorted((synthetic_dataset / "train" / "good").glob("*.png"))[:6]):
        g = cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2GRAY)
        cv2.imwrite(str(gray_set / "train" / "good" / f"{i}.jpg"), cv2.resize(g, (150 + 7 * i, 230)))
    assert export_main(["fit", str(gray_set), "--out", str(tmp_path / "gb"), "--coreset-ratio", "0.2"]) == 0
    assert Bundle.load(tmp_path / "gb").variant("int8").threshold > 0


def test_evaluate_cli_writes_the_promised_json(small_bundle, synthetic_dataset, tmp_path):
    out = tmp_path / "r.json"
    rc = export_main(["evaluate", str(small_bundle), str(synthetic_dataset), "--json", str(out),
                      "--engine", "onnx-fp32", "--knn", "exact", "--report", str(tmp_path / "rep")])
    assert rc == 0
    r = json.loads(out.read_text())
    for key in ("image_auroc", "pixel_auroc", "n_good", "n_defect", "per_defect", "seconds_per_image",
                "threshold", "false_rejects", "escapes"):
        assert key in r
    assert r["n_good"] == 8 and r["n_defect"] == 20
    page = (tmp_path / "rep" / "report.html").read_text()
    assert f"{r['image_auroc']:.4f}" in page and page.count('class="overlay"') == 12   # 6 good + 6 defects
    assert list((tmp_path / "rep").iterdir()) == [tmp_path / "rep" / "report.html"]      # one file, nothing loose


def test_verify_cli_detects_a_modified_file(small_bundle, tmp_path, capsys):
    assert export_main(["verify", str(small_bundle)]) == 0
    copy = tmp_path / "b"
    shutil.copytree(small_bundle, copy)
    data = bytearray((copy / "index_int8.hnsw").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "index_int8.hnsw").write_bytes(bytes(data))
    assert export_main(["verify", str(copy)]) == 1
    assert "index_int8.hnsw" in capsys.readouterr().err


def test_threshold_with_calibration_defects_lets_none_through():
    from export.calibration import calibrate_threshold

    good = np.array([1.0, 1.2, 1.4, 3.0])
    bad = np.array([2.0, 5.0, 6.0])
    t, info = calibrate_threshold(good, bad)
    assert np.all(bad >= t) and t > 1.4
    assert info["calibration_escapes"] == 0 and info["calibration_false_reject_rate"] == 0.25
    t2, info2 = calibrate_threshold(good, np.array([]), 0.01)
    assert t2 > 3.0 and info2["calibration_false_reject_rate"] == 0.0


def test_default_variant_falls_back_to_fp32_only_when_defects_say_so():
    from export.fit import choose_default_variant

    assert choose_default_variant("int8", {})[0] == "int8"
    assert choose_default_variant("int8", {"int8": 0.996, "fp32": 1.0})[0] == "int8"
    name, reason = choose_default_variant("int8", {"int8": 0.95, "fp32": 0.99})
    assert name == "fp32" and "0.9500" in reason
