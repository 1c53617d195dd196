"""The Flower ServerApp: builds the strategy, runs the rounds, evaluates, records.

Round loop (one ServerApp for simulation and deployment):
  handshake (query: which client is each node) -> round 0 evaluation ->
  for each round: strategy.configure_train -> grid.send_and_receive -> [simulated adversary:
  the malicious clients' replies rewritten] -> strategy.aggregate_train (validation, defence,
  aggregation) -> evaluate the global state on the held-out split -> one line of history.jsonl
  -> at the end: the adapter in peft's format and summary.json.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedlora import workspace
from fedlora.attacks import Adversary
from fedlora.config import ExperimentConfig, experiment_from_run_config
from fedlora.lora import LoraState
from fedlora.model import evaluate, export_adapter
from fedlora.privacy import DPSettings
from fedlora.results import RoundRecord, RunRecorder
from strategies import build_strategy
from strategies.base import ARRAYS_KEY, CONFIG_KEY, LoraStrategy, check_against

RoundCallback = Callable[[RoundRecord], None]
APP_DIR = Path(__file__).resolve().parent.parent
CONNECT_TIMEOUT = 600.0


class FederationError(RuntimeError):
    """The federation cannot go on (no clients connected, a handshake failed)."""


@dataclass
class ServerRun:
    """What the server keeps between rounds."""

    config: ExperimentConfig
    strategy: LoraStrategy
    recorder: RunRecorder
    state: LoraState


def discover_clients(grid: Grid, expected: int, timeout: float = CONNECT_TIMEOUT) -> dict[int, int]:
    """Node id -> client id for every connected node, asked with a query message."""
    deadline = time.monotonic() + timeout
    while len(node_ids := sorted(grid.get_node_ids())) < expected:
        if time.monotonic() > deadline:
            raise FederationError(f"only {len(node_ids)} of {expected} clients connected within {timeout:.0f} s")
        time.sleep(1.0)
    queries = [Message(RecordDict(), dst_node_id=node, message_type=MessageType.QUERY) for node in node_ids]
    clients: dict[int, int] = {}
    for reply in grid.send_and_receive(queries, timeout=timeout):
        if reply.has_error():
            raise FederationError(f"client handshake failed: {reply.error.reason}")
        clients[reply.metadata.src_node_id] = int(reply.content["info"]["client-id"])
    if len(set(clients.values())) != len(clients):
        raise FederationError("two nodes claim the same client id")
    return clients


def train_config(config: ExperimentConfig, num_labels: int) -> ConfigRecord:
    """What every train message tells clients, beside what the strategy adds."""
    record = ConfigRecord(
        {
            "local-steps": config.federation.local_steps,
            "lr": config.federation.lr,
            "batch-size": config.federation.batch_size,
            "num-labels": num_labels,
        }
    )
    if config.privacy.enabled:
        record.update(dp_settings(config).to_config())
    return record


def dp_settings(config: ExperimentConfig) -> DPSettings:
    """The DP-SGD settings clients get, with the steps each plans for over the run."""
    privacy = config.privacy
    planned_rounds = privacy.planned_rounds or config.federation.rounds
    return DPSettings(
        epsilon=privacy.epsilon,
        delta=privacy.delta,
        max_grad_norm=privacy.max_grad_norm,
        accountant=privacy.accountant,
        grad_sample_mode=privacy.grad_sample_mode,
        planned_steps=planned_rounds * config.federation.local_steps,
    )


def instruct_poisoners(adversary: Adversary, messages: list[Message], clients: dict[int, int]) -> None:
    """Tell this round's malicious clients to train on flipped labels (data poisoning)."""
    for message in messages:
        if clients[message.metadata.dst_node_id] in adversary.malicious:
            config = ConfigRecord(dict(message.content[CONFIG_KEY]))  # the record is shared by all messages
            config["poison-labels"] = True
            message.content[CONFIG_KEY] = config


def poison_replies(adversary: Adversary, replies: list[Message], strategy: LoraStrategy, server_round: int) -> None:
    """Let the adversary rewrite its clients' updates, knowing every well-formed reply of the round."""
    states: dict[int, tuple[Message, LoraState]] = {}
    for reply in replies:
        client = strategy.clients.get(reply.metadata.src_node_id)
        if reply.has_error() or client is None or ARRAYS_KEY not in reply.content.array_records:
            continue
        state = LoraState.from_array_record(reply.content[ARRAYS_KEY])
        if check_against(state, strategy.global_state, strategy.trains, strategy.train_head) is None:
            states[client] = (reply, state)
    deltas = {client: state.minus(strategy.global_state) for client, (_, state) in states.items()}
    rewritten = adversary.rewrite({client: delta.flatten() for client, delta in deltas.items()}, server_round)
    for client, update in rewritten.items():
        reply, _ = states[client]
        poisoned = strategy.global_state.plus(deltas[client].unflatten(update))
        reply.content[ARRAYS_KEY] = poisoned.to_array_record()


def detection_record(adversary: Adversary, seen: list[int], flagged: list[int]) -> dict[str, object]:
    """Who among the round's valid replies was malicious, and how well the defence flagged them."""
    malicious = sorted(set(seen) & adversary.malicious)
    honest = sorted(set(seen) - adversary.malicious)
    caught = set(flagged) & adversary.malicious
    return {
        "malicious": malicious,
        "flagged": sorted(flagged),
        "tpr": len(caught) / len(malicious) if malicious else None,
        "fpr": len(set(flagged) - adversary.malicious) / len(honest) if honest else None,
    }


class PrivacyBoard:
    """The latest privacy figures each client reported (its epsilon is cumulative)."""

    FIELDS = ("epsilon", "delta", "noise-multiplier", "sample-rate", "dp-steps")

    def __init__(self) -> None:
        self.clients: dict[int, dict[str, float]] = {}

    def update(self, client_metrics: dict[int, dict[str, float]]) -> None:
        """Take this round's reports."""
        for client, metrics in client_metrics.items():
            if "epsilon" in metrics:
                self.clients[client] = {k: metrics[k] for k in self.FIELDS if k in metrics}

    def epsilon_max_mean(self) -> tuple[float | None, float | None]:
        """Max and mean cumulative epsilon over the clients that have reported one."""
        values = [c["epsilon"] for c in self.clients.values()]
        if not values:
            return None, None
        return max(values), sum(values) / len(values)

    def summary(self) -> dict[str, dict[str, float]]:
        """Per client: noise multiplier, sample rate, steps, epsilon, delta."""
        return {str(client): dict(figures) for client, figures in sorted(self.clients.items())}


def run_federation(
    grid: Grid, config: ExperimentConfig, run_dir: Path, on_round: RoundCallback | None = None
) -> dict[str, Any]:
    """Run every round of the experiment on the grid; returns the summary."""
    started = time.perf_counter()
    task = workspace.federated_task(config)
    test = workspace.test_examples(config)
    model = workspace.lora_model(config, task.num_labels)
    clients = discover_clients(grid, config.federation.num_clients)
    strategy = build_strategy(config, clients)
    attack = config.attack
    adversary = Adversary(attack.name, attack.options, config.federation.num_clients, attack.fraction, config.seed)
    recorder = RunRecorder(run_dir, config)
    state = strategy.initial_state(workspace.initial_state(config, task.num_labels))
    strategy.summary()

    def evaluate_state(current: LoraState) -> tuple[float, float]:
        current.load_into(model)
        return evaluate(model, test)

    accuracy, loss = evaluate_state(state)
    _emit(recorder, RoundRecord(round=0, accuracy=accuracy, loss=loss), on_round)
    arrays = state.to_array_record()
    base_config = train_config(config, task.num_labels)
    privacy = PrivacyBoard()
    for server_round in range(1, config.federation.rounds + 1):
        round_started = time.perf_counter()
        messages = list(strategy.configure_train(server_round, arrays, base_config, grid))
        if adversary.poisons_data:
            instruct_poisoners(adversary, messages, clients)
        replies = list(grid.send_and_receive(messages, timeout=config.federation.round_timeout))
        if adversary.malicious:
            poison_replies(adversary, replies, strategy, server_round)
        new_arrays, metrics = strategy.aggregate_train(server_round, replies)
        if new_arrays is not None:
            arrays = new_arrays
            state = LoraState.from_array_record(arrays)
        eval_started = time.perf_counter()
        accuracy, loss = evaluate_state(state)
        log_ = strategy.last_round  # what the strategy saw this round
        privacy.update(log_.client_metrics)
        epsilon_max, epsilon_mean = privacy.epsilon_max_mean()
        extra = dict(log_.extra, dropped=log_.dropped) if log_.dropped else dict(log_.extra)
        if adversary.malicious:
            extra.update(detection_record(adversary, log_.accepted + log_.dropped, log_.dropped))
        record = RoundRecord(
            round=server_round,
            accuracy=accuracy,
            loss=loss,
            bytes_up=log_.bytes_up,
            bytes_up_factors=log_.bytes_up_factors,
            bytes_down=log_.bytes_down,
            seconds=time.perf_counter() - round_started,
            server_seconds=log_.aggregate_seconds + (time.perf_counter() - eval_started),
            client_seconds=log_.client_seconds,
            train_loss=None if metrics is None else float(metrics["train-loss"]),
            epsilon_max=epsilon_max,
            epsilon_mean=epsilon_mean,
            clients=log_.accepted,
            rejected=log_.rejected,
            refused=log_.refused,
            skipped=log_.skipped,
            extra=extra,
        )
        _emit(recorder, record, on_round)
    state.load_into(model)
    export_adapter(model, recorder.adapter_dir)
    return recorder.finish(
        time.perf_counter() - started,
        {
            "strategy": config.strategy.name,
            "num_clients": len(clients),
            "run_dir": str(run_dir),
            "privacy": privacy.summary() if config.privacy.enabled else None,
            "malicious": sorted(adversary.malicious),
        },
    )


def _emit(recorder: RunRecorder, record: RoundRecord, on_round: RoundCallback | None) -> None:
    recorder.record(record)
    log(INFO, "round %d: accuracy %.4f, loss %.4f", record.round, record.accuracy, record.loss)
    if on_round is not None:
        on_round(record)


def build_server_app(
    config: ExperimentConfig, run_dir: Path, on_round: RoundCallback | None = None, errors: list[BaseException] | None = None
) -> ServerApp:
    """A ServerApp bound to one experiment (simulation); exceptions are kept in `errors`."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            run_federation(grid, config, run_dir, on_round)
        except BaseException as err:  # the simulation engine swallows them: hand them back
            if errors is None:
                raise
            errors.append(err)

    return app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Deployment entry point (`flwr run`): the experiment comes from the run config."""
    config = experiment_from_run_config(dict(context.run_config), APP_DIR)
    run_dir = Path(str(context.run_config.get("run-dir", config.output.dir))) / (
        config.output.name or f"{config.strategy.name}-run{context.run_id}"
    )
    run_federation(grid, config, run_dir)
