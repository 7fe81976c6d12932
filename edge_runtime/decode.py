"""Decode: untrusted bytes or camera arrays -> a validated HxWx3 uint8 RGB image, or ImageError naming the frame.

Everything that arrives from outside (files, camera buffers) passes here first; turning a valid image into the
network's input is `preprocess`'s job.
"""
from __future__ import annotations

import os
import re
import struct
import zlib
from dataclasses import dataclass

# Refuse decompression bombs before they exhaust a small board's memory.
MAX_PIXELS = 50_000_000
# 16-bit pixels -> 8-bit: v >> SHIFT_16BIT (the top byte, right for a camera's full-range 16-bit frames). A bundle
# fitted on narrower data (12-bit sensor values in 16-bit files) pins a smaller shift, clipped at 255
# (preprocessing.shift_16bit; export/fit.py sixteen_bit_shift).
SHIFT_16BIT = 8
# OpenCV's own decoder limit (default 2**30 pixels) is read when cv2 loads; lower it to ours as a second fence
# behind declared_size(). It only takes effect if nothing imported cv2 first, hence no reliance on it.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(MAX_PIXELS))

import cv2  # noqa: E402  (after the environment variable above)
import numpy as np  # noqa: E402
import simplejpeg  # noqa: E402

# The encoded formats the decode stage accepts: what line cameras and image folders deliver. Other OpenCV codecs
# (WebP, JPEG 2000, OpenEXR, HDR, PNM, ...) are refused before any decoder runs: less attack surface, and every
# accepted format has its dimensions checked from the header below before OpenCV allocates the image.
ENCODED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF")


class ImageError(ValueError):
    """The frame cannot be inspected (corrupt, empty, wrong shape): reported as FAULT with this reason."""


@dataclass(kw_only=True)
class DecodeConfig:
    """Station file `decode:` section: what a frame may cost before any decoder runs.

    Decode time grows with the work the file asks for, not with its pixel count alone: a progressive JPEG
    can repeat its scans thousands of times (each one a pass over every block), so the header walk counts
    them and refuses files that ask for more than `max_jpeg_scans`. `max_bytes_per_pixel` bounds the file
    size against the declared pixels (8 = uncompressed 16-bit RGBA; real files are far below), plus a fixed
    `metadata_allowance_bytes` for EXIF/ICC blocks on small images.
    """

    accept_multipage: bool = False         # multi-page TIFF / animated PNG: inspect the first page (true) or FAULT
    max_jpeg_scans: int = 64               # progressive JPEGs normally have ~10 scans, baseline ones 1
    max_bytes_per_pixel: float = 8.0
    metadata_allowance_bytes: int = 1 << 20

    def validate(self) -> None:
        if not 1 <= self.max_jpeg_scans <= 10_000:
            raise ValueError(f"max_jpeg_scans: must be 1..10000, got {self.max_jpeg_scans}")
        if not 0 < self.max_bytes_per_pixel <= 64:
            raise ValueError(f"max_bytes_per_pixel: must be > 0 and <= 64, got {self.max_bytes_per_pixel}")
        if not 0 <= self.metadata_allowance_bytes <= 64 << 20:
            raise ValueError(f"metadata_allowance_bytes: must be 0..{64 << 20}, got {self.metadata_allowance_bytes}")


DEFAULT_LIMITS = DecodeConfig()


def _png_size(data: bytes) -> tuple[int, int]:
    # Signature (8) + IHDR length (4) + b"IHDR" (4) + width (4) + height (4), big-endian.
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise ValueError("PNG without an IHDR header")
    return struct.unpack(">II", data[16:24])


# JPEG start-of-frame markers (SOF0..SOF15 except DHT C4, JPG C8 and DAC CC) carry the frame size.
_SOF_MARKERS = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


# The next marker in entropy-coded data: 0xFF followed by neither a stuffed 0x00, RSTn nor another 0xFF (fill bytes
# before a marker: the match is the last 0xFF and its marker). A leading "\xff+" made the search try every byte
# (3 ms over a 5 MP frame's 300 kB, twice per decode); a fixed first byte is found by a fast scan (0.1 ms).
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


def _jpeg_segments(data: bytes):
    """(marker, byte position) of each JPEG segment that has a length, in file order; the entropy-coded data after
    a start of scan is skipped to the next marker. Ends at EOI or the end of the data.

    Raises ValueError for a structure that cannot be walked (the one walker for size and scan count)."""
    pos = 2
    while pos + 2 <= len(data):
        if data[pos] != 0xFF:
            raise ValueError(f"JPEG marker expected at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:  # end of image
            return
        if marker in (0x01, *range(0xD0, 0xD8)):  # stand-alone markers (TEM, RSTn): no length
            pos += 2
            continue
        if pos + 4 > len(data):
            return
        length = struct.unpack(">H", data[pos + 2:pos + 4])[0]
        if length < 2:
            raise ValueError(f"JPEG segment with length {length} at byte {pos}")
        yield marker, pos
        pos += 2 + length
        if marker == 0xDA:
            found = _NEXT_MARKER.search(data, pos)
            if found is None:
                return
            pos = found.end() - 2  # at the 0xFF of the marker byte pair


def _jpeg_end(data: bytes) -> int | None:
    """The byte just past the image's end-of-image marker (EOI), found by walking the segments (an EOI inside a
    segment, e.g. of the EXIF thumbnail, is not the image's), or None when the data ends first (truncated).
    Bytes after it are a trailer that some cameras and phones append (motion photos, vendor data), not image."""
    pos = 2
    while pos + 2 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
        elif marker == 0xD9:
            return pos + 2
        elif marker in (0x01, *range(0xD0, 0xD8)):
            pos += 2
        elif pos + 4 > len(data):
            return None
        else:
            length = struct.unpack(">H", data[pos + 2:pos + 4])[0]
            if length < 2:
                return None
            pos += 2 + length
            if marker == 0xDA:
                found = _NEXT_MARKER.search(data, pos)
                if found is None:
                    return None
                pos = found.end() - 2
    return None


def _jpeg_frame(data: bytes) -> tuple[int, int, int, list[tuple[int, int, int]]]:
    """(SOF marker, width, height, [(component id, h, v sampling factors), ...]) from the frame header."""
    for marker, pos in _jpeg_segments(data):
        if marker == 0xDA:
            break  # start of scan before any frame header
        if marker in _SOF_MARKERS:
            if pos + 9 > len(data):
                break
            height, width = struct.unpack(">HH", data[pos + 5:pos + 9])
            table = data[pos + 10:pos + 10 + 3 * data[pos + 9]] if pos + 9 < len(data) else b""
            return marker, width, height, [(table[i], table[i + 1] >> 4, table[i + 1] & 15)
                                           for i in range(0, len(table) - 2, 3)]
    raise ValueError("JPEG without a frame header (SOF) before the image data")


def _jpeg_size(data: bytes) -> tuple[int, int]:
    return _jpeg_frame(data)[1:3]


def jpeg_unsent(data: bytes) -> str | None:
    """What of the image no scan carries (a component never scanned, progressive coefficients never sent or not
    refined to their last bit), None when the scans cover it all. A progressive or multi-scan file cut after a
    scan, with an end marker appended, is valid to libjpeg (no warning): it shows blurred or in wrong colours.

    Raises ValueError for a structure that cannot be walked."""
    marker, _, _, components = _jpeg_frame(data)
    progressive = marker in (0xC2, 0xC6, 0xCA, 0xCE)
    # Per component: the successive-approximation bit (Al) each coefficient was last sent to; None: never sent.
    sent: dict[int, list[int | None]] = {c[0]: [None] * (64 if progressive else 1) for c in components}
    for seg, pos in _jpeg_segments(data):
        if seg != 0xDA:
            continue
        count = data[pos + 4] if pos + 4 < len(data) else 0
        header = data[pos + 5:pos + 8 + 2 * count]
        if len(header) < 2 * count + 3:
            raise ValueError(f"JPEG scan header cut short at byte {pos}")
        start, end, approx = header[2 * count:]
        for c in header[:2 * count:2]:
            if c in sent:   # an unknown component: libjpeg refuses the file
                for k in range(start, min(end, 63) + 1) if progressive else (0,):
                    sent[c][k] = approx & 15
    gaps = []
    for i, bits in enumerate(sent.values()):
        unsent = [k for k, b in enumerate(bits) if b is None]
        coarse = [k for k, b in enumerate(bits) if b]
        if unsent and not progressive:
            gaps.append(f"component {i + 1} never scanned")
        elif unsent:
            gaps.append(f"component {i + 1} coefficients {unsent[0]}-{unsent[-1]} never sent" if len(unsent) > 1 else
                        f"component {i + 1} coefficient {unsent[0]} never sent")
        elif coarse:
            gaps.append(f"component {i + 1} coefficients not refined to their last bit")
    return "; ".join(gaps) or None


def _bmp_size(data: bytes) -> tuple[int, int]:
    if len(data) < 26:
        raise ValueError("BMP header is truncated")
    header_size = struct.unpack("<I", data[14:18])[0]
    if header_size == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
        return struct.unpack("<HH", data[18:22])
    width, height = struct.unpack("<ii", data[18:26])
    return abs(width), abs(height)  # negative height: rows stored top-down


# PhotometricInterpretation values other than MinIsBlack (1) and RGB (2), named for the refusal below.
_TIFF_PHOTOMETRIC = {0: "MinIsWhite", 3: "palette", 4: "mask", 5: "separated (CMYK)", 6: "YCbCr", 8: "CIELab",
                     9: "ICCLab", 10: "ITULab", 32844: "LogL", 32845: "LogLuv"}


def _tiff_size(data: bytes) -> tuple[int, int]:
    """Width and height from the first IFD (the page cv2.imdecode reads); samples per pixel must be <= 4, and
    samples wider than 8 bits must be MinIsBlack grey or RGB, interleaved (below)."""
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
        # ImageWidth, ImageLength, SamplesPerPixel, PhotometricInterpretation, PlanarConfiguration
        if tag in (256, 257, 277, 262, 284) and n == 1 and kind in (3, 4):
            tags[tag] = struct.unpack(end + ("H" if kind == 3 else "I"), entry[8:10] if kind == 3 else entry[8:12])[0]
        elif tag == 258 and kind == 3 and n >= 1:   # BitsPerSample: one per sample, inline up to two
            at = ifd + 10 + 12 * i if n <= 2 else struct.unpack(end + "I", entry[8:12])[0]
            if at + 2 <= len(data):
                tags[tag] = struct.unpack(end + "H", data[at:at + 2])[0]
    if 256 not in tags or 257 not in tags:
        raise ValueError("TIFF without ImageWidth/ImageLength in its first directory")
    if tags.get(277, 1) > 4:
        raise ValueError(f"TIFF with {tags[277]} samples per pixel (at most 4 are supported)")
    bits, photometric = tags.get(258, 1), tags.get(262)
    if bits > 8:
        # OpenCV converts 8-bit TIFFs through libtiff's RGBA reader, but reads wider samples (12, 16, 32-bit) as
        # stored: a 16-bit MinIsWhite frame came out inverted, CIELab as if RGB, and separate colour planes as one
        # plane's values spread over three channels, each decoded "successfully" at the declared size.
        if photometric is not None and photometric not in (1, 2):
            what = _TIFF_PHOTOMETRIC.get(photometric, f"value {photometric}")
            raise ValueError(f"{bits}-bit TIFF in PhotometricInterpretation {photometric} ({what}), which is read as "
                             "stored, without its conversion (MinIsWhite would be inspected inverted): save it as "
                             "MinIsBlack grey or RGB")
        if tags.get(284, 1) == 2 and tags.get(277, 1) > 1:
            raise ValueError(f"{bits}-bit TIFF with its samples in separate planes (PlanarConfiguration 2), which "
                             "are read as if interleaved (a scrambled image): save it with interleaved samples "
                             "(PlanarConfiguration 1)")
    return tags[256], tags[257]


def _tiff_numbers(data: bytes, end: str, entry: int) -> list[int]:
    """The SHORT or LONG values of the IFD entry at byte `entry` (inline, or where its offset points); [] for
    another type or values past the end of the data."""
    kind, n = struct.unpack(end + "HI", data[entry + 2:entry + 8])
    if kind not in (3, 4):
        return []
    size = 2 if kind == 3 else 4
    at = entry + 8 if n * size <= 4 else struct.unpack(end + "I", data[entry + 8:entry + 12])[0]
    if at + n * size > len(data):
        return []
    return list(struct.unpack(f"{end}{n}{'H' if kind == 3 else 'I'}", data[at:at + n * size]))


def tiff_deflate_damage(data: bytes) -> str | None:
    """What of a Deflate-compressed TIFF's first page does not inflate whole with its checksum (a strip or tile cut
    short, or one whose bytes changed), None when all does or the page is not Deflate-compressed.

    libtiff finds such damage, but OpenCV reads 8-bit TIFFs through libtiff's RGBA reader, which logs the error and
    goes on: the strip decoded "successfully", wrong or zero from the damage on (probe 103). Each strip is inflated
    here in 1 MB pieces and dropped: the check costs about one more inflate of the file."""
    end = "<" if data[:2] == b"II" else ">"
    (ifd,) = struct.unpack(end + "I", data[4:8])
    (count,) = struct.unpack(end + "H", data[ifd:ifd + 2])
    tags: dict[int, list[int]] = {}
    for i in range(count):
        entry = ifd + 2 + 12 * i
        if entry + 12 > len(data):
            break
        tag = struct.unpack(end + "H", data[entry:entry + 2])[0]
        if tag in (259, 273, 279, 324, 325):   # Compression, Strip/TileOffsets, Strip/TileByteCounts
            tags[tag] = _tiff_numbers(data, end, entry)
    if tags.get(259, [1])[:1] not in ([8], [32946]):   # Deflate (Adobe, and the older code)
        return None
    offsets, counts = tags.get(273) or tags.get(324, []), tags.get(279) or tags.get(325, [])
    what = "strip" if 273 in tags else "tile"
    # A Deflate bomb (1000:1) would keep this loop inflating long after any real page: no page holds more than
    # 16 bytes a pixel (4 samples of 32 bits), plus tile padding.
    width, height = _tiff_size(data)
    budget = 16 * width * height + (1 << 20) * max(1, len(offsets))
    for i, (at, n) in enumerate(zip(offsets, counts)):
        inflate, rest = zlib.decompressobj(), memoryview(data)[at:at + n]
        try:
            while not inflate.eof:
                out = inflate.decompress(rest, 1 << 20)
                rest = inflate.unconsumed_tail
                budget -= len(out)
                if budget < 0:
                    return f"{what} {i + 1} of {len(offsets)}: inflates to more than a {width}x{height} page holds"
                if not out and not rest:
                    break
        except zlib.error as exc:
            return f"{what} {i + 1} of {len(offsets)}: {exc}"
        if not inflate.eof:
            return f"{what} {i + 1} of {len(offsets)}: its Deflate stream is cut short"
    return None


def tiff_page_count(data: bytes, limit: int = 2) -> int:
    """Pages (IFDs) in a TIFF file, counted up to `limit` by following the next-IFD offsets."""
    end = "<" if data[:2] == b"II" else ">"
    (ifd,) = struct.unpack(end + "I", data[4:8])
    pages, seen = 0, set()
    while ifd and pages < limit and ifd not in seen and ifd + 2 <= len(data):
        seen.add(ifd)
        pages += 1
        (count,) = struct.unpack(end + "H", data[ifd:ifd + 2])
        link = ifd + 2 + 12 * count
        if link + 4 > len(data):
            break
        (ifd,) = struct.unpack(end + "I", data[link:link + 4])
    return pages


def _png_chunks(data: bytes):
    """(type, body offset, body length) of each PNG chunk in file order, up to IEND or the end of the data (no
    body is copied: the image data of a frame is megabytes)."""
    pos = 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        yield kind, pos + 8, length
        if kind == b"IEND":
            return
        pos += 12 + length


def png_is_animated(data: bytes) -> bool:
    """True when an acTL chunk (APNG animation control) comes before the image data."""
    for kind, _, _ in _png_chunks(data):
        if kind == b"acTL":
            return True
        if kind in (b"IDAT", b"IEND"):
            return False  # acTL must precede IDAT (APNG spec); after it, it is not an animation
    return False


ORIENTATIONS = {2: "mirrored left-right", 3: "turned 180 degrees", 4: "mirrored top-bottom",
                5: "mirrored and turned 90 degrees", 6: "turned 90 degrees clockwise", 7: "mirrored and turned 270 degrees",
                8: "turned 90 degrees anticlockwise"}


def _tiff_orientation(block: bytes) -> int:
    """The Orientation tag (274) of the first IFD of a TIFF structure (a TIFF file, a JPEG's Exif block, a PNG's
    eXIf chunk); 1 (as stored) when there is none."""
    if len(block) < 8 or block[:2] not in (b"II", b"MM"):
        return 1
    end = "<" if block[:2] == b"II" else ">"
    (ifd,) = struct.unpack(end + "I", block[4:8])
    if ifd + 2 > len(block):
        return 1
    (count,) = struct.unpack(end + "H", block[ifd:ifd + 2])
    for i in range(min(count, 1024)):
        entry = ifd + 2 + 12 * i
        if entry + 12 > len(block):
            break
        tag, kind = struct.unpack(end + "HH", block[entry:entry + 4])
        if tag == 274 and kind == 3:   # SHORT (the standard), in the first two bytes of the value field
            value = struct.unpack(end + "H", block[entry + 8:entry + 10])[0]
        elif tag == 274 and kind == 4:   # LONG: off the standard, but viewers apply it
            value = struct.unpack(end + "I", block[entry + 8:entry + 12])[0]
        else:
            continue
        return value or 1   # 0 is no orientation at all: viewers show the file as stored
    return 1


def exif_orientation(data: bytes, fmt: str) -> int:
    """The EXIF orientation a viewer applies to this file (1: shown as stored). JPEG (APP1 Exif), TIFF and PNG
    (eXIf chunk); other formats carry none. Raises ValueError for a structure that cannot be walked."""
    if fmt == "TIFF":
        return _tiff_orientation(data)
    if fmt == "JPEG":
        for marker, pos in _jpeg_segments(data):
            if marker == 0xDA:
                break
            if marker == 0xE1 and data[pos + 4:pos + 10] == b"Exif\0\0":
                length = struct.unpack(">H", data[pos + 2:pos + 4])[0]
                return _tiff_orientation(data[pos + 10:pos + 2 + length])
        return 1
    if fmt == "PNG":   # every chunk: viewers honour an eXIf chunk after the image data too
        return next((_tiff_orientation(data[at:at + n]) for kind, at, n in _png_chunks(data) if kind == b"eXIf"), 1)
    return 1


def jpeg_scan_count(data: bytes, limit: int) -> int:
    """Start-of-scan (SOS) segments in a JPEG, counted by walking its segments; stops counting past `limit`.

    Raises ValueError for a segment structure that cannot be walked."""
    scans = 0
    for marker, _ in _jpeg_segments(data):
        if marker == 0xDA:
            scans += 1
            if scans > limit:
                break
    return scans


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


def decode_image(data: bytes, name: str = "<bytes>", limits: DecodeConfig | None = None,
                 shift_16bit: int = SHIFT_16BIT) -> np.ndarray:
    """Encoded image file -> HxWx3 uint8 RGB. Raises ImageError naming `name` and the reason.

    The header is checked before OpenCV sees the bytes, so the decode cost is bounded by `limits`
    (DEFAULT_LIMITS when None): a file that declares more than MAX_PIXELS (a decompression bomb: a few kB of
    PNG can inflate to GBs), is larger than its pixels justify, has more JPEG scans than allowed, or holds
    several pages/frames (unless accepted; then only the first is decoded) is refused without decoding.
    """
    limits = limits or DEFAULT_LIMITS
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
    if fmt == "JPEG":
        end = _jpeg_end(data)
        if end is None:
            # libjpeg (OpenCV 4.x) decodes a cut-off JPEG "successfully", filling the missing rows with grey:
            # a part that was never fully seen must not be inspected.
            raise ImageError(f"{name}: JPEG has no end-of-image marker (truncated file)")
        data = data[:end]   # a trailer after the image (motion photo, vendor data) is neither decoded nor costed
    _check_cost(data, fmt, width, height, name, limits)
    if fmt == "JPEG":
        try:
            unsent = jpeg_unsent(data)
        except (ValueError, struct.error) as exc:
            raise ImageError(f"{name}: corrupt JPEG structure ({exc})") from None
        if unsent:
            raise ImageError(f"{name}: JPEG image data incomplete ({unsent}): a progressive or multi-scan file cut "
                             "after a scan decodes blurred or in wrong colours")
    try:
        orientation = exif_orientation(data, fmt)
    except (ValueError, struct.error) as exc:
        raise ImageError(f"{name}: unsupported or corrupt {fmt} structure ({exc})") from None
    if orientation != 1:
        # A viewer (and a mask drawn in one) shows the file turned; fit and the station read the pixels as stored,
        # so the part's shape and a defect's place would differ from what the user sees: refused, never guessed.
        what = ORIENTATIONS.get(orientation, f"unknown value {orientation}")
        raise ImageError(f"{name}: {fmt} carries an EXIF orientation tag ({orientation}: {what} for display); images "
                         "are read as stored, so what a viewer shows is not what would be inspected: save the image "
                         "upright without the tag (e.g. exiftran -ai, mogrify -auto-orient) or set the camera to write "
                         "no rotation")
    if fmt == "TIFF":
        try:
            damage = tiff_deflate_damage(data)
        except (ValueError, struct.error) as exc:
            raise ImageError(f"{name}: corrupt TIFF structure ({exc})") from None
        if damage:
            raise ImageError(f"{name}: corrupt TIFF image data ({damage})")
    image = _decode_jpeg(data, name) if fmt == "JPEG" else None
    bgr = image is None or image.ndim == 2   # simplejpeg's colour comes as RGB: no conversion pass
    try:
        if image is None:
            image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        raise ImageError(f"{name}: cannot decode image ({exc.msg.strip() if hasattr(exc, 'msg') else exc})") from None
    if image is None:
        raise ImageError(f"{name}: not a decodable {fmt} image (truncated, corrupt or unsupported variant)")
    if image.shape[:2] != (height, width):
        # The decoder must not have produced something other than what the header declared.
        raise ImageError(f"{name}: decoded {image.shape[1]}x{image.shape[0]} but the {fmt} header declares {width}x{height}")
    return to_rgb(image, name, assume_bgr=bgr, shift_16bit=shift_16bit)


# Luma sampling factors of the layouts TurboJPEG decodes (chroma 1x1): 4:4:4, 4:2:2, 4:2:0, 4:4:0, 4:1:1, 4:4:1.
_TURBOJPEG_LUMA = {(1, 1), (2, 1), (2, 2), (1, 2), (4, 1), (1, 4)}


def _decode_jpeg(data: bytes, name: str) -> np.ndarray | None:
    """A JPEG's pixels (H x W grey or H x W x 3 RGB; cv2.imdecode's, in RGB order), None for a colour space only
    OpenCV converts (CMYK, YCCK: checked here, decoded there), or ImageError when libjpeg finds the compressed data
    corrupt. OpenCV's decoder drops libjpeg's warnings: a scan cut short (an EOI marker after half the data), bit
    errors or lost bytes decode "successfully", the rest of the image grey or smeared, and a part never fully seen
    would be scored. simplejpeg runs libjpeg-turbo with its warnings as errors (strict), with OpenCV's settings
    (accurate integer IDCT, smooth chroma upsampling): the same pixels (tests/runtime/faults/test_bad_images.py),
    decoded once."""
    # Colour space from the component count, not simplejpeg.decode_jpeg_header: that raises KeyError for the
    # subsampling codes it has no name for (4:4:1), which the decoder itself handles.
    components = _jpeg_frame(data)[3]
    try:
        if len(components) == 1:
            return simplejpeg.decode_jpeg(data, colorspace="GRAY", strict=True)[..., 0]
        if len(components) == 3:   # YCbCr or RGB (Adobe): libjpeg converts either
            return simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
        simplejpeg.decode_jpeg(data, colorspace="CMYK", strict=True)
        return None
    except (ValueError, RuntimeError) as exc:
        why = " ".join(dict.fromkeys(str(exc).split("\n"))).strip()   # libjpeg repeats a warning per segment
        factors = [(h, v) for _, h, v in components]
        usual = len(factors) in (1, 3, 4) and factors[0] in _TURBOJPEG_LUMA and set(factors[1:]) <= {(1, 1)}
        if "determine subsampling" in why and not usual:   # a valid file TurboJPEG does not decode: not "corrupt"
            layout = ",".join(f"{h}x{v}" for h, v in factors)
            raise ImageError(f"{name}: JPEG with {len(factors)} components sampled {layout} is not supported by the "
                             "strict decoder (usual layouts: 4:4:4, 4:2:2, 4:2:0 colour, or grey)") from None
        raise ImageError(f"{name}: corrupt JPEG data ({why[:200]})") from None


def _check_cost(data: bytes, fmt: str, width: int, height: int, name: str, limits: DecodeConfig) -> None:
    """Refuse files whose decoding would cost more than their pixel count justifies (see DecodeConfig)."""
    allowed = limits.max_bytes_per_pixel * width * height + limits.metadata_allowance_bytes
    if len(data) > allowed:
        raise ImageError(f"{name}: {fmt} file of {len(data)} bytes for {width}x{height} pixels is over the "
                         f"{limits.max_bytes_per_pixel:g} bytes/pixel limit (decode.max_bytes_per_pixel)")
    try:
        if fmt == "JPEG":
            scans = jpeg_scan_count(data, limits.max_jpeg_scans)
            if scans > limits.max_jpeg_scans:
                raise ImageError(f"{name}: JPEG has more than {limits.max_jpeg_scans} scans "
                                 "(decode.max_jpeg_scans; progressive files normally have about 10)")
        elif fmt == "TIFF" and not limits.accept_multipage and tiff_page_count(data) > 1:
            raise ImageError(f"{name}: multi-page TIFF refused (decode.accept_multipage: false)")
        elif fmt == "PNG" and not limits.accept_multipage and png_is_animated(data):
            raise ImageError(f"{name}: animated PNG (acTL chunk) refused (decode.accept_multipage: false)")
    except (ValueError, struct.error) as exc:
        if isinstance(exc, ImageError):
            raise
        raise ImageError(f"{name}: corrupt {fmt} structure ({exc})") from None


# A 16-bit frame whose brightest pixel reads below this after the bundle's shift carries at least 3 significant bits
# fewer than the bundle was fitted on (12-bit values read as the top byte: 0-15): its scores mean nothing, so it is
# a FAULT, never scored. An 8-bit frame has no bit depth to get wrong and is scored as it is.
MIN_TOP_16BIT = 32


def colour_channels(image: np.ndarray) -> np.ndarray:
    """The image without its alpha channel (a view): an opaque 16-bit alpha is 65535 whatever the colour data's
    depth, so the depth is judged on the colour channels alone."""
    return image[..., :3] if image.ndim == 3 and image.shape[2] == 4 else image


def to_rgb(image: np.ndarray, name: str = "<frame>", assume_bgr: bool = True,
           shift_16bit: int = SHIFT_16BIT) -> np.ndarray:
    """Any camera/file array (gray, BGR, BGRA, 16-bit) -> HxWx3 uint8 RGB, or ImageError. 16-bit pixels become
    min(v >> shift_16bit, 255): the bundle's pin (preprocessing.shift_16bit; 8, the top byte, by default)."""
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
        raw, image = image, image >> shift_16bit
        if shift_16bit < 8:
            np.minimum(image, 255, out=image)
        image = image.astype(np.uint8)
        # Alpha (opaque: 65535) left out: 12-bit colour with it must not pass as a full-range frame.
        top = int(colour_channels(image).max())
        if top < MIN_TOP_16BIT and colour_channels(raw).any():   # e.g. 12-bit values read as the top byte: 0-15
            raise ImageError(f"{name}: 16-bit frame whose highest value is {int(colour_channels(raw).max())}: read as v >> "
                             f"{shift_16bit} (the bundle's preprocessing.shift_16bit) its brightest pixel is {top} "
                             f"of 255 (under {MIN_TOP_16BIT}); the camera sends fewer significant bits than the bundle "
                             "was fitted on (send 8-bit frames, or fit on frames of this bit depth)")
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


def load_image(path, shift_16bit: int = SHIFT_16BIT) -> np.ndarray:
    """Read an image file to RGB uint8 (used by the exporter and tools; the daemon decodes frame bytes)."""
    with open(path, "rb") as fh:
        return decode_image(fh.read(), str(path), shift_16bit=shift_16bit)
