"""A client that lies about its data cannot buy weight: the server's declared, capped counts decide."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ConfigRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora.lora import LoraState
from fedlora.roster import Roster, declared_count_problem
from strategies import DEFENCES
from strategies.fedit import FedIT
from tests.test_strategy_base import client_reply, global_state

pytestmark = pytest.mark.usefixtures("flower_task")

N = 15  # with the liar refused, zprobe (the paper's: 7 clusters of 2) still has its smallest round
NODES = {200 + k: k for k in range(N)}
DECLARED = dict.fromkeys(range(N), 10)
LIAR = 4
# Every defence that picks clients (and so could be steered by weights), and no defence at all.
WEIGHTED_DEFENCES = [None, "multikrum", *sorted(name for name in DEFENCES if name.startswith("zprobe"))]


def update(client: int) -> LoraState:
    """A small, statistically ordinary step from the global state (the liar's too)."""
    g = torch.Generator().manual_seed(100 + client)
    state = global_state().clone()
    for parts in state.factors.values():
        for name in parts:
            parts[name] += 0.05 * torch.randn(parts[name].shape, generator=g)
    for name in state.head:
        state.head[name] = state.head[name] + 0.05 * torch.randn(state.head[name].shape, generator=g)
    return state


def aggregate(defence: str | None, claims: dict[int, float], roster: Roster | None = None, skip: int | None = None) -> LoraState:
    """One round of FedIT behind `defence`, every client replying with its update and claimed count."""
    roster = roster or Roster(NODES, DECLARED)
    strategy = FedIT(roster, clients_per_round=N, defence=DEFENCES[defence](0.25) if defence else None, max_weight_ratio=4.0)
    list(strategy.configure_train(1, global_state().to_array_record(), ConfigRecord(), grid=None))
    replies = [client_reply(node, update(c), num_examples=claims.get(c, 10)) for node, c in NODES.items() if c != skip]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    return LoraState.from_array_record(arrays)


def distance(a: LoraState, b: LoraState) -> float:
    return float((a.flatten() - b.flatten()).norm())


@pytest.mark.parametrize("defence", WEIGHTED_DEFENCES)
def test_a_liar_claiming_1e12_examples_moves_the_aggregate_no_more_than_an_honest_client(defence: str | None) -> None:
    without = aggregate(defence, {}, skip=LIAR)
    honest_move = distance(aggregate(defence, {}), without)
    lying_move = distance(aggregate(defence, {LIAR: 1e12}), without)
    assert lying_move <= honest_move + 1e-7
    assert lying_move == pytest.approx(0.0, abs=1e-7)  # the lie is refused outright


@settings(max_examples=40, deadline=None)
@given(claim=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(min_value=-(10**15), max_value=10**15)))
def test_any_count_other_than_the_declaration_is_refused_without_an_exception(claim: float) -> None:
    strategy = FedIT(Roster(NODES, DECLARED), clients_per_round=N)
    list(strategy.configure_train(1, global_state().to_array_record(), ConfigRecord(), grid=None))
    replies = [client_reply(node, update(c), num_examples=claim if c == LIAR else 10) for node, c in NODES.items()]
    strategy.aggregate_train(1, replies)
    refused = {r["client"] for r in strategy.last_round.rejected}
    assert (LIAR in refused) == (claim != 10)
    assert LIAR not in strategy.last_round.accepted or claim == 10


def test_a_huge_declaration_at_the_handshake_is_capped_at_the_ratio() -> None:
    declared = {**DECLARED, LIAR: 10**12}
    roster = Roster(NODES, declared)
    capped = FedIT(roster, clients_per_round=N, max_weight_ratio=4.0)
    assert capped.weights[LIAR] == 40.0 and capped.weights[0] == 10.0
    # With the cap, the liar's share of the aggregate is 40 / (14 * 10 + 40), not ~1.
    result = aggregate(None, {LIAR: 10**12}, roster=roster)
    shares = torch.tensor([40.0 if c == LIAR else 10.0 for c in range(N)], dtype=torch.float64)
    shares /= shares.sum()
    layer = next(iter(result.factors))
    expected = sum(p * update(c).factors[layer]["B"].double() for c, p in enumerate(shares.tolist()))
    torch.testing.assert_close(result.factors[layer]["B"].double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("value", [0, -3, 2.5, math.inf, math.nan, True, "10", None])
def test_unusable_handshake_declarations_are_named(value: object) -> None:
    assert declared_count_problem(value) is not None
    assert declared_count_problem(10) is None and declared_count_problem(10.0) is None
