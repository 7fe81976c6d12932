import pytest
import torch

from export import backbone
from export.backbone import EfficientNetLiteTaps
from export.patch_features import PatchFeatures


@pytest.mark.parametrize("name,taps,channels", [("lite0", (4, 10), (40, 112)), ("lite2", (6, 14), (48, 120))])
def test_taps_match_the_published_layer_table(name, taps, channels):
    m = EfficientNetLiteTaps(name)
    assert m.tap_blocks == taps and m.channels == channels
    with torch.no_grad():
        f8, f16 = m(torch.zeros(1, 3, 224, 224))
    assert f8.shape == (1, channels[0], 28, 28) and f16.shape == (1, channels[1], 14, 14)


def test_weights_with_a_wrong_checksum_are_refused(monkeypatch):
    spec = backbone.BACKBONES["lite0"]
    monkeypatch.setitem(backbone.BACKBONES, "lite0", backbone.BackboneSpec(spec.name, spec.package, spec.locator, "0" * 64))
    with pytest.raises(RuntimeError, match="refusing to load"):
        backbone.load_state_dict("lite0")


def test_tf_padding_differs_from_symmetric_and_features_are_finite():
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        tf = PatchFeatures("lite0", padding="tf")(x)
        sym = PatchFeatures("lite0", padding="symmetric")(x)
        proj = PatchFeatures("lite0", projection_dim=64)(x)
    assert tf.shape == sym.shape == (1, 784, 152) and proj.shape == (1, 784, 64)
    assert torch.isfinite(tf).all() and (tf - sym).abs().max() > 1e-2


def test_imagenet_input_map_in_the_graph_equals_feeding_imagenet_statistics():
    """The runtime's tensor is (rgb - 127) / 128 for every bundle; the in-graph map must turn it into exactly
    (rgb / 255 - mean) / std, or the fit and the device would see different pixels."""
    from export.patch_features import IMAGENET_MEAN, IMAGENET_STD, input_norm

    rgb = torch.randint(0, 256, (2, 3, 64, 48)).float()
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        mapped = PatchFeatures("lite0", input_norm="imagenet")((rgb - 127) / 128)
        direct = PatchFeatures("lite0")((rgb / 255 - mean) / std)
        native = PatchFeatures("lite0")((rgb - 127) / 128)
    assert (mapped - direct).abs().max() < 1e-4 * direct.abs().max()
    assert (mapped - native).abs().max() > 1e-1          # the map is not a no-op
    assert input_norm("imagenet")["mean"] == list(IMAGENET_MEAN)
    with pytest.raises(ValueError, match="input normalisation"):
        PatchFeatures("lite0", input_norm="bgr")


@pytest.mark.parametrize("size", [1, 3, 5])
@pytest.mark.parametrize("hw", [(64, 64), (232, 208), (272, 240), (40, 120)])
def test_the_exported_matrix_head_computes_the_plain_aggregation(size, hw):
    """forward (what is exported: pooling and upsampling as one matrix per axis on channels-last taps) gives
    PatchCore's plain operations' features (avg_pool2d, bilinear F.interpolate, concatenation), on square and
    odd grids (a 232-px side: 29 stride-8 rows from 15 stride-16 rows)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, *hw)
    m = PatchFeatures("lite0", aggregation_size=size, projection_dim=64 if size == 5 else None)
    with torch.no_grad():
        exported, plain = m(x), m.reference(x)
    rows, cols = PatchFeatures.grid((hw[1], hw[0]))
    assert exported.shape == plain.shape == (2, rows * cols, m.dim)
    assert (exported - plain).abs().max() <= 1e-5 * plain.abs().max()
    if size > 1:     # and not merely the taps: the aggregation is there
        no_agg = PatchFeatures("lite0", aggregation_size=1, projection_dim=64 if size == 5 else None)
        with torch.no_grad():
            assert (no_agg(x) - plain).abs().max() > 1e-2
