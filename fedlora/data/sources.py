"""Where the examples come from: the built-in corpus, a Hugging Face hub data set, or local data.

Every source yields the same thing, a `LabelledData` with integer labels 0..C-1, a train
split (which the clients partition) and a test split (the server's held-out set). Hub data
sets and local files are read with `datasets` (hub.py, files.py) and checked in full on the way
(labels.py): a mistake in the data is a ConfigError naming the file or split and the row.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from logging import WARNING
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.common.logger import log

from fedlora.config import BUILTIN_SOURCE, ConfigError, DataConfig
from fedlora.data.builtin import BuiltinCorpusConfig, TextExamples, generate_corpus
from fedlora.data.files import read_table, row_places
from fedlora.data.hub import load_hub_dataset
from fedlora.data.labels import (
    CheckedRows,
    Label,
    RawTable,
    checked_rows,
    class_names_of,
    encode_labels,
    require_two_classes,
)

if TYPE_CHECKING:
    import datasets

SOURCE_KEY = "data.source"
NODE_KEY = "node config data-path"
DEFAULT_TEST_SPLIT = "test"


@dataclass(frozen=True)
class LabelledData:
    """Train and test examples of one text-classification task."""

    class_names: list[str]
    train: TextExamples
    test: TextExamples

    @property
    def num_labels(self) -> int:
        """Number of classes."""
        return len(self.class_names)


def load_data(config: DataConfig, seed: int) -> LabelledData:
    """Load and check the configured source; the test split is capped at `max_test_examples`."""
    if config.source == BUILTIN_SOURCE:
        corpus = generate_corpus(seed, BuiltinCorpusConfig(config.num_train, config.num_test, **config.corpus.model_dump()))
        data = LabelledData(corpus.class_names, corpus.train, corpus.test)
    else:
        train, test = _hub_tables(config) if config.hf_dataset_id else _local_tables(config)
        data = _labelled(train, test, config, seed)
    test = TextExamples(data.test.texts[: config.max_test_examples], data.test.labels[: config.max_test_examples])
    return LabelledData(data.class_names, data.train, test)


def _hub_tables(config: DataConfig) -> tuple[RawTable, RawTable | None]:
    return _split_tables(load_hub_dataset(config), config, config.source)


def _local_tables(config: DataConfig) -> tuple[RawTable, RawTable | None]:
    path = Path(config.source)
    table = read_table(path, SOURCE_KEY)
    if is_dataset_dict(table):
        return _split_tables(table, config, str(path))
    return _raw_table(table, config, row_places(path), str(path)), None  # one file: all train, test carved


def _split_tables(loaded: datasets.DatasetDict, config: DataConfig, name: str) -> tuple[RawTable, RawTable | None]:
    """The train split and the test split (None: carve one) of a data set with named splits."""
    train_split, test_split = split_names(loaded, config, name)

    def table(split: str) -> RawTable:
        return _raw_table(loaded[split], config, split_places(name, split), f"{name} split {split!r}")

    return table(train_split), table(test_split) if test_split else None


def split_names(loaded: datasets.DatasetDict, config: DataConfig, name: str) -> tuple[str, str | None]:
    """The names of the train split and of the test split (None: carve one) of a data set with named splits."""
    if config.train_split not in loaded:
        raise ConfigError(f"data.train_split: no split {config.train_split!r} in {name} (has {', '.join(loaded)})")
    if config.test_split is not None and config.test_split not in loaded:
        raise ConfigError(
            f"data.test_split: no split {config.test_split!r} in {name} (has {', '.join(loaded)}); "
            "leave data.test_split unset to carve data.test_fraction off the train split"
        )
    test_split = config.test_split or (DEFAULT_TEST_SPLIT if DEFAULT_TEST_SPLIT in loaded else None)
    if test_split == config.train_split:
        raise ConfigError(f"data.test_split: {test_split!r} is also the train split; the held-out set must be other examples")
    return config.train_split, test_split


def _raw_table(table: datasets.Dataset, config: DataConfig, place: Callable[[int], str], name: str) -> RawTable:
    """The text and label columns of a table, and a ClassLabel column's class names."""
    for key in ("text_column", "label_column"):
        column = getattr(config, key)
        if column not in table.column_names:
            raise ConfigError(f"data.{key}: {column!r} is not a column of {name} (columns: {', '.join(table.column_names)})")
    feature = table.features[config.label_column]
    class_names = [str(n) for n in feature.names] if hasattr(feature, "names") else None
    return RawTable(list(table[config.text_column]), list(table[config.label_column]), place, class_names)


def split_places(name: str, split: str) -> Callable[[int], str]:
    """How messages name row i of a split of a data set with named splits."""
    return lambda row: f"{name} split {split!r} row {row + 1}"


def _labelled(train: RawTable, test: RawTable | None, config: DataConfig, seed: int) -> LabelledData:
    """Checked, integer-labelled train and test examples; without a test split, a seeded carve."""
    train_rows = _checked(train, config)
    class_names = train.class_names or class_names_of(train_rows.labels)
    if test is None:
        train_rows, test_rows = _carve(train_rows, config, seed)
    else:
        test_rows = _checked(test, config)
    if not test_rows.texts:
        raise ConfigError(f"{SOURCE_KEY}: {config.source}: the test split holds no labelled examples")
    require_two_classes(class_names_of(train_rows.labels), f"train example of {config.source}", SOURCE_KEY)
    encoded_train = encode_labels(train_rows, class_names, train.place, SOURCE_KEY)
    # A separate test split can hold a class the train split lacks: its row is named.
    encoded_test = encode_labels(test_rows, class_names, (test or train).place, SOURCE_KEY)
    return LabelledData(class_names, TextExamples(train_rows.texts, encoded_train), TextExamples(test_rows.texts, encoded_test))


def _checked(table: RawTable, config: DataConfig) -> CheckedRows:
    rows = checked_rows(table, config.drop_missing_labels, SOURCE_KEY)
    if rows.dropped:
        log(WARNING, "%s: dropped %d example(s) without a label (data.drop_missing_labels = true)", config.source, rows.dropped)
    return rows


def _carve(rows: CheckedRows, config: DataConfig, seed: int) -> tuple[CheckedRows, CheckedRows]:
    """A seeded `test_fraction` of the rows as the test split, the rest as train."""
    if len(rows.texts) < 2:
        raise ConfigError(f"{SOURCE_KEY}: {config.source} holds {len(rows.texts)} labelled example(s); train and test need more")
    order = list(range(len(rows.texts)))
    random.Random(seed).shuffle(order)
    cut = max(1, int(len(order) * config.test_fraction))
    return rows.subset(order[cut:]), rows.subset(order[:cut])


def node_table(path: Path, config: DataConfig) -> tuple[datasets.Dataset, Callable[[int], str]]:
    """A deployed node's own data file or saved folder (of a DatasetDict, the `data.train_split`
    or its only split) and where each of its rows is, for messages."""
    if not path.exists():
        raise ConfigError(f"{NODE_KEY}: {path} does not exist on this node")
    table = read_table(path, NODE_KEY)
    place = row_places(path)
    if is_dataset_dict(table):
        split = config.train_split if config.train_split in table else next(iter(table)) if len(table) == 1 else None
        if split is None:
            raise ConfigError(f"data.train_split: no split {config.train_split!r} in {path} (has {', '.join(table)})")
        table, place = table[split], split_places(str(path), split)
    return table, place


def load_node_examples(path: Path, config: DataConfig, class_names: Callable[[], list[str]]) -> TextExamples:
    """All the examples of a deployed node's own data set (node config `data-path`).

    A local file in any format `data.source` takes (.csv, .jsonl, .json, .parquet) or a folder
    saved by `datasets` (`save_to_disk`; of a DatasetDict, the `data.train_split`, or its only
    split), with the experiment's text and label columns, checked as `data.source` is. Integer
    labels are class indices 0..C-1; other labels are class names of the experiment's task
    (`class_names()`).
    """
    table, place = node_table(path, config)
    raw = _raw_table(table, config, place, str(path))
    # Class indices stay indices here, ClassLabel or not: the node's data follows the task's numbering.
    rows = checked_rows(RawTable(raw.texts, raw.labels, place), config.drop_missing_labels, NODE_KEY)
    if not rows.texts:
        raise ConfigError(f"{NODE_KEY}: {path} holds no examples")
    return TextExamples(rows.texts, _node_labels(rows.labels, class_names, path))


def _node_labels(labels: list[Label], class_names: Callable[[], list[str]], path: Path) -> list[int]:
    """Class indices: integers as they are, names looked up in the task's classes (read once)."""
    lookup: dict[str, int] | None = None
    indices: list[int] = []
    for label in labels:
        if isinstance(label, str):
            if lookup is None:
                lookup = {name: i for i, name in enumerate(class_names())}
            if label not in lookup:
                raise ConfigError(f"{NODE_KEY}: label {label!r} in {path} is not a class of the task ({', '.join(lookup)})")
            label = lookup[label]
        if label < 0:
            raise ConfigError(f"{NODE_KEY}: label {label!r} in {path}: use class indices 0..C-1 or class names")
        indices.append(label)
    return indices


def is_dataset_dict(table: object) -> bool:
    """Whether a table read from a source is a DatasetDict (named splits), not one table."""
    import datasets

    return isinstance(table, datasets.DatasetDict)
