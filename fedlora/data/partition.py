"""Split a train set among clients with flwr-datasets partitioners: IID, Dirichlet, pathological.

Every client gets at least one example, or the split is refused naming the client and the
setting to change: a client with nothing to train on would fail the run at its first round.
"""

from __future__ import annotations

import warnings

import datasets
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    Partitioner,
    PathologicalPartitioner,
)

from fedlora.config import ConfigError, DataConfig
from fedlora.data.builtin import TextExamples


def make_partitioner(config: DataConfig, num_clients: int, seed: int, table: datasets.Dataset) -> Partitioner:
    """The flwr-datasets partitioner the config names."""
    if config.partition == "iid":
        return IidPartitioner(num_partitions=num_clients)
    if config.partition == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_clients,
            partition_by="label",
            alpha=config.dirichlet_alpha,
            # Re-draw until every client has a few examples to train on (and at least one).
            min_partition_size=max(1, min(10, len(table) // (2 * num_clients))),
            self_balancing=False,
            seed=seed,
        )
    return PathologicalPartitioner(
        num_partitions=num_clients,
        partition_by="label",
        num_classes_per_partition=config.classes_per_client,
        class_assignment_mode="random",
        seed=seed,
    )


def partition_examples(examples: TextExamples, config: DataConfig, num_clients: int, seed: int) -> list[TextExamples]:
    """Every client's share of the examples, client 0 first; none of them empty."""
    if num_clients > len(examples.labels):
        raise ConfigError(
            f"federation.num_clients: {num_clients} clients but only {len(examples.labels)} train examples; "
            "use fewer clients or more data"
        )
    table = datasets.Dataset.from_dict({"text": examples.texts, "label": examples.labels})
    # IidPartitioner cuts contiguous shards: shuffle first so shards are random.
    partitioner = make_partitioner(config, num_clients, seed, table)
    partitioner.dataset = table.shuffle(seed=seed)
    try:
        with warnings.catch_warnings():  # the Dirichlet partitioner warns at each re-draw we asked for
            warnings.filterwarnings("ignore", message="The specified min_partition_size", category=UserWarning)
            parts = [partitioner.load_partition(i) for i in range(num_clients)]
    except ValueError as err:
        reason = " ".join(str(err).split()).split(". ")[0].rstrip(".")  # flwr-datasets' first sentence, on one line
        raise ConfigError(
            f"data.partition: {config.partition} cannot split {len(table)} train examples among {num_clients} clients "
            f"({reason}); {_what_to_change(config)}"
        ) from None
    for client, part in enumerate(parts):
        if len(part) == 0:
            raise ConfigError(
                f"data.partition: {config.partition} partitioning leaves client {client} without examples "
                f"({len(table)} train examples, {num_clients} clients); {_what_to_change(config)}"
            )
    return [TextExamples(list(p["text"]), list(p["label"])) for p in parts]


def _what_to_change(config: DataConfig) -> str:
    """The settings that give every client examples, for the partitioner configured."""
    if config.partition == "dirichlet":
        return f"raise data.dirichlet_alpha (now {config.dirichlet_alpha}), use fewer federation.num_clients, or data.partition = 'iid'"
    if config.partition == "pathological":
        return (
            f"raise data.classes_per_client (now {config.classes_per_client}), use fewer federation.num_clients, "
            "or data.partition = 'iid'"
        )
    return "use fewer federation.num_clients or more data"
