"""Indexes that give per-patch upper bounds (distances to real bank vectors), each followed by the SAME exact
re-check as the deployed HNSW path, timed interleaved on the same query sets; imported by search_floor.py.

Optional imports: usearch and faiss-cpu are measured only where installed (pip install usearch faiss-cpu).
"""
from __future__ import annotations

import time

import numpy as np

from edge_runtime.nn_search import ExactSearch, build_hnsw, exact_image_recheck, upper_bounds


class Candidate:
    """name, build seconds, index bytes, and `labels(queries)` -> one bank row per query (a real bank vector)."""

    def __init__(self, name: str, build_s: float, index_bytes: int, labels, reset=None):
        self.name, self.build_s, self.index_bytes, self.labels, self.reset = name, build_s, index_bytes, labels, reset


def usearch_candidates(bank: np.ndarray, threads: int, ef: int = 32) -> list[Candidate]:
    from usearch.index import Index

    out = []
    for dtype in ("f32", "f16", "i8"):
        t0 = time.perf_counter()
        idx = Index(ndim=bank.shape[1], metric="l2sq", dtype=dtype, connectivity=16, expansion_add=128,
                    expansion_search=ef)
        idx.add(np.arange(len(bank)), bank, threads=threads)
        build = time.perf_counter() - t0

        def labels(q, idx=idx):
            return idx.search(q, 1, threads=threads).keys[:, 0].astype(np.int64)
        out.append(Candidate(f"usearch HNSW {dtype} M=16 ef={ef}", build, int(idx.memory_usage), labels))
    return out


def faiss_candidates(bank: np.ndarray, threads: int) -> list[Candidate]:
    import faiss

    faiss.omp_set_num_threads(threads)
    d = bank.shape[1]
    out = []
    for nlist in (128, 256, 512):
        faiss.omp_set_num_threads(threads)
        t0 = time.perf_counter()
        quant = faiss.IndexFlatL2(d)
        ivf = faiss.IndexIVFFlat(quant, d, nlist)
        ivf.cp.seed = 0
        ivf.train(bank)
        ivf.add(bank)
        build = time.perf_counter() - t0
        size = len(faiss.serialize_index(ivf))
        for nprobe in (1, 2, 4):
            for th in sorted({1, threads}):   # OpenMP threads spin: on a busy 2-core box one may beat two
                def labels(q, ivf=ivf, nprobe=nprobe, th=th):
                    faiss.omp_set_num_threads(th)
                    ivf.nprobe = nprobe
                    return ivf.search(q, 1)[1][:, 0].astype(np.int64)
                out.append(Candidate(f"faiss IVFFlat nlist={nlist} nprobe={nprobe} threads={th}", build, size, labels))
    t0 = time.perf_counter()
    hnsw = faiss.IndexHNSWFlat(d, 16)
    hnsw.hnsw.efConstruction = 200
    hnsw.add(bank)
    build = time.perf_counter() - t0
    size = len(faiss.serialize_index(hnsw))
    for ef in (16, 32):
        def labels(q, ef=ef):
            faiss.omp_set_num_threads(threads)
            hnsw.hnsw.efSearch = ef
            return hnsw.search(q, 1)[1][:, 0].astype(np.int64)
        out.append(Candidate(f"faiss HNSWFlat M=16 ef={ef}", build, size, labels))
    return out


class PreviousFrame:
    """numpy only: each patch's candidates are the bank rows that the previous frame's patches in its 3x3 grid
    neighbourhood were matched to (a line shows the same product in the same place); the first frame pays a
    brute force. """

    def __init__(self, exact: ExactSearch, grid: tuple[int, int]):
        self.exact, self.grid, self.prev = exact, grid, None

    def labels(self, q: np.ndarray) -> np.ndarray:
        if self.prev is None:
            self.prev = self.exact.nearest(q)[1]
            return self.prev
        # (the labels of this frame become the next frame's candidates)
        rows, cols = self.grid
        lab = self.prev.reshape(rows, cols)
        padded = np.pad(lab, 1, mode="edge")
        cands = np.stack([padded[1 + dr:1 + dr + rows, 1 + dc:1 + dc + cols].ravel()
                          for dr in (-1, 0, 1) for dc in (-1, 0, 1)], axis=1)      # (n, 9)
        diff = self.exact.bank[cands] - q[:, None, :]
        d2 = np.einsum("ijk,ijk->ij", diff, diff)
        self.prev = cands[np.arange(len(q)), np.argmin(d2, axis=1)]
        return self.prev


def with_recheck(exact: ExactSearch, labels_fn):
    """The search stage as deployed around any index: labels -> upper bounds -> exact re-check."""
    def run(q):
        lab = labels_fn(q)
        up = upper_bounds(exact.bank, q, lab)
        dist, rechecked = exact_image_recheck(exact, q, up)
        return dist, rechecked, lab
    return run


def hnswlib_build(bank: np.ndarray, params, threads: int) -> float:
    t0 = time.perf_counter()
    build_hnsw(bank, params, threads=threads)
    return time.perf_counter() - t0
