"""Geometry: which pixels of a frame the model sees, and where each patch score lands back on the frame.

frame -> region (the ROI, or the whole frame) -> colour (the bundle's pin: grey or colour) -> size check (the
bundle's size policy) -> canvas (the region scaled to the pixel density the bank was fitted at) -> tiles (model
inputs covering the canvas, overlapping) ... patch scores -> stitched canvas heat map -> heat map at the region's
own resolution.

Everything here is pinned in the bundle manifest (`geometry`), so fitting and inspection cut identical tiles.
A new user's non-square parts keep their aspect ratio (no squashing to a square), and frames larger than the
model input can be inspected at full detail by tiling instead of being shrunk until thin defects vanish.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace

import cv2
import numpy as np

from edge_runtime.area_resize import inter_area
from edge_runtime.decode import MAX_PIXELS, ImageError

SIZE_POLICIES = ("refuse", "resize", "letterbox")
# geometry.colour, pinned by fit from the training images: "grey" when every one is R = G = B (a mono camera),
# else "colour"; None (bundles before it): frames are taken as they come. See `match_colour`.
COLOURS = ("grey", "colour")
COLOUR_RULES = {
    None: "not pinned: frames are taken as they come",
    "grey": ("the region is converted to grey (cv2 RGB2GRAY luma) before it is resampled, and the canvas's three "
             "channels are copies of it: a frame reaches the model exactly as a grey file of it would"),
    "colour": "a region with R = G = B in every pixel is a FAULT (a mono camera or pixel format: no colour to inspect)",
}
INTERPOLATION = "INTER_AREA"         # region -> canvas (the last step of either resample method)
# region -> canvas, pinned per bundle (geometry.resample): "area" is one cv2.INTER_AREA resize (bundles of schema 2);
# "halve-area" first halves the region (2 x 2 box averages) while it is at least four times the canvas on both
# axes, then INTER_AREA. Both average every pixel (no aliasing of thin defects); OpenCV's INTER_AREA at a
# non-integer ratio is slow on camera frames (a 5 MP frame to a 256-px canvas: ~8x slower than halve-area,
# benchmarks/results/resize_cost.md), and when the region is under four times the canvas the two are identical.
RESAMPLE_METHODS = ("area", "halve-area")
DEFAULT_RESAMPLE = "halve-area"      # what `edge-export fit` pins in new bundles
PAD_VALUE = 127                      # letterbox fill: 0 after the network's (x - 127) / 128 normalisation
STRIDE = 16                          # input sizes are multiples of the deepest tap's stride
MAX_TILES = 1024                     # bounds what a manifest can make the device allocate
# Model pixels per tile that fit chooses by default (256 x 256), for images of any size: larger ones are shrunk,
# smaller ones upsampled (a 100 x 100 bottle at its own 96 x 96 passed 5 of 63 defects, at 256 x 256 none).
# benchmarks/results/accuracy_levers.md: on bottle more pixels sharpen the heat map (pixel AUROC 0.983 at 256, 0.986
# at the native 384) but narrow the image-level gap between the best-scored defect and the worst good part (+11% at
# 256, +2% at 384: one defect escapes the 0.5% threshold at 384, none at 256), and cost 2.25x the compute.
DEFAULT_PIXELS = 256 * 256


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


@dataclass(frozen=True)
class Placement:
    """Where the region sits on the canvas: x, y, w, h in canvas pixels (the whole canvas unless letterboxed)."""

    x: int
    y: int
    w: int
    h: int


@dataclass(frozen=True)
class Geometry:
    """The bundle's input geometry (all sizes are (width, height) in pixels)."""

    input_size: tuple[int, int]                    # one model input (a tile)
    canvas_size: tuple[int, int]                   # the region resampled to the fitted pixel density
    tiles: tuple[tuple[int, int], ...]             # top-left corners of the tiles on the canvas
    region_size: tuple[int, int] | None = None     # the size the region must have; None: any size (resampled)
    roi: tuple[int, int, int, int] | None = None   # x, y, w, h crop of the frame; None: the whole frame
    size_policy: str = "refuse"                    # region of another size: refuse (FAULT), resize or letterbox
    resample: str = "area"                         # region -> canvas (RESAMPLE_METHODS); manifests without it: area
    colour: str | None = None                      # COLOURS: what the bank was fitted on; None: not pinned
    frame_size: tuple[int, int] | None = None      # with an ROI: the frame size the training images shared; None:
                                                   # no ROI (region_size is the frame's) or frames of varied sizes

    def __post_init__(self) -> None:
        if self.colour is not None and self.colour not in COLOURS:
            raise ValueError(f"colour must be one of {', '.join(COLOURS)} (or absent), got {self.colour!r}")
        if self.size_policy not in SIZE_POLICIES:
            raise ValueError(f"size_policy must be one of {', '.join(SIZE_POLICIES)}, got {self.size_policy!r}")
        if self.resample not in RESAMPLE_METHODS:
            raise ValueError(f"resample must be one of {', '.join(RESAMPLE_METHODS)}, got {self.resample!r}")
        # A bad manifest geometry fails here, with its field, instead of as a negative slice or a division by zero
        # on every frame (numpy reads a negative roi from the far edge; letterbox divides by region_size).
        if self.roi is not None and not (len(self.roi) == 4 and all(_is_int(v) for v in self.roi)
                                         and min(self.roi[:2]) >= 0 and min(self.roi[2:]) >= 1):
            raise ValueError(f"roi must be [x, y, w, h] integers with x, y >= 0 and w, h > 0, got {list(self.roi)}")
        for name in ("region_size", "frame_size"):
            size = getattr(self, name)
            if size is not None and not (len(size) == 2 and all(_is_int(v) and v >= 1 for v in size)):
                raise ValueError(f"{name} must be [width, height] positive integers, got {list(size)}")
        (tw, th), (cw, ch) = self.input_size, self.canvas_size
        if min(tw, th) < 1 or tw > cw or th > ch:
            raise ValueError(f"input {tw}x{th} must be positive and fit the {cw}x{ch} canvas")
        if cw * ch > MAX_PIXELS:
            raise ValueError(f"canvas {cw}x{ch} exceeds the {MAX_PIXELS} pixel limit")
        if not self.tiles or len(self.tiles) > MAX_TILES:
            raise ValueError(f"geometry needs 1 to {MAX_TILES} tiles, got {len(self.tiles)}")
        for x, y in self.tiles:
            if x < 0 or y < 0 or x + tw > cw or y + th > ch:
                raise ValueError(f"tile at ({x}, {y}) of {tw}x{th} lies outside the {cw}x{ch} canvas")
        if not covers(self.tiles, self.input_size, self.canvas_size):
            raise ValueError(f"tiles {list(self.tiles)} of {tw}x{th} do not cover the {cw}x{ch} canvas")

    @property
    def n_tiles(self) -> int:
        return len(self.tiles)

    def grid(self, stride: int = 8) -> tuple[int, int]:
        """Patch grid of one tile (rows, cols) at the stride-8 tap (TF SAME padding: ceil)."""
        return -(-self.input_size[1] // stride), -(-self.input_size[0] // stride)

    def with_overrides(self, roi: tuple[int, int, int, int] | None = None, size_policy: str | None = None) -> "Geometry":
        """The station file may move the ROI (same size) or relax the size policy; it cannot change the tiling.

        Raises ValueError, naming the station file's field, for an override that would make every frame a FAULT
        or show the model what it was not fitted on (a caller with a station file reports it as such)."""
        policy = size_policy or self.size_policy
        if self.region_size is None and policy != self.size_policy:
            # Fitted on images of varied sizes, each resized (or letterboxed) onto the canvas: that transform IS the
            # fit; the other one shows the model squashed frames or grey bars it never saw (letterbox on magnetic
            # tile: 213 of 238 good parts rejected). There is no fitted size for `refuse` to check.
            raise ValueError(f"size_policy: {policy!r}, but this bundle was fitted on images of varied sizes, each "
                             f"{'letterboxed' if self.size_policy == 'letterbox' else 'resized'} onto its canvas: "
                             f"frames must be too (leave size_policy out, or set {self.size_policy!r})")
        if roi is not None and self.frame_size is not None and policy == "refuse":   # only frames of that size come
            x, y, w, h = (int(v) for v in roi)
            fw, fh = self.frame_size
            if x + w > fw or y + h > fh:
                raise ValueError(f"roi: {[x, y, w, h]} lies outside the {fw}x{fh} frames the bundle was fitted on: "
                                 "every frame would be a FAULT")
        if roi is not None and self.region_size is not None and policy == "refuse":
            w, h = int(roi[2]), int(roi[3])
            if (w, h) != self.region_size:
                rw, rh = self.region_size
                what = "region of interest" if self.roi else "whole frame"
                raise ValueError(f"roi: {w}x{h}, but the bundle was fitted on a {rw}x{rh} {what} and its size "
                                 f"policy is 'refuse', so every frame would be a FAULT: give an ROI of {rw}x{rh} "
                                 "(its position may move)")
        return replace(self, roi=tuple(roi) if roi is not None else self.roi, size_policy=policy)

    def to_manifest(self) -> dict:
        return {
            "input_size": list(self.input_size), "canvas_size": list(self.canvas_size),
            "tiles": [list(t) for t in self.tiles],
            "region_size": list(self.region_size) if self.region_size else None,
            "roi": list(self.roi) if self.roi else None, "size_policy": self.size_policy,
            "resample": self.resample,
            "interpolation": ("2 x 2 box halvings (cv2.INTER_LINEAR at exactly half size; an odd last row/column "
                              "replicated) while the region is >= 4x the canvas on both axes, "
                              "then " if self.resample == "halve-area" else "") + f"cv2.{INTERPOLATION} (region -> canvas)",
            "pad_value": PAD_VALUE,
            "stitch": "per tile: patch grid -> cv2.resize INTER_LINEAR to the tile; overlaps: maximum",
            "colour": self.colour,
            "colour_rule": COLOUR_RULES[self.colour],
            "frame_size": list(self.frame_size) if self.frame_size else None,
        }

    @classmethod
    def from_manifest(cls, g: dict) -> "Geometry":
        """Raises ValueError/TypeError/KeyError for a malformed section (the bundle reader names the file)."""
        def whole(v, field: str) -> int:
            # Exactly a JSON integer: int() would truncate 255.7 or read "256", so a hand-edited manifest would
            # score a geometry other than the one written down.
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"geometry.{field} must hold whole numbers, got {v!r}")
            return v

        def pair(v, field: str) -> tuple[int, int] | None:
            if v is None:
                return None
            if not isinstance(v, (list, tuple)) or len(v) != 2:
                raise ValueError(f"geometry.{field} must be a pair [w, h], got {v!r}")
            return whole(v[0], field), whole(v[1], field)

        return cls(input_size=pair(g["input_size"], "input_size"), canvas_size=pair(g["canvas_size"], "canvas_size"),
                   tiles=tuple(pair(t, "tiles") for t in g["tiles"]),
                   region_size=pair(g.get("region_size"), "region_size"),
                   roi=tuple(whole(v, "roi") for v in g["roi"]) if g.get("roi") else None,
                   size_policy=g.get("size_policy", "refuse"), resample=g.get("resample", "area"),
                   colour=g.get("colour"), frame_size=pair(g.get("frame_size"), "frame_size"))


# ---- planning (the exporter chooses; the manifest pins) --------------------------------------------------------
def round_to_stride(v: float, stride: int = STRIDE, minimum: int = 32) -> int:
    return max(minimum, int(round(v / stride)) * stride)


ASPECT_TOLERANCE = 0.05   # default input: W / H within 5% of the images' aspect, else a better pair is sought


def default_input_size(aspect: float, pixels: int) -> tuple[int, int]:
    """(W, H) with W / H close to `aspect` and about `pixels` pixels, multiples of the stride.

    Rounding each side to the stride on its own bends thin strips (600 x 40 -> 608 x 32: 27% off), and a bent
    canvas puts letterbox bars on frames of the training aspect. When it is more than ASPECT_TOLERANCE off, the pair
    nearest the aspect with 0.5-1.5x the pixels is taken instead (ties: nearest the pixel budget)."""
    w, h = round_to_stride(math.sqrt(pixels * aspect)), round_to_stride(math.sqrt(pixels / aspect))
    off = lambda w, h: abs(math.log(w / h / aspect))  # noqa: E731
    if off(w, h) <= ASPECT_TOLERANCE:
        return w, h
    sides = range(32, 32 + STRIDE * 512, STRIDE)
    pairs = {(round_to_stride(v * aspect), v) for v in sides} | {(v, round_to_stride(v / aspect)) for v in sides}
    pairs = [p for p in pairs if 0.5 <= p[0] * p[1] / pixels <= 1.5] or [(w, h)]
    return min(pairs, key=lambda p: (round(off(*p), 3), abs(math.log(p[0] * p[1] / pixels))))


def tile_offsets(length: int, tile: int, overlap: int) -> list[int]:
    """Evenly spaced tile starts covering [0, length) with at least `overlap` pixels shared by neighbours."""
    if length <= tile:
        return [0]
    n = math.ceil((length - overlap) / (tile - overlap))
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def plan_tiles(canvas_size: tuple[int, int], input_size: tuple[int, int], overlap: int) -> tuple[tuple[int, int], ...]:
    xs = tile_offsets(canvas_size[0], input_size[0], overlap)
    ys = tile_offsets(canvas_size[1], input_size[1], overlap)
    return tuple((x, y) for y in ys for x in xs)


def covers(tiles, input_size: tuple[int, int], canvas_size: tuple[int, int]) -> bool:
    mask = np.zeros((canvas_size[1], canvas_size[0]), dtype=bool)
    for x, y in tiles:
        mask[y:y + input_size[1], x:x + input_size[0]] = True
    return bool(mask.all())


# ---- the stage ----------------------------------------------------------------------------------------------------
def _halve(image: np.ndarray) -> np.ndarray:
    """The 2 x 2 box average; an odd last row or column is averaged with itself (replicated edge)."""
    h, w = image.shape[:2]
    eh, ew = h - h % 2, w - w % 2
    # INTER_LINEAR at exactly half size samples midway between each pixel pair: the box. At any other ratio it
    # would sample (and alias), hence the even part here and the odd edge below.
    out = cv2.resize(image[:eh, :ew], (ew // 2, eh // 2), interpolation=cv2.INTER_LINEAR)
    if w % 2:
        col = image[:eh, w - 1:].astype(np.uint16)
        out = np.concatenate([out, ((col[0::2] + col[1::2] + 1) // 2).astype(np.uint8)], axis=1)
    if h % 2:
        row = image[h - 1:].astype(np.uint16)
        pairs = (row[:, 0:ew:2] + row[:, 1:ew:2] + 1) // 2
        out = np.concatenate([out, np.concatenate([pairs, row[:, ew:]], axis=1).astype(np.uint8)], axis=0)
    return out


def resample(image: np.ndarray, size: tuple[int, int], method: str, threads: int = 2) -> np.ndarray:
    """`image` resampled to size = (w, h) by a RESAMPLE_METHODS method (see there); `threads`: the caller's thread
    budget (area_resize.inter_area uses a second thread only when it is >= 2)."""
    w, h = size
    if method == "halve-area":
        # Halving stops while the region is still >= 2x the canvas, so that the exact area average does the last
        # 2-4x: closer to one INTER_AREA (1-2 grey levels apart on textured frames, benchmarks/results/resize_cost.md)
        # than halving down to under 2x (3-6), at the same cost.
        while image.shape[1] >= 4 * w and image.shape[0] >= 4 * h:
            image = _halve(image)
    elif method != "area":
        raise ValueError(f"resample must be one of {', '.join(RESAMPLE_METHODS)}, got {method!r}")
    return inter_area(image, (w, h), threads)


def region_of(rgb: np.ndarray, geom: Geometry, name: str = "<frame>") -> np.ndarray:
    """The frame's region (its ROI, or the whole frame). Under the `refuse` policy a frame whose size differs from
    the training frames' (`frame_size`, pinned with an ROI) is an ImageError: the same ROI on another camera's
    frame would cut another part of the scene."""
    if geom.frame_size is not None and geom.size_policy == "refuse" and geom.roi is not None:
        H, W = rgb.shape[:2]
        if (W, H) != geom.frame_size:
            fw, fh = geom.frame_size
            raise ImageError(f"{name}: frame is {W}x{H} but the bundle was fitted on {fw}x{fh} frames (ROI "
                             f"{list(geom.roi)}; geometry.size_policy is 'refuse')")
    return crop_roi(rgb, geom.roi, name)


def crop_roi(rgb: np.ndarray, roi: tuple[int, int, int, int] | None, name: str = "<frame>") -> np.ndarray:
    if roi is None:
        return rgb
    x, y, w, h = roi
    H, W = rgb.shape[:2]
    if x + w > W or y + h > H:
        raise ImageError(f"{name}: region of interest {list(roi)} lies outside the {W}x{H} frame")
    return rgb[y:y + h, x:x + w]


def to_canvas(region: np.ndarray, geom: Geometry, name: str = "<frame>",
              threads: int = 2) -> tuple[np.ndarray, Placement]:
    """The region resampled onto the canvas (H x W x 3; a grey H x W region's one channel copied to all three),
    and where it landed. Raises ImageError under the `refuse` policy. `threads`: the inspection's thread budget
    (`resample`)."""
    canvas, place = _to_canvas(region, geom, name, threads)
    return (cv2.cvtColor(canvas, cv2.COLOR_GRAY2RGB) if canvas.ndim == 2 else canvas), place


def _to_canvas(region: np.ndarray, geom: Geometry, name: str, threads: int) -> tuple[np.ndarray, Placement]:
    h, w = region.shape[:2]
    cw, ch = geom.canvas_size
    mismatch = geom.region_size is not None and (w, h) != geom.region_size
    if mismatch and geom.size_policy == "refuse":
        rw, rh = geom.region_size
        what = "region of interest" if geom.roi else "frame"
        raise ImageError(f"{name}: {what} is {w}x{h} but the bundle was fitted on {rw}x{rh} "
                         "(geometry.size_policy is 'refuse'; set size_policy: resize or letterbox in the "
                         "station file to accept other sizes)")
    # A region of the fitted size is resampled as in fitting; letterboxing applies to other sizes, or to every
    # frame of a bundle fitted on images of varied sizes.
    letterbox = geom.size_policy == "letterbox" and (mismatch or geom.region_size is None)
    if letterbox:
        if geom.region_size is not None:
            # Into the fitted region's aspect, then onto the canvas as fit resampled that region: a frame of the
            # training images' aspect (at any size) covers the whole canvas as they did. The canvas only
            # approximates their aspect (multiples of 16), and bars the model never saw score as defects (a
            # 2x-size frame of a 150 x 384 strip bundle got 13 grey rows: every good part NG). Within
            # ASPECT_TOLERANCE of it (a row or column short, 1080 padded to 1088) the frame is stretched, as fit
            # itself bends the aspect up to that much: a 1-px bar alone rejected every good part.
            rw, rh = geom.region_size
            if abs(math.log((w / h) / (rw / rh))) <= ASPECT_TOLERANCE:
                pw, ph = cw, ch
            else:
                f = min(rw / w, rh / h)
                pw, ph = round(w * f * cw / rw), round(h * f * ch / rh)
        else:
            f = min(cw / w, ch / h)
            pw, ph = round(w * f), round(h * f)
        pw, ph = min(cw, max(1, pw)), min(ch, max(1, ph))
        place = Placement((cw - pw) // 2, (ch - ph) // 2, pw, ph)
        canvas = np.full((ch, cw) + region.shape[2:], PAD_VALUE, dtype=np.uint8)
        canvas[place.y:place.y + ph, place.x:place.x + pw] = resample(region, (pw, ph), geom.resample, threads)
        return canvas, place
    if (w, h) == (cw, ch):
        return np.ascontiguousarray(region), Placement(0, 0, cw, ch)
    return resample(region, (cw, ch), geom.resample, threads), Placement(0, 0, cw, ch)


def is_grey(image: np.ndarray) -> bool:
    """R = G = B in every pixel. The middle row, then 8 rows spread over the frame first: a colour frame almost
    always answers there, in a few microseconds at any size (benchmarks/results/resize_cost.md); every pixel is
    read only when those are grey."""
    h = image.shape[0]
    for part in (image[h // 2:h // 2 + 1], image[h // 16::max(1, h // 8)], image):
        px = part.reshape(-1, 3)
        if not (np.array_equal(px[:, 0], px[:, 1]) and np.array_equal(px[:, 0], px[:, 2])):
            return False
    return True


def match_colour(region: np.ndarray, geom: Geometry, name: str = "<frame>") -> np.ndarray:
    """The region as the bundle's colour pin (geometry.colour) takes it; raises ImageError when it cannot.

    A grey bundle inspects brightness only: the region becomes one grey channel (H x W), which to_canvas
    resamples (one channel instead of three) and copies to the three channels; OpenCV resamples each channel
    alike, so a colour camera's frame is inspected exactly as a grey file of it would be, and a grey frame as
    before.
    A colour bundle cannot inspect a frame without colour: its bank holds colours that such a frame never
    matches, and a defect that shows only in colour would be invisible, so the part is a FAULT with the reason
    rather than an NG that hides a wrongly set camera."""
    if geom.colour == "grey":
        return cv2.cvtColor(region, cv2.COLOR_RGB2GRAY)
    if geom.colour == "colour" and is_grey(region):
        what = "region of interest" if geom.roi else "frame"
        raise ImageError(f"{name}: the {what} has no colour (R = G = B in every pixel: a mono camera or grey pixel "
                         "format, or a black or saturated frame) but the bundle was fitted on colour images "
                         "(geometry.colour); set the camera to a colour format, or fit a bundle on its grey frames")
    return region


def cut_tiles(canvas: np.ndarray, geom: Geometry) -> np.ndarray:
    """(n_tiles, H, W, 3) uint8 views stacked into one array, in the manifest's tile order."""
    tw, th = geom.input_size
    if geom.n_tiles == 1 and canvas.shape[:2] == (th, tw):
        return canvas[None]
    return np.stack([canvas[y:y + th, x:x + tw] for x, y in geom.tiles])


def stitch(tile_maps: np.ndarray, geom: Geometry) -> np.ndarray:
    """(n_tiles, th, tw) per-tile maps -> (canvas_h, canvas_w) map, overlaps take the maximum."""
    if geom.n_tiles == 1 and geom.canvas_size == geom.input_size:
        return tile_maps[0]
    tw, th = geom.input_size
    out = np.zeros((geom.canvas_size[1], geom.canvas_size[0]), dtype=np.float32)
    for (x, y), m in zip(geom.tiles, tile_maps):
        np.maximum(out[y:y + th, x:x + tw], m, out=out[y:y + th, x:x + tw])
    return out


def to_region(canvas_map: np.ndarray, place: Placement, region_hw: tuple[int, int]) -> np.ndarray:
    """Canvas heat map -> the region's own resolution, so an overlay lines up with the inspected pixels."""
    m = canvas_map[place.y:place.y + place.h, place.x:place.x + place.w]
    h, w = region_hw
    if m.shape == (h, w):
        return m
    return cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR)
