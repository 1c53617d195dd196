"""User-level DP (DP-FedAvg): Opacus' epsilon, clipping, calibrated noise, distributed shares, refusals."""

from __future__ import annotations

import math
import tomllib

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import PRVAccountant, RDPAccountant
from scipy import stats

from fedlora.config import ConfigError
from fedlora.export_card import RunFigures, model_card
from fedlora.lora import LoraState
from fedlora.privacy import PrivacyBudgetError
from fedlora.roster import Roster
from fedlora.server_app import with_secret_noise
from fedlora.simulation import check_runnable
from fedlora.user_privacy import (
    CLIP_KEY,
    SECRET_KEY,
    SEEDED_NOISE,
    SHARE_STD_KEY,
    ShareInstruction,
    UserLevelPrivacy,
    UserLevelSettings,
    clip_to_norm,
    delta_vector,
    group_privacy,
    honest_share_bound,
    poisson_sample,
)
from strategies import STRATEGIES
from strategies.base import ARRAYS_KEY, INFO_KEY, METRICS_KEY, LoraStrategy
from strategies.fedit import FedIT
from strategies.fedsvd import FedSVD
from strategies.ffa_lora import FFALoRA
from tests.conftest import one_line_refusal, reply_from, tiny_config
from tests.test_cli import QUICKSTART

pytestmark = pytest.mark.usefixtures("flower_task")

N = 8  # clients in the hand-made federation
NODES = {100 + client: client for client in range(N)}
ROSTER = Roster(NODES, dict.fromkeys(range(N), 10))
CLIP = 0.5


def user_config(*overrides: str):
    return tiny_config("privacy.enabled=true", "privacy.unit='user'", "privacy.epsilon=3.0", *overrides)


def mechanism(
    noise_multiplier: float, noise: str = "central", clients_per_round: int = 4, secret: bool = False
) -> UserLevelPrivacy:
    settings = UserLevelSettings(3.0, 1e-5, CLIP, noise, "prv", 10, clients_per_round, N, secret)
    return UserLevelPrivacy(settings, noise_multiplier)


def global_state() -> LoraState:
    g = torch.Generator().manual_seed(0)
    return LoraState(
        factors={f"layer{i}": {"A": torch.randn(2, 5, generator=g), "B": torch.randn(6, 2, generator=g)} for i in range(2)},
        head={"classifier.weight": torch.randn(3, 6, generator=g), "classifier.bias": torch.zeros(3)},
    )


def moved(state: LoraState, scale: float, seed: int) -> LoraState:
    g = torch.Generator().manual_seed(seed)
    return state.plus(state.unflatten(scale * torch.randn(state.flatten().numel(), generator=g)))


def reply(node: int, state: LoraState, a_digest: str) -> Message:
    content = RecordDict(
        {
            ARRAYS_KEY: state.to_array_record(),
            METRICS_KEY: MetricRecord({"num-examples": 10, "train-loss": 1.0}),
            INFO_KEY: ConfigRecord({"a-digest": a_digest}),
        }
    )
    return reply_from(node, content)


# What each strategy accepted at user level is built with here (LoRA-A2: 1 component of 2 a layer).
OPTIONS: dict[str, dict[str, object]] = {"lora_a2": {"upload_rank": 1}}
USER_LEVEL = sorted(name for name, cls in STRATEGIES.items() if cls.__dict__.get("user_level_dp"))


def private_strategy(cls: type[LoraStrategy], privacy: UserLevelPrivacy) -> LoraStrategy:
    strategy = cls(ROSTER, clients_per_round=4, seed=3, weighting="uniform", **OPTIONS.get(cls.name, {}))
    strategy.user_privacy = privacy
    return strategy


def run_round(strategy: LoraStrategy, scale: float, server_round: int = 1) -> tuple[LoraState, LoraState, list[int]]:
    """One round from `strategy.initial_state(global_state())`: (before, after, sampled clients); replies moved by `scale`."""
    before = strategy.initial_state(global_state())
    messages = list(strategy.configure_train(server_round, before.to_array_record(), ConfigRecord(), grid=None))
    trained = before.select(strategy.uploads, strategy.train_head)
    replies = [
        reply(node, strategy.pack_reply(moved(trained, scale, node)), before.digest("A"))
        for node in (m.metadata.dst_node_id for m in messages)
    ]
    arrays, _ = strategy.aggregate_train(server_round, replies)
    return before, LoraState.from_array_record(arrays), strategy.last_round.sampled


# --- accounting -------------------------------------------------------------------------
@pytest.mark.parametrize(("accountant", "reference"), [("prv", PRVAccountant), ("rdp", RDPAccountant)])
def test_the_user_level_epsilon_equals_opacus_accountant_round_by_round(accountant: str, reference) -> None:
    config = user_config(f"privacy.accountant={accountant!r}", "federation.num_clients=10", "federation.clients_per_round=2")
    privacy = UserLevelPrivacy.for_run(config, population=10)
    assert privacy.settings.sample_rate == 0.2
    for rounds in range(1, config.federation.rounds + 1):
        privacy.charge()
        opacus = reference()
        opacus.history = [(privacy.noise_multiplier, 0.2, rounds)]
        assert privacy.epsilon() == pytest.approx(opacus.get_epsilon(delta=1e-5), abs=1e-6)
    assert 0.97 * 3.0 <= privacy.epsilon() <= 3.0 and not privacy.can_afford_round()


def test_the_ledger_survives_a_checkpoint() -> None:
    config = user_config("federation.num_clients=10", "federation.clients_per_round=2")
    privacy = UserLevelPrivacy.for_run(config, population=10)
    privacy.charge()
    again = UserLevelPrivacy.from_state(config, privacy.state())
    assert (again.noise_multiplier, again.rounds_charged, again.epsilon()) == (privacy.noise_multiplier, 1, privacy.epsilon())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("privacy.delta=0.5",), "privacy.delta: 0.5 is at least 1/N = 1/3"),
        (("privacy.epsilon=1e6",), "privacy.epsilon: 1e+06 is more than any noise multiplier"),
        (("privacy.epsilon=1e-6",), "run fewer rounds, sample fewer clients a round, or federate more clients"),
        (
            ("strategy.name='flora'", "model.client_ranks=[4, 2, 2]"),
            "privacy.unit: strategy flora cannot run under user-level DP",
        ),
        (("strategy.name='lora_fair'",), "privacy.unit: strategy lora_fair cannot run under user-level DP"),
        (("strategy.name='lora_a2'", "privacy.noise='distributed'"), "privacy.noise: lora_a2 clients send only their top"),
    ],
    ids=["delta", "epsilon-huge", "epsilon-tiny", "flora", "lora-fair", "lora-a2-distributed"],
)
def test_what_user_level_dp_cannot_give_is_refused_before_anything_starts(overrides: tuple[str, ...], message: str) -> None:
    with pytest.raises((PrivacyBudgetError, ConfigError)) as caught:
        check_runnable(user_config(*overrides))
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_more_clients_a_round_than_passed_the_handshake_is_one_line() -> None:
    settings = UserLevelSettings(3.0, 1e-5, CLIP, "central", "prv", 10, clients_per_round=5, population=3)
    with pytest.raises(PrivacyBudgetError, match="federation.clients_per_round: 5 clients a round but only 3") as caught:
        settings.calibrate()  # was: ValueError("math domain error") from the accountant, at q = 5/3
    assert "\n" not in str(caught.value)


def test_an_impossible_user_level_budget_is_one_line_and_exit_2(tmp_path) -> None:
    settings = ("privacy.enabled=true", "privacy.unit='user'", "privacy.epsilon=1e-6")
    line = one_line_refusal(
        "simulate", str(QUICKSTART), *[a for s in settings for a in ("--set", s)], "--out", str(tmp_path / "run")
    )
    assert "privacy.epsilon: 1e-06 is out of reach" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (("federation.min_replies=2",), "federation.min_replies"),
        (("strategy.robust='median'",), "strategy.robust"),
        (("privacy.unit='example'", "privacy.noise='distributed'"), "privacy.noise"),
    ],
)
def test_settings_that_break_the_mechanism_are_refused_by_the_config(overrides: tuple[str, ...], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        user_config(*overrides)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (("privacy.unit='user'",), "privacy.unit"),
        (("privacy.user_clip=0.5",), "privacy.user_clip"),
        (("privacy.noise='distributed'",), "privacy.noise"),
        (("privacy.secret_noise=true",), "privacy.secret_noise"),
        (("privacy.enabled=true", "privacy.user_clip=0.5"), "privacy.user_clip"),  # example level
    ],
    ids=["unit", "user-clip", "noise", "secret-noise", "example-level-user-clip"],
)
def test_user_level_settings_that_would_do_nothing_are_refused(overrides: tuple[str, ...], key: str) -> None:
    with pytest.raises(ConfigError, match=f"{key}: a user-level setting, which does nothing unless"):
        tiny_config(*overrides)


def test_every_strategy_either_says_what_it_clips_or_is_refused() -> None:
    config = user_config()
    for name, cls in STRATEGIES.items():
        if name in USER_LEVEL:
            cls.check_privacy(config)
        else:
            with pytest.raises(ConfigError, match=f"strategy {name} cannot run under user-level DP"):
                cls.check_privacy(config)
    assert USER_LEVEL == ["fedit", "fedsa_lora", "fedsvd", "ffa_lora", "lora_a2", "rolora"]


def test_a_subclass_does_not_inherit_what_its_parent_clips() -> None:
    class Derived(FedIT):  # a new aggregation rule, which says nothing of user-level DP
        name = "derived"

    with pytest.raises(ConfigError, match="strategy derived cannot run under user-level DP"):
        Derived.check_privacy(user_config())


# --- sampling and clipping ----------------------------------------------------------------
def test_poisson_sampling_varies_the_round_size_around_q_n_and_can_draw_nobody() -> None:
    sizes = [len(poisson_sample(list(range(20)), 0.1, seed=0, server_round=r)) for r in range(2000)]
    assert 0 in sizes and max(sizes) > 4
    assert sum(sizes) / len(sizes) == pytest.approx(2.0, abs=0.1)  # 5 standard errors
    assert poisson_sample(list(range(20)), 0.1, 0, 5) == poisson_sample(list(range(20)), 0.1, 0, 5)


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=40),
    bound=st.floats(1e-3, 1e3),
)
def test_every_update_is_clipped_to_the_bound_and_keeps_its_direction(values: list[float], bound: float) -> None:
    vector = torch.tensor(values, dtype=torch.float64)
    clipped = clip_to_norm(vector, bound)
    norm = float(torch.linalg.vector_norm(vector))
    assert float(torch.linalg.vector_norm(clipped)) <= bound * (1 + 1e-12)
    if norm <= bound:
        assert torch.equal(clipped, vector)
    else:
        assert torch.allclose(clipped * (norm / bound), vector, rtol=1e-9, atol=1e-12)


@settings(max_examples=50, deadline=None)
@given(scales=st.lists(st.floats(1e-3, 1e4), min_size=0, max_size=6), seed=st.integers(0, 1000))
def test_without_noise_the_release_is_the_sum_of_clipped_updates_over_q_n(scales: list[float], seed: int) -> None:
    privacy = mechanism(noise_multiplier=0.0)
    g = torch.Generator().manual_seed(seed)
    changes = [scale * torch.randn(30, generator=g, dtype=torch.float64) for scale in scales]
    mean, figures = privacy.privatize(changes, sampled=len(changes), size=30, seed=seed)
    expected = sum((clip_to_norm(c, CLIP) for c in changes), torch.zeros(30, dtype=torch.float64)) / 4
    assert torch.allclose(mean, expected)
    assert float(torch.linalg.vector_norm(mean)) <= len(changes) * CLIP / 4 + 1e-9  # sensitivity S / (q N)
    assert figures["clipped"] == sum(float(torch.linalg.vector_norm(c)) > CLIP for c in changes)


# --- noise ----------------------------------------------------------------------------------
SIZE = 200_000  # draws per statistical test: the sample std's standard error is std / sqrt(2 SIZE) ~ 0.16%
TOLERANCE = 6.0  # standard errors: a false alarm once in ~5e8 seeds; the seeds are fixed, so never


def assert_gaussian(noise: torch.Tensor, std: float) -> None:
    """Mean 0 and standard deviation `std` within TOLERANCE standard errors, and normal in shape (KS)."""
    n = noise.numel()
    assert abs(float(noise.mean())) <= TOLERANCE * std / math.sqrt(n)
    assert abs(float(noise.std()) - std) <= TOLERANCE * std / math.sqrt(2 * n)
    assert stats.kstest((noise / std).numpy(), "norm").pvalue > 1e-6


@pytest.mark.parametrize("sampled", [0, 3])
def test_the_central_noise_has_the_calibrated_standard_deviation(sampled: int) -> None:
    privacy = mechanism(noise_multiplier=1.3)
    zeros = [torch.zeros(SIZE, dtype=torch.float64)] * sampled
    mean, figures = privacy.privatize(zeros, sampled=sampled, size=SIZE, seed=11)
    assert figures["noise_std"] == pytest.approx(1.3 * CLIP)
    assert_gaussian(mean * privacy.settings.expected_clients, 1.3 * CLIP)  # the sum's noise: sigma S


@pytest.mark.parametrize(("sampled", "arrived"), [(5, 5), (5, 3), (1, 1)])
def test_distributed_shares_sum_to_the_central_noise(sampled: int, arrived: int) -> None:
    privacy = mechanism(noise_multiplier=1.3, noise="distributed")
    instruction = privacy.client_instruction(sampled)
    share = ShareInstruction.from_config(instruction)
    assert share == ShareInstruction(CLIP, 1.3 * CLIP / math.sqrt(sampled))
    state = LoraState(factors={"l": {"B": torch.zeros(SIZE // 100, 100)}})
    replies = [delta_vector(share.apply(state, state, seed=client), state) for client in range(arrived)]
    for noised in replies:  # an honest noised reply passes the server's clip untouched
        assert float(torch.linalg.vector_norm(noised)) < privacy.server_clip(sampled, SIZE)
    mean, figures = privacy.privatize(replies, sampled=sampled, size=SIZE, seed=99)
    assert figures["noise_shares"] == arrived  # the server tops up the shares that did not arrive
    assert_gaussian(mean * privacy.settings.expected_clients, 1.3 * CLIP)


def test_a_distributed_reply_without_its_noise_share_is_topped_up_and_named() -> None:
    privacy = mechanism(noise_multiplier=1.3, noise="distributed")
    strategy = FedIT(ROSTER, clients_per_round=4, seed=3, weighting="uniform", train_head=False)
    strategy.user_privacy = privacy
    g = torch.Generator().manual_seed(0)
    before = LoraState(factors={"l": {"A": torch.randn(2, 5000, generator=g), "B": torch.randn(6, 2, generator=g)}})
    messages = list(strategy.configure_train(1, before.to_array_record(), ConfigRecord(), grid=None))
    nodes = [m.metadata.dst_node_id for m in messages]
    share = ShareInstruction.from_config(messages[0].content["config"])
    cheat = nodes[0]  # adds no noise share: its reply is its bare change (norm about 1)
    replies = [
        reply(node, moved(before, 0.01, node) if node == cheat else share.apply(moved(before, 0.01, node), before, node), "")
        for node in nodes
    ]
    strategy.aggregate_train(1, replies)
    figures = strategy.last_round.extra["user_dp"]
    assert len(nodes) >= 2 and strategy.last_round.accepted == sorted(NODES[n] for n in nodes)
    assert figures["noise_withheld"] == [NODES[cheat]] and figures["noise_shares"] == len(nodes) - 1
    assert figures["server_noise_std"] == pytest.approx(privacy.noise_std / math.sqrt(len(nodes)))


def test_the_central_mechanism_sends_clients_no_noise_instruction() -> None:
    assert mechanism(1.0).client_instruction(4) == {}
    assert set(mechanism(1.0, "distributed").client_instruction(4)) == {CLIP_KEY, SHARE_STD_KEY, SECRET_KEY}


def test_the_server_clips_a_distributed_reply_that_skipped_its_clipping() -> None:
    privacy = mechanism(noise_multiplier=0.0, noise="distributed")
    bound = privacy.server_clip(2, 30)
    assert bound == honest_share_bound(CLIP, 0.0, 30) == pytest.approx(CLIP)
    mean, figures = privacy.privatize([torch.full((30,), 100.0, dtype=torch.float64)], sampled=2, size=30, seed=0)
    assert figures["clipped"] == 1 and float(torch.linalg.vector_norm(mean)) == pytest.approx(CLIP / 4)


# --- strategies ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", USER_LEVEL)
def test_no_update_reaches_the_aggregation_unclipped(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cls = STRATEGIES[name]
    strategy = private_strategy(cls, mechanism(noise_multiplier=0.0))
    seen: list[list[LoraState]] = []
    original = cls.aggregate_factors
    monkeypatch.setattr(
        cls, "aggregate_factors", lambda self, g, updates, w: seen.append(updates) or original(self, g, updates, w)
    )
    before, after, sampled = run_round(strategy, scale=1e3)
    assert sampled and len(seen) == 1 and len(seen[0]) == 1  # one private update, never a client's
    private = seen[0][0].minus(before.select(strategy.uploads, True)).flatten()
    assert float(torch.linalg.vector_norm(private)) <= len(sampled) * CLIP / 4 + 1e-5
    head_change = torch.cat([(after.head[k] - before.head[k]).reshape(-1) for k in before.head])
    assert float(torch.linalg.vector_norm(head_change)) <= len(sampled) * CLIP / 4 + 1e-5
    assert strategy.last_round.extra["user_dp"]["clipped"] == len(sampled)


def test_fedit_noises_both_factors_and_ffa_lora_and_fedsvd_only_b() -> None:
    for cls, noised in ((FedIT, {"A", "B"}), (FFALoRA, {"B"}), (FedSVD, {"B"})):
        strategy = private_strategy(cls, mechanism(noise_multiplier=1.0))
        before, after, _ = run_round(strategy, scale=0.0)  # no client moves: every change is noise
        changed = {
            part
            for layer in before.factors
            for part in "AB"
            if not torch.equal(before.factors[layer][part], after.factors[layer][part])
        }
        expected = noised | ({"A"} if cls is FedSVD else set())  # FedSVD's new A comes from refactorizing the noised B
        assert changed == expected, cls.name


def test_fedsvd_refactorizes_the_noised_b_exactly() -> None:
    refactorized = private_strategy(FedSVD, mechanism(noise_multiplier=1.0))
    _, after, _ = run_round(refactorized, scale=0.1)
    plain = private_strategy(FedSVD, mechanism(noise_multiplier=1.0))
    plain.svd_period = 2  # round 1 is not refactorized: the noised B with the broadcast A
    _, noised, _ = run_round(plain, scale=0.1)
    for layer, parts in after.factors.items():
        ours = parts["B"].double() @ parts["A"].double()
        reference = noised.factors[layer]["B"].double() @ noised.factors[layer]["A"].double()
        assert torch.allclose(ours, reference, atol=1e-5) and not torch.equal(parts["A"], noised.factors[layer]["A"])


def test_a_round_with_nobody_sampled_still_releases_its_noise() -> None:
    privacy = mechanism(noise_multiplier=1.0, clients_per_round=1)
    strategy = private_strategy(FedIT, privacy)
    empty = next(r for r in range(1, 200) if not privacy.sample(list(range(N)), strategy.seed, r))
    before, after, sampled = run_round(strategy, scale=0.0, server_round=empty)
    assert sampled == [] and not strategy.last_round.skipped
    assert not torch.equal(before.flatten(), after.flatten())
    assert strategy.last_round.extra["user_dp"]["server_noise_std"] == pytest.approx(CLIP)


# --- where the randomness comes from ------------------------------------------------------
@pytest.mark.parametrize("secret", [False, True])
def test_seeded_randomness_reproduces_and_secret_randomness_never_does(secret: bool) -> None:
    rounds = [run_round(private_strategy(FedIT, mechanism(1.0, secret=secret)), scale=0.1) for _ in range(2)]
    released = [after.flatten() for _, after, _ in rounds]
    assert torch.equal(*released) != secret  # the server's noise
    population = list(range(64))  # sampling at q = 1/2: two secret draws agree with probability 2^-64
    draws = [mechanism(1.0, clients_per_round=N // 2, secret=secret).sample(population, seed=3, server_round=1) for _ in range(2)]
    assert (draws[0] == draws[1]) != secret
    share = ShareInstruction.from_config(mechanism(1.0, "distributed", secret=secret).client_instruction(2))
    state = global_state()
    shares = [share.apply(state, state, seed=5).flatten() for _ in range(2)]  # a client's share
    assert torch.equal(*shares) != secret


def test_the_summary_and_the_model_card_say_when_the_noise_is_seeded() -> None:
    assert mechanism(1.0).summary()["noise_source"] == SEEDED_NOISE
    assert "not private against anyone holding the seed" in SEEDED_NOISE
    assert mechanism(1.0, secret=True).summary()["noise_source"] != SEEDED_NOISE
    card = model_card(user_config(), ["a", "b"], RunFigures("run", 2, 3, 0.5, 10, 1.0))
    assert SEEDED_NOISE in card
    assert SEEDED_NOISE not in model_card(
        user_config("privacy.secret_noise=true"), ["a", "b"], RunFigures("run", 2, 3, 0.5, 10, 1.0)
    )


def test_a_flwr_run_deployment_draws_secret_noise_unless_its_experiment_says_otherwise() -> None:
    assert with_secret_noise(user_config()).privacy.secret_noise
    assert not with_secret_noise(user_config("privacy.secret_noise=false")).privacy.secret_noise
    assert UserLevelSettings.from_config(with_secret_noise(user_config()), population=N).secret


# --- comparisons --------------------------------------------------------------------------
def test_flowers_server_side_fixed_clipping_adds_the_same_noise_scale() -> None:
    """Flower's wrapper around its FedAvg, on equal-weight replies: noise sigma S / m on the mean,
    ours sigma S / (q N) with q N = m: the same scale (Flower 1.41 accounts only without sampling
    amplification; ours accounts Poisson sampling)."""
    m, sigma, step = 4, 1.3, 1e-6  # every client moves each coordinate by `step` (Flower cannot clip an all-zero update)
    flower = DifferentialPrivacyServerSideFixedClipping(
        FedAvg(), noise_multiplier=sigma, clipping_norm=CLIP, num_sampled_clients=m
    )
    flower.current_arrays = ArrayRecord({"w": Array(np.zeros(SIZE, dtype=np.float64))})
    moved_arrays = ArrayRecord({"w": Array(np.full(SIZE, step, dtype=np.float64))})
    content = RecordDict({"arrays": moved_arrays, "metrics": MetricRecord({"num-examples": 1})})
    np.random.seed(5)  # Flower draws from numpy's global generator
    arrays, _ = flower.aggregate_train(1, [reply_from(node, content) for node in range(m)])
    changes = [torch.full((SIZE,), step, dtype=torch.float64)] * m
    ours, _ = mechanism(sigma, clients_per_round=m).privatize(changes, m, SIZE, seed=5)
    assert_gaussian(torch.from_numpy(arrays["w"].numpy()) - step, sigma * CLIP / m)
    assert_gaussian(ours - step, sigma * CLIP / m)


def test_user_dp_tomls_example_level_runs_meet_their_user_level_targets_by_group_privacy() -> None:
    path = QUICKSTART.parent / "user_dp.toml"
    raw = tomllib.loads(path.read_text())
    largest = raw["data"]["num_train"] // raw["federation"]["num_clients"]  # iid: equal shares
    variants = [v for v in raw["sweep"]["privacy"] if v["enabled"]]
    users = [v for v in variants if v["unit"] == "user"]
    examples = [v for v in variants if v["unit"] == "example"]
    assert len(users) == len(examples) == 3
    for user, example in zip(users, examples, strict=True):
        epsilon, delta = group_privacy(example["epsilon"], example["delta"], largest)
        assert epsilon <= user["epsilon"] + 1e-12 and delta <= raw["privacy"]["delta"]
        assert delta >= 0.9 * raw["privacy"]["delta"]  # rounded down, not needlessly strict
