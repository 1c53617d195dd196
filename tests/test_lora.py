"""LoraState: model <-> state <-> Flower ArrayRecord."""

from __future__ import annotations

import torch

from fedlora.lora import LoraState
from fedlora.model import build_lora_model
from tests.conftest import tiny_config


def test_state_round_trips_through_an_array_record_bit_for_bit() -> None:
    config = tiny_config()
    state = LoraState.from_model(build_lora_model(config.model, 4, seed=0))
    assert state.layers() and state.head
    decoded = LoraState.from_array_record(state.to_array_record())
    assert decoded.tensors().keys() == state.tensors().keys()
    for key, tensor in state.tensors().items():
        assert torch.equal(decoded.tensors()[key], tensor)


def test_loading_a_state_into_a_model_sets_exactly_those_tensors() -> None:
    config = tiny_config()
    model = build_lora_model(config.model, 4, seed=0)
    other = LoraState.from_model(build_lora_model(config.model, 4, seed=1))
    other.select("B", head=False).load_into(model)
    loaded = LoraState.from_model(model)
    original = LoraState.from_model(build_lora_model(config.model, 4, seed=0))
    for layer in loaded.layers():
        assert torch.equal(loaded.factors[layer]["B"], other.factors[layer]["B"])
        assert torch.equal(loaded.factors[layer]["A"], original.factors[layer]["A"])
    assert all(torch.equal(loaded.head[k], original.head[k]) for k in original.head)


def test_same_seed_same_model_and_the_digest_tells_a_different_a() -> None:
    config = tiny_config()
    a = LoraState.from_model(build_lora_model(config.model, 4, seed=3))
    b = LoraState.from_model(build_lora_model(config.model, 4, seed=3))
    c = LoraState.from_model(build_lora_model(config.model, 4, seed=4))
    assert a.digest("A") == b.digest("A") != c.digest("A")
    assert a.factor_bytes() == sum(t.numel() * 4 for f in a.factors.values() for t in f.values())


def test_flatten_unflatten_and_deltas_round_trip() -> None:
    config = tiny_config()
    a = LoraState.from_model(build_lora_model(config.model, 4, seed=0))
    b = LoraState.from_model(build_lora_model(config.model, 4, seed=1)).select("B", head=True)
    delta = b.minus(a)
    again = delta.unflatten(delta.flatten())
    assert all(torch.equal(again.tensors()[k], t) for k, t in delta.tensors().items())
    moved = a.plus(delta)
    assert all(torch.allclose(moved.tensors()[k], t, atol=1e-6) for k, t in b.tensors().items())
