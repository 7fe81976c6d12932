"""The position prior of the search stage: which bank rows each patch position of a part usually lands on.

A station's parts sit in a fixture: patch (row, col) of one good part looks like patch (row, col) of another,
so its nearest bank row is almost always one of the rows nearest to that patch, or to a neighbouring one, of
the bundle's golden images (bottle test parts, 4 golden images, 3 x 3 neighbourhoods: the median patch's
bound from those rows is its exact distance). `FaissHnswSearch.image_score` starts from them and walks the
graph only where they leave the image score open; the score stays exact (re-check) whether the prior fits a
frame or not, so the prior changes how long a part takes, never its verdict or score. The heat map takes the
per-patch bounds that search leaves (upper bounds, the largest exact): the same pixel AUROC within 0.0001 on
bottle, 3.7 ms less work after each verdict (benchmarks/results/heat_map_source.md).

It is built once per loaded bundle from its good golden images (Pipeline._attach_prior), and only for bundles
it fits: a texture (magnetic tile) or a part that sits anywhere leaves most patches open, and then it would only
cost time. `build` tries it on the golden images themselves, each against a prior built from the others.
"""
from __future__ import annotations

import numpy as np

# Neighbouring patch positions whose golden rows a position takes too (1: its 3 x 3 neighbourhood).
RADIUS = 1
# A prior is used when, on the golden images (each against the others' prior), the search would leave at most
# this share of the patches open (median). The others' prior has one golden image fewer than the station's, so
# a golden image is left more open than a part on the line will be: bottle 10% 21% of a golden image's patches,
# median 0% (p90 6.5%) of its 20 good test parts', against FaissHnswSearch.PRIOR_OPEN_SHARE (25%) past which a
# part walks every patch; textures and parts that sit anywhere leave nearly all open (magnetic tile 93%).
FIT_SHARE = 0.5
# Fewer golden frames than this leave nothing to compare each against: no prior. Two good ones are what a bundle
# fitted with calibration defects has (edge-export fit keeps two of the four golden images for defects, which sit
# out of the prior: Pipeline._attach_prior); each is then tried against a prior from the other alone, a stricter
# test than a part on the line faces (bottle 10% with defects: 34% left open, good parts' search p50 5.3 -> 2.3 ms).
MIN_FRAMES = 2


def candidates(labels: list[np.ndarray], grid: tuple[int, int], radius: int | None = None) -> np.ndarray:
    """(patches per frame, k) bank rows: for each patch position, the rows `labels` (one array of bank rows
    per golden frame, tiles x rows x cols patches, row-major) found at it and at the positions within
    `radius` rows and columns of it on the same tile (clamped at the tile's edge)."""
    radius = RADIUS if radius is None else radius
    rows, cols = grid
    frames = np.stack([np.asarray(x, dtype=np.int64) for x in labels])
    tiles = frames.shape[1] // (rows * cols)
    grids = frames.reshape(len(frames), tiles, rows, cols)
    r, c = np.arange(rows), np.arange(cols)
    taken = []
    for dr in range(-radius, radius + 1):
        for dc in range(-radius, radius + 1):
            rr, cc = np.clip(r + dr, 0, rows - 1), np.clip(c + dc, 0, cols - 1)
            taken.append(grids[:, :, rr][:, :, :, cc])
    # (offsets * frames, patches) -> (patches, offsets * frames); repeats (the clamped edge, one row found by
    # several frames) are kept: they cost a distance each, and leave every row the same width
    return np.ascontiguousarray(np.concatenate(taken, axis=0).reshape(len(taken) * len(frames), -1).T)


def build(search, feats: list[np.ndarray], grid: tuple[int, int]) -> tuple[np.ndarray | None, str]:
    """(the prior, or None when it does not fit, and why), from the golden frames' features: each golden frame is
    searched with a prior built from the others, and the prior is used when most of them would take its way
    (FaissHnswSearch.prior_open_share no more than FIT_SHARE)."""
    if len(feats) < MIN_FRAMES:
        return None, f"{len(feats)} golden image(s), {MIN_FRAMES} needed to try it"
    labels = [search.labels(f) for f in feats]
    shares = [search.prior_open_share(f, candidates(labels[:i] + labels[i + 1:], grid)) for i, f in enumerate(feats)]
    share = float(np.median(shares))
    if share > FIT_SHARE:
        return None, (f"does not fit these parts: {share:.0%} of a golden image's patches left open by the "
                      f"others' (at most {FIT_SHARE:.0%})")
    return candidates(labels, grid), f"{share:.0%} of a golden image's patches left open by the others'"


__all__ = ["FIT_SHARE", "MIN_FRAMES", "RADIUS", "build", "candidates"]
