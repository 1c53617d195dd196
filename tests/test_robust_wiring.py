"""Defences and the simulated adversary wired into the strategies and the server round."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord

from fedlora.attacks import Adversary, choose_malicious
from fedlora.config import ConfigError
from fedlora.lora import LoraState
from fedlora.results import read_history, read_summary
from fedlora.roster import Roster
from fedlora.seeds import derive_seed
from fedlora.server import detection_record, instruct_poisoners, poison_replies
from fedlora.simulation import check_runnable, simulate
from strategies import DEFENCES, build_strategy, defence_class
from strategies.fedit import FedIT
from strategies.fedsvd import FedSVD
from strategies.ffa_lora import FFALoRA
from strategies.krum import KrumDefence, MultiKrumDefence
from strategies.median import MedianDefence
from strategies.zprobe import ZProbeDefence
from strategies.zprobe_refined import ZProbeRefinedDefence
from tests.conftest import tiny_config
from tests.test_strategy_base import client_reply, global_state

pytestmark = pytest.mark.usefixtures("flower_task")

N = 12
NODES = {100 + k: k for k in range(N)}
EXAMPLES = 10  # every client declares this many at the handshake


def uniform(nodes: dict[int, int]) -> Roster:
    """A roster in which every client declared EXAMPLES examples."""
    return Roster(nodes, dict.fromkeys(nodes.values(), EXAMPLES))


def reply(node: int, state: LoraState):
    """A well-formed reply stating the declared count."""
    return client_reply(node, state, num_examples=EXAMPLES)


def honest_state(seed: int, scale: float = 0.01) -> LoraState:
    """The global state moved by a small random step, as an honest client's reply."""
    state = global_state().clone()
    g = torch.Generator().manual_seed(seed)
    for parts in state.factors.values():
        for name in parts:
            parts[name] += scale * torch.randn(parts[name].shape, generator=g)
    for name in state.head:
        state.head[name] = state.head[name] + scale * torch.randn(state.head[name].shape, generator=g)
    return state


def run_round(strategy, states: dict[int, LoraState]) -> LoraState:
    list(strategy.configure_train(1, global_state().to_array_record(), ConfigRecord(), grid=None))
    replies = [reply(node, states[client]) for node, client in NODES.items() if client in states]
    arrays, _ = strategy.aggregate_train(1, replies)
    return LoraState.from_array_record(arrays)


def test_zprobe_refined_drops_a_far_attacker_and_the_strategy_averages_the_rest() -> None:
    states = {k: honest_state(k) for k in range(N)}
    step = states[3].minus(global_state())
    states[3] = global_state().plus(step.unflatten(-50 * step.flatten()))  # client 3 attacks
    strategy = FedIT(uniform(NODES), clients_per_round=N, defence=ZProbeRefinedDefence(0.25))
    result = run_round(strategy, states)
    assert strategy.last_round.dropped == [3]
    assert strategy.last_round.extra["defence"]["name"] == "zprobe_refined"
    # What the filter kept is aggregated exactly as FedIT aggregates those clients alone.
    plain = FedIT(uniform({n: c for n, c in NODES.items() if c != 3}), clients_per_round=N - 1)
    expected = run_round(plain, {k: s for k, s in states.items() if k != 3})
    assert all(torch.allclose(result.tensors()[k], t) for k, t in expected.tensors().items())


def test_zprobe_the_papers_rule_drops_the_far_attacker_in_a_round_of_14() -> None:
    nodes = {100 + k: k for k in range(14)}
    states = {k: honest_state(k) for k in range(14)}
    step = states[5].minus(global_state())
    states[5] = global_state().plus(step.unflatten(-50 * step.flatten()))
    strategy = FedIT(uniform(nodes), clients_per_round=14, defence=ZProbeDefence(0.1))  # ceil(0.9 * 14) = 13 pass
    list(strategy.configure_train(1, global_state().to_array_record(), ConfigRecord(), grid=None))
    arrays, _ = strategy.aggregate_train(1, [reply(n, states[c]) for n, c in nodes.items()])
    assert arrays is not None and strategy.last_round.dropped == [5]
    stats = strategy.last_round.extra["defence"]
    assert (stats["name"], stats["accepted"], stats["q"], stats["aggregation_rounds"]) == ("zprobe", 13, 17, 1)


def test_median_defence_feeds_its_statistic_to_the_strategy_as_one_update() -> None:
    states = {k: honest_state(k) for k in range(5)}
    nodes = {100 + k: k for k in range(5)}
    strategy = FedIT(uniform(nodes), clients_per_round=5, defence=MedianDefence())
    list(strategy.configure_train(1, global_state().to_array_record(), ConfigRecord(), grid=None))
    arrays, _ = strategy.aggregate_train(1, [reply(n, states[c]) for n, c in nodes.items()])
    result = LoraState.from_array_record(arrays)
    stacked = torch.stack([s.flatten() for s in states.values()])
    expected = global_state().unflatten(stacked.median(dim=0).values)  # 5 clients: the middle value
    assert all(torch.allclose(result.tensors()[k], t, atol=1e-6) for k, t in expected.tensors().items())
    assert strategy.last_round.dropped == [] and strategy.last_round.accepted == list(range(5))


def test_b_only_strategies_screen_and_keep_their_own_aggregation() -> None:
    """FedSVD behind the median: the median of the B updates, then FedSVD's refactorization."""
    g = global_state()
    states = {k: honest_state(k).select("B", head=True) for k in range(5)}
    nodes = {100 + k: k for k in range(5)}
    strategy = FedSVD(uniform(nodes), clients_per_round=5, defence=MedianDefence())
    list(strategy.configure_train(1, g.to_array_record(), ConfigRecord(), grid=None))
    arrays, _ = strategy.aggregate_train(1, [reply(n, states[c]) for n, c in nodes.items()])
    result = LoraState.from_array_record(arrays)
    for layer, parts in result.factors.items():
        b_median = torch.stack([states[k].factors[layer]["B"] for k in range(5)]).median(dim=0).values
        product = parts["B"] @ parts["A"]
        assert torch.allclose(product, b_median @ g.factors[layer]["A"], atol=1e-5)


def test_a_defence_with_too_few_replies_fails_closed() -> None:
    strategy = FedIT(uniform({100 + k: k for k in range(4)}), clients_per_round=4, defence=ZProbeRefinedDefence(0.25))
    list(strategy.configure_train(1, global_state().to_array_record(), ConfigRecord(), grid=None))
    arrays, _ = strategy.aggregate_train(1, [reply(100 + k, honest_state(k)) for k in range(4)])
    assert arrays is None and strategy.last_round.skipped
    assert strategy.last_round.extra["defence"]["too_few_replies"] == 4


def test_registry_and_config_refuse_unknown_names_and_impossible_rounds() -> None:
    assert set(DEFENCES) == {
        *("zprobe", "zprobe_refined", "krum", "multikrum", "bulyan", "median", "trimmed_mean"),
        *("centered_clipping", "rfa"),
    }
    assert defence_class("none") is None
    with pytest.raises(ConfigError, match="unknown defence 'krumm'"):
        defence_class("krumm")
    with pytest.raises(ConfigError, match="zprobe needs at least 14 clients a round"):
        check_runnable(tiny_config("strategy.robust='zprobe'"))
    with pytest.raises(ConfigError, match="zprobe_refined needs at least 9 clients a round"):
        check_runnable(tiny_config("strategy.robust='zprobe_refined'"))
    with pytest.raises(ConfigError, match="attack.*unknown attack 'signflip'"):
        tiny_config("attack.name='signflip'")
    with pytest.raises(ConfigError, match="takes no option sigma"):
        tiny_config("attack.name='ipm'", "attack.options.sigma=1.0")
    strategy = build_strategy(tiny_config("strategy.robust='krum'", "strategy.phi_max=0.2"), uniform({1: 0, 2: 1, 3: 2}))
    assert strategy.defence.name == "krum" and strategy.defence.phi_max == 0.2


def test_adversary_rewrites_only_its_clients_and_flags_are_scored() -> None:
    adversary = Adversary("ipm", {"eps": 2.0}, num_clients=N, fraction=0.25, seed=3)
    assert sorted(adversary.malicious) == choose_malicious(N, 0.25, derive_seed(3, "malicious"))
    strategy = FFALoRA(uniform(NODES), clients_per_round=N, seed=3)
    base = global_state()
    list(strategy.configure_train(1, base.to_array_record(), ConfigRecord(), grid=None))
    states = {k: honest_state(k).select("B", head=True) for k in range(N)}
    replies = [reply(node, states[c]) for node, c in NODES.items()]
    poison_replies(adversary, replies, strategy, server_round=1)
    received = {NODES[r.metadata.src_node_id]: LoraState.from_array_record(r.content["arrays"]) for r in replies}
    honest = [k for k in range(N) if k not in adversary.malicious]
    honest_mean = torch.stack([states[k].minus(base).flatten() for k in honest]).mean(dim=0)
    for client, state in received.items():
        if client in adversary.malicious:  # IPM: -eps times the honest mean
            assert torch.allclose(state.minus(base).flatten(), -2.0 * honest_mean, atol=1e-6)
        else:
            assert all(torch.equal(state.tensors()[k], t) for k, t in states[client].tensors().items())
    bad = sorted(adversary.malicious)
    record = detection_record(adversary, seen=list(range(N)), flagged=[bad[0], honest[0]])
    assert record["malicious"] == bad
    assert record["tpr"] == pytest.approx(1 / len(bad)) and record["fpr"] == pytest.approx(1 / len(honest))
    unscored = detection_record(adversary, seen=list(range(N)), flagged=None)  # median, trimmed mean
    assert unscored == {"malicious": bad}


def test_poison_replies_hands_the_rounds_defence_to_the_adaptive_attack() -> None:
    adversary = Adversary("adaptive", {"tol": 1e-4}, num_clients=N, fraction=0.25, seed=3)
    strategy = FedIT(uniform(NODES), clients_per_round=N, seed=3, defence=MultiKrumDefence(0.25))
    list(strategy.configure_train(1, global_state().to_array_record(), ConfigRecord(), grid=None))
    replies = [reply(node, honest_state(c)) for node, c in NODES.items()]
    poison_replies(adversary, replies, strategy, server_round=1)
    strategy.aggregate_train(1, replies)
    # The attack moved the malicious clients away from the honest mean, yet Multi-Krum kept them.
    received = {NODES[r.metadata.src_node_id]: LoraState.from_array_record(r.content["arrays"]) for r in replies}
    bad = sorted(adversary.malicious)
    assert not torch.allclose(received[bad[0]].flatten(), honest_state(bad[0]).flatten())
    assert set(bad) <= set(strategy.last_round.accepted)


def test_label_flippers_are_told_so_in_their_own_train_message() -> None:
    adversary = Adversary("label_flip", {}, num_clients=N, fraction=0.25, seed=1)
    assert adversary.poisons_data
    strategy = FedIT(uniform(NODES), clients_per_round=N)
    messages = list(strategy.configure_train(1, global_state().to_array_record(), ConfigRecord({"lr": 0.1}), grid=None))
    instruct_poisoners(adversary, messages, NODES)
    flagged = {NODES[m.metadata.dst_node_id] for m in messages if m.content["config"].get("poison-labels", False)}
    assert flagged == set(adversary.malicious)
    assert all(m.content["config"]["lr"] == 0.1 for m in messages)


@pytest.mark.e2e
@pytest.mark.usefixtures("one_ray")
@pytest.mark.parametrize(("defence", "clients"), [("zprobe", 14), ("zprobe_refined", 10)])
def test_one_attacker_against_the_zprobe_filters_through_ray(tmp_path: Path, defence: str, clients: int) -> None:
    config = tiny_config(
        f"federation.num_clients={clients}",
        f"federation.clients_per_round={clients}",
        "federation.min_replies=5",
        "attack.name='scaling'",
        "attack.fraction=0.1",
        "attack.options.factor=-20.0",
        f"strategy.robust='{defence}'",
        "strategy.phi_max=0.2",
    )
    simulate(config, tmp_path / "run")
    history, summary = read_history(tmp_path / "run"), read_summary(tmp_path / "run")
    (attacker,) = summary["malicious"]
    for record in history[1:]:
        extra = record["extra"]
        assert extra["malicious"] == [attacker]
        assert attacker in extra["flagged"] and attacker not in record["clients"]
        assert extra["tpr"] == 1.0 and extra["fpr"] <= 0.2
        assert extra["defence"]["name"] == defence


def test_krum_keeping_one_update_is_not_a_round_below_min_replies() -> None:
    """min_replies counts valid replies: Krum's single survivor is aggregated, not skipped."""
    nodes = {100 + k: k for k in range(5)}
    strategy = FedIT(uniform(nodes), clients_per_round=5, min_replies=3, defence=KrumDefence(0.25))
    list(strategy.configure_train(1, global_state().to_array_record(), ConfigRecord(), grid=None))
    arrays, _ = strategy.aggregate_train(1, [reply(n, honest_state(c)) for n, c in nodes.items()])
    assert arrays is not None and not strategy.last_round.skipped
    (kept,) = strategy.last_round.accepted
    result = LoraState.from_array_record(arrays)
    assert all(torch.allclose(result.tensors()[k], t) for k, t in honest_state(kept).tensors().items())


def test_multikrum_averages_what_it_keeps_plainly_as_the_paper_does_unless_asked_for_example_weights() -> None:
    from strategies.krum import krum

    states = {k: honest_state(k) for k in range(N)}
    states[5] = honest_state(5, scale=2.0)  # far from the rest: Multi-Krum drops it
    sizes = {k: 5 + 7 * k for k in range(N)}  # unequal example counts
    roster = Roster(NODES, sizes)

    def round_with(defence):
        strategy = FedIT(roster, clients_per_round=N, defence=defence)
        list(strategy.configure_train(1, global_state().to_array_record(), ConfigRecord(), grid=None))
        replies = [client_reply(node, states[c], num_examples=sizes[c]) for node, c in NODES.items()]
        arrays, _ = strategy.aggregate_train(1, replies)
        return strategy, LoraState.from_array_record(arrays)

    strategy, plain = round_with(MultiKrumDefence(0.25))
    kept = strategy.last_round.accepted
    assert 5 not in kept and len(kept) == N - 3
    deltas = torch.stack([states[k].minus(global_state()).flatten().double() for k in kept])
    paper = deltas.mean(dim=0)  # Blanchard et al.: the plain mean of the selected updates
    torch.testing.assert_close(plain.minus(global_state()).flatten().double(), paper, rtol=0, atol=1e-6)
    _, weighted = round_with(MultiKrumDefence(0.25, plain_mean=False))
    p = torch.tensor([sizes[k] for k in kept], dtype=torch.float64)
    by_examples = (p[:, None] * deltas).sum(dim=0) / p.sum()
    torch.testing.assert_close(weighted.minus(global_state()).flatten().double(), by_examples, rtol=0, atol=1e-6)
    assert not torch.allclose(paper, by_examples, atol=1e-4)  # the two means differ on these inputs
    # The rule itself, in float64: the selected updates' plain mean to 1e-12.
    updates = torch.stack([states[k].minus(global_state()).flatten().double() for k in range(N)])
    aggregate, selected, _ = krum(updates, None, num_malicious=3, keep=N - 3)
    torch.testing.assert_close(aggregate, updates[selected].mean(dim=0), rtol=0, atol=1e-12)


def test_multikrum_mean_is_set_in_the_strategy_section() -> None:
    config = tiny_config("strategy.robust='multikrum'", "strategy.multikrum_mean='examples'")
    assert defence_class("multikrum").from_config(config.strategy).plain_mean is False
    assert defence_class("multikrum").from_config(tiny_config("strategy.robust='multikrum'").strategy).plain_mean
