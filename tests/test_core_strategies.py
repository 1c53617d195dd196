"""Fed-SB and RAVAN: a trained core between frozen factors, against the papers' dense definitions in float64."""

from __future__ import annotations

import copy

import pytest
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus import GradSampleModule

from clients.trainer import TrainPlan, train_local, train_local_private
from fedlora import workspace
from fedlora.accounting import dp_settings, plan_clients
from fedlora.causal import build_causal_lora_model
from fedlora.config import ConfigError
from fedlora.lora import LoraState
from fedlora.lora_core import LoraCore
from fedlora.model import build_lora_model
from fedlora.privacy import PrivacyLedger
from fedlora.roster import Roster
from strategies.base import ARRAYS_KEY, INFO_KEY, METRICS_KEY, LoraStrategy
from strategies.fed_sb import FedSB
from strategies.ravan import Ravan
from tests.conftest import causal_config, reply_from, tiny_config

SHAPES = st.tuples(st.integers(1, 4), st.integers(1, 3), st.integers(0, 8), st.integers(0, 8))  # heads, q, extra d_out, d_in


def client_states(strategy: LoraStrategy, start: LoraState, clients: int, seed: int) -> list[LoraState]:
    """What clients send back: random trained parts (scalars around 1), float64."""
    g = torch.Generator().manual_seed(seed)
    trained = start.select(strategy.trains, head=False)
    return [
        LoraState(
            factors={
                layer: {p: torch.randn(t.shape, generator=g, dtype=torch.float64) + (p == "S") for p, t in parts.items()}
                for layer, parts in trained.factors.items()
            }
        )
        for _ in range(clients)
    ]


def paper_delta(b: torch.Tensor, a: torch.Tensor, core: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    """sum_i s_i B_i H_i A_i over the heads, each head's slice of B's columns and A's rows (Fed-SB: one head, s = 1)."""
    heads, q, _ = core.shape
    scales = torch.ones(heads, dtype=core.dtype) if scales is None else scales
    return sum(scales[i] * b[:, i * q : (i + 1) * q] @ core[i] @ a[i * q : (i + 1) * q] for i in range(heads))


def float64_start(heads: int, q: int, d_out: int, d_in: int) -> LoraState:
    rank = heads * q
    return LoraState(
        factors={"q": {"A": torch.zeros(rank, d_in, dtype=torch.float64), "B": torch.zeros(d_out, rank, dtype=torch.float64)}}
    )


@settings(max_examples=40, deadline=None)
@given(shape=SHAPES, clients=st.integers(1, 6), ravan=st.booleans(), seed=st.integers(0, 2**16))
def test_the_aggregate_adds_the_weighted_mean_of_the_clients_updates(shape, clients: int, ravan: bool, seed: int) -> None:
    heads, q, extra_out, extra_in = shape
    heads = heads if ravan else 1
    rank = heads * q
    strategy = Ravan(Roster.of({0: 1}), 1, seed=seed, heads=heads) if ravan else FedSB(Roster.of({0: 1}), 1, seed=seed)
    start = strategy.initial_state(float64_start(heads, q, rank + extra_out, rank + extra_in))
    updates = client_states(strategy, start, clients, seed)
    weights = torch.rand(clients, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.1
    weights /= weights.sum()
    new = strategy.aggregate_factors(start, updates, weights).factors["q"]
    b, a = start.factors["q"]["B"].double(), start.factors["q"]["A"].double()
    mean = sum(w * paper_delta(b, a, u.factors["q"]["R"], u.factors["q"].get("S")) for w, u in zip(weights.tolist(), updates))
    torch.testing.assert_close(paper_delta(new["B"], new["A"], new["R"], new.get("S")), mean, rtol=1e-12, atol=1e-12)
    assert torch.equal(new["B"], start.factors["q"]["B"]) and torch.equal(new["A"], start.factors["q"]["A"])


def test_averaging_ravans_cores_and_scalars_apart_would_not_be_exact() -> None:
    """Why the server averages the products s_i H_i: the product of the means is another update."""
    strategy = Ravan(Roster.of({0: 1}), 1, seed=0, heads=2)
    start = strategy.initial_state(float64_start(2, 2, 6, 6))
    updates = client_states(strategy, start, 2, seed=3)
    b, a, weights = start.factors["q"]["B"], start.factors["q"]["A"], torch.tensor([0.5, 0.5], dtype=torch.float64)
    mean = sum(0.5 * paper_delta(b, a, u.factors["q"]["R"], u.factors["q"]["S"]) for u in updates)
    apart = paper_delta(b, a, *(sum(0.5 * u.factors["q"][p] for u in updates) for p in "RS"))
    assert (apart - mean).abs().max() > 1e-3
    new = strategy.aggregate_factors(start, updates, weights).factors["q"]
    assert torch.equal(new["S"], torch.ones(2, dtype=torch.float64))


def test_initial_bases_are_orthonormal_seeded_per_layer_and_the_core_starts_at_zero() -> None:
    start = LoraState(factors={layer: {"A": torch.randn(4, 10), "B": torch.randn(12, 4)} for layer in ("q", "v")})
    state = Ravan(Roster.of({0: 1}), 1, seed=5, heads=2).initial_state(start)
    q, v = state.factors["q"], state.factors["v"]
    torch.testing.assert_close(q["A"] @ q["A"].T, torch.eye(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(q["B"].T @ q["B"], torch.eye(4), atol=1e-6, rtol=0)
    assert q["R"].shape == (2, 2, 2) and not q["R"].any() and torch.equal(q["S"], torch.ones(2))
    assert not torch.equal(q["A"], v["A"])
    again = FedSB(Roster.of({0: 1}), 1, seed=5).initial_state(start).factors["q"]
    assert torch.equal(again["A"], q["A"]) and again["R"].shape == (1, 4, 4) and "S" not in again
    assert not torch.equal(FedSB(Roster.of({0: 1}), 1, seed=6).initial_state(start).factors["q"]["A"], q["A"])


def test_heads_that_do_not_divide_the_rank_are_refused_in_one_line() -> None:
    with pytest.raises(ConfigError, match="strategy.ravan_heads: 3 heads do not divide model.lora_rank = 4"):
        tiny_config("strategy.name='ravan'", "strategy.ravan_heads=3")
    start = LoraState(factors={"q": {"A": torch.randn(4, 10), "B": torch.randn(12, 4)}})
    with pytest.raises(ConfigError, match="3 heads do not divide"):
        Ravan(Roster.of({0: 1}), 1, heads=3).initial_state(start)


# --- the client's model ---
def cored_model(strategy: LoraStrategy, seed: int = 0):
    """The tiny model holding the strategy's initial state with random cores (and scalars), and that state."""
    config = tiny_config()
    model = build_lora_model(config.model, workspace.federated_task(config).num_labels, seed=0)
    state = strategy.initial_state(LoraState.from_model(model))
    g = torch.Generator().manual_seed(seed)
    for parts in state.factors.values():
        parts["R"] = 0.3 * torch.randn(parts["R"].shape, generator=g)
        if "S" in parts:
            parts["S"] = torch.rand(parts["S"].shape, generator=g) + 0.5
    state.load_into(model)
    return model.eval(), state


@pytest.mark.parametrize("strategy", [FedSB(Roster.of({0: 1}), 1), Ravan(Roster.of({0: 1}), 1, heads=2)], ids=["fed_sb", "ravan"])
def test_a_layer_with_a_core_computes_the_papers_update_and_exports_as_plain_lora(strategy: LoraStrategy) -> None:
    model, state = cored_model(strategy)
    layer = next(iter(state.factors))
    module = model.get_submodule(f"base_model.model.{layer}")
    parts, x = state.factors[layer], torch.randn(5, state.factors[layer]["A"].shape[1])
    delta = module.scaling["default"] * paper_delta(parts["B"].double(), parts["A"].double(), parts["R"].double(), parts.get("S"))
    with torch.no_grad():
        expected = module.base_layer(x).double() + x.double() @ delta.T
        torch.testing.assert_close(module(x).double(), expected, rtol=1e-5, atol=1e-5)
        read = LoraState.from_model(model)
        assert all(torch.equal(read.tensors()[key], t) for key, t in state.tensors().items())
        tokens = torch.randint(0, 1000, (2, 12))
        cored = model(input_ids=tokens).logits
        state.folded().load_into(model)  # as the server exports: no core left, B multiplied by it
        assert not any("core" in name for name, _ in model.named_parameters())
        torch.testing.assert_close(model(input_ids=tokens).logits, cored, rtol=1e-5, atol=1e-5)


def test_a_causal_lm_takes_a_core_too_and_exports_it_folded() -> None:
    model = build_causal_lora_model(causal_config().model, seed=0).eval()
    state = Ravan(Roster.of({0: 1}), 1, heads=2).initial_state(LoraState.from_model(model))
    g = torch.Generator().manual_seed(0)
    for parts in state.factors.values():
        parts["R"], parts["S"] = torch.randn(parts["R"].shape, generator=g), torch.rand(2, generator=g) + 0.5
    tokens = torch.randint(0, 100, (2, 10), generator=g)
    with torch.no_grad():
        state.select("AB", head=False).load_into(model)  # plain LoRA on the same bases: no core
        plain = model(input_ids=tokens).logits
        state.load_into(model)
        cored = model(input_ids=tokens).logits
        state.folded().load_into(model)
        torch.testing.assert_close(model(input_ids=tokens).logits, cored, rtol=1e-4, atol=1e-4)
    assert (cored - plain).abs().max() > 1e-3


def test_only_the_core_trains_and_the_reply_carries_it_alone() -> None:
    strategy = Ravan(Roster.of({0: 1}), 1, heads=2)
    model, state = cored_model(strategy)
    config = tiny_config("model.train_head=false")
    plan = TrainPlan("RS", False, 2, 1e-2, 8, seed=1)
    result = train_local(model, workspace.client_examples(config, 0), plan)
    reply = result.state.select(plan.trains, head=False)
    assert {tuple(sorted(parts)) for parts in reply.factors.values()} == {("R", "S")}
    for layer, parts in result.state.factors.items():
        assert not torch.equal(parts["R"], state.factors[layer]["R"])
        assert torch.equal(parts["A"], state.factors[layer]["A"]) and torch.equal(parts["B"], state.factors[layer]["B"])


def test_opacus_computes_each_examples_gradient_of_a_core_exactly() -> None:
    """What DP-SGD clips: Opacus has no grad sampler for the core and takes functorch's, per example."""
    core = LoraCore(2, 3, scaled=True)
    with torch.no_grad():
        core.weight.normal_(generator=torch.Generator().manual_seed(0))
        core.scales.uniform_(0.5, 1.5)
    net = torch.nn.Sequential(torch.nn.Linear(5, 6, bias=False).requires_grad_(False), core)
    x = torch.randn(4, 7, 5, generator=torch.Generator().manual_seed(1))
    reference = copy.deepcopy(net)
    expected = {
        name: torch.stack(
            [torch.autograd.grad(reference(x[i : i + 1]).pow(2).sum(), [getattr(reference[1], name)])[0] for i in range(4)]
        )
        for name in ("weight", "scales")
    }
    GradSampleModule(net, loss_reduction="sum")(x).pow(2).sum().backward()
    for name, per_example in expected.items():
        torch.testing.assert_close(getattr(core, name).grad_sample, per_example, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("name", "mode"), [("fed_sb", "hooks"), ("ravan", "ghost")])
def test_dp_sgd_clips_and_noises_the_core_and_leaves_the_bases_bit_identical(name: str, mode: str) -> None:
    config = tiny_config(
        "privacy.enabled=true", "privacy.epsilon=3.0", "model.train_head=false", f"privacy.grad_sample_mode={mode!r}"
    )
    strategy = FedSB(Roster.of({0: 1}), 1) if name == "fed_sb" else Ravan(Roster.of({0: 1}), 1, heads=2)
    model, state = cored_model(strategy)
    model.train()  # as the client's model is: Opacus refuses one in eval mode
    sizes = {c: len(p.labels) for c, p in enumerate(workspace.federated_task(config).partitions)}
    plan = plan_clients(config, sizes)[0]
    ledger = PrivacyLedger(config.privacy.accountant, plan.noise_multiplier, plan.sample_rate)
    train = TrainPlan(strategy.trains, False, 3, 1e-2, 8, seed=1)
    result = train_local_private(model, workspace.client_examples(config, 0), train, dp_settings(config), ledger)
    assert ledger.steps == 3
    for layer, parts in result.state.factors.items():
        for part, tensor in parts.items():
            moved = not torch.equal(tensor, state.factors[layer][part])
            assert moved == (part in strategy.trains), f"{layer}.{part}"


# --- the server's round: uplink and downlink ---
def reply(node: int, state: LoraState) -> object:
    content = RecordDict(
        {
            ARRAYS_KEY: state.to_array_record(),
            METRICS_KEY: MetricRecord({"num-examples": 10, "train-loss": 1.0}),
            INFO_KEY: ConfigRecord({}),
        }
    )
    return reply_from(node, content)


@pytest.mark.usefixtures("flower_task")
@pytest.mark.parametrize(("name", "values_a_layer"), [("fed_sb", 4 * 4), ("ravan", 2 * 2 * 2 + 2)])
def test_the_uplink_is_the_core_alone_and_a_reply_with_more_is_refused(name: str, values_a_layer: int) -> None:
    roster = Roster.of({0: 10, 1: 10, 2: 10})
    strategy = FedSB(roster, 3, train_head=False) if name == "fed_sb" else Ravan(roster, 3, train_head=False, heads=2)
    start = strategy.initial_state(
        LoraState(factors={f"l{i}": {"A": torch.zeros(4, 16), "B": torch.zeros(8, 4)} for i in range(3)})
    )
    list(strategy.configure_train(1, start.to_array_record(), ConfigRecord(), grid=None))
    assert strategy.last_round.bytes_down == 3 * start.num_bytes()  # the frozen bases travel down each round
    sent = [
        LoraState(factors={layer: {p: t.float() for p, t in parts.items()} for layer, parts in s.factors.items()})
        for s in client_states(strategy, start, 3, seed=1)
    ]
    greedy = sent[2].clone()
    for layer, parts in greedy.factors.items():
        parts["B"] = start.factors[layer]["B"]
    arrays, _ = strategy.aggregate_train(1, [reply(1, sent[0]), reply(2, sent[1]), reply(3, greedy)])
    assert arrays is not None and strategy.last_round.accepted == [0, 1]
    assert "sent factors" in str(strategy.last_round.rejected)
    assert strategy.last_round.bytes_up_factors == 2 * 3 * values_a_layer * 4  # two replies, three layers, float32


def test_a_checkpoint_holding_cores_resumes_and_one_whose_core_does_not_fit_is_refused() -> None:
    from fedlora.checkpoint import _state_problem

    model_state = LoraState(factors={"q": {"A": torch.randn(4, 10), "B": torch.randn(12, 4)}})  # the fresh model's
    saved = Ravan(Roster.of({0: 1}), 1, heads=2).initial_state(model_state).tensors()
    assert _state_problem(saved, model_state) is None
    assert "do not fit its rank 4" in _state_problem({**saved, "q.R": torch.zeros(2, 3, 3)}, model_state)
    assert "do not fit its rank 4" in _state_problem({**saved, "q.S": torch.ones(3)}, model_state)
    assert "no square core" in _state_problem({k: t for k, t in saved.items() if k != "q.R"}, model_state)
