"""`edge-runtime cameras` (V4L2 listing, parsed from the bytes a driver returns) and `edge-runtime init`
(a commented station file that `edge-runtime validate` accepts as written)."""
from __future__ import annotations

import errno
import itertools
import os
import re
import struct
from pathlib import Path

import pytest
import yaml

from edge_runtime import cameras
from edge_runtime.cli import main as runtime_main
from edge_runtime.config import load_station
from edge_runtime.station_init import DEVICE_INT8_TARGET, OUTPUT_KINDS, InitError, parse_source, render_station


def _fourcc(text: str) -> int:
    return struct.unpack("<I", text.encode())[0]


class FakeUvcDriver:
    """Answers VIDIOC_QUERYCAP / ENUM_FMT / ENUM_FRAMESIZES like the uvcvideo driver, per open file descriptor."""

    def __init__(self):
        self.fds: dict[int, str] = {}
        # video0: the camera (MJPG at two sizes, YUYV at one, plus a stepwise GREY); video1: its metadata node.
        self.formats = [("MJPG", "Motion-JPEG", [(1920, 1080), (1280, 720)]), ("YUYV", "YUYV 4:2:2", [(640, 480)]),
                        ("GREY", "8-bit Greyscale", "stepwise")]

    def open(self, path: str) -> int:
        fd = os.open(os.devnull, os.O_RDONLY)
        self.fds[fd] = Path(path).name
        return fd

    def ioctl(self, fd: int, request: int, buf: bytearray) -> None:
        node = self.fds[fd]
        if request == cameras.VIDIOC_QUERYCAP:
            caps = cameras.V4L2_CAP_DEVICE_CAPS | 0x04200001 | 0x00800000
            device_caps = 0x04200001 if node == "video0" else 0x04800000   # capture+streaming | meta capture
            buf[:] = cameras._CAP.pack(b"uvcvideo", b"HD USB Camera: HD USB Camera", b"usb-0000:00:14.0-1",
                                       0x60100, caps, device_caps, 0, 0, 0)
        elif request == cameras.VIDIOC_ENUM_FMT:
            index, buf_type, *_ = cameras._FMTDESC.unpack(buf)
            assert buf_type == cameras.V4L2_BUF_TYPE_VIDEO_CAPTURE
            if index >= len(self.formats):
                raise OSError(errno.EINVAL, "Invalid argument")
            code, desc, _ = self.formats[index]
            buf[:] = cameras._FMTDESC.pack(index, buf_type, 0, desc.encode(), _fourcc(code), 0, 0, 0, 0)
        elif request == cameras.VIDIOC_ENUM_FRAMESIZES:
            index, pixfmt, *_ = cameras._FRMSIZE.unpack(buf)
            sizes = next(s for c, _, s in self.formats if _fourcc(c) == pixfmt)
            if sizes == "stepwise":
                if index > 0:
                    raise OSError(errno.EINVAL, "Invalid argument")
                buf[:] = cameras._FRMSIZE.pack(0, pixfmt, 3, 160, 1280, 16, 120, 960, 8, 0, 0)
                return
            if index >= len(sizes):
                raise OSError(errno.EINVAL, "Invalid argument")
            buf[:] = cameras._FRMSIZE.pack(index, pixfmt, cameras.V4L2_FRMSIZE_TYPE_DISCRETE, *sizes[index],
                                           0, 0, 0, 0, 0, 0)
        else:
            raise OSError(errno.ENOTTY, "Inappropriate ioctl for device")


def _fake_tree(tmp_path: Path) -> tuple[Path, Path]:
    dev, sysfs = tmp_path / "dev", tmp_path / "sys"
    (dev / "v4l" / "by-id").mkdir(parents=True)
    for n in (0, 1, 10):
        (dev / f"video{n}").touch()
        (sysfs / f"video{n}").mkdir(parents=True)
        (sysfs / f"video{n}" / "name").write_text("HD USB Camera: HD USB Camera\n")
    (dev / "videox").touch()                         # not a video node name: ignored
    os.symlink("../../video0", dev / "v4l" / "by-id" / "usb-HD_USB_Camera-video-index0")
    return dev, sysfs


def test_ioctl_numbers_are_the_kernels():
    # From linux/videodev2.h on x86-64 and aarch64 (same struct sizes on both).
    assert (cameras.VIDIOC_QUERYCAP, cameras.VIDIOC_ENUM_FMT, cameras.VIDIOC_ENUM_FRAMESIZES) == (
        0x80685600, 0xC0405602, 0xC02C564A)


def test_cameras_lists_formats_sizes_names_and_stable_paths(tmp_path):
    dev, sysfs = _fake_tree(tmp_path)
    drv = FakeUvcDriver()
    found = cameras.list_cameras(dev, sysfs, ioctl=drv.ioctl, opener=drv.open)
    assert [d.path for d in found] == [str(dev / "video0"), str(dev / "video1"), str(dev / "video10")]
    cam, meta = found[0], found[1]
    assert cam.capture and not meta.capture and cam.driver == "uvcvideo" and cam.bus == "usb-0000:00:14.0-1"
    assert cam.stable_paths == [str(dev / "v4l" / "by-id" / "usb-HD_USB_Camera-video-index0")]
    assert [(f.fourcc, f.sizes) for f in cam.formats] == [
        ("MJPG", ["1920x1080", "1280x720"]), ("YUYV", ["640x480"]), ("GREY", ["160x120-1280x960 step 16x8"])]
    text = cameras.format_cameras(found, dev)
    assert f'{dev / "video0"}  "HD USB Camera: HD USB Camera"  (uvcvideo, usb-0000:00:14.0-1)' in text
    assert "  MJPG Motion-JPEG: 1920x1080, 1280x720" in text
    assert "no video capture (a metadata or output node" in text
    assert "1 capture device;" in text        # video1 and video10 answer as metadata nodes
    before = len(os.listdir(f"/proc/{os.getpid()}/fd"))
    cameras.list_cameras(dev, sysfs, ioctl=drv.ioctl, opener=drv.open)
    assert len(os.listdir(f"/proc/{os.getpid()}/fd")) == before


def test_no_cameras_says_where_it_looked(tmp_path, capsys):
    (tmp_path / "dev").mkdir()
    assert runtime_main(["cameras", "--dev", str(tmp_path / "dev"), "--sysfs", str(tmp_path / "sys")]) == 0
    assert capsys.readouterr().out.strip() == f"no V4L2 cameras found (checked {tmp_path / 'dev' / 'video*'})"


def test_a_node_that_is_not_v4l2_is_reported_by_the_real_ioctl(tmp_path):
    # The real fcntl.ioctl path: a plain file answers ENOTTY, which names the failure instead of crashing.
    (tmp_path / "video3").write_bytes(b"")
    (d,) = cameras.list_cameras(tmp_path, tmp_path / "nosys")
    assert d.error and d.error.startswith("V4L2 query failed: Inappropriate ioctl")
    assert d.name == "(unnamed)"


def test_permission_denied_names_the_video_group(tmp_path):
    (tmp_path / "video0").touch()

    def denied(path):
        raise PermissionError(errno.EACCES, "Permission denied")

    (d,) = cameras.list_cameras(tmp_path, tmp_path, opener=denied)
    assert d.error == "cannot open: Permission denied (add the user to the 'video' group)"
    assert "cannot open: Permission denied" in cameras.format_cameras([d], tmp_path)


# --- init ---------------------------------------------------------------------------------------------------

def _bundle(tmp_path: Path, int8_target: str = "arm") -> Path:
    b = tmp_path / "bundle"
    b.mkdir(exist_ok=True)
    (b / "manifest.yaml").write_text(yaml.safe_dump({
        "bundle_id": "0123abcd", "backbone": {"name": "lite0"}, "geometry": {"input_size": [224, 224], "tiles": [[0, 0]], "size_policy": "refuse"},
        "default_variant": "int8", "fit": {"settings": {"int8_target": int8_target}}}))
    return b


SOURCES = ["camera:0", "camera:/dev/v4l/by-id/usb-Cam-video-index0", "folder:images", "video:line.mp4",
           "video:rtsp://10.0.0.20/stream1"]
OUTPUT_SETS = [list(c) for n in range(1, len(OUTPUT_KINDS) + 1) for c in itertools.combinations(OUTPUT_KINDS, n)]


def valid_file(out: Path, capsys) -> bool:
    """validate accepts the file itself (exit 0, or 1: valid, but what it names, such as this test's manifest-only
    bundle or a camera, is not on this machine)."""
    rc = runtime_main(["validate", str(out)])
    captured = capsys.readouterr()
    return rc in (0, 1) and f"{out}: valid" in captured.out and "invalid" not in captured.err


@pytest.mark.parametrize("source", SOURCES)
def test_every_source_and_output_combination_validates_as_written(tmp_path, source, capsys):
    bundle = _bundle(tmp_path)
    for i, outputs in enumerate(OUTPUT_SETS):
        out = tmp_path / "stations" / f"s{i}.yaml"
        assert runtime_main(["init", "--bundle", str(bundle), "--source", source, "--output", *outputs,
                             "--device", "pi5", "--out", str(out)]) == 0
        assert valid_file(out, capsys)
        cfg = load_station(out)
        assert [o.type for o in cfg.outputs] == (["result_log"] if "result_log" not in outputs else []) + outputs
        assert cfg.source.type == source.split(":")[0] and cfg.device == "pi5"
        assert Path(cfg.bundle) == bundle.resolve()
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("device", [None, *DEVICE_INT8_TARGET])
def test_every_device_validates_and_sets_its_values(tmp_path, device, capsys):
    out = tmp_path / "station.yaml"
    args = ["init", "--bundle", str(_bundle(tmp_path)), "--source", "camera:0", "--output", *OUTPUT_KINDS,
            "--out", str(out)] + (["--device", device] if device else [])
    assert runtime_main(args) == 0 and valid_file(out, capsys)
    cfg = load_station(out)
    assert cfg.device == device
    assert cfg.inference.threads == (4 if device in ("pi5", "pi4", "jetson-orin") else 2)
    assert cfg.recovery.exit_when_exhausted is False        # a live camera never ends


def test_default_output_is_a_result_log_and_paths_are_relative_to_the_station(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _bundle(tmp_path)
    (tmp_path / "photos").mkdir()
    assert runtime_main(["init", "--bundle", "bundle", "--source", "folder:photos", "--out", "conf/st.yaml"]) == 0
    text = (tmp_path / "conf" / "st.yaml").read_text()
    assert 'bundle: "../bundle"' in text and 'path: "../photos"' in text
    cfg = load_station(tmp_path / "conf" / "st.yaml")
    assert [o.type for o in cfg.outputs] == ["result_log"] and cfg.recovery.exit_when_exhausted is True
    assert Path(cfg.source.path) == tmp_path / "photos" and Path(cfg.bundle) == tmp_path / "bundle"


def test_every_setting_line_carries_a_comment(tmp_path):
    text, _ = render_station(_bundle(tmp_path), "camera:0", list(OUTPUT_KINDS), "pi5", tmp_path / "s.yaml")
    for line in text.splitlines():
        body = line.split("#", 1)[0].strip()
        if not body or body.endswith(":") or re.fullmatch(r"(- )?type: \w+", body):
            continue                       # section headers and type tags explain themselves
        assert "#" in line and ("default" in line or "required" in line), line


def test_init_refuses_bad_requests_with_the_reason(tmp_path, capsys):
    bundle = _bundle(tmp_path)
    out = tmp_path / "s.yaml"
    for bad, reason in ((["--source", "usb:0"], "expected camera:INDEX|DEVICE, folder:PATH or video:PATH|URL"),
                        (["--source", "folder:"], "expected camera:INDEX"),):
        assert runtime_main(["init", "--bundle", str(bundle), *bad, "--out", str(out)]) == 2
        assert reason in capsys.readouterr().err and not out.exists()
    assert runtime_main(["init", "--bundle", str(tmp_path / "nope"), "--source", "camera:0", "--out", str(out)]) == 2
    assert "nope/manifest.yaml (No such file or directory); give the folder `edge-export fit --out` wrote" in \
        capsys.readouterr().err
    with pytest.raises(InitError, match="each kind at most once"):
        render_station(bundle, "camera:0", ["gpio", "gpio"], None, out)
    out.write_text("keep me")
    assert runtime_main(["init", "--bundle", str(bundle), "--source", "camera:0", "--out", str(out)]) == 2
    assert "exists (use --force" in capsys.readouterr().err and out.read_text() == "keep me"
    assert runtime_main(["init", "--bundle", str(bundle), "--source", "camera:0", "--out", str(out), "--force"]) == 0

    # probe 100: --force onto a FIFO blocked for ever (open for writing waits for a reader); onto a folder, or
    # where nothing can be written, a traceback. Each is refused with the reason.
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    for bad, reason in ((fifo, "exists and is not a regular file"), (tmp_path, "exists and is not a regular file"),
                        (tmp_path / "s.yaml" / "x.yaml", "cannot write the station file")):
        assert runtime_main(["init", "--bundle", str(bundle), "--source", "camera:0", "--out", str(bad),
                             "--force"]) == 2
        assert reason in capsys.readouterr().err


def test_init_warns_when_the_bundle_was_quantised_for_another_cpu(tmp_path, capsys):
    bundle = _bundle(tmp_path, int8_target="x86-avx2")
    assert runtime_main(["init", "--bundle", str(bundle), "--source", "camera:0", "--device", "pi5",
                         "--out", str(tmp_path / "s.yaml")]) == 0
    err = capsys.readouterr().err
    assert "quantised for x86-avx2, but a pi5 wants arm: refit with `edge-export fit ... --device pi5`" in err
    assert runtime_main(["init", "--bundle", str(bundle), "--source", "camera:0", "--device", "x86",
                         "--out", str(tmp_path / "s2.yaml")]) == 0
    assert capsys.readouterr().err == ""


def test_fit_reads_the_device_from_an_init_station_file(tmp_path):
    from export.cli import _resolve_int8_target

    out = tmp_path / "s.yaml"
    assert runtime_main(["init", "--bundle", str(_bundle(tmp_path)), "--source", "camera:0", "--device",
                         "jetson-orin", "--out", str(out)]) == 0

    class A:
        device, int8_target, station = None, None, str(out)

    assert _resolve_int8_target(A()) == ("arm", f"device jetson-orin from {out}")


def test_parse_source():
    assert parse_source("camera:2") == ("camera", 2)
    assert parse_source("camera:/dev/video2") == ("camera", "/dev/video2")
    assert parse_source("video:rtsp://h/s") == ("video", "rtsp://h/s")
    for bad in ("camera:-1", "camera:99999"):   # named as the --source it is, not as an invalid generated file
        with pytest.raises(InitError, match=f"--source '{bad}': a camera index is 0-255"):
            parse_source(bad)


def test_a_service_station_file_writes_only_where_the_systemd_unit_allows(tmp_path, capsys):
    # The unit runs with ProtectSystem=strict: the station file lives under /etc (read-only to the service), so a
    # result log beside it would fail every write and every part would be a FAULT.
    unit = (Path(__file__).resolve().parents[2] / "systemd" / "edge-runtime.service").read_text()
    writable = next(line for line in unit.splitlines() if line.startswith("ReadWritePaths="))
    allowed = [Path(p) for p in writable.split("=", 1)[1].split()]
    out = tmp_path / "etc" / "station.yaml"
    assert runtime_main(["init", "--bundle", str(_bundle(tmp_path)), "--source", "camera:0", "--output", "result_log",
                         "ng_images", "--service", "--out", str(out)]) == 0
    cfg = load_station(out)
    paths = [Path(o.path) for o in cfg.outputs if o.type == "result_log"] + \
            [Path(o.dir) for o in cfg.outputs if o.type == "ng_images"]
    assert len(paths) == 2
    for path in paths:
        assert any(path.is_relative_to(root) for root in allowed), (path, allowed)
    # Without --service both stay beside the station file (a trial run as the user).
    assert runtime_main(["init", "--bundle", str(_bundle(tmp_path)), "--source", "camera:0", "--output", "result_log",
                         "ng_images", "--out", str(out), "--force"]) == 0
    cfg = load_station(out)
    assert {Path(o.path if o.type == "result_log" else o.dir).parent for o in cfg.outputs} == {out.parent}


def test_validate_says_a_valid_file_is_not_ready_when_its_bundle_or_source_is_missing_here(tmp_path, device_bundle,
                                                                                          capsys):
    photos = tmp_path / "photos"
    out = tmp_path / "station.yaml"
    assert runtime_main(["init", "--bundle", str(device_bundle), "--source", f"folder:{photos}", "--out", str(out)]) == 0
    capsys.readouterr()
    assert runtime_main(["validate", str(out)]) == 1        # the folder is not there
    captured = capsys.readouterr()
    assert f"source.path {photos}: no such folder here" in captured.out
    assert "valid, but not ready to run on this machine: 1 thing it needs missing here" in captured.out
    photos.mkdir()
    assert runtime_main(["validate", str(out)]) == 0
    assert capsys.readouterr().out.strip().endswith(f"{out}: valid")
    text = out.read_text().replace(str(device_bundle), str(tmp_path / "gone"))
    out.write_text(text.replace(f"bundle: {device_bundle}", f"bundle: {tmp_path / 'gone'}"))
    assert runtime_main(["validate", str(out)]) == 1
    assert "gone: bundle directory does not exist" in capsys.readouterr().out
    cam = tmp_path / "cam.yaml"
    assert runtime_main(["init", "--bundle", str(device_bundle), "--source", "camera:/dev/video97", "--out",
                         str(cam)]) == 0
    capsys.readouterr()
    assert runtime_main(["validate", str(cam)]) == 0      # a camera may be plugged in later: a note, still ready
    assert "source.device '/dev/video97': /dev/video97 does not exist here (`edge-runtime cameras`" in \
        capsys.readouterr().out


def _documented_defaults(text: str):
    """(line index, indent, key, default) of every `key: value  # ... (default: X)` line whose X is a plain value."""
    for i, line in enumerate(text.splitlines()):
        m = re.match(r"^(\s+)(\w+):\s*[^#]*#.*\(default: ([^);,]+)", line)
        if m:
            yield i, m.group(1), m.group(2), m.group(3).strip()


def test_every_default_init_states_is_the_one_the_code_uses(tmp_path):
    """Probe 73: init wrote `pulse_ms: 0 ... (default: 0)`, but a gpio output without pulse_ms pulses 200 ms."""
    import dataclasses

    bundle, checked = _bundle(tmp_path), set()
    for source in ("camera:0", "folder:photos", "video:clip.mp4", "video:rtsp://cam/x"):
        text, _ = render_station(bundle, source, list(OUTPUT_KINDS), "pi5", tmp_path / "s.yaml")
        lines = text.splitlines()
        for i, indent, key, default in _documented_defaults(text):
            try:
                yaml.safe_load(default)
            except yaml.YAMLError:
                continue
            stated, left_out = list(lines), list(lines)
            stated[i], left_out[i] = f"{indent}{key}: {default}", ""
            configs = []
            for variant in (stated, left_out):
                path = tmp_path / "v.yaml"
                path.write_text("\n".join(variant))
                try:
                    configs.append(load_station(path))
                except ValueError:
                    configs.append(None)   # a default in words ('unset', 'CPU only'): not a value to compare
            if None in configs:
                continue
            checked.add(key)
            assert dataclasses.asdict(configs[0]) == dataclasses.asdict(configs[1]), \
                f"{source}: {key}: init says the default is {default}, the code uses another"
    assert {"pulse_ms", "threads", "deadline_ms", "read_timeout_s", "port"} <= checked
