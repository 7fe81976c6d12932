"""Shared fixtures: a small bundle fitted on the embedded synthetic data set, and the real data when present.

Without the exporter (a device install: no torch), `small_bundle` is the committed tests/fixtures/device_bundle
and tests marked `exporter` are skipped with the reason; see README "Testing on a device".
"""
from __future__ import annotations

import importlib.util
import shutil
import socket
from pathlib import Path

import pytest

import doubles  # noqa: F401  # registers the test doubles (type: scripted / recording) with the adapter registries

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
BOTTLE = SHARED_DATA / "mvtec_ad" / "bottle"
DEVICE_BUNDLE = REPO / "tests" / "fixtures" / "device_bundle"


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # hidden by tests/fixtures/no_torch, or a broken install
        return False


HAVE_EXPORTER = _installed("torch") and _installed("onnx")


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "exporter: needs the exporter (torch, onnx); skipped on a device install")


def pytest_collection_modifyitems(config, items) -> None:
    if HAVE_EXPORTER:
        return
    skip = pytest.mark.skip(reason="needs the exporter (torch, onnx), absent on this device install: run on a workstation")
    for item in items:
        if "exporter" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device_bundle(tmp_path_factory) -> Path:
    """A private copy of the committed device-test bundle (INT8 only, 64 px; tests/fixtures/make_device_bundle.py)."""
    dst = tmp_path_factory.mktemp("device") / "device_bundle"
    shutil.copytree(DEVICE_BUNDLE, dst)
    return dst


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory) -> Path:
    from export.synthetic_parts import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("data") / "flange", n_train=40, n_test_good=8,
                            n_test_defect_per_type=4, size=224, seed=0)


@pytest.fixture(scope="session")
def small_bundle(request, tmp_path_factory) -> Path:
    """A complete bundle (fp32 + int8, HNSW, golden images) fitted on the synthetic flange, ~20 s once per run.

    Without the exporter: the committed device bundle (int8 only) instead."""
    if not HAVE_EXPORTER:
        return request.getfixturevalue("device_bundle")
    from export.fit import FitSettings, fit

    out = tmp_path_factory.mktemp("bundles") / "flange"
    fit(request.getfixturevalue("synthetic_dataset"), out, FitSettings(coreset_ratio=0.05, int8_calibration_images=16))
    return out


@pytest.fixture(scope="session")
def bottle_dir() -> Path:
    if not BOTTLE.is_dir():
        pytest.skip(f"real data not present at {BOTTLE} (tests that make accuracy claims need ../shared/data)")
    return BOTTLE


@pytest.fixture(scope="session")
def bottle_bundle(bottle_dir, tmp_path_factory) -> Path:
    """Bottle fitted at a 1% coreset (shared/SEARCH.md: image AUROC unchanged vs 10%), ~40 s once per run."""
    from export.fit import FitSettings, fit

    out = tmp_path_factory.mktemp("bundles") / "bottle"
    fit(bottle_dir, out, FitSettings(coreset_ratio=0.01))
    return out


@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    """A real AF_UNIX datagram socket standing in for systemd's NOTIFY_SOCKET."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(30)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


@pytest.fixture(scope="session")
def anisotropic():
    """Factory of (bank, queries) whose variance falls off along rotated axes, like real patch features (so that
    the re-check's principal-axis bound prunes): anisotropic(seed, n, d, q, query_scale)."""
    import numpy as np

    def make(seed: int = 3, n: int = 6000, d: int = 64, q: int = 40, query_scale: float = 1.2):
        rng = np.random.default_rng(seed)
        scales = np.geomspace(4.0, 0.05, d).astype(np.float32)
        rot, _ = np.linalg.qr(rng.normal(size=(d, d)))
        bank = (rng.normal(size=(n, d)).astype(np.float32) * scales) @ rot.astype(np.float32)
        queries = (rng.normal(size=(q, d)).astype(np.float32) * scales * query_scale) @ rot.astype(np.float32)
        return bank, queries
    return make
