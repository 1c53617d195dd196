"""The robust baselines' math: Krum and Multi-Krum against loops and Flower, median and trimmed mean against numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.server.strategy.aggregate import aggregate_krum
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies.krum import krum, krum_scores
from strategies.median import coordinate_median
from strategies.trimmed_mean import trimmed_mean


def _brute_krum_scores(x: np.ndarray, f: int) -> list[float]:
    n = len(x)
    scores = []
    for i in range(n):
        distances = sorted(float(np.sum((x[i] - x[j]) ** 2)) for j in range(n) if j != i)
        scores.append(sum(distances[: n - f - 2]))
    return scores


@settings(max_examples=30, deadline=None)
@given(n=st.integers(5, 12), dim=st.integers(1, 8), f=st.integers(0, 4), seed=st.integers(0, 10_000))
def test_krum_scores_against_loops(n: int, dim: int, f: int, seed: int) -> None:
    if n < 2 * f + 3:
        return
    x = np.random.default_rng(seed).normal(size=(n, dim))
    scores = krum_scores(torch.from_numpy(x), f)
    assert np.allclose(scores.numpy(), _brute_krum_scores(x, f))


def test_krum_and_multi_krum_pick_the_lowest_scores_and_match_flower() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(11, 6))
    x[[2, 7]] += 25.0  # two far outliers
    weights = rng.integers(1, 50, size=11).astype(float)
    scores = _brute_krum_scores(x, 2)
    update, selected, dropped = krum(torch.from_numpy(x), num_malicious=2)
    assert selected == [int(np.argmin(scores))] and sorted(selected + dropped) == list(range(11))
    assert np.allclose(update.numpy(), x[selected[0]])
    flower = aggregate_krum([([row], int(w)) for row, w in zip(x, weights, strict=True)], num_malicious=2, to_keep=0)
    assert np.allclose(update.numpy(), flower[0])

    update, selected, dropped = krum(torch.from_numpy(x), torch.from_numpy(weights), num_malicious=2, keep=5)
    assert selected == sorted(np.argsort(scores)[:5].tolist())
    assert 2 in dropped and 7 in dropped
    expected = (weights[selected, None] * x[selected]).sum(axis=0) / weights[selected].sum()
    assert np.allclose(update.numpy(), expected)
    flower = aggregate_krum([([row], int(w)) for row, w in zip(x, weights, strict=True)], num_malicious=2, to_keep=5)
    assert np.allclose(update.numpy(), flower[0])


def test_krum_checks_its_assumptions() -> None:
    x = torch.randn(6, 3)
    with pytest.raises(ValueError, match="2 f \\+ 3"):
        krum(x, num_malicious=2)
    with pytest.raises(ValueError, match="keep"):
        krum(x, num_malicious=1, keep=7)
    with pytest.raises(ValueError, match="weights"):
        krum(x, [1.0, 2.0], num_malicious=1)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 12), dim=st.integers(1, 8), seed=st.integers(0, 10_000))
def test_median_against_numpy(n: int, dim: int, seed: int) -> None:
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    update, kept, dropped = coordinate_median(torch.from_numpy(x))
    assert update.dtype == torch.float32
    assert np.allclose(update.numpy(), np.median(x.astype(np.float64), axis=0), atol=1e-6)
    assert (kept, dropped) == (list(range(n)), [])


def _brute_trimmed_mean(x: np.ndarray, beta: float) -> np.ndarray:
    cut = int(beta * len(x))
    out = []
    for column in x.T:
        values = sorted(column)
        out.append(np.mean(values[cut : len(values) - cut]))
    return np.array(out)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 12), dim=st.integers(1, 8), beta=st.floats(0.0, 0.49), seed=st.integers(0, 10_000))
def test_trimmed_mean_against_sorting(n: int, dim: int, beta: float, seed: int) -> None:
    x = np.random.default_rng(seed).normal(size=(n, dim))
    update, kept, dropped = trimmed_mean(torch.from_numpy(x), beta=beta)
    assert np.allclose(update.numpy(), _brute_trimmed_mean(x, beta))
    assert (kept, dropped) == (list(range(n)), [])


def test_trimmed_mean_and_median_resist_an_outlier() -> None:
    x = torch.zeros(9, 4)
    x[0] = 1e6
    assert torch.equal(coordinate_median(x)[0], torch.zeros(4))
    assert torch.equal(trimmed_mean(x, beta=0.2)[0], torch.zeros(4))
    with pytest.raises(ValueError, match="beta"):
        trimmed_mean(x, beta=0.5)
    with pytest.raises(ValueError, match="NaN"):
        coordinate_median(torch.full((3, 2), float("nan")))
