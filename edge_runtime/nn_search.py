"""Nearest-neighbour search of patch features against the memory bank: exact (BLAS or an onnxruntime graph),
HNSW (the bundle's graph, searched by faiss in edge_runtime.hnsw_graph or by hnswlib here) or IVF (faiss, built
on the device).

All return per-patch L2 distances. Approximate neighbours are real bank vectors, so an approximate distance is an
upper bound of the exact one; `exact_image_recheck` therefore re-checks patches in descending order of approximate
distance until no unchecked patch can beat the best exact one, which makes the IMAGE score exact (see
shared/SEARCH.md: recall 99.7% alone still flips good parts to NG).
"""
from __future__ import annotations

import contextlib
import copy
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np


_F32_MAX = float(np.finfo(np.float32).max)
FAISS_SPINCOUNT = 10_000   # libgomp spin iterations before an idle faiss thread sleeps (import_faiss)


def import_faiss(mode: str):
    """faiss, with its OpenMP threads told to sleep when idle (set before libgomp starts, i.e. before the first
    import): by default they spin after every search and take a 2-core station's cores from the re-check and
    the next frame's features (hnswlib 10.1 -> 14.7 ms beside spinning faiss threads, measured).

    Not at once, though: a short spin (libgomp's GOMP_SPINCOUNT, which overrides the passive policy's zero)
    bridges the gaps between the search stage's back-to-back parallel regions (walk from the top, seeded walk,
    tightening) but not the ~3 ms of the next frame's features. edge-bench, bottle 10%, raw frames, alternating
    (benchmarks/README.md): search p50 3.24-3.37 -> 2.86-2.99 ms at 10,000, features unchanged; 200,000 took the
    features stage's cores (p50 2.7 -> 3.2 ms, p99 2.9 -> 7.4). A value the environment already has is kept."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("GOMP_SPINCOUNT", str(FAISS_SPINCOUNT))
    try:  # a core dependency, imported only by the modes that use it
        import faiss
    except ImportError:
        raise ImportError(f"{mode} needs faiss, a dependency of patchcore-edge: pip install 'faiss-cpu>=1.8' "
                          "(or use knn: hnswlib)") from None
    return faiss


@contextlib.contextmanager
def private_copy(data: bytes, name: str) -> Iterator[str]:
    """A path whose file holds exactly `data` and that nobody else can change while it exists.

    Linux: a sealed memfd (no writes, no resizing, seals locked) named by /proc/self/fd/N; no file system entry
    exists at all. Elsewhere (or if memfd is unavailable): a 0600 file in a fresh 0700 temporary folder of
    this user, removed on exit. For loaders such as hnswlib that take only a path.
    """
    fd = -1
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        try:
            fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except OSError:
            fd = -1
    if fd >= 0:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            import fcntl

            fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                        fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    folder = tempfile.mkdtemp(prefix="edge-runtime-")  # mode 0700, owned by this user
    try:
        path = os.path.join(folder, name)
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as fh:
            fh.write(data)
        yield path
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class ExactSearch:
    """Brute force: d^2 = |q|^2 + |b|^2 - 2 q.b as one matrix product per bank chunk, plus a pruned exact
    search for a few queries (`prefix_lower` + `nearest_below`, which the re-check calls; `nearest_within`).

    The pruning: the bank is also kept in its principal axes (PCA of the bank, computed at load). A squared
    distance over the first `prefix_dims` of those axes is a sum over a subset of the coordinates of the full
    squared distance (rotation preserves L2), so it is a LOWER bound of the full one. Given an upper bound for a
    query (the distance to any real bank vector, e.g. its HNSW neighbour), only bank vectors whose lower bound is
    below it can be nearer; on the bottle bank 48 of 152 axes hold 97% of the variance and ~4% of the bank
    survives (benchmarks/search_floor.py). The surviving vectors are then measured in full, in the ORIGINAL coordinates, so the result is
    the brute-force answer, not an approximation.
    Where many survive (a patch far from every good one: a defect), the rest of the axes tighten the bound: the
    squared distance over them is at least the squared difference of the two vectors' norms over them (triangle
    inequality), and that norm is one number per bank vector (`_tail_norm`).
    """

    PREFIX_DIMS = 48
    # Generous slack on the lower bound for float32 rounding of the expanded form (|a|^2 + |b|^2 - 2ab):
    # a larger slack only keeps a few more candidates, never drops the true neighbour.
    BOUND_SLACK = 1e-3
    # A patch far from every good one (a defect) leaves most of the bank as candidates; above this share, one GEMV
    # over the whole bank is cheaper than gathering them (GEMV = gathering ~12% of the bank, measured; bottle
    # contamination frames: re-check 11.5-12.2 -> 3.9-4.6 ms).
    DENSE_SHARE = 0.15
    # Float32 dot products of d terms err by at most ~d units of rounding of |q||b| (the classic gamma_d bound);
    # the shortlist keeps rows within 8 d of them of the minimum, relative to |q|^2 + |b|^2 (152-d: 1.4e-4).
    EXPANDED_ULPS_PER_DIM = 8
    # More prefix candidates than this: the tail's norms drop most of them. Bottle 10% defect patches: 1,000-12,000
    # of 21,402 rows -> 50-6,000, so most re-checks of a defect gather a few hundred rows instead of one GEMV over
    # the whole bank; few candidates are cheaper measured than screened.
    TAIL_SCREEN_MIN = 256

    def __init__(self, bank: np.ndarray, chunk: int = 2048, prefix_dims: int | None = None):
        self.bank = np.ascontiguousarray(bank, dtype=np.float32)
        self.bank_sq = np.einsum("ij,ij->i", self.bank, self.bank)
        self._bank_sq_max = float(self.bank_sq.max()) if len(self.bank_sq) else 0.0
        self.chunk = chunk
        n, d = self.bank.shape
        m = min(prefix_dims or self.PREFIX_DIMS, d)
        # Principal axes of the bank (float64 for a stable eigendecomposition of a d x d matrix; cheap).
        self._mean = self.bank.mean(axis=0, dtype=np.float64).astype(np.float32)
        self._mean64 = self._mean.astype(np.float64)
        # Float32 rounding of an expanded-form distance, relative to |q|^2 + |b|^2 (`_rounding2`, `_near_minimum`).
        self._expanded_rel = self.EXPANDED_ULPS_PER_DIM * d * float(np.finfo(np.float32).eps)
        # Centred in float64: the difference of two float32 values is exact there (the tail norms below need it).
        centred = self.bank.astype(np.float64) - self._mean64
        if n > 1:
            _, vecs = np.linalg.eigh(centred.T @ centred)
            basis = np.ascontiguousarray(vecs[:, ::-1])                             # largest variance first
        else:
            basis = np.eye(d)
        axes = np.ascontiguousarray(basis[:, :m], dtype=np.float32)
        self._axes = axes
        # The tail's axes and norms in float64: the screen's |tail(q)| - |tail(b)| is the difference of two norms
        # that can be far larger than it (a row far out along the tail); in float32 their rounding alone could
        # exceed the slack and drop the nearest row (test_bounds_keep_the_nearest_row_of_a_query_far_from_the_mean).
        self._tail_axes = np.ascontiguousarray(basis[:, m:])
        self._tail_norm = np.linalg.norm(centred @ self._tail_axes, axis=1) if n else np.zeros(0)
        # Float32 rounding of the prefix bound (the projection and the expanded form) grows with the vectors'
        # distance from the mean, not with the limit: `_rounding2` of (|q - mean|^2 + this) covers it.
        self._centred_sq = np.einsum("ij,ij->i", centred, centred).astype(np.float32)   # |b - mean|^2 (`nearest`)
        self._centred_sq_max = float(self._centred_sq.max()) if n else 0.0
        del centred
        prefix = (self.bank - self._mean) @ axes                                 # (n, m): a third of the bank
        self._prefix_sq = np.einsum("ij,ij->i", prefix, prefix)
        # Held as (m, n): queries @ it is one row-major GEMM, 2x faster for a batch of 8 than against the
        # transposed (n, m) view (0.35 vs 0.75 ms on the bottle bank, one BLAS thread).
        self._prefix_t = np.ascontiguousarray(prefix.T)
        self.candidates_last = 0

    def renumbered(self, bank: np.ndarray, order: np.ndarray) -> "ExactSearch":
        """This search over the same rows in another order: `bank` row i is this bank's row order[i]. The same
        principal axes (no second eigendecomposition at load, and every bound the same number as before); each
        row's precomputed numbers move with it."""
        if bank.shape != self.bank.shape or len(order) != len(self):
            raise ValueError(f"renumbered: {bank.shape} bank and {len(order)} rows for a {self.bank.shape} bank")
        new = copy.copy(self)
        new.bank = bank
        new.bank_sq = self.bank_sq[order]
        new._tail_norm = self._tail_norm[order]
        new._centred_sq = self._centred_sq[order]
        new._prefix_sq = self._prefix_sq[order]
        new._prefix_t = np.ascontiguousarray(self._prefix_t[:, order])
        new.candidates_last = 0
        return new

    @property
    def dim(self) -> int:
        return self.bank.shape[1]

    def __len__(self) -> int:
        return self.bank.shape[0]

    def nearest(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(distances, bank indices) of the nearest bank vector for each query row."""
        # Both sides centred on the bank's mean: the expanded form's rounding grows with |q|^2 + |b|^2, so a bank
        # far from the origin (all rows 1e3 out, 1 apart) lost every digit that tells its rows apart (0.0 for a
        # distance of 0.665); around its mean the terms are as small as the distances allow.
        q = np.ascontiguousarray(queries, dtype=np.float32) - self._mean
        q_sq = np.einsum("ij,ij->i", q, q)
        best = np.full(q.shape[0], np.inf, dtype=np.float32)
        best_idx = np.zeros(q.shape[0], dtype=np.int64)
        rows = np.arange(q.shape[0])
        for start in range(0, len(self), self.chunk):
            block = self.bank[start:start + self.chunk] - self._mean
            # Chunks of 2048 bank vectors keep the queries x chunk distance block in cache.
            d2 = q @ block.T
            d2 *= -2.0
            d2 += self._centred_sq[start:start + self.chunk]
            idx = np.argmin(d2, axis=1)
            val = d2[rows, idx]
            better = val < best
            best[better] = val[better]
            best_idx[better] = idx[better] + start
        return np.sqrt(np.maximum(best + q_sq, 0.0)), best_idx

    def distances(self, queries: np.ndarray) -> np.ndarray:
        # The rows found, measured in the difference kernel: a real bank vector's distance, never below the nearest
        # one whatever the expanded form's rounding (probe 110: one bank row 1e10 out moved the mean so far that
        # every expanded distance cancelled to 0.0, and every part, defects too, scored 0: OK).
        q = np.ascontiguousarray(queries, dtype=np.float32)
        return upper_bounds(self.bank, q, self.nearest(q)[1])

    def prefix_lower(self, queries: np.ndarray) -> np.ndarray:
        """(b, n) squared prefix distances of each query to every bank vector: lower bounds of the full ones (up to
        float32 rounding, which `BOUND_SLACK` covers). One small GEMM over the bank's prefix, one row per query."""
        qp = (np.ascontiguousarray(queries, dtype=np.float32) - self._mean) @ self._axes
        lower2 = qp @ self._prefix_t
        lower2 *= -2.0
        lower2 += self._prefix_sq
        lower2 += np.einsum("ij,ij->i", qp, qp)[:, None]
        return lower2

    def nearest_below(self, query: np.ndarray, lower2: np.ndarray, limit: float) -> tuple[float, int]:
        """(distance, index) of the nearest bank vector among those whose lower bound admits a distance <= `limit`;
        (inf, -1) when none does. The answer is the EXACT nearest whenever its distance is <= `limit`: every bank
        vector left out is farther than `limit`. Distances are measured in full, in the original coordinates."""
        return self.nearest_below_or_whole(query, lower2, limit)[:2]

    def nearest_below_or_whole(self, query: np.ndarray, lower2: np.ndarray, limit: float) -> tuple[float, int, bool]:
        """`nearest_below`, and whether the answer is the nearest of the WHOLE bank whatever `limit` (True when so
        many rows were candidates that the whole bank was scanned): then no wider search can change it."""
        if not np.isfinite(limit):
            cand = np.arange(len(self))
        else:
            centred = np.asarray(query, dtype=np.float64) - self._mean64
            limit2 = float(limit) * float(limit) * (1.0 + self.BOUND_SLACK) + self.BOUND_SLACK
            if limit2 < _F32_MAX:
                # BOUND_SLACK is relative to the limit; the prefix bound's own float32 rounding is relative to the
                # vectors' distance from the mean, which may be far larger (a query far out, near one row). Every
                # finite float32 bound passes at _F32_MAX already; an overflowed one (inf) never did, nor does.
                limit2 = min(limit2 + self._rounding2(float(centred @ centred)), _F32_MAX)
            cand = np.flatnonzero(lower2 <= limit2)
            if len(cand) > self.TAIL_SCREEN_MIN and self._tail_axes.shape[1]:
                # |tail(q - b)| >= | |tail(q)| - |tail(b)| |: added to the prefix's part, still a lower bound
                gap = np.linalg.norm(centred @ self._tail_axes) - self._tail_norm[cand]
                cand = cand[lower2[cand] + gap * gap <= limit2]
        self.candidates_last += len(cand)
        if len(cand) == 0:
            return np.inf, -1, False
        whole = len(cand) > self.DENSE_SHARE * len(self)
        if whole:
            cand = self._near_minimum(query)   # the nearest is among these (and is a candidate if <= limit)
        diff = self.bank[cand] - query
        d2 = np.einsum("ij,ij->i", diff, diff)
        k = int(np.argmin(d2))
        return float(np.sqrt(d2[k])), int(cand[k]), whole

    def _rounding2(self, query_centred_sq: float) -> float:
        """Most the float32 prefix bound (`prefix_lower`) of a query this far from the mean (squared) can exceed
        the true one by, absolute: its projections err by ~d and its expanded form by ~m units of rounding of
        the vectors' centred norms (worst case ~3e-5 of them for d = 152, m = 48; this allows 8 d units, as
        `_near_minimum` does). Real banks: ~1 against the limit's own slack of ~0.6 (bottle, squared units)."""
        return self._expanded_rel * (query_centred_sq + self._centred_sq_max)

    def _near_minimum(self, query: np.ndarray) -> np.ndarray:
        """Rows whose squared distance in the expanded form (one GEMV over the whole bank, no gather) lies within
        float32 rounding of the smallest: the nearest row in the exact (difference) kernel is among them.

        Both kernels are within `tol` of the true squared distance, so the exact kernel's nearest lies within
        4 tol of the expanded minimum."""
        e = self.bank @ query
        e *= -2.0
        e += self.bank_sq
        tol = self._expanded_rel * (float(query @ query) + self._bank_sq_max)
        return np.flatnonzero(e <= float(e.min()) + 4.0 * tol)

    def nearest_within(self, queries: np.ndarray, upper: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact (distances, indices) for a few queries, each with an upper bound of its nearest distance.

        `upper[i]` must be >= the true nearest distance of query i (any bank vector's distance is; inf is
        allowed and means "no bound"). Cost: one small GEMM over the bank's prefix, then full distances
        for the bank vectors the lower bound cannot exclude.
        """
        q = np.ascontiguousarray(queries, dtype=np.float32)
        lower2 = self.prefix_lower(q)
        dist = np.empty(len(q), dtype=np.float32)
        idx = np.empty(len(q), dtype=np.int64)
        self.candidates_last = 0
        for i in range(len(q)):
            d, k = self.nearest_below(q[i], lower2[i], float(upper[i]))
            if k < 0:   # only when `upper` was not a valid bound: fall back to the whole bank
                d, k = self.nearest_below(q[i], lower2[i], np.inf)
            dist[i], idx[i] = d, k
        return dist, idx


class OnnxExactSearch:
    """Exact search as an onnxruntime graph built on the device from the verified bank (`knn: onnx`).

    The same brute force as `ExactSearch` (d^2 = |q|^2 + |b|^2 - 2 q.b, minimum per query), but run by
    onnxruntime on the station's execution providers: on a Jetson the CUDA provider computes it on the GPU, which
    idles otherwise; on a CPU it is no faster than `ExactSearch` (measured in benchmarks/search_floor.py). The
    bank is split into chunks so that the distance block of each stays small on a CPU.
    """

    CHUNK = 4096

    def __init__(self, bank: np.ndarray, threads: int = 2, providers: list[str] | None = None):
        from edge_runtime.features import FeatureError, make_session

        try:  # only this mode needs it: the graph is built here from the verified bank, never shipped
            import onnx
            from onnx import TensorProto, helper, numpy_helper
        except ImportError:
            raise FeatureError("knn: onnx needs the onnx package: pip install 'patchcore-edge[onnx-search]'") from None

        self.exact = ExactSearch(bank)
        bank = self.exact.bank
        n, d = bank.shape
        nodes, inits, outputs = [], [], []
        for c, start in enumerate(range(0, n, self.CHUNK)):
            block = bank[start:start + self.CHUNK]
            inits += [numpy_helper.from_array(np.ascontiguousarray(-2.0 * block.T), f"bank_m2t_{c}"),
                      numpy_helper.from_array(self.exact.bank_sq[start:start + self.CHUNK], f"bank_sq_{c}")]
            nodes += [helper.make_node("MatMul", ["q", f"bank_m2t_{c}"], [f"dot_{c}"]),
                      helper.make_node("Add", [f"dot_{c}", f"bank_sq_{c}"], [f"d2_{c}"]),
                      helper.make_node("ReduceMin", [f"d2_{c}"], [f"min_{c}"], axes=[1], keepdims=1),
                      helper.make_node("ArgMin", [f"d2_{c}"], [f"arg_{c}"], axis=1, keepdims=1)]
            outputs += [f"min_{c}", f"arg_{c}"]
        nodes += [helper.make_node("Concat", [o for o in outputs if o.startswith("min_")], ["mins"], axis=1),
                  helper.make_node("Concat", [o for o in outputs if o.startswith("arg_")], ["args"], axis=1)]
        graph = helper.make_graph(
            nodes, "exact_search", [helper.make_tensor_value_info("q", TensorProto.FLOAT, ["n", d])],
            [helper.make_tensor_value_info("mins", TensorProto.FLOAT, ["n", None]),
             helper.make_tensor_value_info("args", TensorProto.INT64, ["n", None])], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = min(model.ir_version, 9)   # onnxruntime builds older than onnx's newest IR
        onnx.checker.check_model(model)
        self.session = make_session(model.SerializeToString(), threads, providers, name="<exact search graph>")
        self.chunk_starts = np.arange(0, n, self.CHUNK)

    @property
    def dim(self) -> int:
        return self.exact.dim

    def __len__(self) -> int:
        return len(self.exact)

    def nearest(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        mins, args = self.session.run(None, {"q": q})
        best_chunk = np.argmin(mins, axis=1)
        rows = np.arange(len(q))
        d2 = mins[rows, best_chunk] + np.einsum("ij,ij->i", q, q)
        return np.sqrt(np.maximum(d2, 0.0)), args[rows, best_chunk] + self.chunk_starts[best_chunk]

    def distances(self, queries: np.ndarray) -> np.ndarray:
        # As ExactSearch.distances: the rows found, measured in the difference kernel (never below the nearest).
        q = np.ascontiguousarray(queries, dtype=np.float32)
        return upper_bounds(self.exact.bank, q, self.nearest(q)[1])


class RecheckedSearch:
    """An approximate search over `self.exact`'s bank (subclasses give `approximate`: distances to real bank
    vectors, hence upper bounds) whose image score `exact_image_recheck` makes exact."""

    exact: ExactSearch
    recheck = True
    rechecked_last = 0
    # `approximate`'s distances come from this kernel (0) or from one whose float32 rounding may differ by this
    # much (relative): the re-check widens them by it (exact_image_recheck's `slack`).
    bound_slack = 0.0

    @property
    def dim(self) -> int:
        return self.exact.dim

    def __len__(self) -> int:
        return len(self.exact)

    def approximate(self, queries: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def distances(self, queries: np.ndarray) -> np.ndarray:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        dist = self.approximate(q)
        if not self.recheck:
            return dist
        dist, self.rechecked_last = exact_image_recheck(self.exact, q, dist, slack=self.bound_slack)
        return dist


class IvfSearch(RecheckedSearch):
    """`knn: ivf`: a faiss inverted-file index (IndexIVFFlat) built on the device from the verified bank, then
    the same exact re-check as `HnswSearch`, so the IMAGE score is the exact one.

    faiss assigns each query to its `nprobe` nearest k-means cells and scans only their vectors; its neighbour is a
    real bank vector, whose distance (recomputed here in the re-check's own float32 kernel, see `upper_bounds`) is
    an upper bound. On the bottle 10% bank this stage is 1.6x faster than hnswlib + re-check on a quiet 2-core x86
    (2-3x on a busy one) at identical image scores (benchmarks/results/search_floor_bottle10_candidates.md). faiss runs on one thread by default: its
    OpenMP threads spin, and on a busy 2-core station two lose to one (measured in the same benchmark).
    """

    NLIST = 128        # k-means cells: ~170 bank vectors each on the 21k bottle bank, ~17 on its 1% bank (measured)
    NPROBE = 2         # cells scanned per query: 1 is faster, 2 keeps the heat map ~7x closer to exact
    POINTS_PER_CELL = 16   # fewer cells on a smaller bank; faiss's own advice is 39, but 128 cells on 2,140 vectors
                           # measured fastest on the 1% bottle bank at exact image scores

    def __init__(self, bank: np.ndarray, threads: int = 1, nlist: int | None = None,
                 nprobe: int | None = None, seed: int = 0):
        faiss = import_faiss("knn: ivf")
        self._faiss = faiss
        self.exact = ExactSearch(bank)
        bank = self.exact.bank
        n, d = bank.shape
        # Fewer cells on a small bank (k-means needs points per cell); one cell for a bank of one vector.
        self.nlist = max(1, min(nlist or self.NLIST, n // self.POINTS_PER_CELL))
        self.nprobe = min(nprobe or self.NPROBE, self.nlist)
        self.threads = threads
        faiss.omp_set_num_threads(threads)
        quantizer = faiss.IndexFlatL2(d)
        self.ivf = faiss.IndexIVFFlat(quantizer, d, self.nlist)
        self.ivf.cp.seed = seed          # the same cells on every load of the same bank
        self.ivf.cp.min_points_per_centroid = 1
        self.ivf.train(bank)
        self.ivf.add(bank)
        self.ivf.nprobe = self.nprobe
        self.rechecked_last = 0

    def approximate(self, queries: np.ndarray) -> np.ndarray:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        self._faiss.omp_set_num_threads(self.threads)   # process-wide in faiss: another index may have changed it
        labels = self.ivf.search(q, 1)[1][:, 0].astype(np.int64)
        # -1: the probed cells were empty. Any real bank vector gives a valid upper bound; the re-check does the rest.
        labels[labels < 0] = 0
        return upper_bounds(self.exact.bank, q, labels)


# The widest search a manifest or station may ask for: faiss holds ef in a C int (a larger value raised
# OverflowError at load or on every frame), and beyond a few thousand a frame takes seconds, not milliseconds.
EF_MAX = 4096


@dataclass(frozen=True)
class HnswParams:
    space: str = "l2"
    M: int = 16
    ef_construction: int = 200
    # 16: the image score is exact either way (re-check); against 32 the search is 25-40% faster (bottle 7.7 ->
    # 5.7 ms, magnetic tile 16.7 -> 10.1 ms) and pixel AUROC moves by <= 0.0006 (benchmarks/README.md, "ef").
    ef_search: int = 16
    exact_recheck: bool = True
    # The seeded walk (knn: hnsw, edge_runtime/hnsw_graph.py): every `seed_step`-th patch row and column (and
    # the last) walks the graph from the top at ef_search; every other patch searches only the bottom level,
    # starting from the neighbours found for the four walked patches around it, at `ef_seeded`. Neighbouring
    # patches of a part have near neighbours in the bank, so the search starts next to the answer.
    # Measured (benchmarks/seeded_walk.py, fresh fits, 2-core Xeon): bottle 10% search 5.56 -> 3.42 ms p50 with
    # per-patch distances CLOSER to exact (mean excess 2.0% -> 0.06%: a walk from the top sometimes ends in a far
    # local minimum; four seeds rarely all do); magnetic tile 10% 9.66 -> 5.68 ms (p99 21 -> 14) at 0.32% excess.
    # Pixel AUROC (edge-export evaluate --seed-step 0): bottle 0.9830 -> 0.9831, magnetic tile 0.8215 -> 0.8208.
    # ef_seeded 4 / 6 are faster (bottle 2.91 / 3.21 ms) but cost magnetic tile 0.0025 / 0.0016 of pixel AUROC:
    # fit chooses the width per bundle (export.fit.choose_ef_seeded); 8 is what it falls back to.
    # 0: every patch walks from the top (bundles made before it, whose manifests do not name it). The image score
    # is exact either way (re-check).
    seed_step: int = 4
    ef_seeded: int = 8


def build_hnsw(bank: np.ndarray, params: HnswParams, seed: int = 0, threads: int = -1):
    import hnswlib

    index = hnswlib.Index(space=params.space, dim=bank.shape[1])
    index.init_index(max_elements=bank.shape[0], ef_construction=params.ef_construction, M=params.M, random_seed=seed)
    index.set_num_threads(threads if threads > 0 else 2)
    index.add_items(np.ascontiguousarray(bank, dtype=np.float32), np.arange(bank.shape[0]))
    return index


_BLAS_LOCK = threading.Lock()
_BLAS: dict = {"controller": None, "limiter": None, "users": 0}


@contextlib.contextmanager
def single_threaded_blas(rescan: bool = False) -> Iterator[None]:
    """A context in which numpy's BLAS runs on one thread.

    The re-check's GEMMs are tiny (8 queries); OpenBLAS still wakes all its threads for them, and on a 2-core
    station that costs 3x (3.4 -> 10.4 ms CPU per batch of 8, measured while the machine was busy). threadpoolctl
    is the maintained way to change BLAS threading at run time, whichever BLAS numpy was built with.
    The limit is process-wide, so it is counted: with several inspection workers (inference.workers) it is set
    by the first one in and restored by the last one out, never by one worker under another's feet.
    `rescan`: look for BLAS libraries loaded since the first use (faiss and OpenCV bring their own OpenBLAS).
    """
    with _BLAS_LOCK:
        if _BLAS["users"] == 0:
            if _BLAS["controller"] is None or rescan:
                from threadpoolctl import ThreadpoolController

                _BLAS["controller"] = ThreadpoolController()
            _BLAS["limiter"] = _BLAS["controller"].limit(limits=1, user_api="blas")
        _BLAS["users"] += 1
    try:
        yield
    finally:
        with _BLAS_LOCK:
            _BLAS["users"] -= 1
            if _BLAS["users"] == 0:
                _BLAS["limiter"].restore_original_limits()
                _BLAS["limiter"] = None


def device_blas(knn: str) -> contextlib.AbstractContextManager:
    """BLAS on one thread for as long as a device process inspects (the daemon's run, edge-bench's timed loop).

    The re-check limits BLAS to one thread around its small GEMMs; when it hands the second thread back after
    each frame, OpenBLAS wakes that thread, which then spins for a while and burns a core (measured: a 1-thread
    pipeline used 44.8 ms CPU for a 22.6 ms frame; 22.8 ms pinned). Held for the whole run, the re-check's own
    limit never lets go. knn: exact is left alone: its brute-force GEMM is BLAS and uses the threads.
    Rescanned: numpy's and OpenCV's OpenBLAS (pthreads) are the ones that spin; faiss's is an OpenMP build whose
    idle threads sleep (`import_faiss`)."""
    if knn == "exact":
        return contextlib.nullcontext()
    return single_threaded_blas(rescan=True)


class HnswSearch(RecheckedSearch):
    def __init__(self, index, params: HnswParams, threads: int = 1):
        self.index = index
        self.params = params
        # hnswlib does not persist ef and resets it to 10 on load: set it every time.
        self.index.set_ef(params.ef_search)
        self.index.set_num_threads(threads)
        n = index.get_current_count()
        bank = np.asarray(index.get_items(np.arange(n)), dtype=np.float32)
        self.exact = ExactSearch(bank)
        self.rechecked_last = 0

    @classmethod
    def load(cls, source: Path | bytes, dim: int, params: HnswParams, threads: int = 1) -> "HnswSearch":
        """Load a saved index from a file or from its bytes (the bundle's verified copy), once it has passed
        `read_hnsw_graph`'s checks (GraphError, a ValueError, otherwise).

        hnswlib trusts the file (a link outside the bank or to a missing level crashes the process), so what it
        loads is always the checked bytes, handed over as an immutable private copy (see `private_copy`): nobody
        can swap them between the check and the load.
        """
        import hnswlib

        from edge_runtime.hnsw_graph import read_hnsw_graph   # here: hnsw_graph imports this module

        raw = bytes(source) if isinstance(source, (bytes, bytearray, memoryview)) else Path(source).read_bytes()
        read_hnsw_graph(raw, dim)
        index = hnswlib.Index(space=params.space, dim=dim)
        with private_copy(raw, "index.hnsw") as path:
            index.load_index(path)
        return cls(index, params, threads)

    @property
    def recheck(self) -> bool:
        return self.params.exact_recheck

    @property
    def threads(self) -> int:
        return self.index.num_threads

    def set_threads(self, threads: int) -> None:
        self.index.set_num_threads(threads)

    def set_ef(self, ef: int) -> None:
        self.index.set_ef(ef)

    def labels(self, queries: np.ndarray) -> np.ndarray:
        """Bank row of each query's approximate nearest neighbour."""
        return self.index.knn_query(np.ascontiguousarray(queries, dtype=np.float32), k=1)[0][:, 0].astype(np.int64)

    def approximate(self, queries: np.ndarray) -> np.ndarray:
        _, d2 = self.index.knn_query(np.ascontiguousarray(queries, dtype=np.float32), k=1)
        return np.sqrt(np.maximum(d2[:, 0], 0.0)).astype(np.float32)


def patch_scores(search, queries: np.ndarray) -> np.ndarray:
    """Per-patch distances, the maximum exact (the image score): from the position prior where the search has one
    that fits these queries (`FaissHnswSearch.prior_scores`), else `search.distances`."""
    by_prior = getattr(search, "prior_scores", None)
    dist = by_prior(queries) if by_prior is not None else None
    return search.distances(queries) if dist is None else dist


def upper_bounds(bank: np.ndarray, queries: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Distance of each query to the bank vector `labels[i]`, in the same float32 kernel as
    `ExactSearch.nearest_below`, so it can never fall below the exact distance that kernel finds (an index's
    own distances may be rounded differently, or quantised)."""
    diff = bank[labels] - queries
    return np.sqrt(np.einsum("ij,ij->i", diff, diff))


# Patches whose prefix bounds one GEMM computes at a time in the re-check. 1: each patch's own GEMV, when its turn
# comes. OpenBLAS packs the whole prefix table for a GEMM of 2-8 rows (2 rows 0.25 ms against 0.08 for one GEMV on
# the bottle bank, warm), and most patches of a batch of 8 never needed theirs (an earlier one already beat their
# bound). Interleaved (benchmarks/recheck_batch.py), 8 -> 1: search p99 bottle 10% 5.03 -> 3.99 ms, magnetic tile
# 10% 12.8 -> 10.5, bottle 1% within noise (2.02 / 2.74, 2.61 / 2.65); means equal or lower; scores identical.
RECHECK_BATCH = 1


def exact_image_recheck(exact: ExactSearch, queries: np.ndarray, upper: np.ndarray,
                        batch: int | None = None, slack: float = 0.0,
                        known: tuple[int, float] | None = None) -> tuple[np.ndarray, int]:
    """(per-patch distances whose maximum is the exact image score, patches measured exactly).

    `upper[i]` must be the distance of patch i to some real bank vector (an upper bound of its nearest one), in
    this kernel or, with `slack`, in another float32 kernel whose rounding differs from this one's by at most
    `slack` (relative): upper * (1 + slack) is then the bound, and the distances of patches left unmeasured are
    returned as given.
    Patches are taken in descending order of that bound until no unchecked bound exceeds the best exact
    distance so far. The prefix bounds are computed for `batch` of them at once (RECHECK_BATCH when None), the
    patches then settled one by one: a patch is first searched only within the best exact distance so far (few
    candidates), and in full only when nothing is that near, i.e. when it is the new maximum. On magnetic tile's
    73k bank the top patch alone settles the score in most frames, and patches that cannot win cost little
    (benchmarks/search_floor.py reports the re-check's share).
    `known`: (patch, its exact distance in this kernel), measured already: the search starts from it as the best
    so far and never measures it again.
    """
    batch = RECHECK_BATCH if batch is None else batch
    dist = np.array(upper, dtype=np.float32)
    bound = dist * np.float32(1.0 + slack) if slack else dist   # measured patches get their exact value in both
    best, pos, measured = -np.inf, 0, 0
    if known is not None:
        i, d = known
        dist[i] = bound[i] = best = np.float32(d)
    order = np.argsort(-bound)
    exact.candidates_last = 0
    with single_threaded_blas():
        while pos < len(order) and bound[order[pos]] > best:
            chunk = order[pos:pos + (batch if measured else 1)]   # the top patch alone first: it often settles it
            chunk = chunk[bound[chunk] > best]                    # bounds are sorted: a prefix of the chunk
            pos += len(chunk)
            lower2 = exact.prefix_lower(queries[chunk])
            for j, i in enumerate(chunk):
                if bound[i] <= best:      # an earlier patch of this chunk already beat its bound
                    continue
                measured += 1
                d, _, whole = exact.nearest_below_or_whole(queries[i], lower2[j], best) if best > -np.inf \
                    else (np.inf, -1, False)
                if d > best:              # nothing within `best`: this patch is the new maximum
                    if not whole:         # measure it in full (a whole-bank answer is that already)
                        d, k = exact.nearest_below(queries[i], lower2[j], float(bound[i]))
                        if k < 0:         # `upper` was not a valid bound (never for a real bank vector's distance)
                            d = exact.nearest_below(queries[i], lower2[j], np.inf)[0]
                    best = d
                dist[i] = d
                if slack:
                    bound[i] = d
    return dist, measured
