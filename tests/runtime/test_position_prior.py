"""The position prior (edge_runtime.position_prior): the image score found from the golden parts' bank rows is
exactly the full search's, on parts that sit like the golden ones and on parts that do not."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from extras import require

from edge_runtime import position_prior
from edge_runtime.bundle import Bundle
from edge_runtime.hnsw_graph import (FaissHnswSearch, distinct_rows, locality_order, permute_graph,
                                     read_hnsw_graph, write_hnsw_graph)
from edge_runtime.nn_search import ExactSearch, HnswParams, build_hnsw, exact_image_recheck
from edge_runtime.pipeline import Pipeline
from edge_runtime.preprocess import preprocess
from edge_runtime.records import Frame

ROWS, COLS, DIM = 24, 20, 24
GOLDEN = range(100, 104)   # the golden parts' seeds


def smooth_part(rng, scale=1.0):
    """Patch features of a part in a fixture: a smooth field over the grid, as a CNN's are."""
    r, c = np.mgrid[0:ROWS, 0:COLS] / 6.0
    freq = rng.normal(size=(2, DIM))
    phase = rng.uniform(0, 2 * np.pi, size=DIM)
    return (np.sin(r[..., None] * freq[0] + c[..., None] * freq[1] + phase) * scale).reshape(-1, DIM).astype(np.float32)


@pytest.fixture(scope="module")
def fixture_parts(tmp_path_factory):
    """(graph, bank, a function making one more good part): 30 parts of one product in the bank."""
    require("hnswlib", "hnswlib")
    base = smooth_part(np.random.default_rng(5))
    # Part-to-part noise is larger around one spot (an edge, a thread), as on real parts, whose worst patches sit
    # well above the rest: with the same noise everywhere every patch is nearly the worst one, and whether a
    # golden part fits the others' prior turned on the graph's chance shape (54% open on one machine, 18% here).
    r, c = np.mgrid[0:ROWS, 0:COLS]
    noise = (0.02 + 0.1 * np.exp(-((r - 6) ** 2 + (c - 14) ** 2) / 8.0)).reshape(-1, 1)
    made = iter(range(1000, 10**6))

    def part(seed: int | None = None) -> np.ndarray:
        """One more part (seed: this very part, whichever test asks first)."""
        rng = np.random.default_rng(next(made) if seed is None else seed)
        return (base + 0.05 * smooth_part(rng) + noise * rng.normal(size=base.shape)).astype(np.float32)
    bank = np.concatenate([part(k) for k in range(30)])
    # one thread: hnswlib's parallel insertion order, and so the graph, differs from run to run
    index = build_hnsw(bank, HnswParams(M=8, ef_construction=64), threads=1)
    path = tmp_path_factory.mktemp("graph") / "i.hnsw"
    index.save_index(str(path))
    return read_hnsw_graph(path.read_bytes(), DIM), bank, part


def _search(graph, threads: int = 2) -> FaissHnswSearch:
    search = FaissHnswSearch(graph, HnswParams(M=8, ef_search=8, seed_step=4, ef_seeded=2), threads=threads)
    search.set_grid(ROWS, COLS)
    return search


def _with_prior(graph, part) -> FaissHnswSearch:
    search = _search(graph)
    prior, note = position_prior.build(search, [part(k) for k in GOLDEN], (ROWS, COLS))
    assert prior is not None, note
    search.set_prior(prior)
    return search


def _nearest64(bank: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Each query's distance to its nearest bank vector, as differences summed in float64 (no expanded form)."""
    b64 = bank.astype(np.float64)
    return np.array([np.sqrt(((b64 - x) ** 2).sum(1).min()) for x in q.astype(np.float64)])


def test_candidates_take_each_positions_rows_and_its_neighbours_on_the_same_tile():
    grid = (3, 4)
    # Two golden frames of two tiles: frame f, tile t, patch p found bank row 1000 f + 100 t + p.
    labels = [np.array([1000 * f + 100 * t + p for t in range(2) for p in range(12)]) for f in range(2)]
    same = position_prior.candidates(labels, grid, radius=0)
    assert same.shape == (24, 2)
    assert np.array_equal(same[13], [101, 1101])                   # tile 1, patch 1: its own rows, both frames
    near = position_prior.candidates(labels, grid, radius=1)
    assert near.shape == (24, 18)                                  # 3 x 3 positions x 2 frames
    assert set(near[5]) == {f * 1000 + p for f in (0, 1) for p in (0, 1, 2, 4, 5, 6, 8, 9, 10)}
    assert set(near[12]) == {f * 1000 + 100 + p for f in (0, 1) for p in (0, 1, 4, 5)}   # corner: clamped
    assert all(row // 100 % 10 == 1 for row in near[12:].ravel())  # never a row of the other tile


def test_the_image_score_is_the_full_searchs_for_good_parts_and_defects(fixture_parts, monkeypatch):
    graph, bank, part = fixture_parts
    search = _with_prior(graph, part)
    full = _search(graph)
    walked = []
    real = FaissHnswSearch.approximate
    monkeypatch.setattr(FaissHnswSearch, "approximate", lambda self, q: walked.append(len(q)) or real(self, q))
    rng = np.random.default_rng(0)
    for k in range(12):
        q = part(200 + k)
        if k % 3 == 1:
            q[rng.integers(0, len(q), 6)] += 0.8                   # a few scattered patches far from every part
        elif k % 3 == 2:
            q[50:80] += 0.6                                        # a defect: one patch region pushed away
        walked.clear()
        score = search.image_score(q)
        # Good parts sit like the golden ones and a defect stands out: the prior settles each without walking
        # every patch (the full walk is approximate() on all of them).
        assert walked == []
        exact = ExactSearch(bank).nearest(q)[0]
        assert score == full.distances(q).max()                    # the very same value as the full search
        assert score == pytest.approx(exact.max(), rel=1e-5)
        assert search.rechecked_last >= 1
        # The heat map's per-patch distances: a bank vector's distance each (never under the exact one), the
        # largest the score, none above it; the defect's patches are the hottest.
        dist = search.prior_scores(q)
        assert dist.max() == score and np.all(dist >= _nearest64(bank, q) * (1 - 1e-6))
        if k % 3 == 2:
            assert set(np.argsort(-dist)[:10]) <= set(range(50, 80))


def test_a_part_over_the_decision_threshold_measures_its_worst_patch_first_and_keeps_its_score(fixture_parts,
                                                                                                   monkeypatch):
    graph, bank, part = fixture_parts
    walked = []
    real = FaissHnswSearch._walk_level0
    monkeypatch.setattr(FaissHnswSearch, "_walk_level0",
                        lambda self, q, *a: walked.append(len(q)) or real(self, q, *a))
    full = _search(graph)
    good = part(300)
    defect = part(301)
    defect[200:206] += 0.9                                         # a small defect far from every good patch
    good_score, defect_score = full.distances(good).max(), full.distances(defect).max()
    share = max(FaissHnswSearch.PRIOR_TOP_MIN, int(len(good) * FaissHnswSearch.PRIOR_TOP_SHARE))
    plain = _with_prior(graph, part)
    first = _with_prior(graph, part)
    first.set_prior(first.prior, defect_above=(good_score + defect_score) / 2)   # a threshold between the two
    for q, score in ((good, good_score), (defect, defect_score)):
        walks = {}
        for name, search in (("plain", plain), ("first", first)):
            walked.clear()
            assert search.image_score(q) == score                  # the very same value either way
            walks[name] = walked[0]                                # patches in the first walk from the prior
        if q is defect:
            assert walks == {"plain": share, "first": FaissHnswSearch.PRIOR_FIRST}
        else:
            assert walks == {"plain": share, "first": share}       # under the threshold: as without it
    # A threshold under every patch's bound: every part takes the defect-first way, and its score stays exact.
    first.set_prior(first.prior, defect_above=0.0)
    for q in (good, defect, part(302)):
        assert first.image_score(q) == full.distances(q).max()
    with pytest.raises(ValueError, match="defect_above"):
        first.set_prior(first.prior, defect_above=float("nan"))


def test_a_likely_defects_worst_patch_is_searched_from_the_top_before_its_exact_distance(fixture_parts, monkeypatch):
    """Its exact search is pruned by its bound: a walk from good parts' rows that stopped short leaves more of the
    bank to read. The search from the top hands it the nearest row's distance; the score is the same either way."""
    graph, bank, part = fixture_parts
    full = _search(graph)
    handed = []
    real = ExactSearch.nearest_within
    monkeypatch.setattr(ExactSearch, "nearest_within", lambda self, q, upper: handed.append(
        float(upper[0]) / float(np.sqrt(((self.bank - q[0]) ** 2).sum(1)).min())) or real(self, q, upper))
    ratios, on = {}, FaissHnswSearch.FLOOR_EF
    for floor_ef in (on, 0):
        monkeypatch.setattr(FaissHnswSearch, "FLOOR_EF", floor_ef)
        ratios[floor_ef] = []
        for seed in range(301, 311):
            defect = part(seed)
            defect[200:206] = part(seed + 50)[0:6] + 0.4      # patches like another place's, moved away
            search = _with_prior(graph, part)
            search.set_prior(search.prior, defect_above=float(full.distances(part(seed + 100)).max()))
            handed.clear()
            assert search.image_score(defect) == full.distances(defect).max()
            ratios[floor_ef].append(handed[0])                # the floor's exact search, the first one
    slack = 1.0 + _search(graph).bound_slack                 # the exact search is handed bound * (1 + slack)
    assert max(ratios[on]) < slack * (1 + 1e-6)                # the nearest row's distance, to rounding
    assert max(ratios[0]) > slack * 1.01                       # the walk alone stopped short (up to 1.06 here)


def test_more_exact_patches_raise_the_floor_walk_fewer_patches_and_keep_the_score(fixture_parts, monkeypatch):
    """Many patches over the floor: the next-highest bounds are measured exactly too (FLOOR_MORE). The floor can
    only rise, so no more patches are walked than without; here the score's patch is the third-highest bound, and
    measuring it leaves nothing to walk. The score is the same either way."""
    graph, bank, part = fixture_parts
    search = _with_prior(graph, part)
    full = _search(graph)
    walked = []
    real = FaissHnswSearch._walk_level0
    monkeypatch.setattr(FaissHnswSearch, "_walk_level0",
                        lambda self, q, *a: walked.append(len(q)) or real(self, q, *a))
    # One walked patch before the floor, so the other bounds stay the prior's (bottle's top share leaves the same
    # situation on a few real parts: good/003 and good/013 of the 10% bundle).
    monkeypatch.setattr(FaissHnswSearch, "PRIOR_TOP_SHARE", 0.0)
    monkeypatch.setattr(FaissHnswSearch, "PRIOR_TOP_MIN", 1)
    monkeypatch.setattr(FaissHnswSearch, "FLOOR_MORE_OVER", 0)
    for seed in range(500, 506):
        q = part(seed)
        q[0:2] = part(seed + 1000)[300:302]   # like another place's patches: far from their position's prior rows,
        q[200] += 0.3                          # near the bank; and the score's patch, lower bound than those two
        counts = {}
        for more in (0, 4):
            monkeypatch.setattr(FaissHnswSearch, "FLOOR_MORE", more)
            walked.clear()
            dist = search.prior_scores(q)
            counts[more] = sum(walked)
            assert dist.max() == full.distances(q).max()
            assert np.all(dist >= _nearest64(bank, q) * (1 - 1e-6))
        assert counts[4] == 1 < counts[0]                          # without: most of the part walked


def test_the_highest_bound_after_the_walks_raises_the_floor_and_spares_the_tightening(fixture_parts, monkeypatch):
    """Once the patches over the floor have walked, their bounds lie close to exact and the highest is measured
    exactly (FLOOR_AFTER_WALK): the floor rises to the score's patch, and fewer patches are left for the
    tightening to search again from the top. The score and the per-patch bounds stay valid either way."""
    graph, bank, part = fixture_parts
    search = _with_prior(graph, part)
    full = _search(graph)
    tightened = []
    real = FaissHnswSearch._tighten
    monkeypatch.setattr(FaissHnswSearch, "_tighten", lambda self, q, dist, above=None, limit=None: (
        above is not None and tightened.append(int(np.count_nonzero(dist > above)))) or real(self, q, dist, above,
                                                                                             limit))
    # The floor from the one highest prior bound, no second measure before the walks (as on good/013 of the
    # bottle 10% bundle, where 71 patches were left over a floor 11% under the score).
    monkeypatch.setattr(FaissHnswSearch, "PRIOR_TOP_SHARE", 0.0)
    monkeypatch.setattr(FaissHnswSearch, "PRIOR_TOP_MIN", 1)
    monkeypatch.setattr(FaissHnswSearch, "FLOOR_MORE", 0)
    monkeypatch.setattr(FaissHnswSearch, "FLOOR_MORE_OVER", 2)
    monkeypatch.setattr(FaissHnswSearch, "PRIOR_OPEN_SHARE", 1.0)   # never the full walk instead
    spared = 0
    for seed in range(520, 526):
        q = part(seed)
        q[0:2] = part(seed + 1000)[300:302]   # far from their position's prior rows, near the bank: a low floor
        q[200] += 0.3                          # the score's patch
        over = {}
        for on in (False, True):
            monkeypatch.setattr(FaissHnswSearch, "FLOOR_AFTER_WALK", on)
            tightened.clear()
            dist = search.prior_scores(q)
            assert dist.max() == full.distances(q).max()
            assert np.all(dist >= _nearest64(bank, q) * (1 - 1e-6))
            over[on] = tightened[0]
        assert over[True] <= over[False]       # the floor only rises
        spared += over[False] - over[True]
        assert over[False] > FaissHnswSearch.FLOOR_MORE_OVER   # the step's condition held on these parts
    assert spared > 0


def test_the_bank_laid_out_around_the_prior_gives_every_part_the_same_scores(fixture_parts):
    """FaissHnswSearch.renumber: the prior's rows first, the graph around them next; the same vectors and links
    renumbered, so every part's per-patch distances (heat map) and image score are bit for bit the file order's."""
    graph, _, part = fixture_parts
    plain = _with_prior(graph, part)
    laid = _search(graph)
    prior, _ = position_prior.build(laid, [part(k) for k in GOLDEN], (ROWS, COLS))
    new_of = laid.renumber(prior)
    laid.set_prior(new_of[prior])
    n = len(graph.vectors)
    assert np.array_equal(np.sort(new_of), np.arange(n)) and np.array_equal(new_of[laid.file_rows], np.arange(n))
    assert np.array_equal(laid.exact.bank, graph.vectors[laid.file_rows])
    distinct = np.unique(prior)
    assert np.array_equal(np.sort(new_of[distinct]), np.arange(len(distinct)))   # the prior's rows come first
    assert 0 < len(distinct) < n
    rng = np.random.default_rng(3)
    for k in range(9):
        q = part(300 + k)
        if k % 3 == 1:
            q[rng.integers(0, len(q), 6)] += 0.8
        elif k % 3 == 2:
            q[50:80] += 0.6
        np.testing.assert_array_equal(laid.prior_scores(q), plain.prior_scores(q))
        assert laid.image_score(q) == plain.image_score(q)
        assert np.array_equal(laid.labels(q), new_of[plain.labels(q)])
        np.testing.assert_array_equal(laid.approximate(q), plain.approximate(q))   # the full walk too
    with pytest.raises(ValueError, match="outside the bank"):
        laid.renumber(np.array([[0, -1]]))                          # -1 would map to the last row
    # Written out and read back (an adapted bundle's index), the laid-out graph is the same graph.
    again = _search(read_hnsw_graph(write_hnsw_graph(laid.graph_arrays(), 64), DIM))
    again.set_prior(laid.prior)
    q = part(400)
    np.testing.assert_array_equal(again.prior_scores(q), laid.prior_scores(q))


def test_permuting_a_graph_and_back_gives_it_unchanged(fixture_parts):
    graph = fixture_parts[0]
    order = np.random.default_rng(0).permutation(len(graph.vectors))
    there = permute_graph(graph, order)
    assert np.array_equal(there.vectors, graph.vectors[order]) and there.entry == int(np.flatnonzero(order == graph.entry)[0])
    back = permute_graph(there, np.argsort(order))
    for field in ("vectors", "levels", "offsets", "neighbors"):
        assert np.array_equal(getattr(back, field), getattr(graph, field)), field
    assert back.entry == graph.entry
    # the locality order: a permutation, its first rows first, each later row linked from an earlier one
    first = np.array([[7, 3, -1], [3, 11, 7]])
    lo = locality_order(graph, first)
    assert np.array_equal(np.sort(lo), np.arange(len(lo))) and list(lo[:3]) == [7, 3, 11]
    pos = np.argsort(lo)
    start = graph.offsets[:-1].astype(np.int64)
    earliest = np.full(len(lo), len(lo))
    for row in range(len(lo)):
        links = graph.neighbors[start[row]:start[row] + graph.max_m0]
        links = links[links >= 0]
        earliest[links] = np.minimum(earliest[links], pos[row])
    later = lo[3:]
    assert np.all(earliest[later] < pos[later])                   # reached through a link from an earlier row


def test_a_part_unlike_the_golden_ones_takes_the_full_walk_and_the_same_score(fixture_parts, monkeypatch):
    graph, bank, part = fixture_parts
    search = _with_prior(graph, part)
    walked = []
    real = FaissHnswSearch.approximate
    monkeypatch.setattr(FaissHnswSearch, "approximate", lambda self, q: walked.append(len(q)) or real(self, q))
    q = part(400)[np.random.default_rng(1).permutation(ROWS * COLS)]  # its patches anywhere: no position is like a golden one
    score = search.image_score(q)
    assert walked == [len(q)]
    assert score == _search(graph).distances(q).max()
    assert score == pytest.approx(ExactSearch(bank).nearest(q)[0].max(), rel=1e-5)


def test_no_prior_for_frames_of_another_size_or_without_one(fixture_parts):
    graph, _, part = fixture_parts
    search = _search(graph)
    assert search.image_score(part()) is None                      # none set
    search = _with_prior(graph, part)
    assert search.image_score(part()[:-COLS]) is None              # not the prior's patches per frame


def test_build_refuses_too_few_golden_frames_and_parts_that_sit_anywhere(fixture_parts):
    graph, _, part = fixture_parts
    search = _search(graph)
    prior, note = position_prior.build(search, [part(k) for k in GOLDEN][:1], (ROWS, COLS))
    assert prior is None and "2 needed" in note
    rng = np.random.default_rng(2)
    shuffled = [part(300 + k)[rng.permutation(ROWS * COLS)] for k in range(4)]
    prior, note = position_prior.build(search, shuffled, (ROWS, COLS))
    assert prior is None and "does not fit" in note
    prior, note = position_prior.build(search, [part(k) for k in GOLDEN], (ROWS, COLS))
    assert prior.shape == (ROWS * COLS, 9 * 4) and "left open" in note


def test_each_positions_rows_are_measured_once_and_a_position_of_one_row_still_seeds_its_walk(fixture_parts,
                                                                                              monkeypatch):
    rows = np.array([[5, 3, 5, 5], [7, 7, 7, 7], [1, 2, 3, 4]])
    assert distinct_rows(rows).tolist() == [[3, 5, -1, -1], [7, -1, -1, -1], [1, 2, 3, 4]]
    graph, bank, part = fixture_parts
    search, full = _with_prior(graph, part), _search(graph)
    q = part(499)[:3]
    d2 = search.candidate_distances(q, distinct_rows(rows))       # a padding -1 is never a distance
    assert np.isinf(d2[0, 2:]).all() and np.isinf(d2[1, 1:]).all() and np.isfinite(d2[2]).all()
    assert d2[1, 0] == pytest.approx(((q[1] - bank[7]) ** 2).sum(), rel=1e-5)
    # Every position but the first has one row (fewer than PRIOR_SEEDS, padded with -1 beside the first's many):
    # its walk starts from that row, never from -1, and the score is exact.
    one_row = np.repeat(search.prior[:, :1], search.prior.shape[1], axis=1)
    one_row[0] = search.prior[0]
    search.set_prior(one_row)
    assert np.array_equal(search.prior, one_row)                   # what was set, repeats and all
    seeds_seen = []
    real = FaissHnswSearch._walk_level0
    monkeypatch.setattr(FaissHnswSearch, "_walk_level0",
                        lambda self, q, seeds, *a: seeds_seen.append(seeds.min()) or real(self, q, seeds, *a))
    for q in (part(500), part(501)):
        q[100:110] += 0.7
        assert search.image_score(q) == full.distances(q).max()
    assert seeds_seen and min(seeds_seen) >= 0


def test_prior_rows_outside_the_bank_are_refused(fixture_parts):
    graph, bank, part = fixture_parts
    search = _search(graph)
    with pytest.raises(ValueError, match="must index the bank"):
        search.set_prior(np.full((ROWS * COLS, 3), len(bank)))
    with pytest.raises(ValueError, match="must index the bank"):
        search.set_prior(np.full((ROWS * COLS, 3), -1))
    with pytest.raises(ValueError, match="must index the bank"):   # and by the fit check (position_prior.build)
        search.prior_open_share(part(), np.full((ROWS * COLS, 3), len(bank)))
    with pytest.raises(ValueError, match="positions for"):
        search.prior_open_share(part(), np.zeros((ROWS * COLS - 1, 3), dtype=np.int64))


def test_recheck_from_a_known_patch_never_measures_it_again(anisotropic):
    bank, queries = anisotropic(seed=6, q=200)
    search = ExactSearch(bank)
    exact = np.sqrt(((queries[:, None, :] - bank[None]) ** 2).sum(-1)).min(1)
    upper = (exact * 1.3).astype(np.float32)
    top = int(np.argmax(exact))
    dist, measured = exact_image_recheck(search, queries, upper, known=(top, float(exact[top])))
    assert dist.max() == pytest.approx(exact.max(), rel=1e-5) and dist[top] == np.float32(exact[top])
    plain, plain_measured = exact_image_recheck(search, queries, upper)
    assert measured == plain_measured - 1 and plain.max() == pytest.approx(dist.max(), rel=1e-6)


def test_bottle_scores_are_the_full_searchs_with_the_prior_on(bottle_bundle, bottle_dir):
    """Real frames: the station's score (prior on) is bit for bit the full search's (prior off), good parts and
    defects; its heat map, from the bounds the prior's search left, is the evaluation path's and shows what the
    full walk's shows."""
    bundle = Bundle.load(bottle_bundle)
    pipe = Pipeline(bundle, threads=2)
    assert pipe.prior_note.startswith("on"), pipe.prior_note
    rows = np.unique(pipe.search.prior)
    assert np.array_equal(rows, np.arange(len(rows)))             # the bank laid out around them, first
    plain = Pipeline(bundle, threads=2, position_prior=False)
    assert plain.prior_note == "off"
    paths = [p for kind in ("good", "broken_large", "contamination")
             for p in sorted((bottle_dir / "test" / kind).glob("*.png"))[:5]]
    for i, path in enumerate(paths):
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        got = pipe.inspect(Frame(frame_id=i, source=str(path), image=image))
        rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        want = plain.score_rgb(rgb, str(path))
        assert got.score == want.score, path
        evaluated = pipe.score_rgb(rgb, str(path))              # edge-export evaluate scores as the station does
        assert evaluated.score == got.score
        np.testing.assert_array_equal(got.anomaly_map, evaluated.anomaly_map)
        assert np.corrcoef(got.anomaly_map.ravel(), want.anomaly_map.ravel())[0, 1] > 0.9, path
        # every patch a bank vector's distance: never under the exact nearest one's
        feats = pipe.extractor(preprocess(rgb, pipe.geometry, str(path))[0])
        assert np.all(evaluated.patch_scores >= _nearest64(pipe.search.exact.bank, feats) * (1 - 1e-6))
        assert evaluated.patch_scores.max() == got.score


def test_two_good_golden_frames_are_enough_each_against_the_other(fixture_parts):
    """A bundle fitted with calibration defects has two good golden images (the other two are defects)."""
    graph, _, part = fixture_parts
    search = _search(graph)
    frames = [part(k) for k in GOLDEN][:2]
    prior, note = position_prior.build(search, frames, (ROWS, COLS))
    assert "needed" not in note                                    # tried: each against a prior from the other
    # This data's noise leaves most of a part open against one other part; the tried share is what decides
    shares = [search.prior_open_share(f, position_prior.candidates([search.labels(frames[1 - i])], (ROWS, COLS)))
              for i, f in enumerate(frames)]
    assert (prior is not None) == (np.median(shares) <= position_prior.FIT_SHARE)


def test_golden_defects_sit_out_of_the_prior(device_bundle, monkeypatch):
    """edge-export fit keeps two calibration defects among the golden images: their patches land nowhere a good
    part's do, and they are never left open (so a texture's median passed the fit test and every good part paid
    the prior, then the full walk). Only the golden images the station itself would pass build the prior."""
    bundle = Bundle.load(device_bundle)
    golden = bundle.variant().golden
    assert len(golden) >= 3
    built = []
    real = position_prior.build
    monkeypatch.setattr(position_prior, "build", lambda search, feats, grid: built.append(len(feats)) or
                        real(search, feats, grid))
    Pipeline(bundle, threads=1)
    assert built == [len(golden)]
    golden[0]["score"] = 10.0 * bundle.variant().threshold          # a golden defect: NG on the station
    Pipeline(bundle, threads=1)
    assert built[-1] == len(golden) - 1


def test_the_station_file_turns_the_prior_off(device_bundle, tmp_path, monkeypatch):
    """inference.position_prior: false (a station that reads every part's heat map) builds no prior; the
    default builds it, with the station's lowest decision threshold as where a part's search starts defect-first."""
    import yaml

    from edge_runtime.bundle_loader import load_pipeline
    from edge_runtime.config import ConfigError, load_station

    built, handed = [], []
    real = position_prior.build
    monkeypatch.setattr(position_prior, "build", lambda *a: built.append(1) or real(*a))
    real_set = FaissHnswSearch.set_prior
    monkeypatch.setattr(FaissHnswSearch, "set_prior",
                        lambda self, rows, defect_above=None: handed.append(defect_above) or
                        real_set(self, rows, defect_above))
    path = tmp_path / "station.yaml"
    station = {"bundle": str(device_bundle), "source": {"type": "folder", "path": "images"},
               "http": {"enabled": False}, "inference": {"threads": 1, "review_threshold": 0.5}}
    path.write_text(yaml.safe_dump(station))
    cfg = load_station(path)
    assert cfg.inference.position_prior is True
    pipe = load_pipeline(cfg)
    assert built == [1] and pipe.prior_note != "off"
    assert handed == [0.5]                                          # the review threshold: the lowest not passed
    station["inference"]["position_prior"] = False
    path.write_text(yaml.safe_dump(station))
    pipe = load_pipeline(load_station(path))
    assert built == [1] and handed == [0.5] and pipe.prior_note == "off" and pipe.search.prior is None
    station["inference"]["position_prior"] = "sometimes"
    path.write_text(yaml.safe_dump(station))
    with pytest.raises(ConfigError, match="position_prior"):
        load_station(path)
