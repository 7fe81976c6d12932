"""Synthetic inspection data: top views of a turned steel flange on a conveyor, good and defective.

The built-in default data set of the quick-start demo and the unit tests, written in the MVTec-AD layout.
Only numpy and OpenCV, so it is cheap to import; every random draw comes from a seeded numpy Generator,
so a seed always gives byte-identical PNGs.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Union

import cv2
import numpy as np

DEFECT_TYPES: tuple[str, ...] = ("scratch", "dent", "stain", "missing_hole", "missing_piece")

# Written into every generated category; a folder without it is never emptied by a regeneration,
# so pointing `out_dir` at a real data set by mistake cannot delete it.
MARKER_NAME = ".synthetic_parts.json"

# Sub-streams of one seed, so that e.g. changing n_train does not change the test images.
_STREAM_TRAIN, _STREAM_TEST_GOOD, _STREAM_TEST_DEFECT, _STREAM_FRAMES = 0, 1, 2, 3

_REFERENCE_SIZE = 256  # the geometry constants below are in pixels at this image size
_N_HOLES = 6
_LIGHT_ELEVATION = math.radians(50.0)


@dataclass(frozen=True)
class _Geometry:
    """Flange dimensions in pixels for one image size (part frame: origin at the part centre)."""

    outer_radius: float
    bore_radius: float
    hub_radius: float
    bolt_circle_radius: float
    hole_radius: float
    keyway_width: float
    keyway_depth: float
    bevel_width: float

    @classmethod
    def for_size(cls, size: int) -> "_Geometry":
        s = size / _REFERENCE_SIZE
        return cls(outer_radius=102 * s, bore_radius=28 * s, hub_radius=46 * s, bolt_circle_radius=69 * s,
                   hole_radius=9 * s, keyway_width=8 * s, keyway_depth=7 * s, bevel_width=max(1.5, 2.5 * s))

    def hole_centres(self) -> np.ndarray:
        """(N, 2) bolt-hole centres in the part frame; hole 0 sits 30 degrees after the keyway."""
        angles = np.deg2rad(30.0 + 360.0 / _N_HOLES * np.arange(_N_HOLES))
        return self.bolt_circle_radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


@dataclass(frozen=True)
class PartParams:
    """Nuisance parameters of one good part image: everything that varies between nominal samples."""

    size: int
    center: tuple[float, float]          # part centre in image pixels (x, y): placement jitter
    rotation_deg: float                  # part rotation about its axis
    light_azimuth_deg: float             # direction towards the lamp in image coordinates (y down)
    gradient: tuple[float, float]        # relative illumination change across the image in x and y
    gain: float                          # exposure / lamp ageing
    tint: tuple[float, float, float]     # BGR white-balance of the steel
    noise_sigma: float                   # sensor noise, grey levels
    texture_seed: int                    # turning marks, belt texture and sensor noise


@dataclass(frozen=True)
class Scratch:
    """A thin tool or handling scratch; points in the part frame."""

    kind: ClassVar[str] = "scratch"
    points: tuple[tuple[float, float], ...]
    thickness: int
    reflectance: float   # > 1: freshly cut bright metal, < 1: dark groove
    depth: float         # groove depth in pixels, which the lamp turns into a bright and a dark flank


@dataclass(frozen=True)
class Dent:
    """An impact dent: a smooth depression with compact support (the mask is exactly its footprint)."""

    kind: ClassVar[str] = "dent"
    center: tuple[float, float]
    axes: tuple[float, float]  # semi-axes in pixels
    angle_deg: float
    depth: float


@dataclass(frozen=True)
class Stain:
    """A rust or oil smear: the union of a few soft blobs with a ragged edge."""

    kind: ClassVar[str] = "stain"
    blobs: tuple[tuple[float, float, float, float], ...]  # (x, y, sigma, weight) in the part frame
    color: tuple[float, float, float]                      # BGR multiplier of the steel under the stain
    opacity: float
    noise_seed: int


@dataclass(frozen=True)
class MissingHole:
    """One bolt hole was never drilled."""

    kind: ClassVar[str] = "missing_hole"
    hole_index: int


@dataclass(frozen=True)
class MissingPiece:
    """A chunk broken out of the rim: a ragged disc removed from the part."""

    kind: ClassVar[str] = "missing_piece"
    center: tuple[float, float]
    radius: float
    roughness: tuple[float, ...]  # radius offsets at evenly spaced angles around the centre


Defect = Union[Scratch, Dent, Stain, MissingHole, MissingPiece]


def sample_part_params(rng: np.random.Generator, size: int = _REFERENCE_SIZE) -> PartParams:
    """Draw the nuisance variation of one good part (a few px of jitter, a few degrees, lighting, noise)."""
    s = size / _REFERENCE_SIZE
    jitter = rng.uniform(-4.0, 4.0, size=2) * s
    grad_dir = rng.uniform(0.0, 2.0 * math.pi)
    grad_strength = rng.uniform(0.04, 0.16)
    tint = 1.0 + rng.normal(0.0, 0.015, size=3)
    return PartParams(
        size=size,
        center=(size / 2 + float(jitter[0]), size / 2 + float(jitter[1])),
        rotation_deg=float(rng.uniform(-6.0, 6.0)),
        light_azimuth_deg=float(-135.0 + rng.uniform(-8.0, 8.0)),
        gradient=(grad_strength * math.cos(grad_dir), grad_strength * math.sin(grad_dir)),
        gain=float(rng.uniform(0.92, 1.08)),
        tint=(float(tint[0]) + 0.02, float(tint[1]), float(tint[2]) - 0.02),  # steel is slightly blue
        noise_sigma=float(rng.uniform(1.5, 3.0)),
        texture_seed=int(rng.integers(0, 2**31 - 1)),
    )


def _part_sdf(u: np.ndarray, v: np.ndarray, geom: _Geometry, holes: tuple[int, ...]) -> np.ndarray:
    """Signed distance to the part outline in the part frame: > 0 inside the steel, < 0 in holes and outside."""
    r = np.hypot(u, v)
    sdf = np.minimum(geom.outer_radius - r, r - geom.bore_radius)
    # Keyway: a slot cut from the bore along +u.
    half_w = geom.keyway_width / 2
    slot = np.maximum(np.abs(v) - half_w, u - (geom.bore_radius + geom.keyway_depth))
    slot = np.maximum(slot, -u)
    sdf = np.minimum(sdf, slot)
    centres = geom.hole_centres()
    for i in holes:
        sdf = np.minimum(sdf, np.hypot(u - centres[i, 0], v - centres[i, 1]) - geom.hole_radius)
    return sdf


def _piece_sdf(u: np.ndarray, v: np.ndarray, piece: MissingPiece) -> np.ndarray:
    """Signed distance to the broken-out region: > 0 inside it."""
    du, dv = u - piece.center[0], v - piece.center[1]
    rough = np.asarray(piece.roughness, dtype=np.float64)
    theta = np.mod(np.arctan2(dv, du), 2 * np.pi) * (len(rough) / (2 * np.pi))
    # Periodic linear interpolation of the radius offsets: a ragged fracture line.
    i0 = np.floor(theta).astype(np.int64) % len(rough)
    frac = theta - np.floor(theta)
    offset = rough[i0] * (1 - frac) + rough[(i0 + 1) % len(rough)] * frac
    return piece.radius + offset - np.hypot(du, dv)


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _part_frame_grid(params: PartParams) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Image pixel centres (x, y) and the same points in the rotated, shifted part frame (u, v)."""
    size = params.size
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    a = math.radians(params.rotation_deg)
    dx, dy = x - params.center[0], y - params.center[1]
    u = math.cos(a) * dx + math.sin(a) * dy
    v = -math.sin(a) * dx + math.cos(a) * dy
    return x, y, u, v


def _part_to_image(params: PartParams, points: np.ndarray) -> np.ndarray:
    a = math.radians(params.rotation_deg)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return points @ rot.T + np.asarray(params.center)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in about [-1, 1]: a coarse random grid upsampled smoothly."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)


def render_part(params: PartParams, defect: Defect | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Render one part as an HxWx3 BGR uint8 image and its HxW uint8 defect mask (0/255, all 0 when good).

    Deterministic in (params, defect): the same params with and without a defect give images that differ
    only where the defect is, which is what the tests and the mask rely on.
    """
    size = params.size
    s = size / _REFERENCE_SIZE
    geom = _Geometry.for_size(size)
    tex_rng = np.random.default_rng(params.texture_seed)  # draws below always happen in the same order
    x, y, u, v = _part_frame_grid(params)
    r = np.hypot(u, v)

    holes = tuple(i for i in range(_N_HOLES) if not (isinstance(defect, MissingHole) and defect.hole_index == i))
    sdf = _part_sdf(u, v, geom, holes)
    if isinstance(defect, MissingPiece):
        sdf = np.minimum(sdf, -_piece_sdf(u, v, defect))
    steel = np.clip(sdf + 0.5, 0.0, 1.0)  # anti-aliased coverage

    # Height field of the steel face, shaded by one directional lamp: chamfers on every edge and a raised hub.
    bevel = np.clip(sdf / geom.bevel_width, 0.0, 1.0)
    height = -1.6 * geom.bevel_width * (1.0 - bevel) ** 2
    height += 1.2 * s * _smoothstep(geom.hub_radius + 1.2 * s, geom.hub_radius - 1.2 * s, r)
    albedo = np.ones_like(r)
    surface_mask = np.zeros_like(r, dtype=bool)
    if isinstance(defect, Dent):
        height, albedo, surface_mask = _apply_dent(defect, params, u, v, height, albedo)
    elif isinstance(defect, Scratch):
        height, albedo, surface_mask = _apply_scratch(defect, params, height, albedo)

    hy, hx = np.gradient(height.astype(np.float32))
    az = math.radians(params.light_azimuth_deg)
    lx, ly = math.cos(az) * math.cos(_LIGHT_ELEVATION), math.sin(az) * math.cos(_LIGHT_ELEVATION)
    lz = math.sin(_LIGHT_ELEVATION)
    shade = (-hx * lx - hy * ly + lz) / np.sqrt(hx * hx + hy * hy + 1.0) / lz
    shade = np.clip(1.0 + 1.3 * (shade - 1.0), 0.15, 2.2)

    # Turning marks: concentric rings, most visible in the anisotropic highlight band that points at the lamp.
    ring_bins = int(geom.outer_radius * 4) + 8
    rings = tex_rng.standard_normal(ring_bins)
    rings = np.convolve(rings, np.array([1, 2, 3, 2, 1]) / 9.0, mode="same")
    grooves = tex_rng.random(ring_bins) < 0.02
    rings = rings + grooves * tex_rng.uniform(2.0, 4.0, ring_bins)
    ring_tex = np.interp(r * 4, np.arange(ring_bins), rings).astype(np.float32)
    theta_world = np.arctan2(y - params.center[1], x - params.center[0])
    band = (0.5 + 0.5 * np.cos(2 * (theta_world - az))) ** 6
    mottling = _smooth_noise(tex_rng, size, 6)
    metal = (150.0 + 55.0 * band + (3.0 + 5.0 * band) * ring_tex) * (1.0 + 0.03 * mottling)
    metal = metal * shade * albedo
    metal_bgr = metal[..., None] * np.asarray(params.tint, dtype=np.float32)

    if isinstance(defect, Stain):
        metal_bgr, surface_mask = _apply_stain(defect, params, u, v, metal_bgr)

    # Conveyor belt: dark rubber with fine grain, and the part's soft shadow away from the lamp.
    grain = cv2.GaussianBlur(tex_rng.standard_normal((size, size)).astype(np.float32), (0, 0), 1.2)
    belt = 58.0 + 14.0 * grain + 5.0 * _smooth_noise(tex_rng, size, 4)
    shadow = _cast_shadow(steel, az, s)
    belt = belt * (1.0 - 0.55 * shadow)
    if isinstance(defect, MissingPiece):
        # The broken-off chunk no longer shades the belt beside the rim: that change belongs to the defect too.
        intact_steel = np.clip(_part_sdf(u, v, geom, holes) + 0.5, 0.0, 1.0)
        surface_mask = np.abs(_cast_shadow(intact_steel, az, s) - shadow) > 0.05
    belt_bgr = belt[..., None] * np.float32([1.0, 1.02, 0.98])

    img = belt_bgr * (1.0 - steel[..., None]) + metal_bgr * steel[..., None]
    gx, gy = params.gradient
    light = params.gain * (1.0 + gx * (x / size - 0.5) + gy * (y / size - 0.5))
    light *= 1.0 - 0.18 * (((x - size / 2) ** 2 + (y - size / 2) ** 2) / (size / 2) ** 2)  # lens vignetting
    img = img * light[..., None]
    img = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 0.6)  # optics
    noise = (0.6 * tex_rng.standard_normal((size, size, 3)) + 0.8 * tex_rng.standard_normal((size, size, 1)))
    img = img + params.noise_sigma * noise
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)

    mask = _defect_mask(defect, params, u, v, geom, sdf, surface_mask)
    return image, mask


def _cast_shadow(steel: np.ndarray, light_azimuth: float, s: float) -> np.ndarray:
    """Soft shadow of the part on the belt, offset away from the lamp (0..1, 1 = full shadow)."""
    size = steel.shape[0]
    shift = np.float32([[1, 0, -math.cos(light_azimuth) * 5 * s], [0, 1, -math.sin(light_azimuth) * 5 * s]])
    shadow = cv2.warpAffine(steel.astype(np.float32), shift, (size, size), flags=cv2.INTER_LINEAR)
    return cv2.GaussianBlur(shadow, (0, 0), 3.0 * s)


def _apply_dent(dent: Dent, params: PartParams, u: np.ndarray, v: np.ndarray,
                height: np.ndarray, albedo: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a = math.radians(dent.angle_deg)
    du, dv = u - dent.center[0], v - dent.center[1]
    q2 = ((math.cos(a) * du + math.sin(a) * dv) / dent.axes[0]) ** 2 \
        + ((-math.sin(a) * du + math.cos(a) * dv) / dent.axes[1]) ** 2
    bump = np.clip(1.0 - q2, 0.0, None) ** 2  # (1 - q^2)^2: zero slope at the rim, zero outside it
    # Ambient occlusion darkens the hollow; the lamp then gives it a bright and a dark wall.
    return height - dent.depth * bump, albedo * (1.0 - 0.25 * bump), q2 < 1.0


def _apply_scratch(scratch: Scratch, params: PartParams,
                   height: np.ndarray, albedo: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    size = params.size
    pts = _part_to_image(params, np.asarray(scratch.points, dtype=np.float64))
    canvas = np.zeros((size, size), dtype=np.uint8)
    shift_bits = 4  # sub-pixel vertex positions
    cv2.polylines(canvas, [np.rint(pts * (1 << shift_bits)).astype(np.int32)], isClosed=False, color=255,
                  thickness=scratch.thickness, lineType=cv2.LINE_AA, shift=shift_bits)
    line = canvas.astype(np.float32) / 255.0
    groove = cv2.GaussianBlur(line, (0, 0), 0.8)
    height = height - scratch.depth * groove
    albedo = albedo * (1.0 + (scratch.reflectance - 1.0) * line)
    return height, albedo, groove > 0.02


def _apply_stain(stain: Stain, params: PartParams, u: np.ndarray, v: np.ndarray,
                 metal_bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    field = np.zeros_like(u)
    for bx, by, sigma, weight in stain.blobs:
        field += weight * np.exp(-((u - bx) ** 2 + (v - by) ** 2) / (2 * sigma * sigma))
    rng = np.random.default_rng(stain.noise_seed)
    size = params.size
    ragged = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), 1.5 * size / 256)
    field = field * (1.0 + 0.9 * ragged)  # multiplicative, so the stain cannot appear away from its blobs
    threshold = 0.5
    alpha = _smoothstep(threshold - 0.1, threshold + 0.15, field)
    # Uneven film: denser in the middle, thinner at the rim of the smear.
    alpha = alpha * stain.opacity * np.clip(0.7 + 0.3 * field, 0.0, 1.0)
    tint = 1.0 - alpha[..., None] * (1.0 - np.asarray(stain.color, dtype=np.float32))
    return metal_bgr * tint, alpha > 0.0


def _defect_mask(defect: Defect | None, params: PartParams, u: np.ndarray, v: np.ndarray,
                 geom: _Geometry, sdf: np.ndarray, surface_mask: np.ndarray) -> np.ndarray:
    """The ground-truth region: where the defect changed the part, grown by the 1-2 px the optics blur it."""
    if defect is None:
        return np.zeros(u.shape, dtype=np.uint8)
    if isinstance(defect, MissingHole):
        cu, cv = geom.hole_centres()[defect.hole_index]
        region = np.hypot(u - cu, v - cv) <= geom.hole_radius + geom.bevel_width + 1.0
    elif isinstance(defect, MissingPiece):
        intact = _part_sdf(u, v, geom, tuple(range(_N_HOLES)))
        region = (_piece_sdf(u, v, defect) > -geom.bevel_width - 1.0) & (intact > -1.0)
        region |= surface_mask  # the belt that the missing chunk used to shade
    else:
        # Surface defects exist only on the steel.
        region = surface_mask & (sdf > -0.5)
    mask = region.astype(np.uint8) * 255
    # A scratch is a high-contrast edge on both sides, so the blur reaches one pixel further.
    grow = 5 if isinstance(defect, Scratch) else 3
    return cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (grow, grow)))


def _clearance(points: np.ndarray, geom: _Geometry) -> np.ndarray:
    """Distance of part-frame points from the nearest edge of the intact part (< 0 when not on steel)."""
    return _part_sdf(points[:, 0], points[:, 1], geom, tuple(range(_N_HOLES)))


def _sample_on_face(rng: np.random.Generator, geom: _Geometry, margin: float) -> np.ndarray:
    """A part-frame point on the steel face at least `margin` px from every edge (rejection sampling)."""
    for _ in range(1000):
        r = math.sqrt(rng.uniform(geom.bore_radius ** 2, geom.outer_radius ** 2))
        t = rng.uniform(0.0, 2 * math.pi)
        p = np.array([[r * math.cos(t), r * math.sin(t)]])
        if _clearance(p, geom)[0] >= margin:
            return p[0]
    raise RuntimeError(f"no place on the part face with {margin:.1f} px clearance (image too small?)")


def sample_defect(rng: np.random.Generator, params: PartParams, kind: str) -> Defect:
    """Draw a defect of `kind` (one of DEFECT_TYPES) that fits on the part described by `params`."""
    geom = _Geometry.for_size(params.size)
    s = params.size / _REFERENCE_SIZE
    if kind == "scratch":
        for _ in range(1000):
            start = _sample_on_face(rng, geom, 3.0 * s)
            length = rng.uniform(35.0, 70.0) * s
            heading = rng.uniform(0.0, 2 * math.pi)
            bow = rng.uniform(-6.0, 6.0) * s
            t = np.linspace(0.0, 1.0, 12)[:, None]
            along = np.array([math.cos(heading), math.sin(heading)])
            across = np.array([-along[1], along[0]])
            pts = start + t * length * along + np.sin(np.pi * t) * bow * across
            if np.all(_clearance(pts, geom) >= 3.0 * s):
                bright = rng.random() < 0.5
                return Scratch(points=tuple((float(a), float(b)) for a, b in pts),
                               thickness=int(rng.integers(1, 3)) if s < 1.5 else int(rng.integers(2, 4)),
                               reflectance=float(rng.uniform(1.6, 1.9) if bright else rng.uniform(0.35, 0.55)),
                               depth=float(rng.uniform(2.0, 3.0) * s))
        raise RuntimeError("could not place a scratch on the part face")
    if kind == "dent":
        axes = (float(rng.uniform(9.0, 14.0) * s), float(rng.uniform(7.0, 11.0) * s))
        c = _sample_on_face(rng, geom, max(axes) + 2.0 * s)
        return Dent(center=(float(c[0]), float(c[1])), axes=axes, angle_deg=float(rng.uniform(0, 180)),
                    depth=float(rng.uniform(4.0, 6.0) * s))
    if kind == "stain":
        extent = 14.0 * s
        c = _sample_on_face(rng, geom, extent + 2.0 * s)
        n = int(rng.integers(3, 7))
        offsets = rng.uniform(-7.0, 7.0, size=(n, 2)) * s
        blobs = tuple((float(c[0] + ox), float(c[1] + oy), float(rng.uniform(3.0, 6.0) * s),
                       float(rng.uniform(0.7, 1.1))) for ox, oy in offsets)
        rust = rng.random() < 0.6
        color = (0.22, 0.42, 0.85) if rust else (0.42, 0.40, 0.36)  # BGR: orange-brown rust, dark oil
        return Stain(blobs=blobs, color=color, opacity=float(rng.uniform(0.75, 0.95)),
                     noise_seed=int(rng.integers(0, 2**31 - 1)))
    if kind == "missing_hole":
        return MissingHole(hole_index=int(rng.integers(0, _N_HOLES)))
    if kind == "missing_piece":
        # Centre just outside the rim, between two bolt holes so the chip never reaches a hole.
        hole_angles = 30.0 + 360.0 / _N_HOLES * np.arange(_N_HOLES)
        angle = math.radians(float(rng.choice(hole_angles)) + 30.0 + rng.uniform(-8.0, 8.0))
        radius = float(rng.uniform(10.0, 14.0) * s)
        dist = geom.outer_radius + radius - rng.uniform(8.0, 12.0) * s  # depth of the bite into the rim
        rough = rng.uniform(-1.5, 1.5, size=14) * s
        return MissingPiece(center=(dist * math.cos(angle), dist * math.sin(angle)), radius=radius,
                            roughness=tuple(float(x) for x in rough))
    raise ValueError(f"unknown defect type {kind!r}; expected one of {', '.join(DEFECT_TYPES)}")


def _write_png(path: Path, array: np.ndarray) -> None:
    if not cv2.imwrite(str(path), array):
        raise OSError(f"could not write {path}")


def _image_rng(seed: int, stream: int, *index: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, *index])


def _clear_previous_generation(out_dir: Path) -> None:
    """Empty a folder this module generated before; refuse any other non-empty folder."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir} exists and is not a folder")
    if not any(out_dir.iterdir()):
        return
    if not (out_dir / MARKER_NAME).is_file():
        raise FileExistsError(f"{out_dir} is not empty and was not written by synthetic_parts "
                              f"(no {MARKER_NAME}); choose an empty or new folder")
    for top in ("train", "test", "ground_truth"):
        root = out_dir / top
        if not root.is_dir():
            continue
        for png in root.glob("*/*.png"):
            png.unlink()
        for sub in root.iterdir():
            if sub.is_dir() and not any(sub.iterdir()):
                sub.rmdir()


def generate_dataset(out_dir: Path, n_train: int = 60, n_test_good: int = 12, n_test_defect_per_type: int = 6,
                     size: int = 256, seed: int = 0) -> Path:
    """Write an MVTec-AD-style category of synthetic flanges to `out_dir` and return `out_dir`.

    Layout: train/good/NNN.png, test/good/NNN.png, test/<defect>/NNN.png and
    ground_truth/<defect>/NNN_mask.png (uint8 0/255, the image's size). Regenerating into a folder this
    function wrote before replaces it; any other non-empty folder is refused.
    """
    if min(n_train, n_test_good, n_test_defect_per_type) < 0:
        raise ValueError("image counts must not be negative")
    if size < 64:
        raise ValueError(f"size {size} is too small to draw a part; use at least 64 px")
    out_dir = Path(out_dir)
    _clear_previous_generation(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MARKER_NAME).write_text(json.dumps({
        "generator": "export.synthetic_parts", "seed": seed, "size": size, "n_train": n_train,
        "n_test_good": n_test_good, "n_test_defect_per_type": n_test_defect_per_type,
        "defect_types": list(DEFECT_TYPES)}, indent=2) + "\n")

    for folder, stream, count in (("train", _STREAM_TRAIN, n_train), ("test", _STREAM_TEST_GOOD, n_test_good)):
        good_dir = out_dir / folder / "good"
        good_dir.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, _ = render_part(sample_part_params(_image_rng(seed, stream, i), size))
            _write_png(good_dir / f"{i:03d}.png", image)

    for k, kind in enumerate(DEFECT_TYPES):
        img_dir, mask_dir = out_dir / "test" / kind, out_dir / "ground_truth" / kind
        img_dir.mkdir(parents=True, exist_ok=True)
        mask_dir.mkdir(parents=True, exist_ok=True)
        for i in range(n_test_defect_per_type):
            rng = _image_rng(seed, _STREAM_TEST_DEFECT, k, i)
            params = sample_part_params(rng, size)
            image, mask = render_part(params, sample_defect(rng, params, kind))
            _write_png(img_dir / f"{i:03d}.png", image)
            _write_png(mask_dir / f"{i:03d}_mask.png", mask)
    return out_dir


_FRAME_NAME = re.compile(r"frame_\d{3,}_(good|" + "|".join(DEFECT_TYPES) + r")\.png")


def write_sample_frames(out_dir: Path, n_good: int = 6, n_defect: int = 6, seed: int = 1,
                        size: int = 256) -> list[Path]:
    """Write a shuffled mix of good and defective frames (frame_000_good.png, frame_001_scratch.png, ...).

    For the daemon demo's folder source. Defect types cycle through DEFECT_TYPES. Frames left from an
    earlier call (same name pattern) are removed first, so the folder holds exactly this set.
    Returns the written paths in frame order.
    """
    if n_good < 0 or n_defect < 0:
        raise ValueError("frame counts must not be negative")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.iterdir():
        if old.is_file() and _FRAME_NAME.fullmatch(old.name):
            old.unlink()
    labels = ["good"] * n_good + [DEFECT_TYPES[i % len(DEFECT_TYPES)] for i in range(n_defect)]
    order = _image_rng(seed, _STREAM_FRAMES).permutation(len(labels))
    paths = []
    for i, label in enumerate(labels[j] for j in order):
        rng = _image_rng(seed, _STREAM_FRAMES, i + 1)
        params = sample_part_params(rng, size)
        image, _ = render_part(params, None if label == "good" else sample_defect(rng, params, label))
        path = out_dir / f"frame_{i:03d}_{label}.png"
        _write_png(path, image)
        paths.append(path)
    return paths
