"""The heterogeneous-rank strategies' Flower classes, driven with fake replies: what each client
is sent and the new global state, against the models they stand for (float64 dense references)."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedlora.config import MIXED_RANK_STRATEGIES, ConfigError, ExperimentConfig
from fedlora.lora import LoraState
from fedlora.roster import Roster
from strategies import STRATEGIES
from strategies.base import ARRAYS_KEY, INFO_KEY, METRICS_KEY, LoraStrategy
from strategies.fedex_lora import FedExLoRA
from strategies.fedit import FedIT
from strategies.fedsa_lora import FedSALoRA
from strategies.flexlora import FlexLoRA
from strategies.flora import FLoRA
from strategies.rolora import RoLoRA
from tests.conftest import reply_from

pytestmark = pytest.mark.usefixtures("flower_task")

NODES = {101: 0, 102: 1, 103: 2}
DECLARED = {0: 10, 1: 30, 2: 60}
RANKS = {0: 4, 1: 8, 2: 16}
ALPHA = 16.0
D_OUT, D_IN = 24, 20


def make(cls: type[LoraStrategy], ranks: dict[int, int] | None = RANKS) -> LoraStrategy:
    return cls(roster=Roster(NODES, DECLARED), clients_per_round=3, train_head=False, lora_alpha=ALPHA, client_ranks=ranks)


def initial(rank: int = 16) -> LoraState:
    g = torch.Generator().manual_seed(0)
    return LoraState(
        factors={f"l{i}": {"A": torch.randn(rank, D_IN, generator=g), "B": torch.zeros(D_OUT, rank)} for i in range(2)}
    )


def effective(state: LoraState, layer: str) -> torch.Tensor:
    """What the state adds to the base weight: U V + (alpha / r) B A, in float64."""
    parts = state.factors[layer]
    merged = state.merged_delta(layer)
    adapter = ALPHA / parts["A"].shape[0] * parts["B"].double() @ parts["A"].double()
    return adapter if merged is None else merged + adapter


def run_round(strategy: LoraStrategy, state: LoraState, server_round: int, seed: int):
    """Send a round, have each client move every factor it trains, aggregate. (sent, trained, new state)."""
    messages = list(strategy.configure_train(server_round, state.to_array_record(), ConfigRecord(), grid=None))
    g = torch.Generator().manual_seed(seed)
    sent, trained, replies = {}, {}, []
    for message in messages:
        client = NODES[message.metadata.dst_node_id]
        sent[client] = LoraState.from_array_record(message.content[ARRAYS_KEY])
        config = message.content["config"]
        parts = set(config["train-factors"]) - set(config["keep-factors"])  # what a client sends
        moved = LoraState(
            factors={
                layer: {p: t + torch.randn(t.shape, generator=g) for p, t in f.items() if p in parts}
                for layer, f in sent[client].factors.items()
            }
        )
        trained[client] = moved
        content = RecordDict(
            {
                ARRAYS_KEY: moved.to_array_record(),
                METRICS_KEY: MetricRecord({"num-examples": DECLARED[client], "train-loss": 1.0}),
                INFO_KEY: ConfigRecord({}),
            }
        )
        replies.append(reply_from(message.metadata.dst_node_id, content))
    arrays, _ = strategy.aggregate_train(server_round, replies)
    assert not strategy.last_round.rejected, strategy.last_round.rejected
    return sent, trained, LoraState.from_array_record(arrays)


def client_model(sent: LoraState, trained: LoraState, layer: str) -> torch.Tensor:
    """A client's model after training: its merged delta with its trained factors (the others as sent)."""
    parts = {**sent.factors[layer], **trained.factors[layer]}
    return effective(LoraState(factors={layer: parts}), layer)


def weights() -> dict[int, float]:
    total = sum(DECLARED.values())
    return {c: n / total for c, n in DECLARED.items()}


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=2e-4 * float(expected.abs().max()) + 1e-6, rtol=0)


@pytest.mark.parametrize("cls", [FedExLoRA, FLoRA])
@pytest.mark.parametrize("ranks", [RANKS, None], ids=["mixed", "uniform"])
def test_exact_strategies_make_the_global_model_the_average_of_client_models(cls, ranks):
    strategy, state = make(cls, ranks), initial()
    for server_round in (1, 2, 3):
        sent, trained, state = run_round(strategy, state, server_round, seed=server_round)
        for client, own in sent.items():
            assert own.factors["l0"]["A"].shape[0] == (ranks[client] if ranks else 16)
        for layer in state.factors:
            average = sum(w * client_model(sent[c], trained[c], layer) for c, w in weights().items())
            assert_close(effective(state, layer), average)
        # Every client starts the next round from the global model exactly.
        strategy.global_state = state
        for client in NODES.values():
            own = strategy.client_state(client) or state
            for layer in state.factors:
                assert_close(effective(own, layer), effective(state, layer))
    assert strategy.last_round.bytes_down == sum((strategy.client_state(c) or state).num_bytes() for c in NODES.values())


def test_flora_sends_a_fresh_adapter_and_records_the_stack():
    strategy = make(FLoRA)
    _, _, state = run_round(strategy, initial(), 1, seed=1)
    assert all(not torch.any(parts["B"]) for parts in state.factors.values())
    # The paper's downlink: every client gets the stack of all ranks, 2 layers of (4 + 8 + 16) (D_OUT + D_IN) float32.
    assert strategy.last_round.extra["stack_bytes"] == 3 * 2 * 28 * (D_OUT + D_IN) * 4
    assert strategy.last_round.extra["merged_rank_max"] == 20  # min(28, D_IN)


def test_flexlora_gives_each_client_the_top_components_at_its_rank():
    strategy, state = make(FlexLoRA), initial()
    sent, trained, state = run_round(strategy, state, 1, seed=3)
    for layer in state.factors:
        average = sum(w * client_model(sent[c], trained[c], layer) for c, w in weights().items())
        u, s, vh = torch.linalg.svd(average)
        assert_close(effective(state, layer), (u[:, :16] * s[:16]) @ vh[:16])
        strategy.global_state = state
        for client, rank in RANKS.items():
            own = strategy.client_state(client) or state
            assert own.factors[layer]["A"].shape == (rank, D_IN)
            assert_close(effective(own, layer), (u[:, :rank] * s[:rank]) @ vh[:rank])
    truncation = strategy.last_round.extra["truncation"]
    assert set(truncation) == {"4", "8", "16"} and 0 < truncation["16"]["relative_max"] < truncation["4"]["relative_mean"] < 1


def test_rolora_alternates_and_averages_exactly():
    strategy, state = make(RoLoRA, None), initial()
    state.factors = {layer: {"A": parts["A"], "B": torch.randn(D_OUT, 16)} for layer, parts in state.factors.items()}
    for server_round, part in ((1, "B"), (2, "A")):
        sent, trained, state = run_round(strategy, state, server_round, seed=server_round)
        assert all(set(t.factors["l0"]) == {part} for t in trained.values())
        average = sum(w * client_model(sent[c], trained[c], "l0") for c, w in weights().items())
        assert_close(effective(state, "l0"), average)


def test_fedsa_clients_upload_a_alone_which_is_averaged_and_the_servers_b_stays_the_initial_one():
    strategy, state = make(FedSALoRA, None), initial()
    for server_round in (1, 2):
        sent, trained, new_state = run_round(strategy, state, server_round, seed=server_round)
        assert all(set(t.factors["l0"]) == {"A"} for t in trained.values())  # B never leaves a client
        for own in sent.values():  # everyone is sent the server's state: it holds no B_k
            assert torch.equal(own.factors["l0"]["B"], state.factors["l0"]["B"])
        for layer in state.factors:
            expected_a = sum(w * trained[c].factors[layer]["A"].double() for c, w in weights().items())
            torch.testing.assert_close(new_state.factors[layer]["A"].double(), expected_a, atol=1e-5, rtol=0)
            assert torch.equal(new_state.factors[layer]["B"], initial().factors[layer]["B"])
        state = new_state
    messages = list(strategy.configure_train(3, state.to_array_record(), ConfigRecord(), grid=None))
    assert {(m.content["config"]["train-factors"], m.content["config"]["keep-factors"]) for m in messages} == {("AB", "B")}


def test_fedsa_uplink_is_half_of_fedits_at_the_same_rank_and_a_reply_with_b_is_refused():
    square = LoraState(factors={f"l{i}": {"A": torch.randn(8, D_IN), "B": torch.zeros(D_IN, 8)} for i in range(2)})
    uplink = {}
    for cls in (FedIT, FedSALoRA):
        strategy = make(cls, None)
        run_round(strategy, square, 1, seed=1)
        uplink[cls] = strategy.last_round.bytes_up_factors
    assert uplink[FedSALoRA] * 2 == uplink[FedIT] == 3 * 2 * 2 * 8 * D_IN * 4  # 3 clients, 2 layers, A and B: 8 x 20 float32
    strategy = make(FedSALoRA, None)
    messages = list(strategy.configure_train(1, square.to_array_record(), ConfigRecord(), grid=None))
    content = RecordDict(
        {
            ARRAYS_KEY: square.to_array_record(),  # A and B: a client that sends its B
            METRICS_KEY: MetricRecord({"num-examples": DECLARED[0], "train-loss": 1.0}),
            INFO_KEY: ConfigRecord({}),
        }
    )
    strategy.aggregate_train(1, [reply_from(messages[0].metadata.dst_node_id, content)])
    assert "sent factors ['A', 'B'], expected ['A']" in strategy.last_round.rejected[0]["reason"]


def test_mixed_rank_strategies_are_the_ones_the_config_names():
    assert {name for name, cls in STRATEGIES.items() if cls.mixed_ranks} == set(MIXED_RANK_STRATEGIES)


@pytest.mark.parametrize("name", ["fedit", "fedsa_lora", "rolora"])
def test_one_rank_strategies_refuse_mixed_ranks_in_one_line(name):
    config = {"model": {"client_ranks": [4, 8, 16]}, "federation": {"num_clients": 3, "clients_per_round": 3}}
    with pytest.raises(ValueError, match=f"model.client_ranks: strategy {name} needs one rank"):
        ExperimentConfig.model_validate({**config, "strategy": {"name": name}})
    with pytest.raises(ConfigError, match="needs one rank"):
        make(STRATEGIES[name])


def test_a_merged_delta_sets_the_base_weight_and_a_state_without_one_restores_it():
    from fedlora import workspace
    from tests.conftest import tiny_config

    config = tiny_config()
    model = workspace.lora_model(config, workspace.federated_task(config).num_labels)
    state = LoraState.from_model(model)
    layer = state.layers()[0]
    module = model.get_submodule("base_model.model." + layer)
    original = module.base_layer.weight.detach().clone()
    d_out, d_in = original.shape
    merged = state.clone()
    merged.factors[layer]["U"], merged.factors[layer]["V"] = torch.randn(d_out, 3), torch.randn(3, d_in)
    for _ in range(2):  # loading twice merges once
        merged.load_into(model)
        expected = original + merged.factors[layer]["U"] @ merged.factors[layer]["V"]
        torch.testing.assert_close(module.base_layer.weight.detach(), expected)
    state.load_into(model)
    assert torch.equal(module.base_layer.weight.detach(), original)
    round_trip = LoraState.from_array_record(merged.to_array_record())
    assert torch.equal(round_trip.factors[layer]["U"], merged.factors[layer]["U"])


def test_a_checkpoint_with_a_merged_delta_fits_the_model_and_a_misshapen_one_is_refused():
    from fedlora.checkpoint import _state_problem

    state = initial()
    merged = {**state.tensors(), "l0.U": torch.randn(D_OUT, 5), "l0.V": torch.randn(5, D_IN)}
    assert _state_problem(merged, state) is None
    assert "do not fit" in _state_problem({**merged, "l0.V": torch.randn(5, D_IN + 1)}, state)
    assert "has no V" in _state_problem({k: t for k, t in merged.items() if k != "l0.V"}, state)


@pytest.mark.parametrize("setting", [{"strategy": {"name": "flexlora", "robust": "krum"}}, {"attack": {"name": "sign_flip"}}])
def test_mixed_ranks_refuse_defences_and_model_poisoning(setting):
    config = {"model": {"client_ranks": [4, 8, 16]}, "federation": {"num_clients": 3, "clients_per_round": 3}}
    with pytest.raises(ValueError, match="mixed ranks do not go with a defence"):
        ExperimentConfig.model_validate({"strategy": {"name": "flora"}, **config, **setting})


def test_an_exported_adapter_carries_the_merged_delta_in_its_base(tmp_path, monkeypatch):
    from huggingface_hub import constants as hub_constants
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoTokenizer

    from fedlora.export import RunFigures, export_adapter
    from fedlora.model import build_lora_model
    from tests.conftest import tiny_config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    config, classes = tiny_config(), ["a", "b", "c"]
    model = build_lora_model(config.model, len(classes), config.seed).eval()
    state = LoraState.from_model(model)
    g = torch.Generator().manual_seed(4)
    for parts in state.factors.values():
        d_out, d_in = parts["B"].shape[0], parts["A"].shape[1]
        parts["B"] = torch.randn(parts["B"].shape, generator=g)
        parts["U"], parts["V"] = torch.randn(d_out, 3, generator=g), torch.randn(3, d_in, generator=g)
    state.load_into(model)
    figures = RunFigures(run_name="flora-test", rounds=1, clients=3, final_accuracy=0.5, test_examples=60, epsilon=None)
    folder = export_adapter(model, tmp_path / "adapter", config, classes, figures)
    monkeypatch.chdir(folder)  # peft reads the relative base reference, "./base", against the working directory
    loaded = AutoPeftModelForSequenceClassification.from_pretrained(".").eval()
    batch = AutoTokenizer.from_pretrained(str(folder))(
        ["the match ended in a draw", "shares fell"], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=1e-5)


def test_an_exported_causal_adapter_carries_the_merged_delta_in_its_base(tmp_path, monkeypatch):
    from peft import AutoPeftModelForCausalLM

    from fedlora import causal, workspace
    from fedlora.export import RunFigures
    from fedlora.export_causal import export_causal_adapter
    from tests.conftest import causal_config

    config = causal_config()
    model = causal.build_causal_lora_model(config.model, config.seed).eval()
    state = LoraState.from_model(model)
    g = torch.Generator().manual_seed(5)
    for parts in state.factors.values():
        parts["U"], parts["V"] = (
            torch.randn(parts["B"].shape[0], 2, generator=g),
            torch.randn(2, parts["A"].shape[1], generator=g),
        )
    state.load_into(model)
    figures = RunFigures(run_name="flora-test", rounds=1, clients=3, final_accuracy=0.5, test_examples=24, epsilon=None)
    folder = export_causal_adapter(model, tmp_path / "adapter", config, workspace.tokenizer(config), figures)
    monkeypatch.chdir(folder)
    loaded = AutoPeftModelForCausalLM.from_pretrained(".").eval()
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-5)
