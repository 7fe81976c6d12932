"""Device-made bundle versions on a station: active across restarts, rollback (undo), tampering refused."""
from __future__ import annotations

import shutil
import struct
from pathlib import Path

import cv2
import pytest
import yaml
from extras import require

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


@pytest.mark.parametrize("text", ["[]", "[\"v1\"]", "3", "null", "\"v1\""])
def test_an_active_file_that_is_not_a_json_object_loads_the_base_bundle(tmp_path, caplog, text):
    """Parseable but not a record (a list, a number): the station file's bundle, as for a corrupt file, not a crash
    at every (re)load."""
    (tmp_path / "state" / "bundles" / "v1").mkdir(parents=True)
    (tmp_path / "state" / "bundles" / "active.json").write_text(text)
    with caplog.at_level("WARNING"):
        assert VersionStore(tmp_path / "base", tmp_path / "state").active_dir() == tmp_path / "base"
    assert "active.json: not a JSON object" in caplog.text


def _new_release(cfg, version: int) -> None:
    """The workstation delivers a new release into the station file's bundle folder."""
    from edge_runtime.bundle import write_manifest

    root = Path(cfg.bundle)
    m = yaml.safe_load((root / "manifest.yaml").read_text())
    m["bundle_version"] = version
    write_manifest(root, m)


def test_a_version_learned_on_a_replaced_release_cannot_come_back(station):
    """The page offered versions learned on an earlier release; rolling back re-issued one above the floor and
    it ran under the new release's name (a bad threshold came back)."""
    from edge_runtime.bank_adapt import AdaptError

    cfg, image = station
    store = VersionStore(cfg.bundle, cfg.state_dir)
    learned = _learn(cfg, store, image)
    _new_release(cfg, 2)
    assert load_pipeline(cfg).bundle.bundle_version == 2      # the new release wins over the learned version
    old = next(v for v in store.versions() if v["name"] == Path(learned.root).name)
    assert old["other_base"] is True and not any(v["other_base"] for v in store.versions() if v["name"] == "base")
    with pytest.raises(AdaptError, match="made from an earlier bundle"):
        store.rollback(old["name"], load_pipeline(cfg).bundle, who="tester")
    store.activate(Path(learned.root))                         # active.json written for the new base by hand
    with pytest.raises(BundleError, match="was not made from the station's bundle"):
        load_pipeline(cfg)


def test_learning_on_the_station_does_not_lock_out_the_next_numbered_release(station):
    """A device-made version's own number is a timestamp; as the downgrade floor it refused every later release."""
    from edge_runtime.bundle_policy import recorded_version

    cfg, image = station
    store = VersionStore(cfg.bundle, cfg.state_dir)
    learned = _learn(cfg, store, image)
    running = load_pipeline(cfg)
    assert running.bundle.bundle_id == learned.bundle_id and learned.bundle_version > 10**9
    assert recorded_version(cfg.state_dir) == 1                # the release it was learned on
    _new_release(cfg, 2)
    assert load_pipeline(cfg, current=running.bundle).bundle.bundle_version == 2
    assert recorded_version(cfg.state_dir) == 2
    _new_release(cfg, 1)                                       # downgrade protection still holds for releases
    with pytest.raises(BundleError, match="lower than 2"):
        load_pipeline(cfg)


def test_a_rollback_never_signs_a_version_whose_station_signature_does_not_verify(device_bundle, tmp_path):
    """Probe 102: a device-made version edited after it was signed (its bank changed, checksums and id recomputed)
    is refused at load, but a rollback to it re-issued it with a fresh station signature, and that copy loaded."""
    require("cryptography", "sign")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from edge_runtime.bank_adapt import AdaptError, sign_version
    from edge_runtime.bundle import MANIFEST, Bundle, write_manifest

    keys = {}
    for name in ("workstation", "station"):
        key = Ed25519PrivateKey.generate()
        (tmp_path / f"{name}.pem").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        (tmp_path / f"{name}.pub").write_bytes(key.public_key().public_bytes(serialization.Encoding.Raw,
                                                                             serialization.PublicFormat.Raw))
        keys[name] = tmp_path / f"{name}.pem"
    base = tmp_path / "base"
    shutil.copytree(device_bundle, base)
    sign_version(base, keys["workstation"])
    (tmp_path / "in").mkdir()
    path = tmp_path / "station.yaml"
    path.write_text(yaml.safe_dump({
        "bundle": str(base), "source": {"type": "folder", "path": "in"}, "http": {"enabled": False},
        "state_dir": "state", "inference": {"threads": 1},
        "security": {"bundle_public_key": str(tmp_path / "workstation.pub")},
        "page": {"station_signing_key": str(keys["station"])}}))
    cfg = load_station(path)
    store = VersionStore(cfg.bundle, cfg.state_dir, signing_key=keys["station"])
    marked = cv2.imread(str(base / "golden" / "00_good.png"))
    cv2.circle(marked, (60, 80), 12, (0, 0, 255), -1)
    cv2.imwrite(str(tmp_path / "marked.png"), marked)
    folder = store.new_folder()
    learned = prepare(Bundle.load(base), [InputImage.from_file(tmp_path / "marked.png")], [],
                      threads=1).write(folder, audit_log=store.audit_log, signing_key=keys["station"])
    store.activate(folder)
    assert load_pipeline(cfg).bundle.bundle_id == learned.bundle_id
    # Edited after signing: one bank value changed, the checksums and id recomputed (no station key needed).
    index = folder / learned.manifest["variants"]["int8"]["index"]
    data = bytearray(index.read_bytes())
    first_vector = 96 + struct.unpack_from("<Q", data, 40)[0]   # after hnswlib's header: offsetData of row 0
    data[first_vector] ^= 0x01                                    # the lowest mantissa byte of its first value
    index.write_bytes(bytes(data))
    m = yaml.safe_load((folder / MANIFEST).read_text())
    m.pop("files")
    m["bundle_id"] = None
    write_manifest(folder, m)
    with pytest.raises(BundleError, match="signature does not verify"):
        load_pipeline(cfg)
    with pytest.raises(AdaptError, match="not signed by this station.s key"):
        store.rollback(folder.name, None, who="tester")
