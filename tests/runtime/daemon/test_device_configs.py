"""The shipped device station files validate, and a broken station file is a ConfigError naming the file and key."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from edge_runtime.cli import main as cli_main
from edge_runtime.config import load_station
from edge_runtime.outputs import GpioConfig, ModbusConfig, NgImageStoreConfig, ResultLogConfig, SerialConfig
from edge_runtime.schema import ConfigError
from edge_runtime.sources import CameraSourceConfig, FolderSourceConfig, VideoSourceConfig

DEVICE_CONFIGS = Path(__file__).resolve().parents[3] / "device_configs"
BOARDS = ["jetson-orin-nano", "raspberry-pi-5", "x86-industrial-pc"]


@pytest.mark.parametrize("board", BOARDS)
def test_device_config_is_a_valid_station_file(board, capsys):
    path = DEVICE_CONFIGS / f"{board}.yaml"
    cfg = load_station(path)
    assert Path(cfg.bundle).is_absolute()
    assert isinstance(cfg.source, CameraSourceConfig)
    kinds = {type(o) for o in cfg.outputs}
    assert ResultLogConfig in kinds and NgImageStoreConfig in kinds
    assert cfg.inference.providers[-1] == "CPUExecutionProvider", "CPU last: it takes what the others cannot"
    assert cfg.recovery.exit_when_exhausted is False, "a live camera station must not exit"
    # Valid as shipped; on this machine its bundle (and camera) are not there, which validate says with exit 1.
    assert cli_main(["validate", str(path)]) == 1
    captured = capsys.readouterr()
    assert "warning:" not in captured.err, captured.err     # a shipped example passes its own security checks
    out = captured.out
    assert f"{path}: valid, but not ready to run on this machine" in out and f"bundle {cfg.bundle} not read here" in out


def test_board_specific_choices():
    jetson = load_station(DEVICE_CONFIGS / "jetson-orin-nano.yaml")
    assert jetson.inference.precision == "fp32"
    assert jetson.inference.providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    pi = load_station(DEVICE_CONFIGS / "raspberry-pi-5.yaml")
    assert pi.inference.precision == "int8" and pi.inference.threads == 4
    pi_gpio = next(o for o in pi.outputs if isinstance(o, GpioConfig))
    assert pi_gpio.chip == "/dev/gpiochip0" and {l.offset for l in pi_gpio.lines().values()} <= set(range(2, 28))
    x86 = load_station(DEVICE_CONFIGS / "x86-industrial-pc.yaml")
    assert x86.inference.precision == "int8"
    assert not any(isinstance(o, GpioConfig) for o in x86.outputs)
    assert any(isinstance(o, ModbusConfig) for o in x86.outputs) and any(isinstance(o, SerialConfig) for o in x86.outputs)


def write(tmp_path: Path, data) -> Path:
    path = tmp_path / "station.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


BASE = {"bundle": "bundle", "source": {"type": "folder", "path": "images"}}


@pytest.mark.parametrize("change, message", [
    ({"camera": {}}, "unknown key 'camera'"),
    ({"inference": {"threads": "four"}}, "inference.threads: expected an integer, got 'four'"),
    ({"inference": {"precision": "int4"}}, "inference.precision: expected one of 'int8', 'fp32', got 'int4'"),
    ({"outputs": [{"type": "result_log", "path": "r.jsonl", "fsync": "sometimes"}]},
     "outputs[0].fsync: expected one of 'always', 'never', got 'sometimes'"),
    ({"outputs": [{"type": "relay"}]}, "outputs[0].type: expected one of"),
    ({"source": {"type": "folder"}}, "source.path: required key is missing"),
    ({"recovery": {"backoff_initial_s": 5, "backoff_max_s": 1}}, "recovery: need 0 < backoff_initial_s <= backoff_max_s"),
    ({"bundle": None}, "bundle: expected a string, got None"),
    ({"bundle": ""}, "bundle: must name the bundle directory"),
])
def test_invalid_station_file_names_file_and_key(tmp_path, change, message):
    path = write(tmp_path, {**BASE, **change})
    with pytest.raises(ConfigError) as err:
        load_station(path)
    assert str(err.value).startswith(f"{path}: ")
    assert message in str(err.value)


def test_missing_bundle_and_unreadable_files(tmp_path):
    path = write(tmp_path, {"source": BASE["source"]})
    with pytest.raises(ConfigError, match=rf"^{path}: bundle: required key is missing$"):
        load_station(path)
    with pytest.raises(ConfigError, match=r"the station file is empty"):
        load_station(write(tmp_path, ""))
    with pytest.raises(ConfigError, match=r"not valid YAML"):
        load_station(write(tmp_path, "bundle: [unclosed"))
    with pytest.raises(ConfigError, match=r"cannot read station file"):
        load_station(tmp_path / "absent.yaml")


def test_cli_validate_reports_the_error(tmp_path, capsys):
    path = write(tmp_path, {**BASE, "inference": {"knn": "annoy"}})
    assert cli_main(["validate", str(path)]) == 2
    assert f"{path}: inference.knn: expected one of 'hnsw', 'hnswlib', 'exact', 'onnx', 'ivf', got 'annoy'" in capsys.readouterr().err


def test_relative_paths_resolve_against_the_station_file(tmp_path, monkeypatch):
    folder = tmp_path / "station"
    folder.mkdir()
    path = folder / "station.yaml"
    path.write_text(yaml.safe_dump({
        "bundle": "bundles/current",
        "source": {"type": "folder", "path": "incoming"},
        "outputs": [{"type": "result_log", "path": "logs/results.jsonl"}, {"type": "ng_images", "dir": "ng"}],
        "state_dir": "state",
        "security": {"bundle_public_key": "keys/release.pub"},
    }))
    monkeypatch.chdir(tmp_path)  # somewhere else: the daemon's working directory must not matter
    cfg = load_station(Path("station") / "station.yaml")
    assert cfg.bundle == str(folder / "bundles" / "current")
    assert cfg.source.path == str(folder / "incoming")
    assert cfg.outputs[0].path == str(folder / "logs" / "results.jsonl")
    assert cfg.outputs[1].dir == str(folder / "ng")
    assert cfg.state_dir == str(folder / "state")
    assert cfg.security.bundle_public_key == str(folder / "keys" / "release.pub")


def test_video_urls_and_absolute_paths_are_left_alone(tmp_path):
    stream = load_station(write(tmp_path, {**BASE, "source": {"type": "video", "path": "rtsp://cam/stream1"}}))
    assert isinstance(stream.source, VideoSourceConfig) and stream.source.path == "rtsp://cam/stream1"
    video = load_station(write(tmp_path, {**BASE, "source": {"type": "video", "path": "clips/line.mp4"}}))
    assert video.source.path == str(tmp_path / "clips" / "line.mp4")
    absolute = load_station(write(tmp_path, {**BASE, "source": {"type": "folder", "path": "/srv/images"}}))
    assert isinstance(absolute.source, FolderSourceConfig) and absolute.source.path == "/srv/images"


def test_unusable_values_name_the_file(tmp_path):
    path = write(tmp_path, 'bundle: b\nsource: {type: folder, path: "in\\0coming"}\n')
    with pytest.raises(ConfigError, match=rf"^{path}: source.path: not a usable path"):
        load_station(path)
    path = write(tmp_path, "bundle: b\nsource: {type: folder, path: f}\nname: 2001-13-45\n")
    with pytest.raises(ConfigError, match=rf"^{path}: not a usable YAML document"):
        load_station(path)


@pytest.mark.parametrize("board", BOARDS)
def test_shipped_gpio_gives_every_part_its_own_signal(board):
    """Level mode without a RESULT_VALID strobe lets a PLC sampling levels take part N's OK for part N+1."""
    cfg = load_station(DEVICE_CONFIGS / f"{board}.yaml")
    for gpio in (o for o in cfg.outputs if isinstance(o, GpioConfig)):
        assert gpio.pulse_ms > 0 or gpio.result_valid is not None, f"{board}: no per-part edge"
        assert gpio.review is not None or gpio.review_drives_ng(), f"{board}: REVIEW would show on no line"
    text = (DEVICE_CONFIGS / f"{board}.yaml").read_text()
    assert "pulse_ms: 0 " not in text and "latches on the frame's OK/NG edge" not in text
    for log in (o for o in cfg.outputs if isinstance(o, ResultLogConfig)):
        assert log.on_record_failure in ("fault", "halt")
    for store in (o for o in cfg.outputs if isinstance(o, NgImageStoreConfig)):
        assert store.min_free_mb > 0


def test_validate_says_a_provider_this_onnxruntime_lacks_is_not_ready_here(tmp_path, device_bundle, capsys,
                                                                           monkeypatch):
    # probe 109: the Jetson file with a CPU-only onnxruntime (INSTALL.md step 4's validate) said "valid", and the
    # daemon then stayed in FAULT at start naming the provider.
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    (tmp_path / "images").mkdir()
    path = write(tmp_path, {"bundle": str(device_bundle), "source": {"type": "folder", "path": "images"},
                            "inference": {"providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]}})
    assert cli_main(["validate", str(path)]) == 1
    out = capsys.readouterr().out
    assert "inference.providers: onnxruntime here has no CUDAExecutionProvider" in out
    assert f"{path}: valid, but not ready to run on this machine: 1 thing it needs missing here (the last note above)" in out
    path.write_text(path.read_text().replace("- CUDAExecutionProvider\n", ""))
    assert cli_main(["validate", str(path)]) == 0
