"""Adaptive clipping for user-level DP (Andrew et al. 2021): the noise split, the noised count, the
clip's convergence to the quantile, the server's own bits, refusals and the clip across a checkpoint."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import PRVAccountant, RDPAccountant

from fedlora.adaptive_clip import CLIP_RANGE, AdaptiveClip, centred_count, combined_noise_multiplier
from fedlora.config import ConfigError
from fedlora.privacy import PrivacyBudgetError
from fedlora.simulation import check_runnable
from fedlora.user_privacy import UserLevelPrivacy, UserLevelSettings
from strategies.base import ARRAYS_KEY, INFO_KEY, METRICS_KEY
from strategies.fedit import FedIT
from tests.conftest import one_line_refusal, reply_from, tiny_config
from tests.test_cli import QUICKSTART
from tests.test_user_privacy import ROSTER, assert_gaussian, global_state, moved, user_config

pytestmark = pytest.mark.usefixtures("flower_task")

QUIET = 1e-9  # a noise so small the mechanism is deterministic to the tests' precision


def adaptive_mechanism(
    clients_per_round: int,
    population: int,
    *,
    quantile: float = 0.5,
    count_noise: float = QUIET,
    clip: float = 1.0,
    lr: float = 0.2,
) -> UserLevelPrivacy:
    adaptive = AdaptiveClip(quantile, lr=lr, count_noise=count_noise)
    settings = UserLevelSettings(3.0, 1e-5, clip, "central", "prv", 10, clients_per_round, population, False, adaptive)
    return UserLevelPrivacy(settings, noise_multiplier=QUIET)


def adaptive_config(*overrides: str):
    """6 clients, 3 a round, 3 rounds at epsilon 8 (sigma about 0.8): a count noise of 2 leaves the update its share."""
    return user_config(
        "federation.num_clients=6",
        "federation.clients_per_round=3",
        "federation.rounds=3",
        "privacy.epsilon=8.0",
        "privacy.adaptive_clip=true",
        "privacy.clip_count_noise=2.0",
        *overrides,
    )


# --- the split of the noise ---------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(sigma=st.floats(0.05, 50.0), headroom=st.floats(1.001, 1e3))
def test_the_updates_noise_and_the_counts_together_are_the_calibrated_sigma(sigma: float, headroom: float) -> None:
    count_noise = headroom * sigma / 2  # 2 sigma_b > sigma: a split exists
    update = AdaptiveClip(0.5, 0.2, count_noise).update_noise_multiplier(sigma)
    assert update == pytest.approx((sigma**-2 - (2 * count_noise) ** -2) ** -0.5, rel=1e-12)
    assert update > sigma  # the count's share costs the update noise
    assert combined_noise_multiplier(update, count_noise) == pytest.approx(sigma, rel=1e-9)


@pytest.mark.parametrize(("accountant", "reference"), [("prv", PRVAccountant), ("rdp", RDPAccountant)])
def test_the_reported_epsilon_is_opacus_for_the_combined_multiplier(accountant: str, reference) -> None:
    config = adaptive_config(f"privacy.accountant={accountant!r}")
    privacy = UserLevelPrivacy.for_run(config, population=6)
    combined = combined_noise_multiplier(privacy.update_noise_multiplier, 2.0)
    assert combined == pytest.approx(privacy.noise_multiplier, rel=1e-9) and privacy.update_noise_multiplier > combined
    assert privacy.noise_std == pytest.approx(privacy.update_noise_multiplier * 1.0)  # z_Delta C_0
    for rounds in (1, 2, 3):
        privacy.charge()
        opacus = reference()
        opacus.history = [(combined, 0.5, rounds)]
        assert privacy.epsilon() == pytest.approx(opacus.get_epsilon(delta=1e-5), abs=1e-6)
    assert privacy.epsilon() <= 8.0 and privacy.summary()["adaptive_clip"]["update_noise_multiplier"] > combined


def test_a_count_noise_too_small_for_the_budget_is_refused_in_one_line() -> None:
    with pytest.raises(PrivacyBudgetError) as caught:
        check_runnable(adaptive_config("privacy.clip_count_noise=0.1"))
    line = str(caught.value)
    assert line.startswith("privacy.clip_count_noise: 0.1 on the count") and "\n" not in line


def test_the_papers_default_count_noise_out_of_reach_is_one_line_and_exit_2(tmp_path) -> None:
    # The quickstart's 4 clients a round: sigma_b = 4 / 20 = 0.2, far below half the sigma epsilon 3 needs.
    settings = ("privacy.enabled=true", "privacy.unit='user'", "privacy.adaptive_clip=true")
    line = one_line_refusal(
        "simulate", str(QUICKSTART), *[a for s in settings for a in ("--set", s)], "--out", str(tmp_path / "run")
    )
    assert "privacy.clip_count_noise: 0.2 on the count of unclipped updates is too little" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("privacy.adaptive_clip=true",), "privacy.adaptive_clip: a user-level setting"),  # example level
        (("privacy.enabled=true", "privacy.unit='user'", "privacy.clip_lr=0.3"), "privacy.clip_lr: an adaptive clipping"),
        (
            ("privacy.enabled=true", "privacy.unit='user'", "privacy.adaptive_clip=true", "privacy.noise='distributed'"),
            "privacy.adaptive_clip: needs privacy.noise = 'central'",
        ),
        (("privacy.enabled=true", "privacy.unit='user'", "privacy.clip_quantile=1.5"), "privacy.clip_quantile"),
        (("privacy.enabled=true", "privacy.unit='user'", "privacy.clip_count_noise=0.0"), "privacy.clip_count_noise"),
    ],
    ids=["example-level", "lr-without-adaptive", "distributed", "quantile-out-of-range", "count-noise-zero"],
)
def test_adaptive_clip_settings_that_cannot_apply_are_refused_in_one_line(overrides: tuple[str, ...], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        tiny_config(*overrides)
    assert message in str(caught.value) and "\n" not in str(caught.value)


# --- the count -------------------------------------------------------------------------------
@settings(max_examples=100, deadline=None)
@given(norms=st.lists(st.floats(0.0, 1e6), max_size=30), clip=st.floats(1e-3, 1e3))
def test_the_centred_count_is_half_the_unclipped_less_half_the_clipped(norms: list[float], clip: float) -> None:
    unclipped = sum(norm <= clip for norm in norms)
    assert centred_count(norms, clip) == (unclipped - (len(norms) - unclipped)) / 2
    assert abs(centred_count(norms[:1], clip)) == (0.5 if norms else 0.0)  # one user moves it by 1/2: sensitivity 1/2


def test_the_count_is_noised_with_standard_deviation_sigma_b() -> None:
    # 1000 expected clients, so that a noise of std 3 never reaches the [0, 1] clamp of the fraction.
    privacy = adaptive_mechanism(clients_per_round=1000, population=2000, count_noise=3.0)
    fractions = torch.tensor([privacy.adapt_clip([], seed)["unclipped_fraction"] for seed in range(20_000)])
    assert_gaussian((fractions - 0.5) * 1000, 3.0)  # b~ = (0 + N(0, sigma_b^2)) / (q N) + 1/2


def test_the_clip_moves_geometrically_against_the_noised_fraction() -> None:
    privacy = adaptive_mechanism(clients_per_round=4, population=8, quantile=0.5)
    # 3 replies of the 4 expected, 2 under C = 1: centred (2 - 1) / 2, b~ = 0.5 / 4 + 1/2 (uncentred: 2 / 4).
    figures = privacy.adapt_clip([0.1, 0.2, 5.0], seed=0)
    assert figures["unclipped_fraction"] == pytest.approx(0.625)
    assert figures["next_clip"] == pytest.approx(math.exp(-0.2 * 0.125)) == privacy.clip


def test_the_clip_stays_within_a_factor_clip_range_of_the_first() -> None:
    """A clip driven down (every update unclipped) or up (every update clipped) round after round
    stops at C_0 / CLIP_RANGE or C_0 CLIP_RANGE: without the bound it reaches 0 (and stays) or inf."""
    for norm, bound in ((0.0, 1.0 / CLIP_RANGE), (1e300, CLIP_RANGE)):
        privacy = adaptive_mechanism(clients_per_round=4, population=8, quantile=0.5, lr=10.0)
        for server_round in range(400):
            privacy.adapt_clip([norm] * 4, seed=server_round)
        assert privacy.clip == pytest.approx(bound) and math.isfinite(privacy.clip) and privacy.clip > 0


# --- convergence ------------------------------------------------------------------------------
@pytest.mark.parametrize("quantile", [0.2, 0.5, 0.8])
def test_without_noise_the_clip_converges_to_the_quantile_of_the_update_norms(quantile: float) -> None:
    """Norms log-normal(0, 0.5) (the gamma-quantile is exp(0.5 Phi^-1(gamma))), 100 updates a round, from a
    clip 10 times too small: after 200 rounds the clip is within 5% of the quantile."""
    true_quantile = math.exp(0.5 * torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(quantile)).item())
    privacy = adaptive_mechanism(clients_per_round=100, population=200, quantile=quantile, clip=0.1 * true_quantile)
    generator = torch.Generator().manual_seed(0)
    clips = []
    for server_round in range(200):
        norms = torch.exp(0.5 * torch.randn(100, generator=generator, dtype=torch.float64))
        changes = [norm.reshape(1) for norm in norms]  # one-coordinate updates: the norm is the value
        _, figures = privacy.privatize(changes, sampled=100, size=1, seed=server_round)
        clips.append(figures["next_clip"])
    settled = sum(clips[-50:]) / 50
    assert settled == pytest.approx(true_quantile, rel=0.05)
    assert clips[20] < 0.9 * true_quantile  # it did have to travel there


# --- the server's bits, in a strategy's round ---------------------------------------------------
def claiming_reply(node: int, state, a_digest: str) -> RecordDict:
    """A reply that claims (in Flower's adaptive-clipping metric) its update was not clipped."""
    metrics = MetricRecord({"num-examples": 10, "train-loss": 1.0, "norm_bit": 0})
    content = RecordDict(
        {ARRAYS_KEY: state.to_array_record(), METRICS_KEY: metrics, INFO_KEY: ConfigRecord({"a-digest": a_digest})}
    )
    return reply_from(node, content)


@pytest.mark.parametrize(("scale", "grows"), [(1e3, True), (1e-6, False)])
def test_the_clip_bit_is_the_servers_measure_of_the_update_not_the_clients_claim(scale: float, grows: bool) -> None:
    privacy = adaptive_mechanism(clients_per_round=4, population=8, clip=0.5)
    strategy = FedIT(ROSTER, clients_per_round=4, seed=3, weighting="uniform")
    strategy.user_privacy = privacy
    before = strategy.initial_state(global_state())
    messages = list(strategy.configure_train(1, before.to_array_record(), ConfigRecord(), grid=None))
    nodes = [message.metadata.dst_node_id for message in messages]
    replies = [claiming_reply(node, moved(before, scale, node), before.digest("A")) for node in nodes]
    strategy.aggregate_train(1, replies)
    figures = strategy.last_round.extra["user_dp"]
    assert nodes and figures["user_clip"] == 0.5 and figures["clipped"] == (len(nodes) if grows else 0)
    unclipped = 0 if grows else len(nodes)
    assert figures["unclipped_fraction"] == pytest.approx(min(1.0, max(0.0, (unclipped - len(nodes) / 2) / 4 + 0.5)))
    assert (figures["next_clip"] > 0.5) == grows and privacy.clip == figures["next_clip"]


# --- the clip across a checkpoint -------------------------------------------------------------
def test_a_checkpoint_keeps_the_adapted_clip() -> None:
    config = adaptive_config()
    privacy = UserLevelPrivacy.for_run(config, population=6)
    privacy.privatize([torch.full((4,), 10.0, dtype=torch.float64)] * 3, sampled=3, size=4, seed=1)
    privacy.charge()
    assert privacy.clip != 1.0  # moved from user_clip = C_0
    again = UserLevelPrivacy.from_state(config, privacy.state())
    assert (again.clip, again.noise_std, again.rounds_charged) == (privacy.clip, privacy.noise_std, 1)
    assert again.summary()["clip"] == privacy.clip and again.summary()["adaptive_clip"]["initial_clip"] == 1.0


def test_a_checkpoint_from_before_adaptive_clipping_resumes_at_the_fixed_clip() -> None:
    config = user_config("federation.num_clients=10", "federation.clients_per_round=2")
    old = {"unit": "user", "noise_multiplier": 1.2, "population": 10, "rounds_charged": 1}  # no "clip"
    assert UserLevelPrivacy.from_state(config, old).clip == config.privacy.user_clip
