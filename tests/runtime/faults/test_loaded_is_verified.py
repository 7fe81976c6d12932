"""What is loaded is what was verified: the bytes onnxruntime, hnswlib and the self-test use are the hashed bytes,
and the manifest is authenticated before it is parsed (no YAML aliases, bounded error messages)."""
from __future__ import annotations

import os
import stat
import tracemalloc

import numpy as np
import pytest
from extras import require
import yaml

from edge_runtime import bundle as bundle_mod
from edge_runtime.bundle import MANIFEST, SIGNATURE, Bundle, BundleError
from edge_runtime.decode import load_image
from edge_runtime.nn_search import HnswSearch, build_hnsw, private_copy
from edge_runtime.pipeline import Pipeline
from edge_runtime.self_test import golden_check

INDEX = "index_int8.hnsw"


def _hostile_index(bundle: Bundle, path) -> None:
    """A valid hnswlib index with the same dimension and size as the bundle's, of vectors far from any part."""
    n = bundle.variant().info["bank_size"]
    far = np.random.default_rng(0).normal(size=(n, bundle.dim)).astype(np.float32) * 1e3
    build_hnsw(far, bundle.hnsw_params, seed=0).save_index(str(path))


def test_index_swapped_after_the_check_is_never_loaded(bundle_copy):
    require("hnswlib", "hnswlib")
    good = load_image(bundle_copy / "golden" / "00_good.png")
    reference = Pipeline(Bundle.load(bundle_copy), threads=1).score_rgb(good).score

    bundle = Bundle.load(bundle_copy)                 # checksums verified here
    hostile = bundle_copy / "hostile.hnsw"
    _hostile_index(bundle, hostile)
    os.replace(hostile, bundle_copy / INDEX)          # the swap, between the check and the pipeline
    # The swapped index really would change the verdict if it were loaded ...
    swapped = HnswSearch.load(bundle_copy / INDEX, bundle.dim, bundle.hnsw_params)
    assert float(swapped.exact.bank[0, 0]) != pytest.approx(float(
        HnswSearch.load(bundle.read_verified(INDEX), bundle.dim, bundle.hnsw_params).exact.bank[0, 0]))
    # ... but the pipeline scores with the verified bytes.
    pipeline = Pipeline(bundle, threads=1)
    assert pipeline.score_rgb(good).score == pytest.approx(reference, rel=1e-6)
    assert golden_check(bundle, pipeline) == []


def test_model_swapped_after_the_check_is_never_loaded(bundle_copy):
    bundle = Bundle.load(bundle_copy)
    model = bundle.variant().model_file
    (bundle_copy / model).write_bytes(b"not a model")  # would make onnxruntime fail if it were read
    pipeline = Pipeline(bundle, threads=1)             # built from the verified bytes
    assert golden_check(bundle, pipeline) == []


def test_golden_image_swapped_after_the_check_is_never_used(bundle_copy):
    bundle = Bundle.load(bundle_copy)
    pipeline = Pipeline(bundle, threads=1)
    rel = bundle.variant().golden[0]["file"]
    other = bundle.variant().golden[1]["file"]
    (bundle_copy / rel).write_bytes((bundle_copy / other).read_bytes())
    assert golden_check(bundle, pipeline) == []


def test_a_file_read_after_release_is_verified_again(bundle_copy):
    bundle = Bundle.load(bundle_copy)
    bundle.release()
    data = bytearray((bundle_copy / INDEX).read_bytes())
    data[-1] ^= 0xFF
    (bundle_copy / INDEX).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"index_int8\.hnsw: sha256 .* does not match the manifest"):
        Pipeline(bundle, threads=1)


def test_bundle_directory_is_resolved_once_per_load(bundle_copy, tmp_path):
    """A 'current' symlink flipped to another folder after the load does not change what the pipeline reads."""
    link = tmp_path / "current"
    link.symlink_to(bundle_copy)
    bundle = Bundle.load(link)
    bundle.release()                                   # force the pipeline to read from disk again
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    link.unlink()
    link.symlink_to(elsewhere)
    assert bundle.root == bundle_copy.resolve()
    Pipeline(bundle, threads=1)                        # reads from the folder that was verified


def test_unlisted_file_is_never_read_verified(bundle_copy):
    bundle = Bundle.load(bundle_copy)
    (bundle_copy / "extra.bin").write_bytes(b"x")
    with pytest.raises(BundleError, match=r"files\.'extra\.bin' must be"):
        bundle.read_verified("extra.bin")


def test_private_copy_is_exact_and_immutable():
    data = os.urandom(4096)
    with private_copy(data, "x.bin") as path:
        with open(path, "rb") as fh:
            assert fh.read() == data
        if path.startswith("/proc/self/fd/"):
            fd = int(path.rsplit("/", 1)[1])
            with pytest.raises(PermissionError):
                os.pwrite(fd, b"evil", 0)        # sealed: nobody (not even we) can change the bytes
            with pytest.raises(PermissionError):
                os.ftruncate(fd, 0)


def test_private_copy_fallback_is_private_and_removed(monkeypatch):
    monkeypatch.delattr(os, "memfd_create", raising=False)
    with private_copy(b"abc", "x.bin") as path:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
        with open(path, "rb") as fh:
            assert fh.read() == b"abc"
    assert not os.path.exists(os.path.dirname(path))


# ---- the manifest is authenticated before it is parsed ----------------------------------------------------------
def _ladder(levels: int, width: int = 9) -> str:
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def test_unsigned_manifest_is_never_parsed_when_a_key_is_configured(bundle_copy, monkeypatch):
    require("cryptography", "sign")
    from export.signing import generate_keypair, public_key_bytes, sign_bundle

    private, public = generate_keypair(bundle_copy.parent / "keys")
    sign_bundle(bundle_copy, private)
    (bundle_copy / MANIFEST).write_text(_ladder(6))  # 9**6 = 531,441 elements once expanded; unsigned

    def parse(*args, **kwargs):
        raise AssertionError("the manifest was parsed before its signature was checked")

    monkeypatch.setattr(bundle_mod, "load_strict", parse)
    monkeypatch.setattr(yaml, "safe_load", parse)
    with pytest.raises(BundleError, match=rf"{SIGNATURE}: ed25519 signature does not verify"):
        Bundle.load(bundle_copy, public_key=public_key_bytes(public))


def test_yaml_alias_ladder_in_manifest_is_refused_without_expanding(bundle_copy):
    m = (bundle_copy / MANIFEST).read_text()
    (bundle_copy / MANIFEST).write_text(m + _ladder(8))   # 9**8 = 43 million elements if expanded
    tracemalloc.start()
    try:
        with pytest.raises(BundleError) as err:
            Bundle.load(bundle_copy)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(err.value).startswith(f"{bundle_copy.resolve() / MANIFEST}: line ")
    assert "YAML anchor &a0 is not allowed" in str(err.value)
    assert peak < 50 * 1024 * 1024


def test_aliases_in_an_otherwise_valid_manifest_are_refused(editor):
    m = editor.manifest()
    text = yaml.safe_dump(m, sort_keys=False)
    # Share one mapping between the two variants, as an anchor and an alias: valid YAML, same values.
    tol = "golden_tolerance:\n      relative: 0.01"
    assert text.count(tol) == 1
    text = text.replace(tol, "golden_tolerance: &tol\n      relative: 0.01") + "extra: *tol\n"
    (editor.root / MANIFEST).write_text(text)
    with pytest.raises(BundleError, match=r"line \d+: YAML anchor &tol is not allowed"):
        Bundle.load(editor.root, verify=False)


def test_hostile_value_cannot_make_a_huge_error_message(editor):
    m = editor.manifest()
    m["schema_version"] = "9" * 5_000_000          # 5 MB, under the manifest size limit
    editor.save(m)
    with pytest.raises(BundleError) as err:
        Bundle.load(editor.root)
    message = str(err.value)
    assert len(message) < 2500
    assert "schema_version '9999" in message and "characters shown as 200" in message


def test_hostile_file_entry_cannot_make_a_huge_error_message(editor):
    m = editor.manifest()
    m["files"][INDEX] = {"sha256": "x" * 3_000_000, "bytes": 1}
    editor.save(m)
    with pytest.raises(BundleError) as err:
        Bundle.load(editor.root)
    assert len(str(err.value)) < 2500 and "must be {sha256: <64 hex>, bytes: <int>}" in str(err.value)
