"""LoraStrategy: the Flower plumbing every LoRA strategy shares.

A concrete strategy declares which factors its clients train (`trains = "B"` or `"AB"`) and
writes one method, `aggregate_factors(global_state, updates, weights) -> new_state`. This base
class does the rest: seeded client sampling, the train message, validation of every reply
before any math (keys, shapes, dtypes, NaN/Inf, strategy-specific checks), weighting by
examples, averaging the classification head, counting bytes up and down, and running the
optional robust defence (strategies/robust.py) between validation and aggregation. What
happened in a round (rejections and their reasons, clients the defence dropped, bytes, client
metrics) is left in `last_round` for the server to record.
"""

from __future__ import annotations

import random
import time
from abc import abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import ClassVar

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedlora.config import ExperimentConfig, StrategyConfig
from fedlora.lora import LoraRecordError, LoraState
from fedlora.seeds import derive_seed
from strategies.robust import Defence

# Keys of the records exchanged with clients (shared with clients/app.py by convention,
# since strategies and clients never import each other).
ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
INFO_KEY = "info"
NUM_EXAMPLES = "num-examples"
REFUSED = "refused"
LEDGER_KEY = "privacy-ledger"  # a client's DP accountant history (replies, and train messages after a resume)


@dataclass
class ClientUpdate:
    """One client's validated reply: the factors it trained, as new values."""

    client_id: int
    state: LoraState
    num_examples: int
    metrics: dict[str, float]
    info: dict[str, str]


@dataclass
class RoundLog:
    """What a round did, for the history: who replied, who was refused and why, bytes."""

    sampled: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    rejected: list[dict[str, object]] = field(default_factory=list)
    refused: list[dict[str, object]] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    bytes_up: int = 0
    bytes_up_factors: int = 0
    bytes_down: int = 0
    client_seconds: float = 0.0
    aggregate_seconds: float = 0.0
    skipped: bool = False
    client_metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    extra: dict[str, object] = field(default_factory=dict)


class LoraStrategy(Strategy):
    """Base class of the LoRA strategies.

    Parameters
    ----------
    clients : dict[int, int]
        Flower node id -> client id (the partition a node holds), from the server's handshake.
    clients_per_round : int
        How many clients train each round.
    min_replies : int
        Fewer valid replies than this and the round is skipped (the global state stays).
    seed : int
        Seeds client sampling: same seed, same clients each round.
    train_head : bool
        Whether clients train the classification head (then it is averaged by examples).
    defence : Defence | None
        A robust rule screening the valid updates before aggregation (None: aggregate them all).
    """

    name: ClassVar[str]
    description: ClassVar[str]
    trains: ClassVar[str] = "AB"  # which factors clients train and send back: "AB" or "B"

    def __init__(
        self,
        clients: dict[int, int],
        clients_per_round: int,
        min_replies: int = 1,
        seed: int = 0,
        train_head: bool = True,
        defence: Defence | None = None,
    ) -> None:
        if clients_per_round > len(clients):
            raise ValueError(f"{clients_per_round} clients per round but only {len(clients)} clients connected")
        self.clients = dict(clients)
        self.clients_per_round = clients_per_round
        self.min_replies = min_replies
        self.seed = seed
        self.train_head = train_head
        self.defence = defence
        self.global_state = LoraState()
        self.last_round = RoundLog()
        self.server_round = 0
        self._sent_at = 0.0

    @classmethod
    def from_config(cls, config: ExperimentConfig, clients: dict[int, int]) -> LoraStrategy:
        """Build from an experiment config and the connected clients."""
        return cls(
            clients=clients,
            clients_per_round=config.federation.clients_per_round,
            min_replies=config.federation.min_replies,
            seed=config.seed,
            train_head=config.model.train_head,
            **cls.options(config.strategy),
        )

    @classmethod
    def options(cls, config: StrategyConfig) -> dict[str, object]:
        """The strategy's own constructor arguments from `[strategy]` (default: none)."""
        return {}

    # --- what a strategy writes -------------------------------------------------------------
    def initial_state(self, state: LoraState) -> LoraState:
        """The state of round 0, from the freshly initialized model's (default: unchanged)."""
        return state

    @abstractmethod
    def aggregate_factors(self, global_state: LoraState, updates: list[LoraState], weights: torch.Tensor) -> LoraState:
        """New global factors from the clients' trained factors (weights sum to 1)."""

    def check_update(self, update: ClientUpdate) -> str | None:
        """A strategy-specific reason to refuse a reply, or None to accept it."""
        return None

    # --- Flower Strategy ------------------------------------------------------------------
    def summary(self) -> None:
        """Log the strategy's settings."""
        log(INFO, "\t%s: %s (clients train %s)", self.name, self.description, self.trains)
        log(INFO, "\t%d of %d clients a round, min %d replies", self.clients_per_round, len(self.clients), self.min_replies)

    def sample_clients(self, server_round: int) -> list[int]:
        """Node ids of this round's clients, drawn from (seed, round) over client ids."""
        by_client = sorted(self.clients, key=self.clients.__getitem__)
        rng = random.Random(f"{self.seed}:{server_round}")
        return sorted(rng.sample(by_client, self.clients_per_round), key=self.clients.__getitem__)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """One train message per sampled client: the global state and what to train."""
        self.global_state = LoraState.from_array_record(arrays)
        self.server_round = server_round
        config = ConfigRecord(dict(config))
        config["server-round"] = server_round
        config["train-factors"] = self.trains
        config["train-head"] = self.train_head
        nodes = self.sample_clients(server_round)
        self.last_round = RoundLog(
            sampled=[self.clients[n] for n in nodes],
            bytes_down=len(nodes) * self.global_state.num_bytes(),
        )
        self._sent_at = time.perf_counter()
        return [
            Message(RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: config}), dst_node_id=node, message_type=MessageType.TRAIN)
            for node in nodes
        ]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate the replies, then aggregate the valid ones into the new global state."""
        round_log = self.last_round
        round_log.client_seconds = time.perf_counter() - self._sent_at
        replies = list(replies)
        updates = [u for u in (self._validate(m) for m in replies) if u is not None]
        answered = {self.clients.get(m.metadata.src_node_id) for m in replies}
        for client in sorted(set(round_log.sampled) - answered):  # crashed, disconnected or too slow
            round_log.rejected.append({"client": client, "reason": "no reply before the round timeout"})
        started = time.perf_counter()
        kept, robust_update = self._defend(server_round, updates)
        round_log.dropped = sorted({u.client_id for u in updates} - {u.client_id for u in kept})
        round_log.accepted = sorted(u.client_id for u in kept)
        # min_replies counts valid replies; a defence may then keep fewer (Krum keeps one), not none.
        if len(updates) < self.min_replies or not kept:
            round_log.skipped = True
            log(
                WARNING,
                "round %d skipped: %d valid replies (at least %d needed), %d kept",
                server_round,
                len(updates),
                self.min_replies,
                len(kept),
            )
            return None, None
        new_state = self._aggregate([robust_update] if robust_update else kept)
        round_log.aggregate_seconds = time.perf_counter() - started
        self.global_state = new_state
        return new_state.to_array_record(), self._train_metrics(kept)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """The server evaluates on its held-out split; no client-side evaluation round."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Example-weighted mean of client evaluation metrics (when a deployment asks for them)."""
        contents = [m.content for m in replies if not m.has_error() and METRICS_KEY in m.content]
        if not contents:
            return None
        total = sum(float(c[METRICS_KEY][NUM_EXAMPLES]) for c in contents)
        keys = set.intersection(*(set(c[METRICS_KEY]) for c in contents)) - {NUM_EXAMPLES}
        return MetricRecord(
            {k: sum(float(c[METRICS_KEY][k]) * float(c[METRICS_KEY][NUM_EXAMPLES]) for c in contents) / total for k in keys}
        )

    # --- internals ------------------------------------------------------------------------
    def _defend(self, server_round: int, updates: list[ClientUpdate]) -> tuple[list[ClientUpdate], ClientUpdate | None]:
        """The updates the defence keeps, and the update it computed itself (median, trimmed mean) if any."""
        if self.defence is None or not updates:
            return updates, None
        if len(updates) < self.defence.min_clients:  # fail closed: see strategies/robust.py
            self.last_round.extra["defence"] = {"name": self.defence.name, "too_few_replies": len(updates)}
            return [], None
        deltas = [u.state.minus(self.global_state) for u in updates]
        examples = torch.tensor([u.num_examples for u in updates], dtype=torch.float64)
        screening = self.defence.screen(
            torch.stack([d.flatten() for d in deltas]), examples / examples.sum(), derive_seed(self.seed, "defence", server_round)
        )
        self.last_round.extra["defence"] = {"name": self.defence.name, **screening.stats}
        kept = [updates[i] for i in screening.kept]
        if screening.aggregate is None or not kept:
            return kept, None
        # The robust statistic enters the strategy's own aggregation as one client's update.
        state = self.global_state.plus(deltas[0].unflatten(screening.aggregate))
        return kept, ClientUpdate(-1, state, sum(u.num_examples for u in kept), {}, {})

    def _aggregate(self, updates: list[ClientUpdate]) -> LoraState:
        weights = torch.tensor([u.num_examples for u in updates], dtype=torch.float64)
        weights = weights / weights.sum()
        new_state = self.aggregate_factors(self.global_state, [u.state for u in updates], weights)
        new_state.head = self._average_head(updates, weights)
        return new_state

    def _average_head(self, updates: list[ClientUpdate], weights: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.train_head:
            return dict(self.global_state.head)
        return {name: weighted_sum([u.state.head[name] for u in updates], weights) for name in self.global_state.head}

    def _validate(self, message: Message) -> ClientUpdate | None:
        client_id = self.clients.get(message.metadata.src_node_id, -1)
        parsed = self._parse(message, client_id)
        if isinstance(parsed, str):
            self.last_round.rejected.append({"client": client_id, "reason": parsed})
            log(WARNING, "client %d: reply refused: %s", client_id, parsed)
            return None
        return parsed

    def _parse(self, message: Message, client_id: int) -> ClientUpdate | str | None:
        """A valid update, a reason for refusing the reply, or None for a deliberate no-update."""
        if message.has_error():
            return f"client error: {message.error.reason}"
        content = message.content
        metrics_record = content.metric_records.get(METRICS_KEY)
        if metrics_record is None:
            return "reply has no metrics"
        metrics = {k: float(v) for k, v in metrics_record.items() if isinstance(v, (int, float))}
        self.last_round.client_metrics[client_id] = metrics
        if metrics.get(REFUSED, 0.0):
            self.last_round.refused.append(
                {"client": client_id, "reason": str(content.config_records.get(INFO_KEY, {}).get("refused-reason", ""))}
            )
            return None
        arrays = content.array_records.get(ARRAYS_KEY)
        if arrays is None:
            return "reply has no arrays"
        num_examples = int(metrics.get(NUM_EXAMPLES, 0))
        if num_examples <= 0:
            return f"{NUM_EXAMPLES} must be positive, got {num_examples}"
        try:
            state = LoraState.from_array_record(arrays)
        except LoraRecordError as err:
            return str(err)
        # Tensor payload bytes (as for the downlink), not counting serialization headers.
        self.last_round.bytes_up += state.num_bytes()
        problem = check_against(state, self.global_state, self.trains, self.train_head)
        if problem:
            return problem
        self.last_round.bytes_up_factors += state.factor_bytes()
        info = {k: str(v) for k, v in content.config_records.get(INFO_KEY, ConfigRecord()).items()}
        update = ClientUpdate(client_id, state, num_examples, metrics, info)
        return self.check_update(update) or update

    def _train_metrics(self, updates: list[ClientUpdate]) -> MetricRecord:
        total = sum(u.num_examples for u in updates)
        loss = sum(u.metrics.get("train-loss", 0.0) * u.num_examples for u in updates) / total
        return MetricRecord({"train-loss": loss, "num-replies": len(updates)})


def check_against(state: LoraState, reference: LoraState, trains: str, train_head: bool) -> str | None:
    """Why a client's state does not match what it was asked to train, or None if it does."""
    if set(state.factors) != set(reference.factors):
        missing = sorted(set(reference.factors) - set(state.factors))[:2]
        extra = sorted(set(state.factors) - set(reference.factors))[:2]
        return f"wrong layers (missing {missing}, unexpected {extra})"
    for layer, parts in state.factors.items():
        if set(parts) != set(trains):
            return f"layer {layer}: sent factors {sorted(parts)}, expected {sorted(trains)}"
        for part, tensor in parts.items():
            problem = _tensor_problem(tensor, reference.factors[layer][part], f"{layer}.{part}")
            if problem:
                return problem
    expected_head = set(reference.head) if train_head else set()
    if set(state.head) != expected_head:
        return f"head parameters {sorted(state.head)}, expected {sorted(expected_head)}"
    for name, tensor in state.head.items():
        problem = _tensor_problem(tensor, reference.head[name], f"head.{name}")
        if problem:
            return problem
    return None


def _tensor_problem(tensor: torch.Tensor, reference: torch.Tensor, key: str) -> str | None:
    if tensor.shape != reference.shape:
        return f"{key}: shape {tuple(tensor.shape)}, expected {tuple(reference.shape)}"
    if tensor.dtype != reference.dtype:
        return f"{key}: dtype {tensor.dtype}, expected {reference.dtype}"
    if not torch.isfinite(tensor).all():
        return f"{key}: contains NaN or Inf"
    return None


def weighted_sum(tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """sum_k w_k T_k, accumulated in float64 and returned in the tensors' dtype."""
    total = torch.zeros_like(tensors[0], dtype=torch.float64)
    for tensor, weight in zip(tensors, weights.tolist()):
        total.add_(tensor.to(torch.float64), alpha=weight)
    return total.to(tensors[0].dtype)
