"""zPROBE's protocol pieces shared by both filters: clusters, masked secure sums, the prover, fresh rounds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from strategies.reply_values import MAX_VALUE
from strategies.zprobe_protocol import (
    FIXED_POINT_BITS,
    _to_ring,
    cluster_sums,
    eq2_samples,
    make_prover,
    make_uploader,
    mask_updates,
    random_clusters,
    sample_coordinates,
)
from tests.synthetic_updates import honest_updates

DIM = 2000


def test_random_clusters_partition_with_near_equal_sizes() -> None:
    clusters = random_clusters(50, 16, seed=3)
    assert sorted(i for c in clusters for i in c) == list(range(50))
    assert {len(c) for c in clusters} <= {3, 4}
    assert clusters == random_clusters(50, 16, seed=3)
    assert clusters != random_clusters(50, 16, seed=4)
    with pytest.raises(ValueError):
        random_clusters(5, 6, seed=0)


def test_masked_sums_are_exact_while_each_masked_vector_looks_random() -> None:
    updates = list(honest_updates(20, DIM, seed=1))
    clusters = random_clusters(20, 6, seed=1)
    masked = mask_updates(updates, clusters, seed=9)
    sums = cluster_sums(masked, clusters)
    for row, cluster in zip(sums, clusters, strict=True):
        exact = torch.stack([updates[i] for i in cluster]).double().sum(dim=0)
        # Fixed point: each update is rounded to 2^-33 at worst.
        assert torch.allclose(row, exact, rtol=0, atol=len(cluster) * 2.0 ** -(FIXED_POINT_BITS + 1) + 1e-6)
    for update, vector in zip(updates, masked, strict=True):
        assert vector.dtype == torch.int64
        decoded = vector.double() / 2.0**FIXED_POINT_BITS  # what the server would read from it
        assert float((decoded - update.double()).abs().median()) > 1e6
        assert abs(float(torch.corrcoef(torch.stack([decoded, update.double()]))[0, 1])) < 0.1


def test_masks_depend_on_the_seed_but_sums_do_not() -> None:
    updates = list(honest_updates(9, 100, seed=2))
    clusters = random_clusters(9, 3, seed=2)
    a, b = mask_updates(updates, clusters, seed=1), mask_updates(updates, clusters, seed=2)
    assert not torch.equal(a[0], b[0])
    assert torch.equal(cluster_sums(a, clusters), cluster_sums(b, clusters))


def test_secure_aggregation_refuses_what_would_leak_or_overflow() -> None:
    updates = list(honest_updates(6, 10, seed=0))
    with pytest.raises(ValueError, match="at least 2"):
        mask_updates(updates, [[0, 1, 2], [3, 4], [5]], seed=0)
    with pytest.raises(ValueError, match="partition"):
        mask_updates(updates, [[0, 1, 2], [3, 4]], seed=0)
    bad = [u.clone() for u in updates]
    bad[0][0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        mask_updates(bad, [[0, 1, 2], [3, 4, 5]], seed=0)
    bad[0][0] = 1e12
    with pytest.raises(ValueError, match="too large"):
        mask_updates(bad, [[0, 1, 2], [3, 4, 5]], seed=0)
    with pytest.raises(ValueError, match="int64"):
        cluster_sums([u for u in updates], [[0, 1, 2], [3, 4, 5]])


def test_uploader_runs_a_fresh_secure_round_for_any_subset() -> None:
    updates = list(honest_updates(12, 50, seed=4))
    upload = make_uploader(updates, seed=5)
    partition = [[1, 4, 7], [2, 9], [11, 0, 3]]
    first, second = upload(partition), upload(partition)
    assert set(first) == {0, 1, 2, 3, 4, 7, 9, 11}
    assert not torch.equal(first[1], second[1])  # new masks each round
    sums = cluster_sums(first, partition)
    assert torch.allclose(sums[1], (updates[2] + updates[9]).double(), atol=1e-8)
    with pytest.raises(ValueError, match="at least 2"):
        upload([[1], [2, 3]])


def test_prover_answers_one_bit_about_the_statement() -> None:
    updates = [torch.tensor([0.0, 1.0, 5.0, -3.0])]
    prove = make_prover(updates)
    coords = torch.tensor([0, 1, 2, 3])
    centre, threshold = torch.zeros(4, dtype=torch.float64), torch.full((4,), 2.0, dtype=torch.float64)
    assert prove(0, coords, centre, threshold, 2) is True  # two coordinates exceed: 5 and -3
    assert prove(0, coords, centre, threshold, 1) is False
    assert prove(0, coords[:2], centre[:2], threshold[:2], 0) is True


def test_eq2_sample_size_and_coordinate_sample() -> None:
    q = eq2_samples(0.25, 0.01)
    assert q == 17 and (1 - 0.25) ** q <= 0.01 < (1 - 0.25) ** (q - 1)
    assert eq2_samples(0.5, 0.005) == 8  # 0.5^8 = 0.0039 <= 0.005 < 0.5^7
    with pytest.raises(ValueError, match="s_m and delta"):
        eq2_samples(0.0, 0.01)
    coords = sample_coordinates(100, 17, torch.Generator().manual_seed(0))
    assert coords.shape == (17,) and len(set(coords.tolist())) == 17 and coords.tolist() == sorted(coords.tolist())
    assert torch.equal(sample_coordinates(10, 17, torch.Generator().manual_seed(0)), torch.arange(10))


def test_every_update_the_reply_hygiene_accepts_fits_the_ring_in_clusters_below_8192() -> None:
    """Replies and the global state hold values within MAX_VALUE, so an update is at most 2 MAX_VALUE."""
    largest = torch.full((3,), 2 * MAX_VALUE)
    assert _to_ring(largest, 2**13 - 1).dtype == np.uint64
    with pytest.raises(ValueError, match="too large"):
        _to_ring(largest, 2**13)
