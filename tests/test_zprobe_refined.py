"""zprobe_refined (the screening-and-refinement filter): statistics, sample sizes, the filter's detection.

Detection is measured on controlled synthetic updates (tests/synthetic_updates.py): honest ones
mu + 0.5 * N(0, 1) around a common mu ~ N(0, 1), dim 2000. An attacker counts as *harmful* when
it lies outside the honest band (eta honest standard deviations around the honest mean, from the
true honest updates) on at least a fraction s_m of the coordinates: that is the displacement the
filter promises to catch. ALIE and min-max are built to stay inside the band; for them only the
honest false rejections are checked.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from strategies.zprobe_protocol import FIXED_POINT_BITS, eq2_samples, make_prover, make_uploader, mask_updates, random_clusters
from strategies.zprobe_refined import (
    RefinedParams,
    RefinedResult,
    allowed_exceedances,
    default_parameters,
    refined_filter,
    required_samples,
    robust_bounds,
    simulate_round,
)
from tests.synthetic_updates import HONEST_SPREAD, attacked_round, honest_updates

DIM = 2000
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


def _round(n: int, fraction: float, attack: str, seed: int) -> tuple[torch.Tensor, list[int], list[int]]:
    """n updates of which floor(fraction * n) are malicious: (updates, malicious, honest)."""
    return attacked_round(n, DIM, fraction, attack, ATTACKS[attack], seed)


def _harmful(updates: torch.Tensor, malicious: list[int], honest: list[int], params: RefinedParams) -> list[int]:
    """Attackers outside the true honest band (eta honest stds) on at least s_m of the coordinates."""
    mean, std = updates[honest].mean(dim=0), updates[honest].std(dim=0)
    return [i for i in malicious if ((updates[i] - mean).abs() > params.eta * std).double().mean() >= params.s_m]


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
    updates = honest_updates(48, 4000, seed=5)
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

    result = refined_filter(masked, clusters, prove, params, seed=3, upload=upload)
    # Everything that reached the filter from the clients: masked vectors and booleans.
    for vectors in [dict(enumerate(masked)), *fresh_rounds]:
        for i, vector in vectors.items():
            assert vector.dtype == torch.int64
            assert float((vector.double() / 2.0**FIXED_POINT_BITS - raw[i].double()).abs().median()) > 1e6
    assert bits and all(type(bit) is bool for bit in bits)
    assert set(result.rejected) == set(malicious)
    # The filter depends on the uploads only through cluster sums: other masks, same decision.
    remasked = mask_updates(raw, clusters, seed=99)
    again = refined_filter(remasked, clusters, make_prover(raw), params, seed=3, upload=make_uploader(raw, seed=7))
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
    rejected = sum(len(simulate_round(list(honest_updates(n, DIM, seed)), params, seed).rejected) for seed in range(4))
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
    assert isinstance(a, RefinedResult)
    assert (a.accepted, a.rejected) == (b.accepted, b.rejected)
    assert sorted(a.accepted + a.rejected) == list(range(20))
    summary = a.summary()
    assert summary["accepted"] + summary["rejected"] == 20
    assert summary["aggregation_rounds"] >= 2 and summary["queries"] > params.search_steps
    assert a.centre.shape == a.threshold.shape == (DIM,)
