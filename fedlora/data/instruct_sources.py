"""Where instruction examples come from: the built-in instruction task, a hub data set, or local data.

The same sources as classification data (`data.source`: "builtin", "hf:OWNER/NAME", a local
.csv / .jsonl / .json / .parquet file or a save_to_disk folder, read by fedlora/data/files.py and
hub.py), with instruction columns instead of text and label:
- Alpaca-style rows: `data.instruction_column`, `data.input_column` (optional: a missing column
  or an empty or null cell is no input) and `data.output_column`;
- chat rows: `data.messages_column`, a list of {"role": ..., "content": ...} whose last message
  is the assistant's answer, after at least one other turn.
`data.format = "auto"` reads chat rows where the messages column exists, Alpaca rows otherwise.
Every row is checked on the way; a mistake is a ConfigError naming the file or split and the row.

Partitions are today's (fedlora/data/partition.py): IID, or Dirichlet / pathological over the
categories of `data.category_column` (the built-in task's categories are its topics).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedlora.config import BUILTIN_SOURCE, ConfigError, DataConfig
from fedlora.data.builtin import TextExamples
from fedlora.data.files import read_table, row_places
from fedlora.data.hub import load_hub_dataset
from fedlora.data.instruct import ASSISTANT, InstructionExample, InstructionSet
from fedlora.data.instruct_task import generate_instruction_task
from fedlora.data.partition import partition_examples
from fedlora.data.sources import NODE_KEY, SOURCE_KEY, is_dataset_dict, node_table, split_names, split_places

if TYPE_CHECKING:
    import datasets

Place = Callable[[int], str]


@dataclass(frozen=True)
class InstructionData:
    """Train and held-out instruction examples, and the names of the train examples' categories."""

    category_names: list[str]
    train: InstructionSet
    test: InstructionSet


def load_instruction_data(config: DataConfig, seed: int) -> InstructionData:
    """Load and check the configured instruction source; the held-out split is capped at `max_test_examples`."""
    if config.source == BUILTIN_SOURCE:
        task = generate_instruction_task(seed, config.num_train, config.num_test)
        data = InstructionData(task.category_names, task.train, task.test)
    else:
        data = _loaded(config, seed)
    if not len(data.test):
        raise ConfigError(f"{SOURCE_KEY}: {config.source}: the test split holds no examples")
    return InstructionData(
        data.category_names, data.train, data.test.subset(list(range(min(len(data.test), config.max_test_examples))))
    )


def partition_instructions(data: InstructionSet, config: DataConfig, num_clients: int, seed: int) -> list[InstructionSet]:
    """Every client's share of the examples, split as classification data is (by category)."""
    # partition_examples splits (text, label) pairs: give it each example's index as its text.
    indexed = TextExamples([str(i) for i in range(len(data))], data.categories)
    return [data.subset([int(text) for text in part.texts]) for part in partition_examples(indexed, config, num_clients, seed)]


def check_partition_categories(config: DataConfig) -> None:
    """Refuse a non-IID partition of instruction data without categories to split by."""
    if config.partition != "iid" and config.source != BUILTIN_SOURCE and config.category_column is None:
        raise ConfigError(
            f"data.partition: {config.partition!r} splits instruction data by category; set data.category_column to a "
            f"column of {config.source}, or data.partition = 'iid'"
        )


def load_node_instructions(path: Path, config: DataConfig) -> InstructionSet:
    """All the instruction examples of a deployed node's own data set (node config `data-path`)."""
    table, place = node_table(path, config)
    examples = _examples(table, config, place, str(path), NODE_KEY)
    if not examples:
        raise ConfigError(f"{NODE_KEY}: {path} holds no examples")
    return InstructionSet(examples, [0] * len(examples))  # a node's categories do not matter: it is one client


# --- reading tables -----------------------------------------------------------------------
def _loaded(config: DataConfig, seed: int) -> InstructionData:
    if config.hf_dataset_id:
        loaded, name = load_hub_dataset(config), config.source
    else:
        path = Path(config.source)
        loaded, name = read_table(path, SOURCE_KEY), str(path)
        if not is_dataset_dict(loaded):  # one file: all train, the held-out split carved
            return _carved(loaded, config, row_places(path), name, seed)
    train_split, test_split = split_names(loaded, config, name)
    if test_split is None:
        return _carved(loaded[train_split], config, split_places(name, train_split), name, seed)
    names, train = _categorized(loaded[train_split], config, split_places(name, train_split), f"{name} split {train_split!r}")
    test = _examples(loaded[test_split], config, split_places(name, test_split), f"{name} split {test_split!r}", SOURCE_KEY)
    return InstructionData(names, train, InstructionSet(test, [0] * len(test)))  # held-out categories are not used


def _carved(table: datasets.Dataset, config: DataConfig, place: Place, name: str, seed: int) -> InstructionData:
    """A seeded `test_fraction` of the rows as the held-out split, the rest as train."""
    names, examples = _categorized(table, config, place, name)
    if len(examples) < 2:
        raise ConfigError(f"{SOURCE_KEY}: {name} holds {len(examples)} example(s); train and test need more")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    cut = max(1, int(len(order) * config.test_fraction))
    return InstructionData(names, examples.subset(order[cut:]), examples.subset(order[:cut]))


def _categorized(table: datasets.Dataset, config: DataConfig, place: Place, name: str) -> tuple[list[str], InstructionSet]:
    """The table's checked examples with their categories (all 0 without data.category_column), and the category names."""
    examples = _examples(table, config, place, name, SOURCE_KEY)
    if config.category_column is None:
        return [], InstructionSet(examples, [0] * len(examples))
    if config.category_column not in table.column_names:
        raise ConfigError(
            f"data.category_column: {config.category_column!r} is not a column of {name} (columns: {', '.join(table.column_names)})"
        )
    values = [_category(value, place, row) for row, value in enumerate(table[config.category_column])]
    names = sorted(set(values))
    index = {value: i for i, value in enumerate(names)}
    return names, InstructionSet(examples, [index[v] for v in values])


def _category(value: object, place: Place, row: int) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)) or (isinstance(value, str) and not value.strip()):
        raise ConfigError(f"{SOURCE_KEY}: {place(row)}: the category {value!r} is not a name or a number; fill it in")
    return str(value)


def _examples(table: datasets.Dataset, config: DataConfig, place: Place, name: str, who: str) -> list[InstructionExample]:
    columns = table.column_names
    chat = config.format == "chat" or (config.format == "auto" and config.messages_column in columns)
    needed = [config.messages_column] if chat else [config.instruction_column, config.output_column]
    missing = [column for column in needed if column not in columns]
    if missing:
        kind = "chat (data.messages_column)" if chat else "Alpaca (data.instruction_column, data.output_column)"
        raise ConfigError(
            f"{who}: {name} has no column {missing[0]!r} for {kind} rows (columns: {', '.join(columns)}); "
            "name the columns in [data] or set data.format"
        )
    if chat:
        return [_chat_example(messages, place, row, who) for row, messages in enumerate(table[config.messages_column])]
    inputs = table[config.input_column] if config.input_column in columns else [None] * len(table)
    rows = zip(table[config.instruction_column], inputs, table[config.output_column], strict=True)
    return [_alpaca_example(row, values, config, place, who) for row, values in enumerate(rows)]


def _alpaca_example(
    row: int, values: tuple[object, object, object], config: DataConfig, place: Place, who: str
) -> InstructionExample:
    instruction, given_input, output = values
    _require_text(instruction, config.instruction_column, place, row, who)
    _require_text(output, config.output_column, place, row, who)
    if given_input is not None and not isinstance(given_input, str):
        raise ConfigError(f"{who}: {place(row)}: {config.input_column!r} is {given_input!r}; an input is text (or empty)")
    return InstructionExample(response=str(output), instruction=str(instruction), input=given_input or "")


def _chat_example(messages: object, place: Place, row: int, who: str) -> InstructionExample:
    if not isinstance(messages, list) or len(messages) < 2:
        raise ConfigError(
            f"{who}: {place(row)}: the messages must be a list of at least two {{role, content}} turns, the last the assistant's"
        )
    turns = []
    for number, message in enumerate(messages, start=1):
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(role, str) or not role or not isinstance(content, str):
            raise ConfigError(
                f"{who}: {place(row)}: message {number} is not a {{role, content}} pair of strings ({message!r:.60})"
            )
        turns.append((role, content))
    if turns[-1][0] != ASSISTANT or not turns[-1][1].strip():
        raise ConfigError(f"{who}: {place(row)}: the last message must be the assistant's answer (role 'assistant', not empty)")
    return InstructionExample(response=turns[-1][1], messages=tuple(turns[:-1]))


def _require_text(value: object, column: str, place: Place, row: int, who: str) -> None:
    if not isinstance(value, str) or not value.strip():
        shown = "missing" if value is None else ("empty" if isinstance(value, str) else f"{value!r}, not text")
        raise ConfigError(f"{who}: {place(row)}: {column!r} is {shown}; every example needs it")
