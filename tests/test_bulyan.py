"""Bulyan: the tensor implementation against Flower's aggregate_bulyan, its selection against a brute-force loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.server.strategy.aggregate import aggregate_bulyan, aggregate_krum
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies.bulyan import BulyanDefence, bulyan, bulyan_selection


def _flower(x: np.ndarray, weights: np.ndarray, f: int) -> np.ndarray:
    results = [([row.copy()], int(w)) for row, w in zip(x, weights, strict=True)]
    (aggregate,) = aggregate_bulyan(results, num_malicious=f, aggregation_rule=aggregate_krum, to_keep=0)
    return aggregate


def _brute_selection(x: np.ndarray, f: int) -> list[int]:
    """Recursive Krum by loops: the lowest sum of squared distances to the max(1, n' - f - 2) nearest others."""
    remaining, chosen = list(range(len(x))), []
    for _ in range(len(x) - 2 * f):
        scores = []
        for i in remaining:
            distances = sorted(float(np.sum((x[i] - x[j]) ** 2)) for j in remaining if j != i)
            scores.append(sum(distances[: max(1, len(remaining) - f - 2)]))
        best = remaining[int(np.argmin(scores))]
        chosen.append(best)
        remaining.remove(best)
    return chosen


@settings(max_examples=40, deadline=None)
@given(f=st.integers(0, 3), extra=st.integers(0, 5), dim=st.integers(1, 9), seed=st.integers(0, 10_000))
def test_bulyan_matches_flower_and_a_brute_force_selection(f: int, extra: int, dim: int, seed: int) -> None:
    n = 4 * f + 3 + extra
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim))
    x[: f + (seed % 2)] += rng.normal(scale=20.0, size=(f + (seed % 2), dim))  # some far updates
    weights = rng.integers(1, 100, size=n)
    aggregate, selected, dropped = bulyan(torch.from_numpy(x), torch.from_numpy(weights / weights.sum()), num_malicious=f)
    assert np.allclose(aggregate.numpy(), _flower(x, weights, f), rtol=1e-10, atol=1e-10)
    assert bulyan_selection(torch.from_numpy(x), f) == _brute_selection(x, f)
    assert selected == sorted(_brute_selection(x, f)) and sorted(selected + dropped) == list(range(n))
    assert len(selected) == n - 2 * f


def test_bulyan_drops_far_attackers_and_averages_near_the_median() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(15, 4)).astype(np.float32)
    x[[2, 9, 13]] = np.array([[50.0, 0, 0, 0], [0, -50.0, 0, 0], [0, 0, 0, 50.0]])  # far apart, and from the rest
    aggregate, selected, dropped = bulyan(torch.from_numpy(x), num_malicious=3)
    assert set(dropped) >= {2, 9, 13} and len(selected) == 9
    # Identical copies sit at distance 0 from each other: a late Krum round, with few neighbours
    # counted, chooses one (as Flower's does); the step around the median then leaves it out.
    x[[2, 9, 13]] = 50.0
    copies, selected, _ = bulyan(torch.from_numpy(x), num_malicious=3)
    assert {2, 9, 13} & set(selected) and float(copies.abs().max()) < 5.0
    assert aggregate.dtype == torch.float32
    # beta = 15 - 12 = 3 values per coordinate, the closest to the selection's median.
    chosen = x[selected].astype(np.float64)
    median = np.median(chosen, axis=0)
    order = np.argsort(np.abs(chosen - median), axis=0, kind="stable")[:3]
    assert np.allclose(aggregate.numpy(), np.take_along_axis(chosen, order, axis=0).mean(axis=0), atol=1e-6)


def test_bulyan_refuses_rounds_below_4f_plus_3_and_the_defence_caps_f() -> None:
    x = torch.randn(10, 3)
    with pytest.raises(ValueError, match="4 f \\+ 3"):
        bulyan(x, num_malicious=2)
    with pytest.raises(ValueError, match="weights"):
        bulyan(x, [1.0], num_malicious=1)
    defence = BulyanDefence(0.25)
    assert (defence.name, defence.min_clients, defence.drops_clients) == ("bulyan", 7, True)
    screening = defence.screen(x, torch.full((10,), 0.1), seed=0)
    # floor(0.25 * 10) = 2 attackers wanted, but 10 clients only allow f = 1: 8 selected.
    assert screening.stats == {"assumed_malicious": 1, "phi_max_malicious": 2}
    assert len(screening.kept) == 8 and screening.aggregate is not None
    big = torch.randn(50, 3)
    assert BulyanDefence(0.25).screen(big, torch.full((50,), 0.02), seed=0).stats["assumed_malicious"] == 11
