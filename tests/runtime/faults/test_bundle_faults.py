"""Broken bundles on the device: every fault is refused with a message naming the file and the cause.

Each test damages a private copy of the small synthetic bundle the way a bad copy, a full SD card or an attacker
would, and checks that Bundle.load, the Pipeline, the daemon's load_pipeline or run_self_test refuses it.
"""
from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from extras import require
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_runtime.bundle import MANIFEST, Bundle, BundleError, check_index_file
from edge_runtime.config import StationConfig
from edge_runtime.daemon import load_pipeline
from edge_runtime.features import FeatureError
from edge_runtime.nn_search import HnswParams, build_hnsw
from edge_runtime.pipeline import Pipeline
from edge_runtime.records import Frame, Verdict
from edge_runtime.schema import from_mapping
from edge_runtime.self_test import run_self_test

MODEL = "features_int8.onnx"     # the default variant's files: what a station loads
INDEX = "index_int8.hnsw"
GOLDEN = "golden/00_good.png"


def refusal(root: Path, **kwargs) -> str:
    with pytest.raises(BundleError) as err:
        Bundle.load(root, **kwargs)
    return str(err.value)


def station(root: Path) -> StationConfig:
    return from_mapping(StationConfig, {"bundle": str(root), "source": {"type": "scripted"}}, "test")


def self_test_failures(root: Path) -> str:
    report = run_self_test(root, threads=1)
    assert not report.ok
    return " | ".join(report.failures)


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# ---- file integrity -----------------------------------------------------------------------------------------
# ---- the manifest's own integrity ---------------------------------------------------------------------------
def test_manifest_edited_after_export_is_refused_and_a_recomputed_id_is_a_new_bundle(bundle_copy, editor):
    original = Bundle.load(bundle_copy).bundle_id
    m = editor.manifest()
    m["variants"]["int8"]["threshold"] *= 10            # every defect would pass
    editor.save(m, reid=False)                           # the id still claims the exported bundle
    msg = refusal(bundle_copy)
    assert "content does not match bundle_id" in msg and original in msg and "edited after export" in msg
    editor.save(m)                                       # an editor who also recomputes the id...
    assert Bundle.load(bundle_copy).bundle_id != original   # ...makes another bundle, and records say so


@pytest.mark.parametrize("rel", [MODEL, INDEX, GOLDEN])
def test_one_flipped_byte_is_refused(bundle_copy, rel):
    flip_byte(bundle_copy / rel)
    msg = refusal(bundle_copy)
    assert rel in msg and "sha256" in msg and "modified" in msg
    assert rel in self_test_failures(bundle_copy)


@pytest.mark.parametrize("rel", [MODEL, INDEX])
def test_truncated_file_is_refused(bundle_copy, rel):
    path = bundle_copy / rel
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    msg = refusal(bundle_copy)
    assert rel in msg and "truncated" in msg


@pytest.mark.parametrize("rel", [MODEL, INDEX, GOLDEN])
def test_missing_file_is_refused(bundle_copy, rel):
    (bundle_copy / rel).unlink()
    msg = refusal(bundle_copy)
    assert rel in msg and "missing" in msg


def test_listed_file_that_is_a_fifo_is_refused_without_blocking(bundle_copy):
    (bundle_copy / MODEL).unlink()
    os.mkfifo(bundle_copy / MODEL)   # hashing a FIFO would block the start-up forever
    msg = refusal(bundle_copy)
    assert MODEL in msg and "not a regular file" in msg


def test_missing_manifest_and_missing_folder(tmp_path, bundle_copy):
    assert "does not exist" in refusal(tmp_path / "nowhere")
    (bundle_copy / MANIFEST).unlink()
    assert MANIFEST in refusal(bundle_copy) and "missing" in refusal(bundle_copy)


def test_extra_files_are_ignored_and_never_loaded(bundle_copy, editor):
    # Decision: the listed files must match exactly; unlisted files may sit in the folder (a README, a stray
    # copy) but nothing unlisted is ever opened, so they cannot change what is inspected.
    (bundle_copy / "evil.onnx").write_bytes(b"not a model")
    (bundle_copy / "golden" / "extra.png").write_bytes(b"not an image")
    bundle = Bundle.load(bundle_copy)
    assert "evil.onnx" not in bundle.manifest["files"]
    assert run_self_test(bundle_copy, threads=1).ok

    m = editor.manifest()
    m["variants"]["int8"]["model"] = "evil.onnx"        # point the station at the unlisted file
    editor.save(m)
    msg = refusal(bundle_copy)
    assert "evil.onnx" in msg and "not covered by 'files' checksums" in msg

    m["variants"]["int8"]["model"] = MODEL
    m["variants"]["int8"]["golden"][0]["file"] = "golden/extra.png"
    editor.save(m)
    msg = refusal(bundle_copy)
    assert "golden/extra.png" in msg and "not covered" in msg


# ---- manifest -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", [1, 5, "2", "3", None, True])
def test_manifest_of_another_schema_version_is_refused(editor, version):
    m = editor.manifest()
    m["schema_version"] = version
    editor.save(m)
    msg = refusal(editor.root)
    assert MANIFEST in msg and "schema_version" in msg and "not supported" in msg


@pytest.mark.parametrize("preprocessing", [[], "x", None, 4])
def test_a_preprocessing_section_that_is_not_a_mapping_is_refused(editor, preprocessing):
    m = editor.manifest()
    m["preprocessing"] = preprocessing
    editor.save(m)
    with pytest.raises(BundleError, match="preprocessing must be a mapping"):
        Bundle.load(editor.root)


@pytest.mark.parametrize("shift", [9, -1, "4", True, 4.0, None])
def test_a_16_bit_shift_outside_0_to_8_is_refused(editor, shift):
    m = editor.manifest()
    m.setdefault("preprocessing", {})["shift_16bit"] = shift
    m["schema_version"] = 4
    editor.save(m)
    with pytest.raises(BundleError, match="preprocessing.shift_16bit must be an integer from 0 to 8"):
        Bundle.load(editor.root)


def test_a_pinned_16_bit_shift_is_how_16_bit_frames_are_read(editor):
    m = editor.manifest()
    m.setdefault("preprocessing", {})["shift_16bit"] = 4
    editor.save(m)
    with pytest.raises(BundleError, match="shift_16bit 4 needs schema_version 4"):
        Bundle.load(editor.root)                   # what a runtime reading only schema 3 would misread
    m["schema_version"] = 4
    editor.save(m)
    assert Bundle.load(editor.root).shift_16bit == 4


@pytest.mark.parametrize("text, cause", [
    (b"schema_version: [1\n", "not valid YAML"),
    (b"- just\n- a list\n", "not a mapping"),
    (b"schema_version: 1\nwhen: 2001-13-45\n", "cannot be parsed"),                # impossible date: ValueError
    (b"[" * 5000 + b"]" * 5000, "cannot be parsed"),                                # nesting: RecursionError
    (b"schema_version: 1\nx: !!python/object/apply:os.system ['touch /tmp/pwned']\n", "not valid YAML"),
], ids=["bad-yaml", "list", "impossible-date", "deep-nesting", "python-tag"])
def test_unparseable_manifest_is_refused(bundle_copy, text, cause):
    (bundle_copy / MANIFEST).write_bytes(text)
    msg = refusal(bundle_copy)
    assert MANIFEST in msg and cause in msg


@pytest.mark.parametrize("key, value", [
    ("threshold", math.inf),      # would pass every part
    ("threshold", math.nan),
    ("threshold", 0),
    ("threshold", -1.0),
    ("threshold", True),
    ("threshold", "23.0"),
])
def test_threshold_that_cannot_decide_is_refused(editor, key, value):
    m = editor.manifest()
    m["variants"]["int8"][key] = value
    editor.save(m)
    msg = refusal(editor.root)
    assert "variants.int8.threshold" in msg and "positive finite" in msg


@pytest.mark.parametrize("rel", ["../outside.onnx", "/etc/passwd", "golden/../../outside.png", "golden\\..\\x.png", "a\0b"])
def test_manifest_path_that_escapes_the_bundle_is_refused(editor, rel):
    m = editor.manifest()
    m["files"][rel] = m["files"][MODEL]
    m["variants"]["int8"]["model"] = rel
    editor.save(m)
    msg = refusal(editor.root)
    assert repr(rel) in msg and "not a plain relative path inside the bundle" in msg
    # Without checksum verification the path is still refused when the pipeline asks for it.
    bundle = Bundle.load(editor.root, verify=False)
    with pytest.raises(BundleError, match="not a plain relative path"):
        Pipeline(bundle, threads=1)


def test_symlink_to_an_identical_file_outside_is_refused(bundle_copy, tmp_path):
    # Same bytes, same checksum: only the path check can tell that the file lives outside the bundle.
    outside = tmp_path / "outside.onnx"
    shutil.copy(bundle_copy / MODEL, outside)
    (bundle_copy / MODEL).unlink()
    (bundle_copy / MODEL).symlink_to(outside)
    msg = refusal(bundle_copy)
    assert MODEL in msg and "resolves outside the bundle" in msg


def test_symlinked_folder_and_manifest_outside_are_refused(bundle_copy, tmp_path):
    shutil.copytree(bundle_copy / "golden", tmp_path / "golden_elsewhere")
    shutil.rmtree(bundle_copy / "golden")
    (bundle_copy / "golden").symlink_to(tmp_path / "golden_elsewhere")
    msg = refusal(bundle_copy)
    assert "golden/" in msg and "resolves outside the bundle" in msg

    (bundle_copy / "golden").unlink()
    shutil.copytree(tmp_path / "golden_elsewhere", bundle_copy / "golden")
    shutil.move(bundle_copy / MANIFEST, tmp_path / "manifest_elsewhere.yaml")
    (bundle_copy / MANIFEST).symlink_to(tmp_path / "manifest_elsewhere.yaml")
    msg = refusal(bundle_copy)
    assert MANIFEST in msg and "resolves outside the bundle" in msg


def test_symlink_loop_is_refused(bundle_copy):
    (bundle_copy / MODEL).unlink()
    (bundle_copy / MODEL).symlink_to(bundle_copy / MODEL)
    msg = refusal(bundle_copy)
    assert MODEL in msg


# ---- consistency that checksums cannot catch ----------------------------------------------------------------
def test_index_of_another_dimension_is_refused_before_hnswlib_reads_it(editor):
    require("hnswlib", "hnswlib")
    bundle = Bundle.load(editor.root)
    bank_size = bundle.variant().info["bank_size"]
    other = np.random.default_rng(0).normal(size=(bank_size, 64)).astype(np.float32)
    build_hnsw(other, HnswParams()).save_index(str(editor.root / INDEX))
    editor.repin(INDEX)                        # checksums agree: only the consistency check can catch it
    bundle = Bundle.load(editor.root)
    with pytest.raises(BundleError) as err:
        Pipeline(bundle, threads=1)
    msg = str(err.value)
    assert INDEX in msg and "64-d" in msg and str(bundle.dim) in msg
    assert INDEX in self_test_failures(editor.root)
    with pytest.raises(BundleError, match="64-d"):
        load_pipeline(station(editor.root))


def test_index_with_another_bank_size_is_refused(editor):
    require("hnswlib", "hnswlib")
    bundle = Bundle.load(editor.root)
    fewer = np.random.default_rng(0).normal(size=(100, bundle.dim)).astype(np.float32)
    build_hnsw(fewer, HnswParams()).save_index(str(editor.root / INDEX))
    editor.repin(INDEX)
    with pytest.raises(BundleError, match=r"holds 100 vectors, manifest says bank_size"):
        Pipeline(Bundle.load(editor.root), threads=1)


@pytest.mark.parametrize("content", [b"", b"\x00" * 50, os.urandom(4096)], ids=["empty", "short", "random"])
def test_index_that_is_not_an_index_is_refused(tmp_path, content):
    path = tmp_path / "index.hnsw"
    path.write_bytes(content)
    with pytest.raises(BundleError) as err:
        check_index_file(path, 152, 1411)
    assert str(path) in str(err.value)


def test_index_header_claiming_room_for_far_more_vectors_is_refused(bundle_copy, tmp_path):
    # hnswlib allocates max_elements on load: 2**40 would ask the board for terabytes.
    data = bytearray((bundle_copy / INDEX).read_bytes())
    data[8:16] = (2**40).to_bytes(8, "little")
    path = tmp_path / "index.hnsw"
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="not a valid hnswlib index"):
        check_index_file(path, Bundle.load(bundle_copy).dim)


def test_garbage_model_with_a_valid_checksum_is_refused(editor):
    (editor.root / MODEL).write_bytes(os.urandom(4096))
    editor.repin(MODEL)
    bundle = Bundle.load(editor.root)          # checksums agree
    with pytest.raises(FeatureError) as err:
        Pipeline(bundle, threads=1)
    assert MODEL in str(err.value) and "onnxruntime cannot load" in str(err.value)
    assert MODEL in self_test_failures(editor.root)
    with pytest.raises(BundleError, match=MODEL):
        load_pipeline(station(editor.root))


def _model_that_fails_at_run_time(path: Path, n_patches: int, dim: int, width: int, height: int) -> None:
    """A valid graph with the manifest's input and output shapes whose Reshape cannot succeed on any input."""
    import onnx
    from onnx import TensorProto, helper

    shape = helper.make_tensor("shape", TensorProto.INT64, [3], [1, n_patches, dim])
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["image", "shape"], ["patch_features"])], "broken",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, height, width])],
        [helper.make_tensor_value_info("patch_features", TensorProto.FLOAT, [1, n_patches, dim])],
        initializer=[shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


@pytest.mark.exporter  # builds an ONNX graph with the onnx package
def test_model_that_loads_but_cannot_run_faults_every_part(editor):
    bundle = Bundle.load(editor.root)
    (rows, cols), (width, height) = bundle.grid, bundle.geometry.input_size
    _model_that_fails_at_run_time(editor.root / MODEL, rows * cols, bundle.dim, width, height)
    editor.repin(MODEL)
    pipeline = Pipeline(Bundle.load(editor.root), threads=1)   # shapes agree, so it loads
    result = pipeline.inspect(Frame(frame_id=1, source="cam", encoded=(editor.root / GOLDEN).read_bytes()))
    assert result.verdict is Verdict.FAULT and "internal error" in result.error
    failures = self_test_failures(editor.root)
    assert GOLDEN in failures and "cannot be scored" in failures
    with pytest.raises(BundleError, match="self-test failed"):
        load_pipeline(station(editor.root))


def test_golden_score_that_no_longer_reproduces(editor):
    m = editor.manifest()
    m["variants"]["int8"]["golden"][0]["score"] *= 1.5
    editor.save(m)
    Bundle.load(editor.root)                   # the manifest itself is consistent
    failures = self_test_failures(editor.root)
    assert GOLDEN in failures and "differs from the recorded" in failures
    with pytest.raises(BundleError, match=f"self-test failed.*{GOLDEN}"):
        load_pipeline(station(editor.root))


def test_golden_image_replaced_by_a_damaged_part(editor):
    import cv2

    image = cv2.imread(str(editor.root / GOLDEN))
    h, w = image.shape[:2]
    cv2.rectangle(image, (w // 3, h // 3), (w // 2, h // 2), (0, 0, 0), -1)   # a "defect" on the reference part
    cv2.imwrite(str(editor.root / GOLDEN), image)
    editor.repin(GOLDEN)
    failures = self_test_failures(editor.root)
    assert GOLDEN in failures and "differs from the recorded" in failures


@pytest.mark.exporter  # needs the FP32 variant, which the device fixture bundle leaves out
def test_models_swapped_between_variants(editor):
    # Same shapes, valid checksums: only the golden scores show that int8 now runs the fp32 graph.
    shutil.copy(editor.root / "features_fp32.onnx", editor.root / MODEL)
    editor.repin(MODEL)
    failures = self_test_failures(editor.root)
    assert "differs from the recorded" in failures and "variant int8" in failures


@pytest.mark.parametrize("space", ["ip", "cosine", "L2", None])
def test_an_index_space_other_than_l2_is_refused_by_name(editor, space):
    """The score, the re-check and the thresholds are L2 distances: an ip or cosine graph would find neighbours by
    another metric than the one scored."""
    m = editor.manifest()
    m["index"]["space"] = space
    editor.save(m)
    msg = refusal(editor.root)
    assert MANIFEST in msg and "index.space must be 'l2'" in msg and repr(space) in msg


@pytest.mark.parametrize("value", [0, "false", 1, None])
def test_an_exact_recheck_other_than_true_or_false_is_refused_by_name(editor, value):
    """bool(0) switched the re-check (what makes the image score exact) off without a word; bool("false") on."""
    m = editor.manifest()
    m["index"]["exact_recheck"] = value
    editor.save(m)
    msg = refusal(editor.root)
    assert MANIFEST in msg and "index.exact_recheck must be true or false" in msg


@pytest.mark.parametrize("value", ["bicubic", "", 3, None])
def test_an_unknown_resample_method_is_refused_by_name(editor, value):
    m = editor.manifest()
    m["geometry"]["resample"] = value
    editor.save(m)
    msg = refusal(editor.root)
    assert MANIFEST in msg and "geometry is invalid" in msg and "resample" in msg


def test_halve_area_in_a_schema_2_manifest_is_refused(editor):
    """A runtime that reads only schema 2 ignores geometry.resample: such a bundle must say 3, so that it refuses."""
    m = editor.manifest()
    m["schema_version"], m["geometry"]["resample"] = 2, "halve-area"
    editor.save(m)
    msg = refusal(editor.root)
    assert "geometry.resample 'halve-area' needs schema_version 3" in msg
    m["geometry"].pop("resample")      # a schema-2 bundle as the previous release wrote it: one INTER_AREA resize
    editor.save(m)
    assert Bundle.load(editor.root).geometry.resample == "area"


# ---- the manifest as hostile input ----------------------------------------------------------------------------
_MUTABLE = [
    ("schema_version",), ("geometry",), ("geometry", "input_size"), ("geometry", "roi"), ("geometry", "tiles"),
    ("geometry", "canvas_size"), ("geometry", "region_size"), ("geometry", "size_policy"), ("geometry", "resample"),
    ("variants", "int8", "review_threshold"),
    ("features",), ("features", "grid"), ("features", "dim"), ("index",), ("index", "dim"), ("index", "space"),
    ("index", "M"), ("index", "ef_search"), ("index", "seed_step"), ("index", "ef_seeded"), ("variants",), ("variants", "int8"), ("variants", "int8", "model"),
    ("variants", "int8", "index"), ("variants", "int8", "threshold"), ("variants", "int8", "bank_size"),
    ("variants", "int8", "golden"), ("variants", "int8", "golden", 0), ("variants", "int8", "golden", 0, "file"),
    ("variants", "int8", "golden", 0, "score"), ("variants", "int8", "golden_tolerance"), ("default_variant",),
    ("files",), ("files", MODEL), ("files", MODEL, "sha256"), ("files", MODEL, "bytes"), ("bundle_id",),
]
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=True),
                     st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=12),
                     st.sampled_from(["int8", "fp32", MODEL, "../x", "/etc/passwd", "l2"]))
_values = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(["file", "score", "sha256", "bytes", "x"]), inner,
                                                 max_size=3)), max_leaves=8)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=st.sampled_from(_MUTABLE), value=_values, delete=st.booleans())
def test_any_manifest_value_is_refused_cleanly_or_usable(bundle_copy, where, value, delete):
    """Whatever a manifest holds, loading raises BundleError or yields a bundle whose accessors work."""
    original = (bundle_copy / MANIFEST).read_bytes()
    m = yaml.safe_load(original)
    node = m
    for key in where[:-1]:
        node = node[key]
    if delete and isinstance(node, dict):
        node.pop(where[-1], None)
    else:
        node[where[-1]] = value
    try:
        (bundle_copy / MANIFEST).write_text(yaml.safe_dump(m, sort_keys=False))
        try:
            bundle = Bundle.load(bundle_copy)
        except BundleError as exc:
            assert str(bundle_copy) in str(exc)
            return
        bundle.geometry, bundle.grid, bundle.dim, bundle.hnsw_params, bundle.bundle_id
        variant = bundle.variant()
        assert variant.threshold > 0 and math.isfinite(variant.threshold)
        for g in variant.golden:
            bundle.path(g["file"])
    finally:
        (bundle_copy / MANIFEST).write_bytes(original)


def _model_with_input(path: Path, n_patches: int, dim: int, width: int, height: int, elem_type: int,
                      layout: list) -> None:
    """A graph that loads, with the manifest's output shape and the given input type and shape."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Shape", ["image"], ["s"]),
         helper.make_node("ConstantOfShape", ["dims"], ["patch_features"],
                          value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0]))], "odd_input",
        [helper.make_tensor_value_info("image", elem_type, layout)],
        [helper.make_tensor_value_info("patch_features", TensorProto.FLOAT, ["tiles", n_patches, dim])],
        initializer=[helper.make_tensor("dims", TensorProto.INT64, [3], [1, n_patches, dim])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


@pytest.mark.exporter  # builds an ONNX graph with the onnx package
@pytest.mark.parametrize("pixels, channels", [(True, 5), (True, 1), (False, 4)])
def test_a_model_taking_another_channel_count_is_refused(editor, pixels, channels):
    """Pixel graphs take RGB or RGBA (a 4th channel the first convolution ignores); float graphs RGB only."""
    from onnx import TensorProto

    bundle = Bundle.load(editor.root)
    (rows, cols), (width, height) = bundle.grid, bundle.geometry.input_size
    layout = ["tiles", height, width, channels] if pixels else ["tiles", channels, height, width]
    _model_with_input(editor.root / MODEL, rows * cols, bundle.dim, width, height,
                      TensorProto.UINT8 if pixels else TensorProto.FLOAT, layout)
    editor.repin(MODEL)
    with pytest.raises(FeatureError) as err:
        Pipeline(Bundle.load(editor.root), threads=1)
    want = "(tiles, H, W, 3 or 4) uint8" if pixels else "(tiles, 3, H, W) float32"
    assert MODEL in str(err.value) and want in str(err.value) and str(channels) in str(err.value)


@pytest.mark.parametrize("pinned", [3, 5, "4"])
def test_a_manifest_pinning_other_pixel_channels_than_the_model_takes_is_refused(editor, pinned):
    """The committed bundle's INT8 graph takes RGBA (the widened stem): a manifest that says otherwise describes
    another model, so the station names the field instead of running it."""
    assert Pipeline(Bundle.load(editor.root), threads=1).extractor.channels == 4
    m = editor.manifest()
    m["variants"]["int8"]["quantization"]["input_channels"] = pinned
    editor.save(m)
    with pytest.raises(BundleError) as err:
        Pipeline(Bundle.load(editor.root), threads=1)
    msg = str(err.value)
    assert MODEL in msg and "quantization.input_channels" in msg and "takes 4 pixel channels" in msg
    with pytest.raises(BundleError, match="input_channels"):
        load_pipeline(station(editor.root))
    m["variants"]["int8"]["quantization"].pop("input_channels")   # an older manifest pins none: it runs
    editor.save(m)
    assert Pipeline(Bundle.load(editor.root), threads=1).extractor.channels == 4
