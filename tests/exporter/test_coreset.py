import numpy as np
import pytest

from export.coreset import coverage_radius, greedy_coreset


def clustered(n=3000, d=32, seed=0):
    rng = np.random.default_rng(seed)
    # Unbalanced clusters: random sampling over-represents the big ones and misses the small ones.
    sizes = [2000, 600, 200, 100, 50, 30, 10, 10]
    centers = rng.normal(scale=10, size=(len(sizes), d))
    return np.concatenate([c + rng.normal(size=(s, d)) for c, s in zip(centers, sizes)]).astype(np.float32)


def test_coreset_covers_bank_better_than_random_sampling():
    x = clustered()
    k = 60
    sel = greedy_coreset(x, k, projection_dim=16, seed=0, progress=False)
    assert len(np.unique(sel)) == k
    greedy_r = coverage_radius(x, sel)
    rng = np.random.default_rng(1)
    random_r = [coverage_radius(x, rng.choice(len(x), k, replace=False)) for _ in range(5)]
    assert greedy_r < min(random_r)


def test_coreset_picks_every_far_cluster():
    x = clustered()
    sel = greedy_coreset(x, 20, projection_dim=None, progress=False)
    labels = np.repeat(np.arange(8), [2000, 600, 200, 100, 50, 30, 10, 10])
    assert set(labels[sel]) == set(range(8))


def test_coreset_is_deterministic_for_a_seed():
    x = clustered()
    a = greedy_coreset(x, 30, seed=3, progress=False)
    b = greedy_coreset(x, 30, seed=3, progress=False)
    assert np.array_equal(a, b)


def test_coreset_edge_sizes():
    x = clustered(n=100)
    assert len(greedy_coreset(x, 10_000, progress=False)) == len(x)
    with pytest.raises(ValueError):
        greedy_coreset(x, 0, progress=False)


def test_chunked_selection_does_not_depend_on_the_worker_count():
    # Chunks run in parallel threads; each chunk's random start is drawn up front, so the result is the same.
    x = clustered(n=3000)
    one = greedy_coreset(x, 150, projection_dim=16, seed=2, progress=False, chunk_patches=700, workers=1)
    two = greedy_coreset(x, 150, projection_dim=16, seed=2, progress=False, chunk_patches=700, workers=2)
    assert len(one) == 150 and np.array_equal(one, two)
