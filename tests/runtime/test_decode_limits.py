"""Every encoded frame has a bounded decode cost, and /healthz reports a station whose inspection stopped moving.

The crafted files are built here: a progressive JPEG whose refinement scan is repeated thousands of times (libjpeg
decodes it, one pass over every block per scan), a multi-page TIFF and an animated PNG.
"""
from __future__ import annotations

import json
import re
import struct
import threading
import time
import urllib.error
import urllib.request
import zlib

import cv2
import numpy as np
import pytest

from edge_runtime import pipeline as pipeline_module
from edge_runtime.config import StationConfig
from edge_runtime.daemon import Station
from edge_runtime.decode import DecodeConfig, ImageError, decode_image, jpeg_scan_count
from edge_runtime.http_endpoint import HttpConfig
from edge_runtime.outputs import ResultLogConfig
from edge_runtime.schema import ConfigError, from_mapping
from doubles import ScriptedSource
from doubles import ScriptedSourceConfig


def _part(size: int = 512) -> np.ndarray:
    rng = np.random.default_rng(3)
    img = cv2.GaussianBlur(rng.integers(0, 255, (size, size, 3), dtype=np.uint8), (5, 5), 0)
    return img


def _progressive_jpeg(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1, cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return buf.tobytes()


def _scans(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of every SOS segment including its entropy-coded data."""
    out, pos = [], 2
    while data[pos + 1] != 0xD9:
        length = struct.unpack(">H", data[pos + 2:pos + 4])[0]
        if data[pos + 1] == 0xDA:
            end = re.compile(rb"\xff[^\x00\xd0-\xd7]").search(data, pos + 2 + length).start()
            out.append((pos, end))
            pos = end
        else:
            pos += 2 + length
    return out


def many_scan_jpeg(image: np.ndarray, copies: int) -> bytes:
    """A progressive JPEG with its smallest scan repeated `copies` more times before EOI: a valid file that
    libjpeg decodes (it only warns), at a cost that grows with every copy."""
    data = _progressive_jpeg(image)
    scans = _scans(data)
    start, end = min(scans, key=lambda s: s[1] - s[0])
    last_end = scans[-1][1]
    return data[:last_end] + data[start:end] * copies + data[last_end:]


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def animated_png(image: np.ndarray) -> bytes:
    """The PNG of `image` turned into a two-frame APNG: acTL + fcTL before IDAT (frame 1 = the default image),
    and a second frame (fcTL + fdAT) after it."""
    ok, buf = cv2.imencode(".png", image)
    png = buf.tobytes()
    ihdr_end = 8 + 12 + 13
    h, w = image.shape[:2]
    actl = _chunk(b"acTL", struct.pack(">II", 2, 0))
    fctl0 = _chunk(b"fcTL", struct.pack(">IIIIIHHBB", 0, w, h, 0, 0, 1, 10, 0, 0))
    idat_at = png.index(b"IDAT") - 4
    idat_len = struct.unpack(">I", png[idat_at:idat_at + 4])[0]
    idat_data = png[idat_at + 8:idat_at + 8 + idat_len]
    fctl1 = _chunk(b"fcTL", struct.pack(">IIIIIHHBB", 2, w, h, 0, 0, 1, 10, 0, 0))
    fdat = _chunk(b"fdAT", struct.pack(">I", 3) + idat_data)
    rest = png[ihdr_end:]
    iend_at = rest.index(b"IEND") - 4
    return png[:ihdr_end] + actl + fctl0 + rest[:iend_at] + fctl1 + fdat + rest[iend_at:]


def multipage_tiff(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencodemulti(".tiff", [image, 255 - image])
    assert ok
    return buf.tobytes() if hasattr(buf, "tobytes") else bytes(buf)


# ---- JPEG scans ----------------------------------------------------------------------------------------------

def test_progressive_jpeg_with_thousands_of_scans_is_refused_from_the_header_walk():
    image = _part()
    data = many_scan_jpeg(image, 3000)
    # OpenCV alone decodes it (the old station inspected it, slowly): the file is valid, only expensive.
    assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) is not None
    assert jpeg_scan_count(data, 10_000) > 3000
    with pytest.raises(ImageError, match=r"part\.jpg: JPEG has more than 64 scans"):
        decode_image(data, "part.jpg")


def test_ordinary_progressive_and_baseline_jpegs_still_decode():
    image = _part()
    progressive = _progressive_jpeg(image)
    assert 2 <= jpeg_scan_count(progressive, 64) <= 12
    assert decode_image(progressive, "p.jpg").shape == image.shape
    ok, baseline = cv2.imencode(".jpg", image)
    assert jpeg_scan_count(baseline.tobytes(), 64) == 1
    assert decode_image(baseline.tobytes(), "b.jpg").shape == image.shape


def test_scan_limit_is_a_station_setting():
    data = _progressive_jpeg(_part(256))
    scans = jpeg_scan_count(data, 64)
    assert decode_image(data, "x.jpg", DecodeConfig(max_jpeg_scans=scans)).shape == (256, 256, 3)
    with pytest.raises(ImageError, match=f"more than {scans - 1} scans"):
        decode_image(data, "x.jpg", DecodeConfig(max_jpeg_scans=scans - 1))
    # Repeated scans pass a raised limit and are then refused for what they are: a progression libjpeg only warned
    # about (OpenCV decoded it), at a cost that grew with every copy.
    repeated = many_scan_jpeg(_part(256), 100)
    with pytest.raises(ImageError, match="more than 64 scans"):
        decode_image(repeated, "x.jpg")
    with pytest.raises(ImageError, match="x.jpg: corrupt JPEG data"):
        decode_image(repeated, "x.jpg", DecodeConfig(max_jpeg_scans=200))


def test_file_far_larger_than_its_pixels_is_refused():
    ok, buf = cv2.imencode(".png", _part(64))
    png = buf.tobytes()
    # 2 MB of an ancillary chunk on a 64x64 image: 500 bytes per pixel.
    padded = png[:33] + _chunk(b"zzTx", b"\0" * (2 << 20)) + png[33:]
    assert cv2.imdecode(np.frombuffer(padded, np.uint8), cv2.IMREAD_COLOR) is not None
    with pytest.raises(ImageError, match=r"pad\.png: PNG file of \d+ bytes for 64x64 pixels is over the 8 bytes/pixel"):
        decode_image(padded, "pad.png")
    assert decode_image(png, "plain.png").shape == (64, 64, 3)


# ---- several pages or frames ---------------------------------------------------------------------------------

def test_multipage_tiff_is_refused_unless_accepted_then_only_page_one_is_decoded():
    image = _part(128)
    data = multipage_tiff(image)
    with pytest.raises(ImageError, match=r"t\.tiff: multi-page TIFF refused \(decode\.accept_multipage: false\)"):
        decode_image(data, "t.tiff")
    rgb = decode_image(data, "t.tiff", DecodeConfig(accept_multipage=True))
    np.testing.assert_array_equal(rgb, cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
    ok, single = cv2.imencode(".tiff", image)
    assert decode_image(single.tobytes(), "one.tiff").shape == image.shape


def test_animated_png_is_refused_unless_accepted_then_only_the_first_frame_is_decoded():
    image = _part(64)
    data = animated_png(image)
    with pytest.raises(ImageError, match=r"a\.png: animated PNG \(acTL chunk\) refused"):
        decode_image(data, "a.png")
    rgb = decode_image(data, "a.png", DecodeConfig(accept_multipage=True))
    np.testing.assert_array_equal(rgb, cv2.cvtColor(image, cv2.COLOR_BGR2RGB))


def test_decode_section_of_the_station_file_is_validated():
    cfg = from_mapping(DecodeConfig, {"accept_multipage": True, "max_jpeg_scans": 32}, "decode")
    assert cfg.accept_multipage and cfg.max_jpeg_scans == 32
    with pytest.raises(ConfigError, match="decode.max_jpeg_scans: must be 1..10000, got 0"):
        from_mapping(DecodeConfig, {"max_jpeg_scans": 0}, "decode")


# ---- health means progress -------------------------------------------------------------------------------------

def _healthz(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _wait_for(predicate, what: str, limit_s: float = 30.0):
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_healthz_says_stalled_while_a_frame_hangs_in_decode(small_bundle, tmp_path, monkeypatch):
    release = threading.Event()
    entered = threading.Event()
    real_decode = pipeline_module.decode_image

    def slow_decode(data, name, limits=None, *more, **kw):
        entered.set()
        release.wait(60)  # a decoder grinding through a hostile file
        return real_decode(data, name, limits, *more, **kw)

    monkeypatch.setattr(pipeline_module, "decode_image", slow_decode)
    ok, png = cv2.imencode(".png", _part(128))
    cfg = StationConfig(bundle=str(small_bundle), source=ScriptedSourceConfig(steps=[png.tobytes()]),
                        outputs=[ResultLogConfig(path=str(tmp_path / "r.jsonl"))],
                        http=HttpConfig(port=0, stall_after_s=0.3))
    cfg.recovery.exit_when_exhausted = False
    station = Station(cfg, source=ScriptedSource(cfg.source))
    runner = threading.Thread(target=station.run, daemon=True)
    runner.start()
    try:
        assert entered.wait(60), "the frame never reached decode"
        port = _wait_for(lambda: station.http_port, "the http endpoint")
        code, doc = _wait_for(lambda: (r := _healthz(port))[1]["status"] == "stalled" and r, "a stalled health report")
        assert code == 503 and "in inspection for" in doc["reason"] and "limit 0.3 s" in doc["reason"]
        release.set()
        code, doc = _wait_for(lambda: (r := _healthz(port))[0] == 200 and r, "ready again")
        assert doc["status"] == "ready" and doc["frames"] == 1
    finally:
        release.set()
        station.request_stop()
        runner.join(30)
