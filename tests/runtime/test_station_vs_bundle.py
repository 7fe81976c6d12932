"""What the station file overrides (ROI, size policy, review threshold) must suit its bundle: refused by
`validate` and at load, naming the station file's key, instead of a station that starts and faults every part."""
from __future__ import annotations

from pathlib import Path

import pytest
from extras import require
import yaml

from edge_runtime.bundle import Bundle, StationMismatch, write_manifest
from edge_runtime.bundle_loader import check_station_against, load_pipeline
from edge_runtime.cli import main as runtime_main
from edge_runtime.config import load_station


def station(tmp_path: Path, bundle: Path, **keys) -> Path:
    out = tmp_path / "station.yaml"
    (tmp_path / "frames").mkdir(exist_ok=True)
    assert runtime_main(["init", "--bundle", str(bundle), "--source", f"folder:{tmp_path / 'frames'}",
                         "--out", str(out), "--force"]) == 0
    doc = yaml.safe_load(out.read_text())
    for key, value in keys.items():
        if "." in key:
            section, name = key.split(".")
            doc[section][name] = value
        else:
            doc[key] = value
    out.write_text(yaml.safe_dump(doc))
    return out


def test_init_writes_the_override_keys_and_validate_checks_them_against_the_bundle(small_bundle, tmp_path, capsys):
    out = station(tmp_path, small_bundle)
    assert {"roi", "size_policy"} <= set(yaml.safe_load(out.read_text()))
    assert "review_threshold" in yaml.safe_load(out.read_text())["inference"]
    assert runtime_main(["validate", str(out)]) == 0
    assert "not checked" not in capsys.readouterr().out          # the bundle was read and checked


def test_an_roi_of_another_size_is_invalid_under_refuse(small_bundle, tmp_path, capsys):
    w, h = Bundle.load(small_bundle).geometry.region_size
    out = station(tmp_path, small_bundle, roi=[0, 0, w - 16, h])
    capsys.readouterr()
    assert runtime_main(["validate", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"roi: {w - 16}x{h}, but the bundle was fitted on a {w}x{h} whole frame" in err and "every frame" in err
    with pytest.raises(StationMismatch, match=r"^station file roi:"):
        load_pipeline(load_station(out))
    # resampling the ROI is the user's explicit choice: accepted
    check_station_against(load_station(station(tmp_path, small_bundle, roi=[0, 0, w - 16, h], size_policy="resize")),
                          Bundle.load(small_bundle, verify=False))


def test_a_review_threshold_above_the_threshold_names_the_station_file(small_bundle, tmp_path, capsys):
    threshold = Bundle.load(small_bundle).variant().threshold
    out = station(tmp_path, small_bundle, **{"inference.review_threshold": threshold * 2})
    capsys.readouterr()
    assert runtime_main(["validate", str(out)]) == 2
    assert "station file inference.review_threshold" in capsys.readouterr().err


def test_a_station_at_fault_for_its_file_says_so(small_bundle, tmp_path):
    from edge_runtime.line import Line

    w, h = Bundle.load(small_bundle).geometry.region_size
    cfg = load_station(station(tmp_path, small_bundle, roi=[0, 0, w, h - 16]))
    line = Line.__new__(Line)
    line.cfg = cfg
    reason = line._load_failure(StationMismatch("station file roi: x"))
    assert reason.startswith("station file roi: x (bundle ")
    assert line._load_failure(RuntimeError("sha256 mismatch")).startswith(f"bundle {cfg.bundle}: ")


def test_validate_checks_every_recipe_bundle_not_only_the_first(small_bundle, tmp_path, capsys):
    """A recipe whose bundle cannot take the station file's size_policy would fault the line at its switch."""
    import shutil

    varied = tmp_path / "varied"
    shutil.copytree(small_bundle, varied)
    manifest = yaml.safe_load((varied / "manifest.yaml").read_text())
    manifest["geometry"].update(region_size=None, size_policy="resize")   # as a fit on images of varied sizes
    write_manifest(varied, manifest)
    out = station(tmp_path, small_bundle, size_policy="letterbox",
                  recipes={"recipes": [{"name": "a", "number": 1, "bundle": str(small_bundle)},
                                       {"name": "b", "number": 2, "bundle": str(varied)}]})
    doc = yaml.safe_load(out.read_text())
    del doc["bundle"]                                                     # a station with recipes names them there
    out.write_text(yaml.safe_dump(doc))
    capsys.readouterr()
    assert runtime_main(["validate", str(out)]) == 2
    err = capsys.readouterr().err
    assert "recipe b: station file size_policy: 'letterbox'" in err and str(varied) in err


@pytest.mark.parametrize("case", ["damaged", "unsigned", "product", "older", "recipe-product"])
def test_validate_refuses_what_the_daemon_would_refuse(small_bundle, tmp_path, capsys, case):
    """validate had said valid for a bundle with a broken signature, another product or a version below the floor,
    and the daemon then started in FAULT."""
    import json
    import shutil

    if case == "unsigned":
        require("cryptography", "sign")          # it writes a station key
    bundle = tmp_path / "b"
    shutil.copytree(small_bundle, bundle)
    keys: dict = {}
    expected = {"damaged": "does not match the manifest", "unsigned": "signature", "product": "security.product",
                "older": "lower than", "recipe-product": "recipe second: the daemon would refuse"}[case]
    if case == "damaged":
        model = next(bundle.glob("*.onnx"))
        model.write_bytes(model.read_bytes()[:-1] + b"\0")
    elif case == "unsigned":
        from export.signing import generate_keypair

        _, public = generate_keypair(tmp_path / "keys")
        keys["security"] = {"bundle_public_key": str(public)}
    elif case == "product":
        keys["security"] = {"product": "another-part"}
    elif case == "older":
        state = tmp_path / "state"
        state.mkdir()
        version = yaml.safe_load((bundle / "manifest.yaml").read_text())["bundle_version"]
        (state / "bundle_version.json").write_text(json.dumps({"bundle_version": version + 1}))
        keys["state_dir"] = str(state)
    out = station(tmp_path, bundle, **keys)
    if case == "recipe-product":
        doc = yaml.safe_load(out.read_text())
        del doc["bundle"]
        doc["recipes"] = {"recipes": [{"name": "first", "number": 1, "bundle": str(bundle)},
                                      {"name": "second", "number": 2, "bundle": str(bundle), "product": "other"}]}
        out.write_text(yaml.safe_dump(doc))
    capsys.readouterr()
    assert runtime_main(["validate", str(out)]) == 2
    err = capsys.readouterr().err
    assert expected in err and str(bundle) in err, err


def test_validate_checks_the_bundle_a_committed_rollout_put_in_service(small_bundle, tmp_path, capsys):
    """After a rollout committed v2 the station file still names v1, below the floor; the daemon starts on v2, and
    validate had called the healthy station invalid (advising allow_downgrade: true)."""
    import json
    import shutil

    from edge_runtime.rollout import ROLLOUT_STATE_FILE

    v1 = tmp_path / "v1"
    shutil.copytree(small_bundle, v1)
    v2 = tmp_path / "state" / "rollout" / "v2"
    shutil.copytree(small_bundle, v2)
    manifest = yaml.safe_load((v2 / "manifest.yaml").read_text())
    manifest["bundle_version"] += 1
    write_manifest(v2, manifest)
    state = tmp_path / "state"
    (state / "bundle_version.json").write_text(json.dumps({"bundle_version": manifest["bundle_version"]}))
    (state / ROLLOUT_STATE_FILE).write_text(json.dumps({"active": str(v2), "status": "committed"}))
    out = station(tmp_path, v1, state_dir=str(state), rollout={"enabled": True, "allow_unsigned": True})
    capsys.readouterr()
    assert runtime_main(["validate", str(out)]) == 0, capsys.readouterr().err
    (state / ROLLOUT_STATE_FILE).unlink()                      # without the rollout's record: v1 is below the floor
    assert runtime_main(["validate", str(out)]) == 2
    assert "lower than" in capsys.readouterr().err


def test_a_station_may_widen_the_bundles_review_band_never_narrow_it(small_bundle, tmp_path):
    """The bundle's band may be where fit put calibration defects it could not make NG (--max-frr): a station
    file's higher review_threshold (a leftover) made 4 of 5 of them OK (probe 38)."""
    import shutil

    from edge_runtime.bundle import MANIFEST, content_id

    copy = tmp_path / "bundle"
    shutil.copytree(small_bundle, copy)
    m = yaml.safe_load((copy / MANIFEST).read_text())
    threshold = m["variants"]["int8"]["threshold"]
    m["variants"]["int8"]["review_threshold"] = threshold * 0.8
    m["bundle_id"] = content_id(m)
    (copy / MANIFEST).write_text(yaml.safe_dump(m, sort_keys=False))
    bundle = Bundle.load(copy)
    narrower = load_station(station(tmp_path, copy, **{"inference.review_threshold": threshold * 0.9}))
    with pytest.raises(StationMismatch, match=r"inference.review_threshold: .* is above the bundle's int8 REVIEW "
                                              r"band, which starts at .*: parts between them would be OK"):
        check_station_against(narrower, bundle)
    wider = load_station(station(tmp_path, copy, **{"inference.review_threshold": threshold * 0.7}))
    check_station_against(wider, bundle)


def test_a_precision_the_bundle_does_not_hold_is_invalid(device_bundle, tmp_path, capsys):
    """Probe 66: `inference.precision: fp32` on an int8-only bundle was "valid" at validate, and the daemon then
    answered every part FAULT ("no variant 'fp32'")."""
    variants = set(Bundle.load(device_bundle, verify=False).manifest["variants"])
    missing = next(p for p in ("fp32", "int8") if p not in variants)
    out = station(tmp_path, device_bundle, **{"inference.precision": missing})
    capsys.readouterr()
    assert runtime_main(["validate", str(out)]) == 2
    assert "station file inference.precision" in capsys.readouterr().err
    with pytest.raises(StationMismatch, match=r"^station file inference.precision:"):
        load_pipeline(load_station(out))
