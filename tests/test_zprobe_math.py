"""zPROBE math (secure sums, statistics, sample sizes, the filter) and the robust baselines.

Detection is measured on controlled synthetic updates: honest ones mu + 0.5 * N(0, 1) around a
common mu ~ N(0, 1), dim 2000. An attacker counts as *harmful* when it lies outside the honest
band (eta honest standard deviations around the honest mean, from the true honest updates) on
at least a fraction s_m of the coordinates: that is the displacement the filter promises to
catch. ALIE and min-max are built to stay inside the band; for them only the honest false
rejections are checked.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.server.strategy.aggregate import aggregate_krum
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora.attacks import apply_model_attack, choose_malicious
from strategies.krum import krum, krum_scores
from strategies.median import coordinate_median
from strategies.trimmed_mean import trimmed_mean
from strategies.zprobe import (
    FIXED_POINT_BITS,
    FilterResult,
    ZProbeParams,
    allowed_exceedances,
    cluster_sums,
    default_parameters,
    eq2_samples,
    make_prover,
    make_uploader,
    mask_updates,
    random_clusters,
    required_samples,
    robust_bounds,
    simulate_round,
    zprobe_filter,
)

DIM = 2000
HONEST_SPREAD = 0.5
ATTACKS = {
    "sign_flip": {},
    "scaling": {"factor": 10.0},
    "gaussian_noise": {"sigma": 3 * HONEST_SPREAD},
    "alie": {},
    "ipm": {"eps": 0.5},
    "min_max": {},
}
# Attacks that stay inside the honest spread by construction.
WITHIN_SPREAD = {"alie", "min_max"}


def _honest(n: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(dim, generator=g)
    return mu + HONEST_SPREAD * torch.randn(n, dim, generator=g)


def _round(n: int, fraction: float, attack: str, seed: int) -> tuple[torch.Tensor, list[int], list[int]]:
    """n updates of which floor(fraction * n) are malicious: (updates, malicious, honest)."""
    updates = _honest(n, DIM, seed)
    malicious = choose_malicious(n, fraction, seed)
    honest = [i for i in range(n) if i not in set(malicious)]
    if malicious:
        updates[malicious] = apply_model_attack(attack, updates[honest], updates[malicious], seed, ATTACKS[attack])
    return updates, malicious, honest


def _harmful(updates: torch.Tensor, malicious: list[int], honest: list[int], params: ZProbeParams) -> list[int]:
    """Attackers outside the true honest band (eta honest stds) on at least s_m of the coordinates."""
    mean, std = updates[honest].mean(dim=0), updates[honest].std(dim=0)
    return [i for i in malicious if ((updates[i] - mean).abs() > params.eta * std).double().mean() >= params.s_m]


# ---------------------------------------------------------------- clusters and secure sums


def test_random_clusters_partition_with_near_equal_sizes() -> None:
    clusters = random_clusters(50, 16, seed=3)
    assert sorted(i for c in clusters for i in c) == list(range(50))
    assert {len(c) for c in clusters} <= {3, 4}
    assert clusters == random_clusters(50, 16, seed=3)
    assert clusters != random_clusters(50, 16, seed=4)
    with pytest.raises(ValueError):
        random_clusters(5, 6, seed=0)


def test_masked_sums_are_exact_while_each_masked_vector_looks_random() -> None:
    updates = list(_honest(20, DIM, seed=1))
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
    updates = list(_honest(9, 100, seed=2))
    clusters = random_clusters(9, 3, seed=2)
    a, b = mask_updates(updates, clusters, seed=1), mask_updates(updates, clusters, seed=2)
    assert not torch.equal(a[0], b[0])
    assert torch.equal(cluster_sums(a, clusters), cluster_sums(b, clusters))


def test_secure_aggregation_refuses_what_would_leak_or_overflow() -> None:
    updates = list(_honest(6, 10, seed=0))
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
    updates = list(_honest(12, 50, seed=4))
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


# ---------------------------------------------------------------- statistics and parameters


def test_robust_bounds_against_numpy() -> None:
    g = torch.Generator().manual_seed(0)
    sizes = [3, 3, 4, 3, 4, 3, 3]
    sums = torch.randn(len(sizes), 30, generator=g, dtype=torch.float64) * 5
    bounds = robust_bounds(sums, sizes)
    means = sums.numpy() / np.array(sizes)[:, None]
    centre = np.median(means, axis=0)
    mad = np.median(np.abs(means - centre) * np.sqrt(sizes)[:, None], axis=0)
    assert np.allclose(bounds.centre.numpy(), centre)
    assert np.allclose(bounds.sigma.numpy(), 1.4826 * 1.138 * mad)  # b_7 = 1.138
    with pytest.raises(ValueError, match="3 clusters"):
        robust_bounds(sums[:2], sizes[:2])


def test_spread_of_cluster_means_is_rescaled_to_one_client() -> None:
    # Cluster means of m updates spread as sigma / sqrt(m); sigma itself must come back.
    updates = _honest(48, 4000, seed=5)
    clusters = random_clusters(48, 16, seed=5)
    sums = torch.stack([updates[c].double().sum(dim=0) for c in clusters])
    bounds = robust_bounds(sums, [len(c) for c in clusters])
    assert float(bounds.sigma.median()) == pytest.approx(HONEST_SPREAD, rel=0.1)
    assert float((bounds.centre - updates.double().mean(dim=0)).abs().median()) < 0.1


def _binomial_tail(q: int, p: float, t: int) -> float:
    """P(Binomial(q, p) > t), by the textbook sum."""
    return sum(math.comb(q, k) * p**k * (1 - p) ** (q - k) for k in range(t + 1, q + 1))


def test_sample_sizes_against_brute_force() -> None:
    q = eq2_samples(0.25, 0.01)
    assert (1 - 0.25) ** q <= 0.01 < (1 - 0.25) ** (q - 1)
    t = allowed_exceedances(101, 0.1, 0.05)
    assert _binomial_tail(101, 0.1, t) <= 0.05 < _binomial_tail(101, 0.1, t - 1)
    q, t = required_samples(0.25, 0.01, 0.1, 0.05)
    assert (q, t) == (101, 15)
    assert 1 - _binomial_tail(q, 0.25, t) <= 0.01
    # With honest clients that (almost) never exceed, no exceedance is allowed: Eq. 2 itself.
    assert required_samples(0.25, 0.01, 1e-5, 0.05) == (eq2_samples(0.25, 0.01), 0)
    with pytest.raises(ValueError, match="exceed coord_rate"):
        required_samples(0.05, 0.01, 0.1, 0.05)


def test_default_parameters() -> None:
    params = default_parameters(50, 0.4)
    assert (params.clusters, params.cluster_size) == (16, 3)
    assert params.eta == pytest.approx(math.sqrt(10))
    assert (params.q, params.max_exceed, params.screen_q) == (101, 15, 1010)
    assert (params.delta, params.s_m) == (0.01, 0.25)
    # Few attackers: larger clusters (more privacy), still mostly attacker-free.
    assert default_parameters(50, 0.1).clusters == 8
    assert default_parameters(20, 0.4).clusters == 6
    with pytest.raises(ValueError, match="at least 9 clients"):
        default_parameters(8, 0.2)
    with pytest.raises(ValueError, match="phi_max"):
        default_parameters(50, 0.5)


# ---------------------------------------------------------------- the filter


def test_filter_sees_only_masked_vectors_sums_and_bits() -> None:
    n = 20
    updates, malicious, _ = _round(n, 0.25, "sign_flip", seed=3)
    raw = list(updates)
    params = default_parameters(n, 0.4)
    clusters = random_clusters(n, params.clusters, seed=3)
    masked = mask_updates(raw, clusters, seed=3)
    bits: list[object] = []
    inner = make_prover(raw)

    def prove(client: int, coords: torch.Tensor, centre: torch.Tensor, threshold: torch.Tensor, max_exceed: int) -> bool:
        answer = inner(client, coords, centre, threshold, max_exceed)
        bits.append(answer)
        return answer

    fresh_rounds: list[dict[int, torch.Tensor]] = []
    inner_upload = make_uploader(raw, seed=4)

    def upload(partition: list[list[int]]) -> dict[int, torch.Tensor]:
        vectors = inner_upload(partition)
        fresh_rounds.append(vectors)
        return vectors

    result = zprobe_filter(masked, clusters, prove, params, seed=3, upload=upload)
    # Everything that reached the filter from the clients: masked vectors and booleans.
    for vectors in [dict(enumerate(masked)), *fresh_rounds]:
        for i, vector in vectors.items():
            assert vector.dtype == torch.int64
            assert float((vector.double() / 2.0**FIXED_POINT_BITS - raw[i].double()).abs().median()) > 1e6
    assert bits and all(type(bit) is bool for bit in bits)
    assert set(result.rejected) == set(malicious)
    # The filter depends on the uploads only through cluster sums: other masks, same decision.
    remasked = mask_updates(raw, clusters, seed=99)
    again = zprobe_filter(remasked, clusters, make_prover(raw), params, seed=3, upload=make_uploader(raw, seed=7))
    assert again.accepted == result.accepted


def _measure(n: int, fraction: float, attack: str, seeds: range) -> tuple[int, int, int, int]:
    """(harmful attackers caught, harmful attackers, honest rejected, honest) over the seeds."""
    caught = harmful_total = false = honest_total = 0
    params = default_parameters(n, 0.4)
    for seed in seeds:
        updates, malicious, honest = _round(n, fraction, attack, seed)
        result = simulate_round(list(updates), params, seed)
        rejected = set(result.rejected)
        harmful = _harmful(updates, malicious, honest, params)
        caught += sum(i in rejected for i in harmful)
        harmful_total += len(harmful)
        false += sum(i in rejected for i in honest)
        honest_total += len(honest)
    return caught, harmful_total, false, honest_total


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.4])
@pytest.mark.parametrize("attack", list(ATTACKS))
def test_filter_catches_harmful_attackers_and_keeps_honest_ones_n50(attack: str, fraction: float) -> None:
    caught, harmful, false, honest = _measure(50, fraction, attack, range(2))
    if attack not in WITHIN_SPREAD:
        assert harmful > 0, "the attack should leave the honest band in this setting"
    assert caught >= 0.9 * harmful, f"caught {caught} of {harmful} harmful attackers"
    assert false <= 0.1 * honest, f"rejected {false} of {honest} honest clients"


@pytest.mark.parametrize("fraction", [0.1, 0.25])
@pytest.mark.parametrize("attack", list(ATTACKS))
def test_filter_catches_harmful_attackers_and_keeps_honest_ones_n20(attack: str, fraction: float) -> None:
    caught, harmful, false, honest = _measure(20, fraction, attack, range(2))
    if attack not in WITHIN_SPREAD:
        assert harmful > 0
    assert caught >= 0.9 * harmful, f"caught {caught} of {harmful} harmful attackers"
    assert false <= 0.1 * honest, f"rejected {false} of {honest} honest clients"


@pytest.mark.parametrize("n", [20, 50])
def test_without_attackers_rejections_stay_within_the_bound(n: int) -> None:
    params = default_parameters(n, 0.4)
    rejected = sum(len(simulate_round(list(_honest(n, DIM, seed)), params, seed).rejected) for seed in range(4))
    assert rejected <= params.max_false_rejection * n * 4


def test_single_check_without_uploader_is_the_papers_round() -> None:
    n = 50
    updates, malicious, honest = _round(n, 0.1, "scaling", seed=0)
    params = default_parameters(n, 0.4)
    result = simulate_round(list(updates), params, seed=0, refine=False)
    assert set(result.rejected) == set(malicious)
    assert (result.queries, result.aggregation_rounds) == (1, 1)
    assert len(result.coords) == params.q


def test_filter_result_is_reproducible_and_summarised() -> None:
    updates, _, _ = _round(20, 0.25, "ipm", seed=1)
    params = default_parameters(20, 0.4)
    a, b = simulate_round(list(updates), params, seed=5), simulate_round(list(updates), params, seed=5)
    assert isinstance(a, FilterResult)
    assert (a.accepted, a.rejected) == (b.accepted, b.rejected)
    assert sorted(a.accepted + a.rejected) == list(range(20))
    summary = a.summary()
    assert summary["accepted"] + summary["rejected"] == 20
    assert summary["aggregation_rounds"] >= 2 and summary["queries"] > params.search_steps
    assert a.centre.shape == a.threshold.shape == (DIM,)


# ---------------------------------------------------------------- robust baselines


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
