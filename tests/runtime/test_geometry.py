"""Geometry: tiles cover the region, sizes are checked by policy, heat maps land where the pixels were."""
import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_runtime import scoring
from edge_runtime.decode import ImageError
from edge_runtime.geometry import (Geometry, covers, default_input_size, plan_tiles, resample, stitch, tile_offsets,
                                   to_canvas, to_region)


@settings(max_examples=200, deadline=None)
@given(length=st.integers(32, 5000), tile=st.integers(32, 512), overlap=st.integers(0, 64))
def test_tile_offsets_cover_with_the_promised_overlap(length, tile, overlap):
    overlap = min(overlap, tile - 1)
    if length < tile:
        length = tile
    xs = tile_offsets(length, tile, overlap)
    assert xs[0] == 0 and xs[-1] == length - tile                   # first and last flush with the edges
    assert all(b - a <= tile - overlap for a, b in zip(xs, xs[1:]))  # neighbours share >= overlap pixels
    assert all(b > a for a, b in zip(xs, xs[1:]))


@settings(max_examples=50, deadline=None)
@given(w=st.integers(128, 2500), h=st.integers(96, 2500))
def test_planned_tiles_cover_the_whole_canvas(w, h):
    tiles = plan_tiles((w, h), (128, 96), 16)
    assert covers(tiles, (128, 96), (w, h))
    Geometry((128, 96), (w, h), tiles)                               # validates (raises if not)


def test_geometry_refuses_tiles_that_leave_gaps():
    with pytest.raises(ValueError, match="do not cover"):
        Geometry((64, 64), (200, 64), ((0, 0), (136, 0)))
    with pytest.raises(ValueError, match="outside"):
        Geometry((64, 64), (100, 64), ((0, 0), (50, 0)))


def test_default_input_keeps_the_aspect_ratio():
    w, h = default_input_size(640 / 256, 256 * 256)
    assert w % 16 == 0 and h % 16 == 0 and abs(w / h - 2.5) < 0.15 and abs(w * h - 65536) < 0.1 * 65536


def region(w, h):
    return np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)


def test_a_frame_of_another_size_is_refused_by_default_with_the_sizes_named():
    g = Geometry((64, 32), (64, 32), ((0, 0),), region_size=(640, 320))
    with pytest.raises(ImageError, match=r"cam0: frame is 600x320 but the bundle was fitted on 640x320"):
        to_canvas(region(600, 320), g, "cam0")
    canvas, place = to_canvas(region(640, 320), g)
    assert canvas.shape == (32, 64, 3) and (place.w, place.h) == (64, 32)


def test_letterbox_keeps_the_aspect_and_maps_back():
    g = Geometry((64, 64), (64, 64), ((0, 0),), region_size=(200, 200), size_policy="letterbox")
    img = np.zeros((100, 200, 3), np.uint8)                     # a 2:1 frame into a square canvas
    canvas, place = to_canvas(img, g)
    assert (place.x, place.y, place.w, place.h) == (0, 16, 64, 32)
    assert np.all(canvas[:16] == 127) and np.all(canvas[16:48] == 0)   # padding is the normalisation's zero
    heat = np.zeros((64, 64), np.float32)
    heat[16 + 8, 48] = 1.0                                       # canvas (48, 24) -> region (150, 25)
    back = to_region(heat, place, (100, 200))
    y, x = np.unravel_index(np.argmax(back), back.shape)
    assert back.shape == (100, 200) and abs(x - 150) <= 4 and abs(y - 25) <= 4


def test_stitch_takes_the_maximum_in_overlaps():
    g = Geometry((4, 4), (6, 4), ((0, 0), (2, 0)))
    maps = np.stack([np.full((4, 4), 1.0, np.float32), np.full((4, 4), 2.0, np.float32)])
    out = stitch(maps, g)
    assert out.shape == (4, 6) and np.all(out[:, :2] == 1) and np.all(out[:, 2:] == 2)


def test_tiled_heat_map_puts_a_hot_patch_where_its_tile_is():
    g = Geometry((64, 64), (112, 64), plan_tiles((112, 64), (64, 64), 16))   # two tiles: x 0 and 48
    assert g.tiles == ((0, 0), (48, 0))
    rows, cols = g.grid()
    patch = np.zeros(g.n_tiles * rows * cols, np.float32)
    patch[rows * cols + 3 * cols + 6] = 9.0                    # tile 1, row 3, col 6 -> canvas x 48 + 52, y 28
    heat = scoring.anomaly_map(patch, g, *to_canvas(region(224, 128), g)[1:], (128, 224))
    assert heat.shape == (128, 224)
    y, x = np.unravel_index(np.argmax(heat), heat.shape)
    assert abs(x - 2 * (48 + 6.5 * 8)) <= 12 and abs(y - 2 * (3.5 * 8)) <= 12


def test_a_manifest_cannot_make_the_device_allocate_without_bound():
    with pytest.raises(ValueError, match="pixel limit"):
        Geometry((64, 64), (2**20, 2**20), ((0, 0),))
    with pytest.raises(ValueError, match="tiles"):
        Geometry((8, 8), (64, 64), tuple((x, y) for x in range(0, 57) for y in range(0, 57)))
    with pytest.raises(ValueError, match="fit the"):
        Geometry((128, 64), (64, 64), ((0, 0),))


@pytest.mark.parametrize("field, value, why", [
    ("roi", [-1, 0, 32, 32], "roi must be"), ("roi", [0, 0, 0, 32], "roi must be"),
    ("roi", [0, 0, 32], "roi must be"), ("region_size", [0, 32], "region_size must be"),
    ("region_size", [-64, 32], "region_size must be"), ("frame_size", [640, 0], "frame_size must be")])
def test_a_manifest_geometry_with_a_bad_roi_or_size_fails_at_load_with_the_field(field, value, why):
    """Not on every frame, deep in numpy: a negative roi slices from the far edge, a zero region_size divides by 0."""
    g = {"input_size": [32, 32], "canvas_size": [32, 32], "tiles": [[0, 0]], "size_policy": "letterbox",
         "roi": [0, 0, 32, 32], "region_size": [32, 32], field: value}
    with pytest.raises(ValueError, match=why):
        Geometry.from_manifest(g)
    with pytest.raises(ValueError, match=why):
        Geometry((32, 32), (32, 32), ((0, 0),), **{field: tuple(value)})
    with pytest.raises(ValueError, match="roi must be"):
        Geometry((32, 32), (32, 32), ((0, 0),), roi=(0.5, 0, 32, 32))



@pytest.mark.parametrize("field, value", [
    ("roi", [0, 0, 31.7, 32]), ("roi", [0, "0", 32, 32]), ("region_size", [32.5, 32]), ("input_size", ["32", 32]),
    ("canvas_size", [32, True]), ("frame_size", [640]), ("tiles", [[0.0, 0]])])
def test_a_manifest_geometry_must_hold_whole_numbers(field, value):
    """int() truncated 31.7 and read "0": a hand-edited manifest scored another geometry than the one written."""
    g = {"input_size": [32, 32], "canvas_size": [32, 32], "tiles": [[0, 0]], "roi": [0, 0, 32, 32],
         "region_size": [32, 32], field: value}
    with pytest.raises(ValueError, match=f"geometry.{field} must"):
        Geometry.from_manifest(g)

# ---- resampling the region onto the canvas --------------------------------------------------------------------
def _part(w: int, h: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (0, 0), 3)
    cv2.line(img, (w // 5, h // 3), (4 * w // 5, h // 3 + 7), (255, 255, 255), 1)   # a 1-px scratch
    return img


@pytest.mark.parametrize("src, dst", [((384, 384), (256, 256)), ((500, 300), (272, 240)), ((300, 500), (256, 256)),
                                      ((200, 150), (256, 256)), ((640, 480), (256, 192)), ((1000, 2000), (256, 512))])
def test_halve_area_is_area_when_the_region_is_under_four_times_the_canvas(src, dst):
    img = _part(*src)
    np.testing.assert_array_equal(resample(img, dst, "halve-area"), cv2.resize(img, dst, interpolation=cv2.INTER_AREA))


@pytest.mark.parametrize("src, dst", [((2448, 2048), (320, 272)), ((1280, 1024), (320, 256)), ((1920, 1080), (448, 256))])
def test_halve_area_averages_every_pixel_like_area_on_camera_frames(src, dst):
    img = _part(*src)
    a = cv2.resize(img, dst, interpolation=cv2.INTER_AREA).astype(np.float32)
    b = resample(img, dst, "halve-area").astype(np.float32)
    assert b.shape == a.shape
    assert np.abs(a - b).mean() < 1.0          # the same picture, within a grey level on average
    # One-pixel stripes: an averaging resample gives flat grey; picking pixels (INTER_NEAREST) aliases them.
    stripes = np.zeros((src[1], src[0], 3), np.uint8)
    stripes[:, ::2] = 255
    flat = resample(stripes, dst, "halve-area").astype(np.float32)
    assert np.abs(flat - 127.5).max() < 16
    aliased = cv2.resize(stripes, dst, interpolation=cv2.INTER_NEAREST).astype(np.float32)
    assert np.abs(aliased - 127.5).max() > 100   # the check above can fail


def test_an_odd_sized_region_keeps_its_last_row_and_column():
    """Odd sizes halve with the last pixel row/column replicated: no pixel is dropped, no stripe aliases."""
    img = np.full((777, 999, 3), 100, np.uint8)
    img[:, -1] = 255                           # only the last column and row are bright
    img[-1, :] = 255
    out = resample(img, (240, 192), "halve-area").astype(np.float32)
    assert out[:-1, -1].min() > 100 and out[-1, :-1].min() > 100     # they reach the canvas edge
    assert np.abs(out[:-2, :-2] - 100).max() == 0                     # and nothing else
    stripes = np.zeros((777, 999, 3), np.uint8)
    stripes[:, ::2] = 255
    flat = resample(stripes, (240, 192), "halve-area").astype(np.float32)
    assert np.abs(flat[:, :-1] - 127.5).max() < 16


def test_a_thin_scratch_survives_halve_area_as_it_survives_area():
    img = np.full((2048, 2448, 3), 100, np.uint8)
    img[1000, 600:1800] = 255                  # 1 px wide, 7.6x over the canvas: a tenth of its contrast is left
    for method in ("area", "halve-area"):
        out = resample(img, (320, 272), method).astype(np.float32)
        row = int(np.argmax(out[..., 0].max(1)))
        assert abs(row - 1000 * 272 / 2048) <= 1 and out[row, 80:230, 0].min() > 105, method


def test_geometry_pins_its_resample_method_and_reads_old_manifests_as_area():
    g = Geometry(input_size=(64, 64), canvas_size=(64, 64), tiles=((0, 0),), resample="halve-area")
    assert Geometry.from_manifest(g.to_manifest()).resample == "halve-area"
    old = g.to_manifest()
    old.pop("resample")
    assert Geometry.from_manifest(old).resample == "area"
    with pytest.raises(ValueError, match="resample"):
        Geometry(input_size=(64, 64), canvas_size=(64, 64), tiles=((0, 0),), resample="nearest")



def test_is_grey_looks_at_every_pixel_not_only_its_sample_rows():
    from edge_runtime.geometry import is_grey
    canvas = np.repeat(region(64, 48)[:, :, :1], 3, axis=2)
    assert is_grey(canvas)
    canvas[3, 5, 2] ^= 1                                   # row 3: outside the every-16th-row sample
    assert not is_grey(canvas)


def test_colour_pin_survives_the_manifest():
    g = Geometry((64, 32), (64, 32), ((0, 0),), colour="grey")
    m = g.to_manifest()
    assert m["colour"] == "grey" and "RGB2GRAY" in m["colour_rule"]
    assert Geometry.from_manifest(m) == g
    del m["colour"]
    assert Geometry.from_manifest(m).colour is None        # bundles from before the pin


def test_a_grey_bundle_letterboxes_the_grey_region_onto_a_three_channel_canvas():
    from edge_runtime.geometry import match_colour
    g = Geometry((64, 64), (64, 64), ((0, 0),), region_size=(200, 200), size_policy="letterbox", colour="grey")
    img = region(200, 100)
    canvas, place = to_canvas(match_colour(img, g), g)
    assert canvas.shape == (64, 64, 3) and (place.w, place.h) == (64, 32)
    assert (canvas[0] == 127).all() and (canvas[..., 0] == canvas[..., 2]).all()
    inside = canvas[place.y:place.y + place.h, place.x:place.x + place.w, 0]
    expect = cv2.resize(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), (64, 32), interpolation=cv2.INTER_AREA)
    assert np.array_equal(inside, expect)


def test_letterbox_gives_a_frame_of_the_training_aspect_the_whole_canvas_as_fit_did():
    """The canvas only approximates the training aspect (sides are multiples of 16); a frame of that aspect at
    another size must land on the whole canvas, as the training images did, not get bars the model never saw."""
    g = Geometry((144, 384), (144, 384), ((0, 0),), region_size=(150, 384), size_policy="letterbox")
    frame = region(300, 768)                                     # the training strip at twice the size
    canvas, place = to_canvas(frame, g)
    assert (place.x, place.y, place.w, place.h) == (0, 0, 144, 384)
    assert np.array_equal(canvas, resample(frame, (144, 384), g.resample))
    _, place = to_canvas(region(300, 700), g)                    # another aspect: bars, in the fitted frame's terms
    assert (place.x, place.y, place.w, place.h) == (0, 17, 144, 350)          # 700 x 0.5, centred


def test_a_bundle_fitted_on_varied_sizes_keeps_its_own_size_policy():
    """Such a bundle resized (or letterboxed) every training image onto its canvas: the other transform shows the
    model squashed frames or bars it never saw (magnetic tile letterboxed: 213 of 238 good parts rejected)."""
    g = Geometry((64, 64), (64, 64), ((0, 0),), region_size=None, size_policy="resize")
    for policy in ("letterbox", "refuse"):
        with pytest.raises(ValueError, match=rf"size_policy: '{policy}', but this bundle was fitted on images of "
                                             "varied sizes, each resized"):
            g.with_overrides(size_policy=policy)
    assert g.with_overrides(size_policy="resize").size_policy == "resize"
    boxed = Geometry((64, 64), (64, 64), ((0, 0),), region_size=None, size_policy="letterbox")
    with pytest.raises(ValueError, match="each letterboxed"):
        boxed.with_overrides(size_policy="resize")


def test_an_roi_bundle_refuses_frames_of_another_size_than_its_training_frames():
    """With an ROI the region always has the fitted size, so the frame's own size is what shows another camera or
    mode; it is pinned (geometry.frame_size) and checked under `refuse`."""
    from edge_runtime.geometry import region_of
    g = Geometry((64, 64), (64, 64), ((0, 0),), region_size=(100, 100), roi=(50, 0, 100, 100), frame_size=(300, 120))
    g = Geometry.from_manifest(g.to_manifest())
    assert g.frame_size == (300, 120)
    assert region_of(region(300, 120), g).shape == (100, 100, 3)
    with pytest.raises(ImageError, match=r"cam1: frame is 600x240 but the bundle was fitted on 300x120 frames"):
        region_of(region(600, 240), g, "cam1")
    assert region_of(region(600, 240), g.with_overrides(size_policy="resize")).shape == (100, 100, 3)


@settings(max_examples=200, deadline=None)
@given(aspect=st.floats(1 / 16, 16), pixels=st.integers(20_000, 65_536))
def test_default_input_stays_within_five_percent_of_the_aspect(aspect, pixels):
    w, h = default_input_size(aspect, pixels)
    assert w % 16 == 0 and h % 16 == 0 and min(w, h) >= 32
    assert abs(np.log(w / h / aspect)) <= 0.05 + 1e-9 and 0.5 <= w * h / pixels <= 1.5


def test_letterbox_stretches_a_frame_within_five_percent_of_the_training_aspect():
    """A frame a column short (or 1080 padded to 1088) is stretched as fit stretched the training images: a 1-px
    bar alone had rejected every good part."""
    g = Geometry((144, 384), (144, 384), ((0, 0),), region_size=(150, 384), size_policy="letterbox")
    _, place = to_canvas(region(149, 384), g)
    assert (place.x, place.y, place.w, place.h) == (0, 0, 144, 384)
    _, place = to_canvas(region(140, 384), g)                    # 7% narrower: bars, as documented
    assert place.w < 144 and place.x > 0


def test_a_station_roi_outside_the_pinned_frame_is_refused():
    g = Geometry((64, 64), (64, 64), ((0, 0),), region_size=(100, 100), roi=(50, 0, 100, 100), frame_size=(300, 120))
    with pytest.raises(ValueError, match=r"roi: \[250, 0, 100, 100\] lies outside the 300x120 frames"):
        g.with_overrides(roi=(250, 0, 100, 100))
    assert g.with_overrides(roi=(200, 20, 100, 100)).roi == (200, 20, 100, 100)
