"""Model-poisoning attacks and label flipping: each attack's defining property, and the errors."""

from __future__ import annotations

import math
from statistics import NormalDist

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora.attacks import (
    DATA_ATTACKS,
    MODEL_ATTACKS,
    Adversary,
    adaptive,
    alie,
    alie_z,
    apply_model_attack,
    attack_parameters,
    choose_malicious,
    defence_accepts,
    flip_labels,
    gaussian_noise,
    ipm,
    min_max,
    min_max_perturbation,
    scaling,
    sign_flip,
)


def _updates(n_honest: int = 9, n_malicious: int = 3, dim: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centre = torch.randn(dim, generator=g, dtype=torch.float64)
    honest = centre + 0.3 * torch.randn(n_honest, dim, generator=g, dtype=torch.float64)
    own = centre + 0.3 * torch.randn(n_malicious, dim, generator=g, dtype=torch.float64)
    return honest, own


def test_registry_names_every_model_attack() -> None:
    assert set(MODEL_ATTACKS) == {
        *("sign_flip", "scaling", "gaussian_noise", "alie", "non_omniscient", "ipm", "min_max", "adaptive")
    }
    assert DATA_ATTACKS == {"label_flip": flip_labels}


def test_sign_flip_negates_and_scales() -> None:
    honest, own = _updates()
    assert torch.equal(sign_flip(honest, own), -own)
    assert torch.allclose(sign_flip(honest, own, scale=2.5), -2.5 * own)


def test_scaling_multiplies() -> None:
    honest, own = _updates()
    assert torch.allclose(scaling(honest, own, factor=10.0), 10.0 * own)
    assert torch.allclose(scaling(honest, own), 10.0 * own)  # the default factor
    # Model replacement: boost by the round's number of clients, 9 honest + 3 malicious.
    assert torch.allclose(scaling(honest, own, factor="round_size"), 12.0 * own)
    with pytest.raises(ValueError, match="round_size"):
        scaling(honest, own, factor="clients")


def test_gaussian_noise_is_seeded_and_has_sigma() -> None:
    honest, own = _updates(n_malicious=4, dim=5000)
    a = gaussian_noise(honest, own, torch.Generator().manual_seed(3), sigma=0.7)
    b = gaussian_noise(honest, own, torch.Generator().manual_seed(3), sigma=0.7)
    assert torch.equal(a, b)
    noise = a - own
    assert abs(float(noise.mean())) < 0.02
    assert float(noise.std()) == pytest.approx(0.7, rel=0.03)
    assert torch.equal(gaussian_noise(honest, own, torch.Generator().manual_seed(3), sigma=0.0), own)


def test_alie_z_is_the_classic_formula() -> None:
    # n = 50, m = 12: s = floor(26) - 12 = 14, z = Phi^-1((50 - 14) / 50) = Phi^-1(0.72).
    assert alie_z(50, 12) == pytest.approx(NormalDist().inv_cdf(0.72))
    assert alie_z(50, 12) == pytest.approx(0.5828, abs=1e-4)
    # n = 20, m = 8: s = 11 - 8 = 3, z = Phi^-1(17 / 20).
    assert alie_z(20, 8) == pytest.approx(NormalDist().inv_cdf(0.85))
    with pytest.raises(ValueError, match="majority"):
        alie_z(10, 7)


def test_alie_is_mean_minus_z_std() -> None:
    honest, own = _updates()
    mean, std = honest.mean(dim=0), honest.std(dim=0)
    out = alie(honest, own, z=1.3)
    assert out.shape == own.shape
    for row in out:
        assert torch.allclose(row, mean - 1.3 * std)
    default = alie(honest, own)
    z = alie_z(honest.shape[0] + own.shape[0], own.shape[0])
    assert torch.allclose(default[0], mean - z * std)


def test_non_omniscient_is_mu_minus_kappa_sigma_of_the_attackers_own_updates() -> None:
    honest, own = _updates()
    out = apply_model_attack("non_omniscient", honest, own, 0, {"kappa": 5.0})
    for row in out:  # written out coordinate by coordinate, from the malicious clients' updates only
        for k in range(own.shape[1]):
            values = [float(v) for v in own[:, k]]
            mu = sum(values) / len(values)
            sigma = math.sqrt(sum((v - mu) ** 2 for v in values) / (len(values) - 1))
            assert math.isclose(float(row[k]), mu - 5.0 * sigma, rel_tol=1e-5, abs_tol=1e-6)
    assert torch.equal(out, apply_model_attack("non_omniscient", honest * 100, own, 0, {"kappa": 5.0}))
    with pytest.raises(ValueError, match="at least 2 malicious"):
        apply_model_attack("non_omniscient", honest, own[:1], 0)


def test_a_lone_non_omniscient_attacker_sends_what_it_trained() -> None:
    adversary = Adversary("non_omniscient", {}, num_clients=8, fraction=0.125, seed=0)
    updates = {c: torch.full((3,), float(c)) for c in range(8)}
    assert len(adversary.malicious) == 1 and adversary.rewrite(updates, server_round=1) == {}


def test_ipm_is_minus_eps_times_the_honest_mean() -> None:
    honest, own = _updates()
    out = ipm(honest, own, eps=0.1)
    assert torch.allclose(out, (-0.1 * honest.mean(dim=0)).expand_as(own))


def _closed_form_gamma(honest: torch.Tensor, direction: torch.Tensor) -> float:
    """The largest gamma with max_i ||mean + gamma p - h_i|| <= max_ij ||h_i - h_j||, by solving quadratics."""
    bound = torch.cdist(honest, honest).max() ** 2
    mean = honest.mean(dim=0)
    pp = float(direction @ direction)
    roots = []
    for h in honest:
        a = mean - h
        ap, aa = float(a @ direction), float(a @ a)
        roots.append((-ap + math.sqrt(ap * ap - pp * (aa - float(bound)))) / pp)
    return min(roots)


@pytest.mark.parametrize("perturbation", ["std", "unit", "sign"])
def test_min_max_respects_its_bound_and_is_maximal(perturbation: str) -> None:
    honest, own = _updates(n_honest=12, dim=60, seed=1)
    tol = 1e-7
    out = min_max(honest, own, perturbation=perturbation, tol=tol)
    assert torch.allclose(out, out[0].expand_as(out))
    bound = torch.cdist(honest, honest).max()
    assert torch.cdist(out[:1], honest).max() <= bound
    direction = min_max_perturbation(honest, perturbation)
    gamma = float((out[0] - honest.mean(dim=0)) @ direction / (direction @ direction))
    best = _closed_form_gamma(honest, direction)
    assert gamma <= best + 1e-9
    assert gamma == pytest.approx(best, rel=10 * tol, abs=10 * tol)
    # A little further along the direction breaks the bound: the search found the edge.
    beyond = honest.mean(dim=0) + (best * (1 + 1e-4) + 1e-6) * direction
    assert torch.cdist(beyond[None], honest).max() > bound


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 8), m=st.integers(1, 4), dim=st.integers(1, 12), seed=st.integers(0, 10_000))
def test_min_max_bound_holds_for_any_shape(n: int, m: int, dim: int, seed: int) -> None:
    honest, own = _updates(n_honest=n, n_malicious=m, dim=dim, seed=seed)
    out = min_max(honest, own)
    assert out.shape == (m, dim)
    assert torch.cdist(out[:1], honest).max() <= torch.cdist(honest, honest).max() + 1e-12


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 8), m=st.integers(1, 4), dim=st.integers(1, 12), seed=st.integers(0, 10_000))
def test_deterministic_attacks_keep_shape_and_dtype(n: int, m: int, dim: int, seed: int) -> None:
    honest, own = _updates(n_honest=n, n_malicious=m, dim=dim, seed=seed)
    own32, honest32 = own.float(), honest.float()
    for name in ("sign_flip", "scaling", "alie", "ipm", "min_max", "adaptive") + (("non_omniscient",) if m > 1 else ()):
        # ALIE's default z is undefined once the attackers are a majority.
        params = {"z": 1.0} if name == "alie" else {}
        out = apply_model_attack(name, honest32, own32, seed, params)
        assert out.shape == own32.shape and out.dtype == torch.float32, name


def test_apply_model_attack_checks_names_and_parameters() -> None:
    honest, own = _updates()
    with pytest.raises(ValueError, match="unknown model attack 'nope'"):
        apply_model_attack("nope", honest, own, 0)
    with pytest.raises(ValueError, match="flip_labels"):
        apply_model_attack("label_flip", honest, own, 0)
    with pytest.raises(ValueError, match="unknown parameter"):
        apply_model_attack("ipm", honest, own, 0, {"epsilon": 0.1})
    assert attack_parameters("min_max") == {"perturbation": "std", "gamma_init": 10.0, "tol": 1e-5}
    a = apply_model_attack("gaussian_noise", honest, own, 5, {"sigma": 0.2})
    b = apply_model_attack("gaussian_noise", honest, own, torch.Generator().manual_seed(5), {"sigma": 0.2})
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("sign_flip", {"scale": 0.0}, "scale"),
        ("scaling", {"factor": 0.0}, "factor"),
        ("gaussian_noise", {"sigma": -1.0}, "sigma"),
        ("ipm", {"eps": -0.5}, "eps"),
        ("alie", {"z": float("nan")}, "z"),
        ("min_max", {"perturbation": "cosine"}, "perturbation"),
        ("min_max", {"tol": 0.0}, "tol"),
        ("adaptive", {"perturbation": "cosine"}, "perturbation"),
        ("adaptive", {"gamma_init": -1.0}, "gamma_init"),
    ],
)
def test_bad_parameters_are_value_errors(name: str, params: dict, message: str) -> None:
    honest, own = _updates()
    with pytest.raises(ValueError, match=message):
        apply_model_attack(name, honest, own, 0, params)


def test_bad_shapes_are_value_errors() -> None:
    honest, own = _updates()
    with pytest.raises(ValueError, match="dim"):
        sign_flip(honest, own[:, :5])
    with pytest.raises(ValueError, match="2-D"):
        ipm(honest[0], own)
    with pytest.raises(ValueError, match="at least 2 honest"):
        alie(honest[:1], own)
    with pytest.raises(ValueError, match="Generator"):
        gaussian_noise(honest, own, None)


def test_choose_malicious_is_fixed_by_seed_and_sized_by_fraction() -> None:
    first = choose_malicious(50, 0.25, seed=11)
    assert first == choose_malicious(50, 0.25, seed=11)
    assert len(first) == 12 and first == sorted(set(first)) and all(0 <= i < 50 for i in first)
    assert choose_malicious(50, 0.25, seed=12) != first
    assert len(choose_malicious(20, 0.4, seed=0)) == 8
    assert len(choose_malicious(10, 0.3, seed=0)) == 3  # 0.3 * 10 is 2.9999999999999996 in floats
    assert choose_malicious(10, 0.0, seed=0) == []
    with pytest.raises(ValueError, match="fraction"):
        choose_malicious(10, 1.5, seed=0)


def test_flip_labels_maps_y_to_c_minus_1_minus_y() -> None:
    labels = torch.tensor([0, 1, 2, 3, 4, 2])
    assert flip_labels(labels, 5).tolist() == [4, 3, 2, 1, 0, 2]
    assert torch.equal(flip_labels(flip_labels(labels, 5), 5), labels)
    with pytest.raises(ValueError, match="range"):
        flip_labels(torch.tensor([0, 5]), 5)
    with pytest.raises(ValueError, match="integer"):
        flip_labels(torch.tensor([0.0, 1.0]), 2)


# ---------------------------------------------------------------- the adaptive attack


def test_adaptive_without_a_defence_is_min_max_along_the_same_direction() -> None:
    honest, own = _updates(n_honest=12, dim=30, seed=2)
    for perturbation in ("std", "mean"):
        expected = min_max(honest, own, perturbation=perturbation, gamma_init=1.0, tol=1e-6)
        assert torch.allclose(adaptive(honest, own, perturbation=perturbation, tol=1e-6), expected)
    assert attack_parameters("adaptive") == {"perturbation": "mean", "gamma_init": 1.0, "tol": 1e-3, "gamma_max": 1e6}


def test_adaptive_finds_the_edge_of_a_known_threshold() -> None:
    honest, own = _updates(n_honest=10, dim=20, seed=3)
    mean = honest.mean(dim=0)
    radius = 3.0 * float(torch.linalg.vector_norm(mean))

    def accepts(vector: torch.Tensor) -> bool:  # a defence keeping updates within `radius` of 0
        return float(torch.linalg.vector_norm(vector)) <= radius

    out = adaptive(honest, own, None, accepts, tol=1e-8)
    # Along -mean: ||(1 - gamma) mean|| = radius at gamma = 4.
    gamma = 1.0 - float(out[0] @ mean / (mean @ mean))
    assert torch.allclose(out, out[0].expand_as(out)) and gamma == pytest.approx(4.0, rel=1e-7)
    assert accepts(out[0]) and not accepts(mean - 4.001 * mean)
    # A rule that never binds: gamma_max; one that refuses even the mean: the mean itself.
    assert torch.allclose(adaptive(honest, own, None, lambda v: True, gamma_max=64.0)[0], mean - 64.0 * mean)
    assert torch.allclose(adaptive(honest, own, None, lambda v: False)[0], mean)


def _defended_round(n: int = 24, m: int = 6, dim: int = 200) -> tuple[torch.Tensor, list[int]]:
    g = torch.Generator().manual_seed(0)
    updates = torch.randn(dim, generator=g) + 0.5 * torch.randn(n, dim, generator=g)
    return updates, list(range(n - m, n))


@pytest.mark.parametrize("name", ["krum", "multikrum", "bulyan", "zprobe", "zprobe_refined"])
def test_adaptive_stays_just_inside_each_dropping_defence(name: str) -> None:
    from strategies import DEFENCES

    updates, bad = _defended_round()
    defence = DEFENCES[name](0.25)
    weights = torch.full((24,), 1 / 24, dtype=torch.float64)
    honest = updates[[i for i in range(24) if i not in bad]]
    accepts = defence_accepts(defence, updates, bad, weights, seed=5)
    out = adaptive(honest, updates[bad], None, accepts, tol=1e-4)
    mean = honest.double().mean(dim=0)
    gamma = float((mean - out[0].double()) @ mean / (mean @ mean))  # out = mean - gamma * mean
    assert gamma > 0, "the mean itself should pass every defence"
    trial = updates.clone()
    trial[bad] = out
    kept = set(defence.screen(trial, weights, 5).kept)
    assert (set(bad) <= kept) if name != "krum" else (kept <= set(bad))  # Krum keeps one: a malicious one
    further = updates.clone()
    further[bad] = (mean - 1.05 * gamma * mean).to(updates.dtype)
    assert not accepts(further[bad[0]]), "5% further along, the defence should catch them"


def test_the_adversary_hands_its_round_to_the_adaptive_attack() -> None:
    from strategies.krum import MultiKrumDefence

    updates, bad = _defended_round()
    by_client = dict(enumerate(updates))
    adversary = Adversary("adaptive", {"tol": 1e-4}, num_clients=24, fraction=0.25, seed=1)
    adversary.malicious = frozenset(bad)  # fix who attacks for the check below
    defence = MultiKrumDefence(0.25)
    rewritten = adversary.rewrite(by_client, server_round=1, defence=defence, weights=dict.fromkeys(range(24), 10.0))
    assert sorted(rewritten) == bad
    trial = torch.stack([rewritten.get(c, by_client[c]) for c in range(24)])
    assert set(bad) <= set(defence.screen(trial, torch.full((24,), 1 / 24), seed=0).kept)
    # Without a defence (or behind the median) it obeys min-max's bound instead.
    plain = adversary.rewrite(by_client, server_round=1)
    honest = updates[[i for i in range(24) if i not in bad]]
    expected = min_max(honest, updates[bad], perturbation="mean", gamma_init=1.0, tol=1e-4)
    assert torch.allclose(torch.stack([plain[c] for c in bad]), expected)
