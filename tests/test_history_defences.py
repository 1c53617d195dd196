"""The zPROBE paper's Table 1 baselines: centered clipping, RFA and bucketing against brute-force loops of their papers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

from fedlora.config import ConfigError, ExperimentConfig
from fedlora.roster import Roster
from strategies import DEFENCES, build_defence
from strategies.bucketing import BucketingDefence, bucket_assignment, bucket_means, bucket_phi
from strategies.centered_clipping import CenteredClippingDefence, centered_clipping
from strategies.krum import KrumDefence
from strategies.median import MedianDefence
from strategies.rfa import RFADefence, geometric_median, weiszfeld_objective
from strategies.robust import Defence, Screening
from tests.synthetic_updates import attacked_round

SIZES = {"n": st.integers(2, 9), "dim": st.integers(1, 6), "seed": st.integers(0, 10_000)}


def _rows(n: int, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)) * np.random.default_rng(seed + 1).uniform(0.1, 20)


def _brute_centered_clipping(x: np.ndarray, v: np.ndarray, tau: float, iterations: int) -> np.ndarray:
    """Karimireddy et al.'s iteration written out client by client."""
    for _ in range(iterations):
        step = np.zeros_like(v)
        for row in x:
            diff = row - v
            norm = math.sqrt(float(diff @ diff))
            step += diff * min(1.0, tau / norm) if norm > 0 else diff
        v = v + step / len(x)
    return v


def _brute_weiszfeld(x: np.ndarray, alpha: np.ndarray, iterations: int, nu: float) -> np.ndarray:
    """Pillutla et al.'s smoothed Weiszfeld written out client by client."""
    alpha = alpha / alpha.sum()
    v = sum(a * row for a, row in zip(alpha, x, strict=True))
    for _ in range(iterations):
        betas = [a / max(nu, math.sqrt(float((v - row) @ (v - row)))) for a, row in zip(alpha, x, strict=True)]
        v = sum(b * row for b, row in zip(betas, x, strict=True)) / sum(betas)
    return v


@settings(max_examples=40, deadline=None)
@given(**SIZES, tau=st.floats(0.01, 50), iterations=st.integers(1, 6), from_center=st.booleans())
def test_centered_clipping_equals_the_papers_iteration(
    n: int, dim: int, seed: int, tau: float, iterations: int, from_center: bool
) -> None:
    x = _rows(n, dim, seed)
    center = np.random.default_rng(seed + 2).normal(size=dim) if from_center else np.zeros(dim)
    ours = centered_clipping(
        torch.from_numpy(x), center=torch.from_numpy(center) if from_center else None, tau=tau, iterations=iterations
    )
    np.testing.assert_allclose(ours.numpy(), _brute_centered_clipping(x, center, tau, iterations), rtol=1e-6, atol=1e-9)


def test_centered_clipping_with_a_radius_no_update_reaches_is_the_mean() -> None:
    x = torch.from_numpy(_rows(7, 5, 1))
    torch.testing.assert_close(centered_clipping(x, tau=1e9, iterations=1), x.mean(dim=0))


def _screen(defence: CenteredClippingDefence, trained: str, x: torch.Tensor, installed: bool = True) -> Screening:
    defence.begin_round(trained)
    screening = defence.screen(x, torch.full((x.shape[0],), 1 / x.shape[0]), seed=0)
    defence.settle(installed)
    return screening


def test_centered_clipping_starts_from_the_last_installed_centre_of_the_same_factors() -> None:
    x, y = torch.from_numpy(_rows(7, 5, 1)), torch.from_numpy(_rows(7, 5, 2))
    defence = CenteredClippingDefence(tau=0.5, iterations=2)
    first = _screen(defence, "B", x)
    assert first.stats["restarted"] == 1
    # An A round (RoLoRA, square layers: the same length) starts from its own centre, zero.
    assert _screen(defence, "A", y).stats["restarted"] == 1
    second = _screen(defence, "B", x, installed=False)
    np.testing.assert_allclose(second.aggregate.numpy(), _brute_centered_clipping(x.numpy(), first.aggregate.numpy(), 0.5, 2))
    # The round above was not installed: the next B round starts from the first round's centre again.
    third = _screen(defence, "B", y)
    np.testing.assert_allclose(third.aggregate.numpy(), _brute_centered_clipping(y.numpy(), first.aggregate.numpy(), 0.5, 2))
    # An update of another length restarts from zero.
    assert _screen(defence, "B", x[:, :3]).stats["restarted"] == 1


@pytest.mark.usefixtures("flower_task")
def test_the_strategy_settles_the_centre_only_for_installed_rounds() -> None:
    from tests.test_hostile_values import EXAMPLES, NODES, BrokenRule, N, new_strategy, run_round  # noqa: PLC0415

    installed = new_strategy("fedit", "centered_clipping")
    assert run_round(installed)[0] is not None and installed.defence.center is not None
    broken = BrokenRule(Roster(NODES, dict.fromkeys(NODES.values(), EXAMPLES)), clients_per_round=N)
    broken.defence = CenteredClippingDefence()
    assert run_round(broken)[0] is None and broken.defence.center is None


@settings(max_examples=40, deadline=None)
@given(**SIZES, iterations=st.integers(1, 8), nu=st.sampled_from([1e-6, 1e-3, 0.1]))
def test_rfa_equals_the_papers_smoothed_weiszfeld(n: int, dim: int, seed: int, iterations: int, nu: float) -> None:
    x = _rows(n, dim, seed)
    alpha = np.random.default_rng(seed + 3).uniform(0.1, 3.0, size=n)
    ours = geometric_median(torch.from_numpy(x), torch.from_numpy(alpha), iterations=iterations, nu=nu)
    np.testing.assert_allclose(ours.numpy(), _brute_weiszfeld(x, alpha, iterations, nu), rtol=1e-6, atol=1e-9)


@settings(max_examples=25, deadline=None)
@given(**SIZES)
def test_rfa_descends_and_reaches_the_geometric_median(n: int, dim: int, seed: int) -> None:
    x = torch.from_numpy(_rows(n, dim, seed))
    w = torch.full((n,), 1 / n, dtype=torch.float64)
    objectives = [weiszfeld_objective(x, w, geometric_median(x, w, iterations=t)) for t in range(1, 8)]
    assert all(later <= earlier * (1 + 1e-9) for earlier, later in zip(objectives, objectives[1:], strict=False))
    best = minimize(lambda v: weiszfeld_objective(x, w, torch.from_numpy(v)), x.mean(dim=0).numpy(), method="Nelder-Mead")
    converged = weiszfeld_objective(x, w, geometric_median(x, w, iterations=500, nu=1e-12))
    assert converged <= best.fun * (1 + 1e-6) + 1e-9


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 30), size=st.integers(1, 7), seed=st.integers(0, 10_000))
def test_buckets_partition_the_clients_by_the_seed(n: int, size: int, seed: int) -> None:
    buckets = bucket_assignment(n, size, seed)
    assert sorted(i for bucket in buckets for i in bucket) == list(range(n))
    assert len(buckets) == math.ceil(n / size) and all(len(b) == size for b in buckets[:-1])
    assert buckets == bucket_assignment(n, size, seed)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(5, 16), dim=st.integers(1, 5), seed=st.integers(0, 10_000), size=st.integers(2, 3))
def test_bucketing_applies_its_rule_to_the_bucket_means(n: int, dim: int, seed: int, size: int) -> None:
    x = torch.from_numpy(_rows(n, dim, seed))
    weights = torch.full((n,), 1 / n, dtype=torch.float64)
    buckets = bucket_assignment(n, size, seed)
    means = np.stack([x.numpy()[b].mean(axis=0) for b in buckets])
    np.testing.assert_allclose(bucket_means(x, buckets).numpy(), means, rtol=1e-12)
    median = BucketingDefence(MedianDefence(bucket_phi(0.2, size)), size, 0.2).screen(x, weights, seed)
    np.testing.assert_allclose(median.aggregate.numpy(), np.median(means, axis=0), rtol=1e-9, atol=1e-12)
    assert median.kept == list(range(n))
    if len(buckets) >= 3:  # Krum keeps one bucket mean: the one with the lowest score among the means
        krum = BucketingDefence(KrumDefence(bucket_phi(0.2, size)), size, 0.2).screen(x, weights, seed)
        chosen = KrumDefence(bucket_phi(0.2, size)).screen(torch.from_numpy(means), None, seed).kept
        np.testing.assert_allclose(krum.aggregate.numpy(), means[chosen].mean(axis=0), rtol=1e-9)


def test_bucketing_keeps_no_client_when_its_rule_keeps_no_bucket() -> None:
    """zprobe's "at most (1 - phi_max) n" can keep no bucket (a tie group larger than the target at
    the lowest level above zero): the round then has no update, not the NaN mean of no buckets."""

    class KeepsNone(Defence):
        name = "keeps_none"
        description = "keeps no update"

        def screen(self, updates: torch.Tensor, weights: torch.Tensor, seed: int) -> Screening:
            return Screening(kept=[], stats={"kept": 0})

    defence = BucketingDefence(KeepsNone(bucket_phi(0.1, 2)), 2, 0.1)
    screening = defence.screen(torch.ones(6, 3, dtype=torch.float64), torch.full((6,), 1 / 6, dtype=torch.float64), 0)
    assert screening.kept == [] and screening.aggregate is None
    assert (screening.stats["buckets_kept"], screening.stats["inner_kept"]) == (0, 0)


ATTACKS = {
    "sign_flip": {"scale": 5.0},
    "scaling": {"factor": 10.0},
    "gaussian_noise": {"sigma": 10.0},
    "alie": {},
    "ipm": {"eps": 0.5},
    "min_max": {},
}


@pytest.mark.parametrize("groups", [0, 4], ids=["iid", "grouped"])
@pytest.mark.parametrize("attack", list(ATTACKS))
@pytest.mark.parametrize("rule", ["centered_clipping", "rfa", "bucketing+rfa"])
def test_each_new_rule_stays_within_the_honest_spread_under_every_attack(rule: str, attack: str, groups: int) -> None:
    """A quarter of 24 clients attack (an eighth behind buckets of 2, so that at most a quarter of the buckets
    hold one: bucketing's bound s * phi < 1/2); the aggregate stays nearer the honest mean than a typical
    honest update."""
    fraction = 0.125 if rule.startswith("bucketing") else 0.25
    updates, _, honest = attacked_round(24, 32, fraction, attack, ATTACKS[attack], seed=3, groups=groups)
    honest_mean = updates[honest].mean(dim=0)
    spread = float((updates[honest] - honest_mean).norm(dim=1).median())
    defence = {
        # From a zero centre (a first round) one iteration cannot reach the honest cloud: five do.
        "centered_clipping": CenteredClippingDefence(tau=spread, iterations=5),
        "rfa": RFADefence(),
        "bucketing+rfa": BucketingDefence(RFADefence(bucket_phi(0.125, 2)), 2, 0.125),
    }[rule]
    screening = defence.screen(updates, torch.full((24,), 1 / 24), seed=0)
    error = float((screening.aggregate - honest_mean).norm())
    assert math.isfinite(error) and error < spread
    if attack in ("sign_flip", "scaling", "gaussian_noise"):  # the attacks that move the plain mean far
        assert error < 0.5 * float((updates.mean(dim=0) - honest_mean).norm())


def test_config_names_the_rules_and_their_options() -> None:
    assert {"centered_clipping", "rfa"} <= set(DEFENCES)
    config = ExperimentConfig.model_validate(
        {"strategy": {"robust": "centered_clipping", "cc_tau": 0.3, "cc_iterations": 2}}
    ).strategy
    defence = build_defence(config)
    assert isinstance(defence, CenteredClippingDefence) and (defence.tau, defence.iterations) == (0.3, 2)
    bucketed = build_defence(
        ExperimentConfig.model_validate({"strategy": {"robust": "krum", "bucket_size": 3, "phi_max": 0.1}}).strategy
    )
    assert isinstance(bucketed, BucketingDefence) and bucketed.name == "bucketing+krum"
    assert bucketed.inner.phi_max == pytest.approx(0.3) and bucketed.min_clients == 7
    zprobe = build_defence(
        ExperimentConfig.model_validate({"strategy": {"robust": "zprobe", "bucket_size": 2, "phi_max": 0.2}}).strategy
    )
    assert zprobe.inner.params.phi_max == pytest.approx(0.4)  # the bound zPROBE screens with, not only its attribute
    with pytest.raises((ConfigError, ValueError), match="bucket_size"):
        ExperimentConfig.model_validate({"strategy": {"bucket_size": 2}})
