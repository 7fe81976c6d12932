"""Rollback and product binding: a genuine but older bundle, or one for another product, is refused."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from extras import require

from edge_runtime.bundle import Bundle, BundleError
from edge_runtime.bundle_policy import VERSION_STATE_FILE
from edge_runtime.config import StationConfig
from edge_runtime.daemon import load_pipeline
from edge_runtime.schema import from_mapping


def station(root: Path, state_dir: Path | None = None, source: dict | None = None, **security) -> StationConfig:
    data = {"bundle": str(root), "source": source or {"type": "scripted"}, "security": security}
    if state_dir is not None:
        data["state_dir"] = str(state_dir)
    return from_mapping(StationConfig, data, "test")


def release(editor, version: int | None, product: str | None = "flange") -> None:
    m = editor.manifest()
    for key, value in (("bundle_version", version), ("product", product)):
        if value is None:
            m.pop(key, None)
        else:
            m[key] = value
    editor.save(m)


def test_exporter_records_product_and_version(small_bundle):
    bundle = Bundle.load(small_bundle)
    assert isinstance(bundle.bundle_version, int) and bundle.bundle_version > 0
    assert isinstance(bundle.product, str) and bundle.product


def test_older_version_is_refused_at_start_and_after_restart(editor, tmp_path):
    state = tmp_path / "state"
    release(editor, 5)
    assert load_pipeline(station(editor.root, state)).bundle.bundle_version == 5
    record = json.loads((state / VERSION_STATE_FILE).read_text())
    assert record["bundle_version"] == 5 and [(f["bundle_version"], f["product"]) for f in record["floors"]] == \
        [(5, "flange")]
    release(editor, 4)                                          # the old release, checksums intact
    with pytest.raises(BundleError, match=r"bundle_version 4 is lower than 5, the highest this station has loaded"):
        load_pipeline(station(editor.root, state))              # a fresh process reads the floor from state_dir
    release(editor, 6)
    assert load_pipeline(station(editor.root, state)).bundle.bundle_version == 6
    assert json.loads((state / VERSION_STATE_FILE).read_text())["bundle_version"] == 6


def test_signed_older_bundle_is_refused(editor, tmp_path):
    require("cryptography", "sign")
    from export.signing import generate_keypair, sign_bundle

    private, public = generate_keypair(tmp_path / "keys")
    state = tmp_path / "state"
    release(editor, 7)
    sign_bundle(editor.root, private)
    load_pipeline(station(editor.root, state, bundle_public_key=str(public)))
    release(editor, 3)
    sign_bundle(editor.root, private)                          # genuinely signed by the same key
    with pytest.raises(BundleError, match=r"bundle_version 3 is lower than 7"):
        load_pipeline(station(editor.root, state, bundle_public_key=str(public)))


def test_reload_never_goes_below_the_bundle_in_service_even_without_state(editor):
    release(editor, 9)
    current = load_pipeline(station(editor.root)).bundle
    release(editor, 8)
    with pytest.raises(BundleError, match=r"bundle_version 8 is lower than 9, .*in service"):
        load_pipeline(station(editor.root), current)


def test_allow_downgrade_accepts_an_older_release(editor, tmp_path):
    state = tmp_path / "state"
    release(editor, 5)
    load_pipeline(station(editor.root, state))
    release(editor, 2)
    assert load_pipeline(station(editor.root, state, allow_downgrade=True)).bundle.bundle_version == 2
    # The record keeps the highest version loaded.
    assert json.loads((state / VERSION_STATE_FILE).read_text())["bundle_version"] == 5


def test_bundle_for_another_product_is_refused(editor):
    release(editor, 5, product="bracket")
    with pytest.raises(BundleError, match=r"bundle is for product 'bracket'; this station inspects security.product 'flange'"):
        load_pipeline(station(editor.root, product="flange"))
    release(editor, 5, product="flange")
    assert load_pipeline(station(editor.root, product="flange")).bundle.product == "flange"


def test_older_bundle_format_is_accepted_only_where_nothing_asks_for_more(editor, tmp_path):
    release(editor, None, product=None)
    assert load_pipeline(station(editor.root)).bundle.bundle_version is None
    with pytest.raises(BundleError, match="bundle has no product"):
        load_pipeline(station(editor.root, product="flange"))
    state = tmp_path / "state"
    state.mkdir()
    (state / VERSION_STATE_FILE).write_text(json.dumps({"bundle_version": 5}))
    with pytest.raises(BundleError, match=r"bundle has no bundle_version .* has loaded bundle_version 5"):
        load_pipeline(station(editor.root, state))


def test_unreadable_version_record_is_refused_not_ignored(editor, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / VERSION_STATE_FILE).write_text("{torn")
    release(editor, 5)
    with pytest.raises(BundleError, match=rf"{VERSION_STATE_FILE}: the recorded bundle version is unreadable"):
        load_pipeline(station(editor.root, state))


@pytest.mark.parametrize("key, value", [("bundle_version", -1), ("bundle_version", "5"), ("bundle_version", True),
                                        ("product", ""), ("product", 5)])
def test_bad_version_or_product_in_manifest_is_refused(editor, key, value):
    m = editor.manifest()
    m[key] = value
    editor.save(m)
    with pytest.raises(BundleError, match=rf"manifest.yaml: {key} must be"):
        Bundle.load(editor.root)


def test_daemon_refuses_a_rollback_on_reload_and_keeps_inspecting(editor, tmp_path):
    """SIGHUP with an older release in place: the station keeps the verified newer bundle."""
    from edge_runtime.daemon import Station

    release(editor, 5)
    cfg = station(editor.root, tmp_path / "state")
    st = Station(cfg, outputs=[])
    assert st._load() and st.pipeline.bundle.bundle_version == 5
    release(editor, 4)
    st._reload_worker()
    st._apply_reload()
    assert st.pipeline.bundle.bundle_version == 5 and st.counters.reload_failures == 1


def lines_station(root: Path, state_dir: Path, names: list[str], cameras: list[str] | None = None,
                  **security) -> list[StationConfig]:
    """The configs each line of a `lines:` station runs (one per name, all on `root`; each on the camera of the
    same place in `cameras`, else all on the one camera a single-line station() has)."""
    from edge_runtime.lines_config import line_station_configs

    cameras = cameras or ["scripted"] * len(names)
    data = {"bundle": str(root), "state_dir": str(state_dir), "security": security,
            "lines": [{"name": n, "source": {"type": "folder", "path": f"/frames/{cam}"} if cam != "scripted"
                       else {"type": "scripted"}} for n, cam in zip(names, cameras)]}
    return [c for _, c in line_station_configs(from_mapping(StationConfig, data, "test"))]


def single_line(root: Path, state_dir: Path, source: dict | None = None, **security) -> StationConfig:
    from edge_runtime.lines_config import line_station_configs

    ((_, cfg),) = line_station_configs(station(root, state_dir, source, **security))
    return cfg


def test_restructuring_the_station_file_keeps_the_floor(editor, tmp_path):
    """Each line keeps its floor in state_dir/lines/<name>: a station rewritten with `lines:`, a line renamed, or
    the old file restored must not start that camera with no floor, or with its folder's older one (probe 33:
    207 parts passed by an older bundle after a rewrite; probe 36: after restoring the old file)."""
    state = tmp_path / "state"
    release(editor, 5)
    load_pipeline(single_line(editor.root, state))
    release(editor, 4)                                          # the older release, checksums intact
    (cam1,) = lines_station(editor.root, state, ["cam1"])
    with pytest.raises(BundleError, match=r"bundle_version 4 is lower than 5, the highest this station has loaded "
                                          rf"\({state / VERSION_STATE_FILE}, recorded for this camera and product under another"):
        load_pipeline(cam1)
    release(editor, 6)
    load_pipeline(cam1)
    assert json.loads((state / "lines" / "cam1" / VERSION_STATE_FILE).read_text())["bundle_version"] == 6
    release(editor, 5)
    (cam2,) = lines_station(editor.root, state, ["cam2"])         # cam1 renamed: its floor is cam2's
    with pytest.raises(BundleError, match=r"bundle_version 5 is lower than 6, .*lines/cam1/bundle_version.json"):
        load_pipeline(cam2)
    # The old single-line file restored: its folder's own floor (5) is older than what the camera has run (6).
    with pytest.raises(BundleError, match=r"bundle_version 5 is lower than 6, .*lines/cam1/bundle_version.json"):
        load_pipeline(single_line(editor.root, state))
    release(editor, 7)
    assert load_pipeline(single_line(editor.root, state)).bundle.bundle_version == 7


def test_cameras_of_one_product_keep_independent_floors_whatever_the_layout(editor, tmp_path):
    """Two cameras of one product have bundles numbered independently: one camera's floor is never another's,
    whether both are new lines or one was the station's single line before (probe 36: the old root floor blocked
    a new second camera)."""
    state = tmp_path / "state"
    release(editor, 9)
    load_pipeline(single_line(editor.root, state, {"type": "folder", "path": "/frames/top"}))
    top, side = lines_station(editor.root, state, ["top", "side"], cameras=["top", "side"])
    release(editor, 3)
    assert load_pipeline(side).bundle.bundle_version == 3     # the new camera's own series
    with pytest.raises(BundleError, match=r"bundle_version 3 is lower than 9"):
        load_pipeline(top)                                      # the old single line's camera keeps its floor


def test_a_camera_spelled_another_way_keeps_its_floor(editor, tmp_path):
    """Probe 38: device 0 in the old single-line file and /dev/video0 or a /dev/v4l/by-id link in the new `lines:`:
    an index is /dev/videoN; a spelling that still differs (the by-id link, kept as written so that a reboot's
    re-enumeration cannot swap cameras, probe 40) names a camera no line uses now, and its floor counts."""
    from edge_runtime.lines_config import line_station_configs

    state = tmp_path / "state"
    release(editor, 5)
    load_pipeline(single_line(editor.root, state, {"type": "camera", "device": 0}))
    release(editor, 4)
    for device in ("/dev/video0", "/dev/v4l/by-id/usb-Acme_Cam_1234-video-index0"):
        data = {"bundle": str(editor.root), "state_dir": str(state),
                "lines": [{"name": "l1", "source": {"type": "camera", "device": device}}]}
        ((_, l1),) = line_station_configs(from_mapping(StationConfig, data, "test"))
        with pytest.raises(BundleError, match=r"bundle_version 4 is lower than 5"):
            load_pipeline(l1)


def test_a_floor_recorded_for_another_product_is_not_inherited(editor, tmp_path):
    state = tmp_path / "state"
    release(editor, 9, product="bracket")
    load_pipeline(single_line(editor.root, state))
    release(editor, 3, product="flange")
    (cam1,) = lines_station(editor.root, state, ["cam1"])
    assert load_pipeline(cam1).bundle.bundle_version == 3


def test_a_renamed_recipe_keeps_its_floor(editor, tmp_path):
    from edge_runtime.lines_config import line_station_configs
    from edge_runtime.recipes import recipe_station_config

    def recipe_cfg(name: str) -> StationConfig:
        data = {"state_dir": str(tmp_path / "state"), "source": {"type": "scripted"},
                "recipes": {"recipes": [{"name": name, "number": 1, "bundle": str(editor.root)}]}}
        ((_, cfg),) = line_station_configs(from_mapping(StationConfig, data, "test"))
        return recipe_station_config(cfg, cfg.recipes.recipes[0])

    release(editor, 5)
    load_pipeline(recipe_cfg("a"))
    release(editor, 4)
    with pytest.raises(BundleError, match=r"bundle_version 4 is lower than 5, .*recipes/a/bundle_version.json"):
        load_pipeline(recipe_cfg("a_renamed"))


def test_a_floor_recorded_before_cameras_were_gets_its_camera_at_the_next_load(editor, tmp_path):
    """A record without a camera counts for every camera of its product (the safe reading); loading the same
    version again records the camera, so a second camera is no longer held to it."""
    state = tmp_path / "state"
    release(editor, 9)
    (state / "lines" / "top").mkdir(parents=True)
    (state / "lines" / "top" / VERSION_STATE_FILE).write_text(json.dumps({"bundle_version": 9, "product": "flange"}))
    top, side = lines_station(editor.root, state, ["top", "side"], cameras=["top", "side"])
    release(editor, 3)
    with pytest.raises(BundleError, match=r"bundle_version 3 is lower than 9"):
        load_pipeline(side)
    release(editor, 9)
    load_pipeline(top)
    floors = json.loads((state / "lines" / "top" / VERSION_STATE_FILE).read_text())["floors"]
    assert ("folder:/frames/top", 9) in [(f.get("source"), f["bundle_version"]) for f in floors]
    release(editor, 3)
    assert load_pipeline(side).bundle.bundle_version == 3


def test_a_line_moved_to_another_camera_keeps_the_first_cameras_floor(editor, tmp_path):
    """Probe 39: line A ran camera X at 5, then camera Y at 9; its folder's one record became Y's, and a new line
    on X took an older bundle. A folder keeps one floor per camera; and a camera that moves to a line with an
    older series is refused, naming the record (the floor follows the camera)."""
    state = tmp_path / "state"
    release(editor, 5)
    (a_on_x,) = lines_station(editor.root, state, ["a"], cameras=["x"])
    load_pipeline(a_on_x)
    release(editor, 9)
    (a_on_y,) = lines_station(editor.root, state, ["a"], cameras=["y"])
    load_pipeline(a_on_y)
    floors = json.loads((state / "lines" / "a" / VERSION_STATE_FILE).read_text())["floors"]
    assert sorted((f["source"], f["bundle_version"]) for f in floors) == [("folder:/frames/x", 5),
                                                                          ("folder:/frames/y", 9)]
    release(editor, 4)
    a, e = lines_station(editor.root, state, ["a", "e"], cameras=["y", "x"])
    with pytest.raises(BundleError, match=r"bundle_version 4 is lower than 5, .*lines/a/bundle_version.json"):
        load_pipeline(e)
    release(editor, 5)
    assert load_pipeline(e).bundle.bundle_version == 5          # camera X's own series goes on


def test_a_floor_recorded_before_products_were_is_not_taken_over_by_the_next_product(editor, tmp_path):
    """Probe 40: {"bundle_version": 9} from older software became the next product's (cap's) floor when cap loaded,
    and bottle's older release then loaded. It counts for every product and stays as it is."""
    state = tmp_path / "state"
    state.mkdir()
    (state / VERSION_STATE_FILE).write_text(json.dumps({"bundle_version": 9}))
    release(editor, 12, product="cap")
    load_pipeline(single_line(editor.root, state))
    release(editor, 5, product="bottle")
    with pytest.raises(BundleError, match=r"bundle_version 5 is lower than 9"):
        load_pipeline(single_line(editor.root, state))


def test_a_floor_folder_that_cannot_be_listed_is_a_fault_not_no_floor(editor, tmp_path, monkeypatch):
    """Probe 40: Path.glob skipped a line folder the daemon's user could not open, and the floor in it."""
    import os

    state = tmp_path / "state"
    release(editor, 5)
    top, side = lines_station(editor.root, state, ["top", "side"], cameras=["top", "side"])
    load_pipeline(top)
    real = os.listdir

    def listdir(path):
        if str(path).endswith("lines"):
            raise PermissionError(13, "Permission denied")
        return real(path)
    monkeypatch.setattr(os, "listdir", listdir)
    with pytest.raises(BundleError, match=r"state/lines: cannot look for recorded bundle versions \(Permission denied\)"):
        load_pipeline(side)
