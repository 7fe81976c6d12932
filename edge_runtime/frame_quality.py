"""Frame quality: is this frame one the bundle can judge? Brightness and sharpness of the inspected region, against
the band of the training frames that `edge-export fit` records in the manifest (`frame_quality`).

PatchCore scores a frame against the good parts it was fitted on; a frame taken under other conditions scores
something else. A dead lamp, a lens cap or a camera knocked out of focus gives frames that may score low enough to
pass, and on magnetic tile a 30% gain drop let 18 more of 392 defects through with the good parts' median score
unchanged (benchmarks/results/drift_monitor_magnetic_tile.md). Three numbers per frame, measured on the canvas (the
region as the model sees it, at the bank's pixel density, so fit and station measure alike):

- brightness: mean grey level (0-255);
- sharpness: variance of the 3 x 3 Laplacian of the grey image (falls with defocus or motion blur, rises with
  sensor noise and with another scene);
- noise: the standard deviation of the sensor's pixel noise in grey levels, by Immerkaer's estimator (J. Immerkaer,
  "Fast noise variance estimation", CVIU 1996: the mean absolute response of a mask that cancels edges and smooth
  shading). Sharpness alone did not see it: on magnetic tile, noise of sigma 4 let 18 more defects through and
  moved the Laplacian variance less than one tile's texture from the next does; this estimate moves from about 1.1
  to 4.2 there.

`check()` is the per-frame gate (a frame far outside the training band is not inspected: FAULT); the rolling
rules that catch slow drift are edge_runtime/drift_monitor.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

# The band is the training frames' 0.5th to 99.5th percentile: the extremes of a few hundred images, without the
# one odd frame that min/max would let widen it.
BAND_QUANTILES = (0.005, 0.5, 0.995)


@dataclass(frozen=True)
class FrameQuality:
    brightness: float            # mean grey level, 0-255
    sharpness: float             # variance of the Laplacian of the grey image
    noise: float | None = None   # pixel noise, standard deviation in grey levels (None: not measured)

    def to_record(self) -> dict:
        return {"brightness": round(self.brightness, 2), "sharpness": round(self.sharpness, 2),
                **({"noise": round(self.noise, 3)} if self.noise is not None else {})}


# Immerkaer's mask [1 -2 1]^T [1 -2 1]: the difference of two Laplacians, zero on edges and linear shading; its
# response to white noise of sigma s has mean absolute value s * 6 * sqrt(2 / pi).
_IMMERKAER_1D = np.array([1, -2, 1], np.float32)
_IMMERKAER_SCALE = float(np.sqrt(np.pi / 2) / 6)


def measure(canvas: np.ndarray) -> FrameQuality:
    """Brightness, sharpness and noise of a uint8 H x W x 3 (or H x W) canvas (at least 3 x 3)."""
    grey = canvas if canvas.ndim == 2 else cv2.cvtColor(canvas, cv2.COLOR_RGB2GRAY)
    # Integer filters and OpenCV's reductions: exact, and a third of the time of float maps and numpy's var.
    lap = cv2.Laplacian(grey, cv2.CV_16S, ksize=1)
    n = lap.size
    lap_mean = cv2.mean(lap)[0]
    sharpness = max(0.0, cv2.norm(lap, cv2.NORM_L2SQR) / n - lap_mean * lap_mean)
    response = cv2.sepFilter2D(grey, cv2.CV_16S, _IMMERKAER_1D, _IMMERKAER_1D)[1:-1, 1:-1]   # no border rows
    noise = _IMMERKAER_SCALE * cv2.norm(response, cv2.NORM_L1) / max(1, response.size)
    return FrameQuality(float(cv2.mean(grey)[0]), float(sharpness), float(noise))


# The percentiles 0, 1, ..., 100 of each quantity are recorded too: the drift monitor derives from them where the
# median of a window of good frames falls (QualityBand.median_band).
PERCENTILES = tuple(range(101))
# Two-sided 0.999 normal quantile: a window median outside its band happens about once in a thousand full windows of
# frames like the training frames, before the margin widens it.
MEDIAN_Z = 3.29


@dataclass(frozen=True)
class Band:
    low: float
    median: float
    high: float
    percentiles: tuple[float, ...] = ()   # the 0th..100th percentile (empty in a hand-made band: no median band)

    def median_band(self, window: int) -> tuple[float, float] | None:
        """Where the median of `window` frames like the training frames falls, 999 times in 1000: the median of n
        draws sits at probability 1/2 +- z / (2 sqrt(n + 2)) (the normal approximation of its Beta distribution),
        mapped through the recorded percentiles. None without them."""
        if len(self.percentiles) != len(PERCENTILES):
            return None
        half = min(0.5, MEDIAN_Z / (2.0 * (window + 2) ** 0.5))
        pct = np.asarray(PERCENTILES, dtype=np.float64)
        values = np.asarray(self.percentiles, dtype=np.float64)
        return (float(np.interp(100 * (0.5 - half), pct, values)), float(np.interp(100 * (0.5 + half), pct, values)))


@dataclass(frozen=True)
class QualityBand:
    """The training frames' brightness, sharpness and noise (manifest `frame_quality`; bundles fitted before noise
    was recorded have no noise band, and their frames' noise is not checked)."""
    n: int
    brightness: Band
    sharpness: Band
    noise: Band | None = None

    def bands(self) -> dict[str, Band]:
        """name -> band, for each quantity this bundle recorded."""
        return {"brightness": self.brightness, "sharpness": self.sharpness,
                **({"noise": self.noise} if self.noise is not None else {})}

    def describe(self) -> str:
        """One line for fit's log and `check`: each quantity's 0.5th-99.5th percentile and median."""
        digits = {"brightness": 1, "sharpness": 1, "noise": 2}
        return ", ".join(f"{name} {b.low:.{digits[name]}f}-{b.high:.{digits[name]}f} (median {b.median:.{digits[name]}f})"
                         for name, b in self.bands().items())

    @classmethod
    def of(cls, qualities: list[FrameQuality]) -> "QualityBand":
        def band(values: list[float]) -> Band:
            x = np.asarray(values, dtype=np.float64)
            low, median, high = np.quantile(x, BAND_QUANTILES)
            return Band(float(low), float(median), float(high),
                        tuple(float(v) for v in np.percentile(x, PERCENTILES)))
        noise = [q.noise for q in qualities]
        return cls(len(qualities), band([q.brightness for q in qualities]), band([q.sharpness for q in qualities]),
                   band(noise) if all(v is not None for v in noise) else None)

    def to_manifest(self) -> dict:
        return {"n": self.n, "quantiles": list(BAND_QUANTILES),
                "measured_on": "the canvas (region at the bank's pixel density), grey = RGB2GRAY; noise: "
                               "Immerkaer's estimator, standard deviation in grey levels",
                **{name: {"low": round(b.low, 4), "median": round(b.median, 4), "high": round(b.high, 4),
                          "percentiles": [round(v, 3) for v in b.percentiles]}
                   for name, b in self.bands().items()}}

    @classmethod
    def from_manifest(cls, doc: object) -> "QualityBand | None":
        """The band, or None for a bundle fitted before frame quality was recorded or a malformed entry (the checks
        are then off, which Pipeline logs for a malformed one; the score is unaffected)."""
        if not isinstance(doc, dict):
            return None
        try:
            bands = []
            for name in ("brightness", "sharpness", "noise"):
                if name == "noise" and name not in doc:      # fitted before noise was recorded
                    bands.append(None)
                    continue
                b = doc[name]
                pct = tuple(float(v) for v in b.get("percentiles", ()))
                band = Band(float(b["low"]), float(b["median"]), float(b["high"]), pct)
                if not all(math.isfinite(v) and v >= 0 for v in (band.low, band.median, band.high, *pct)) or \
                        not band.low <= band.median <= band.high or \
                        (pct and (len(pct) != len(PERCENTILES) or any(x > y for x, y in zip(pct, pct[1:])))):
                    return None
                bands.append(band)
            return cls(int(doc["n"]), *bands)
        except (KeyError, TypeError, ValueError):
            return None


@dataclass(frozen=True)
class FrameCheckConfig:
    """Station file `frame_check:`: how far outside the training band one frame may be and still be inspected.
    A frame beyond a limit is a FAULT (never OK) with the reason; a bundle without a band checks nothing."""
    enabled: bool = True       # false: every frame is inspected whatever its brightness, sharpness and noise
    dark: float = 0.5          # brightness below dark x the band's low end: lamp out, lens cap, exposure
    bright: float = 0.5        # brightness above high + bright x (255 - high): this far from the band to white
    blur: float = 0.25         # sharpness below blur x the band's low end: badly out of focus, motion blur, fog
    noise: float = 3.0         # noise, or sharpness, above noise x the band's high end: sensor gain, another scene

    def validate(self) -> None:   # the schema calls it and names the section
        for key in ("dark", "bright", "blur"):
            if not 0 <= getattr(self, key) <= 1:
                raise ValueError(f"{key}: must be in [0, 1], got {getattr(self, key)}")
        if not self.noise >= 1:
            raise ValueError(f"noise: must be >= 1, got {self.noise}")

    def warnings(self) -> list[str]:
        """What validate and the start log say about these settings (the check off is a choice, and must be seen)."""
        if not self.enabled:
            return ["frame_check.enabled: false: every frame is inspected whatever its brightness, sharpness and "
                    "noise; a dim, blurred or noisy frame (lamp, focus, gain) can score low enough to pass"]
        return []


def check(q: FrameQuality, band: QualityBand, limits: FrameCheckConfig = FrameCheckConfig()) -> str | None:
    """Why this frame is too far from the training frames to be judged, or None."""
    b, s = band.brightness, band.sharpness
    if q.brightness < limits.dark * b.low:
        return (f"frame brightness {q.brightness:.1f} is below {limits.dark:g} x the darkest training frames "
                f"({b.low:.1f}; median {b.median:.1f}): lamp, exposure or lens?")
    bright_limit = b.high + limits.bright * (255.0 - b.high)
    if q.brightness > bright_limit:
        way = "halfway" if limits.bright == 0.5 else f"{limits.bright:g} of the way"
        return (f"frame brightness {q.brightness:.1f} is above {bright_limit:.1f}, {way} from the brightest "
                f"training frames ({b.high:.1f}) to white: exposure or stray light?")
    if q.sharpness < limits.blur * s.low:
        return (f"frame sharpness {q.sharpness:.1f} is below {limits.blur:g} x the least sharp training frames "
                f"({s.low:.1f}; median {s.median:.1f}): focus, motion blur or a dirty lens?")
    n = band.noise
    if n is not None and q.noise is not None and q.noise > limits.noise * n.high:
        return (f"frame noise {q.noise:.2f} grey levels is above {limits.noise:g} x the noisiest training frames' "
                f"({n.high:.2f}; median {n.median:.2f}): sensor gain, exposure time or electrical interference?")
    if q.sharpness > limits.noise * s.high:
        return (f"frame sharpness {q.sharpness:.1f} is above {limits.noise:g} x the sharpest training frames "
                f"({s.high:.1f}): sensor noise, gain or another scene?")
    return None
