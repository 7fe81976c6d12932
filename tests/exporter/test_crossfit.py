"""Cross-fitted scores by the bank-minus-fold method equal an exact search of the bank less the fold's vectors."""
import numpy as np

from edge_runtime.nn_search import ExactSearch, HnswParams, build_hnsw
from export.crossfit import bank_minus_fold_scores, fold_assignment, rechecked_max


def test_rechecked_max_is_the_exact_maximum_from_upper_bounds():
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(500, 16)).astype(np.float32)
    q = rng.normal(size=(64, 16)).astype(np.float32)
    exact = ExactSearch(bank)
    true = exact.distances(q)
    # Any upper bounds at all (here: the true distance plus random slack) give the exact image score.
    bounds = true + rng.uniform(0, 2, size=true.shape).astype(np.float32)
    score, checked = rechecked_max(bounds, q, exact)
    assert np.isclose(score, true.max(), rtol=1e-5) and checked <= len(q)


def test_bank_minus_fold_scores_match_exact_search_and_leave_the_index_as_found():
    rng = np.random.default_rng(1)
    n_images, per_image, dim = 30, 20, 24
    feats = rng.normal(size=(n_images * per_image, dim)).astype(np.float32)
    selected = np.sort(rng.choice(len(feats), 120, replace=False))
    # ef is deliberately tiny: neighbours are then often wrong, and only the re-check keeps the scores exact.
    index = build_hnsw(feats[selected], HnswParams(ef_construction=16, M=4), seed=0)
    fold_of = fold_assignment(n_images, 5, seed=0)
    index.set_ef(200)
    before = index.knn_query(feats, k=3)[0]
    scores, stats = bank_minus_fold_scores(feats, selected, index, per_image, fold_of, ef=1)
    for i in range(n_images):
        keep = selected[fold_of[selected // per_image] != fold_of[i]]
        assert len(keep) < len(selected)   # the image's own fold really left the bank
        want = ExactSearch(feats[keep]).distances(feats[i * per_image:(i + 1) * per_image]).max()
        assert np.isclose(scores[i], want, rtol=1e-5)
    assert stats["rechecked_patches_per_image"] >= 1
    # Every vector is searchable again afterwards (the shipped index was saved before, but must not be left holed).
    index.set_ef(200)
    assert np.array_equal(index.knn_query(feats, k=3)[0], before)
