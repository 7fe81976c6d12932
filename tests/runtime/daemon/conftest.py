"""Fixtures for the daemon tests: station files, image folders, and a Station running in a background thread."""
from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import pytest
import yaml

from edge_runtime.config import StationConfig, load_station
from edge_runtime.daemon import Station


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_log(path: Path) -> list[dict]:
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"", f"{path} does not end with a complete line"
    return [json.loads(line) for line in lines[:-1]]


def _wait_until(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _stop_on_fault(station: Station, text: str) -> None:
    """Stop `station` at the first loop round that finds its line in a fault naming `text`."""
    beat = station.line.on_heartbeat

    def stop_on_fault(line):
        beat(line)
        if line.fault_reason and text in line.fault_reason:
            station.request_stop()

    station.line.on_heartbeat = stop_on_fault


@pytest.fixture
def wait_until() -> Callable[..., None]:
    """wait_until(predicate, timeout=30, what=...): poll until true, else fail naming `what`."""
    return _wait_until


@pytest.fixture
def stop_on_fault() -> Callable[[Station, str], None]:
    """stop_on_fault(station, text): the station stops itself once its line faults with `text` in the reason."""
    return _stop_on_fault


@pytest.fixture
def free_port() -> Callable[[], int]:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    return _free_port


@pytest.fixture
def read_log() -> Callable[[Path], list[dict]]:
    """Every line of a result log, parsed; a torn line or invalid JSON fails the test."""
    return _read_log


# The defect type that is NG on every bundle the tests run: the fitted small_bundle and, on a device install, the
# committed tests/fixtures/device_bundle (96 px input), on which the subtle dents score below its threshold.
CLEAR_DEFECT = "missing_hole_"


def _copy_test_images(data_dir: Path, dest: Path) -> dict[str, tuple[Path, str]]:
    """Copy <data_dir>/test/<label>/*.png into one folder as <label>_<name>; returns copied name -> (original, label).

    Copies, not links: the folder source skips links that resolve outside its folder."""
    from export.dataset import test_images

    dest.mkdir(parents=True, exist_ok=True)
    index = {}
    for item in test_images(data_dir):
        name = f"{item.label}_{item.path.name}"
        shutil.copyfile(item.path, dest / name)
        index[name] = (item.path, item.label)
    return index


@pytest.fixture(scope="session")
def flange_test_folder(synthetic_dataset, tmp_path_factory) -> tuple[Path, dict[str, tuple[Path, str]]]:
    folder = tmp_path_factory.mktemp("flange_test_images")
    return folder, _copy_test_images(synthetic_dataset, folder)


@pytest.fixture
def copy_test_images() -> Callable[[Path, Path], dict[str, tuple[Path, str]]]:
    """copy_test_images(data_dir, dest): the test images of an MVTec-style data set flattened into one folder."""
    return _copy_test_images


@pytest.fixture
def write_station(tmp_path) -> Callable[..., Path]:
    """write_station(bundle=..., source=..., **more) -> path of a station YAML in tmp_path (http off unless given)."""

    def write(name: str = "station.yaml", **sections: Any) -> Path:
        sections.setdefault("http", {"enabled": False})
        path = tmp_path / name
        path.write_text(yaml.safe_dump({k: (str(v) if isinstance(v, Path) else v) for k, v in sections.items()}))
        return path

    return write


class RunningStation:
    """A Station whose run() executes in a thread; stop() requests a stop and returns run()'s exit code."""

    def __init__(self, station: Station) -> None:
        self.station = station
        self.exit_code: int | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="station-under-test", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.exit_code = self.station.run()
        except BaseException as exc:  # surfaced by join()
            self.error = exc

    def join(self, timeout: float = 60.0) -> int | None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "station did not stop"
        if self.error is not None:
            raise self.error
        return self.exit_code

    def stop(self, timeout: float = 60.0) -> int | None:
        self.station.request_stop()
        return self.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()


@pytest.fixture
def start_station() -> Callable[..., RunningStation]:
    """start_station(cfg_or_path, **Station kwargs) -> RunningStation; every one still running is stopped at teardown."""
    running: list[RunningStation] = []

    def start(cfg: StationConfig | Path, **kwargs: Any) -> RunningStation:
        if not isinstance(cfg, StationConfig):
            cfg = load_station(cfg)
        r = RunningStation(Station(cfg, **kwargs))
        running.append(r)
        return r

    yield start
    for r in running:
        if r.alive:
            r.station.request_stop()
            r._thread.join(30)


@pytest.fixture(scope="module")
def part_images_bytes(flange_test_folder) -> list[bytes]:
    """Encoded PNGs of two good and two defective test parts (missing holes: NG on every bundle the tests use)."""
    folder, index = flange_test_folder
    names = sorted(index)
    good = [n for n in names if n.startswith("good_")][:2]
    bad = [n for n in names if n.startswith(CLEAR_DEFECT)][:2]
    return [(folder / n).read_bytes() for n in good + bad]


@pytest.fixture(scope="module")
def good_part() -> bytes:
    """A synthetic flange part, PNG-encoded: the frame the GPIO tests inspect."""
    from export.synthetic_parts import _image_rng, render_part, sample_part_params

    image, _ = render_part(sample_part_params(_image_rng(0, 2, 0), 224))
    ok, png = cv2.imencode(".png", np.ascontiguousarray(image[..., ::-1]))
    assert ok
    return png.tobytes()
