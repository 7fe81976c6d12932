"""The same images through torch reference, ONNX FP32 and ONNX INT8: features and scores agree."""
import numpy as np
import pytest

from edge_runtime.bundle import Bundle
from edge_runtime.pipeline import Pipeline
from edge_runtime.decode import load_image
from edge_runtime.preprocess import preprocess
from export.dataset import test_images as list_test_images
from export.reference import ReferenceScorer


@pytest.fixture(scope="module")
def engines(small_bundle):
    b = Bundle.load(small_bundle)
    return b, ReferenceScorer(b), Pipeline(b, "fp32", "exact"), Pipeline(b, "int8", "hnsw")


def test_torch_onnx_fp32_int8_parity(engines, synthetic_dataset):
    b, ref, fp32, int8 = engines
    items = list_test_images(synthetic_dataset)[::3]
    sig = noise = 0.0
    for it in items:
        x = preprocess(load_image(it.path), b.geometry)[0]
        f_ref = ref.features(x).numpy()
        f32 = fp32.extractor(x)
        f8 = int8.extractor(x)
        assert np.abs(f32 - f_ref).max() < 1e-3 * max(1.0, np.abs(f_ref).max())
        sig += float(np.sum(f32.astype(np.float64) ** 2))
        noise += float(np.sum((f8.astype(np.float64) - f32) ** 2))
        s_ref, s32 = ref.score_tiles(x).max(), fp32.score_tiles(x).max()
        assert abs(s_ref - s32) <= 1e-3 * s_ref
    sqnr_db = 10 * np.log10(sig / noise)
    assert sqnr_db > 12, f"INT8 features too noisy: SQNR {sqnr_db:.1f} dB"


def test_int8_and_fp32_agree_on_the_verdicts(engines, synthetic_dataset):
    b, _, fp32, int8 = engines
    for it in list_test_images(synthetic_dataset):
        rgb = load_image(it.path)
        v32 = fp32.score_rgb(rgb).score >= fp32.threshold
        v8 = int8.score_rgb(rgb).score >= int8.threshold
        if it.is_defect:
            assert v32 and v8, f"{it.path} escaped"


def test_golden_scores_reproduce(small_bundle):
    from edge_runtime.self_test import run_self_test

    for precision in ("fp32", "int8"):
        report = run_self_test(small_bundle, precision=precision)
        assert report.ok, report.failures


def test_imagenet_input_map_parity_and_manifest(synthetic_dataset, tmp_path):
    """A bundle fitted with --input-norm imagenet: the map is in the ONNX graphs (the device tensor is unchanged),
    the manifest records it, and torch reference, ONNX FP32 and INT8 agree on the same images."""
    import yaml

    from export.fit import FitSettings, fit

    out = tmp_path / "imagenet"
    fit(synthetic_dataset, out, FitSettings(coreset_ratio=0.05, int8_calibration_images=8, cross_fit_folds=0,
                                            input_norm="imagenet"))
    m = yaml.safe_load((out / "manifest.yaml").read_text())
    assert m["features"]["input_norm"]["name"] == "imagenet"
    b = Bundle.load(out)
    ref, fp32, int8 = ReferenceScorer(b), Pipeline(b, "fp32", "exact"), Pipeline(b, "int8", "hnsw")
    assert ref.model.input_norm == "imagenet"
    for it in list_test_images(synthetic_dataset)[::4]:
        x = preprocess(load_image(it.path), b.geometry)[0]
        f_ref = ref.features(x).numpy()
        assert np.abs(fp32.extractor(x) - f_ref).max() < 1e-3 * max(1.0, np.abs(f_ref).max())
        s_ref = ref.score_tiles(x).max()
        assert abs(s_ref - fp32.score_tiles(x).max()) <= 1e-3 * s_ref
        assert int8.score_rgb(load_image(it.path)).score > 0
    from edge_runtime.self_test import run_self_test

    assert run_self_test(out, precision="int8").ok


def test_int8_graph_quantises_the_backbone_and_keeps_the_head_float(small_bundle):
    """The convolutions run in INT8; the 3x3 aggregation, upsampling and layout after the taps stay float
    (QLinearAveragePool was the slowest op per node of the INT8 run): no QuantizeLinear after any head node. The
    aggregation is matrix products on channels-last taps (PatchFeatures.forward): no pool, no final transpose."""
    import onnx

    from export.onnx_export import FLOAT_HEAD_OPS

    b = Bundle.load(small_bundle)
    graph = onnx.load(str(b.path(b.variant("int8").model_file))).graph
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    head = [n for n in graph.node if n.op_type in FLOAT_HEAD_OPS]
    assert any(n.op_type == "MatMul" for n in head)
    assert not any(n.op_type == "AveragePool" for n in graph.node)
    last = next(n for n in graph.node if graph.output[0].name in n.output)
    assert last.op_type != "Transpose"
    for node in head:
        for out in node.output:
            assert "QuantizeLinear" not in consumers.get(out, []), f"{node.name} ({node.op_type}) is quantised"
    convs_fed_by_dq = [n for n in graph.node if n.op_type == "Conv"
                       and any(i in {d.output[0] for d in graph.node if d.op_type == "DequantizeLinear"} for i in n.input)]
    assert convs_fed_by_dq, "the backbone's convolutions are not quantised"
    assert b.manifest["variants"]["int8"]["quantization"]["float_head_ops"] == list(FLOAT_HEAD_OPS)


def test_int8_graph_takes_the_pixels_and_scores_as_the_float_tensor_does(small_bundle, synthetic_dataset):
    """The INT8 graph's input is the tiles' uint8 RGB pixels, NHWC (input quantised at 1/128, zero point 127):
    fed the pixels or the float tensor it gives bit-identical features, and the station's path (pixels) scores a
    frame exactly as the evaluation path (float tensor) does."""
    import cv2
    import onnx

    from edge_runtime.features import FeatureError, FeatureExtractor
    from edge_runtime.records import Frame

    b = Bundle.load(small_bundle)
    variant = b.variant("int8")
    graph = onnx.load(str(b.path(variant.model_file))).graph
    inp = graph.input[0]
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    # RGB and a 4th channel the first convolution ignores (export.onnx_export.widen_pixel_input)
    assert [d.dim_value for d in inp.type.tensor_type.shape.dim][1:] == [*b.geometry.input_size[::-1], 4]
    assert variant.info["quantization"]["input_channels"] == 4
    assert not [n for n in graph.node if n.op_type == "QuantizeLinear" and inp.name in n.input]
    assert variant.info["quantization"]["input"].startswith("uint8 RGB pixels, NHWC")
    pipe = Pipeline(b, "int8", "hnsw", threads=1)
    assert pipe.extractor.takes_pixels and not Pipeline(b, "fp32", "exact", threads=1).extractor.takes_pixels
    for it in list_test_images(synthetic_dataset)[::5]:
        rgb = load_image(it.path)
        x = preprocess(rgb, b.geometry)[0]
        pixels = np.rint(x * 128 + 127).astype(np.uint8).transpose(0, 2, 3, 1)
        assert np.array_equal(pixels.transpose(0, 3, 1, 2), (x * 128 + 127).astype(np.uint8))   # exact inverse
        assert np.array_equal(pipe.extractor(x), pipe.extractor(pixels))
        frame = Frame(frame_id=1, source=str(it.path), image=cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        assert pipe.inspect(frame).score == pipe.score_rgb(rgb).score
    with pytest.raises(FeatureError, match="does not match the manifest's input_size"):
        w, h = b.geometry.input_size
        FeatureExtractor(b.read_verified(variant.model_file), (b.grid[0] * b.grid[1], b.dim, (w + 16, h), 1))


def test_the_4_channel_int8_graph_gives_the_3_channel_graphs_features(small_bundle, synthetic_dataset, tmp_path):
    """The fitted INT8 graph takes a 4th pixel channel (onnxruntime's faster stem kernel): the features are bit
    for bit those of the same graph over RGB alone (what bundles before it shipped), and the station feeds it."""
    from edge_runtime.features import FeatureExtractor
    from export.onnx_export import narrow_pixel_input

    b = Bundle.load(small_bundle)
    variant = b.variant("int8")
    narrow = tmp_path / "rgb.onnx"
    narrow.write_bytes(b.read_verified(variant.model_file))
    assert narrow_pixel_input(narrow)
    pipe = Pipeline(b, "int8", "hnsw", threads=1)
    assert pipe.extractor.channels == 4
    rgb_only = FeatureExtractor(narrow, (b.grid[0] * b.grid[1], b.dim, b.geometry.input_size, b.geometry.n_tiles),
                                threads=1)
    assert rgb_only.channels == 3
    for it in list_test_images(synthetic_dataset)[::3]:
        x = preprocess(load_image(it.path), b.geometry)[0]
        pixels = np.rint(x * 128 + 127).astype(np.uint8).transpose(0, 2, 3, 1)
        assert np.array_equal(pipe.extractor(pixels), rgb_only(pixels))
        assert np.array_equal(pipe.extractor(x), rgb_only(x))
