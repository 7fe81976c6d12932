import numpy as np
import pytest
from extras import require

from edge_runtime.nn_search import ExactSearch, HnswParams, HnswSearch, build_hnsw, exact_image_recheck


def bank_and_queries(seed=0, n=4000, d=24, q=500):
    rng = np.random.default_rng(seed)
    bank = rng.normal(size=(n, d)).astype(np.float32)
    queries = rng.normal(size=(q, d)).astype(np.float32) * 1.3
    return bank, queries


def test_exact_search_matches_brute_force_differences():
    bank, queries = bank_and_queries()
    d, idx = ExactSearch(bank, chunk=1000).nearest(queries)
    brute = np.sqrt(((queries[:, None, :] - bank[None]) ** 2).sum(-1))
    assert np.allclose(d, brute.min(1), rtol=1e-4, atol=1e-4)
    assert np.array_equal(idx, brute.argmin(1))


def test_hnsw_recheck_makes_the_image_score_exact_even_with_a_poor_index():
    require("hnswlib", "hnswlib")
    bank, queries = bank_and_queries(1)
    # A deliberately weak graph (M=4, ef=2) so that approximate distances are often too large.
    params = HnswParams(M=4, ef_construction=10, ef_search=2)
    search = HnswSearch(build_hnsw(bank, params), params)
    exact = ExactSearch(bank).distances(queries)
    approx = search.approximate(queries)
    assert np.all(approx >= exact - 1e-4)          # an approximate neighbour is an upper bound
    assert approx.max() > exact.max() + 1e-3 or np.mean(approx > exact + 1e-4) > 0  # the index really is approximate
    rechecked = search.distances(queries)
    assert abs(rechecked.max() - exact.max()) < 1e-4
    assert 0 < search.rechecked_last < len(queries)


def test_hnsw_ef_is_set_on_every_load(tmp_path):
    require("hnswlib", "hnswlib")
    bank, queries = bank_and_queries(2)
    params = HnswParams(ef_search=48)
    path = tmp_path / "i.hnsw"
    build_hnsw(bank, params).save_index(str(path))
    loaded = HnswSearch.load(path, bank.shape[1], params)
    assert loaded.index.ef == 48
    assert len(loaded) == len(bank) and np.allclose(loaded.exact.bank, bank)


def test_brute_force_search_keeps_its_digits_for_a_bank_far_from_the_origin():
    """|q|^2 + |b|^2 - 2 q.b for rows 1e3 out and 1 apart lost every digit that tells them apart (distance 0.0
    for 0.665, the wrong row); around the bank's mean the expanded form is as precise as for any bank."""
    rng = np.random.default_rng(0)
    bank = (1e3 + rng.normal(size=(3000, 64))).astype(np.float32)
    queries = (1e3 + rng.normal(size=(50, 64))).astype(np.float32)
    ref = np.sqrt(((queries[:, None, :].astype(np.float64) - bank[None].astype(np.float64)) ** 2).sum(-1))
    d, i = ExactSearch(bank, chunk=1000).nearest(queries)
    assert np.array_equal(i, ref.argmin(1))
    assert np.allclose(d, ref.min(1), rtol=1e-5, atol=1e-4)



def test_brute_force_distances_never_fall_below_the_nearest_row_with_one_row_far_out():
    """Probe 110: one bank row 1e10 out moved the bank's mean so far that every expanded-form distance cancelled
    to 0.0 (knn: exact scored every part, defects too, 0: OK). The distance is the found row's, measured as a
    difference: never below the nearest."""
    bank, queries = bank_and_queries(3, n=2000, q=50)
    bank[7] = 1e10
    ref = np.sqrt(((queries[:, None, :].astype(np.float64) - bank[None].astype(np.float64)) ** 2).sum(-1)).min(1)
    d = ExactSearch(bank, chunk=1000).distances(queries)
    assert np.all(d >= ref * (1 - 1e-5))

def test_pruned_search_is_the_brute_force_answer_for_any_valid_bound(anisotropic):
    bank, queries = anisotropic()
    search = ExactSearch(bank)
    brute = np.sqrt(((queries[:, None, :] - bank[None]) ** 2).sum(-1))
    true_d, true_i = brute.min(1), brute.argmin(1)
    rng = np.random.default_rng(0)
    for upper in (brute[np.arange(len(queries)), rng.integers(0, len(bank), len(queries))],  # a random vector's
                  true_d,                                                                   # the tightest bound
                  np.full(len(queries), np.inf)):                                           # no bound at all
        d, i = search.nearest_within(queries, upper)
        assert np.allclose(d, true_d, rtol=1e-5, atol=1e-5)
        assert np.array_equal(i, true_i)


def test_pruned_search_reads_only_part_of_a_structured_bank(anisotropic):
    bank, queries = anisotropic()
    search = ExactSearch(bank)
    true_d, _ = search.nearest(queries)
    search.nearest_within(queries, true_d * 1.01)
    assert search.candidates_last < 0.5 * len(bank) * len(queries)


def test_pruned_search_falls_back_to_the_whole_bank_when_the_bound_is_wrong(anisotropic):
    bank, queries = anisotropic(4)
    search = ExactSearch(bank)
    true_d, true_i = search.nearest(queries)
    d, i = search.nearest_within(queries, np.zeros(len(queries)))   # not a bound: nothing passes the filter
    assert np.array_equal(i, true_i) and np.allclose(d, true_d, rtol=1e-5, atol=1e-5)


@pytest.mark.exporter  # builds its graph with the onnx package (the `onnx-search` extra)
def test_onnx_graph_search_matches_exact_search_across_chunks(monkeypatch):
    from edge_runtime.nn_search import OnnxExactSearch

    bank, queries = bank_and_queries(5, n=2500)
    monkeypatch.setattr(OnnxExactSearch, "CHUNK", 1000)   # three chunks, the last one short
    d, idx = OnnxExactSearch(bank, threads=1).nearest(queries)
    want_d, want_idx = ExactSearch(bank).nearest(queries)
    assert np.allclose(d, want_d, rtol=1e-4, atol=1e-4)
    assert np.mean(idx == want_idx) > 0.999   # ties in float32 may pick either of two equal vectors


@pytest.mark.exporter  # the onnx package builds the search graph
def test_pipeline_onnx_search_scores_like_exact_search(small_bundle):
    from edge_runtime.bundle import Bundle
    from edge_runtime.pipeline import Pipeline
    from edge_runtime.self_test import golden_image

    bundle = Bundle.load(small_bundle)
    exact, graph = Pipeline(bundle, knn="exact"), Pipeline(bundle, knn="onnx")
    assert graph.knn == "onnx" and len(graph.search) == len(exact.search)
    for g in exact.variant.golden:
        rgb = golden_image(bundle, g["file"])
        a, b = exact.score_rgb(rgb), graph.score_rgb(rgb)
        assert abs(a.score - b.score) <= 1e-4 * a.score
        # Both compute |q|^2 + |b|^2 - 2 q.b in float32, each within ~8 d units of rounding of |q|^2 + |b|^2
        # (ExactSearch.EXPANDED_ULPS_PER_DIM); near zero (a golden patch that is a bank vector) the square root
        # magnifies that, and how far depends on the CPU's GEMM kernels (AVX2-only kernels: 0.02 apart).
        norms = 2.0 * float(exact.search.bank_sq.max())
        tol = 2 * exact.search.EXPANDED_ULPS_PER_DIM * exact.search.dim * float(np.finfo(np.float32).eps) * norms
        assert np.all(np.abs(a.patch_scores ** 2 - b.patch_scores ** 2) <= 1e-4 * a.patch_scores ** 2 + tol)


@pytest.mark.parametrize("seed", range(6))
def test_recheck_gives_the_exact_image_score_for_any_valid_upper_bounds(seed, anisotropic):
    """Loose, uneven bounds (as a poor index gives): the image score is still the exact maximum, every patch keeps
    a value between its exact distance and its bound, and the patches it measured carry their exact distance."""
    from edge_runtime.nn_search import exact_image_recheck

    bank, queries = anisotropic(seed=seed, q=300)
    search = ExactSearch(bank)
    exact = np.sqrt(((queries[:, None, :] - bank[None]) ** 2).sum(-1)).min(1)
    rng = np.random.default_rng(seed)
    # Some bounds tight, some up to 60% loose; near-ties at the top when seed is even.
    upper = exact * np.where(rng.random(len(exact)) < 0.5, 1.0, 1.0 + 0.6 * rng.random(len(exact)))
    if seed % 2 == 0:
        top = np.argsort(-exact)[:5]
        upper[top] = exact[top].max() * (1.0 + 1e-3 * np.arange(5))
    dist, measured = exact_image_recheck(search, queries, upper.astype(np.float32))
    assert abs(dist.max() - exact.max()) < 1e-4
    assert np.all(dist >= exact - 1e-4) and np.all(dist <= upper + 1e-4)
    assert 1 <= measured < len(queries)
    moved = np.abs(dist - upper.astype(np.float32)) > 1e-6
    assert np.allclose(dist[moved], exact[moved], atol=1e-4)
    # How many patches' prefix bounds one GEMM computes changes nothing but speed (RECHECK_BATCH): the same
    # patches measured, the same values.
    for batch in (1, 3, 8):
        again, n = exact_image_recheck(search, queries, upper.astype(np.float32), batch=batch)
        assert n == measured and np.array_equal(again, dist), batch


def test_recheck_slack_covers_bounds_from_a_kernel_that_rounds_lower():
    """Bounds from another float32 kernel (faiss's) may sit a rounding unit below this kernel's distance to the same
    vector: the patch that is truly the maximum must still be measured. Without slack it is skipped."""
    from edge_runtime.nn_search import exact_image_recheck

    d = 16
    bank = np.zeros((3, d), np.float32)
    bank[1, 0], bank[2, 0] = -50.0, -60.0                       # far rows: the origin is everyone's nearest
    queries = np.zeros((2, d), np.float32)
    queries[0, 1], queries[1, 2] = 10.0, 10.001                 # true image score: patch 1, 10.001
    upper = np.array([10.0, 10.001 * (1 - 2e-4)], np.float32)   # patch 1's bound rounded under patch 0's
    search = ExactSearch(bank)
    wrong, _ = exact_image_recheck(search, queries, upper)      # patch 0 measured first; 1 looks settled
    assert wrong.max() == np.float32(10.0)                      # (the test can fail: this is what slack fixes)
    right, measured = exact_image_recheck(search, queries, upper, slack=3e-4)
    assert right.max() == np.float32(10.001) and measured == 2
    assert right[0] == np.float32(10.0)


def test_nearest_below_is_exact_within_its_limit_and_empty_beyond(anisotropic):
    bank, queries = anisotropic(seed=9, q=20)
    search = ExactSearch(bank)
    brute = np.sqrt(((queries[:, None, :] - bank[None]) ** 2).sum(-1))
    lower2 = search.prefix_lower(queries)
    for i, q in enumerate(queries):
        d_true = brute[i].min()
        d, k = search.nearest_below(q, lower2[i], d_true * 1.05)
        assert abs(d - d_true) < 1e-4 and k == brute[i].argmin()
        d, k = search.nearest_below(q, lower2[i], d_true * 0.9)     # nothing that near: (inf, -1), or farther
        assert k == -1 or d > d_true * 0.9


@pytest.mark.parametrize("seed", range(3))
def test_far_patches_are_screened_by_their_tail_norm_and_still_find_the_nearest(seed, anisotropic, monkeypatch):
    """A defect-like patch leaves many rows under the prefix bound; the norm over the other axes drops those it
    can, never the nearest: the answer is the brute-force one for any valid bound."""
    bank, queries = anisotropic(seed=seed, q=40)
    rng = np.random.default_rng(seed)
    d = bank.shape[1]
    search = ExactSearch(bank, prefix_dims=24)
    plain = ExactSearch(bank, prefix_dims=24)
    monkeypatch.setattr(plain, "TAIL_SCREEN_MIN", len(bank) + 1)   # never screens
    queries[::4] = bank[rng.integers(0, len(bank), 10)]              # exactly on a bank row (distance 0)
    queries[1::4] = bank[rng.integers(0, len(bank), 10)] + rng.normal(size=(10, d)).astype(np.float32) * 0.7
    # Like a good patch along the axes where good patches vary most, far out along the others: the prefix bound
    # keeps most of the bank, the tail's norm almost none of it.
    tail = rng.normal(size=(10, d - 24)).astype(np.float32)
    queries[2::4] = bank[rng.integers(0, len(bank), 10)] + 20.0 * (tail / np.linalg.norm(tail, axis=1, keepdims=True)) @ search._tail_axes.T
    brute = np.sqrt(((queries[:, None, :] - bank[None]) ** 2).sum(-1))
    true_d, true_i = brute.min(1), brute.argmin(1)
    for factor in (1.0, 1.1, 1.5, 3.0):
        for engine in (search, plain):
            d_found, i_found = engine.nearest_within(queries, true_d * factor)
            assert np.array_equal(i_found, true_i) and np.allclose(d_found, true_d, rtol=1e-5, atol=1e-5), factor
    far = queries[2::4]
    search.nearest_within(far, true_d[2::4] * 1.1)
    plain.nearest_within(far, true_d[2::4] * 1.1)
    assert search.candidates_last < 0.3 * plain.candidates_last    # 17-22% of the rows the prefix keeps


def _far_out_bank(rng, d, along_tail, far, delta=1.0):
    """(bank, query, nearest row): a bank whose nearest row to the query lies `far` from the bank's mean (or, with
    `along_tail`, `far` out along its least-varying axes), `delta` from the query, with a decoy 0.04% farther than
    it. Rotated, so every projection rounds."""
    cl = np.zeros((300, d)); cl[:, :48] = rng.normal(size=(300, 48)) * 1e-3      # > TAIL_SCREEN_MIN candidates
    half = rng.choice([-4 * far, 4 * far], size=(150, 48))
    spread = np.zeros((300, d)); spread[:150, :48] = half; spread[150:, :48] = -half   # the prefix's variance
    nearest = np.zeros(d)
    if along_tail:
        u = rng.normal(size=d - 48); u /= np.linalg.norm(u)
        nearest[48:] = far * u
        query = nearest.copy(); query[48:] += delta * u    # apart along the tail only: its norm bound is tight
    else:
        nearest[:48] = rng.normal(size=48); nearest[:48] *= far / np.linalg.norm(nearest[:48])
        query = nearest.copy(); query[0] += delta          # apart along the prefix only: that bound is tight
    decoy = query.copy(); decoy[1] += delta * 1.0004
    rot, _ = np.linalg.qr(rng.normal(size=(d, d)))
    bank = (np.vstack([cl, spread, nearest, decoy]) @ rot).astype(np.float32)
    return bank, (query @ rot).astype(np.float32), 600


@pytest.mark.parametrize("along_tail", [True, False])
@pytest.mark.parametrize("d", [50, 64, 152])
def test_bounds_keep_the_nearest_row_of_a_query_far_from_the_mean(d, along_tail):
    """The pruning's float32 rounding grows with how far the vectors lie from the bank's mean, not with the limit
    (BOUND_SLACK's scale): 1e4 out (along the tail: its two norms, each rounded, differ by 1.0) or 2e3 out (the
    prefix's expanded form), 1.0 from the query, the nearest row was dropped and the decoy returned, also as the
    image score (tail screen: 1-3 of the 6 seeds per d, none without the screen; prefix: 2-3 of 6, before the
    screen too)."""
    for seed in range(6):
        rng = np.random.default_rng(seed)
        bank, query, nearest = _far_out_bank(rng, d, along_tail, 1e4 if along_tail else 2e3)
        diff = bank - query
        d2 = np.einsum("ij,ij->i", diff, diff)
        assert int(np.argmin(d2)) == nearest
        true_d = np.sqrt(d2[nearest])
        search = ExactSearch(bank)
        for factor in (1.0, 1.0 + 1e-4):
            dist, idx = search.nearest_within(query[None], np.array([float(true_d) * factor]))
            assert (idx[0], dist[0]) == (nearest, true_d), (seed, factor)
        assert exact_image_recheck(search, query[None], np.array([true_d]))[0][0] == true_d, seed


@pytest.mark.parametrize("seed", range(4))
def test_dense_path_returns_the_difference_kernels_own_nearest(seed, anisotropic):
    """A defect-like patch (far from every bank vector) leaves most of the bank as candidates: the nearest is then
    found by one expanded-form pass over the bank and measured in the difference kernel. It must be bit for bit
    the answer of the difference kernel over the whole bank, ties and near-ties included."""
    bank, queries = anisotropic(seed=seed, q=12, query_scale=4.0)
    bank = np.concatenate([bank, bank[:50] + np.float32(1e-7), bank[:50]])   # exact and near duplicates
    search = ExactSearch(bank)
    lower2 = search.prefix_lower(queries)
    for i, q in enumerate(queries):
        diff = bank - q
        d2 = np.einsum("ij,ij->i", diff, diff)
        best = float(np.sqrt(d2.min()))
        for limit in (np.inf, best * 3.0):
            search.candidates_last = 0
            d, k = search.nearest_below(q, lower2[i], limit)
            assert search.candidates_last > ExactSearch.DENSE_SHARE * len(bank)   # the dense path ran
            assert d == best and d2[k] == d2.min(), (seed, i, limit)


def test_dense_path_survives_the_expanded_forms_cancellation():
    """Far from the origin |b|^2 - 2 q.b loses the digits that tell near rows apart (float32 ulp of |c|^2 ~ 0.5 here,
    row-to-row differences ~0.1): the expanded pass may only shortlist, the difference kernel must decide."""
    rng = np.random.default_rng(11)
    centre = rng.normal(size=64).astype(np.float32) * 300.0
    bank = centre + rng.normal(size=(3000, 64)).astype(np.float32) * 0.05
    search = ExactSearch(bank)
    for _ in range(20):
        q = (centre + rng.normal(size=64).astype(np.float32) * 0.05).astype(np.float32)
        diff = bank - q
        d2 = np.einsum("ij,ij->i", diff, diff)
        d, k = search.nearest_below(q, search.prefix_lower(q[None])[0], np.inf)
        assert k == int(np.argmin(d2)) and d == float(np.sqrt(d2.min()))


@pytest.mark.parametrize("given", [None, "5"])
def test_faiss_threads_spin_briefly_then_sleep_unless_the_environment_says_otherwise(given):
    """libgomp reads its wait settings once, when faiss is first imported: import_faiss sets them first, and a
    station's own values (systemd Environment=) win."""
    import os
    import subprocess
    import sys

    from edge_runtime.nn_search import FAISS_SPINCOUNT

    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    if given is not None:
        env["GOMP_SPINCOUNT"] = given
    code = ("import os, sys; from edge_runtime.nn_search import import_faiss; "
            "assert 'faiss' not in sys.modules; import_faiss('test'); "
            "print(os.environ['OMP_WAIT_POLICY'], os.environ['GOMP_SPINCOUNT'])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["PASSIVE", given or str(FAISS_SPINCOUNT)]


def test_recheck_scans_the_whole_bank_at_most_once_per_far_patch(monkeypatch):
    """Defect patches far from every bank vector leave most of the bank as candidates: one whole-bank scan gives
    such a patch's exact distance, and the re-check must not scan again for the same patch when that distance
    turns out to be the new maximum (it did: 2 scans per far patch, ~1 ms each on the bottle bank)."""
    from edge_runtime.nn_search import exact_image_recheck

    rng = np.random.default_rng(3)
    # Wider than the prefix (PREFIX_DIMS), so that the prefix bounds of a far patch exclude little of the bank.
    bank = rng.normal(size=(4000, 152)).astype(np.float32)
    queries = rng.normal(size=(50, 152)).astype(np.float32)
    queries[:3] += 40.0                                         # three far patches, a new maximum each in turn
    queries[1] += 1.0
    queries[2] += 2.0
    search = ExactSearch(bank)
    exact = search.nearest(queries)[0]
    upper = exact.copy()
    # Bounds in the reverse order of the exact distances, each still over the one before: every far patch is
    # measured, and each is the new maximum.
    upper[:3] = exact[2] * np.array([1.3, 1.2, 1.01])
    scans = []
    real = ExactSearch._near_minimum
    monkeypatch.setattr(ExactSearch, "_near_minimum", lambda self, q: scans.append(1) or real(self, q))
    dist, measured = exact_image_recheck(search, queries, upper.astype(np.float32))
    assert dist.max() == pytest.approx(exact.max(), rel=1e-6)
    assert measured == 3 and len(scans) == 3                   # one whole-bank scan per far patch
