"""A bundle fitted on frames over four times its canvas pins halve-area, and the device resamples as the fit did."""
import numpy as np
import pytest

from edge_runtime.bundle import SCHEMA_VERSION, Bundle
from edge_runtime.decode import load_image
from edge_runtime.geometry import resample
from edge_runtime.pipeline import Pipeline
from edge_runtime.preprocess import preprocess
from edge_runtime.self_test import run_self_test


@pytest.fixture(scope="module")
def small_canvas_bundle(synthetic_dataset, tmp_path_factory):
    from export.fit import FitSettings, fit

    out = tmp_path_factory.mktemp("bundles") / "canvas48"
    # 224 px frames onto a 48 px canvas (4.7x): one 2 x 2 halving, then INTER_AREA 112 -> 48.
    fit(synthetic_dataset, out, FitSettings(coreset_ratio=0.1, input_size=(48, 48), int8_calibration_images=16,
                                           cross_fit_folds=3))
    return out


def test_the_fit_pins_halve_area_in_a_schema_3_manifest(small_canvas_bundle):
    bundle = Bundle.load(small_canvas_bundle)
    assert bundle.manifest["schema_version"] == SCHEMA_VERSION == 3
    assert bundle.geometry.resample == "halve-area" and bundle.geometry.canvas_size == (48, 48)
    assert "2 x 2 box halvings" in bundle.manifest["geometry"]["interpolation"]


def test_the_device_reproduces_the_fit_through_the_halving(small_canvas_bundle, synthetic_dataset):
    report = run_self_test(small_canvas_bundle, threads=1)      # golden images: fit-time scores, device scores
    assert report.ok, report.failures
    bundle = Bundle.load(small_canvas_bundle)
    rgb = load_image(sorted((synthetic_dataset / "test" / "good").glob("*.png"))[0])
    tensor = preprocess(rgb, bundle.geometry)[0]
    # The halving is really on this path: one INTER_AREA from 224 would give other pixels.
    one_step = preprocess(rgb, bundle.geometry.__class__(**{**bundle.geometry.__dict__, "resample": "area"}))[0]
    assert not np.array_equal(tensor, one_step)
    canvas = resample(rgb, (48, 48), "halve-area")
    np.testing.assert_allclose(tensor[0].transpose(1, 2, 0), (canvas.astype(np.float32) - 127) / 128, atol=1e-6)
    pipe = Pipeline(bundle, threads=1)
    assert np.isfinite(pipe.score_rgb(rgb).score)
