"""Fitting on the embedded data: layout errors, odd inputs, and that defects outscore good parts."""
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from edge_runtime.bundle import Bundle
from edge_runtime.pipeline import Pipeline
from edge_runtime.decode import ImageError, load_image
from export.cli import main as export_main
from export.dataset import DatasetError, train_images
from export.evaluate import evaluate


def test_wrong_layout_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetError, match=r"no good images found, neither in the folder itself nor in train/good \(missing\)\. Expected layout"):
        train_images(tmp_path)
    assert export_main(["fit", str(tmp_path), "--out", str(tmp_path / "b")]) == 2
    assert f"{tmp_path}: no good images found" in capsys.readouterr().err
    (tmp_path / "train" / "good").mkdir(parents=True)
    with pytest.raises(DatasetError, match="found 0 images"):
        train_images(tmp_path)


def test_a_mistyped_out_never_deletes_the_users_images_or_folders(tmp_path, capsys):
    """--out the training folder, a folder above it or inside it, or --overwrite on a folder that holds no
    bundle: refused before anything is written or deleted, naming the folder."""
    good = tmp_path / "project" / "good"
    good.mkdir(parents=True)
    for i in range(4):
        cv2.imwrite(str(good / f"{i}.png"), np.full((64, 64, 3), 40 * i, np.uint8))
    (tmp_path / "project" / "notes.txt").write_text("line 7 setup")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "photo.png").write_bytes(b"x")
    (tmp_path / "first").mkdir()
    (tmp_path / "first" / "manifest.yaml").write_text("bundle_id: x\n")
    (tmp_path / "current").symlink_to(tmp_path / "first")        # current -> first, as the docs lay bundles out
    cases = [(good, "is or contains the training folder"), (tmp_path / "project", "is or contains the training folder"),
             (tmp_path / "mine", "holds none"), (tmp_path / "current", "is a symlink")]
    for out, message in cases:
        assert export_main(["fit", str(good), "--out", str(out), "--overwrite"]) == 2
        assert message in capsys.readouterr().err
    assert sorted(p.name for p in good.iterdir()) == ["0.png", "1.png", "2.png", "3.png"]
    assert (tmp_path / "project" / "notes.txt").exists() and (tmp_path / "mine" / "photo.png").exists()
    assert (tmp_path / "first" / "manifest.yaml").exists(), "the bundle behind the link was deleted"


def test_bundle_manifest_pins_the_score(small_bundle):
    m = yaml.safe_load((small_bundle / "manifest.yaml").read_text())
    assert m["features"]["dim"] == 152 and m["features"]["grid"] == [32, 32]
    assert m["score"]["k"] == 1 and m["score"]["distance"] == "l2"
    # 224 x 224 frames are upsampled to the default 256 x 256 model pixels (geometry.DEFAULT_PIXELS).
    assert m["geometry"]["input_size"] == [256, 256] and m["geometry"]["region_size"] == [224, 224]
    assert m["geometry"]["size_policy"] == "refuse" and m["geometry"]["tiles"] == [[0, 0]]
    assert set(m["variants"]) == {"fp32", "int8"}
    for v in m["variants"].values():
        assert v["threshold"] > 0 and v["golden"] and v["threshold_info"]["good_scores"]["n"] == 40
        # every good image was scored against a bank built without it, and the threshold respects the bank's own
        assert len(v["cross_fit_scores"]) == 40
        assert v["threshold_info"]["cross_fit_method"] == "bank-minus-fold"
        assert v["threshold"] > v["threshold_info"]["bank_scores_max"]
        frr = v["threshold_info"]["expected_false_reject"]
        assert 0 <= frr["modelled_ci95"][0] <= frr["modelled"] <= frr["modelled_ci95"][1] <= 1
        assert v["model"] in m["files"] and v["index"] in m["files"]
    assert m["index"]["ef_search"] >= 1 and m["backbone"]["weights_sha256"]
    assert m["fit"]["cross_fit"]["method"] == "bank-minus-fold" and m["fit"]["cross_fit"]["folds"] == 5
    assert set(m["fit"]["stages"]) >= {"features", "coreset", "hnsw_build", "cross_fit"}
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
    cv2.imwrite(str(tmp_path / "gray.png"), gray)
    # Fitted on colour images: a grey frame cannot show what the bank holds (geometry.colour).
    assert pipe.geometry.colour == "colour"
    with pytest.raises(ImageError, match=r"gray\.png: the frame has no colour"):
        pipe.score_rgb(load_image(tmp_path / "gray.png"), str(tmp_path / "gray.png"))
    # The bundle was fitted on 224x224 frames: another size is refused unless the station relaxes the policy.
    cv2.imwrite(str(tmp_path / "odd.jpg"), cv2.cvtColor(odd, cv2.COLOR_RGB2BGR))
    with pytest.raises(ImageError, match=r"odd\.jpg: frame is 301x187 but the bundle was fitted on 224x224"):
        pipe.score_rgb(load_image(tmp_path / "odd.jpg"), str(tmp_path / "odd.jpg"))
    pipe.apply_overrides(size_policy="letterbox")
    s = pipe.score_rgb(load_image(tmp_path / "odd.jpg"))
    assert np.isfinite(s.score) and s.anomaly_map.shape == (187, 301)
    # A grayscale data set (like magnetic_tile) fits too.
    gray_set = tmp_path / "grayset"
    for sub in ("train/good",):
        (gray_set / sub).mkdir(parents=True)
    for i, p in enumerate(sorted((synthetic_dataset / "train" / "good").glob("*.png"))[:6]):
        g = cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2GRAY)
        cv2.imwrite(str(gray_set / "train" / "good" / f"{i}.jpg"), cv2.resize(g, (150 + 7 * i, 230)))
    assert export_main(["fit", str(gray_set), "--out", str(tmp_path / "gb"), "--coreset-ratio", "0.2"]) == 0
    gb = Bundle.load(tmp_path / "gb")
    assert gb.variant("int8").threshold > 0
    # Varied sizes: no size is refused, every frame is resampled to the canvas as the bank was; aspect kept
    # from the median of the training images (about 0.75 here), not squashed to a square.
    g = gb.geometry
    assert g.region_size is None and g.size_policy == "resize"
    assert g.input_size[0] < g.input_size[1]
    # Fitted on grey images: a colour camera's frame is inspected as its grey version.
    assert g.colour == "grey"
    grey_pipe = Pipeline(gb, "fp32", "exact")
    assert grey_pipe.score_rgb(rgb).score == grey_pipe.score_rgb(cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB)).score


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


def test_evaluate_scores_pixels_only_where_a_mask_says_where_the_defect_is(small_bundle, synthetic_dataset, tmp_path):
    data = tmp_path / "set"
    shutil.copytree(synthetic_dataset, data)
    full = evaluate(small_bundle, data)
    masks = sorted((data / "ground_truth").rglob("*_mask.png"))
    missing = masks[:3]
    for m in missing:
        m.unlink()
    partial = evaluate(small_bundle, data)
    assert partial["pixel_auroc_note"].startswith(f"over {full['n_defect'] - 3} of {full['n_defect']} defect images: 3 have no")
    assert full["pixel_auroc_note"] is None and partial["pixel_auroc"] is not None
    cv2.imwrite(str(masks[3]), np.zeros((10, 12), np.uint8))        # a mask of another size: an error naming it
    with pytest.raises(ValueError, match=f"{masks[3].name}: ground-truth mask is 12x10"):
        evaluate(small_bundle, data)


def test_ground_truth_masks_mark_every_nonzero_pixel_whatever_their_encoding(tmp_path):
    """0/255 (MVTec AD), 0/1 and class-label masks (other sets), 16-bit and colour masks: the same defect pixels.
    A > 127 cut had read 0/1 masks as all background (pixel AUROC of nothing but good pixels)."""
    from export.evaluate import load_mask

    want = np.zeros((10, 12), bool)
    want[2:5, 3:9] = True
    encodings = {"0-255": want.astype(np.uint8) * 255, "0-1": want.astype(np.uint8),
                 "label-3": want.astype(np.uint8) * 3, "16-bit-0-1": want.astype(np.uint16),
                 "16-bit-0-65535": want.astype(np.uint16) * 65535,
                 "red": np.dstack([np.zeros_like(want, np.uint8)] * 2 + [want.astype(np.uint8) * 255]),
                 "grey-opaque-alpha": np.dstack([want.astype(np.uint8) * 255] * 3 + [np.full(want.shape, 255, np.uint8)])}
    for name, mask in encodings.items():
        path = tmp_path / f"{name}_mask.png"
        assert cv2.imwrite(str(path), mask)
        assert np.array_equal(load_mask(path, want.shape), want), name
    assert np.array_equal(load_mask(tmp_path / "0-1_mask.png", (3, 6), (3, 2, 6, 3)), want[2:5, 3:9])   # an ROI


def test_evaluate_reads_0_1_masks_as_it_reads_0_255_ones(small_bundle, synthetic_dataset, tmp_path):
    data = tmp_path / "set"
    shutil.copytree(synthetic_dataset, data)
    want = evaluate(small_bundle, data, "onnx-fp32", "exact")["pixel_auroc"]
    for path in (data / "ground_truth").rglob("*_mask.png"):
        m = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert set(np.unique(m)) <= {0, 255}
        assert cv2.imwrite(str(path), (m > 0).astype(np.uint8))     # the same masks stored as 0/1
    got = evaluate(small_bundle, data, "onnx-fp32", "exact")["pixel_auroc"]
    assert got == want and want > 0.8


def test_evaluate_scores_the_variant_the_station_runs_unless_told_otherwise(small_bundle, synthetic_dataset, tmp_path):
    """fit may choose FP32 as the default variant; evaluate's default engine follows it (probe 34: an INT8
    evaluation of an FP32 bundle reported an operating point no station had)."""
    import yaml

    from edge_runtime.bundle import MANIFEST, content_id

    copy = tmp_path / "b"
    shutil.copytree(small_bundle, copy)
    m = yaml.safe_load((copy / MANIFEST).read_text())
    assert m["default_variant"] == "int8"
    assert evaluate(copy, synthetic_dataset)["engine"] == "onnx-int8"
    m["default_variant"] = "fp32"
    m["bundle_id"] = content_id(m)
    (copy / MANIFEST).write_text(yaml.safe_dump(m, sort_keys=False))
    fp32 = evaluate(copy, synthetic_dataset)
    assert fp32["engine"] == "onnx-fp32" and fp32["threshold"] == m["variants"]["fp32"]["threshold"]
    assert evaluate(copy, synthetic_dataset, "onnx-int8")["engine"] == "onnx-int8"


def test_verify_cli_detects_a_modified_file(small_bundle, tmp_path, capsys):
    assert export_main(["verify", str(small_bundle)]) == 0
    copy = tmp_path / "b"
    shutil.copytree(small_bundle, copy)
    data = bytearray((copy / "index_int8.hnsw").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "index_int8.hnsw").write_bytes(bytes(data))
    assert export_main(["verify", str(copy)]) == 1
    assert "index_int8.hnsw" in capsys.readouterr().err


def test_default_variant_falls_back_to_fp32_only_when_defects_say_so():
    from export.fit import choose_default_variant

    assert choose_default_variant("int8", {})[0] == "int8"
    assert choose_default_variant("int8", {"int8": 0.996, "fp32": 1.0})[0] == "int8"
    name, reason = choose_default_variant("int8", {"int8": 0.95, "fp32": 0.99})
    assert name == "fp32" and "0.9500" in reason


def test_backbone_choice_keeps_the_faster_one_unless_another_separates_defects_better():
    from export.fit import BACKBONE_TOLERANCE, choose_backbone

    assert choose_backbone({"lite0": 1.0, "lite2": 1.0})[0] == "lite0"
    assert choose_backbone({"lite0": 0.95, "lite2": 0.95 + BACKBONE_TOLERANCE / 2})[0] == "lite0"
    name, reason = choose_backbone({"lite0": 0.90, "lite2": 0.93})
    assert name == "lite2" and "lite0 0.9000" in reason and "lite2 0.9300" in reason
    assert choose_backbone({"lite0": 0.97, "lite2": None})[0] == "lite0"


def test_seeded_width_is_the_cheapest_within_the_walk_from_the_top_or_the_tolerance():
    from export.fit import EF_SEEDED_CANDIDATES, choose_ef_seeded

    assert choose_ef_seeded({"top": 0.02, 4: 0.0017, 6: 0.0008, 8: 0.0006}, 8)[0] == 4          # bottle-like
    assert choose_ef_seeded({"top": 0.0015, 4: 0.008, 6: 0.0048, 8: 0.0032}, 8)[0] == 8        # tile-like: none
    assert choose_ef_seeded({"top": 0.005, 4: 0.008, 6: 0.005, 8: 0.003}, 8)[0] == 6            # a tie counts
    # A small bank: the walk from the top is all but exact; a width within the tolerance is still taken ...
    assert choose_ef_seeded({"top": 0.0, 4: 0.0015, 6: 0.0003, 8: 0.00003}, 8)[0] == 4
    assert choose_ef_seeded({"top": 0.0, 4: 0.003, 6: 0.002, 8: 0.0001}, 8)[0] == 6
    # ... and none outside it (magnetic tile's 6: 0.26%, which costs it pixel AUROC)
    assert choose_ef_seeded({"top": 0.0, 4: 0.004, 6: 0.0026, 8: 0.0021}, 8)[0] == 8
    assert "no width" in choose_ef_seeded({"top": 0.0, 4: 0.004, 6: 0.0026, 8: 0.0021}, 8)[1]
    assert EF_SEEDED_CANDIDATES == tuple(sorted(EF_SEEDED_CANDIDATES))                            # cheapest first
    assert choose_ef_seeded({"top": 0.0, 4: 0.1, 6: 0.1, 8: 0.1}, 10)[0] == 10                  # a user's own default


def test_fit_records_the_seeded_width_it_chose_and_the_runtime_uses_it(small_bundle):
    from export.fit import EF_SEEDED_CANDIDATES, choose_ef_seeded

    b = Bundle.load(small_bundle)
    choice = b.manifest["fit"]["ef_seeded_choice"]
    excess = {("top" if k == "top" else int(k)): v for k, v in choice["mean_excess"].items()}
    assert set(excess) == {"top", *EF_SEEDED_CANDIDATES} and all(v >= 0 for v in excess.values())
    assert choice["chosen"] == choose_ef_seeded(excess, 8)[0] == b.manifest["index"]["ef_seeded"]
    assert Pipeline(b).search.params.ef_seeded == choice["chosen"]


def test_auto_backbone_fits_each_candidate_on_the_users_defects_and_keeps_one(synthetic_dataset, tmp_path, capsys):
    """With calibration defects both backbones are fitted; one verified bundle is left, recording why."""
    from export.fit import BACKBONE_CANDIDATES, FitSettings, choose_backbone, fit

    defects = tmp_path / "defects"
    for kind in ("scratch", "dent"):
        (defects / kind).mkdir(parents=True)
        for p in sorted((synthetic_dataset / "test" / kind).glob("*.png"))[:2]:
            shutil.copy(p, defects / kind / p.name)
    out = tmp_path / "bundle"
    decoy = tmp_path / ".bundle.lite0.trial" / "photos" / "keep.jpg"   # the user's, named like an old trial folder
    decoy.parent.mkdir(parents=True)
    decoy.write_bytes(b"mine")
    bundle = fit(synthetic_dataset / "train" / "good", out, FitSettings(coreset_ratio=0.05, int8_calibration_images=8,
                                                                         cross_fit_folds=3),
                 calibration_defects=defects)
    assert decoy.read_bytes() == b"mine"
    decoy.parent.parent.rename(tmp_path / "decoy")
    choice = bundle.manifest["fit"]["backbone_choice"]
    assert set(choice["candidates"]) == set(BACKBONE_CANDIDATES) and choice["seconds_all_candidates"] > 0
    assert all(0.0 <= a <= 1.0 for a in choice["candidates"].values())
    assert choice["chosen"] == choose_backbone(choice["candidates"])[0] == bundle.manifest["backbone"]["name"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "decoy", "defects"]   # no trial left behind
    assert Bundle.load(out).bundle_id == bundle.bundle_id   # checksums and id hold after the choice was recorded
    assert "backbone auto:" in capsys.readouterr().err
    # Without overwrite the bundle stays.
    with pytest.raises(FileExistsError, match="use --overwrite"):
        fit(synthetic_dataset / "train" / "good", out, FitSettings(), calibration_defects=defects)
    assert Bundle.load(out).bundle_id == bundle.bundle_id


def test_auto_backbone_without_defects_is_lite0_in_one_fit(synthetic_dataset, tmp_path):
    from export.fit import FitSettings, fit

    bundle = fit(synthetic_dataset / "train" / "good", tmp_path / "b",
                 FitSettings(coreset_ratio=0.02, int8_calibration_images=8, cross_fit_folds=0, max_train=12))
    assert bundle.manifest["backbone"]["name"] == "lite0" and "backbone_choice" not in bundle.manifest["fit"]


def test_the_same_images_and_settings_give_the_same_graphs(synthetic_dataset, tmp_path):
    """Each variant's HNSW graph is built on one thread (both variants at once): a refit reproduces it byte for
    byte, so two bundles of one product differ only where their data or settings do."""
    from export.fit import FitSettings, fit

    settings = FitSettings(coreset_ratio=0.05, input_size=(96, 96), int8_calibration_images=8, cross_fit_folds=0)
    a, b = tmp_path / "a", tmp_path / "b"
    fit(synthetic_dataset, a, settings)
    fit(synthetic_dataset, b, settings)
    for name in ("index_fp32.hnsw", "index_int8.hnsw"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_colour_is_pinned_by_the_training_images_and_strays_follow_the_majority():
    from edge_runtime.geometry import Geometry
    from export.fit import pin_colour
    g = Geometry((64, 64), (64, 64), ((0, 0),))
    paths = [Path(f"{i}.png") for i in range(4)]
    geom, odd, note = pin_colour(g, paths, [True] * 4)
    assert geom.colour == "grey" and odd == [] and not note.startswith("WARNING")
    geom, odd, note = pin_colour(g, paths, [False] * 4)
    assert geom.colour == "colour" and odd == [] and not note.startswith("WARNING")
    geom, odd, note = pin_colour(g, paths, [False, True, False, False])
    assert geom.colour == "colour" and odd == [1]
    assert note.startswith("WARNING: 1 of 4 training images is grey (R = G = B; first: 1.png), the rest colour")
    assert "that one left out of the bank" in note
    geom, odd, note = pin_colour(g, paths, [True, False, True, False])      # a tie: grey loses no image
    assert geom.colour == "grey" and odd == [1, 3] and "2 of 4 training images are in colour (first: 1.png)" in note
    assert "those converted to grey" in note


def test_a_mixed_training_set_fits_and_a_failed_fit_leaves_nothing_behind(synthetic_dataset, tmp_path):
    data = tmp_path / "mixed" / "train" / "good"
    data.mkdir(parents=True)
    for i, p in enumerate(sorted((synthetic_dataset / "train" / "good").glob("*.png"))[:9]):
        img = cv2.imread(str(p))
        cv2.imwrite(str(data / f"{i}.png"), cv2.cvtColor(img, cv2.COLOR_BGR2GRAY) if i % 3 == 1 else img)
    (tmp_path / "mb").mkdir()                                 # an empty folder is a fine --out
    assert export_main(["fit", str(data.parent.parent), "--out", str(tmp_path / "mb"), "--coreset-ratio", "0.2"]) == 0
    m = Bundle.load(tmp_path / "mb").manifest
    assert m["geometry"]["colour"] == "colour"
    assert m["fit"]["bank_images"] == [f"{i}.png" for i in range(9) if i % 3 != 1]       # the grey strays left out
    assert any(n.startswith("WARNING: 3 of 9 training images are grey") for n in m["geometry"]["chosen"]["notes"])
    # A fit that fails half-way removes the folder it made, so a rerun needs no manual clean-up.
    whole = (data / "0.png").read_bytes()
    (data / "9.png").write_bytes(whole[:len(whole) // 2])      # its header reads, its pixels fail to decode later
    assert export_main(["fit", str(data.parent.parent), "--out", str(tmp_path / "failed")]) != 0
    assert not (tmp_path / "failed").exists()
    # ... and one that was to replace a bundle leaves that bundle as it was.
    before = Bundle.load(tmp_path / "mb").bundle_id
    assert export_main(["fit", str(data.parent.parent), "--out", str(tmp_path / "mb"), "--overwrite"]) != 0
    assert Bundle.load(tmp_path / "mb").bundle_id == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mb", "mixed"]       # no staging folder left


def test_a_bundle_fitted_on_12_bit_data_reads_12_bit_frames_as_fit_did(synthetic_dataset, tmp_path):
    from edge_runtime.decode import ImageError, to_rgb
    from edge_runtime.records import Frame
    data = tmp_path / "twelve" / "train" / "good"
    data.mkdir(parents=True)
    for i, p in enumerate(sorted((synthetic_dataset / "train" / "good").glob("*.png"))[:8]):
        cv2.imwrite(str(data / f"{i}.png"), cv2.imread(str(p)).astype(np.uint16) * 16)   # 0-4080: 12-bit values
    assert export_main(["fit", str(data.parent.parent), "--out", str(tmp_path / "b12"), "--coreset-ratio", "0.2"]) == 0
    bundle = Bundle.load(tmp_path / "b12")
    assert bundle.shift_16bit == 4 and bundle.manifest["preprocessing"]["shift_16bit"] == 4
    assert bundle.manifest["schema_version"] == 4      # a runtime that reads only 3 refuses it
    pipe = Pipeline(bundle, "fp32", "exact")
    part = cv2.imread(str(sorted((synthetic_dataset / "test" / "good").glob("*.png"))[0]))
    as_8 = pipe.inspect(Frame(frame_id=1, source="cam", image=part))
    as_12 = pipe.inspect(Frame(frame_id=2, source="cam", image=part.astype(np.uint16) * 16))
    assert as_8.verdict.value == "OK" and as_12.score == as_8.score
    ok, png16 = cv2.imencode(".png", part.astype(np.uint16) * 16)
    assert pipe.inspect(Frame(frame_id=3, source="cam", encoded=png16.tobytes())).score == as_8.score
    # What the top byte (the default) would make of these frames: nearly black (0-15), refused as such.
    with pytest.raises(ImageError, match="brightest pixel is 15 of 255"):
        to_rgb(part.astype(np.uint16) * 16)
    assert "WARNING" not in " ".join(bundle.manifest["geometry"]["chosen"]["notes"])
    # The golden images are the 16-bit files as they arrive, so the self-test reads them through the pin: a
    # manifest whose shift was changed (and its id recomputed) no longer reproduces their scores.
    golden = bundle.path(bundle.variant().golden[0]["file"])
    assert cv2.imread(str(golden), cv2.IMREAD_UNCHANGED).dtype == np.uint16
    from edge_runtime.bundle import MANIFEST, content_id
    from edge_runtime.self_test import run_self_test
    assert run_self_test(tmp_path / "b12").ok
    m = yaml.safe_load((tmp_path / "b12" / MANIFEST).read_text())
    m["preprocessing"]["shift_16bit"] = 8
    m["bundle_id"] = content_id(m)
    (tmp_path / "b12" / MANIFEST).write_text(yaml.safe_dump(m, sort_keys=False))
    report = run_self_test(tmp_path / "b12")
    assert not report.ok and any("golden" in f for f in report.failures), report


def test_evaluate_faults_what_the_station_frame_check_faults(small_bundle, synthetic_dataset, tmp_path):
    """A test image the station's frame check refuses (a lamp at 30%) is a FAULT in evaluate too, not a score and a
    verdict no station gives (probe 69: evaluate scored it NG or OK while Pipeline.inspect and the daemon faulted it)."""
    from edge_runtime.records import Frame, Verdict

    data = tmp_path / "set"
    shutil.copytree(synthetic_dataset / "test", data / "test")
    dim = sorted((data / "test" / "good").glob("*.png"))[0]
    cv2.imwrite(str(dim), (cv2.imread(str(dim)) * 0.3).astype(np.uint8))
    station = Pipeline(Bundle.load(small_bundle), precision="int8").inspect(
        Frame(frame_id=0, source=str(dim), encoded=dim.read_bytes()))
    assert station.verdict is Verdict.FAULT and "frame check" in station.error, station
    r = evaluate(small_bundle, data, "onnx-int8", "hnsw")
    assert [Path(f["file"]).name for f in r["faults"]] == [dim.name]
    assert "frame check: frame brightness" in r["faults"][0]["error"]
    assert r["operating_point"]["good"]["fault"]["count"] == 1


def test_evaluate_counts_images_the_station_would_fault_as_rejected_and_lists_them(small_bundle, synthetic_dataset,
                                                                                    tmp_path):
    data = tmp_path / "set"
    shutil.copytree(synthetic_dataset / "test", data / "test")
    good = sorted((data / "test" / "good").glob("*.png"))[0]
    cv2.imwrite(str(good), cv2.cvtColor(cv2.imread(str(good)), cv2.COLOR_BGR2GRAY))      # no colour: FAULT
    scratches = sorted((data / "test" / "scratch").glob("*.png"))
    for scratch in scratches:                                                          # another size: FAULT
        cv2.imwrite(str(scratch), cv2.resize(cv2.imread(str(scratch)), (200, 150)))
    r = evaluate(small_bundle, data, "onnx-int8", "hnsw", report_dir=tmp_path / "report")
    assert sorted(Path(f["file"]).name for f in r["faults"]) == sorted([good.name] + [p.name for p in scratches])
    assert any("no colour" in f["error"] for f in r["faults"]) and any("200x150" in f["error"] for f in r["faults"])
    assert r["image_auroc"] == 1.0                                   # over the images that were inspected
    assert r["per_defect"]["scratch"] is None                        # none of them was
    op = r["operating_point"]
    assert op["good"]["false_rejects"]["count"] >= 1 and op["good"]["fault"]["count"] == 1   # faulted: not passed
    # Not escapes, and not caught either: counted apart, so the row cannot read as every scratch found.
    row = op["defects"]["scratch"]
    assert row["escapes"]["count"] == 0 and row["ng"]["count"] == 0 and row["fault"]["count"] == len(scratches)
    assert {row["file"]: row["score"] for row in r["images"]}[str(good)] is None
    assert "could not be inspected" in (tmp_path / "report" / "report.html").read_text()
