"""The seeded walk (knn: hnsw): a few patches walk the graph from the top, the rest start next to the answer."""
from __future__ import annotations

import threading

import numpy as np
import pytest
from extras import require

from edge_runtime.hnsw_graph import FaissHnswSearch, read_hnsw_graph, seed_plan
from edge_runtime.nn_search import ExactSearch, HnswParams, build_hnsw


@pytest.mark.parametrize("grid,tiles,step", [((32, 32), 1, 4), ((34, 30), 1, 4), ((9, 13), 3, 2), ((30, 34), 2, 3)])
def test_every_patch_is_walked_or_seeded_from_the_cell_around_it(grid, tiles, step):
    rows, cols = grid
    plan = seed_plan(grid, tiles * rows * cols, step)
    both = np.concatenate([plan.walked, plan.seeded])
    assert np.array_equal(np.sort(both), np.arange(tiles * rows * cols))   # each patch exactly once
    tile_w, rest_w = np.divmod(plan.walked, rows * cols)
    r_w, c_w = np.divmod(rest_w, cols)
    assert set(r_w) >= {0, rows - 1} and set(c_w) >= {0, cols - 1}       # the borders are walked
    tile_s, rest_s = np.divmod(plan.seeded, rows * cols)
    r_s, c_s = np.divmod(rest_s, cols)
    for j in range(4):
        seed = plan.seeds[:, j]
        assert np.all(tile_w[seed] == tile_s)                              # seeds from the same tile
        assert np.all(np.abs(r_w[seed] - r_s) <= step) and np.all(np.abs(c_w[seed] - c_s) <= step)
    # The four corners bracket the patch: its cell, not merely nearby walked patches.
    assert np.all(r_w[plan.seeds[:, 0]] <= r_s) and np.all(r_w[plan.seeds[:, 3]] >= r_s)
    assert np.all(c_w[plan.seeds[:, 0]] <= c_s) and np.all(c_w[plan.seeds[:, 3]] >= c_s)
    assert len(plan.walked) < len(plan.seeded)


@pytest.mark.parametrize("grid,n,step", [((32, 32), 1000, 4), ((5, 40), 200, 4), ((32, 32), 1024, 0),
                                         ((32, 32), 1024, 1)])
def test_no_plan_where_the_queries_are_not_whole_tiles_or_a_tile_is_too_small(grid, n, step):
    assert seed_plan(grid, n, step) is None


def smooth_part(rng, rows, cols, d, scale=1.0):
    """Patch features of a 'part': a smooth field over the grid (neighbouring patches are alike), as a CNN's are."""
    r, c = np.mgrid[0:rows, 0:cols] / 6.0
    freq = rng.normal(size=(2, d))
    phase = rng.uniform(0, 2 * np.pi, size=d)
    field = np.sin(r[..., None] * freq[0] + c[..., None] * freq[1] + phase) * scale
    return field.reshape(rows * cols, d).astype(np.float32)


@pytest.fixture(scope="module")
def graph_and_parts(tmp_path_factory):
    require("hnswlib", "hnswlib")
    rng = np.random.default_rng(3)
    rows, cols, d = 24, 20, 24
    base = smooth_part(rng, rows, cols, d)
    # The bank: many good parts, each the base field with its own small deformation and noise.
    bank = np.concatenate([base + 0.15 * smooth_part(rng, rows, cols, d) + rng.normal(scale=0.05, size=base.shape)
                           for _ in range(30)]).astype(np.float32)
    index = build_hnsw(bank, HnswParams(M=8, ef_construction=64), threads=1)   # one thread: the same graph every run
    path = tmp_path_factory.mktemp("graph") / "i.hnsw"
    index.save_index(str(path))
    graph = read_hnsw_graph(path.read_bytes(), d)
    parts = [(base + 0.15 * smooth_part(rng, rows, cols, d) + rng.normal(scale=0.05, size=base.shape)).astype(np.float32)
             for _ in range(2)]
    return graph, bank, np.concatenate(parts), (rows, cols)     # two tiles of one frame


# Two FP32 exact computations of one distance (the re-check and ExactSearch) agree to float32 rounding, whose size
# depends on the kernels: within 1e-6 on x86, 1.05e-6 measured on aarch64 (NEON). An approximate score is off by
# percent, so 1e-5 still tells exact from approximate.
EXACT = 1e-5


def test_seeded_walk_finds_near_exact_neighbours_and_keeps_the_image_score_exact(graph_and_parts):
    graph, bank, queries, grid = graph_and_parts
    truth, _ = ExactSearch(bank).nearest(queries)
    seeded = FaissHnswSearch(graph, HnswParams(M=8, ef_search=8, seed_step=4, ef_seeded=2), threads=2)
    seeded.set_grid(*grid)
    assert seed_plan(grid, len(queries), 4) is not None
    labels = seeded.labels(queries)
    assert labels.min() >= 0 and labels.max() < len(bank)
    approx = seeded.approximate(queries)
    assert np.all(approx >= truth - 1e-4)                             # real bank vectors: upper bounds
    assert np.mean(approx / truth - 1) < 0.05                         # and close: the seeds start next to the answer
    assert seeded.distances(queries).max() == pytest.approx(truth.max(), rel=EXACT)   # re-checked image score


def test_tightening_before_the_recheck_only_lowers_bounds_and_spares_it_work(graph_and_parts, monkeypatch):
    """A 'defect' (patches far from the bank): the candidates for the maximum are re-walked from the top; their
    bounds only fall (still real bank vectors' distances), the image score stays exact, and the exact re-check
    measures no more patches than without the tightening."""
    graph, bank, queries, grid = graph_and_parts
    q = queries.copy()
    q[30:36] += 0.8                                       # six patches of one tile pushed away from every good part
    truth, _ = ExactSearch(bank).nearest(q)
    search = FaissHnswSearch(graph, HnswParams(M=8, ef_search=8, seed_step=4, ef_seeded=2), threads=2)
    search.set_grid(*grid)
    tightened = search.approximate(q)
    scores = search.distances(q)
    measured = search.rechecked_last
    monkeypatch.setattr(FaissHnswSearch, "_tighten", lambda self, queries, dist: dist)
    loose = search.approximate(q)
    assert np.all(tightened <= loose) and np.all(tightened >= truth - 1e-4)
    assert scores.max() == pytest.approx(truth.max(), rel=EXACT)
    search.distances(q)
    assert measured <= search.rechecked_last


def test_seeds_from_the_wrong_patches_would_be_far_worse(graph_and_parts, monkeypatch):
    """The test above can fail: the same search seeded from unrelated walked patches misses by far more."""
    graph, bank, queries, grid = graph_and_parts
    truth, _ = ExactSearch(bank).nearest(queries)
    search = FaissHnswSearch(graph, HnswParams(M=8, ef_search=8, seed_step=4, ef_seeded=2), threads=2)
    search.set_grid(*grid)
    good = np.mean(search.approximate(queries) / truth - 1)
    plan = search._plan(len(queries))
    shuffled = type(plan)(plan.walked, plan.seeded, np.random.default_rng(0).permutation(plan.seeds))
    monkeypatch.setitem(search._plans, (len(queries), 4), shuffled)
    bad = np.mean(search.approximate(queries) / truth - 1)
    assert bad > 10 * good                  # measured: 2.5% vs 170% on this data


def test_workers_sharing_one_graph_get_the_answers_of_one(graph_and_parts):
    """The seeded width is passed per call, never set on the shared index (inference.workers share it)."""
    graph, _, queries, grid = graph_and_parts
    search = FaissHnswSearch(graph, HnswParams(M=8, ef_search=8, seed_step=4, ef_seeded=2), threads=1)
    search.set_grid(*grid)
    alone = search.labels(queries)
    plain = search.graph.hnsw.efSearch
    results, errors = [], []

    def worker():
        try:
            for _ in range(20):
                results.append(search.labels(queries))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all(np.array_equal(r, alone) for r in results)
    assert search.graph.hnsw.efSearch == plain


def test_without_a_grid_or_with_step_0_every_patch_walks_from_the_top(graph_and_parts):
    graph, _, queries, grid = graph_and_parts
    top = FaissHnswSearch(graph, HnswParams(M=8, ef_search=8, seed_step=0), threads=2)
    top.set_grid(*grid)
    no_grid = FaissHnswSearch(graph, HnswParams(M=8, ef_search=8, seed_step=4, ef_seeded=2), threads=2)
    expected = top.graph.search(queries, 1)[1][:, 0]
    assert np.array_equal(top.labels(queries), expected)
    assert np.array_equal(no_grid.labels(queries), expected)


def test_the_self_test_passes_the_bundle_search_and_fails_a_useless_one(small_bundle, monkeypatch):
    from edge_runtime.bundle import Bundle
    from edge_runtime.pipeline import Pipeline
    from edge_runtime.self_test import recall_check

    bundle = Bundle.load(small_bundle)
    pipe = Pipeline(bundle)
    recall, problem = recall_check(bundle, pipe)
    assert problem is None and recall > 0.9
    monkeypatch.setattr(pipe.search, "labels", lambda q: np.zeros(len(q), dtype=np.int64))   # every patch -> row 0
    recall, problem = recall_check(bundle, pipe)
    assert problem is not None and "recall@1" in problem and recall < 0.9


def test_the_recall_check_is_not_fooled_by_another_cpus_rounding(small_bundle, monkeypatch):
    """Golden images are training images: some of their patches ARE bank vectors. Another CPU's float kernels put
    them ~1e-5 from their bank copies (measured with AVX2-only kernels), and the brute force's expanded form rounds
    such a distance to 0; compared across the two kernels they read as misses (bottle: recall 0.93 vs 0.98)."""
    from edge_runtime.bundle import Bundle
    from edge_runtime.pipeline import Pipeline
    from edge_runtime.self_test import recall_check

    bundle = Bundle.load(small_bundle)
    pipe = Pipeline(bundle)
    clean, _ = recall_check(bundle, pipe)
    extract, rng = pipe.extractor, np.random.default_rng(0)

    def other_cpu(tensor):
        f = extract(tensor)
        return f + f * rng.normal(scale=1e-6, size=f.shape).astype(np.float32)
    monkeypatch.setattr(pipe, "extractor", other_cpu)
    rounded, problem = recall_check(bundle, pipe)
    assert problem is None and rounded >= clean - 0.005


def test_a_walk_that_finds_nothing_still_seeds_real_rows(graph_and_parts, monkeypatch):
    """faiss answers -1 when a search finds nothing; a -1 seed would be read as a bank row (out of bounds)."""
    graph, bank, queries, grid = graph_and_parts
    search = FaissHnswSearch(graph, HnswParams(M=8, ef_search=8, seed_step=4, ef_seeded=2), threads=1)
    search.set_grid(*grid)
    real = search.graph.search

    def lost(x, k, *args, **kwargs):
        d, i = real(x, k, *args, **kwargs)
        i[::3] = -1
        return d, i
    monkeypatch.setattr(search.graph, "search", lost)
    labels = search.labels(queries)
    assert labels.min() >= 0 and labels.max() < len(bank)
    truth, _ = ExactSearch(bank).nearest(queries)
    assert search.distances(queries).max() == pytest.approx(truth.max(), rel=EXACT)   # still exact
