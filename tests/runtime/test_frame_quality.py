"""Frame quality: brightness, sharpness and noise measured as fit measures them, the per-frame check against the manifest's
training band (a frame far outside it is a FAULT, never OK), and the rolling drift monitor's warnings."""
from __future__ import annotations

import logging

import cv2
import numpy as np
import pytest

from edge_runtime.bundle import Bundle
from edge_runtime.drift_monitor import DriftConfig, DriftMonitor
from edge_runtime.frame_quality import Band, FrameCheckConfig, FrameQuality, QualityBand, check, measure
from edge_runtime.pipeline import Pipeline
from edge_runtime.records import Frame, InspectionResult, Verdict
from edge_runtime.schema import ConfigError, from_mapping

BAND = QualityBand(200, Band(100.0, 120.0, 140.0), Band(200.0, 300.0, 400.0))
NOISY_BAND = QualityBand(200, Band(100.0, 120.0, 140.0), Band(200.0, 300.0, 400.0), Band(0.8, 1.0, 1.5))


def test_measure_reads_brightness_sharpness_and_noise_of_the_canvas():
    flat = np.full((64, 80, 3), 100, np.uint8)
    assert measure(flat) == FrameQuality(100.0, 0.0, 0.0)
    rng = np.random.default_rng(0)
    textured = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
    blurred = cv2.GaussianBlur(textured, (0, 0), 2.0)
    assert measure(blurred).sharpness < 0.1 * measure(textured).sharpness
    assert measure(textured // 2).brightness == pytest.approx(measure(textured).brightness / 2, abs=1)
    grey = cv2.cvtColor(textured, cv2.COLOR_RGB2GRAY)
    assert measure(grey) == measure(textured)          # a grey canvas measures as its RGB original
    lap = cv2.Laplacian(grey, cv2.CV_32F, ksize=1)     # sharpness is the Laplacian's variance, computed exactly
    assert measure(grey).sharpness == pytest.approx(float(lap.astype(np.float64).var()), rel=1e-9)


@pytest.mark.parametrize("sigma", [2.0, 4.0, 8.0])
def test_noise_is_the_pixel_noise_sigma_whatever_the_edges_and_shading(sigma):
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:240, 0:320]
    scene = 60 + 0.3 * xx + 0.2 * yy                          # shading
    scene[60:180, 100:220] += 50                              # a part with sharp edges
    clean = scene.clip(0, 255).astype(np.uint8)
    assert measure(clean).noise < 0.5     # edges and shading are not noise (rounding to uint8 is: sigma 0.29)
    noisy = (scene + rng.normal(0, sigma, scene.shape)).round().clip(0, 255).astype(np.uint8)
    assert measure(noisy).noise == pytest.approx(sigma, rel=0.1)


def test_the_band_round_trips_through_the_manifest_and_a_bad_entry_turns_the_checks_off():
    qualities = [FrameQuality(100 + i % 40, 200 + 5 * (i % 40), 1 + 0.01 * (i % 40)) for i in range(400)]
    band = QualityBand.of(qualities)
    assert band.n == 400 and 100 <= band.brightness.low < band.brightness.median < band.brightness.high <= 139
    assert 1 <= band.noise.low < band.noise.high <= 1.4
    again = QualityBand.from_manifest(band.to_manifest())
    assert again.brightness.median == pytest.approx(band.brightness.median, abs=1e-4)
    assert again.noise.high == pytest.approx(band.noise.high, abs=1e-4) and len(again.noise.percentiles) == 101
    older = {k: v for k, v in band.to_manifest().items() if k != "noise"}     # fitted before noise was recorded
    assert QualityBand.from_manifest(older).noise is None and QualityBand.from_manifest(older).sharpness is not None
    assert QualityBand.of([FrameQuality(100, 200)] * 3).noise is None
    for bad in (None, "x", {}, {"n": 3, "brightness": {"low": 5, "median": 1, "high": 9}, "sharpness": {}},
                {**band.to_manifest(), "sharpness": {"low": float("nan"), "median": 1, "high": 2}},
                {**band.to_manifest(), "noise": {"low": 2, "median": 1, "high": 3}}):
        assert QualityBand.from_manifest(bad) is None


@pytest.mark.parametrize("quality, rule", [
    (FrameQuality(49.0, 300.0), "frame brightness 49.0 is below 0.5 x the darkest training frames (100.0"),
    (FrameQuality(198.0, 300.0), "frame brightness 198.0 is above 197.5, halfway from the brightest"),
    (FrameQuality(120.0, 49.0), "frame sharpness 49.0 is below 0.25 x the least sharp training frames (200.0"),
    (FrameQuality(120.0, 1201.0), "frame sharpness 1201.0 is above 3 x the sharpest training frames (400.0)"),
])
def test_a_frame_far_outside_the_training_band_is_refused_with_the_rule(quality, rule):
    assert rule in check(quality, BAND)
    assert rule in check(quality, NOISY_BAND)


def test_a_noisy_frame_is_refused_where_the_bundle_recorded_noise():
    noisy = FrameQuality(120.0, 300.0, 4.6)
    assert "frame noise 4.60 grey levels is above 3 x the noisiest training frames' (1.50; median 1.00): sensor " \
           "gain" in check(noisy, NOISY_BAND)
    assert check(FrameQuality(120.0, 300.0, 4.4), NOISY_BAND) is None
    assert check(noisy, BAND) is None                        # a bundle without a noise band: not checked
    assert check(noisy, NOISY_BAND, FrameCheckConfig(noise=4.0)) is None


@pytest.mark.parametrize("quality", [FrameQuality(51.0, 300.0), FrameQuality(197.0, 51.0), FrameQuality(120.0, 1199.0),
                                     FrameQuality(120.0, 300.0, 4.4)])
def test_a_frame_within_the_limits_is_inspected(quality):
    assert check(quality, BAND) is None
    assert check(quality, NOISY_BAND) is None


def test_station_file_limits_are_validated_naming_the_key():
    with pytest.raises(ConfigError, match=r"frame_check.dark: must be in \[0, 1\], got 1.5"):
        from_mapping(FrameCheckConfig, {"dark": 1.5}, "frame_check")
    with pytest.raises(ConfigError, match="drift.window: must be 5..100000 parts, got 2"):
        from_mapping(DriftConfig, {"window": 2}, "drift")
    with pytest.raises(ConfigError, match="drift.score_ratio: must be > 1"):
        from_mapping(DriftConfig, {"score_ratio": 0.9}, "drift")


def _parts(synthetic_dataset, n=3):
    return [cv2.imread(str(p)) for p in sorted((synthetic_dataset / "test" / "good").glob("*.png"))[:n]]


def test_the_pipeline_refuses_a_dark_frame_and_records_the_quality_of_every_frame(small_bundle, synthetic_dataset):
    pipe = Pipeline(Bundle.load(small_bundle), threads=1)
    assert pipe.quality_band is not None, "fit records the training frames' band in the manifest"
    for i, img in enumerate(_parts(synthetic_dataset)):
        ok = pipe.inspect(Frame(frame_id=i, source="part.png", image=img))
        assert ok.verdict is not Verdict.FAULT and ok.quality is not None
        assert ok.to_record()["quality"] == ok.quality.to_record()
        lamp_out = pipe.inspect(Frame(frame_id=i, source="dark.png", image=(img * 0.2).astype(np.uint8)))
        assert lamp_out.verdict is Verdict.FAULT and lamp_out.score is None
        assert "dark.png: frame check: frame brightness" in lamp_out.error and "lamp, exposure or lens?" in lamp_out.error
        assert lamp_out.quality.brightness < 0.5 * pipe.quality_band.brightness.low
        blurred = pipe.inspect(Frame(frame_id=i, source="fog.png", image=cv2.GaussianBlur(img, (0, 0), 6.0)))
        assert blurred.verdict is Verdict.FAULT and "frame sharpness" in blurred.error
        grain = np.random.default_rng(i).normal(0, 40, img.shape)
        noisy = pipe.inspect(Frame(frame_id=i, source="gain.png", image=(img + grain).clip(0, 255).astype(np.uint8)))
        assert noisy.verdict is Verdict.FAULT and "gain.png: frame check: frame noise" in noisy.error
    pipe.frame_check = FrameCheckConfig(enabled=False)       # the station file turns the check off: inspected
    img = _parts(synthetic_dataset, 1)[0]
    assert pipe.inspect(Frame(frame_id=9, source="dark.png", image=(img * 0.2).astype(np.uint8))).score is not None
    pipe.frame_check, pipe.quality_band = FrameCheckConfig(), None     # a bundle fitted before the band: no check
    assert pipe.inspect(Frame(frame_id=9, source="dark.png", image=(img * 0.2).astype(np.uint8))).score is not None


def _result(score: float | None, brightness: float = 120.0, sharpness: float = 300.0, noise: float | None = None,
            verdict: Verdict = Verdict.OK) -> InspectionResult:
    return InspectionResult(frame_id=0, source="cam", verdict=verdict, score=score, normalized_score=None,
                            threshold=30.0, timings_ms={}, bundle_id="b1",
                            quality=FrameQuality(brightness, sharpness, noise))


def test_rolling_score_warning_holds_a_full_window_then_clears_and_is_logged_once(caplog):
    monitor = DriftMonitor(DriftConfig(window=5), good_score_median=20.0, band=BAND, bundle_id="b1")
    with caplog.at_level(logging.INFO, logger="edge_runtime.drift_monitor"):
        for _ in range(4):
            monitor.observe(_result(24.0))
        assert monitor.state().warnings == {}                  # 4 parts: the window is not full yet
        monitor.observe(_result(24.0))
        monitor.observe(_result(24.0))
        warning = monitor.state().warnings["score"]
        assert "median score of the last 5 parts 24.00 is 1.20 x the fit's good median 20.00 (limit 1.15 x)" in warning
        monitor.observe(_result(None, verdict=Verdict.FAULT))   # FAULTs are not evidence either way
        for _ in range(3):
            monitor.observe(_result(20.0))
        assert "score" not in monitor.state().warnings
    assert caplog.text.count("drift: median score") == 1 and caplog.text.count("drift: score back within bounds") == 1
    assert monitor.state().medians["score"] == 20.0


def test_rolling_brightness_and_sharpness_leave_the_band(caplog):
    monitor = DriftMonitor(DriftConfig(window=5), good_score_median=20.0, band=BAND, bundle_id="b1")
    for _ in range(5):
        monitor.observe(_result(20.0, brightness=94.0, sharpness=300.0))      # 100 x (1 - 5%) = 95
    assert set(monitor.state().warnings) == {"brightness"}
    for _ in range(5):
        monitor.observe(_result(20.0, brightness=120.0, sharpness=501.0))     # 400 x 1.25 = 500
    assert set(monitor.state().warnings) == {"sharpness"}
    for _ in range(5):
        monitor.observe(_result(20.0, brightness=146.0, sharpness=499.0))     # 140 x 1.05 = 147: inside
    assert monitor.state().warnings == {}
    assert "noise" not in monitor.state().checks                              # the bundle recorded no noise


def test_rolling_noise_leaves_the_band_where_the_bundle_recorded_it():
    monitor = DriftMonitor(DriftConfig(window=5), good_score_median=20.0, band=NOISY_BAND, bundle_id="b1")
    assert monitor.state().checks == ("score", "brightness", "sharpness", "noise")
    for _ in range(5):
        monitor.observe(_result(20.0, noise=1.8))                              # 1.5 x 1.25 = 1.875: inside
    assert monitor.state().warnings == {} and monitor.state().medians["noise"] == 1.8
    for _ in range(5):
        monitor.observe(_result(20.0, noise=1.9))
    assert "median noise of the last 5 parts 1.90 is outside 0.80-1.50 (+-25%)" in monitor.state().warnings["noise"]
    wide = DriftMonitor(DriftConfig(window=5, noise_margin=0.5), good_score_median=20.0, band=NOISY_BAND)
    for _ in range(5):
        wide.observe(_result(20.0, noise=1.9))
    assert wide.state().warnings == {}


def test_without_a_band_only_the_score_rule_runs_and_disabled_runs_none():
    older = DriftMonitor(DriftConfig(window=5), good_score_median=20.0, band=None)
    for _ in range(5):
        older.observe(_result(20.0, brightness=10.0))
    assert older.state().checks == ("score",) and older.state().warnings == {}
    off = DriftMonitor(DriftConfig(enabled=False, window=5), good_score_median=20.0, band=BAND)
    for _ in range(5):
        off.observe(_result(40.0, brightness=10.0))
    assert off.state().checks == () and off.state().warnings == {}


def test_the_median_band_narrows_with_the_window_as_the_median_of_good_frames_does():
    uniform = Band(1.0, 50.0, 99.0, tuple(float(v) for v in range(101)))     # percentile k is k
    low, high = uniform.median_band(50)
    assert low == pytest.approx(50 - 100 * 3.29 / (2 * 52 ** 0.5)) and high == pytest.approx(100 - low)
    assert uniform.median_band(500)[1] - uniform.median_band(500)[0] < high - low
    assert uniform.median_band(5) == (0.0, 100.0)                           # a short window: the whole range
    assert Band(1.0, 50.0, 99.0).median_band(50) is None                     # no percentiles: no median band
    # Simulated: medians of 50 frames drawn from the training distribution stay inside it (a false alarm is rare).
    rng = np.random.default_rng(0)
    training = rng.normal(108, 30, 714).clip(0, 255)
    band = QualityBand.of([FrameQuality(b, 300.0) for b in training]).brightness
    low, high = band.median_band(50)
    medians = np.median(rng.choice(training, size=(2000, 50)), axis=1)
    assert np.mean((medians < low) | (medians > high)) < 0.005
    assert low > band.low + 20 and high < band.high - 20                     # far narrower than one frame's band


def test_frames_the_check_refused_still_fill_the_brightness_window():
    monitor = DriftMonitor(DriftConfig(window=5), good_score_median=20.0, band=BAND, bundle_id="b1")
    for _ in range(5):
        monitor.observe(_result(None, brightness=30.0, verdict=Verdict.FAULT))   # a lamp at 20%: refused frames
    assert set(monitor.state().warnings) == {"brightness"} and monitor.state().medians["score"] is None


def test_a_malformed_band_turns_the_checks_off_and_says_so(device_bundle, caplog):
    bundle = Bundle.load(device_bundle)
    bundle.manifest["frame_quality"] = {"n": 3, "brightness": {"low": "dark"}}
    with caplog.at_level(logging.WARNING, logger="edge_runtime.pipeline"):
        pipe = Pipeline(bundle, threads=1)
    assert pipe.quality_band is None
    assert "the manifest's frame_quality is malformed: the frame check and the brightness, sharpness and noise " \
           "drift warnings are off" in caplog.text


def test_the_frame_check_turned_off_is_warned_about_at_validate(tmp_path, device_bundle):
    """Probe 66: `frame_check.enabled: false` validated and ran without a word, and a blurred frame got a verdict."""
    import subprocess
    import sys

    station = tmp_path / "station.yaml"
    body = f"bundle: {device_bundle}\nsource: {{type: folder, path: {tmp_path}}}\n"
    station.write_text(body + "frame_check: {enabled: false}\n")
    off = subprocess.run([sys.executable, "-m", "edge_runtime.cli", "validate", str(station)], capture_output=True,
                         text=True)
    assert off.returncode == 0 and "warning:" in off.stderr and \
        "frame_check.enabled: false: every frame is inspected whatever its brightness" in off.stderr
    station.write_text(body)
    on = subprocess.run([sys.executable, "-m", "edge_runtime.cli", "validate", str(station)], capture_output=True,
                        text=True)
    assert on.returncode == 0 and "frame_check" not in on.stderr
