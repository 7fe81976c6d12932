"""Drift: the conditions a station inspects under moving away from those its bundle was fitted on.

One frame far outside the training band is refused by the frame check (edge_runtime/frame_quality.py). Slow
drift is subtler: a lamp ageing, a camera losing focus, dust on the lens, another batch of material. Each frame
still looks plausible, yet the scores move, and on magnetic tile a 30% gain drop let 18 more of 392 defects
through while the good parts' median score stayed put (benchmarks/results/drift_monitor_magnetic_tile.md). Three rolling rules over the
last `window` inspected parts, each a warning (status, /healthz, /metrics, log); none changes a verdict:

- score: the median image score above `score_ratio` x the median of the bank's cross-fitted good scores (the
  manifest's threshold_info.good_scores p50). Defects are a minority, so the median follows the good parts.
- brightness / sharpness / noise: the rolling median outside where the median of `window` training frames falls
  999 times in 1000 (from the manifest's percentiles: frame_quality.Band.median_band), widened by
  `brightness_margin` / `sharpness_margin` / `noise_margin` of its value. Frames the frame check refused count here
  too. Noise needs a bundle that recorded it (fitted since frame noise was measured).

A warning starts when its rule has held for the full window and ends when the rule no longer holds; both are
logged once. A new bundle (reload, recipe switch, rollout) starts the windows afresh.
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

import numpy as np

from edge_runtime.frame_quality import QualityBand
from edge_runtime.records import InspectionResult, Verdict

log = logging.getLogger(__name__)


@dataclass
class DriftConfig:
    """Station file `drift:`: the rolling drift warnings. The per-frame gate is `frame_check:`."""
    enabled: bool = True             # false: no drift warnings (frame qualities are still recorded)
    window: int = 50                 # inspected parts in each rolling median
    score_ratio: float = 1.15        # warn when the median score exceeds this x the fit's median good score
    brightness_margin: float = 0.05  # warn when the median brightness leaves the training band by more than this
    sharpness_margin: float = 0.25   # the same for sharpness (it varies more from part to part)
    noise_margin: float = 0.25       # the same for pixel noise (sensor gain, exposure time)

    def validate(self) -> None:   # the schema calls it and names the section
        if not 5 <= self.window <= 100_000:
            raise ValueError(f"window: must be 5..100000 parts, got {self.window}")
        if not self.score_ratio > 1:
            raise ValueError(f"score_ratio: must be > 1, got {self.score_ratio}")
        for key in ("brightness_margin", "sharpness_margin", "noise_margin"):
            if not 0 <= getattr(self, key) < 10:
                raise ValueError(f"{key}: must be in [0, 10), got {getattr(self, key)}")


@dataclass(frozen=True)
class DriftState:
    """The drift warnings in force, and the rolling medians behind them (None until a window is full)."""
    warnings: dict[str, str]                 # check -> message, for every rule that holds now
    medians: dict[str, float | None]         # score / brightness / sharpness / noise
    checks: tuple[str, ...]                  # the rules this bundle allows (frame ones need the manifest's band)


class DriftMonitor:
    """Rolling drift rules for one bundle. `observe()` after every published result, from one thread (the line's);
    `state()` from any."""

    def __init__(self, cfg: DriftConfig, good_score_median: float | None, band: QualityBand | None,
                 bundle_id: str = "") -> None:
        self.cfg = cfg
        self.bundle_id = bundle_id
        self.good_score_median = good_score_median if good_score_median and good_score_median > 0 else None
        self.band = band
        self.values: dict[str, deque[float]] = {
            name: deque(maxlen=cfg.window) for name in self._checks()}
        self.active: dict[str, str] = {}
        # Where the window median of each frame quantity may lie: fixed for the bundle and window, so derived once.
        margins = {"brightness": cfg.brightness_margin, "sharpness": cfg.sharpness_margin,
                   "noise": cfg.noise_margin}
        self.bounds = {} if band is None else {
            name: (b.median_band(cfg.window) or (b.low, b.high), margins[name]) for name, b in band.bands().items()}
        # What state() returns: made by observe() in the line's thread and replaced whole, so the HTTP thread never
        # iterates a window while it is appended to.
        self._state = DriftState({}, {name: None for name in ("score", *self.bounds)}, self._checks())

    def _checks(self) -> tuple[str, ...]:
        if not self.cfg.enabled:
            return ()
        return (("score",) if self.good_score_median is not None else ()) + \
            (tuple(self.band.bands()) if self.band is not None else ())

    def observe(self, result: InspectionResult) -> None:
        # A frame the frame check refused (FAULT, no score) still says what the camera sees: with a lamp at 20% most
        # frames are refused, and the brightness window must fill with them, not wait for the few that pass.
        if "score" in self.values and result.score is not None and result.verdict is not Verdict.FAULT:
            self.values["score"].append(result.score)
        if result.quality is not None:
            for name in self.bounds.keys() & self.values.keys():
                value = getattr(result.quality, name)
                if value is not None:
                    self.values[name].append(value)
        medians = {name: self._median(name) for name in ("score", *self.bounds)}
        now = self._evaluate(medians)
        for name in sorted(now.keys() - self.active.keys()):
            log.warning("drift: %s (bundle %s); parts are still inspected, but check the lighting, camera and "
                        "material before trusting the verdicts", now[name], self.bundle_id)
        for name in sorted(self.active.keys() - now.keys()):
            log.info("drift: %s back within bounds", name)
        self.active = now
        self._state = DriftState(dict(now), medians, self._checks())

    def _median(self, name: str) -> float | None:
        values = self.values.get(name)
        return float(np.median(values)) if values is not None and len(values) == self.cfg.window else None

    def _evaluate(self, medians: dict[str, float | None]) -> dict[str, str]:
        out, n = {}, self.cfg.window
        score = medians.get("score")
        if score is not None and score > self.cfg.score_ratio * self.good_score_median:
            out["score"] = (f"median score of the last {n} parts {score:.2f} is {score / self.good_score_median:.2f} "
                            f"x the fit's good median {self.good_score_median:.2f} (limit {self.cfg.score_ratio:g} x)")
        for name, ((low, high), margin) in self.bounds.items():
            median = medians.get(name)
            if name in self.values and median is not None and not low * (1 - margin) <= median <= high * (1 + margin):
                digits = 2 if name == "noise" else 1     # noise is a few grey levels
                out[name] = (f"median {name} of the last {n} parts {median:.{digits}f} is outside {low:.{digits}f}-"
                             f"{high:.{digits}f} (+-{margin:.0%}), where the median of {n} training frames falls")
        return out

    def state(self) -> DriftState:
        """The warnings and medians as of the last observed part (any thread)."""
        return self._state

