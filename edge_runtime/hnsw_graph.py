"""`knn: hnsw`: the bundle's HNSW graph (the hnswlib file the exporter wrote), searched by faiss.

The graph, the vectors and the entry point are read from the verified index bytes and handed to a faiss
IndexHNSWFlat as they are: same graph, same greedy search, same ef, so the neighbours are hnswlib's (99.9% the
same label on real bottle and magnetic tile frames; the rest are ties at equal distance). What changes is the
engine: faiss searches a batch of patches on its OpenMP threads without starting threads per call, 1.3x faster
on bottle's 21k bank and 1.5x on magnetic tile's 73k (benchmarks/search_floor.py), and its vector storage is the
ONE copy of the bank in memory: the exact re-check reads it in place (hnswlib keeps its own copy, which numpy
cannot see, so the hnswlib engine holds the bank twice).

The seeded walk (`seed_plan`, `FaissHnswSearch.labels`; HnswParams.seed_step / ef_seeded, pinned in the manifest):
with the patch grid known, only every seed_step-th patch row and column walks the graph from the top; the others
search its bottom level from the neighbours found for the four walked patches around them (faiss
search_level_0). Neighbouring patches have neighbouring bank vectors: about 1.6x faster on bottle with per-patch
distances closer to exact (benchmarks/seeded_walk.py).

The position prior (`FaissHnswSearch.set_prior` / `image_score`, built by edge_runtime.position_prior from the
bundle's golden images): the exact image score from the bank rows each patch position took on the golden parts,
walking only the patches those rows leave open (`prior_scores`). Same image score; the heat map's per-patch
distances are the bounds that search left (upper bounds, the largest exact), not a second, full walk. With a
prior, the pipeline lays the bank out around its rows at load (`FaissHnswSearch.renumber`): the same graph with
its rows renumbered, so the rows one part's search reads lie together in memory.

The file is parsed here, not by hnswlib, so every field is checked before faiss sees it: a link that points
outside the bank or a label that is not a row of the bank would make a search read past its buffers.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable

import numpy as np

from edge_runtime.nn_search import (_F32_MAX, ExactSearch, HnswParams, RecheckedSearch, exact_image_recheck,
                                    import_faiss, single_threaded_blas)

# hnswlib's saved-index header (hnswalg.h saveIndex), as edge_runtime.bundle.check_index_file reads it.
_HEADER = struct.Struct("<QQQQQQiIQQQdQ")


class GraphError(ValueError):
    """The index bytes are not a graph this engine can search (the caller names the file)."""


@dataclass
class HnswGraph:
    """An hnswlib graph in faiss's layout, rows in LABEL order (row i is bank vector i)."""

    vectors: np.ndarray      # (n, dim) float32
    levels: np.ndarray       # (n,) int32: number of levels of each node (1 = level 0 only)
    offsets: np.ndarray      # (n + 1,) uint64: start of each node's neighbour lists in `neighbors`
    neighbors: np.ndarray    # int32, -1 = empty slot; per node: level 0 (max_m0 slots), then max_m per level
    entry: int
    max_level: int
    m: int
    max_m0: int


def read_hnsw_graph(raw: bytes, dim: int) -> HnswGraph:
    """Parse and check an hnswlib index (hnswalg.h saveIndex layout); raises GraphError."""
    if len(raw) < _HEADER.size:
        raise GraphError("too short for an hnswlib header")
    (_off0, _max_el, n, per, label_off, data_off, max_level, entry, max_m, max_m0, m, _mult, _efc) = \
        _HEADER.unpack_from(raw, 0)
    if n < 1 or label_off - data_off != 4 * dim or per != label_off + 8 or data_off != 4 + 4 * max_m0:
        raise GraphError("inconsistent header (element layout)")
    if max_m0 != 2 * m or max_m != m or m < 2:
        raise GraphError(f"graph degree M={m}, maxM={max_m}, maxM0={max_m0}: not hnswlib's default layout (maxM0 = 2M)")
    if not 0 <= entry < n or not 0 <= max_level < 64:
        raise GraphError(f"entry point {entry} / top level {max_level} out of range for {n} vectors")
    pos = _HEADER.size
    if len(raw) < pos + n * per:
        raise GraphError("truncated (level-0 block)")
    level0 = np.frombuffer(raw, dtype=np.uint8, count=n * per, offset=pos).reshape(n, per)
    pos += n * per
    head0 = level0[:, :4].view("<u4")[:, 0]          # views into `raw`: no copy of the bank here
    count0 = head0 & 0xFFFF
    if np.any(head0 & 0x10000):   # hnswlib's DELETE_MARK (third byte): never returned by hnswlib, faiss would
        raise GraphError("vectors marked deleted; the exporter never ships them")
    links0 = level0[:, 4:data_off].view("<i4")
    labels = level0[:, label_off:].view("<u8")[:, 0]
    if np.any(count0 > max_m0):
        raise GraphError("a level-0 neighbour list is longer than maxM0")
    if np.any(labels >= n) or np.any(np.bincount(labels.astype(np.int64), minlength=n) != 1):
        raise GraphError("labels are not the bank rows 0..n-1, each once")
    used0 = np.arange(max_m0)[None, :] < count0[:, None]
    if np.any((links0 < 0) & used0) or np.any((links0 >= n) & used0):
        raise GraphError("a level-0 link points outside the bank")
    labels = labels.astype(np.int64)

    # Upper levels: per node a uint32 byte size, then `levels` blocks of (count, max_m links).
    block = 4 + 4 * max_m
    node_levels = np.zeros(n, dtype=np.int32)
    upper: list[tuple[int, np.ndarray]] = []
    for i in range(n):
        if len(raw) < pos + 4:
            raise GraphError("truncated (upper-level sizes)")
        (size,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if size:
            if size % block or size // block > max_level:
                raise GraphError(f"node {i}: upper-level block of {size} bytes does not fit the header")
            if len(raw) < pos + size:
                raise GraphError(f"truncated (node {i}'s upper levels)")
            blocks = np.frombuffer(raw, dtype="<u4", count=size // 4, offset=pos).reshape(-1, max_m + 1)
            pos += size
            counts = blocks[:, 0] & 0xFFFF
            if np.any(counts > max_m):
                raise GraphError(f"node {i}: an upper-level neighbour list is longer than maxM")
            used = np.arange(max_m)[None, :] < counts[:, None]
            if np.any((blocks[:, 1:] >= n) & used):
                raise GraphError(f"node {i}: an upper-level link points outside the bank")
            node_levels[i] = len(blocks)
            upper.append((i, np.where(used, blocks[:, 1:].astype(np.int64), -1)))
    if node_levels[entry] != max_level:
        raise GraphError(f"entry point {entry} is on level {node_levels[entry]}, the header says {max_level}")
    # A level-L link must reach a node that has level L: a search there reads that node's level-L list, which a
    # lower node does not have (hnswlib reads past its allocation: a crafted index segfaults it).
    for i, links in upper:
        low = (links >= 0) & (node_levels[np.maximum(links, 0)] < np.arange(1, len(links) + 1)[:, None])
        if np.any(low):
            lev, slot = np.argwhere(low)[0]
            raise GraphError(f"node {i}: a level-{lev + 1} link points to node {links[lev, slot]}, which has no "
                             f"level {lev + 1}")

    # Re-number nodes by label, so that storage row i is bank vector i (what every other search returns).
    order = np.argsort(labels)                      # order[j] = internal id of label j
    lev = node_levels[order]
    per_node = max_m0 + lev.astype(np.int64) * max_m
    offsets = np.zeros(n + 1, dtype=np.uint64)
    offsets[1:] = np.cumsum(per_node)
    neighbors = np.full(int(offsets[-1]), -1, dtype=np.int32)
    start = offsets[:-1].astype(np.int64)
    l0 = np.where(used0, labels[np.where(used0, links0, 0)], -1)[order]
    neighbors[(start[:, None] + np.arange(max_m0)[None, :]).ravel()] = l0.ravel()
    for i, links in upper:
        s = start[labels[i]] + max_m0
        mapped = np.where(links >= 0, labels[np.maximum(links, 0)], -1)
        neighbors[s:s + links.size] = mapped.ravel()
    vectors = level0[:, data_off:label_off].view("<f4")[order]     # the one copy, in label order
    if not np.all(np.isfinite(vectors)):
        raise GraphError("the bank holds NaN or infinite values")
    # Every float32 squared distance between bank rows (at most 4 max|b|^2) must be finite: a row so far out that
    # one overflows aborted faiss's k-means (knn: ivf) with a C++ exception, which ends the process (probe 110).
    if len(vectors) and 4.0 * float(np.square(vectors, dtype=np.float64).sum(axis=1).max()) >= _F32_MAX:
        raise GraphError("the bank holds a vector too large for float32 distances (squared norm over "
                         f"{_F32_MAX / 4:.3g})")
    return HnswGraph(vectors, lev + 1, offsets, neighbors, int(labels[entry]), int(max_level), int(m), int(max_m0))


class FaissHnswSearch(RecheckedSearch):
    """The bundle's HNSW graph in a faiss IndexHNSWFlat; the same exact re-check as every approximate search."""

    # `approximate` returns faiss's own distances. faiss's L2 (fvec_L2sqr) and the re-check's kernel both sum d
    # squared float32 differences; each errs by at most ~(d + 2) units of rounding, relative. 1e-4 covers both
    # for any d up to ~800 (152-d: 2e-5 needed).
    bound_slack = 1e-4
    # Before the exact re-check, the candidates for the image score (patches whose bound lies within REFINE_SHARE
    # of the largest, at most REFINE_MAX of them, highest first) walk the graph again from the top at REFINE_EF:
    # a defect's patches, far from every bank vector, are where the seeded walk stops worst, and every loose bound
    # above the true maximum costs the re-check a search of the whole bank. Their values only move closer to
    # exact. Search stage, refinement included (benchmarks/recheck_refine.py, interleaved): bottle 10% p50 3.45
    # -> 3.16 ms, p99 8.6 -> 5.7; magnetic tile 10% p50 within run-to-run noise (6.27 -> 6.62, 6.44 -> 6.38),
    # p99 14-15 -> 9-10. Share 2%, ef 64, no cap: measured too, no better on both sets.
    REFINE_SHARE = 0.05
    REFINE_EF = 128
    REFINE_MAX = 8

    # The position prior (`set_prior`, built by edge_runtime.position_prior from the bundle's golden images): for
    # a part that sits where the golden parts sat, each patch's nearest bank row is almost always one of the rows
    # nearest to the same patch of a golden part. `image_score` then finds the exact image score without walking
    # every patch: bounds from those rows; the highest PRIOR_TOP_SHARE of them (at least PRIOR_TOP_MIN) walked
    # from them; the exact distance of the highest (a floor under the image score: on good bottle frames the
    # largest in 85% of them with 1/8 walked, 15% with 16); only the patches whose bound still exceeds it walked,
    # the PRIOR_TIGHTEN highest of those re-searched from the top; the exact re-check from the floor. More than
    # PRIOR_OPEN_SHARE of the patches over the floor (a part unlike the golden ones): the full walk instead.
    # The per-patch distances (heat map) are the bounds this leaves: no second walk after the verdict.
    # A part whose highest bound stays above the decision threshold (`set_prior`'s defect_above) after only its
    # PRIOR_FIRST highest patches have walked is most likely a defect: its floor is measured at once, and when
    # that leaves no more than the top share open, the rest of the top share is never walked (bottle 10%, defect
    # parts: search p50 2.55 -> 2.05 ms, benchmarks/position_prior.py). A good part that trips it (1 of 20 bottle
    # good parts at the NG threshold; more with a review band under it) pays one more pruned exact search
    # (~0.07 ms) and then walks the top share as before: good parts' p50 unchanged within noise.
    PRIOR_FIRST = 16
    PRIOR_TOP_SHARE = 1 / 8
    PRIOR_TOP_MIN = 16
    PRIOR_TIGHTEN = 32
    PRIOR_OPEN_SHARE = 0.25
    PRIOR_SEEDS = 4
    FLOOR_EF = 32   # search width of a likely defect's worst patch before its exact distance (exact_at); 0: none
    # More than FLOOR_MORE_OVER patches still over the floor: the next-highest bound is measured exactly too, up to
    # FLOOR_MORE times (the floor is then the larger). Bottle 10%, 83 frames, interleaved (scores identical): search
    # p90 2.59 -> 2.25 ms, p99 5.26 -> 3.69 standalone; in the pipeline p99 7.1 -> 6.0. 2-6 more, or 8 / 32 /
    # 48 over: no better.
    FLOOR_MORE = 1
    FLOOR_MORE_OVER = 16
    # Still more than FLOOR_MORE_OVER over the floor once the patches over it have walked: the highest bound, now
    # close to exact, is measured exactly before the tightening (a good bottle part with 71 left over its floor:
    # none over the score after that one measure, against 32 searches from the top at REFINE_EF). Bottle 10%,
    # benchmarks/position_prior.py, interleaved: see benchmarks/README.md.
    FLOOR_AFTER_WALK = True
    # The station lays the bank out around the prior's rows once it has one (`renumber`); False: the file's order.
    RENUMBER_FOR_PRIOR = True

    def __init__(self, graph: HnswGraph, params: HnswParams, threads: int = 1):
        faiss = import_faiss("knn: hnsw")
        self._faiss = faiss
        self.params = params
        n, dim = graph.vectors.shape
        index = faiss.IndexHNSWFlat(dim, graph.m)
        h = index.hnsw
        if h.nb_neighbors(0) != graph.max_m0 or (graph.max_level and h.nb_neighbors(1) != graph.m):
            raise GraphError(f"faiss lays out {h.nb_neighbors(0)} level-0 neighbours for M={graph.m}, the graph has "
                             f"{graph.max_m0}")
        faiss.copy_array_to_vector(graph.levels, h.levels)
        faiss.copy_array_to_vector(graph.offsets, h.offsets)
        faiss.copy_array_to_vector(graph.neighbors, h.neighbors)
        h.entry_point, h.max_level = graph.entry, graph.max_level
        index.storage.add(graph.vectors)
        index.ntotal = n
        h.efSearch = params.ef_search
        self.graph = index
        self._attach_bank()
        self.file_rows = np.arange(n)    # the index file's row of each storage row (`renumber` moves them)
        self.threads = threads
        self.rechecked_last = 0
        self.grid: tuple[int, int] | None = None
        self._prior: np.ndarray | None = None
        self._prior_rows: np.ndarray | None = None     # the same rows, each once per position (distinct_rows)
        self._defect_above: float | None = None
        self._plans: dict[tuple[int, int], SeedPlan | None] = {}   # by (queries, step): params may be replaced

    def _attach_bank(self) -> None:
        """The exact search over the bank, read in place from faiss's storage: the one copy in memory (kept
        alive by self.graph; re-attached after `add`, which may move it)."""
        n, dim = self.graph.ntotal, self.graph.d
        storage = self._faiss.downcast_index(self.graph.storage)
        self._flat = storage
        bank = self._faiss.rev_swig_ptr(storage.get_xb(), n * dim).reshape(n, dim)
        bank.flags.writeable = False
        self.exact = ExactSearch(bank)

    @classmethod
    def load(cls, raw: bytes, dim: int, params: HnswParams, threads: int = 1) -> "FaissHnswSearch":
        return cls(read_hnsw_graph(raw, dim), params, threads)

    @property
    def recheck(self) -> bool:
        return self.params.exact_recheck

    def set_threads(self, threads: int) -> None:
        self.threads = threads

    def set_ef(self, ef: int) -> None:
        self.graph.hnsw.efSearch = ef

    def add(self, vectors: np.ndarray) -> None:
        """Insert bank vectors (rows len(self)..) into the graph; the exact search is rebuilt on the new storage."""
        self._faiss.omp_set_num_threads(self.threads)
        self.graph.add(np.ascontiguousarray(vectors, dtype=np.float32))
        self._attach_bank()
        self.file_rows = np.concatenate([self.file_rows, np.arange(len(self.file_rows), self.graph.ntotal)])

    def graph_arrays(self) -> HnswGraph:
        """The graph as it stands (after `add`), for `write_hnsw_graph`; the vectors are the storage itself."""
        h, faiss = self.graph.hnsw, self._faiss
        return HnswGraph(self.exact.bank, faiss.vector_to_array(h.levels).astype(np.int32),
                         faiss.vector_to_array(h.offsets).astype(np.uint64),
                         faiss.vector_to_array(h.neighbors).astype(np.int32), int(h.entry_point), int(h.max_level),
                         int(h.nb_neighbors(1)), int(h.nb_neighbors(0)))

    def renumber(self, first: np.ndarray) -> np.ndarray:
        """Lay the bank out anew around `first` (bank rows, any shape): its distinct rows come first in order of
        first appearance, then the rest in breadth-first order of the graph from them (`locality_order`). Returns
        the new row of each old one: row ids from before (labels, a prior) must be mapped through it.

        Why: the position prior's candidate distances and the walks that start from its rows read 2,600 rows
        scattered over bottle 10%'s 13 MB bank, which the features stage has evicted from the cache by then;
        laid out together they are one 1.6 MB block and their graph neighbours follow (search stage -0.2 to
        -0.3 ms a part on bottle 10%, benchmarks/bank_layout.py). Distances, and so every score and heat map, are
        unchanged: the same vectors, the same links. In place: the one copy of the bank stays one."""
        first = np.asarray(first, dtype=np.int64)
        if first.size and (first.min() < 0 or first.max() >= len(self)):   # the caller maps them through the result
            raise ValueError(f"renumber: rows {first.min()}..{first.max()} outside the bank's {len(self)}")
        faiss = self._faiss
        graph = self.graph_arrays()
        order = locality_order(graph, first)
        new = permute_graph(graph, order)
        h = self.graph.hnsw
        faiss.copy_array_to_vector(new.levels.astype(np.int32), h.levels)
        faiss.copy_array_to_vector(new.offsets.astype(np.uint64), h.offsets)
        faiss.copy_array_to_vector(new.neighbors.astype(np.int32), h.neighbors)
        h.entry_point = new.entry
        n, dim = self.graph.ntotal, self.graph.d
        storage = faiss.rev_swig_ptr(self._flat.get_xb(), n * dim).reshape(n, dim)
        storage[...] = new.vectors           # writable view of faiss's own storage: the vectors move, not copied
        storage.flags.writeable = False
        self.exact = self.exact.renumbered(storage, order)
        self.file_rows = self.file_rows[order]
        new_of = np.empty(n, dtype=np.int64)
        new_of[order] = np.arange(n)
        if self._prior is not None:
            self.set_prior(new_of[self._prior], self._defect_above)
        return new_of

    def set_grid(self, rows: int, cols: int) -> None:
        """The patch grid of one tile (the bundle's features.grid): queries are then read as whole tiles of
        rows x cols patches, row-major, and searched with the seeded walk (HnswParams.seed_step)."""
        self.grid = (int(rows), int(cols))
        self._plans = {}

    def _plan(self, n_queries: int) -> "SeedPlan | None":
        step = self.params.seed_step
        if self.grid is None or step < 2:
            return None
        key = (n_queries, step)
        if key not in self._plans:
            self._plans[key] = seed_plan(self.grid, n_queries, step)
        return self._plans[key]

    def set_prior(self, candidates: np.ndarray | None, defect_above: float | None = None) -> None:
        """Candidate bank rows per patch position, (patches per frame, k), for `image_score`; None: no prior.
        `defect_above`: the lowest image score the station does not pass (its review or NG threshold), where a
        part's search may start from its worst patch (PRIOR_FIRST); it changes how long a part takes, never its
        score."""
        if defect_above is not None and not np.isfinite(defect_above):
            raise ValueError(f"position prior: defect_above must be a finite score, got {defect_above}")
        self._defect_above = None if defect_above is None else float(defect_above)
        if candidates is None:
            self._prior = self._prior_rows = None
            return
        rows = self._checked_prior(candidates)
        self._prior, self._prior_rows = rows, distinct_rows(rows)

    def _checked_prior(self, candidates: np.ndarray) -> np.ndarray:
        rows = np.ascontiguousarray(candidates, dtype=np.int64)
        # faiss reads these rows unchecked: one outside the bank would read past its storage.
        if rows.ndim != 2 or not rows.size or rows.min() < 0 or rows.max() >= len(self):
            raise ValueError(f"position prior: {rows.shape} rows must index the bank's {len(self)} vectors")
        return rows

    @property
    def prior(self) -> np.ndarray | None:
        return self._prior

    def candidate_distances(self, queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """(m, k) squared distances (faiss's kernel) of each query to its own k bank rows (m, k); inf for row -1."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        # Filled: faiss skips a row -1 without reading the bank, and writes inf there only since some release
        # (older ones leave the entry as it was).
        out = np.full(rows.shape, np.inf, dtype=np.float32)
        f = self._faiss
        self._flat.compute_distance_subset(len(q), f.swig_ptr(q), rows.shape[1], f.swig_ptr(out), f.swig_ptr(rows))
        return out

    def image_score(self, queries: np.ndarray) -> float | None:
        """The exact image score (the largest per-patch distance `distances` would give) found with the position
        prior (see PRIOR_TOP_SHARE); None when there is no prior for frames of this many patches, or no re-check."""
        dist = self.prior_scores(queries)
        return None if dist is None else float(dist.max())

    def prior_scores(self, queries: np.ndarray) -> np.ndarray | None:
        """Per-patch distances whose maximum is the exact image score, found with the position prior (see
        PRIOR_TOP_SHARE): every other patch's is an upper bound no higher than the score, from the prior's rows
        and the walks the score needed. They are the heat map's (not a second full walk after the verdict: 4.4
        -> 0.7 ms a heat map on bottle 10%); pixel AUROC moved by 0.0001 on bottle 10%, 1% and 224 px
        (benchmarks/results/heat_map_source.md). None as for `image_score`."""
        prior = self._prior_rows
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if prior is None or not self.recheck or len(q) != len(prior):
            return None
        opened = self._open_by_prior(q, prior, self._defect_above)
        bound, floor, top, extra = opened.bound, opened.floor, opened.top, 0
        if len(opened.over) > self.PRIOR_OPEN_SHARE * len(q):   # a part unlike the golden ones
            dist = np.minimum(self.approximate(q), bound)
        else:
            rest = np.setdiff1d(opened.over, opened.walked)
            if len(rest):
                opened.walk(rest)
            over = np.flatnonzero(bound > floor)
            if self.FLOOR_AFTER_WALK and len(over) > self.FLOOR_MORE_OVER:
                # Walked, most bounds lie close to their exact distances, so the highest is the score's patch or
                # near it: its exact distance (few candidates within so close a bound) raises the floor past most
                # of the others, which the tightening would otherwise search again from the top (FLOOR_AFTER_WALK).
                j = int(over[np.argmax(bound[over])])
                measured = opened.exact_at(j, search_first=False)
                bound[j], extra = min(bound[j], measured), 1
                if measured > floor:
                    top, floor = j, measured
            dist = self._tighten(q, bound, above=floor, limit=self.PRIOR_TIGHTEN)
        dist, measured = exact_image_recheck(self.exact, q, dist, slack=self.bound_slack, known=(top, floor))
        self.rechecked_last = measured + 1 + extra   # and the floor's patch (and the one after the walks)
        return dist

    def prior_open_share(self, queries: np.ndarray, prior: np.ndarray) -> float:
        """Share of a frame's patches `image_score` would still walk with this prior (over PRIOR_OPEN_SHARE: it
        walks every patch instead): how well a prior fits a part (edge_runtime.position_prior.build)."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        prior = self._checked_prior(prior)
        if len(prior) != len(q):
            raise ValueError(f"position prior: {len(prior)} positions for {len(q)} patches")
        return len(self._open_by_prior(q, distinct_rows(prior)).over) / len(q)

    def _open_by_prior(self, q: np.ndarray, prior: np.ndarray, defect_above: float | None = None) -> "_Opened":
        """Bounds from the prior's rows, the highest walked from them, the exact distance of the highest of those
        (the floor), and the patches whose bound still lies above it. With `defect_above`, a part whose highest
        bound exceeds it after PRIOR_FIRST walks gets its floor first (see PRIOR_FIRST)."""
        self._faiss.omp_set_num_threads(self.threads)
        d2 = self.candidate_distances(q, prior)
        bound = np.sqrt(np.maximum(d2.min(axis=1), 0.0)).astype(np.float32)

        def walk(rows: np.ndarray) -> None:   # bounds of these patches from a walk that starts at their nearest rows
            sub = d2[rows]
            order = np.argsort(sub, axis=1, kind="stable")[:, :self.PRIOR_SEEDS]
            seeds, seed_d2 = np.take_along_axis(prior[rows], order, 1), np.take_along_axis(sub, order, 1)
            pad = seeds < 0                   # fewer distinct rows than seeds: the position's first row instead
            if pad.any():
                seeds, seed_d2 = np.where(pad, prior[rows, :1], seeds), np.where(pad, sub[:, :1], seed_d2)
            found_d2 = self._walk_level0(q[rows], seeds, seed_d2, self.params.ef_seeded)[1]
            bound[rows] = np.minimum(bound[rows], np.sqrt(np.maximum(found_d2, 0.0)))

        def exact_at(i: int, search_first: bool = True) -> float:   # patch i's exact distance, pruned by its bound
            if search_first and self.FLOOR_EF and defect_above is not None and bound[i] > defect_above:
                # Likely a defect: a walk from good parts' rows often stops 5-40% above its nearest, which leaves
                # most of the bank to the exact search (a pass over all of it); one search from the top finds the
                # nearest (bottle 10% defects: 1.00x in 58 of 63) and the exact search then reads a few hundred rows.
                params = self._faiss.SearchParametersHNSW()
                params.efSearch = self.FLOOR_EF
                found_d2, found = self.graph.search(q[i:i + 1], 1, params=params)
                if found[0, 0] >= 0:
                    bound[i] = min(bound[i], np.sqrt(max(float(found_d2[0, 0]), 0.0)))
            with single_threaded_blas():
                limit = np.array([float(bound[i]) * (1.0 + self.bound_slack)])   # float64, like the bound it widens
                return float(self.exact.nearest_within(q[i:i + 1], limit)[0][0])

        share = max(self.PRIOR_TOP_MIN, int(len(q) * self.PRIOR_TOP_SHARE))
        order = np.argsort(-bound, kind="stable")
        first = share
        if defect_above is not None and bound[order[0]] > defect_above:
            first = min(self.PRIOR_FIRST, share)
        walk(order[:first])
        i = int(np.argmax(bound))
        floor = None
        if first < share:
            if bound[i] > defect_above:       # still over: measure it now, before walking any more
                floor = exact_at(i)
                if np.count_nonzero(bound > floor) <= share:
                    return _Opened(bound, walk, exact_at, order[:first], i, floor, np.flatnonzero(bound > floor))
            walk(order[first:share])          # not a clear defect after all: the top share, as for any part
            j = int(np.argmax(bound))
            if floor is None or (j != i and bound[j] > floor):
                measured = exact_at(j)
                if floor is None or measured > floor:
                    i, floor = j, measured
        else:
            floor = exact_at(i)
        bound[i] = min(bound[i], floor)       # known exactly: never walked again
        over = np.flatnonzero(bound > floor)
        for _ in range(self.FLOOR_MORE):
            if len(over) <= self.FLOOR_MORE_OVER:
                break
            # Many patches over the floor: the score's patch is often the next-highest bound, not the highest
            # (good bottle parts: the second in 3 of the 5 slowest). Its exact search finds the bank's prefix in
            # the cache the first one left: about as much as 9 walks, and it raises the floor past most of them.
            j = int(over[np.argmax(bound[over])])
            measured = exact_at(j)
            bound[j] = min(bound[j], measured)
            if measured > floor:
                i, floor = j, measured
            over = np.flatnonzero(bound > floor)
        return _Opened(bound, walk, exact_at, order[:share], i, floor, over)

    def labels(self, queries: np.ndarray) -> np.ndarray:
        """Bank row of each query's approximate nearest neighbour."""
        return self._search(queries)[0]

    def _search(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(bank row, faiss's squared distance to it) of each query's approximate nearest neighbour; a query for
        which faiss found nothing gets row 0 at distance inf (the re-check then measures it in full)."""
        self._faiss.omp_set_num_threads(self.threads)   # process-wide in faiss: another index may have changed it
        q = np.ascontiguousarray(queries, dtype=np.float32)
        plan = self._plan(len(q))
        if plan is None:
            d2, rows = self.graph.search(q, 1)
            return np.maximum(rows[:, 0], 0).astype(np.int64), np.where(rows[:, 0] < 0, np.inf, d2[:, 0])
        out = np.empty(len(q), dtype=np.int64)
        out_d2 = np.empty(len(q), dtype=np.float32)
        walked_d2, walked = self.graph.search(np.ascontiguousarray(q[plan.walked]), 1)
        walked, walked_d2 = walked[:, 0], walked_d2[:, 0]
        # -1 (nothing found: never for a connected graph) would be read as a row by the seed distances below;
        # any real row is a valid seed.
        walked_d2[walked < 0] = np.inf
        walked[walked < 0] = 0
        out[plan.walked] = walked
        out_d2[plan.walked] = walked_d2
        seeds = np.ascontiguousarray(walked[plan.seeds])                      # (m, 4) bank rows, int64
        rows, d2 = self._walk_level0(q[plan.seeded], seeds, None, self.params.ef_seeded)
        out[plan.seeded], out_d2[plan.seeded] = rows, d2
        return out, out_d2

    def _walk_level0(self, queries: np.ndarray, seeds: np.ndarray, seed_d2: np.ndarray | None,
                     ef: int) -> tuple[np.ndarray, np.ndarray]:
        """(bank row, squared distance) of each query's neighbour found by a bottom-level walk of the graph
        from its own seed rows (m, k); a query for which faiss found nothing gets row 0 at distance inf."""
        faiss = self._faiss
        rest = np.ascontiguousarray(queries, dtype=np.float32)
        seeds = np.ascontiguousarray(seeds, dtype=np.int64)
        m, k = seeds.shape
        if seed_d2 is None:
            # The seeds enter the search with their true distances (faiss takes them as found results).
            seed_d2 = np.empty((m, k), dtype=np.float32)
            self._flat.compute_distance_subset(m, faiss.swig_ptr(rest), k, faiss.swig_ptr(seed_d2),
                                               faiss.swig_ptr(seeds))
        seed_d2 = np.ascontiguousarray(seed_d2, dtype=np.float32)
        seeds32 = seeds.astype(np.int32)
        found_d = np.empty((m, 1), dtype=np.float32)
        found = np.empty((m, 1), dtype=np.int64)
        # Per call, not on the index: several inspection workers may search the same graph at once.
        params = faiss.SearchParametersHNSW()
        params.efSearch = max(ef, 1)
        # search_type 2: one search per patch with all its seeds in the queue.
        self.graph.search_level_0(m, faiss.swig_ptr(rest), 1, faiss.swig_ptr(seeds32), faiss.swig_ptr(seed_d2),
                                  faiss.swig_ptr(found_d), faiss.swig_ptr(found), k, 2, params)
        return np.maximum(found[:, 0], 0), np.where(found[:, 0] < 0, np.inf, found_d[:, 0])

    def approximate(self, queries: np.ndarray) -> np.ndarray:
        # faiss's own distances to the rows it found (not recomputed: 0.19 ms of a 2.8 ms search on bottle);
        # the re-check widens them by bound_slack, so the image score stays the exact one.
        q = np.ascontiguousarray(queries, dtype=np.float32)
        dist = np.sqrt(np.maximum(self._search(q)[1], 0.0)).astype(np.float32)
        return self._tighten(q, dist) if self.recheck and len(dist) else dist

    def _tighten(self, queries: np.ndarray, dist: np.ndarray, above: float | None = None,
                 limit: int | None = None) -> np.ndarray:
        """`dist` with the candidates for the maximum re-searched from the top at REFINE_EF (each keeps the nearer
        of its two rows: still a real bank vector's distance, so still an upper bound). The candidates: bounds
        within REFINE_SHARE of the largest, or every bound over `above` (a known lower bound of the maximum);
        at most `limit` (REFINE_MAX) of them."""
        if above is None:
            top = np.flatnonzero(dist >= dist.max() * np.float32(1.0 - self.REFINE_SHARE))
        else:
            top = np.flatnonzero(dist > above)
        limit = self.REFINE_MAX if limit is None else limit
        if len(top) > limit:   # the highest bounds first: they are the ones the re-check would measure
            top = top[np.argsort(-dist[top], kind="stable")[:limit]]
        if not len(top):
            return dist
        params = self._faiss.SearchParametersHNSW()
        params.efSearch = max(self.REFINE_EF, self.params.ef_search)
        d2, rows = self.graph.search(np.ascontiguousarray(queries[top]), 1, params=params)
        found = rows[:, 0] >= 0
        d = np.sqrt(np.maximum(d2[found, 0], 0.0))
        dist[top[found]] = np.minimum(dist[top[found]], d)
        return dist


def locality_order(graph: HnswGraph, first: np.ndarray) -> np.ndarray:
    """A row order (order[new] = old row) that keeps together what one search reads together: the distinct rows
    of `first` (-1 ignored) in order of first appearance, then every other row in breadth-first order of the
    level-0 links from them (a row's neighbours in list order, rows in the order they were reached), then the
    rows no link reaches, in id order."""
    n = len(graph.levels)
    first = np.asarray(first, dtype=np.int64).ravel()
    first = first[(first >= 0) & (first < n)]
    _, at = np.unique(first, return_index=True)
    frontier = first[np.sort(at)]
    seen = np.zeros(n, dtype=bool)
    seen[frontier] = True
    start = graph.offsets[:-1].astype(np.int64)
    slots = np.arange(graph.max_m0)
    parts = [frontier]
    while len(frontier):
        links = graph.neighbors[(start[frontier][:, None] + slots).ravel()].astype(np.int64)
        links = links[links >= 0]
        links = links[~seen[links]]
        _, at = np.unique(links, return_index=True)
        frontier = links[np.sort(at)]
        seen[frontier] = True
        parts.append(frontier)
    parts.append(np.flatnonzero(~seen))
    return np.concatenate(parts)


def permute_graph(graph: HnswGraph, order: np.ndarray) -> HnswGraph:
    """The same graph with its rows renumbered: new row i is old row order[i] (its vector, its levels and its
    links, each link renumbered too)."""
    n = len(order)
    new_of = np.empty(n, dtype=np.int64)
    new_of[order] = np.arange(n)
    old_start = graph.offsets.astype(np.int64)
    size = np.diff(old_start)[order]
    offsets = np.zeros(n + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(size)
    # Each new slot's old slot: the node's old start plus the slot's place in its block.
    slot = np.repeat(old_start[:-1][order] - offsets[:-1], size) + np.arange(offsets[-1])
    links = graph.neighbors[slot].astype(np.int64)
    neighbors = np.where(links >= 0, new_of[np.maximum(links, 0)], -1).astype(np.int32)
    return HnswGraph(np.ascontiguousarray(graph.vectors[order]), np.ascontiguousarray(graph.levels[order]),
                     offsets.astype(np.uint64), neighbors, int(new_of[graph.entry]), graph.max_level, graph.m,
                     graph.max_m0)


def distinct_rows(rows: np.ndarray) -> np.ndarray:
    """`rows` (positions, k) with each position's repeated rows dropped: its distinct rows in ascending order,
    then -1 (for which faiss's compute_distance_subset gives inf without reading the bank), as wide as the
    position with the most. Neighbouring positions and golden frames often found the same row (bottle 10%: 23.4
    distinct of 36), and each repeat was a distance computed again: candidate distances 0.29 -> 0.21 ms."""
    s = np.sort(np.asarray(rows, dtype=np.int64), axis=1)
    repeat = np.zeros(s.shape, dtype=bool)
    repeat[:, 1:] = s[:, 1:] == s[:, :-1]
    s = np.sort(np.where(repeat, np.iinfo(np.int64).max, s), axis=1)   # repeats to the end, in order
    width = int(s.shape[1] - repeat.sum(axis=1).min()) if len(s) else s.shape[1]
    s = s[:, :width]
    return np.ascontiguousarray(np.where(s == np.iinfo(np.int64).max, -1, s))


@dataclass(frozen=True)
class _Opened:
    """What `FaissHnswSearch._open_by_prior` leaves: per-patch bounds (updated in place by `walk`), the exact
    search of one patch, the patches walked, the patch whose exact distance is `floor`, and the patches whose bound
    lies above the floor."""

    bound: np.ndarray
    walk: Callable[[np.ndarray], None]
    exact_at: Callable[..., float]      # (patch, search_first=True) -> its exact distance
    walked: np.ndarray
    top: int
    floor: float
    over: np.ndarray


@dataclass(frozen=True)
class SeedPlan:
    """Which patches walk the graph from the top and where the others start (`seed_plan`)."""

    walked: np.ndarray    # (w,) query rows searched from the top
    seeded: np.ndarray    # (m,) the other query rows
    seeds: np.ndarray     # (m, 4) for each seeded row: positions IN `walked` of the walked patches around it


def seed_plan(grid: tuple[int, int], n_queries: int, step: int) -> SeedPlan | None:
    """The seeded walk's layout for queries that are whole tiles of grid = (rows, cols) patches, row-major.

    Walked rows and columns: every `step`-th one plus the last, so that every other patch lies inside a cell
    of four walked patches (its seeds: the cell's corners). None (every patch walks from the top) when the
    queries are not whole tiles or a tile is too small for the walked patches to be a minority."""
    rows, cols = grid
    per_tile = rows * cols
    if step < 2 or per_tile < 1 or n_queries % per_tile or min(rows, cols) < 2 * step:
        return None
    tiles = n_queries // per_tile

    def lines(n: int) -> np.ndarray:
        return np.union1d(np.arange(0, n, step), [n - 1])

    wr, wc = lines(rows), lines(cols)
    r, c = np.divmod(np.arange(per_tile), cols)
    walked_mask = np.isin(r, wr) & np.isin(c, wc)
    walked, seeded = np.flatnonzero(walked_mask), np.flatnonzero(~walked_mask)
    pos = np.full(per_tile, -1, dtype=np.int64)
    pos[walked] = np.arange(len(walked))
    # The walked lines on either side of each seeded patch (equal when it lies on a walked line).
    r0 = wr[np.searchsorted(wr, r[seeded], side="right") - 1]
    r1 = wr[np.searchsorted(wr, r[seeded], side="left")]
    c0 = wc[np.searchsorted(wc, c[seeded], side="right") - 1]
    c1 = wc[np.searchsorted(wc, c[seeded], side="left")]
    seeds = np.stack([pos[r0 * cols + c0], pos[r0 * cols + c1], pos[r1 * cols + c0], pos[r1 * cols + c1]], 1)
    tile = np.arange(tiles)[:, None]
    return SeedPlan(walked=(tile * per_tile + walked).ravel(), seeded=(tile * per_tile + seeded).ravel(),
                    seeds=(tile[:, :, None] * len(walked) + seeds[None]).reshape(-1, 4))


def write_hnsw_graph(graph: HnswGraph, ef_construction: int) -> bytes:
    """The graph in hnswlib's saved-index format (labels = rows), so that any reader of the bundle (ours, hnswlib,
    `check_index_file`) takes it as the exporter's own. The inverse of `read_hnsw_graph`."""
    n, dim = graph.vectors.shape
    m, max_m0 = graph.m, graph.max_m0
    links0_bytes = 4 + 4 * max_m0
    per = links0_bytes + 4 * dim + 8
    head = _HEADER.pack(0, n, n, per, links0_bytes + 4 * dim, links0_bytes, graph.max_level, graph.entry,
                        m, max_m0, m, 1.0 / np.log(m), ef_construction)
    start = graph.offsets[:-1].astype(np.int64)
    slots0 = graph.neighbors[(start[:, None] + np.arange(max_m0)[None, :])]          # (n, max_m0), -1 = empty
    level0 = np.zeros((n, per), dtype=np.uint8)
    count0 = (slots0 >= 0).sum(1).astype("<u4")
    # Valid links first, in their order (faiss ends a list at its first -1; hnswlib reads `count` entries).
    packed0 = np.where(np.arange(max_m0)[None, :] < count0[:, None],
                       np.take_along_axis(slots0, np.argsort(slots0 < 0, axis=1, kind="stable"), 1), 0)
    level0[:, :4] = count0[:, None].view(np.uint8)
    level0[:, 4:links0_bytes] = packed0.astype("<i4").view(np.uint8)
    level0[:, links0_bytes:links0_bytes + 4 * dim] = np.ascontiguousarray(graph.vectors, dtype="<f4").view(np.uint8)
    level0[:, links0_bytes + 4 * dim:] = np.arange(n, dtype="<u8")[:, None].view(np.uint8)
    parts = [head, level0.tobytes()]
    block = 4 + 4 * m
    for i in range(n):
        upper = int(graph.levels[i]) - 1
        parts.append(struct.pack("<I", upper * block))
        for lev in range(1, upper + 1):
            s = int(start[i]) + max_m0 + (lev - 1) * m
            links = graph.neighbors[s:s + m]
            links = links[links >= 0]
            parts.append(struct.pack("<I", len(links)) + links.astype("<u4").tobytes() + b"\0" * (4 * (m - len(links))))
    return b"".join(parts)
