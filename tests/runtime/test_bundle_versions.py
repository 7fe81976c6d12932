"""Device-made bundle versions on a station: active across restarts, rollback (undo), tampering refused."""
from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import pytest
import yaml

from edge_runtime.bank_adapt import InputImage, prepare
from edge_runtime.bundle import BundleError
from edge_runtime.bundle_versions import VersionStore
from edge_runtime.config import load_station
from edge_runtime.daemon import load_pipeline


@pytest.fixture
def station(device_bundle, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(device_bundle, base)
    (tmp_path / "in").mkdir()
    path = tmp_path / "station.yaml"
    path.write_text(yaml.safe_dump({"bundle": str(base), "source": {"type": "folder", "path": "in"},
                                    "http": {"enabled": False}, "state_dir": "state", "inference": {"threads": 1}}))
    marked = cv2.imread(str(base / "golden" / "00_good.png"))
    cv2.circle(marked, (60, 80), 12, (0, 0, 255), -1)
    cv2.imwrite(str(tmp_path / "marked.png"), marked)
    return load_station(path), tmp_path / "marked.png"


def _learn(cfg, store: VersionStore, image: Path):
    current = load_pipeline(cfg).bundle
    folder = store.new_folder()
    new = prepare(current.root, [InputImage.from_file(image)], [], threads=1).write(folder, audit_log=store.audit_log)
    store.activate(folder)
    return new


def test_active_version_survives_restart_and_rollback_undoes_it(station):
    cfg, image = station
    store = VersionStore(cfg.bundle, cfg.state_dir)
    base = load_pipeline(cfg)
    base_id, base_bank = base.bundle.bundle_id, len(base.search)
    new = _learn(cfg, store, image)

    restarted = load_pipeline(load_station(Path(cfg.bundle).parent / "station.yaml"))  # a fresh start
    assert restarted.bundle.bundle_id == new.bundle_id and len(restarted.search) > base_bank
    assert restarted.score_rgb(cv2.cvtColor(cv2.imread(str(image)), cv2.COLOR_BGR2RGB)).score < restarted.threshold

    folder = store.rollback("base", restarted.bundle, who="tester")
    store.activate(folder)
    undone = load_pipeline(cfg, current=restarted.bundle)  # downgrade protection on: the re-issue is newer
    assert len(undone.search) == base_bank and undone.bundle.bundle_id not in (base_id, new.bundle_id)
    assert undone.bundle.bundle_version > new.bundle_version
    assert undone.bundle.manifest["made_on_device"]["action"] == "rollback"
    names = [v["name"] for v in store.versions()]
    assert names[0] == "base" and len(names) == 3, "every version stays on disk"
    # ...and forward again: the learned version can be restored the same way.
    store.activate(store.rollback(Path(new.root).name, undone.bundle, who="tester"))
    assert len(load_pipeline(cfg).search) == len(restarted.search)
    actions = [e["action"] for e in __import__("edge_runtime.bank_adapt", fromlist=["read_audit"]).read_audit(store.audit_log)]
    assert actions == ["adapt", "rollback", "rollback"]


def test_tampered_active_version_is_refused(station):
    cfg, image = station
    store = VersionStore(cfg.bundle, cfg.state_dir)
    new = _learn(cfg, store, image)
    index = Path(new.root) / new.manifest["variants"]["int8"]["index"]
    data = bytearray(index.read_bytes())
    data[200] ^= 0x01
    index.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not match the manifest"):
        load_pipeline(cfg)


def test_a_new_base_bundle_overrides_the_device_versions(station, device_bundle):
    cfg, image = station
    store = VersionStore(cfg.bundle, cfg.state_dir)
    _learn(cfg, store, image)
    manifest = Path(cfg.bundle) / "manifest.yaml"
    manifest.write_text(manifest.read_text().replace("bundle_version: 1", "bundle_version: 2"))  # a new release
    assert store.active_dir() == Path(cfg.bundle)
