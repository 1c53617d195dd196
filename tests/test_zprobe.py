"""zprobe, the paper's rule: a round computed by hand from DESIGN.md's definitions, the eta search, detection.

The hand computation uses numpy on the raw updates and the definitions alone (cluster means,
their median and standard deviation, Eq. 2, all q coordinates within eta * sigma, eta from
phi_max by the search the module docstring states); only the server's random coordinate sample
is taken from the module's result. Detection is measured on the synthetic rounds of
tests/synthetic_updates.py (honest mu + 0.5 N(0, 1), and a non-IID-like variant with four
groups of clients around their own means).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from strategies.zprobe import (
    ZProbeDefence,
    ZProbeParams,
    chebyshev_start,
    cluster_bounds,
    search_eta,
    simulate_round,
    zprobe_round,
)
from strategies.zprobe_protocol import FIXED_POINT_BITS, make_prover, mask_updates
from tests.synthetic_updates import attacked_round, honest_updates

DIM = 2000


# ---------------------------------------------------------------- a round by hand


def _hand_eta(levels: np.ndarray, n: int, c: int, q: int, phi_max: float, max_probes: int, rtol: float) -> float:
    """The eta search of the module docstring, written out over the clients' levels."""
    target = math.ceil((1 - phi_max) * n - 1e-9)
    eta = math.sqrt(n / c) * math.sqrt(q / max(phi_max, 0.5 / n))
    lo = hi = None
    step = 2.0
    for _ in range(max_probes):
        passing = int((levels <= eta).sum())
        if passing <= target:
            lo = eta
        else:
            hi = eta
        if passing == target or (lo is not None and hi is not None and hi <= lo * (1 + rtol)):
            break
        if hi is None or lo is None:  # the step doubles until the target is bracketed
            eta, step = (eta * step if hi is None else eta / step), 2 * step
        else:
            eta = math.sqrt(lo * hi)
    assert lo is not None
    return lo


def test_a_small_round_matches_the_definitions_computed_by_hand() -> None:
    n, c, phi_max = 14, 7, 0.25
    rng = np.random.default_rng(4)
    mu = rng.normal(size=20)
    updates = mu + 0.3 * rng.normal(size=(n, 20))
    attackers = [3, 11]
    updates[attackers] = -2.0 * updates[attackers]  # sign flip, scaled
    clusters = [[0, 7], [1, 8], [2, 9], [3, 10], [4, 11], [5, 12], [6, 13]]  # the server's partition
    params = ZProbeParams(clusters=c, phi_max=phi_max)
    raw = [torch.from_numpy(u) for u in updates]
    result = zprobe_round(mask_updates(raw, clusters, seed=5), clusters, make_prover(raw), params, seed=9)

    # By hand: cluster means, their median and standard deviation (Bessel), Eq. 2.
    means = np.array([updates[cluster].mean(axis=0) for cluster in clusters])
    centre = np.median(means, axis=0)
    spread = np.std(means, axis=0, ddof=1)
    q = next(q for q in range(1, 1000) if (1 - 0.25) ** q <= 0.01)
    assert q == 17
    coords = result.coords.numpy()  # the server's random sample, the one input taken from the module
    assert len(set(coords.tolist())) == q and coords.min() >= 0 and coords.max() < 20
    # A client passes at eta iff every sampled coordinate is within eta * sigma: its level <= eta.
    levels = (np.abs(updates[:, coords] - centre[coords]) / spread[coords]).max(axis=1)
    eta = _hand_eta(levels, n, c, q, phi_max, params.max_probes, params.eta_rtol)
    accepted = [i for i in range(n) if levels[i] <= eta]

    atol = n * 2.0 ** -(FIXED_POINT_BITS - 1)  # the masked sums are exact up to fixed-point rounding
    assert np.allclose(result.centre.numpy(), centre, rtol=0, atol=atol)
    assert np.allclose(result.spread.numpy(), spread, rtol=1e-7, atol=atol)
    assert result.eta == pytest.approx(eta, rel=1e-9)
    assert np.allclose(result.threshold.numpy(), eta * spread, rtol=1e-7, atol=atol)
    assert result.accepted == accepted
    assert len(accepted) == result.target == math.ceil(0.75 * n)  # 11 of 14 pass, by the phi_max rule
    assert set(attackers) <= set(result.rejected)


def test_the_round_sees_only_masked_vectors_and_bits_and_counts_every_statement() -> None:
    n = 21
    updates, malicious, _ = attacked_round(n, DIM, 0.25, "scaling", {"factor": 10.0}, seed=2)
    raw = list(updates)
    clusters = [list(range(j, n, 7)) for j in range(7)]
    statements: list[bool] = []
    inner = make_prover(raw)

    def prove(client: int, coords: torch.Tensor, centre: torch.Tensor, threshold: torch.Tensor, max_exceed: int) -> bool:
        assert max_exceed == 0  # every sampled coordinate must be within
        answer = inner(client, coords, centre, threshold, max_exceed)
        statements.append(answer)
        return answer

    masked = mask_updates(raw, clusters, seed=1)
    assert all(v.dtype == torch.int64 for v in masked)
    result = zprobe_round(masked, clusters, prove, ZProbeParams(), seed=3)
    assert all(type(bit) is bool for bit in statements)
    assert result.queries_total == len(statements) and n <= len(statements) <= result.probes * n
    assert set(result.rejected) == set(malicious)
    # Other masks, same sums, same decision.
    again = zprobe_round(mask_updates(raw, clusters, seed=77), clusters, make_prover(raw), ZProbeParams(), seed=3)
    assert (again.accepted, again.eta) == (result.accepted, result.eta)


def test_cluster_bounds_are_the_median_and_std_of_the_cluster_means() -> None:
    sums = torch.tensor([[2.0, 4.0], [3.0, 9.0], [8.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    sizes = [2, 3, 4, 1]
    centre, spread = cluster_bounds(sums, sizes)
    means = sums.numpy() / np.array(sizes)[:, None]
    assert np.allclose(centre.numpy(), np.median(means, axis=0))
    assert np.allclose(spread.numpy(), np.std(means, axis=0, ddof=1))
    with pytest.raises(ValueError, match="3 clusters"):
        cluster_bounds(sums[:2], sizes[:2])


# ---------------------------------------------------------------- the eta search


def _asker(levels: dict[int, float], log: list[tuple[float, list[int]]]):
    def ask(eta: float, clients: list[int]) -> list[int]:
        log.append((eta, list(clients)))
        return [i for i in clients if levels[i] <= eta]

    return ask


def test_eta_search_stops_at_the_target_and_asks_only_what_it_does_not_know() -> None:
    levels = {0: 1.0, 1: 2.0, 2: 3.0, 3: 9.0, 4: 40.0}
    log: list[tuple[float, list[int]]] = []
    found = search_eta(list(levels), _asker(levels, log), start=16.0, target=3, max_probes=24, rtol=1e-3)
    # 16 -> 4 pass; 8 -> 3 pass: exactly the target, stop.
    assert [eta for eta, _ in log] == [16.0, 8.0] and (found.eta, found.accepted, found.probes) == (8.0, [0, 1, 2], 2)
    assert log[1][1] == [0, 1, 2, 3]  # client 4 failed at 16, so it fails at 8: not asked again
    assert found.queries == {0: 2, 1: 2, 2: 2, 3: 2, 4: 1}


def test_eta_search_bisects_and_with_ties_lets_at_most_the_target_pass() -> None:
    # Identical copies straddle a target of 2: the paper's "at most (1 - phi_max) n" keeps them all out.
    levels = {0: 1.0, 1: 5.0, 2: 5.0, 3: 5.0}
    found = search_eta(list(levels), _asker(levels, []), start=1.5, target=2, max_probes=40, rtol=1e-3)
    assert found.accepted == [0] and 5.0 / (1 + 1e-3) <= found.eta < 5.0
    levels = {0: 1.0, 1: 1e9}  # the cap stops the search before the target is bracketed: 1, 2, 8
    capped = search_eta(list(levels), _asker(levels, []), start=1.0, target=2, max_probes=3, rtol=1e-3)
    assert (capped.accepted, capped.eta, capped.probes) == ([0], 8.0, 3)
    levels = {0: 0.0, 1: 0.0, 2: 0.0}  # every client at the centre: more than target pass at every eta
    tied = search_eta(list(levels), _asker(levels, []), start=8.0, target=2, max_probes=4, rtol=1e-3)
    assert (tied.accepted, tied.eta) == ([0, 1, 2], 0.125)  # 8, 4, 1, 1/8: the narrowest statement tried


def test_eta_search_reaches_levels_far_below_its_start_within_the_probe_budget() -> None:
    # One huge update inflates the spread: every honest level is 1e-7 of the start, within a factor 2.
    levels = {i: 1e-6 * (1.0 + i / 20) for i in range(14)} | {14: 5.0}
    found = search_eta(list(levels), _asker(levels, []), start=12.0, target=11, max_probes=24, rtol=1e-3)
    assert found.accepted == list(range(11)) and found.probes <= 24


def test_chebyshev_start_and_parameters() -> None:
    assert chebyshev_start(50, 7, 17, 0.25) == pytest.approx(math.sqrt(50 / 7) * math.sqrt(68))
    assert chebyshev_start(50, 7, 17, 0.0) == pytest.approx(math.sqrt(50 / 7) * math.sqrt(17 * 100))
    params = ZProbeParams()
    assert (params.clusters, params.q, params.min_clients, params.target(50)) == (7, 17, 14, 38)
    assert ZProbeParams(s_m=0.5, delta=0.005).q == 8
    with pytest.raises(ValueError, match="3 clusters"):
        ZProbeParams(clusters=2)
    with pytest.raises(ValueError, match="phi_max"):
        ZProbeParams(phi_max=0.5)
    with pytest.raises(ValueError, match="at least 14 clients"):
        simulate_round(list(honest_updates(13, 10, seed=0)), params, seed=0)


def test_defence_records_eta_q_queries_and_seconds() -> None:
    defence = ZProbeDefence(0.25)
    assert (defence.name, defence.min_clients, ZProbeDefence.min_clients) == ("zprobe", 14, 14)
    assert ZProbeDefence(0.25, clusters=5).min_clients == 10
    updates, malicious, _ = attacked_round(20, 300, 0.25, "sign_flip", {"scale": 3.0}, seed=1)
    screening = defence.screen(updates, torch.full((20,), 1 / 20), seed=4)
    stats = screening.stats
    assert sorted(set(range(20)) - set(screening.kept)) == malicious
    assert (stats["accepted"], stats["rejected"], stats["target"], stats["q"], stats["clusters"]) == (15, 5, 15, 17, 7)
    assert stats["aggregation_rounds"] == 1 and stats["queries_max"] <= stats["probes"]
    assert stats["eta"] > 0 and stats["seconds_secure_aggregation"] > 0 and stats["seconds_checks"] > 0
    assert screening.kept == defence.screen(updates, torch.full((20,), 1 / 20), seed=4).kept  # seeded


# ---------------------------------------------------------------- detection on synthetic rounds


def _rates(fraction: float, attack: str, options: dict, phi_max: float, groups: int, seeds: range) -> tuple[float, float]:
    """(TPR, FPR) of zprobe over rounds of 50 clients."""
    caught = attackers = false = honest_total = 0
    for seed in seeds:
        updates, malicious, honest = attacked_round(50, DIM, fraction, attack, options, seed, groups=groups)
        result = simulate_round(list(updates), ZProbeParams(phi_max=phi_max), seed)
        rejected = set(result.rejected)
        assert len(result.accepted) <= result.target  # the phi_max rule: at most ceil((1 - phi_max) n) pass
        caught += len(rejected & set(malicious))
        attackers += len(malicious)
        false += len(rejected & set(honest))
        honest_total += len(honest)
    return caught / attackers, false / honest_total


@pytest.mark.parametrize("groups", [0, 4], ids=["iid", "non_iid"])
@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.4])
def test_scaling_attackers_are_all_caught_when_phi_max_bounds_them(fraction: float, groups: int) -> None:
    tpr, fpr = _rates(fraction, "scaling", {"factor": 10.0}, fraction, groups, range(4))
    assert tpr == 1.0 and fpr == 0.0


@pytest.mark.parametrize("groups", [0, 4], ids=["iid", "non_iid"])
@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.4])
def test_sign_flippers_are_mostly_caught(fraction: float, groups: int) -> None:
    # A sign flip of the own update moves a client as far as the mean is from zero; the paper's
    # spread (std of the cluster means) widens with it, and the max over 17 coordinates of an
    # honest client's noise competes: here it catches about 55-75% (module docstring).
    tpr, fpr = _rates(fraction, "sign_flip", {}, fraction, groups, range(4))
    assert tpr >= 0.45, f"TPR {tpr:.2f}"
    assert fpr <= (1 - tpr) * fraction / (1 - fraction) + 0.05, f"FPR {fpr:.2f}"  # the rest of the phi_max quota


def test_without_attackers_the_phi_max_quota_of_honest_clients_is_rejected() -> None:
    # The paper's rule sets eta so that at most (1 - phi_max) n pass, attackers or not; distinct updates: exactly.
    for seed in range(3):
        result = simulate_round(list(honest_updates(50, DIM, seed)), ZProbeParams(phi_max=0.2), seed)
        assert (len(result.accepted), len(result.rejected)) == (40, 10)
