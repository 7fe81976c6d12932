"""Bad frames: every image the pipeline cannot inspect becomes a FAULT naming the source, never OK, never a crash.

Covers corrupt and truncated files of each accepted format, non-images, decompression bombs (refused from the
header, memory stays bounded), odd arrays from camera SDKs, and a bounded fuzz of the decode path.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib

import cv2
import numpy as np
import pytest
import simplejpeg
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_runtime.bundle import Bundle
from edge_runtime.pipeline import Pipeline
from edge_runtime.decode import MAX_PIXELS, ImageError, decode_image
from edge_runtime.records import Frame, Verdict


@pytest.fixture(scope="module")
def pipeline(small_bundle) -> Pipeline:
    return Pipeline(Bundle.load(small_bundle), threads=1)


@pytest.fixture(scope="module")
def part(small_bundle) -> np.ndarray:
    """A good part as the camera delivers it (BGR uint8), from the bundle's golden images."""
    bundle = Bundle.load(small_bundle)
    return cv2.imread(str(bundle.path(bundle.variant().golden[0]["file"])), cv2.IMREAD_COLOR)


def encode(image: np.ndarray, ext: str) -> bytes:
    ok, buf = cv2.imencode(ext, image)
    assert ok
    return buf.tobytes()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png(width: int, height: int, idat: bytes, depth: int = 8, colour: int = 2) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def declare_size(data: bytes, fmt: str, width: int, height: int) -> bytes:
    """A valid file of `fmt` whose header now claims width x height (the pixel data is left as it was)."""
    b = bytearray(data)
    if fmt == ".png":
        b[16:24] = struct.pack(">II", width, height)
        b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])))
    elif fmt == ".jpg":
        pos = bytes(b).index(b"\xff\xc0")
        b[pos + 5:pos + 9] = struct.pack(">HH", height, width)
    elif fmt == ".bmp":
        b[18:26] = struct.pack("<ii", width, height)
    elif fmt == ".tiff":
        end = "<" if b[:2] == b"II" else ">"
        (ifd,) = struct.unpack(end + "I", b[4:8])
        (count,) = struct.unpack(end + "H", b[ifd:ifd + 2])
        for i in range(count):
            at = ifd + 2 + 12 * i
            tag = struct.unpack(end + "H", b[at:at + 2])[0]
            if tag in (256, 257):
                b[at + 2:at + 12] = struct.pack(end + "HII", 4, 1, width if tag == 256 else height)
    return bytes(b)


def assert_fault(result, source: str, *words: str) -> None:
    assert result.verdict is Verdict.FAULT, result
    assert result.score is None and result.normalized_score is None and not result.passed
    assert source in result.error
    for word in words:
        assert word in result.error, result.error


FORMATS = [".png", ".jpg", ".bmp", ".tiff"]


# ---- encoded files ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ext", FORMATS)
@pytest.mark.parametrize("keep", [0.5, 0.9, -1], ids=["half", "90pct", "last-byte-missing"])
def test_truncated_file_is_a_fault(pipeline, part, ext, keep):
    data = encode(part, ext)
    cut = data[:-1] if keep == -1 else data[: int(len(data) * keep)]
    source = f"cam0/part{ext}"
    assert_fault(pipeline.inspect(Frame(frame_id=1, source=source, encoded=cut)), source)


def test_truncated_jpeg_is_refused_even_where_libjpeg_would_fill_it_with_grey(part):
    # OpenCV 4.x decodes a cut-off JPEG with grey rows and only warns; the missing end marker gives it away.
    with pytest.raises(ImageError, match="no end-of-image marker"):
        decode_image(encode(part, ".jpg")[:-2], "cam0/part.jpg")


@pytest.mark.parametrize("trailer", [b"\x00" * 16, b"MotionPhoto_Data" + bytes(range(256)) * 40, b"\xff\xd8\xff\xe0junk"])
def test_a_complete_jpeg_with_bytes_after_its_end_marker_decodes_as_without_them(part, trailer):
    """Phones and some cameras append data after the image (motion photos, vendor trailers): the image is whole."""
    data = encode(part, ".jpg")
    assert np.array_equal(decode_image(data + trailer, "cam0/part.jpg"), decode_image(data, "cam0/part.jpg"))


def test_an_end_marker_inside_a_segment_does_not_make_a_cut_jpeg_whole(part):
    # An EXIF-style segment holding "\xff\xd9" (a thumbnail's end) right after the header, then the image cut.
    data = encode(part, ".jpg")
    app1 = b"\xff\xe1" + (2 + 6).to_bytes(2, "big") + b"ab\xff\xd9cd"
    cut = data[:2] + app1 + data[2:len(data) // 2]
    with pytest.raises(ImageError, match="no end-of-image marker"):
        decode_image(cut, "cam0/part.jpg")


@pytest.mark.parametrize("damage", ["scan cut short, end marker appended", "bytes lost mid-scan"])
def test_a_jpeg_whose_compressed_data_is_corrupt_is_refused(pipeline, part, damage):
    """The end marker is there, so the file looks whole; OpenCV decodes it "successfully" (libjpeg only warns),
    grey or smeared where the data was lost: a part never fully seen would have been scored. (Bits flipped into
    other valid codes cannot be seen by any decoder: JPEG carries no checksum.)"""
    data = encode(part, ".jpg")
    half = len(data) // 2
    bad = data[:half] + b"\xff\xd9" if damage.startswith("scan cut") else data[:half] + data[half + 100:]
    assert cv2.imdecode(np.frombuffer(bad, np.uint8), cv2.IMREAD_UNCHANGED) is not None   # what we guard against
    with pytest.raises(ImageError, match=r"cam0/part\.jpg: corrupt JPEG data \(Corrupt JPEG data"):
        decode_image(bad, "cam0/part.jpg")
    result = pipeline.inspect(Frame(frame_id=1, source="cam0/part.jpg", encoded=bad))
    assert result.verdict is Verdict.FAULT and "corrupt JPEG data" in result.error


def _jpegs(part: np.ndarray):
    grey = cv2.cvtColor(part, cv2.COLOR_BGR2GRAY)
    for name, flags in [("q90 4:2:0", [cv2.IMWRITE_JPEG_QUALITY, 90]),
                        ("q75 4:4:4", [cv2.IMWRITE_JPEG_QUALITY, 75, cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
                                       cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]),
                        ("q95 4:2:2", [cv2.IMWRITE_JPEG_QUALITY, 95, cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
                                       cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422]),
                        ("progressive", [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]),
                        ("restart markers", [cv2.IMWRITE_JPEG_RST_INTERVAL, 4]),
                        ("optimised Huffman", [cv2.IMWRITE_JPEG_OPTIMIZE, 1])]:
        yield name, cv2.imencode(".jpg", part, flags)[1].tobytes()
        yield f"grey {name}", cv2.imencode(".jpg", grey, flags)[1].tobytes()
    rgb = np.ascontiguousarray(part[..., ::-1])
    for sub in ("440", "411"):
        yield f"4:{sub[1]}:{sub[2]}", simplejpeg.encode_jpeg(rgb, quality=85, colorsubsampling=sub)
    cmyk = np.ascontiguousarray(np.dstack([255 - rgb, np.full(rgb.shape[:2], 20, np.uint8)]))
    yield "YCCK (CMYK)", simplejpeg.encode_jpeg(cmyk, quality=85, colorspace="CMYK")


def test_jpeg_pixels_are_those_opencv_decodes(part):
    """The strict decoder must not change a score: every kind of JPEG a camera or a folder delivers decodes to
    OpenCV's pixels exactly (fit and bundles made before it read JPEGs with OpenCV)."""
    kinds = list(_jpegs(part))
    assert len(kinds) == 15
    for name, data in kinds:
        want = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        want = cv2.cvtColor(want, cv2.COLOR_GRAY2RGB) if want.ndim == 2 else want[..., ::-1]
        got = decode_image(data, f"{name}.jpg")
        assert got.shape == want.shape and np.array_equal(got, want), name


def _scan_starts(data: bytes) -> list[int]:
    """Byte positions of a JPEG's start-of-scan markers (outside entropy data: 0xFF there is stuffed with 0x00)."""
    return [k for k in range(len(data) - 1) if data[k] == 0xFF and data[k + 1] == 0xDA]


@pytest.mark.parametrize("keep", ["first scan (DC only)", "all but the last scan"])
def test_a_progressive_jpeg_cut_after_a_scan_is_refused(pipeline, part, keep):
    """Cut at a scan boundary with the end marker appended, a progressive JPEG is valid to libjpeg (no warning):
    it decodes blurred, as 8x8 blocks from the first scan alone, and would have been scored."""
    data = cv2.imencode(".jpg", part, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()
    starts = _scan_starts(data)
    # Cut before the tables (DHT) that precede the next scan, or before its SOS.
    nxt = starts[1] if keep.startswith("first") else starts[-1]
    cut = data[:nxt]
    tables = cut.rfind(b"\xff\xc4")
    if tables > _scan_starts(cut)[-1]:
        cut = cut[:tables]
    bad = cut + b"\xff\xd9"
    assert cv2.imdecode(np.frombuffer(bad, np.uint8), cv2.IMREAD_UNCHANGED) is not None   # what we guard against
    with pytest.raises(ImageError, match=r"cam0/part\.jpg: JPEG image data incomplete \(component 1 coefficients"):
        decode_image(bad, "cam0/part.jpg")
    result = pipeline.inspect(Frame(frame_id=1, source="cam0/part.jpg", encoded=bad))
    assert result.verdict is Verdict.FAULT and "image data incomplete" in result.error


def test_a_4_4_1_jpeg_decodes_to_opencvs_pixels(part):
    """4:4:1 (luma sampled 1x4) is a layout libjpeg-turbo decodes but simplejpeg's header call cannot name
    (KeyError: the exporter stopped with a traceback). A 64x64 4:1:1 file's blocks, read as 4:4:1, are one."""
    rgb = np.ascontiguousarray(cv2.resize(part, (64, 64))[..., ::-1])
    data = bytearray(simplejpeg.encode_jpeg(rgb, quality=85, colorsubsampling="411"))
    sof = bytes(data).index(b"\xff\xc0")
    assert data[sof + 11] == 0x41
    data[sof + 11] = 0x14   # luma 4x1 -> 1x4: the same 4 + 1 + 1 blocks per MCU, 16 MCUs either way
    want = cv2.imdecode(np.frombuffer(bytes(data), np.uint8), cv2.IMREAD_UNCHANGED)[..., ::-1]
    assert np.array_equal(decode_image(bytes(data), "cam0/part.jpg"), want)


def test_a_jpeg_layout_the_strict_decoder_lacks_is_refused_as_such_not_as_corrupt(part):
    # 4:1:0 (luma 4x2): valid, and OpenCV decodes it; TurboJPEG decodes only the usual layouts.
    data = bytearray(encode(part, ".jpg"))
    sof = bytes(data).index(b"\xff\xc0")
    assert data[sof + 11] == 0x22
    data[sof + 11] = 0x42
    with pytest.raises(ImageError, match=r"cam0/part\.jpg: JPEG with 3 components sampled 4x2,1x1,1x1 is not "
                                         r"supported by the strict decoder"):
        decode_image(bytes(data), "cam0/part.jpg")


@pytest.mark.parametrize("data, words", [
    (b"", ("empty file",)),
    (b"hello, this is a text file\n" * 10, ("not a PNG, JPEG, BMP or TIFF",)),
    (np.random.default_rng(0).bytes(5000), ("not a PNG, JPEG, BMP or TIFF",)),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, ("corrupt image header",)),
    (b"\xff\xd8\xff", ("corrupt image header",)),
    (b"BM" + b"\x00" * 10, ("corrupt image header",)),
    (b"II*\x00" + b"\xff" * 8, ("corrupt image header",)),
], ids=["zero-bytes", "text", "random", "png-signature-only", "jpeg-soi-only", "bmp-stub", "tiff-stub"])
def test_non_image_bytes_are_a_fault(pipeline, data, words):
    assert_fault(pipeline.inspect(Frame(frame_id=2, source="folder/x.png", encoded=data)), "folder/x.png", *words)


def test_formats_outside_the_accepted_four_are_refused_before_decoding(pipeline, part):
    webp = encode(part, ".webp")
    assert cv2.imdecode(np.frombuffer(webp, np.uint8), cv2.IMREAD_UNCHANGED) is not None   # OpenCV would decode it
    assert_fault(pipeline.inspect(Frame(frame_id=3, source="cam/x.webp", encoded=webp)), "cam/x.webp", "RIFF")


@pytest.mark.parametrize("ext", FORMATS)
def test_huge_declared_dimensions_are_refused_from_the_header(part, ext):
    data = declare_size(encode(part[:32, :32], ext), ext, 100_000 if ext != ".jpg" else 60_000, 50_000)
    with pytest.raises(ImageError) as err:
        decode_image(data, f"bomb{ext}")
    assert f"bomb{ext}" in str(err.value) and "refused before decoding" in str(err.value)


def test_header_that_disagrees_with_the_pixels_is_a_fault(part):
    data = declare_size(encode(part[:32, :32], ".bmp"), ".bmp", 64, 64)   # claims more rows than it holds
    with pytest.raises(ImageError, match="bomb.bmp"):
        decode_image(data, "bomb.bmp")


def test_decompression_bomb_is_refused_with_bounded_memory(tmp_path):
    """A 1.8 MB PNG that inflates to 7200x7200 RGBA 16-bit (415 MB; cv2.imdecode peaks near 840 MB RSS)."""
    w = h = 7200
    row = b"\x00" * (1 + w * 8)
    deflate = zlib.compressobj(1)
    idat = b"".join(deflate.compress(row) for _ in range(h)) + deflate.flush()
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png(w, h, idat, depth=16, colour=6))
    assert w * h > MAX_PIXELS and bomb.stat().st_size < 4 * 1024 * 1024
    # A fresh interpreter, so ru_maxrss reflects only this decode; OpenCV's own pixel limit is raised to its
    # default so the header check is the only thing standing between the bomb and the allocation.
    script = f"""
import json, resource
from edge_runtime.decode import ImageError, decode_image
data = open({str(bomb)!r}, "rb").read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    decode_image(data, "bomb.png"); error = None
except ImageError as exc:
    error = str(exc)
print(json.dumps({{"error": error, "growth_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before}}))
"""
    env = {**os.environ, "OPENCV_IO_MAX_IMAGE_PIXELS": str(1 << 30)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["error"] and "refused before decoding" in report["error"]
    assert report["growth_kb"] < 32 * 1024


# ---- arrays from camera SDKs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("make, words", [
    (lambda p: np.dstack([p[:, :, 0], p[:, :, 1]]), ("unsupported shape",)),                 # 2 channels
    (lambda p: np.dstack([p, p[:, :, :2]]), ("unsupported shape",)),                         # 5 channels
    (lambda p: p[None], ("unsupported shape",)),                                              # 4-D batch
    (lambda p: p.reshape(-1), ("unsupported shape",)),                                        # 1-D buffer
    (lambda p: p[:4, :4], ("too small",)),                                                    # tiny
    (lambda p: p[:0], ("empty frame",)),
    (lambda p: p.astype(np.float32), ("unsupported pixel type float32",)),                   # 0..255 floats
    (lambda p: np.full(p.shape, np.nan, np.float32), ("unsupported pixel type",)),
    (lambda p: p.astype(np.int32), ("unsupported pixel type int32",)),
    (lambda p: p > 128, ("unsupported pixel type bool",)),
    (lambda p: p.tolist(), ("not an image array",)),
    (lambda p: p.astype(object), ("unsupported pixel type object",)),
], ids=["2ch", "5ch", "4d", "1d", "tiny", "empty", "float-0-255", "nan", "int32", "bool", "list", "object"])
def test_unusable_arrays_are_a_fault(pipeline, part, make, words):
    result = pipeline.inspect(Frame(frame_id=4, source="cam1", image=make(part)))
    assert_fault(result, "cam1", *words)


def test_frame_without_any_image_is_a_fault(pipeline):
    assert_fault(pipeline.inspect(Frame(frame_id=5, source="cam2")), "cam2", "no image")


def test_encoded_frame_of_the_wrong_type_is_a_fault(pipeline):
    assert_fault(pipeline.inspect(Frame(frame_id=6, source="cam3", encoded="not bytes")), "cam3", "must be bytes")


@pytest.mark.parametrize("convert", [
    lambda p: p.astype(np.uint16) * 257,                       # 16-bit camera
    lambda p: (p.astype(np.uint16) * 257).astype(">u2"),       # 16-bit, big-endian buffer
    lambda p: (p / 255.0).astype(np.float32),                  # float in [0, 1]
    lambda p: p[::-1, ::-1][::-1, ::-1],                       # negative-stride view
    lambda p: np.asfortranarray(p),
], ids=["uint16", "uint16-big-endian", "float01", "strided-view", "fortran"])
def test_supported_variants_of_a_part_are_inspected_like_the_8_bit_original(pipeline, part, convert):
    # Not faults: the manifest's decode contract scales 16-bit to 8-bit and accepts [0, 1] floats.
    reference = pipeline.inspect(Frame(frame_id=7, source="cam", image=part))
    assert reference.verdict is Verdict.OK
    result = pipeline.inspect(Frame(frame_id=8, source="cam", image=convert(part)))
    assert result.verdict is reference.verdict
    assert result.score == pytest.approx(reference.score, rel=1e-3)


def test_16_bit_png_file_is_inspected(pipeline, part):
    data = encode(part.astype(np.uint16) * 257, ".png")
    assert pipeline.inspect(Frame(frame_id=9, source="cam/16.png", encoded=data)).verdict is Verdict.OK


def test_roi_outside_the_frame_is_a_fault(small_bundle, part):
    pipeline = Pipeline(Bundle.load(small_bundle), threads=1)
    pipeline.apply_overrides(roi=(1, 0, part.shape[1], part.shape[0]))   # the fitted size, moved 1 px too far
    assert_fault(pipeline.inspect(Frame(frame_id=10, source="cam4", image=part)), "cam4", "region of interest")


def test_station_roi_of_another_size_is_refused_at_load(small_bundle, part):
    """Under `refuse`, an ROI that is not the fitted size would FAULT every frame: refused when applied, naming the
    station file's key and the size it must have."""
    pipeline = Pipeline(Bundle.load(small_bundle), threads=1)
    h, w = part.shape[:2]
    with pytest.raises(ValueError, match=rf"roi: {w + 1}x10, but the bundle was fitted on a {w}x{h} whole frame"):
        pipeline.apply_overrides(roi=(0, 0, w + 1, 10))
    pipeline.apply_overrides(roi=(0, 0, w + 1, 10), size_policy="resize")   # resampled: the user's choice
    assert pipeline.geometry.roi == (0, 0, w + 1, 10)


# ---- fuzzing --------------------------------------------------------------------------------------------------
_SEED_IMAGE = np.random.default_rng(1).integers(0, 255, (24, 32, 3), dtype=np.uint8)
SEEDS = [encode(_SEED_IMAGE, ext) for ext in FORMATS] + [encode(_SEED_IMAGE[:, :, 0], ".png")]


@st.composite
def mutated_images(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["set", "cut", "insert", "delete"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "set" and data:
            data[at] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(max_size=8))
        else:
            del data[at:at + draw(st.integers(1, 16))]
    return bytes(data)


ANY_BYTES = st.one_of(st.binary(max_size=256), mutated_images())


@settings(max_examples=200, deadline=None)
@given(ANY_BYTES)
def test_decode_returns_rgb_or_raises_image_error_only(data):
    try:
        rgb = decode_image(data, "fuzz.png")
    except ImageError as exc:
        assert "fuzz.png" in str(exc)
        return
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3 and min(rgb.shape[:2]) >= 8


@settings(max_examples=40, deadline=None)
@given(ANY_BYTES)
def test_inspect_never_raises_and_never_passes_an_undecodable_frame(pipeline, data):
    result = pipeline.inspect(Frame(frame_id=11, source="fuzz.bin", encoded=data))
    try:
        decode_image(data, "fuzz.bin")
        decodable = True
    except ImageError:
        decodable = False
    if not decodable:
        assert_fault(result, "fuzz.bin")
    elif result.verdict is Verdict.FAULT:
        # A decodable image of another size than the bundle's frames: refused by the size policy, with its reason.
        assert "but the bundle was fitted on" in result.error and result.score is None
    else:
        assert result.verdict in (Verdict.OK, Verdict.NG) and result.score is not None


def test_a_part_its_source_could_not_read_is_a_fault_naming_why(pipeline):
    result = pipeline.inspect(Frame(frame_id=3, source="in/part7.png", unreadable="cannot be read: Input/output error"))
    assert_fault(result, "in/part7.png", "cannot be read", "Input/output error")


# ---- colour: what the bank was fitted on (geometry.colour) -----------------------------------------------------
def pinned(editor, colour: str | None) -> Pipeline:
    m = editor.manifest()
    m["geometry"]["colour"] = colour
    editor.save(m)
    return Pipeline(Bundle.load(editor.root), threads=1)


def grey_bgr(part: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(cv2.cvtColor(part, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)


@pytest.mark.parametrize("make", [
    lambda p: cv2.cvtColor(p, cv2.COLOR_BGR2GRAY),                                 # a mono camera: H x W
    lambda p: cv2.cvtColor(p, cv2.COLOR_BGR2GRAY)[:, :, None],                     # H x W x 1
    grey_bgr,                                                                      # a grey pixel format as BGR
    lambda p: encode(cv2.cvtColor(p, cv2.COLOR_BGR2GRAY), ".png"),                 # a grey file
    lambda p: np.zeros_like(p),                                                    # lights off: black
], ids=["2d", "1ch", "bgr-grey", "grey-png", "black"])
def test_a_frame_without_colour_is_a_fault_for_a_colour_bundle(editor, part, make):
    pipe = pinned(editor, "colour")
    frame = make(part)
    kind = {"encoded": frame} if isinstance(frame, bytes) else {"image": frame}
    assert_fault(pipe.inspect(Frame(frame_id=11, source="mono0", **kind)), "mono0", "no colour", "geometry.colour")
    assert pipe.inspect(Frame(frame_id=12, source="mono0", image=part)).verdict is Verdict.OK


def test_a_colour_frame_is_inspected_as_its_grey_version_by_a_grey_bundle(editor, part):
    pipe = pinned(editor, "grey")
    as_grey = pipe.inspect(Frame(frame_id=13, source="cam", image=grey_bgr(part)))
    assert as_grey.verdict is not Verdict.FAULT
    in_colour = pipe.inspect(Frame(frame_id=14, source="cam", image=part))
    assert in_colour.score == as_grey.score                 # exactly: the conversion is the one a grey file gets
    mono = pipe.inspect(Frame(frame_id=15, source="cam", image=cv2.cvtColor(part, cv2.COLOR_BGR2GRAY)))
    assert mono.score == as_grey.score
    # Not pinned (bundles before the pin): the colour frame reaches the model as it is.
    assert pinned(editor, None).inspect(Frame(frame_id=16, source="cam", image=part)).score != as_grey.score


def test_a_colour_pin_the_runtime_does_not_know_refuses_the_bundle(editor):
    from edge_runtime.bundle import BundleError
    m = editor.manifest()
    m["geometry"]["colour"] = "infrared"
    editor.save(m)
    with pytest.raises(BundleError, match="colour must be one of grey, colour"):
        Bundle.load(editor.root)


def test_a_16_bit_frame_that_reads_as_all_zero_is_a_fault_naming_the_bit_depth(pipeline, part):
    result = pipeline.inspect(Frame(frame_id=17, source="cam16", image=part.astype(np.uint16)))   # 8-bit values
    assert_fault(result, "cam16", "16-bit frame whose highest value is", "preprocessing.shift_16bit")


@pytest.mark.parametrize("bits", [10, 12])
def test_a_16_bit_frame_of_fewer_significant_bits_than_the_bundle_is_a_fault_not_a_score(pipeline, part, bits):
    """12-bit values read as the top byte are 0-15: a near-black image that scored NG 47 for a good part (a probe),
    meaningless either way. 14-bit values (brightest 63 of 255) and full range are still scored."""
    low = (part.astype(np.uint16) << (bits - 8))
    result = pipeline.inspect(Frame(frame_id=18, source=f"cam{bits}", image=low))
    assert_fault(result, f"cam{bits}", "16-bit frame whose highest value is", "fewer significant bits")
    scored = pipeline.inspect(Frame(frame_id=19, source="cam", image=part.astype(np.uint16) << 8))
    assert scored.verdict is not Verdict.FAULT, scored.error
    # 14-bit values pass the bit-depth rule; read as v >> 8 the frame is 4 x darker than the training frames, which
    # the frame check (a separate stage) refuses on its own.
    dim = pipeline.inspect(Frame(frame_id=20, source="cam", image=part.astype(np.uint16) << 6))
    assert "fewer significant bits" not in (dim.error or "")
    if pipeline.quality_band is not None:
        assert dim.verdict is Verdict.FAULT and "frame check: frame brightness" in dim.error


def _exif_block(orientation: int, big_endian: bool = False, long: bool = False) -> bytes:
    """A TIFF structure with one IFD holding Orientation (274, SHORT; LONG off the standard), as cameras and phones
    write into Exif."""
    end = ">" if big_endian else "<"
    entry = (struct.pack(end + "HHII", 274, 4, 1, orientation) if long
             else struct.pack(end + "HHIHH", 274, 3, 1, orientation, 0))
    return ((b"MM" if big_endian else b"II") + struct.pack(end + "HI", 42, 8) + struct.pack(end + "H", 1)
            + entry + struct.pack(end + "I", 0))


def _jpeg_with_orientation(jpeg: bytes, orientation: int, big_endian: bool = False) -> bytes:
    payload = b"Exif\0\0" + _exif_block(orientation, big_endian)
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def _png_with_orientation(png: bytes, orientation: int) -> bytes:
    body = _exif_block(orientation)
    chunk = struct.pack(">I", len(body)) + b"eXIf" + body + struct.pack(">I", zlib.crc32(b"eXIf" + body))
    return png[:33] + chunk + png[33:]   # after the signature and IHDR, before IDAT


def _tiff_with_orientation(tiff: bytes, orientation: int) -> bytes:
    """cv2's TIFF with a new first IFD appended: its entries plus Orientation (values outside the IFD still valid)."""
    assert tiff[:2] == b"II"
    (ifd,) = struct.unpack("<I", tiff[4:8])
    (count,) = struct.unpack("<H", tiff[ifd:ifd + 2])
    entries = [tiff[ifd + 2 + 12 * i: ifd + 14 + 12 * i] for i in range(count)]
    entries = [e for e in entries if struct.unpack("<H", e[:2])[0] != 274]
    entries.append(struct.pack("<HHIHH", 274, 3, 1, orientation, 0))
    entries.sort(key=lambda e: struct.unpack("<H", e[:2])[0])
    new_ifd = len(tiff) + (len(tiff) % 2)
    out = bytearray(tiff + b"\0" * (new_ifd - len(tiff)))
    out[4:8] = struct.pack("<I", new_ifd)
    out += struct.pack("<H", len(entries)) + b"".join(entries) + struct.pack("<I", 0)
    return bytes(out)


@pytest.mark.parametrize("fmt", ["jpeg", "jpeg-big-endian", "png", "tiff"])
def test_an_exif_orientation_tag_is_refused_naming_the_file_and_the_turn(pipeline, part, fmt):
    """A viewer shows such a file turned, and a mask drawn there lies turned too; reading the pixels as stored would
    inspect another geometry than the user sees (a probe: 3x the passed defects, no message). Orientation 1 (as
    stored) is inspected like no tag."""
    make = {"jpeg": lambda o: _jpeg_with_orientation(encode(part, ".jpg"), o),
            "jpeg-big-endian": lambda o: _jpeg_with_orientation(encode(part, ".jpg"), o, big_endian=True),
            "png": lambda o: _png_with_orientation(encode(part, ".png"), o),
            "tiff": lambda o: _tiff_with_orientation(encode(part, ".tiff"), o)}[fmt]
    plain = decode_image(make(1), "upright")
    assert plain.shape[:2] == part.shape[:2]
    with pytest.raises(ImageError, match=r"turned\.jpg.*EXIF orientation tag \(6: turned 90 degrees clockwise"):
        decode_image(make(6), "turned.jpg")
    result = pipeline.inspect(Frame(frame_id=1, source="cam/part_7.jpg", encoded=make(3)))
    assert result.verdict is Verdict.FAULT and "cam/part_7.jpg" in result.error and "180 degrees" in result.error
    ok = pipeline.inspect(Frame(frame_id=2, source="upright", encoded=make(1)))
    assert ok.verdict is not Verdict.FAULT, ok.error


def test_exif_orientation_forms_viewers_apply_are_refused_too_and_0_reads_as_stored(part):
    """A LONG orientation and a PNG eXIf chunk after the image data are turned by viewers (Pillow's exif_transpose
    too), so they are refused like the standard form; 0 is no orientation, shown as stored, and decodes."""
    jpeg, png = encode(part, ".jpg"), encode(part, ".png")
    long_jpeg = jpeg[:2] + b"\xff\xe1" + struct.pack(">H", 2 + 6 + len(_exif_block(6, long=True))) + b"Exif\0\0" \
        + _exif_block(6, long=True) + jpeg[2:]
    with pytest.raises(ImageError, match="EXIF orientation tag \\(6"):
        decode_image(long_jpeg, "long.jpg")
    body = _exif_block(8)
    chunk = struct.pack(">I", len(body)) + b"eXIf" + body + struct.pack(">I", zlib.crc32(b"eXIf" + body))
    iend = png.rindex(b"IEND") - 4
    with pytest.raises(ImageError, match="EXIF orientation tag \\(8"):
        decode_image(png[:iend] + chunk + png[iend:], "late.png")
    assert decode_image(_jpeg_with_orientation(jpeg, 0), "zero.jpg").shape[:2] == part.shape[:2]


def _tiff(planes: list[bytes], width: int, height: int, bits: int, photometric: int, planar: int = 1) -> bytes:
    """An uncompressed little-endian TIFF: one strip per plane (`planes`: the interleaved samples, or each plane)."""
    spp = 1 if photometric in (0, 1) else 3
    data = b"".join(planes)
    offsets = [8 + sum(len(p) for p in planes[:i]) for i in range(len(planes))]
    extra_at = 8 + len(data) + 2 + 12 * 10 + 4
    bits_value = struct.pack("<HH", bits, 0) if spp == 1 else struct.pack("<I", extra_at)
    extra = struct.pack(f"<{spp}H", *[bits] * spp) if spp > 1 else b""

    def longs(values: list[int]) -> bytes:   # inline for one value, else after the directory
        nonlocal extra
        if len(values) == 1:
            return struct.pack("<I", values[0])
        at = extra_at + len(extra)
        extra += struct.pack(f"<{len(values)}I", *values)
        return struct.pack("<I", at)

    entries = [struct.pack("<HHII", 256, 4, 1, width), struct.pack("<HHII", 257, 4, 1, height),
               struct.pack("<HHI", 258, 3, spp) + bits_value, struct.pack("<HHIHH", 259, 3, 1, 1, 0),
               struct.pack("<HHIHH", 262, 3, 1, photometric, 0),
               struct.pack("<HHI", 273, 4, len(planes)) + longs(offsets),
               struct.pack("<HHIHH", 277, 3, 1, spp, 0), struct.pack("<HHII", 278, 4, 1, height),
               struct.pack("<HHI", 279, 4, len(planes)) + longs([len(p) for p in planes]),
               struct.pack("<HHIHH", 284, 3, 1, planar, 0)]
    return (b"II*\x00" + struct.pack("<I", 8 + len(data)) + data + struct.pack("<H", len(entries))
            + b"".join(entries) + struct.pack("<I", 0) + extra)


def test_a_wide_sample_tiff_opencv_would_read_as_stored_is_refused_naming_why(pipeline, part):
    """OpenCV converts 8-bit TIFFs through libtiff's RGBA reader but reads 16-bit (and 12-, 32-bit) samples as
    stored: a 16-bit MinIsWhite frame (X-ray panels write them) decoded inverted, and RGB in separate planes as the
    red plane's values spread over three channels, both at the declared size and scored (probe 103). The same
    pixels as MinIsBlack grey or interleaved RGB decode as sent."""
    h, w = part.shape[:2]
    grey = cv2.cvtColor(part, cv2.COLOR_BGR2GRAY).astype(np.uint16) * 257
    rgb = part[..., ::-1].astype(np.uint16) * 257
    assert np.array_equal(decode_image(_tiff([grey.tobytes()], w, h, 16, 1), "grey.tif")[..., 0], grey >> 8)
    assert np.array_equal(decode_image(_tiff([rgb.tobytes()], w, h, 16, 2), "rgb.tif"), rgb >> 8)
    assert np.array_equal(decode_image(_tiff([part[..., ::-1].tobytes()], w, h, 8, 2), "rgb8.tif"), part[..., ::-1])

    inverted = _tiff([(65535 - grey).tobytes()], w, h, 16, 0)
    with pytest.raises(ImageError, match=r"white\.tif: .*16-bit TIFF in PhotometricInterpretation 0 \(MinIsWhite\)"):
        decode_image(inverted, "white.tif")
    result = pipeline.inspect(Frame(frame_id=1, source="cam/white.tif", encoded=inverted))
    assert_fault(result, "cam/white.tif", "MinIsWhite")
    planes = [np.ascontiguousarray(rgb[..., c]).tobytes() for c in range(3)]
    separate = _tiff(planes, w, h, 16, 2, planar=2)
    with pytest.raises(ImageError, match=r"planes\.tif: .*separate planes \(PlanarConfiguration 2\)"):
        decode_image(separate, "planes.tif")
    # 8-bit TIFFs go through libtiff's conversion, which handles both: decoded as sent.
    assert np.array_equal(decode_image(_tiff([(255 - (grey >> 8)).astype(np.uint8).tobytes()], w, h, 8, 0),
                                       "white8.tif")[..., 0], grey >> 8)
    planes8 = [np.ascontiguousarray(part[..., 2 - c]).tobytes() for c in range(3)]
    assert np.array_equal(decode_image(_tiff(planes8, w, h, 8, 2, planar=2), "planes8.tif"), part[..., ::-1])


def _first_strip(tiff: bytes) -> tuple[int, int]:
    """(offset, byte count) of the first strip of a little-endian TIFF's first page."""
    (ifd,) = struct.unpack("<I", tiff[4:8])
    (count,) = struct.unpack("<H", tiff[ifd:ifd + 2])
    found = {}
    for i in range(count):
        tag, kind, n = struct.unpack("<HHI", tiff[ifd + 2 + 12 * i: ifd + 10 + 12 * i])
        if tag in (273, 279):
            at = ifd + 10 + 12 * i if n * (2 if kind == 3 else 4) <= 4 else struct.unpack(
                "<I", tiff[ifd + 10 + 12 * i: ifd + 14 + 12 * i])[0]
            found[tag] = struct.unpack("<H" if kind == 3 else "<I", tiff[at:at + (2 if kind == 3 else 4)])[0]
    return found[273], found[279]


@pytest.mark.parametrize("depth", [8, 16])
def test_a_deflate_tiff_whose_data_does_not_inflate_whole_is_refused(pipeline, part, depth):
    """Deflate strips carry a checksum libtiff checks, but OpenCV reads 8-bit TIFFs through libtiff's RGBA reader,
    which logs the error and goes on: a byte changed in a strip decoded "successfully", wrong from there on, and
    was scored (probe 103). The same file undamaged decodes to the part's pixels."""
    image = part if depth == 8 else part.astype(np.uint16) * 257
    ok, buf = cv2.imencode(".tiff", image, [cv2.IMWRITE_TIFF_COMPRESSION, 8])
    tiff = buf.tobytes()
    assert np.array_equal(decode_image(tiff, "whole.tif"), part[..., ::-1])
    at, n = _first_strip(tiff)
    damaged = bytearray(tiff)
    damaged[at + n // 2] ^= 0x24
    with pytest.raises(ImageError, match=r"changed\.tif: corrupt TIFF image data \(strip 1 of \d+: "):
        decode_image(bytes(damaged), "changed.tif")
    assert_fault(pipeline.inspect(Frame(frame_id=1, source="cam/changed.tif", encoded=bytes(damaged))),
                 "cam/changed.tif")


def test_a_deflate_tiff_strip_that_inflates_past_its_page_is_refused_without_inflating_it_all():
    """The Deflate check inflates each strip once more: a strip that inflates far past what its page can hold (a
    Deflate bomb, 1000:1) is refused once it passes that, not inflated to the end."""
    image = np.full((16, 16, 3), 128, np.uint8)
    ok, buf = cv2.imencode(".tiff", image, [cv2.IMWRITE_TIFF_COMPRESSION, 8])
    tiff = bytearray(buf.tobytes())
    bomb = zlib.compress(bytes(64 << 20), 9)            # 64 MiB of zeros in ~64 kB
    (ifd,) = struct.unpack("<I", tiff[4:8])
    (count,) = struct.unpack("<H", tiff[ifd:ifd + 2])
    for i in range(count):                               # one strip: its offset and count are inline
        entry = ifd + 2 + 12 * i
        tag, kind, n = struct.unpack("<HHI", tiff[entry:entry + 8])
        if tag in (273, 279):
            assert n == 1
            struct.pack_into("<H" if kind == 3 else "<I", tiff, entry + 8, len(tiff) if tag == 273 else len(bomb))
    with pytest.raises(ImageError, match=r"bomb\.tif: corrupt TIFF image data \(strip 1 of 1: inflates to more "
                                         r"than a 16x16 page holds\)"):
        decode_image(bytes(tiff) + bomb, "bomb.tif")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_features_that_are_not_finite_fault_the_part_saying_so(pipeline, part, monkeypatch, bad):
    """Probe 110's loose end: a NaN from a broken model reached the graph search as an empty argmin (FAULT reading
    'internal error: ValueError: attempt to get argmin of an empty sequence') or the exact one as a NaN score (NG).
    Either way not an OK, but the reason named nothing; the part is a FAULT that says the features are broken."""
    real = pipeline.extractor

    class Broken:
        def __getattr__(self, name):
            return getattr(real, name)

        def __call__(self, tensor):
            feats = real(tensor)
            feats[3, 7] = bad
            return feats

    monkeypatch.setattr(pipeline, "extractor", Broken())
    ok, buf = cv2.imencode(".png", part)
    result = pipeline.inspect(Frame(frame_id=1, source="cam/nan.png", encoded=buf.tobytes()))
    assert result.verdict is Verdict.FAULT, result
    assert "cam/nan.png: the features model gave 1 non-finite value(s) (NaN or inf)" in result.error
