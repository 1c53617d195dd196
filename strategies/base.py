"""LoraStrategy: the Flower plumbing every LoRA strategy shares.

A concrete strategy declares which factors its clients train (`trains = "B"` or `"AB"`), which of
those they keep to themselves (`keeps`: FedSA-LoRA's B never leaves the client), and writes one method, `aggregate_factors(global_state, updates, weights) -> new_state`. This base
class does the rest: seeded client sampling (never a retired client: one whose privacy budget
is spent), the train message, reply hygiene before any math, the server-decided weights,
averaging the classification head, counting bytes up and down, and running the optional robust
defence (strategies/robust.py) between validation and aggregation. What happened in a round
(refusals and their reasons, clients the defence dropped, bytes, client metrics) is left in
`last_round` for the server to record.

Reply hygiene, all of it here: one reply per sampled node and round (a second is refused);
replies from nodes outside the federation or not sampled this round are refused; every metric
must be a finite number within float32's range; `num-examples` must equal the count the client declared at the
handshake (the weight comes from the declaration, `fedlora.roster`, never from a reply); the
arrays must be exactly the factors the client was asked to train and send (`uploads`), with the global state's
shapes and dtypes, all finite and bounded (below); then the strategy's own check and the server's checks
(`reply_checks`, e.g. the privacy ledger) run. Each refusal is recorded with its reason and the
round goes on with the valid replies.

The bound on values (strategies/reply_values.py): a finite value can still overflow the math, so
a reply with a value beyond `MAX_VALUE` is refused like a NaN, and a new global state that holds
one (or that the rule's linear algebra failed to produce) is not installed: the previous state
stays, the round is skipped, and `last_round.extra["not_installed"]` says why.

User-level DP (`user_privacy`, fedlora/user_privacy.py), when the server sets it: clients are
Poisson-sampled, the valid replies' changes are clipped and noised into one private mean change
(no minimum of replies: every round releases its step), and `aggregate_factors` receives only
that, as a single update of weight 1; no reply reaches it, or the head's average, unclipped. A
strategy says what that clips and noises in `user_level_dp`; one that leaves it empty is refused
under `privacy.unit = "user"`.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from abc import abstractmethod
from collections.abc import Callable, Iterable
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

from fedlora.config import MIXED_RANK_STRATEGIES, ConfigError, ExperimentConfig, StrategyConfig
from fedlora.lora import LoraRecordError, LoraState
from fedlora.roster import Roster, Weighting
from fedlora.seeds import derive_seed
from fedlora.user_privacy import UserLevelPrivacy, delta_vector
from strategies.reply_values import check_against, finite_metrics, state_problem
from strategies.robust import Defence

# Keys of the records exchanged with clients (shared with clients/app.py by convention,
# since strategies and clients never import each other).
ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
INFO_KEY = "info"
NUM_EXAMPLES = "num-examples"
REFUSED = "refused"
LEDGER_KEY = "privacy-ledger"  # a client's DP accountant history (replies, and train messages)

# A server-side check of a well-formed reply (client id, message): a reason to refuse it, or None.
ReplyCheck = Callable[[int, Message], "str | None"]


@dataclass
class ClientUpdate:
    """One client's validated reply: the factors it trained, as new values, and its server-decided weight."""

    client_id: int
    state: LoraState
    weight: float
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
    train_seconds: float = 0.0  # the valid replies' own "train-seconds", each capped at client_seconds, summed: said by clients, for diagnostics only
    aggregate_seconds: float = 0.0
    skipped: bool = False
    client_metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    extra: dict[str, object] = field(default_factory=dict)


class LoraStrategy(Strategy):
    """Base class of the LoRA strategies.

    Parameters
    ----------
    roster : Roster
        Who is in the federation (node id -> client id) and each client's declared example
        count, from the server's handshake.
    clients_per_round : int
        How many clients train each round (fewer when fewer are left with privacy budget).
    min_replies : int
        Fewer valid replies than this and the round is skipped (the global state stays).
    seed : int
        Seeds client sampling: same seed, same clients each round.
    train_head : bool
        Whether clients train the classification head (then it is averaged with the weights).
    defence : Defence | None
        A robust rule screening the valid updates before aggregation (None: aggregate them all).
    weighting : "examples" | "uniform"
        How the server weights clients: by declared examples (capped) or equally.
    max_weight_ratio : float | None
        Cap of a client's weight at this many times the median declared count (None: no cap).
    lora_alpha : float
        LoRA's alpha: a rank-r adapter adds (alpha / r) B A to its layer.
    client_ranks : dict[int, int] | None
        Each client's adapter rank (None: every client at the global state's rank). Only a
        strategy with `mixed_ranks` accepts ranks that differ.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    trains: ClassVar[str] = "AB"  # which factors clients train: "AB" or "B"
    keeps: ClassVar[str] = ""  # which of them clients keep between rounds and never send (their `uploads` are the rest)
    mixed_ranks: ClassVar[bool] = False  # whether clients may train adapters of different ranks
    trains_label: ClassVar[str] = ""  # what `fedlora strategies` shows when `trains` alone does not say it
    # What user-level DP clips and noises under this strategy, in words, declared by the class
    # itself (a subclass changes the aggregation, so it never inherits its parent's); empty: the
    # strategy's aggregation is not a mean of per-client changes of one shape (products, stacks,
    # a correction from the individual factors), so noise on one sum protects nobody: refused.
    user_level_dp: ClassVar[str] = ""

    def __init__(
        self,
        roster: Roster,
        clients_per_round: int,
        min_replies: int = 1,
        seed: int = 0,
        train_head: bool = True,
        defence: Defence | None = None,
        weighting: Weighting = "examples",
        max_weight_ratio: float | None = None,
        lora_alpha: float = 16.0,
        client_ranks: dict[int, int] | None = None,
    ) -> None:
        if client_ranks is not None and len(set(client_ranks.values())) > 1 and not self.mixed_ranks:
            raise ConfigError(
                f"model.client_ranks: strategy {self.name} needs one rank for all clients; "
                f"use {', '.join(MIXED_RANK_STRATEGIES)}, or unset model.client_ranks"
            )
        if clients_per_round > len(roster.clients):
            raise ValueError(f"{clients_per_round} clients per round but only {len(roster.clients)} clients connected")
        self.roster = roster
        self.clients = dict(roster.clients)
        self.weights = roster.weights(weighting, max_weight_ratio)
        self.clients_per_round = clients_per_round
        self.min_replies = min_replies
        self.seed = seed
        self.train_head = train_head
        self.defence = defence
        self.lora_alpha = lora_alpha
        self.client_ranks = client_ranks
        self.retired: dict[int, str] = {}  # client id -> why it is no longer sampled
        self.reply_checks: list[ReplyCheck] = []
        self.global_state = LoraState()
        self.last_round = RoundLog()
        self.server_round = 0
        self.aggregated_clients: list[int] = []  # whose updates aggregate_factors is given, in order (-1: a defence's)
        self.user_privacy: UserLevelPrivacy | None = None  # user-level DP's mechanism, set by the server
        self._sent_at = 0.0

    @classmethod
    def from_config(cls, config: ExperimentConfig, roster: Roster) -> LoraStrategy:
        """Build from an experiment config and the handshake's roster."""
        cls.check_privacy(config)
        return cls(
            roster=roster,
            clients_per_round=config.federation.clients_per_round,
            min_replies=config.federation.min_replies,
            seed=config.seed,
            train_head=config.model.train_head,
            # User-level DP: every clipped update counts once (the summary's weights say so).
            weighting="uniform" if config.privacy.user_level else config.federation.weighting,
            max_weight_ratio=config.federation.max_weight_ratio,
            lora_alpha=config.model.lora_alpha,
            client_ranks=None
            if config.model.client_ranks is None
            else {c: config.model.rank_of(c) for c in range(config.federation.num_clients)},
            **cls.options(config.strategy),
        )

    @classmethod
    def check_privacy(cls, config: ExperimentConfig) -> None:
        """Refuse user-level DP for a strategy that does not say what it clips and noises (ConfigError, one line)."""
        if config.privacy.user_level and not cls.__dict__.get("user_level_dp"):
            raise ConfigError(
                f"privacy.unit: strategy {cls.name} cannot run under user-level DP: it does not declare what is clipped and "
                "noised (its own user_level_dp), and a rule that combines the clients' factors as products, stacks or "
                "corrections is no mean that noise on one sum protects; use fedit, ffa_lora, fedsvd, rolora, fedsa_lora or "
                "lora_a2, or privacy.unit = 'example'"
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

    def unpack_reply(self, client_id: int, received: LoraState) -> LoraState | str:
        """The trained factors a reply's arrays stand for, or why they cannot be read (default: the arrays
        are the factors; LoRA-A2 expands the rank components a client selected). Checked after this."""
        return received

    def pack_reply(self, update: LoraState) -> LoraState:
        """What a client that trained `update` sends (default: all of it): the simulated adversary's
        rewritten update goes out in this form."""
        return update

    def check_update(self, update: ClientUpdate) -> str | None:
        """A strategy-specific reason to refuse a reply, or None to accept it."""
        return None

    def client_state(self, client_id: int) -> LoraState | None:
        """What this client is sent to train from, when it is not the global state (None: the global state).

        FlexLoRA sends a client of a smaller rank its top components.
        """
        return None

    @property
    def uploads(self) -> str:
        """The factors a reply carries: those the clients train, less those they keep."""
        return "".join(part for part in self.trains if part not in self.keeps)

    def global_rank(self) -> int:
        """The global state's rank (the largest client rank)."""
        return next(iter(self.global_state.factors.values()))["A"].shape[0]

    def rank_of(self, client_id: int) -> int:
        """A client's adapter rank (the global state's when ranks are uniform)."""
        return self.global_rank() if self.client_ranks is None else self.client_ranks[client_id]

    def scaling(self, rank: int) -> float:
        """What a rank-r adapter's B A is multiplied by in the layer: alpha / r (peft's)."""
        return self.lora_alpha / rank

    def reference_state(self, client_id: int) -> LoraState:
        """The state a client's reply must match in layers, shapes and dtypes (its own rank's)."""
        if self.client_ranks is None:
            return self.global_state
        return self.global_state.at_rank(self.rank_of(client_id))

    def rank_gain(self, client_id: int) -> float:
        """The factor gain that gives a client of rank r the global adapter's top-r product:
        sqrt(s_max / s_r), so that s_r (g B_r)(g A_r) = s_max B_r A_r (1 at the global rank)."""
        return math.sqrt(self.scaling(self.global_rank()) / self.scaling(self.rank_of(client_id)))

    # --- Flower Strategy ------------------------------------------------------------------
    def summary(self) -> None:
        """Log the strategy's settings."""
        log(INFO, "\t%s: %s (clients train %s)", self.name, self.description, self.trains)
        log(INFO, "\t%d of %d clients a round, min %d replies", self.clients_per_round, len(self.clients), self.min_replies)

    def eligible_clients(self) -> list[int]:
        """Client ids that may still be sampled (not retired), in order."""
        return [client for client in self.roster.client_ids() if client not in self.retired]

    def sample_clients(self, server_round: int) -> list[int]:
        """Node ids of this round's clients, drawn from (seed, round) over the eligible client ids."""
        node_of = {client: node for node, client in self.clients.items()}
        eligible = self.eligible_clients()
        if self.user_privacy is not None:  # Poisson sampling: the round's size varies, may be 0
            return [node_of[client] for client in self.user_privacy.sample(eligible, self.seed, server_round)]
        rng = random.Random(f"{self.seed}:{server_round}")
        chosen = rng.sample(eligible, min(self.clients_per_round, len(eligible)))
        return [node_of[client] for client in sorted(chosen)]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """One train message per sampled client: the global state and what to train."""
        self.global_state = LoraState.from_array_record(arrays, copy=False)  # read, never written
        self.server_round = server_round
        config = ConfigRecord(dict(config))
        config["server-round"] = server_round
        config["train-factors"] = self.trains
        config["keep-factors"] = self.keeps
        config["train-head"] = self.train_head
        nodes = self.sample_clients(server_round)
        if self.user_privacy is not None:  # distributed noise: each client's clip and share of the noise
            config.update(self.user_privacy.client_instruction(len(nodes)))
        self.last_round = RoundLog(sampled=[self.clients[n] for n in nodes])
        messages = []
        for node in nodes:
            own = self.client_state(self.clients[node])
            self.last_round.bytes_down += (own or self.global_state).num_bytes()
            record = arrays if own is None else own.to_array_record()
            messages.append(
                Message(RecordDict({ARRAYS_KEY: record, CONFIG_KEY: config}), dst_node_id=node, message_type=MessageType.TRAIN)
            )
        self._sent_at = time.perf_counter()
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate the replies, then aggregate the valid ones into the new global state."""
        round_log = self.last_round
        round_log.client_seconds = time.perf_counter() - self._sent_at
        updates = self._valid_updates(list(replies))
        started = time.perf_counter()
        if self.user_privacy is not None:
            round_log.accepted = sorted(u.client_id for u in updates)
            return self._install(server_round, [self._private_update(server_round, updates)], updates, started)
        kept, robust_update = self._defend(server_round, updates)
        round_log.dropped = sorted({u.client_id for u in updates} - {u.client_id for u in kept})
        round_log.accepted = sorted(u.client_id for u in kept)
        # min_replies counts valid replies; a defence may then keep fewer (Krum keeps one), not none.
        if len(updates) < self.min_replies or not kept:
            self._settle_defence(installed=False)
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
        return self._install(server_round, [robust_update] if robust_update else kept, kept, started)

    def _install(
        self, server_round: int, aggregated: list[ClientUpdate], kept: list[ClientUpdate], started: float
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate, and install the new state unless it is broken; the train metrics are the kept replies'."""
        round_log = self.last_round
        try:
            new_state = self._aggregate(aggregated)
            problem = state_problem(new_state)
        except torch.linalg.LinAlgError as err:  # e.g. an SVD that does not converge
            problem = f"the aggregation's linear algebra failed: {err}"
        round_log.aggregate_seconds = time.perf_counter() - started
        self._settle_defence(installed=not problem)
        if problem:  # keep the previous state rather than install a broken one
            round_log.skipped = True
            round_log.extra["not_installed"] = problem
            log(WARNING, "round %d: new global state not installed: %s", server_round, problem)
            return None, None
        self.global_state = new_state
        return new_state.to_array_record(), self._train_metrics(kept) if kept else None

    def _private_update(self, server_round: int, updates: list[ClientUpdate]) -> ClientUpdate:
        """User-level DP: the clipped, noised mean change of the round, as one update of weight 1."""
        trained = self.global_state.select(self.uploads, self.train_head)  # what a reply carries (FedSA-LoRA: A)
        changes = [delta_vector(update.state, self.global_state) for update in updates]
        size = trained.flatten().numel()
        seed = derive_seed(self.seed, "user-dp-noise", server_round)
        mean, figures = self.user_privacy.privatize(changes, len(self.last_round.sampled), size, seed)
        if "noise_withheld" in figures:  # positions -> the clients whose share the server topped up
            figures["noise_withheld"] = [updates[i].client_id for i in figures["noise_withheld"]]
        self.last_round.extra["user_dp"] = figures
        return ClientUpdate(-1, self.global_state.plus(trained.unflatten(mean)), 1.0, {}, {})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """The server evaluates on its held-out split; no client-side evaluation round."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Mean of client evaluation metrics under the server's weights (when a deployment asks for them)."""
        rows = []
        for message in replies:
            client = self.clients.get(message.metadata.src_node_id)
            if client is None or message.has_error() or METRICS_KEY not in message.content:
                continue
            metrics = finite_metrics(message.content[METRICS_KEY])
            if isinstance(metrics, dict):
                rows.append((self.weights[client], metrics))
        if not rows:
            return None
        total = sum(weight for weight, _ in rows)
        keys = set.intersection(*(set(metrics) for _, metrics in rows)) - {NUM_EXAMPLES}
        return MetricRecord({k: sum(weight * metrics[k] for weight, metrics in rows) / total for k in keys})

    # --- internals ------------------------------------------------------------------------
    def _valid_updates(self, replies: list[Message]) -> list[ClientUpdate]:
        """The round's valid updates; every other reply is refused with its reason."""
        round_log = self.last_round
        sampled, answered = set(round_log.sampled), set()
        updates: list[ClientUpdate] = []
        for message in replies:
            node = message.metadata.src_node_id
            client = self.clients.get(node)
            if client is None:
                self._refuse({"node": node}, f"reply from node {node}, which is not in the federation")
            elif client not in sampled:
                self._refuse(
                    {"client": client}, f"reply from client {client}, which was not sampled in round {self.server_round}"
                )
            elif client in answered:
                self._refuse({"client": client}, f"second reply from client {client} this round (only the first counts)")
            else:
                answered.add(client)
                parsed = self._parse(message, client)
                if isinstance(parsed, str):
                    self._refuse({"client": client}, parsed)
                elif parsed is not None:
                    updates.append(parsed)
        for client in sorted(sampled - answered):  # crashed, disconnected or too slow
            round_log.rejected.append({"client": client, "reason": "no reply before the round timeout"})
        # Said by the clients: only valid replies', each at most the round's own wall time.
        claimed = (max(0.0, update.metrics.get("train-seconds", 0.0)) for update in updates)
        round_log.train_seconds = sum(min(seconds, round_log.client_seconds) for seconds in claimed)
        # Replies arrive in whatever order Ray finishes them; aggregating in client order makes
        # the floating-point sums (and so a resumed run's history) independent of that order.
        return sorted(updates, key=lambda update: update.client_id)

    def _refuse(self, who: dict[str, int], reason: str) -> None:
        self.last_round.rejected.append({**who, "reason": reason})
        log(WARNING, "%s: reply refused: %s", ", ".join(f"{k} {v}" for k, v in who.items()), reason)

    def _defend(self, server_round: int, updates: list[ClientUpdate]) -> tuple[list[ClientUpdate], ClientUpdate | None]:
        """The updates the defence keeps, and the update it computed itself (median, trimmed mean) if any."""
        if self.defence is None or not updates:
            return updates, None
        if len(updates) < self.defence.min_clients:  # fail closed: see strategies/robust.py
            self.last_round.extra["defence"] = {"name": self.defence.name, "too_few_replies": len(updates)}
            return [], None
        deltas = [u.state.minus(self.global_state) for u in updates]
        weights = torch.tensor([u.weight for u in updates], dtype=torch.float64)
        self.defence.begin_round(self.uploads)
        screening = self.defence.screen(
            torch.stack([d.flatten() for d in deltas]), weights / weights.sum(), derive_seed(self.seed, "defence", server_round)
        )
        self.last_round.extra["defence"] = {"name": self.defence.name, **screening.stats}
        kept = [updates[i] for i in screening.kept]
        if screening.equal_weights:  # the rule's own mean (Multi-Krum's): every kept update counts once
            kept = [dataclasses.replace(update, weight=1.0) for update in kept]
        if screening.aggregate is None or not kept:
            return kept, None
        # The robust statistic enters the strategy's own aggregation as one client's update.
        state = self.global_state.plus(deltas[0].unflatten(screening.aggregate))
        return kept, ClientUpdate(-1, state, 1.0, {}, {})

    def _settle_defence(self, installed: bool) -> None:
        """Tell a defence with memory whether the round it screened counted."""
        if self.defence is not None:
            self.defence.settle(installed)

    def _aggregate(self, updates: list[ClientUpdate]) -> LoraState:
        weights = torch.tensor([u.weight for u in updates], dtype=torch.float64)
        weights = weights / weights.sum()
        self.aggregated_clients = [u.client_id for u in updates]  # for strategies that keep per-client state
        new_state = self.aggregate_factors(self.global_state, [u.state for u in updates], weights)
        new_state.head = self._average_head(updates, weights)
        return new_state

    def _average_head(self, updates: list[ClientUpdate], weights: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.train_head:
            return dict(self.global_state.head)
        return {name: weighted_sum([u.state.head[name] for u in updates], weights) for name in self.global_state.head}

    def _parse(self, message: Message, client_id: int) -> ClientUpdate | str | None:
        """A valid update, a reason for refusing the reply, or None for a deliberate no-update."""
        if message.has_error():
            return f"client error: {message.error.reason}"
        content = message.content
        metrics_record = content.metric_records.get(METRICS_KEY)
        if metrics_record is None:
            return "reply has no metrics"
        metrics = finite_metrics(metrics_record)
        if isinstance(metrics, str):
            return metrics
        self.last_round.client_metrics[client_id] = metrics
        if metrics.get(REFUSED, 0.0):
            self.last_round.refused.append(
                {"client": client_id, "reason": str(content.config_records.get(INFO_KEY, {}).get("refused-reason", ""))}
            )
            return None
        declared = self.roster.examples[client_id]
        if metrics.get(NUM_EXAMPLES) != declared:
            return f"{NUM_EXAMPLES} {metrics.get(NUM_EXAMPLES)!r} differs from the {declared} declared at the handshake"
        arrays = content.array_records.get(ARRAYS_KEY)
        if arrays is None:
            return "reply has no arrays"
        try:  # read-only views of the reply's bytes: strategies never write into an update
            received = LoraState.from_array_record(arrays, copy=False)
        except LoraRecordError as err:
            return str(err)
        # Tensor payload bytes (as for the downlink), not counting serialization headers.
        self.last_round.bytes_up += received.num_bytes()
        state = self.unpack_reply(client_id, received)
        if isinstance(state, str):
            return state
        problem = check_against(state, self.reference_state(client_id), self.uploads, self.train_head)
        if problem:
            return problem
        self.last_round.bytes_up_factors += received.factor_bytes()
        info = {k: str(v) for k, v in content.config_records.get(INFO_KEY, ConfigRecord()).items()}
        update = ClientUpdate(client_id, state, self.weights[client_id], metrics, info)
        problem = self.check_update(update)
        for check in self.reply_checks:
            problem = problem or check(client_id, message)
        return problem or update

    def _train_metrics(self, updates: list[ClientUpdate]) -> MetricRecord:
        total = sum(u.weight for u in updates)
        # Weights normalised first: a mean of metrics within MAX_METRIC then stays within it.
        loss = sum(u.metrics.get("train-loss", 0.0) * (u.weight / total) for u in updates)
        return MetricRecord({"train-loss": loss, "num-replies": len(updates)})


def weighted_sum(tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """sum_k w_k T_k, accumulated in place in float32 or wider, returned in the tensors' dtype.

    With weights summing to 1 and a round's few replies, float32 accumulation stays within
    n * 2^-24 of the exact mean (relative to sum_k w_k |T_k|), as Flower's FedAvg does; float64
    would stream four to five times slower (torch widens each value as it reads it, unvectorized).
    """
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    total = torch.zeros_like(tensors[0], dtype=dtype)
    for tensor, weight in zip(tensors, weights.tolist()):
        total.add_(tensor, alpha=weight)
    return total.to(tensors[0].dtype)
