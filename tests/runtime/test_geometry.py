"""Geometry: tiles cover the region, sizes are checked by policy, heat maps land where the pixels were."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_runtime import scoring
from edge_runtime.decode import ImageError
from edge_runtime.geometry import (Geometry, covers, default_input_size, plan_tiles, stitch, tile_offsets, to_canvas,
                                   to_region)


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
