"""ed25519 bundle signatures: export.signing signs, Bundle.load(public_key=...) and the daemon verify."""
from __future__ import annotations

import stat

import pytest
from extras import require
import yaml

from edge_runtime.bundle import MANIFEST, SIGNATURE, Bundle, BundleError
from edge_runtime.config import StationConfig
from edge_runtime.daemon import load_pipeline, load_public_key
from edge_runtime.schema import from_mapping
from export.signing import SigningError, generate_keypair, public_key_bytes, sign_bundle

require("cryptography", "sign")


@pytest.fixture
def keys(tmp_path):
    return generate_keypair(tmp_path / "keys")


def test_good_signature_verifies(bundle_copy, keys):
    private, public = keys
    sig = sign_bundle(bundle_copy, private)
    assert sig == bundle_copy / SIGNATURE and len(sig.read_bytes()) == 64
    bundle = Bundle.load(bundle_copy, public_key=public_key_bytes(public))
    assert bundle.bundle_id
    # The daemon reads the same PEM file from security.bundle_public_key.
    assert load_public_key(str(public)) == public_key_bytes(public)


def test_private_key_is_private_and_never_overwritten(keys):
    private, public = keys
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    with pytest.raises(SigningError, match="already exists"):
        generate_keypair(private.parent)


def test_tampered_manifest_fails(bundle_copy, keys):
    private, public = keys
    sign_bundle(bundle_copy, private)
    m = yaml.safe_load((bundle_copy / MANIFEST).read_text())
    m["variants"]["int8"]["threshold"] *= 10      # an attacker loosening the threshold
    (bundle_copy / MANIFEST).write_text(yaml.safe_dump(m, sort_keys=False))
    with pytest.raises(BundleError) as err:
        Bundle.load(bundle_copy, public_key=public_key_bytes(public))
    assert SIGNATURE in str(err.value) and "does not verify" in str(err.value)


def test_tampered_file_with_repinned_checksum_fails(bundle_copy, keys, editor):
    private, public = keys
    sign_bundle(bundle_copy, private)
    (bundle_copy / "golden" / "00_good.png").write_bytes(b"\x89PNG swapped")
    editor.repin("golden/00_good.png")            # the checksum alone would now pass
    with pytest.raises(BundleError, match="does not verify"):
        Bundle.load(bundle_copy, public_key=public_key_bytes(public))


def test_missing_signature_fails(bundle_copy, keys):
    _, public = keys
    with pytest.raises(BundleError) as err:
        Bundle.load(bundle_copy, public_key=public_key_bytes(public))
    assert SIGNATURE in str(err.value) and "missing" in str(err.value)


def test_wrong_key_fails(bundle_copy, keys, tmp_path):
    private, _ = keys
    _, other_public = generate_keypair(tmp_path / "other")
    sign_bundle(bundle_copy, private)
    with pytest.raises(BundleError, match="does not verify"):
        Bundle.load(bundle_copy, public_key=public_key_bytes(other_public))
    with pytest.raises(BundleError, match="does not verify"):
        Bundle.load(bundle_copy, public_key=b"\x00" * 31)     # not even a key


def test_station_refuses_an_unsigned_bundle_when_a_key_is_configured(bundle_copy, keys):
    private, public = keys
    cfg = from_mapping(StationConfig, {"bundle": str(bundle_copy), "source": {"type": "scripted"},
                                       "security": {"bundle_public_key": str(public)}}, "test")
    with pytest.raises(BundleError, match="signature is missing"):
        load_pipeline(cfg)
    sign_bundle(bundle_copy, private)
    assert load_pipeline(cfg).bundle.bundle_id


def test_a_bundle_that_does_not_verify_is_never_signed(bundle_copy, keys):
    private, _ = keys
    (bundle_copy / "features_int8.onnx").write_bytes(b"corrupt")
    with pytest.raises(SigningError, match="refusing to sign"):
        sign_bundle(bundle_copy, private)
    assert not (bundle_copy / SIGNATURE).exists()


def test_unusable_private_key_is_named(tmp_path, bundle_copy):
    bad = tmp_path / "key.pem"
    bad.write_text("not a key")
    with pytest.raises(SigningError, match=str(bad)):
        sign_bundle(bundle_copy, bad)


def test_check_verifies_the_signature_with_the_stations_key(bundle_copy, keys, tmp_path, capsys):
    """`check` had no way to take the station's key: it passed a bundle whose signature the daemon refused."""
    from edge_runtime.cli import main as runtime_main

    private, public = keys
    sign_bundle(bundle_copy, private)
    assert runtime_main(["check", str(bundle_copy), "--public-key", str(public)]) == 0
    assert "signature: manifest signed by the key" in capsys.readouterr().out
    _, other = generate_keypair(tmp_path / "other")
    assert runtime_main(["check", str(bundle_copy), "--public-key", str(other)]) == 1
    assert "does not verify" in capsys.readouterr().err
    # probe 100: a key that is no regular file (/dev/zero, a FIFO) raised BundleError out of `check` as a traceback
    assert runtime_main(["check", str(bundle_copy), "--public-key", "/dev/zero"]) == 1
    assert "--public-key /dev/zero: cannot read the key (/dev/zero: public key is not a regular file)" in \
        capsys.readouterr().err
