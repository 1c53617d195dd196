"""LoRA-A2: the components a client selects and the server's rule, against dense float64 references
built from the paper's definitions; its reply form, budget and refusals; its wiring (config, client)."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora.config import ExperimentConfig
from fedlora.lora import COMPONENT_INDEX, LoraState
from fedlora.rank_components import top_components
from fedlora.roster import Roster
from strategies import STRATEGIES
from strategies.base import ARRAYS_KEY, INFO_KEY, METRICS_KEY
from strategies.lora_a2 import LoraA2
from strategies.rolora import RoLoRA
from tests.conftest import reply_from, tiny_config

pytestmark = pytest.mark.usefixtures("flower_task")

NODES = {101: 0, 102: 1, 103: 2}
DECLARED = {0: 10, 1: 30, 2: 60}
ALPHA, RANK = 16.0, 6
SHAPES = {"l0": (12, 9), "l1": (7, 11), "l2": (10, 10)}  # layer -> (d_out, d_in)


def adapter(seed: int, zero_b: bool = False) -> LoraState:
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for layer, (d_out, d_in) in SHAPES.items():
        b = torch.zeros(d_out, RANK) if zero_b else torch.randn(d_out, RANK, generator=g)
        factors[layer] = {"A": torch.randn(RANK, d_in, generator=g), "B": b}
    return LoraState(factors=factors)


def moved(state: LoraState, part: str, seed: int) -> LoraState:
    """A client's trained `part`: every component moved, by a different amount each."""
    g = torch.Generator().manual_seed(seed)
    return LoraState(
        factors={
            layer: {part: parts[part] + torch.randn(parts[part].shape, generator=g)} for layer, parts in state.factors.items()
        }
    )


def change_of_component(part: str, trained: torch.Tensor, start: torch.Tensor, frozen: torch.Tensor, i: int) -> torch.Tensor:
    """The paper's change of rank i as a dense d_out x d_in matrix, in float64: dB[:, i] A[i, :] or B[:, i] dA[i, :]."""
    change = trained.double() - start.double()
    if part == "B":
        return torch.outer(change[:, i], frozen.double()[i])
    return torch.outer(frozen.double()[:, i], change[i])


def dense_selection(part: str, trained: LoraState, start: LoraState, budget: int) -> dict[str, set[int]]:
    """The `budget` components whose dense change has the largest Frobenius norm over all layers (ties: layer, index)."""
    frozen = "A" if part == "B" else "B"
    scored = []
    for layer in sorted(start.factors):
        args = (trained.factors[layer][part], start.factors[layer][part], start.factors[layer][frozen])
        scored += [(-float(torch.linalg.matrix_norm(change_of_component(part, *args, i))), layer, i) for i in range(RANK)]
    chosen: dict[str, set[int]] = {layer: set() for layer in start.factors}
    for _, layer, i in sorted(scored)[:budget]:
        chosen[layer].add(i)
    return chosen


@settings(max_examples=30, deadline=None)
@given(part=st.sampled_from(["A", "B"]), upload_rank=st.integers(1, RANK), seed=st.integers(0, 2**16))
def test_a_client_sends_the_components_whose_change_of_the_adapter_is_largest(part: str, upload_rank: int, seed: int) -> None:
    start = adapter(seed)
    trained = moved(start, part, seed + 1)
    sent = top_components(trained, start, part, upload_rank)
    expected = dense_selection(part, trained, start, upload_rank * len(SHAPES))
    axis = 1 if part == "B" else 0
    for layer, parts in sent.factors.items():
        index = parts[COMPONENT_INDEX]
        assert set(index.tolist()) == expected[layer] and torch.equal(index, index.sort().values)
        assert torch.equal(parts[part], trained.factors[layer][part].index_select(axis, index))
    assert sum(len(parts[COMPONENT_INDEX]) for parts in sent.factors.values()) == upload_rank * len(SHAPES)


def make(upload_rank: int | None = 2) -> LoraA2:
    return LoraA2(
        roster=Roster(NODES, DECLARED), clients_per_round=3, train_head=False, lora_alpha=ALPHA, upload_rank=upload_rank
    )


def reply(node: int, state: LoraState):
    content = RecordDict(
        {
            ARRAYS_KEY: state.to_array_record(),
            METRICS_KEY: MetricRecord({"num-examples": DECLARED[NODES[node]], "train-loss": 1.0}),
            INFO_KEY: ConfigRecord({}),
        }
    )
    return reply_from(node, content)


def run_round(strategy, state: LoraState, server_round: int):
    """Each client trains the round's factor (every component moves) and sends what a LoRA-A2 client sends."""
    messages = list(strategy.configure_train(server_round, state.to_array_record(), ConfigRecord(), grid=None))
    part = messages[0].content["config"]["train-factors"]
    trained, sent = {}, {}
    for message in messages:
        client = NODES[message.metadata.dst_node_id]
        trained[client] = moved(state, part, seed=100 * server_round + client)
        upload_rank = message.content["config"].get("upload-rank")
        sent[client] = trained[client] if upload_rank is None else top_components(trained[client], state, part, upload_rank)
    arrays, _ = strategy.aggregate_train(server_round, [reply(node, sent[client]) for node, client in NODES.items()])
    assert not strategy.last_round.rejected, strategy.last_round.rejected
    return part, sent, LoraState.from_array_record(arrays)


def sent_adapter(part: str, start: LoraState, sent: LoraState, layer: str) -> torch.Tensor:
    """The paper's client adapter, dense in float64: (alpha / r) (B + M * dB) A, or B (A + M * dA), M the sent components' mask."""
    parts = {p: t.double() for p, t in start.factors[layer].items()}
    index = sent.factors[layer][COMPONENT_INDEX]
    mask = torch.zeros_like(parts[part])
    if part == "B":
        mask[:, index] = 1.0
        update = torch.zeros_like(parts[part]).index_copy(1, index, sent.factors[layer][part].double())
    else:
        mask[index, :] = 1.0
        update = torch.zeros_like(parts[part]).index_copy(0, index, sent.factors[layer][part].double())
    parts[part] = parts[part] + mask * (update - parts[part])
    return ALPHA / RANK * parts["B"] @ parts["A"]


def test_the_new_adapter_is_the_weighted_sum_of_the_adapters_the_clients_sent_b_then_a() -> None:
    strategy, state = make(), adapter(0, zero_b=True)
    total = sum(DECLARED.values())
    for server_round, expected_part in ((1, "B"), (2, "A")):
        part, sent, new_state = run_round(strategy, state, server_round)
        assert part == expected_part
        for layer in SHAPES:
            reference = sum(DECLARED[c] / total * sent_adapter(part, state, sent[c], layer) for c in sent)
            new = ALPHA / RANK * new_state.factors[layer]["B"].double() @ new_state.factors[layer]["A"].double()
            torch.testing.assert_close(new, reference, atol=1e-5, rtol=1e-5)
            # A component no client sent is the broadcast one (to float32 rounding: sum p_k X = X).
            axis = 1 if part == "B" else 0
            unsent = sorted(set(range(RANK)) - {int(i) for c in sent for i in sent[c].factors[layer][COMPONENT_INDEX]})
            index = torch.tensor(unsent, dtype=torch.int64)
            unchanged = state.factors[layer][part].index_select(axis, index)
            torch.testing.assert_close(new_state.factors[layer][part].index_select(axis, index), unchanged, atol=1e-6, rtol=1e-6)
        strategy.global_state = state = new_state


def test_the_uplink_is_the_selected_components_and_their_indices_and_less_than_rolora() -> None:
    uplink, sent = {}, {}
    for strategy in (make(upload_rank=2), RoLoRA(roster=Roster(NODES, DECLARED), clients_per_round=3, train_head=False)):
        _, sent[strategy.name], _ = run_round(strategy, adapter(0, zero_b=True), 1)
        uplink[strategy.name] = strategy.last_round.bytes_up_factors
    # 3 clients x 2 components a layer x 3 layers: a B column (d_out float32) and an int64 index each, chosen where they matter.
    expected = sum(
        len(parts[COMPONENT_INDEX]) * 8 + parts["B"].numel() * 4 for s in sent["lora_a2"].values() for parts in s.factors.values()
    )
    assert uplink["lora_a2"] == expected
    assert uplink["lora_a2"] < uplink["rolora"] == 3 * RANK * sum(d_out for d_out, _ in SHAPES.values()) * 4


def test_without_an_upload_rank_every_component_is_sent_and_the_round_is_rolora_s() -> None:
    state = adapter(0, zero_b=True)
    _, _, a2_state = run_round(make(upload_rank=None), state, 1)
    _, _, rolora_state = run_round(RoLoRA(roster=Roster(NODES, DECLARED), clients_per_round=3, train_head=False), state, 1)
    for layer in SHAPES:
        torch.testing.assert_close(a2_state.factors[layer]["B"], rolora_state.factors[layer]["B"])


def hostile(sent: LoraState, how: str) -> LoraState:
    """An honest reply (2 components a layer, budget 6) changed into what a rule forbids."""
    state = sent.clone()
    first = state.factors["l0"]
    if how == "over budget":
        first[COMPONENT_INDEX] = torch.arange(RANK)
        first["B"] = torch.zeros(SHAPES["l0"][0], RANK)
    elif how == "repeated index":
        first[COMPONENT_INDEX] = torch.tensor([1, 1])
    elif how == "index out of range":
        first[COMPONENT_INDEX] = torch.tensor([0, RANK])
    elif how == "float index":
        first[COMPONENT_INDEX] = first[COMPONENT_INDEX].float()
    elif how == "no index":
        del first[COMPONENT_INDEX]
    elif how == "full factor":
        state = LoraState(factors={layer: {"B": torch.zeros(d_out, RANK)} for layer, (d_out, _) in SHAPES.items()})
    elif how == "too few values":
        first["B"] = first["B"][:, :1]
    elif how == "NaN value":
        first["B"][0, 0] = float("nan")
    elif how == "negative index":
        first[COMPONENT_INDEX] = torch.tensor([-1, 0])
    elif how == "decreasing index":  # unique, in range, but not in the order the client must send
        first[COMPONENT_INDEX] = first[COMPONENT_INDEX].flip(0)
    elif how == "int32 index":
        first[COMPONENT_INDEX] = first[COMPONENT_INDEX].to(torch.int32)
    elif how == "2-D index":
        first[COMPONENT_INDEX] = first[COMPONENT_INDEX].reshape(1, -1)
    elif how == "tampered head":  # a head from a client whose head is frozen (train_head = False)
        state.head = {"classifier.weight": torch.full((3, 6), 1e3)}
    return state


REASONS = {
    "over budget": "more than its upload budget of 6",
    "repeated index": "not increasing",
    "index out of range": "not increasing within 0..5",
    "float index": "expected int64",
    "no index": "expected B components and their index",
    "full factor": "expected B components and their index",
    "too few values": "layer l0.B: shape (12, 1), expected (12,",
    "NaN value": "NaN",
    "negative index": "not increasing within 0..5",
    "decreasing index": "not increasing within 0..5",
    "int32 index": "component index of dtype torch.int32 and 1 dimensions, expected int64 and 1",
    "2-D index": "component index of dtype torch.int64 and 2 dimensions, expected int64 and 1",
    "tampered head": "head parameters ['classifier.weight'], expected []",
}


@pytest.mark.parametrize("how", list(REASONS))
def test_a_reply_that_breaks_the_form_or_the_budget_is_refused_with_its_reason_and_the_round_goes_on(how: str) -> None:
    strategy, state = make(), adapter(0, zero_b=True)
    messages = list(strategy.configure_train(1, state.to_array_record(), ConfigRecord(), grid=None))
    honest = {c: top_components(moved(state, "B", c), state, "B", 2) for c in NODES.values()}
    honest[0] = hostile(honest[0], how)
    arrays, _ = strategy.aggregate_train(
        1, [reply(m.metadata.dst_node_id, honest[NODES[m.metadata.dst_node_id]]) for m in messages]
    )
    (refusal,) = strategy.last_round.rejected
    assert refusal["client"] == 0 and REASONS[how] in refusal["reason"]
    assert arrays is not None and strategy.last_round.accepted == [1, 2]


def test_upload_rank_above_the_adapters_rank_is_refused_in_one_line_and_the_strategy_is_registered() -> None:
    with pytest.raises(ValueError, match="strategy.upload_rank: 9 components a layer, more than model.lora_rank = 8"):
        ExperimentConfig.model_validate({"model": {"lora_rank": 8}, "strategy": {"name": "lora_a2", "upload_rank": 9}})
    assert STRATEGIES["lora_a2"] is LoraA2 and LoraA2.description
    config = tiny_config("strategy.name='lora_a2'", "strategy.upload_rank=2")
    assert make().options(config.strategy) == {"upload_rank": 2}


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"strategy": {"name": "fedit", "upload_rank": 1}}, "strategy.upload_rank: only lora_a2 sends a budget"),
        (
            {
                "model": {"client_ranks": [2, 2, 2]},
                "federation": {"num_clients": 3, "clients_per_round": 3},
                "strategy": {"name": "lora_a2", "upload_rank": 3},
            },
            "strategy.upload_rank: 3 components a layer, more than the smallest of model.client_ranks = 2",
        ),
    ],
    ids=["other-strategy", "client-ranks"],
)
def test_an_upload_rank_that_means_nothing_or_exceeds_a_clients_rank_is_refused(section: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ExperimentConfig.model_validate(section)


def test_the_simulated_adversary_sends_its_rewritten_update_as_selected_components_which_a_defence_screens() -> None:
    from fedlora.attacks import Adversary
    from fedlora.server import poison_replies
    from strategies.krum import MultiKrumDefence

    nodes = {100 + k: k for k in range(8)}
    strategy = LoraA2(
        roster=Roster(nodes, dict.fromkeys(nodes.values(), 10)),
        clients_per_round=8,
        train_head=False,
        upload_rank=2,
        defence=MultiKrumDefence(0.25),
    )
    state = adapter(0, zero_b=True)
    list(strategy.configure_train(1, state.to_array_record(), ConfigRecord(), grid=None))
    adversary = Adversary("sign_flip", {}, num_clients=8, fraction=0.25, seed=3)
    replies = []
    for node, client in nodes.items():
        content = RecordDict(
            {
                ARRAYS_KEY: top_components(moved(state, "B", client), state, "B", 2).to_array_record(),
                METRICS_KEY: MetricRecord({"num-examples": 10, "train-loss": 1.0}),
                INFO_KEY: ConfigRecord({}),
            }
        )
        replies.append(reply_from(node, content))
    honest = {client: LoraState.from_array_record(r.content[ARRAYS_KEY]) for client, r in zip(nodes.values(), replies)}
    poison_replies(adversary, replies, strategy, server_round=1)
    for client, message in zip(nodes.values(), replies):
        sent = LoraState.from_array_record(message.content[ARRAYS_KEY])
        assert sum(len(parts[COMPONENT_INDEX]) for parts in sent.factors.values()) == 2 * len(SHAPES)
        rewritten = any(not torch.equal(sent.factors[layer]["B"], honest[client].factors[layer]["B"]) for layer in SHAPES)
        assert rewritten == (client in adversary.malicious)
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None and not strategy.last_round.rejected
    assert strategy.last_round.extra["defence"]["name"] == "multikrum"
