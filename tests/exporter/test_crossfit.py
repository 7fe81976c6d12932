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


def test_a_fold_that_owns_the_whole_bank_is_refused_by_name():
    # A tiny coreset (here 2 vectors, both from image 0): the bank less image 0's fold is empty.
    import pytest

    rng = np.random.default_rng(2)
    n_images, per_image, dim = 10, 4, 8
    feats = rng.normal(size=(n_images * per_image, dim)).astype(np.float32)
    fold_of = fold_assignment(n_images, 5, seed=0)
    selected = np.array([0, 1])
    index = build_hnsw(feats[selected], HnswParams(), seed=0)
    with pytest.raises(ValueError, match=rf"cross-fit fold {fold_of[0] + 1} of 5: .*all 2 vectors.*--coreset-ratio"):
        bank_minus_fold_scores(feats, selected, index, per_image, fold_of)
    # Nothing was marked deleted on the way out.
    assert len(index.knn_query(feats[:3], k=2)[0]) == 3


def test_fit_with_a_coreset_too_small_for_the_folds_is_an_error_not_a_traceback(tmp_path, capsys):
    import cv2

    from export.cli import main as export_main

    rng = np.random.default_rng(3)
    good = tmp_path / "good"
    good.mkdir()
    for i in range(4):
        img = np.full((64, 64, 3), 90, np.uint8)
        cv2.circle(img, (32, 32), 20, (150, 140, 130), -1)
        img = np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)
        cv2.imwrite(str(good / f"{i}.png"), img)
    rc = export_main(["fit", str(good), "--out", str(tmp_path / "b"), "--coreset-ratio", "0.00001",
                      "--cross-fit-folds", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "edge-export: error: cross-fit fold " in err and "use a larger --coreset-ratio" in err
    assert not (tmp_path / "b").exists()   # nothing half-written left behind
