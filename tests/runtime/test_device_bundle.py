"""The committed device-test bundle is current and usable with the device install alone (no torch)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from edge_runtime.bundle import Bundle
from edge_runtime.frame_quality import QualityBand
from edge_runtime.self_test import run_self_test

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
GENERATOR = FIXTURES / "make_device_bundle.py"
BUNDLE = FIXTURES / "device_bundle"
REGENERATE = f"stale fixture: run `python {GENERATOR.relative_to(REPO)}` on a workstation and commit the result"


def _generator_parameters() -> dict:
    spec = importlib.util.spec_from_file_location("make_device_bundle", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # imports no exporter code at module level
    return module.PARAMETERS


def test_committed_bundle_is_current_with_its_generator():
    bundle = Bundle.load(BUNDLE)                      # schema, checksums, consistency: the current format
    fixture = bundle.manifest.get("fixture", {})
    assert fixture.get("parameters") == _generator_parameters(), REGENERATE
    assert bundle.product == fixture["parameters"]["product"]
    assert bundle.bundle_version == fixture["parameters"]["bundle_version"]
    assert sorted(bundle.manifest["variants"]) == sorted(fixture["parameters"]["variants"])
    report = run_self_test(BUNDLE, threads=1)
    assert report.ok, f"{REGENERATE}: {report.failures}"
    # The training frames' band (the frame check and drift monitor): a fixture made before it was recorded is stale.
    band = QualityBand.from_manifest(bundle.manifest.get("frame_quality"))
    assert band is not None and band.noise is not None, REGENERATE


def test_committed_bundle_is_small():
    size = sum(p.stat().st_size for p in BUNDLE.rglob("*") if p.is_file())
    assert size < 2_000_000, f"{BUNDLE}: {size} bytes"


def test_device_path_needs_no_exporter_package():
    """`edge-runtime check` on the fixture bundle in a Python where torch and onnx cannot be imported."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(FIXTURES / "no_torch"), str(REPO)])}
    probe = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True, env=env, timeout=60)
    assert probe.returncode != 0 and "hidden by tests/fixtures/no_torch" in probe.stderr
    out = subprocess.run([sys.executable, "-m", "edge_runtime.cli", "check", str(BUNDLE), "--threads", "1"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "golden: " in out.stdout and "reproduce their scores" in out.stdout
    # What frames the station takes, from the manifest.
    assert "frames: 224x224 (size policy refuse), colour (a frame without colour is a FAULT), 16-bit pixels read " \
           "as v >> 8" in out.stdout, out.stdout
    assert "frame check: training frames' brightness " in out.stdout and "40 images, 0.5th-99.5th percentile" in \
        out.stdout, out.stdout


def test_generator_help_writes_nothing():
    """Probe 100: `make_device_bundle.py --help` ignored the option and regenerated the committed bundle."""
    before = (FIXTURES / "device_bundle" / "manifest.yaml").read_bytes()
    done = subprocess.run([sys.executable, str(GENERATOR), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "Regenerate the committed device-test bundle" in done.stdout
    assert (FIXTURES / "device_bundle" / "manifest.yaml").read_bytes() == before
