"""Clients evaluate the global model on a held-out share of their own data (`[evaluation]`).

The split. With evaluation.clients = N > 0, each client sets aside `holdout_size(n)` of its n
examples (floor(evaluation.holdout x n), at least one and leaving at least one to train; a client
of a single example holds none), drawn from (run seed, "client-holdout", client id). It trains on
the rest and declares the rest at the handshake, so DP sample rates and aggregation weights
follow the data it trains on. With evaluation off nothing is set aside: every client trains on its
whole partition and every figure of a run stays what it was.

The rounds. After rounds N, 2N, ... and the last, the server sends the new global state in
EVALUATE messages to every client of the federation (evaluation.participants = "all", retired
ones too) or to the round's sampled clients ("sampled"); each answers with `num-examples`,
`accuracy` and `loss` on its held-out share (one ClientApp handler, clients/app.py, in simulation
and deployment). The round's history line gets `extra.client_eval` {client id: {accuracy, loss,
examples}}, the refused replies in `extra.client_eval_refused` and the evaluation's downlink in
`extra.client_eval_bytes_down` (kept apart from the strategy's bytes: it is measurement, not
training).

What the server trusts. The figures are the clients' claims: they never enter aggregation, and
they are recorded only once they pass what a measurement must pass (`claimed_figures`): a reply
from a node that was asked, once; `num-examples` a whole number that is the held-out share of a
client which trains on the count it declared at the handshake; `accuracy` in [0, 1] and a whole
number of correct answers out of the examples scored; `loss` finite, not negative and within
float32. Anything else is refused with its reason and the others are recorded. The figures about a
client's held-out data are not covered by DP-SGD's guarantee, which protects what it trains on.
"""

from __future__ import annotations

import math
from dataclasses import fields
from logging import INFO, WARNING
from typing import Any, TypeVar

import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedlora.config import ExperimentConfig
from fedlora.eval_figures import accuracy_spread, class_figures, label_counts
from fedlora.lora import LoraState
from fedlora.seeds import derive_seed

# Record keys shared with clients/app.py and strategies/base.py by convention (fedlora imports neither).
ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, INFO_KEY = "arrays", "config", "metrics", "info"
HOLDOUT_PURPOSE = "client-holdout"
MAX_LOSS = float(torch.finfo(torch.float32).max)  # as strategies/reply_values.py bounds client metrics
CLAIMED = ("num-examples", "accuracy", "loss")

Split = TypeVar("Split")  # EncodedExamples or CausalExamples: frozen dataclasses of tensors indexed by example


# --- the client's split ---------------------------------------------------------------------


def holdout_size(total: int, share: float) -> int:
    """How many of a client's `total` examples it holds out: floor(share x total), at least one, at
    least one left to train; none for a client of one example."""
    if total < 2:
        return 0
    return min(total - 1, max(1, math.floor(share * total)))


def split_holdout(examples: Split, config: ExperimentConfig, client_id: int) -> tuple[Split, Split | None]:
    """(what the client trains on, its held-out share); with evaluation off, (all of them, None)."""
    size = holdout_size(len(examples), config.evaluation.holdout) if config.evaluation.clients else 0
    if not size:
        return examples, None
    generator = torch.Generator().manual_seed(derive_seed(config.seed, HOLDOUT_PURPOSE, client_id))
    order = torch.randperm(len(examples), generator=generator)
    held_out, kept = order[:size].sort().values, order[size:].sort().values
    return _subset(examples, kept), _subset(examples, held_out)


def _subset(examples: Split, index: torch.Tensor) -> Split:
    return type(examples)(**{f.name: getattr(examples, f.name)[index] for f in fields(examples)})


# --- what the server checks -----------------------------------------------------------------


def claimed_figures(reply: Message, declared: int, config: ExperimentConfig) -> dict[str, float | int] | str:
    """A client's evaluation figures as the history records them, or why they are refused.

    `declared`: the examples the client declared at the handshake (those it trains on).
    """
    if reply.has_error():
        return f"client error: {reply.error.reason}"
    record = reply.content.metric_records.get(METRICS_KEY)
    if record is None:
        return "reply has no metrics"
    if record.get("refused"):
        info = reply.content.config_records.get(INFO_KEY) or ConfigRecord()
        return f"refused: {info.get('refused-reason', 'no reason given')}"
    for key in CLAIMED:
        value = record.get(key)
        # The bound first: an integer beyond float's range makes isfinite raise.
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(value) <= MAX_LOSS:
            return f"{key} is {_shown(value)}, not a finite number within float32's range"
    examples, accuracy, loss = (record[key] for key in CLAIMED)
    if examples != int(examples) or examples < 1 or holdout_size(declared + int(examples), config.evaluation.holdout) != examples:
        return (
            f"num-examples {examples!r} is not the held-out share (evaluation.holdout = {config.evaluation.holdout:g}) "
            f"of a client that trains on the {declared} examples it declared"
        )
    scored = min(int(examples), config.data.exact_match_examples) if config.model.causal else int(examples)
    if not 0 <= accuracy <= 1 or abs(accuracy * scored - round(accuracy * scored)) > 1e-6 * scored:
        return f"accuracy {accuracy!r} is not a whole number of correct answers out of the {scored} examples scored"
    if not 0 <= loss <= MAX_LOSS:
        return f"loss {loss!r} is not a loss (from 0 to {MAX_LOSS:.3g})"
    return {"accuracy": float(accuracy), "loss": float(loss), "examples": int(examples)}


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# --- the server's evaluation rounds ---------------------------------------------------------


class ClientEvaluation:
    """Asks clients to evaluate the global state on their held-out shares, and records what they claim."""

    def __init__(self, config: ExperimentConfig, clients: dict[int, int], declared: dict[int, int]) -> None:
        self.config = config
        self.clients = dict(clients)  # node id -> client id
        self.declared = dict(declared)  # client id -> examples declared at the handshake

    def due(self, server_round: int) -> bool:
        """Whether clients evaluate after this round: every evaluation.clients rounds, and after the last."""
        every = self.config.evaluation.clients
        return bool(every) and (server_round % every == 0 or server_round == self.config.federation.rounds)

    def evaluate(self, grid: Grid, state: LoraState, server_round: int, sampled: list[int], num_labels: int) -> dict[str, Any]:
        """The round's `extra` entries: each client's figures, the refusals and the bytes sent."""
        asked = sorted(sampled) if self.config.evaluation.participants == "sampled" else sorted(self.clients.values())
        node_of = {client: node for node, client in self.clients.items()}
        arrays = state.to_array_record()
        config = ConfigRecord({"server-round": server_round, "num-labels": num_labels})
        messages = [
            Message(
                RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: config}),
                dst_node_id=node_of[client],
                message_type=MessageType.EVALUATE,
            )
            for client in asked
        ]
        replies = grid.send_and_receive(messages, timeout=self.config.federation.round_timeout)
        figures, refused = self._read(replies, set(asked))
        entries: dict[str, Any] = {"client_eval": figures, "client_eval_bytes_down": state.num_bytes() * len(messages)}
        if refused:
            entries["client_eval_refused"] = refused
        if figures:
            spread = accuracy_spread({client: f["accuracy"] for client, f in figures.items()})
            log(
                INFO,
                "round %d: %d clients evaluated: accuracy mean %.4f, worst decile %.4f, min %.4f (client %s)",
                server_round,
                spread["clients"],
                spread["accuracy_mean"],
                spread["accuracy_worst_decile"],
                spread["accuracy_min"],
                spread["worst_client"],
            )
        return entries

    def _read(self, replies: list[Message], asked: set[int]) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
        """Each asked client's checked figures (by client id, in order) and every refusal with its reason."""
        figures: dict[int, dict[str, Any]] = {}
        refused: list[dict[str, Any]] = []
        answered: set[int] = set()
        for reply in replies:
            node = reply.metadata.src_node_id
            client = self.clients.get(node)
            if client is None or client not in asked:
                refused.append({"node": node, "reason": f"evaluation reply from node {node}, which was not asked to evaluate"})
            elif client in answered:
                refused.append(
                    {"client": client, "reason": f"second evaluation reply from client {client} (only the first counts)"}
                )
            else:
                answered.add(client)
                claim = claimed_figures(reply, self.declared[client], self.config)
                if isinstance(claim, str):
                    refused.append({"client": client, "reason": claim})
                else:
                    figures[client] = claim
        refused += [{"client": c, "reason": "no evaluation reply before the round timeout"} for c in sorted(asked - answered)]
        for refusal in refused:
            log(WARNING, "evaluation reply refused (%s): %s", refusal.get("client", refusal.get("node")), refusal["reason"])
        return {str(client): figures[client] for client in sorted(figures)}, refused


# --- what summary.json keeps ----------------------------------------------------------------


def evaluation_summary(
    extras: list[tuple[int, dict[str, Any]]],
    confusion: list[list[int]] | None,
    class_names: list[str],
    mix: dict[str, Any] | None,
) -> dict[str, Any]:
    """summary.json's evaluation entries: the server's held-out figures per class (classifiers), the
    clients' last figures (None with evaluation off) and each client's label mix (None where the
    server cannot know it)."""
    return {
        "held_out": None if confusion is None else class_figures(confusion, class_names),
        "client_eval": last_client_eval(extras),
        "label_mix": mix,
    }


def last_client_eval(extras: list[tuple[int, dict[str, Any]]]) -> dict[str, Any] | None:
    """The last round's per-client figures and their spread, from (round, extra) pairs; None if no client evaluated."""
    for server_round, extra in reversed(extras):
        figures = extra.get("client_eval")
        if figures:
            spread = accuracy_spread({client: f["accuracy"] for client, f in figures.items()})
            return {"round": server_round, **spread, "clients": figures}
    return None


def label_mix(partitions: list[Any], class_names: list[str]) -> dict[str, Any] | None:
    """Each client's examples per class, as the server partitioned the task (the server's own count, not a
    client's); None for a task without classes (instruction data without categories)."""
    if not class_names:
        return None
    return {
        "classes": list(class_names),
        "clients": {str(client): label_counts(list(part.labels), len(class_names)) for client, part in enumerate(partitions)},
    }
