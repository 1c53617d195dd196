"""Where the examples come from: the built-in corpus, a Hugging Face data set, or a local file.

Every source yields the same thing, a `LabelledData` with integer labels 0..C-1, a train
split (which the clients partition) and a test split (the server's held-out set).
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedlora.config import ConfigError, DataConfig
from fedlora.data.builtin import BuiltinCorpusConfig, TextExamples, generate_corpus

HF_PREFIX = "hf:"
LOCAL_SUFFIXES = (".csv", ".jsonl")


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
    """Load the configured source; the test split is capped at `max_test_examples`."""
    if config.source == "builtin":
        corpus = generate_corpus(seed, BuiltinCorpusConfig(num_train=config.num_train, num_test=config.num_test))
        data = LabelledData(corpus.class_names, corpus.train, corpus.test)
    elif config.source.startswith(HF_PREFIX):
        data = _load_hf(config)
    elif config.source.endswith(LOCAL_SUFFIXES):
        data = _load_local(config, seed)
    else:
        raise ConfigError(f"data.source: {config.source!r} is not 'builtin', 'hf:NAME[/CONFIG]' nor a .csv / .jsonl file")
    test = TextExamples(data.test.texts[: config.max_test_examples], data.test.labels[: config.max_test_examples])
    return LabelledData(data.class_names, data.train, test)


def read_local_examples(path: Path, text_column: str, label_column: str) -> tuple[list[str], list[object]]:
    """Texts and raw labels from a CSV (with a header) or JSONL file."""
    if not path.is_file():
        raise ConfigError(f"data.source: file not found: {path}")
    if path.suffix == ".csv":
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    else:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise ConfigError(f"data.source: {path} holds no examples")
    for column in (text_column, label_column):
        if column not in rows[0]:
            raise ConfigError(
                f"data.{'text' if column == text_column else 'label'}_column: {column!r} is not a "
                f"column of {path} (columns: {', '.join(rows[0])})"
            )
    return [str(row[text_column]) for row in rows], [row[label_column] for row in rows]


def encode_labels(raw: list[object], class_names: list[str] | None = None) -> tuple[list[int], list[str]]:
    """Map raw labels (ints or strings) to 0..C-1; integer labels keep their values."""
    if class_names is None:
        class_names = sorted({str(v) for v in raw}, key=_label_order)
    index = {name: i for i, name in enumerate(class_names)}
    try:
        return [index[str(v)] for v in raw], class_names
    except KeyError as err:
        raise ConfigError(f"data.label_column: label {err.args[0]!r} is not among {class_names}") from None


def _label_order(value: str) -> tuple[bool, int, str]:
    """Integer labels in numeric order first, then names alphabetically."""
    numeric = value.lstrip("-").isdigit()
    return (not numeric, int(value) if numeric else 0, value)


def _load_local(config: DataConfig, seed: int) -> LabelledData:
    texts, raw = read_local_examples(Path(config.source), config.text_column, config.label_column)
    labels, class_names = encode_labels(raw)
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    cut = max(1, int(len(order) * config.test_fraction))
    test_idx, train_idx = order[:cut], order[cut:]

    def pick(idx: list[int]) -> TextExamples:
        return TextExamples([texts[i] for i in idx], [labels[i] for i in idx])

    return LabelledData(class_names, pick(train_idx), pick(test_idx))


def _load_hf(config: DataConfig) -> LabelledData:
    """A Hugging Face hub data set (needs the network).

    `hf:NAME` or `hf:NAME/CONFIG`; a name with an owner is `hf:OWNER/NAME/CONFIG`, or
    `hf:OWNER/NAME/` when it has no config.
    """
    import datasets

    name, subset = _split_hf_source(config.source)
    try:
        loaded = datasets.load_dataset(name, subset)
    except Exception as err:  # the hub raises many types: report them all the same way
        raise ConfigError(f"data.source: cannot load {config.source!r}: {err}") from None
    splits = {"train_split": config.train_split, "test_split": config.test_split}
    for key, split in splits.items():
        if split not in loaded:
            raise ConfigError(f"data.{key}: no split {split!r} in {config.source} (has {list(loaded)})")
    train, test = loaded[config.train_split], loaded[config.test_split]
    for key in ("text_column", "label_column"):
        column = getattr(config, key)
        if column not in train.column_names:
            raise ConfigError(f"data.{key}: no column {column!r} in {config.source} (has {train.column_names})")
    feature = train.features[config.label_column]
    class_names = [str(n) for n in feature.names] if hasattr(feature, "names") else None
    if class_names is not None:  # a ClassLabel column: already 0..C-1
        train_labels, test_labels = list(train[config.label_column]), list(test[config.label_column])
    else:
        train_labels, class_names = encode_labels(list(train[config.label_column]))
        test_labels, _ = encode_labels(list(test[config.label_column]), class_names)
    return LabelledData(
        class_names,
        TextExamples(list(train[config.text_column]), train_labels),
        TextExamples(list(test[config.text_column]), test_labels),
    )


def load_node_examples(path: Path, config: DataConfig, class_names: Callable[[], list[str]]) -> TextExamples:
    """All the examples of a deployed node's own data set (node config `data-path`).

    A .csv / .jsonl file or a folder saved by `datasets` (`save_to_disk`; of a DatasetDict, the
    `data.train_split`), with the experiment's text and label columns. Integer labels are class
    indices 0..C-1; other labels are class names of the experiment's task (`class_names()`).
    """
    if path.is_dir():
        texts, raw = _read_saved_dataset(path, config)
    elif path.suffix in LOCAL_SUFFIXES:
        texts, raw = read_local_examples(path, config.text_column, config.label_column)
    elif not path.exists():
        raise ConfigError(f"node config data-path: {path} does not exist on this node")
    else:
        raise ConfigError(f"node config data-path: {path} is not a .csv / .jsonl file nor a saved Hugging Face data set folder")
    if not texts:
        raise ConfigError(f"node config data-path: {path} holds no examples")
    return TextExamples(texts, _node_labels(raw, class_names, path))


def _read_saved_dataset(path: Path, config: DataConfig) -> tuple[list[str], list[object]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"node config data-path: {path} is not a saved Hugging Face data set ({err})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if config.train_split in loaded:
            loaded = loaded[config.train_split]
        elif len(loaded) == 1:
            loaded = next(iter(loaded.values()))
        else:
            raise ConfigError(f"data.train_split: no split {config.train_split!r} in {path} (has {list(loaded)})")
    for key in ("text_column", "label_column"):
        column = getattr(config, key)
        if column not in loaded.column_names:
            raise ConfigError(f"data.{key}: no column {column!r} in {path} (has {loaded.column_names})")
    return [str(t) for t in loaded[config.text_column]], list(loaded[config.label_column])


def _node_labels(raw: list[object], class_names: Callable[[], list[str]], path: Path) -> list[int]:
    """Class indices: integers as they are, names looked up in the task's classes (read once)."""
    lookup: dict[str, int] | None = None
    labels: list[int] = []
    for value in raw:
        index = _label_index(value)
        if index is None:
            if lookup is None:
                lookup = {name: i for i, name in enumerate(class_names())}
            if str(value) not in lookup:
                raise ConfigError(
                    f"node config data-path: label {value!r} in {path} is not a class of the task ({', '.join(lookup)})"
                )
            index = lookup[str(value)]
        if index < 0:
            raise ConfigError(f"node config data-path: label {value!r} in {path}: use class indices 0..C-1 or class names")
        labels.append(index)
    return labels


def _label_index(value: object) -> int | None:
    """An integer label (also written as text, as CSV has it), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    text = str(value).strip()
    return int(text) if text.lstrip("-").isdigit() else None


def _split_hf_source(source: str) -> tuple[str, str | None]:
    parts = source[len(HF_PREFIX) :].split("/")
    if len(parts) == 3:
        return f"{parts[0]}/{parts[1]}", parts[2] or None
    if len(parts) == 2:
        return parts[0], parts[1] or None
    return parts[0], None
