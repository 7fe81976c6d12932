"""`edge-runtime cameras`: the V4L2 video devices of this machine, with their pixel formats and frame sizes.

Names come from sysfs (/sys/class/video4linux/videoN/name); formats and sizes from the V4L2 ioctls
VIDIOC_QUERYCAP, VIDIOC_ENUM_FMT and VIDIOC_ENUM_FRAMESIZES, called through fcntl.ioctl on packed structs (no
extra dependency, nothing opened for streaming). The ioctl and open functions are parameters so tests can feed
the parsing the exact bytes a driver returns.
"""
from __future__ import annotations

import errno
import fcntl
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

# struct v4l2_capability: driver[16] card[32] bus_info[32] version capabilities device_caps reserved[3]
_CAP = struct.Struct("=16s32s32sIII3I")
# struct v4l2_fmtdesc: index type flags description[32] pixelformat mbus_code reserved[3]
_FMTDESC = struct.Struct("=III32sII3I")
# struct v4l2_frmsizeenum: index pixel_format type, union {discrete w h | stepwise 6 x u32}, reserved[2]
_FRMSIZE = struct.Struct("=III6I2I")

V4L2_BUF_TYPE_VIDEO_CAPTURE = 1
V4L2_CAP_VIDEO_CAPTURE = 0x00000001
V4L2_CAP_DEVICE_CAPS = 0x80000000
V4L2_FRMSIZE_TYPE_DISCRETE = 1


def _iowr(nr: int, size: int, read_only: bool = False) -> int:
    """Linux _IOWR('V', nr, size) (or _IOR when read_only): direction, size, type 'V', number."""
    direction = 2 if read_only else 3
    return (direction << 30) | (size << 16) | (ord("V") << 8) | nr


VIDIOC_QUERYCAP = _iowr(0, _CAP.size, read_only=True)
VIDIOC_ENUM_FMT = _iowr(2, _FMTDESC.size)
VIDIOC_ENUM_FRAMESIZES = _iowr(74, _FRMSIZE.size)

# (fd, request, mutable buffer) -> None; raises OSError (EINVAL past the last entry), like fcntl.ioctl.
Ioctl = Callable[[int, int, bytearray], object]
# path -> an open file descriptor, closed with os.close after the queries.
Opener = Callable[[str], int]


def _real_ioctl(fd: int, request: int, buf: bytearray) -> object:
    return fcntl.ioctl(fd, request, buf, True)


def _real_open(path: str) -> int:
    # Non-blocking and read-only: querying must never wait for or disturb a camera another process streams from.
    return os.open(path, os.O_RDONLY | os.O_NONBLOCK)


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace").strip()


def fourcc_text(code: int) -> str:
    """0x47504A4D -> 'MJPG'."""
    return "".join(chr((code >> (8 * i)) & 0xFF) for i in range(4)).strip()


@dataclass
class PixelFormat:
    fourcc: str                       # what a station file's source.fourcc takes, e.g. MJPG or YUYV
    description: str
    sizes: list[str] = field(default_factory=list)   # "1280x720", or a stepwise range "WxH-WxH step"


@dataclass
class VideoDevice:
    path: str                         # /dev/videoN
    name: str                         # sysfs name (the camera's product string)
    stable_paths: list[str] = field(default_factory=list)   # /dev/v4l/by-id|by-path links: survive re-plugging
    driver: str = ""
    bus: str = ""
    capture: bool = False             # False for UVC metadata nodes and other non-camera nodes
    formats: list[PixelFormat] = field(default_factory=list)
    error: str | None = None          # why the device could not be queried


def _enumerate(fd: int, ioctl: Ioctl, request: int, make: Callable[[int], bytes], limit: int = 256) -> list[bytearray]:
    """Call an ENUM ioctl with index 0, 1, ... until the driver answers EINVAL (the documented end)."""
    out = []
    for index in range(limit):   # bounded: a broken driver that never says EINVAL must not hang the listing
        buf = bytearray(make(index))
        try:
            ioctl(fd, request, buf)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                break
            raise
        out.append(buf)
    return out


def _frame_sizes(fd: int, ioctl: Ioctl, pixelformat: int) -> list[str]:
    sizes = []
    for buf in _enumerate(fd, ioctl, VIDIOC_ENUM_FRAMESIZES,
                          lambda i: _FRMSIZE.pack(i, pixelformat, 0, 0, 0, 0, 0, 0, 0, 0, 0)):
        _, _, kind, a, b, c, d, e, f, _, _ = _FRMSIZE.unpack(buf)
        if kind == V4L2_FRMSIZE_TYPE_DISCRETE:
            sizes.append(f"{a}x{b}")
        else:   # stepwise/continuous: min_width max_width step_width min_height max_height step_height
            sizes.append(f"{a}x{d}-{b}x{e} step {c}x{f}")
            break   # one range describes them all
    return sizes


def query_device(path: str, ioctl: Ioctl = _real_ioctl, opener: Opener = _real_open) -> VideoDevice:
    """Capabilities, formats and frame sizes of one /dev/videoN. Errors land in VideoDevice.error, never raise."""
    dev = VideoDevice(path=path, name="")
    try:
        fd = opener(path)
    except OSError as exc:
        hint = " (add the user to the 'video' group)" if exc.errno == errno.EACCES else ""
        dev.error = f"cannot open: {exc.strerror or exc}{hint}"
        return dev
    try:
        buf = bytearray(_CAP.size)
        ioctl(fd, VIDIOC_QUERYCAP, buf)
        driver, card, bus, _, caps, device_caps, *_ = _CAP.unpack(buf)
        dev.driver, dev.name, dev.bus = _text(driver), _text(card), _text(bus)
        # device_caps describes this node; capabilities the whole physical device (valid only without the flag).
        node_caps = device_caps if caps & V4L2_CAP_DEVICE_CAPS else caps
        dev.capture = bool(node_caps & V4L2_CAP_VIDEO_CAPTURE)
        if dev.capture:
            for fmt in _enumerate(fd, ioctl, VIDIOC_ENUM_FMT,
                                  lambda i: _FMTDESC.pack(i, V4L2_BUF_TYPE_VIDEO_CAPTURE, 0, b"", 0, 0, 0, 0, 0)):
                _, _, _, desc, pixelformat, *_ = _FMTDESC.unpack(fmt)
                dev.formats.append(PixelFormat(fourcc_text(pixelformat), _text(desc),
                                               _frame_sizes(fd, ioctl, pixelformat)))
    except OSError as exc:
        dev.error = f"V4L2 query failed: {exc.strerror or exc}"
    finally:
        os.close(fd)
    return dev


def _video_number(path: Path) -> int:
    m = re.search(r"(\d+)$", path.name)
    return int(m.group(1)) if m else -1


def list_cameras(dev_root: Path = Path("/dev"), sys_root: Path = Path("/sys/class/video4linux"),
                 ioctl: Ioctl = _real_ioctl, opener: Opener = _real_open) -> list[VideoDevice]:
    """Every /dev/video* node, in numeric order, with its sysfs name and stable links. Never raises for one device."""
    nodes = sorted((p for p in Path(dev_root).glob("video*") if re.fullmatch(r"video\d+", p.name)), key=_video_number)
    links: dict[str, list[str]] = {}
    for kind in ("by-id", "by-path"):
        folder = Path(dev_root) / "v4l" / kind
        if folder.is_dir():
            for link in sorted(folder.iterdir()):
                target = (folder / os.readlink(link)).resolve() if link.is_symlink() else None
                if target is not None:
                    links.setdefault(target.name, []).append(str(link))
    out = []
    for node in nodes:
        dev = query_device(str(node), ioctl, opener)
        try:
            sys_name = (Path(sys_root) / node.name / "name").read_text().strip()
        except OSError:
            sys_name = ""
        dev.name = sys_name or dev.name or "(unnamed)"
        dev.stable_paths = links.get(node.name, [])
        out.append(dev)
    return out


def format_cameras(devices: list[VideoDevice], dev_root: Path = Path("/dev")) -> str:
    """Human-readable listing; says plainly when there is no camera."""
    if not devices:
        return f"no V4L2 cameras found (checked {Path(dev_root) / 'video*'})"
    lines = []
    for d in devices:
        head = f"{d.path}  \"{d.name}\""
        if d.driver:
            head += f"  ({d.driver}{', ' + d.bus if d.bus else ''})"
        lines.append(head)
        if d.error:
            lines.append(f"  {d.error}")
            continue
        if not d.capture:
            lines.append("  no video capture (a metadata or output node, not the camera itself)")
            continue
        for link in d.stable_paths:
            lines.append(f"  stable path: {link}")
        for f in d.formats:
            lines.append(f"  {f.fourcc:<4} {f.description}: {', '.join(f.sizes) or 'sizes not reported'}")
    n = sum(1 for d in devices if d.capture and not d.error)
    lines.append(f"{n} capture device{'s' if n != 1 else ''}; in a station file: source: {{type: camera, device: "
                 "<path above, by-id preferred>, fourcc: <MJPG|YUYV>, width: W, height: H}")
    return "\n".join(lines)
