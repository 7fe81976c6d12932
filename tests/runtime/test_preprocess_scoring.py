import cv2
import numpy as np
import pytest

from edge_runtime import scoring
from edge_runtime.pipeline import decide
from edge_runtime.geometry import Geometry
from edge_runtime.decode import ImageError, decode_image, to_rgb
from edge_runtime.preprocess import preprocess
from edge_runtime.records import Verdict


def png(img) -> bytes:
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


@pytest.mark.parametrize("shape", [(37, 53), (37, 53, 1), (37, 53, 3), (37, 53, 4)])
def test_any_channel_count_becomes_rgb(shape):
    img = np.random.default_rng(0).integers(0, 255, size=shape, dtype=np.uint8)
    rgb = decode_image(png(img), "x.png")
    assert rgb.shape == (37, 53, 3) and rgb.dtype == np.uint8
    x, _, region_hw = preprocess(rgb, Geometry((64, 48), (64, 48), ((0, 0),), size_policy="resize"))
    assert x.shape == (1, 3, 48, 64) and x.dtype == np.float32 and region_hw == (37, 53)


def test_sixteen_bit_and_bgr_order():
    bgr = np.zeros((20, 20, 3), np.uint16)
    bgr[..., 0] = 65535  # blue in OpenCV's order
    rgb = decode_image(png(bgr))
    assert rgb[0, 0].tolist() == [0, 0, 255]


@pytest.mark.parametrize("data,reason", [(b"", "empty"), (b"not an image at all", "not a|corrupt")])
def test_bad_bytes_give_a_reason(data, reason):
    with pytest.raises(ImageError, match=reason):
        decode_image(data, "part_17.png")


def test_bad_arrays_name_the_problem():
    with pytest.raises(ImageError, match="unsupported shape"):
        to_rgb(np.zeros((10, 10, 2), np.uint8), "cam0")
    with pytest.raises(ImageError, match="too small"):
        to_rgb(np.zeros((4, 4), np.uint8), "cam0")


def test_score_definition():
    patch = np.zeros(28 * 28, np.float32)
    patch[28 * 10 + 5] = 7.0
    assert scoring.image_score(patch) == 7.0
    m = scoring.anomaly_map(patch, Geometry((224, 224), (224, 224), ((0, 0),)))
    assert m.shape == (224, 224)
    y, x = np.unravel_index(np.argmax(m), m.shape)
    assert abs(y - (10.5 * 8)) <= 8 and abs(x - (5.5 * 8)) <= 8   # the hot spot stays where the patch is
    assert scoring.normalized_score(6.0, 6.0) == 0.5 and scoring.normalized_score(3.0, 6.0) == 0.25
    assert scoring.normalized_score(100.0, 6.0) == 1.0


def test_decision_is_fail_safe_on_nan():
    assert decide(float("nan"), 1.0) is Verdict.NG
    assert decide(float("nan"), 1.0, 0.5) is Verdict.NG
    assert decide(0.99, 1.0) is Verdict.OK


def test_review_band_is_never_ok():
    assert decide(0.49, 1.0, 0.5) is Verdict.OK
    assert decide(0.5, 1.0, 0.5) is Verdict.REVIEW
    assert decide(0.99, 1.0, 0.5) is Verdict.REVIEW
    assert decide(1.0, 1.0, 0.5) is Verdict.NG
    assert decide(float("inf"), 1.0, 0.5) is Verdict.NG
    assert decide(1.0, 1.0) is Verdict.NG
