"""Split a train set among clients with flwr-datasets partitioners: IID, Dirichlet, pathological."""

from __future__ import annotations

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
            # Re-draw until every client has a few examples to train on.
            min_partition_size=min(10, len(table) // (2 * num_clients)),
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
    """Every client's share of the examples, client 0 first."""
    if num_clients > len(examples.labels):
        raise ConfigError(f"federation.num_clients: {num_clients} clients but only {len(examples.labels)} train examples")
    table = datasets.Dataset.from_dict({"text": examples.texts, "label": examples.labels})
    # IidPartitioner cuts contiguous shards: shuffle first so shards are random.
    partitioner = make_partitioner(config, num_clients, seed, table)
    partitioner.dataset = table.shuffle(seed=seed)
    try:
        parts = [partitioner.load_partition(i) for i in range(num_clients)]
    except ValueError as err:
        raise ConfigError(f"data.partition: {config.partition} cannot split this data: {err}") from None
    return [TextExamples(list(p["text"]), list(p["label"])) for p in parts]
