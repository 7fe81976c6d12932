"""K-fold cross-fitted scores of the good training images: each image scored against a bank that holds none of its fold.

Two methods (`FitSettings.cross_fit_method`, recorded in the manifest under fit.cross_fit):
- "bank-minus-fold" (default): the fold's bank is the shipped coreset less the vectors that came from the fold's
  own images; held-out images are searched in the shipped HNSW index with those vectors marked deleted, and each
  image score is made exact by the re-check below. No coreset is re-run, so the cost is one approximate search of
  every patch plus a few exact re-checks per image.
- "refit": per fold a new greedy coreset of the other images, exact (or re-checked HNSW) search; the procedure
  before the bank-minus-fold method, ~k times the coreset cost, kept for comparison (benchmarks/fit_scaling.py).
The bank-minus-fold bank is a subset of the shipped one chosen with the held-out images present, so its holes
where their vectors were are not refilled from the remaining images as a refit would: its scores tend to be higher
(a conservative, higher threshold); benchmarks/results/crossfit_methods.json measures by how much.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from edge_runtime.nn_search import ExactSearch, HnswParams, HnswSearch, build_hnsw
from export.coreset import greedy_coreset

METHODS = ("bank-minus-fold", "refit")
RECHECK_BATCH = 8
# HNSW beam width of the cross-fit search. The re-check makes every image score exact whatever the beam, so only the
# cost moves: on a 150-image magnetic-tile subset ef 32 / 16 / 8 / 4 took 8.4 / 5.3 / 3.7 / 2.4 CPU s for the
# same scores (1 re-check batch of 8 patches per image at each).
CROSS_FIT_EF = 8


def fold_assignment(n_images: int, folds: int, seed: int) -> np.ndarray:
    """Fold of each image: a seeded permutation taken modulo the fold count (balanced, reproducible)."""
    return np.random.default_rng(seed + 1).permutation(n_images) % folds


class _SmallBatchExact:
    """Exact nearest distances of a few queries against a bank, on one thread (torch): a 8 x 60k GEMM is too small
    to share, and BLAS threads that spin-wait on busy shared cores made it 5-15x slower (numpy's 2-thread OpenBLAS)."""

    def __init__(self, bank: np.ndarray):
        self.bank = torch.from_numpy(np.ascontiguousarray(bank, dtype=np.float32))
        self.bank_sq = (self.bank * self.bank).sum(1)

    def distances(self, queries: np.ndarray) -> np.ndarray:
        q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
        d2 = torch.addmm(self.bank_sq, q, self.bank.T, alpha=-2.0).min(1).values + (q * q).sum(1)
        return torch.sqrt(torch.clamp(d2, min=0.0)).numpy()


def rechecked_max(approx: np.ndarray, queries: np.ndarray, exact: ExactSearch) -> tuple[float, int]:
    """Exact max over patches of the nearest-bank distance, given per-patch approximate distances that are upper
    bounds (each is the distance to a real bank vector): patches are checked exactly in descending order of
    their bound until no unchecked bound exceeds the best exact distance. Returns (score, patches checked)."""
    order = np.argsort(-approx)
    best, pos = -np.inf, 0
    while pos < len(order) and approx[order[pos]] > best:
        batch = order[pos:pos + RECHECK_BATCH]
        best = max(best, float(exact.distances(queries[batch]).max()))
        pos += len(batch)
    return best, pos


def bank_minus_fold_scores(feats: np.ndarray, bank_rows: np.ndarray, index, per_image: int, fold_of: np.ndarray,
                           ef: int = CROSS_FIT_EF, threads: int = 2, log: Callable[[str], None] | None = None) -> tuple[np.ndarray, dict]:
    """Score of every image against the bank less its fold's vectors.

    feats: (n_images * per_image, dim) features of every patch; bank_rows: row of `feats` behind each bank vector
    (bank vector i is index label i); index: the shipped hnswlib index of feats[bank_rows] (left as it was found,
    ef included: the caller sets ef before any later search).
    """
    n_images = len(fold_of)
    bank = feats[bank_rows]
    owner_fold = fold_of[bank_rows // per_image]
    check_folds_leave_a_bank(owner_fold, fold_of, n_images * per_image)
    scores = np.empty(n_images)
    checked = 0
    index.set_num_threads(threads)
    index.set_ef(ef)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for f in range(int(fold_of.max()) + 1):
            checked += _one_fold(f, feats, bank, owner_fold, fold_of, index, per_image, scores, log)
    finally:
        torch.set_num_threads(torch_threads)
    return scores, {"rechecked_patches_per_image": checked / max(1, n_images)}


def check_folds_leave_a_bank(owner_fold: np.ndarray, fold_of: np.ndarray, n_patches: int) -> None:
    """Raise ValueError, before any search, if some fold's images own every bank vector: the bank less that fold
    is empty, and its images would have nothing to be scored against (hnswlib fails obscurely on a fully deleted
    index; an empty exact bank has no minimum)."""
    folds = int(fold_of.max()) + 1
    for f in range(folds):
        if len(owner_fold) and np.any(owner_fold != f):
            continue
        n_held = int(np.count_nonzero(fold_of == f))
        raise ValueError(
            f"cross-fit fold {f + 1} of {folds}: its {n_held} image(s) hold all {len(owner_fold)} vectors of the "
            f"coreset bank ({len(owner_fold)} of {n_patches} patches), so no bank is left to score them against; "
            "use a larger --coreset-ratio, fewer --cross-fit-folds or more good images")


def _one_fold(f, feats, bank, owner_fold, fold_of, index, per_image, scores, log) -> int:
    """Scores of fold f's images into `scores`; returns the number of patches re-checked exactly."""
    t0 = time.time()
    removed = np.nonzero(owner_fold == f)[0]
    held = np.nonzero(fold_of == f)[0]
    checked = 0
    for label in removed:
        index.mark_deleted(int(label))
    try:
        exact = _SmallBatchExact(bank[owner_fold != f])
        rows = (held[:, None] * per_image + np.arange(per_image)).ravel()
        q = np.ascontiguousarray(feats[rows])
        try:  # deleted vectors are never returned: each distance is to a vector of the fold's bank
            _, d2 = index.knn_query(q, k=1)
        except RuntimeError:  # a beam that met only deleted vectors for some patch: widen it and ask again
            index.set_ef(max(64, 4 * index.ef))
            _, d2 = index.knn_query(q, k=1)
        approx = np.sqrt(np.maximum(d2[:, 0], 0.0)).astype(np.float32).reshape(len(held), per_image)
        for j, i in enumerate(held):
            scores[i], n = rechecked_max(approx[j], q[j * per_image:(j + 1) * per_image], exact)
            checked += n
    finally:
        for label in removed:
            index.unmark_deleted(int(label))
    if log:
        log(f"cross-fit fold {f + 1}: {len(held)} images against the bank less their {len(removed)} vectors "
            f"({len(bank) - len(removed)} left) in {time.time() - t0:.1f} s")
    return checked


def refit_scores(feats_by_variant: dict[str, np.ndarray], selection_feats: np.ndarray, per_image: int,
                 fold_of: np.ndarray, coreset_ratio: float, projection_dim: int, seed: int,
                 log: Callable[[str], None] | None = None, **coreset_kw) -> dict[str, np.ndarray]:
    """Per variant, every image's score against a bank whose coreset was re-run on the other folds' images."""
    n_images = len(fold_of)
    scores = {name: np.empty(n_images) for name in feats_by_variant}
    for f in range(int(fold_of.max()) + 1):
        t0 = time.time()
        held = np.nonzero(fold_of == f)[0]
        rows = np.nonzero(np.repeat(fold_of != f, per_image))[0]
        n_sel = max(1, int(round(coreset_ratio * len(rows))))
        sel = rows[greedy_coreset(selection_feats[rows], n_sel, projection_dim, seed + f, progress=False, **coreset_kw)]
        for name, x in feats_by_variant.items():
            search = _search(x[sel], len(held) * per_image, seed)
            for i in held:
                scores[name][i] = float(search.distances(x[i * per_image:(i + 1) * per_image]).max())
        if log:
            log(f"cross-fit fold {f + 1} (refit): {len(held)} images scored against a bank of {n_sel} "
                f"in {time.time() - t0:.1f} s")
    return scores


def _search(bank: np.ndarray, n_queries: int, seed: int = 0):
    """Exact search where one pass is cheap, else HNSW with the exact re-check (image scores stay exact)."""
    if n_queries * len(bank) * bank.shape[1] <= 3e11:
        return ExactSearch(bank)
    params = HnswParams(ef_construction=64, ef_search=32)
    return HnswSearch(build_hnsw(bank, params, seed), params, threads=2)
