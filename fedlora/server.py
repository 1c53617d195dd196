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
from fedlora.results import Checkpoint, RoundRecord, RunRecorder, load_checkpoint, save_checkpoint
from strategies import build_strategy
from strategies.base import ARRAYS_KEY, CONFIG_KEY, LEDGER_KEY, LoraStrategy, check_against

RoundCallback = Callable[[RoundRecord], None]
APP_DIR = Path(__file__).resolve().parent.parent
CONNECT_TIMEOUT = 600.0


class FederationError(RuntimeError):
    """The federation cannot go on (no clients connected, a handshake failed)."""


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


def attach_ledgers(messages: list[Message], ledgers: dict[int, dict[str, Any]], clients: dict[int, int]) -> None:
    """Give each client the privacy ledger it last reported: a client that lost its own (a
    resumed run, a restarted node) continues its accounting from it instead of from zero."""
    for message in messages:
        ledger = ledgers.get(clients[message.metadata.dst_node_id])
        if ledger is not None:
            message.content[LEDGER_KEY] = ConfigRecord(ledger)


def collect_ledgers(replies: list[Message], clients: dict[int, int]) -> dict[int, dict[str, Any]]:
    """The privacy ledgers the replies carry, by client id."""
    return {
        clients[reply.metadata.src_node_id]: dict(reply.content[LEDGER_KEY])
        for reply in replies
        if not reply.has_error() and reply.metadata.src_node_id in clients and LEDGER_KEY in reply.content.config_records
    }


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


def detection_record(adversary: Adversary, seen: list[int], flagged: list[int] | None) -> dict[str, object]:
    """Who among the round's valid replies was malicious, and how well the defence flagged them.

    `flagged` is None when no defence flags clients (none, median, trimmed mean): the rates are
    then None rather than a misleading 0.
    """
    record: dict[str, object] = {"malicious": sorted(set(seen) & adversary.malicious)}
    if flagged is None:
        return record
    malicious = set(seen) & adversary.malicious
    honest = set(seen) - adversary.malicious
    return record | {
        "flagged": sorted(flagged),
        "tpr": len(set(flagged) & malicious) / len(malicious) if malicious else None,
        "fpr": len(set(flagged) & honest) / len(honest) if honest else None,
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
    grid: Grid, config: ExperimentConfig, run_dir: Path, on_round: RoundCallback | None = None, resume: bool = False
) -> dict[str, Any]:
    """Run every round of the experiment on the grid (after the checkpoint's, with `resume`); returns the summary."""
    return Federation(grid, config, Path(run_dir), on_round, resume).run()


class Federation:
    """One run of the round loop: the strategy, the records, and what a checkpoint keeps."""

    def __init__(self, grid: Grid, config: ExperimentConfig, run_dir: Path, on_round: RoundCallback | None, resume: bool) -> None:
        self.started = time.perf_counter()
        self.grid, self.config, self.run_dir, self.on_round = grid, config, run_dir, on_round
        task = workspace.federated_task(config)
        self.test = workspace.test_examples(config)
        self.model = workspace.lora_model(config, task.num_labels)
        self.clients = discover_clients(grid, config.federation.num_clients)
        self.strategy = build_strategy(config, self.clients)
        attack = config.attack
        self.adversary = Adversary(attack.name, attack.options, config.federation.num_clients, attack.fraction, config.seed)
        self.base_config = train_config(config, task.num_labels)
        self.privacy = PrivacyBoard()
        self.ledgers: dict[int, dict[str, Any]] = {}  # client id -> its privacy ledger, as last reported
        checkpoint = load_checkpoint(run_dir) if resume else None
        self.recorder = RunRecorder(run_dir, config, resume_after=checkpoint.round if checkpoint else None)
        if checkpoint is None:
            self.first_round, self.elapsed_before = 1, 0.0
            self.state = self.strategy.initial_state(workspace.initial_state(config, task.num_labels))
        else:
            self.first_round, self.elapsed_before = checkpoint.round + 1, checkpoint.elapsed
            self.state = LoraState.from_tensors(checkpoint.tensors)
            self.ledgers, self.privacy.clients = checkpoint.ledgers, checkpoint.privacy
            log(INFO, "resuming %s after round %d", run_dir, checkpoint.round)

    def run(self) -> dict[str, Any]:
        """Rounds first_round..rounds, then the adapter and the summary."""
        self.strategy.summary()
        if self.first_round == 1:
            accuracy, loss = self.evaluate()
            self.emit(RoundRecord(round=0, accuracy=accuracy, loss=loss))
        for server_round in range(self.first_round, self.config.federation.rounds + 1):
            self.emit(self.train_round(server_round))
            self.save_checkpoint(server_round)
        self.state.load_into(self.model)
        export_adapter(self.model, self.recorder.adapter_dir)
        return self.recorder.finish(
            self.elapsed(),
            {
                "strategy": self.config.strategy.name,
                "num_clients": len(self.clients),
                "run_dir": str(self.run_dir),
                "privacy": self.privacy.summary() if self.config.privacy.enabled else None,
                "malicious": sorted(self.adversary.malicious),
            },
        )

    def train_round(self, server_round: int) -> RoundRecord:
        """Send, (simulate the adversary,) aggregate, evaluate: the round's history line."""
        round_started = time.perf_counter()
        strategy, adversary = self.strategy, self.adversary
        messages = list(strategy.configure_train(server_round, self.state.to_array_record(), self.base_config, self.grid))
        attach_ledgers(messages, self.ledgers, self.clients)
        if adversary.poisons_data:
            instruct_poisoners(adversary, messages, self.clients)
        replies = list(self.grid.send_and_receive(messages, timeout=self.config.federation.round_timeout))
        self.ledgers.update(collect_ledgers(replies, self.clients))
        if adversary.malicious:
            poison_replies(adversary, replies, strategy, server_round)
        new_arrays, metrics = strategy.aggregate_train(server_round, replies)
        if new_arrays is not None:
            self.state = LoraState.from_array_record(new_arrays)
        eval_started = time.perf_counter()
        accuracy, loss = self.evaluate()
        log_ = strategy.last_round  # what the strategy saw this round
        self.privacy.update(log_.client_metrics)
        epsilon_max, epsilon_mean = self.privacy.epsilon_max_mean()
        extra = dict(log_.extra, dropped=log_.dropped) if log_.dropped else dict(log_.extra)
        if adversary.malicious:
            flags = strategy.defence is not None and strategy.defence.drops_clients
            extra.update(detection_record(adversary, log_.accepted + log_.dropped, log_.dropped if flags else None))
        return RoundRecord(
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

    def evaluate(self) -> tuple[float, float]:
        """Accuracy and loss of the global state on the held-out split."""
        self.state.load_into(self.model)
        return evaluate(self.model, self.test)

    def emit(self, record: RoundRecord) -> None:
        """Append the round to the history, log it, hand it to the progress display."""
        self.recorder.record(record)
        log(INFO, "round %d: accuracy %.4f, loss %.4f", record.round, record.accuracy, record.loss)
        if self.on_round is not None:
            self.on_round(record)

    def save_checkpoint(self, server_round: int) -> None:
        """What a resumed run needs, after the round's history line is on disk."""
        save_checkpoint(
            self.run_dir,
            Checkpoint(server_round, self.state.tensors(), dict(self.ledgers), dict(self.privacy.clients), self.elapsed()),
        )

    def elapsed(self) -> float:
        """Seconds of this run, over every process that worked on it."""
        return self.elapsed_before + time.perf_counter() - self.started


def build_server_app(
    config: ExperimentConfig,
    run_dir: Path,
    on_round: RoundCallback | None = None,
    errors: list[BaseException] | None = None,
    resume: bool = False,
) -> ServerApp:
    """A ServerApp bound to one experiment (simulation); exceptions are kept in `errors`."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            run_federation(grid, config, run_dir, on_round, resume)
        except BaseException as err:  # the simulation engine swallows them: hand them back
            if errors is None:
                raise
            errors.append(err)

    return app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Deployment entry point (`flwr run`): the experiment comes from the run config.

    With output.name set, the run directory is stable across runs, and `resume=true` in the run
    config continues it from its last checkpoint (e.g. after the server machine restarted).
    """
    config = experiment_from_run_config(dict(context.run_config), APP_DIR)
    run_dir = Path(str(context.run_config.get("run-dir", config.output.dir))) / (
        config.output.name or f"{config.strategy.name}-run{context.run_id}"
    )
    run_federation(grid, config, run_dir, resume=bool(context.run_config.get("resume", False)))
