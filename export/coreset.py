"""Greedy k-center coreset selection (PatchCore, sec. 3.2) on randomly projected features.

Distances are computed in a 128-d Johnson-Lindenstrauss projection (as in the paper). A greedy iteration is one
pass over the candidates (|x - c|^2 by one matrix-vector product and a running minimum), so selecting k of N
costs k * N * d: at a 10% coreset that grows with N^2 (714 magnetic-tile images: 560k patches, 56k iterations,
~16 TB of memory traffic). Large banks are therefore split into random chunks of at most `chunk_patches`
candidates that each keep the same fraction by greedy selection: the cost drops by N / chunk_patches, a chunk's
projected data stays in the last-level cache, and the union still covers every patch within the largest
per-chunk radius (each chunk is covered by its own centres).
"""
from __future__ import annotations

import sys
import time

import numpy as np
import torch

# 32k patches x 128 dims x 4 B = 16 MB: fits the L3 of the x86 and Arm boards we target, measured 10x faster per
# iteration than streaming a 287 MB bank from DRAM.
CHUNK_PATCHES = 32768


def greedy_coreset(features: np.ndarray, n_select: int, projection_dim: int = 128, seed: int = 0,
                   progress: bool = True, chunk_patches: int | None = CHUNK_PATCHES, threads: int = 1,
                   workers: int = 2) -> np.ndarray:
    """Indices (sorted) of `n_select` rows of `features` chosen by greedy k-center (farthest point) selection.

    `chunk_patches=None` runs one global greedy pass (the paper's exact procedure, quadratic in the bank size).
    One thread per greedy pass: each iteration is one memory-bound pass, and thousands of tiny parallel regions
    collapse when the cores are shared (measured under load: 30 ms/it on 1 thread vs 107 ms/it on 2). Chunks
    are independent, so `workers` of them run at once (torch releases the GIL inside each pass); each chunk's
    random start is drawn up front in chunk order, so the selection does not depend on `workers`.
    """
    n = len(features)
    if n_select < 1:
        raise ValueError("coreset must keep at least one vector")
    if n_select >= n:
        return np.arange(n)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(seed)
        x = _project(features, projection_dim, gen)
        if not chunk_patches or n <= chunk_patches:
            return np.sort(_greedy(x, n_select, _start(n, n_select, gen), progress, 0, n_select))
        chunks = [np.sort(c) for c in np.array_split(np.random.default_rng(seed).permutation(n), -(-n // chunk_patches))]
        quota = _apportion(n_select, [len(c) for c in chunks])
        starts = [_start(len(c), k, gen) for c, k in zip(chunks, quota)]
        done = np.cumsum([0] + quota[:-1])

        def one(i: int) -> np.ndarray:
            return chunks[i][_greedy(x[torch.from_numpy(chunks[i])], quota[i], starts[i], progress and workers == 1,
                                     int(done[i]), n_select)]

        if workers > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(workers) as pool:
                picked = list(pool.map(one, range(len(chunks))))
        else:
            picked = [one(i) for i in range(len(chunks))]
        return np.sort(np.concatenate(picked))
    finally:
        torch.set_num_threads(previous)


def _start(n: int, n_select: int, gen: torch.Generator) -> int:
    """The random first centre of a greedy pass (drawn only when the pass has a choice to make)."""
    return int(torch.randint(n, (1,), generator=gen)) if n_select < n else 0


def _project(features: np.ndarray, projection_dim: int | None, gen: torch.Generator, chunk: int = 262144) -> torch.Tensor:
    feats = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    n, d = feats.shape
    if not projection_dim or projection_dim >= d:
        return feats.clone()
    proj = torch.randn(d, projection_dim, generator=gen) / np.sqrt(projection_dim)
    # Chunked so a 700-image bank is never materialised twice at full dimension.
    x = torch.empty(n, projection_dim)
    for s in range(0, n, chunk):
        x[s:s + chunk] = feats[s:s + chunk] @ proj
    return x


def _apportion(total: int, sizes: list[int]) -> list[int]:
    """Split `total` over chunks in proportion to their sizes (largest remainder), each at least 1."""
    n = sum(sizes)
    exact = [total * s / n for s in sizes]
    quota = [max(1, int(e)) for e in exact]
    for i in sorted(range(len(sizes)), key=lambda i: exact[i] - int(exact[i]), reverse=True):
        if sum(quota) >= total:
            break
        quota[i] += 1
    while sum(quota) > total:  # the max(1, .) floor can overshoot when there are more chunks than picks
        quota[quota.index(max(quota))] -= 1
    return [min(q, s) for q, s in zip(quota, sizes)]


def _greedy(x: torch.Tensor, n_select: int, start: int, progress: bool, done: int, total: int) -> np.ndarray:
    n = x.shape[0]
    if n_select >= n:
        return np.arange(n)
    sq = (x * x).sum(1)
    # Column-major (d x n): a row-vector times this matrix streams memory twice as fast as x @ c here.
    xt = x.T.contiguous()
    min_d = torch.full((n,), float("inf"))
    selected = np.empty(n_select, dtype=np.int64)
    current = start
    t0 = last = time.time()
    with torch.no_grad():
        for it in range(n_select):
            selected[it] = current
            c = xt[:, current].contiguous()
            d2 = sq - 2.0 * (c @ xt) + sq[current]
            torch.minimum(min_d, d2, out=min_d)
            current = int(torch.argmax(min_d))
            if progress and (time.time() - last > 5 or done + it == total - 1):
                last = time.time()
                rate = (it + 1) / max(last - t0, 1e-9)
                print(f"\rcoreset {done + it + 1}/{total} ({rate:.0f} it/s)", end="" if done + it < total - 1 else "\n",
                      file=sys.stderr, flush=True)
    return selected


def coverage_radius(features: np.ndarray, selected: np.ndarray, chunk: int = 8192) -> float:
    """Largest distance from any bank vector to its nearest selected vector (what k-center minimises)."""
    from edge_runtime.nn_search import ExactSearch

    search = ExactSearch(features[selected])
    return float(max(search.distances(features[s:s + chunk]).max() for s in range(0, len(features), chunk)))
