"""FFA-LoRA: exact aggregation, seeded shared A, digest check."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora.lora import LoraState
from fedlora.roster import Roster
from strategies.base import ClientUpdate
from strategies.ffa_lora import FFALoRA, aggregate_b, shared_a


@settings(max_examples=40, deadline=None)
@given(
    d_out=st.integers(1, 24),
    d_in=st.integers(1, 24),
    rank=st.integers(1, 8),
    clients=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_averaging_b_is_exact_for_the_product(d_out: int, d_in: int, rank: int, clients: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    a = shared_a(seed, "layer", rank, d_in, torch.float64)
    bs = [torch.randn(d_out, rank, generator=g, dtype=torch.float64) for _ in range(clients)]
    weights = torch.rand(clients, generator=g, dtype=torch.float64) + 0.1
    weights /= weights.sum()
    dense = sum(w * (b @ a) for w, b in zip(weights.tolist(), bs))
    torch.testing.assert_close(aggregate_b(bs, weights) @ a, dense, rtol=1e-12, atol=1e-12)


def test_shared_a_depends_on_seed_and_layer_only() -> None:
    assert torch.equal(shared_a(1, "q", 4, 16), shared_a(1, "q", 4, 16))
    assert not torch.equal(shared_a(1, "q", 4, 16), shared_a(2, "q", 4, 16))
    assert not torch.equal(shared_a(1, "q", 4, 16), shared_a(1, "v", 4, 16))
    assert shared_a(1, "q", 4, 16).abs().max() <= 1 / 4


def test_initial_state_has_seeded_a_and_zero_b_and_a_foreign_a_is_refused() -> None:
    start = LoraState(factors={"q": {"A": torch.randn(2, 8), "B": torch.randn(8, 2)}})
    strategy = FFALoRA(Roster.of({0: 10, 1: 10}), clients_per_round=2, seed=5)
    state = strategy.initial_state(start)
    assert torch.equal(state.factors["q"]["A"], shared_a(5, "q", 2, 8))
    assert not state.factors["q"]["B"].any()
    strategy.global_state = state
    update = ClientUpdate(0, state.select("B", head=False), 10, {}, {"a-digest": state.digest("A")})
    assert strategy.check_update(update) is None
    foreign = ClientUpdate(1, state.select("B", head=False), 10, {}, {"a-digest": start.digest("A")})
    assert "a-digest mismatch" in strategy.check_update(foreign)
