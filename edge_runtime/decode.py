"""Decode: untrusted bytes or camera arrays -> a validated HxWx3 uint8 RGB image, or ImageError naming the frame.

Everything that arrives from outside (files, camera buffers) passes here first; turning a valid image into the
network's input is `preprocess`'s job.
"""
from __future__ import annotations

import os
import struct

# Refuse decompression bombs before they exhaust a small board's memory.
MAX_PIXELS = 50_000_000
# OpenCV's own decoder limit (default 2**30 pixels) is read when cv2 loads; lower it to ours as a second fence
# behind declared_size(). It only takes effect if nothing imported cv2 first, hence no reliance on it.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(MAX_PIXELS))

import cv2  # noqa: E402  (after the environment variable above)
import numpy as np  # noqa: E402

# The encoded formats the decode stage accepts: what line cameras and image folders deliver. Other OpenCV codecs
# (WebP, JPEG 2000, OpenEXR, HDR, PNM, ...) are refused before any decoder runs: less attack surface, and every
# accepted format has its dimensions checked from the header below before OpenCV allocates the image.
ENCODED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF")


class ImageError(ValueError):
    """The frame cannot be inspected (corrupt, empty, wrong shape): reported as FAULT with this reason."""


def _png_size(data: bytes) -> tuple[int, int]:
    # Signature (8) + IHDR length (4) + b"IHDR" (4) + width (4) + height (4), big-endian.
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise ValueError("PNG without an IHDR header")
    return struct.unpack(">II", data[16:24])


# JPEG start-of-frame markers (SOF0..SOF15 except DHT C4, JPG C8 and DAC CC) carry the frame size.
_SOF_MARKERS = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_size(data: bytes) -> tuple[int, int]:
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise ValueError(f"JPEG marker expected at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # stand-alone markers (TEM, RSTn): no length
            pos += 2
            continue
        if marker in (0xD9, 0xDA):
            break  # end of image or start of scan before any frame header
        length = struct.unpack(">H", data[pos + 2:pos + 4])[0]
        if length < 2:
            raise ValueError(f"JPEG segment with length {length} at byte {pos}")
        if marker in _SOF_MARKERS:
            if pos + 9 > len(data):
                break
            height, width = struct.unpack(">HH", data[pos + 5:pos + 9])
            return width, height
        pos += 2 + length
    raise ValueError("JPEG without a frame header (SOF) before the image data")


def _bmp_size(data: bytes) -> tuple[int, int]:
    if len(data) < 26:
        raise ValueError("BMP header is truncated")
    header_size = struct.unpack("<I", data[14:18])[0]
    if header_size == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
        return struct.unpack("<HH", data[18:22])
    width, height = struct.unpack("<ii", data[18:26])
    return abs(width), abs(height)  # negative height: rows stored top-down


def _tiff_size(data: bytes) -> tuple[int, int]:
    """Width and height from the first IFD (the page cv2.imdecode reads); samples per pixel must be <= 4."""
    end = "<" if data[:2] == b"II" else ">"
    (ifd,) = struct.unpack(end + "I", data[4:8])
    if ifd + 2 > len(data):
        raise ValueError("TIFF directory offset points past the end of the file")
    (count,) = struct.unpack(end + "H", data[ifd:ifd + 2])
    tags: dict[int, int] = {}
    for i in range(count):
        entry = data[ifd + 2 + 12 * i: ifd + 14 + 12 * i]
        if len(entry) < 12:
            raise ValueError("TIFF directory is truncated")
        tag, kind, n = struct.unpack(end + "HHI", entry[:8])
        if tag in (256, 257, 277) and n == 1 and kind in (3, 4):  # ImageWidth, ImageLength, SamplesPerPixel
            tags[tag] = struct.unpack(end + ("H" if kind == 3 else "I"), entry[8:10] if kind == 3 else entry[8:12])[0]
    if 256 not in tags or 257 not in tags:
        raise ValueError("TIFF without ImageWidth/ImageLength in its first directory")
    if tags.get(277, 1) > 4:
        raise ValueError(f"TIFF with {tags[277]} samples per pixel (at most 4 are supported)")
    return tags[256], tags[257]


def declared_size(data: bytes) -> tuple[str, int, int]:
    """(format, width, height) as the file's header declares them, read without decoding anything.

    Raises ValueError for a format outside ENCODED_FORMATS or a header that cannot be parsed.
    """
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return ("PNG", *_png_size(data))
    if data[:3] == b"\xff\xd8\xff":
        return ("JPEG", *_jpeg_size(data))
    if data[:2] == b"BM":
        return ("BMP", *_bmp_size(data))
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return ("TIFF", *_tiff_size(data))
    raise ValueError(f"not a {', '.join(ENCODED_FORMATS[:-1])} or {ENCODED_FORMATS[-1]} file (starts with {bytes(data[:8])!r})")


def decode_image(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Encoded image file -> HxWx3 uint8 RGB. Raises ImageError naming `name` and the reason.

    The header is checked before OpenCV sees the bytes: a file that declares more than MAX_PIXELS (a
    decompression bomb: a few kB of PNG can inflate to GBs) is refused without allocating the image.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageError(f"{name}: encoded frame must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise ImageError(f"{name}: empty file (0 bytes)")
    try:
        fmt, width, height = declared_size(data)
    except (ValueError, struct.error) as exc:
        raise ImageError(f"{name}: unsupported or corrupt image header ({exc})") from None
    if width < 1 or height < 1:
        raise ImageError(f"{name}: {fmt} header declares an empty {width}x{height} image")
    if width * height > MAX_PIXELS:
        raise ImageError(f"{name}: {fmt} header declares {width}x{height}, over the {MAX_PIXELS} pixel limit "
                         "(refused before decoding)")
    if fmt == "JPEG" and not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        # libjpeg (OpenCV 4.x) decodes a cut-off JPEG "successfully", filling the missing rows with grey:
        # a part that was never fully seen must not be inspected.
        raise ImageError(f"{name}: JPEG has no end-of-image marker (truncated file)")
    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        image = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        raise ImageError(f"{name}: cannot decode image ({exc.msg.strip() if hasattr(exc, 'msg') else exc})") from None
    if image is None:
        raise ImageError(f"{name}: not a decodable {fmt} image (truncated, corrupt or unsupported variant)")
    if image.shape[:2] != (height, width):
        # The decoder must not have produced something other than what the header declared.
        raise ImageError(f"{name}: decoded {image.shape[1]}x{image.shape[0]} but the {fmt} header declares {width}x{height}")
    return to_rgb(image, name, assume_bgr=True)


def to_rgb(image: np.ndarray, name: str = "<frame>", assume_bgr: bool = True) -> np.ndarray:
    """Any camera/file array (gray, BGR, BGRA, 16-bit) -> HxWx3 uint8 RGB, or ImageError."""
    if not isinstance(image, np.ndarray):
        raise ImageError(f"{name}: frame is a {type(image).__name__}, not an image array")
    if image.size == 0:
        raise ImageError(f"{name}: empty frame (shape {image.shape})")
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
        raise ImageError(f"{name}: unsupported shape {image.shape}; expected HxW, HxWx1, HxWx3 or HxWx4")
    h, w = image.shape[:2]
    if h < 8 or w < 8:
        raise ImageError(f"{name}: image {w}x{h} is too small (minimum 8x8)")
    if h * w > MAX_PIXELS:
        raise ImageError(f"{name}: image {w}x{h} exceeds the {MAX_PIXELS} pixel limit")
    if image.dtype.byteorder == (">" if np.little_endian else "<"):  # e.g. big-endian 16-bit from a file reader
        image = image.astype(image.dtype.newbyteorder("="))
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        if image.dtype.kind == "f" and np.isfinite(image).all() and image.max() <= 1.0 and image.min() >= 0.0:
            image = np.round(image * 255).astype(np.uint8)
        else:
            raise ImageError(f"{name}: unsupported pixel type {image.dtype}; expected 8- or 16-bit integers, or floats in [0, 1]")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    # Views with negative or odd strides (flipped, channel-reversed, Fortran order) are not valid cv::Mat input.
    image = np.ascontiguousarray(image)
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB if assume_bgr else cv2.COLOR_RGBA2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB) if assume_bgr else np.ascontiguousarray(image)


def load_image(path) -> np.ndarray:
    """Read an image file to RGB uint8 (used by the exporter and tools; the daemon decodes frame bytes)."""
    with open(path, "rb") as fh:
        return decode_image(fh.read(), str(path))
