"""strategies/per_layer.py: a round's layers on the ServerApp's threads, one layer per thread."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from fedlora.lora import LoraState
from fedlora.roster import Roster
from strategies import STRATEGIES
from strategies.per_layer import map_layers

# The strategies whose rounds run layer by layer on threads (strategies/per_layer.py).
THREADED = ("flora", "flexlora", "fedex_lora", "lora_fair", "fedsvd")


@pytest.fixture
def torch_threads():
    """Restores torch's thread count after the test."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_results_come_back_in_layer_order_from_the_callers_threads_count(torch_threads):
    torch.set_num_threads(2)
    seen = {}

    def work(layer: str) -> str:
        seen[layer] = (threading.current_thread().name, torch.get_num_threads())
        return layer.upper()

    layers = [f"l{i}" for i in range(9)]
    assert list(map_layers(work, layers).items()) == [(layer, layer.upper()) for layer in layers]
    assert {name.startswith("layers") for name, _ in seen.values()} == {True}  # the pool's threads, not the caller
    assert {count for _, count in seen.values()} == {1}  # torch on one thread inside each
    assert torch.get_num_threads() == 2  # the caller's count as it was


def test_one_thread_runs_the_layers_in_the_callers_thread(torch_threads):
    torch.set_num_threads(1)
    names = map_layers(lambda layer: threading.current_thread().name, ["a", "b"])
    assert set(names.values()) == {threading.current_thread().name}


def test_a_failing_layer_raises_in_the_caller(torch_threads):
    torch.set_num_threads(2)

    def work(layer: str) -> int:
        if layer == "bad":
            raise ValueError("layer bad failed")
        return 1

    with pytest.raises(ValueError, match="layer bad failed"):
        map_layers(work, ["a", "bad", "c"])
    assert torch.get_num_threads() == 2


def test_after_a_failure_the_running_layers_finish_before_it_is_raised(torch_threads):
    """Else a layer still running would compute with the thread counts already put back."""
    torch.set_num_threads(2)
    finished = threading.Event()

    def work(layer: str) -> int:
        if layer == "bad":
            raise ValueError("layer bad failed")
        time.sleep(0.3)
        finished.set()
        return 1

    with pytest.raises(ValueError, match="layer bad failed"):
        map_layers(work, ["bad", "slow"])
    assert finished.is_set()


def round_inputs(clients: int = 3, layers: int = 5, seed: int = 0) -> tuple[LoraState, list[LoraState], torch.Tensor]:
    """A global state of several layers of different shapes and the clients' trained factors
    (float32); one layer wider than a Gram's block of columns (gram_svd._GRAM_BLOCK), which a
    thread count above one would split."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(3000, 24)] + [(24 + 8 * i, 40 - 4 * i) for i in range(1, layers)]
    global_state = LoraState(
        factors={
            f"layer{i}": {"A": torch.randn(4, d_in, generator=g), "B": 0.1 * torch.randn(d_out, 4, generator=g)}
            for i, (d_out, d_in) in enumerate(shapes)
        }
    )
    updates = [
        LoraState(
            factors={
                name: {part: t + 0.05 * torch.randn(t.shape, generator=g) for part, t in parts.items()}
                for name, parts in global_state.factors.items()
            }
        )
        for _ in range(clients)
    ]
    weights = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    return global_state, updates, weights


@pytest.mark.parametrize("layers", [1, 5])
@pytest.mark.parametrize("name", THREADED)
def test_a_round_is_the_same_to_the_bit_on_one_thread_or_several(name, layers, torch_threads):
    global_state, updates, weights = round_inputs(layers=layers)
    results, extras = [], []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        strategy = STRATEGIES[name](
            Roster({i: i for i in range(3)}, {i: 10 for i in range(3)}), clients_per_round=3, train_head=False
        )
        strategy.global_state, strategy.server_round = global_state, 1
        replies = [update.select(strategy.trains, head=False) for update in updates]
        results.append(strategy.aggregate_factors(global_state, replies, weights))
        extras.append(dict(strategy.last_round.extra))
    for result in results[1:]:
        assert result.factors.keys() == results[0].factors.keys()
        for layer, parts in result.factors.items():
            assert parts.keys() == results[0].factors[layer].keys()
            for part, tensor in parts.items():
                assert torch.equal(tensor, results[0].factors[layer][part]), (layer, part)
    assert extras[1:] == extras[:1] * 2  # what a round records beside the factors (FlexLoRA's truncation errors)


def test_a_single_layer_runs_in_the_callers_thread_with_torch_on_one_thread(torch_threads):
    torch.set_num_threads(2)
    seen = map_layers(lambda layer: (threading.current_thread().name, torch.get_num_threads()), ["only"])
    assert seen == {"only": (threading.current_thread().name, 1)}
    assert torch.get_num_threads() == 2
