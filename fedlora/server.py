"""The round loop of the Flower ServerApp: builds the strategy, runs the rounds, evaluates, records.

`fedlora simulate` binds it to one experiment (`build_server_app`); `flwr run` starts the app
of fedlora/server_app.py, which reads the experiment from the run config.

Round loop (one ServerApp for simulation and deployment):
  handshake (query: which client is each node) -> round 0 evaluation ->
  for each round: strategy.configure_train -> grid.send_and_receive -> [simulated adversary:
  the malicious clients' replies rewritten] -> strategy.aggregate_train (validation, defence,
  aggregation) -> evaluate the global state on the held-out split -> one line of history.jsonl
  -> at the end: the adapter in peft's format and summary.json.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from fedlora import workspace
from fedlora.accounting import PrivacyAccounts
from fedlora.attacks import Adversary
from fedlora.checkpoint import Checkpoint, load_resumable, save_checkpoint
from fedlora.client_eval import ClientEvaluation, evaluation_summary, label_mix
from fedlora.config import ConfigError, ExperimentConfig, FederationConfig
from fedlora.export import RunFigures
from fedlora.interrupt import RunInterrupted
from fedlora.lora import LoraState
from fedlora.metadata import data_fingerprint, record_start
from fedlora.results import RoundRecord, RunRecorder
from fedlora.roster import Roster, client_id_problem, declared_count_problem
from fedlora.rundir import RunLock, claim_run_dir
from fedlora.task import Scores, evaluate, export
from fedlora.threads import use_threads
from fedlora.trackers import Trackers
from fedlora.user_privacy import UserLevelPrivacy
from strategies import build_strategy
from strategies.base import ARRAYS_KEY, CONFIG_KEY, INFO_KEY, LEDGER_KEY, METRICS_KEY, LoraStrategy, check_against

RoundCallback = Callable[[RoundRecord], None]
CONNECT_TIMEOUT = 600.0  # seconds a deployment waits for its SuperNodes
WAIT_LOG_SECONDS = 10.0
# How long a simulation's node count must hold before a mismatch is final (the engine registers
# its nodes in one quick loop, while the ServerApp thread may already be asking).
SIMULATION_SETTLE_SECONDS = 1.0


class FederationError(RuntimeError):
    """The federation cannot go on (too few or too many nodes, a handshake failed)."""


def check_restorable(strategy: LoraStrategy, checkpoint: Checkpoint | None, run_dir: Path) -> None:
    """A resume after round 0 is refused for a strategy whose clients keep factors of their own
    (FedSA-LoRA's B): no checkpoint holds them, so the run could not go on as it was."""
    if checkpoint is not None and checkpoint.round > 0 and strategy.keeps:
        raise ConfigError(
            f"{run_dir}: {strategy.name} clients keep their own {strategy.keeps} between rounds, which a resume "
            "cannot restore (they would restart from the initial one); start a new run"
        )


def wait_for_nodes(grid: Grid, federation: FederationConfig, timeout: float = CONNECT_TIMEOUT) -> list[int]:
    """The connected nodes, once `federation.num_clients` are there, saying every WAIT_LOG_SECONDS how many are.

    A simulation engine (`flwr run . local`, `fedlora simulate`) registers all its SuperNodes at
    once, before any message: there a count other than `expected` can never change, and is one
    FederationError at once instead of a wait. In a deployment SuperNodes connect when they are
    started, so the server waits up to `timeout`.
    """
    simulated, expected = isinstance(grid, InMemoryGrid), federation.num_clients
    started = next_log = time.monotonic()
    first_seen: float | None = None
    while True:
        node_ids = sorted(grid.get_node_ids())
        now = time.monotonic()
        if simulated and node_ids:
            if len(node_ids) == expected:
                return node_ids
            first_seen = now if first_seen is None else first_seen
            if now - first_seen >= SIMULATION_SETTLE_SECONDS:
                raise FederationError(node_count_mismatch(len(node_ids), federation))
        elif not simulated and len(node_ids) >= expected:
            return node_ids
        if now - started > timeout:
            raise FederationError(
                f"only {len(node_ids)} of {expected} SuperNodes connected within {timeout:.0f} s "
                f"(federation.num_clients = {expected}); start one SuperNode per client, each with its own client id"
            )
        if now >= next_log and not simulated:
            log(
                INFO,
                "waiting for SuperNodes: %d of %d connected (%.0f s left)",
                len(node_ids),
                expected,
                timeout - (now - started),
            )
            next_log = now + WAIT_LOG_SECONDS
        time.sleep(0.1 if simulated else 1.0)


def node_count_mismatch(nodes: int, federation: FederationConfig) -> str:
    """The one line that says a simulated federation's size and the experiment's differ, and both fixes."""
    expected = federation.num_clients
    resize = f'flwr run . local --federation-config "num-supernodes={expected}"'
    fits = [f"federation.num_clients={nodes}"]
    if federation.clients_per_round > nodes:
        fits.append(f"federation.clients_per_round={nodes}")
    if federation.min_replies > nodes:
        fits.append(f"federation.min_replies={nodes}")
    overrides = ";".join(fits)
    return (
        f"the simulated federation has {nodes} SuperNodes but the experiment has federation.num_clients = {expected}: "
        f"run {resize}, or fit the experiment to the federation with --run-config \"overrides='{overrides}'\""
    )


def discover_clients(grid: Grid, node_ids: list[int], federation: FederationConfig, timeout: float = CONNECT_TIMEOUT) -> Roster:
    """Who each connected node is and how many examples it declares, asked with a query message.

    A node whose handshake is unusable is left out of the federation with its reason (logged,
    and kept in the roster for summary.json's excluded_nodes): an error or no reply, no `info` or
    `metrics` record, a client id that is not one of the federation's (a whole number
    0..num_clients-1), an example count that is not a positive whole number up to 2^53. Nodes that claim one
    client id are all left out: the server cannot tell which of them is that client, and keeping
    the first would hand the id to whichever answers first. The federation goes on with the
    others; fewer than federation.clients_per_round of them end the run in one line.
    """
    queries = [Message(RecordDict(), dst_node_id=node, message_type=MessageType.QUERY) for node in node_ids]
    declared: dict[int, tuple[int, int]] = {}  # node id -> (client id, examples)
    excluded: dict[int, str] = {}
    for reply in grid.send_and_receive(queries, timeout=timeout):
        handshake = read_handshake(reply, federation.num_clients)
        if isinstance(handshake, str):
            excluded[reply.metadata.src_node_id] = handshake
        else:
            declared[reply.metadata.src_node_id] = handshake
    for node in node_ids:
        if node not in declared and node not in excluded:
            excluded[node] = f"no handshake reply within {timeout:.0f} s"
    excluded.update(shared_client_ids(declared))
    for node, reason in excluded.items():
        declared.pop(node, None)
        log(WARNING, "node %d left out of the federation: %s", node, reason)
    if len(declared) < federation.clients_per_round:
        reasons = "; ".join(f"node {node}: {reason}" for node, reason in excluded.items())
        raise FederationError(
            f"only {len(declared)} of {len(node_ids)} nodes passed the handshake, fewer than federation.clients_per_round "
            f"= {federation.clients_per_round}; fix those nodes or lower federation.clients_per_round ({reasons})"
        )
    return Roster({node: client for node, (client, _) in declared.items()}, dict(declared.values()), excluded)


def read_handshake(reply: Message, num_clients: int) -> tuple[int, int] | str:
    """(client id, declared example count) from a node's handshake reply, or why it is unusable."""
    if reply.has_error():
        return f"its handshake failed: {reply.error.reason}"
    records = {key: reply.content.get(key) for key in (INFO_KEY, METRICS_KEY)}
    for key, record in records.items():
        if not isinstance(record, (ConfigRecord, MetricRecord)):
            return f"its reply has no {key!r} record"
    client, count = records[INFO_KEY].get("client-id"), records[METRICS_KEY].get("num-examples")
    problem = client_id_problem(client, num_clients) or declared_count_problem(count)
    return problem if problem else (int(client), int(count))


def shared_client_ids(declared: dict[int, tuple[int, int]]) -> dict[int, str]:
    """Why each node claiming a client id another node claims too is left out (all of them are)."""
    claims: dict[int, list[int]] = {}
    for node, (client, _) in declared.items():
        claims.setdefault(client, []).append(node)
    return {
        node: f"client-id {client} is claimed by nodes {', '.join(map(str, nodes))}; give each SuperNode its own client-id"
        for client, nodes in claims.items()
        if len(nodes) > 1
        for node in nodes
    }


def train_config(config: ExperimentConfig, num_labels: int) -> ConfigRecord:
    """What every train message tells clients, beside what the strategy (and DP) add."""
    federation = config.federation
    return ConfigRecord(
        {
            "local-steps": federation.local_steps,
            "lr": federation.lr,
            "batch-size": federation.batch_size,
            "optimizer": federation.optimizer,
            "momentum": federation.momentum,
            "weight-decay": federation.weight_decay,
            "lr-schedule": federation.lr_schedule,
            "warmup-steps": federation.warmup_steps,
            "schedule-steps": federation.training_steps,
            "grad-accumulation": federation.grad_accumulation,
            "num-labels": num_labels,
        }
    )


def with_config(message: Message, entries: dict[str, Any]) -> None:
    """Add entries to one message's train config (the record is shared by every message of a round)."""
    config = ConfigRecord(dict(message.content[CONFIG_KEY]))
    config.update(entries)
    message.content[CONFIG_KEY] = config


def instruct_privacy(accounts: PrivacyAccounts, messages: list[Message], clients: dict[int, int]) -> None:
    """Give each sampled client its DP instruction and the server's copy of its ledger."""
    for message in messages:
        client = clients[message.metadata.dst_node_id]
        with_config(message, dict(accounts.instruct(client)))
        message.content[LEDGER_KEY] = accounts.ledger_record(client)


def instruct_poisoners(adversary: Adversary, messages: list[Message], clients: dict[int, int]) -> None:
    """Tell this round's malicious clients to train on flipped labels (data poisoning)."""
    for message in messages:
        if clients[message.metadata.dst_node_id] in adversary.malicious:
            with_config(message, {"poison-labels": True})


def poison_replies(adversary: Adversary, replies: list[Message], strategy: LoraStrategy, server_round: int) -> None:
    """Let the adversary rewrite its clients' updates, knowing every well-formed reply of the round
    and the round's defence and weights (which the adaptive attack simulates)."""
    states: dict[int, tuple[Message, LoraState]] = {}
    for reply in replies:
        client = strategy.clients.get(reply.metadata.src_node_id)
        if reply.has_error() or client is None or ARRAYS_KEY not in reply.content.array_records:
            continue
        state = strategy.unpack_reply(client, LoraState.from_array_record(reply.content[ARRAYS_KEY]))
        if (
            not isinstance(state, str)
            and check_against(state, strategy.global_state, strategy.uploads, strategy.train_head) is None
        ):
            states[client] = (reply, state)
    deltas = {client: state.minus(strategy.global_state) for client, (_, state) in states.items()}
    weights = {client: strategy.weights[client] for client in states}  # the server's, as the defence will see them
    flat = {client: delta.flatten() for client, delta in deltas.items()}
    rewritten = adversary.rewrite(flat, server_round, defence=strategy.defence, weights=weights)
    for client, update in rewritten.items():
        reply, _ = states[client]
        poisoned = strategy.global_state.plus(deltas[client].unflatten(update))
        reply.content[ARRAYS_KEY] = strategy.pack_reply(poisoned).to_array_record()


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


def run_federation(
    grid: Grid,
    config: ExperimentConfig,
    run_dir: Path,
    on_round: RoundCallback | None = None,
    resume: bool = False,
    overwrite: bool = False,
    stop: threading.Event | None = None,
) -> dict[str, Any]:
    """Run every round of the experiment on the grid (after the checkpoint's, with `resume`); returns the summary.

    Holds the run directory's lock throughout; a new run refuses a directory holding another
    unless `overwrite`. Once `stop` is set, the run stops after the round in progress
    (RunInterrupted), its checkpoint and history consistent.
    """
    use_threads(config.federation.server_cpus)  # beside its own clients: its share of the cores
    with RunLock(run_dir):
        if not resume:
            claim_run_dir(run_dir, overwrite)
        return Federation(grid, config, Path(run_dir), on_round, resume, stop).run()


class Federation:
    """One run of the round loop: the strategy, the records, and what a checkpoint keeps."""

    def __init__(
        self,
        grid: Grid,
        config: ExperimentConfig,
        run_dir: Path,
        on_round: RoundCallback | None,
        resume: bool,
        stop: threading.Event | None = None,
    ) -> None:
        self.started = time.perf_counter()
        self.grid, self.config, self.run_dir, self.on_round, self.stop = grid, config, run_dir, on_round, stop
        node_ids = wait_for_nodes(grid, config.federation)  # first: a federation that cannot serve the run says so at once
        task = workspace.federated_task(config)
        self.class_names = task.class_names
        initial = workspace.initial_state(config, task.num_labels)
        # Everything a resume needs is checked before anything in the run directory is touched.
        checkpoint = load_resumable(run_dir, config, initial) if resume else None
        self.test = workspace.test_examples(config)
        self.model = workspace.server_model(config, task.num_labels)
        self.roster = discover_clients(grid, node_ids, config.federation)
        self.clients = self.roster.clients
        self.client_evaluation = ClientEvaluation(config, self.clients, self.roster.examples)
        # In simulation every client holds its partition of the task; a deployed node may hold its own data.
        self.label_mix = label_mix(task.partitions, task.class_names) if isinstance(grid, InMemoryGrid) else None
        self.last_scores: Scores | None = None  # the server's last held-out evaluation
        self.strategy = build_strategy(config, self.roster)
        check_restorable(self.strategy, checkpoint, run_dir)
        attack = config.attack
        self.adversary = Adversary(attack.name, attack.options, config.federation.num_clients, attack.fraction, config.seed)
        self.base_config = train_config(config, task.num_labels)
        self.stopped: str | None = None  # why the run ended before its last round
        self.trackers = Trackers(config.output.trackers)  # a missing package is refused before anything is written
        self.recorder = RunRecorder(run_dir, config, resume_after=checkpoint.round if checkpoint else None)
        record_start(run_dir, data_fingerprint(task), resume=checkpoint is not None)
        self.trackers.start(config, run_dir, resume=checkpoint is not None)
        self.accounts: PrivacyAccounts | None = None  # example level: every client's ledger
        self.user_privacy: UserLevelPrivacy | None = None  # user level: the server's mechanism and ledger
        if checkpoint is None:
            self.first_round, self.elapsed_before = 1, 0.0
            self.state = self.strategy.initial_state(initial)
            if config.privacy.example_level:
                self.accounts = PrivacyAccounts.for_run(config, self.roster.examples)
            elif config.privacy.user_level:
                self.user_privacy = UserLevelPrivacy.for_run(config, len(self.clients))
        else:
            self.first_round, self.elapsed_before = checkpoint.round + 1, checkpoint.elapsed
            self.state = LoraState.from_tensors(checkpoint.tensors)
            if config.privacy.example_level and checkpoint.privacy:
                self.accounts = PrivacyAccounts.from_state(config, checkpoint.privacy)
            elif config.privacy.user_level and checkpoint.privacy:
                self.user_privacy = UserLevelPrivacy.from_state(config, checkpoint.privacy)
            self.strategy.retired.update(checkpoint.retired)
            log(INFO, "resuming %s after round %d", run_dir, checkpoint.round)
        self.resumed = checkpoint is not None
        self.newly_retired: dict[int, str] = {}  # since the last round was sampled: the next round's record lists them
        if self.accounts is not None:
            self.strategy.reply_checks.append(self.accounts.check_reply)
            if checkpoint is not None and checkpoint.in_flight:
                # The round the server was killed in may have been trained and released: it counts.
                self.accounts.charge(checkpoint.in_flight, [], self.clients)
                log(INFO, "charged clients %s for round %d, which was interrupted", checkpoint.in_flight, self.first_round)
        if self.user_privacy is not None:
            self.strategy.user_privacy = self.user_privacy
            if checkpoint is not None and checkpoint.in_flight:
                self.user_privacy.charge()  # its clients may have trained and sent their (noised) updates
                log(INFO, "charged the user-level ledger for round %d, which was interrupted", self.first_round)

    def run(self) -> dict[str, Any]:
        """Rounds first_round..rounds (fewer once every budget is spent), then the adapter and the summary."""
        self.strategy.summary()
        if not self.resumed:
            scores = self.evaluate()
            self.emit(RoundRecord(round=0, accuracy=scores.accuracy, loss=scores.loss, perplexity=scores.perplexity))
        for server_round in range(self.first_round, self.config.federation.rounds + 1):
            if self.stop is not None and self.stop.is_set():
                raise RunInterrupted(self.run_dir, server_round - 1, self.config.federation.rounds)
            if not self.can_continue(server_round):
                break
            self.emit(self.train_round(server_round))
            self.save_round_adapter(server_round)
            self.save_checkpoint(server_round)
        self.write_adapter(self.recorder.adapter_dir)
        summary = self.recorder.finish(
            self.elapsed(),
            {
                "strategy": self.config.strategy.name,
                "num_clients": len(self.clients),
                "run_dir": str(self.run_dir.resolve()),
                "weights": {str(c): w for c, w in sorted(self.strategy.weights.items())},
                "excluded_nodes": {str(n): reason for n, reason in self.roster.excluded.items()},
                "privacy": self.accounts.summary() if self.accounts else None,
                "user_privacy": self.user_privacy.summary() if self.user_privacy else None,
                "retired": {str(c): reason for c, reason in sorted(self.strategy.retired.items())},
                "stopped_early": self.stopped,
                "malicious": sorted(self.adversary.malicious),
                **evaluation_summary(
                    [(record.round, record.extra) for record in self.recorder.rounds],
                    (self.last_scores or self.evaluate()).confusion,
                    self.class_names,
                    self.label_mix,
                ),
            },
        )
        self.trackers.finish(summary)
        return summary

    def write_adapter(self, folder: Path) -> None:
        """The global state as the adapter folder of the task (fedlora/export.py), its card at the last recorded round.
        A trained core (Fed-SB, RAVAN) goes out multiplied into B: peft knows plain LoRA factors only."""
        self.state.folded().load_into(self.model)
        export(self.config, self.model, folder, workspace.tokenizer(self.config), self.class_names, self.figures())

    def save_round_adapter(self, server_round: int) -> None:
        """Every output.adapter_every rounds, the adapter as it stands. Written before the round's checkpoint: a resume
        redoes (and rewrites) a round whose folder may be there, never skips one whose folder is missing."""
        every = self.config.output.adapter_every
        if every and server_round % every == 0:
            self.write_adapter(self.recorder.round_adapter_dir(server_round))

    def figures(self) -> RunFigures:
        """The run as the adapter's model card summarizes it."""
        last = self.recorder.rounds[-1]
        return RunFigures(
            run_name=self.run_dir.name,
            rounds=last.round,
            clients=len(self.clients),
            final_accuracy=last.accuracy,
            test_examples=len(self.test),
            epsilon=self.epsilon_max_mean()[0],
        )

    def epsilon_max_mean(self) -> tuple[float | None, float | None]:
        """The privacy spent so far: the clients' max and mean (example level), the server's release twice (user level)."""
        if self.accounts is not None:
            return self.accounts.epsilon_max_mean()
        if self.user_privacy is not None:
            return self.user_privacy.epsilon(), self.user_privacy.epsilon()
        return None, None

    def can_continue(self, server_round: int) -> bool:
        """Retire clients whose budget is spent; False (and why) once too few are left to train."""
        if self.accounts is not None:
            self.retire(self.accounts.spent())
        if self.user_privacy is not None and not self.user_privacy.can_afford_round():
            self.stopped = (
                f"user-level privacy budget spent: another round would take epsilon to {self.user_privacy.epsilon(1):.3f}"
            )
            log(WARNING, "stopping before round %d: %s", server_round, self.stopped)
            return False
        eligible = len(self.strategy.eligible_clients())
        if eligible >= max(1, self.config.federation.min_replies):
            return True
        self.stopped = f"{eligible} clients left with privacy budget, fewer than federation.min_replies"
        log(WARNING, "stopping before round %d: %s", server_round, self.stopped)
        return False

    def retire(self, reasons: dict[int, str]) -> None:
        """Stop sampling these clients (one retired already keeps its reason); the record of the next
        round, the first they are not sampled for, lists them."""
        new = {client: why for client, why in reasons.items() if client not in self.strategy.retired}
        for client, why in sorted(new.items()):
            log(INFO, "client %d retired: %s", client, why)
        self.strategy.retired.update(new)
        self.newly_retired.update(new)

    def train_round(self, server_round: int) -> RoundRecord:
        """Send, (simulate the adversary,) aggregate, evaluate: the round's history line."""
        round_started = time.perf_counter()
        retired, self.newly_retired = self.newly_retired, {}  # no longer sampled from this round on
        strategy, adversary = self.strategy, self.adversary
        messages = list(strategy.configure_train(server_round, self.state.to_array_record(), self.base_config, self.grid))
        if self.accounts is not None:
            instruct_privacy(self.accounts, messages, self.clients)
        if self.accounts is not None or self.user_privacy is not None:
            self.save_checkpoint(server_round - 1, in_flight=strategy.last_round.sampled)  # write-ahead
        if adversary.poisons_data:
            instruct_poisoners(adversary, messages, self.clients)
        replies = list(self.grid.send_and_receive(messages, timeout=self.config.federation.round_timeout))
        if self.accounts is not None:
            self.accounts.charge(strategy.last_round.sampled, replies, self.clients)
        if self.user_privacy is not None:
            self.user_privacy.charge()  # every round releases a noised step, even one nobody was sampled for
        if adversary.malicious:
            poison_replies(adversary, replies, strategy, server_round)
        new_arrays, metrics = strategy.aggregate_train(server_round, replies)
        if new_arrays is not None:
            self.state = LoraState.from_array_record(new_arrays)
        eval_started = time.perf_counter()
        scores = self.evaluate()
        log_ = strategy.last_round  # what the strategy saw this round
        # A client that refuses will refuse again: stop asking it.
        self.retire({int(refusal["client"]): f"refused: {refusal['reason']}" for refusal in log_.refused})
        epsilon_max, epsilon_mean = self.epsilon_max_mean()
        extra = dict(log_.extra, dropped=log_.dropped) if log_.dropped else dict(log_.extra)
        if retired:
            extra["retired"] = {str(client): why for client, why in sorted(retired.items())}
        if adversary.malicious:
            flags = strategy.defence is not None and strategy.defence.drops_clients
            extra.update(detection_record(adversary, log_.accepted + log_.dropped, log_.dropped if flags else None))
        server_seconds = log_.aggregate_seconds + (time.perf_counter() - eval_started)
        if self.client_evaluation.due(server_round):
            extra.update(
                self.client_evaluation.evaluate(self.grid, self.state, server_round, log_.sampled, self.base_config["num-labels"])
            )
        return RoundRecord(
            round=server_round,
            accuracy=scores.accuracy,
            loss=scores.loss,
            perplexity=scores.perplexity,
            bytes_up=log_.bytes_up,
            bytes_up_factors=log_.bytes_up_factors,
            bytes_down=log_.bytes_down,
            seconds=time.perf_counter() - round_started,
            server_seconds=server_seconds,
            client_seconds=log_.client_seconds,
            train_seconds=log_.train_seconds,
            train_loss=None if metrics is None else float(metrics["train-loss"]),
            epsilon_max=epsilon_max,
            epsilon_mean=epsilon_mean,
            clients=log_.accepted,
            sampled=log_.sampled,
            rejected=log_.rejected,
            refused=log_.refused,
            skipped=log_.skipped,
            extra=extra,
        )

    def evaluate(self) -> Scores:
        """Accuracy and loss (for a causal LM: exact match, loss and perplexity) of the global state on the held-out split."""
        self.state.load_into(self.model)
        self.last_scores = evaluate(self.config, self.model, self.test, workspace.tokenizer(self.config))
        return self.last_scores

    def emit(self, record: RoundRecord) -> None:
        """Append the round to the history and the trackers, log it, hand it to the progress display."""
        self.recorder.record(record)
        self.trackers.log_round(record)
        log(INFO, "round %d: accuracy %.4f, loss %.4f", record.round, record.accuracy, record.loss)
        if self.on_round is not None:
            self.on_round(record)

    def save_checkpoint(self, server_round: int, in_flight: list[int] | None = None) -> None:
        """What a resumed run needs: the state after `server_round` and, while a round is out,
        which clients it asked to train (they are charged for it if the server dies)."""
        save_checkpoint(
            self.run_dir,
            Checkpoint(
                round=server_round,
                tensors=self.state.tensors(),
                config=self.config.model_dump(mode="json"),
                privacy=self.accounts.state() if self.accounts else self.user_privacy.state() if self.user_privacy else None,
                retired=dict(self.strategy.retired),
                in_flight=list(in_flight or []),
                elapsed=self.elapsed(),
            ),
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
    overwrite: bool = False,
    stop: threading.Event | None = None,
) -> ServerApp:
    """A ServerApp bound to one experiment (simulation); exceptions are kept in `errors`."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            run_federation(grid, config, run_dir, on_round, resume, overwrite, stop)
        except BaseException as err:  # the simulation engine swallows them: hand them back
            if errors is None:
                raise
            errors.append(err)

    return app
