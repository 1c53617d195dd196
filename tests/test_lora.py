"""LoraState: model <-> state <-> Flower ArrayRecord."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from flwr.app.message.array import SType

from fedlora.lora import LoraRecordError, LoraState
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


def npy_array(values: np.ndarray, version: tuple[int, int] | None = None) -> Array:
    """A Flower Array holding `values` as a .npy payload (of the given format version)."""
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, values, version=version)
    return Array(dtype=str(values.dtype), shape=values.shape, stype=SType.NUMPY, data=buffer.getvalue())


@pytest.mark.parametrize("version", [(1, 0), (2, 0)])
def test_a_record_decodes_as_np_load_would_as_views_of_its_bytes_or_copies(version) -> None:
    values = {"l.A": np.arange(12, dtype=np.float32).reshape(3, 4), "l.B": np.asfortranarray(np.ones((4, 3)))}
    record = ArrayRecord({key: npy_array(v, version) for key, v in values.items()})
    views, copies = LoraState.from_array_record(record, copy=False), LoraState.from_array_record(record)
    for key, expected in values.items():
        for state in (views, copies):
            assert torch.equal(state.tensors()[key], torch.from_numpy(record[key].numpy()))
            assert state.tensors()[key].numpy().tolist() == expected.tolist()
        payload = np.frombuffer(record[key].data, dtype=np.uint8)
        assert np.shares_memory(views.tensors()[key].numpy(), payload)
        assert not np.shares_memory(copies.tensors()[key].numpy(), payload)


@pytest.mark.parametrize(
    "payload",
    [
        npy_array(np.zeros(8, dtype=np.float32)).data[:-4],  # truncated
        npy_array(np.array(["a", "b"])).data,  # a dtype torch has no tensor for
        npy_array(np.zeros(2), version=(3, 0)).data,
        b"not a numpy file at all",
    ],
)
def test_an_array_that_is_no_tensor_is_refused_naming_its_key(payload: bytes) -> None:
    record = ArrayRecord({"l.A": Array(dtype="float32", shape=(8,), stype=SType.NUMPY, data=payload)})
    with pytest.raises(LoraRecordError, match="array 'l.A' cannot be decoded"):
        LoraState.from_array_record(record)
