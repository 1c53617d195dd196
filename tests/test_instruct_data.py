"""Instruction data from local files: Alpaca and chat rows, checks that name the row, category partitions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedlora import workspace
from fedlora.config import ConfigError
from fedlora.data.instruct_sources import load_instruction_data
from fedlora.simulation import check_runnable
from tests.conftest import causal_config

pytestmark = pytest.mark.usefixtures("datasets_cache")
TOPICS = ("sports", "politics", "food")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def alpaca_rows(count: int) -> list[dict]:
    return [
        {
            "instruction": "What is the topic of this text?",
            "input": f"a story about {t} number {i}" if i % 2 else "",
            "output": t,
            "topic": t,
        }
        for i in range(count)
        for t in [TOPICS[i % 3]]
    ]


def chat_rows(count: int) -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": f"say hello {i}"}, {"role": "assistant", "content": "hello"}]}
        for i in range(count)
    ]


def test_alpaca_rows_load_with_their_categories_and_a_seeded_held_out_carve(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "alpaca.jsonl", alpaca_rows(60))
    config = causal_config(f"data.source={str(source)!r}", "data.category_column='topic'", "data.partition='dirichlet'")
    data = load_instruction_data(config.data, config.seed)
    assert data.category_names == sorted(TOPICS)
    assert len(data.train) + len(data.test) == 60 and len(data.test) == 12  # test_fraction 0.2
    example = data.train.examples[0]
    assert not example.is_chat and example.instruction == "What is the topic of this text?"
    assert all(data.category_names[c] == e.response for e, c in zip(data.train.examples, data.train.categories))
    assert load_instruction_data(config.data, config.seed) == data
    # The clients' shares: every example once, by Dirichlet over the topics.
    task = workspace.federated_task(config)
    shares = [e for part in task.partitions for e in part.examples]
    assert sorted(map(repr, shares)) == sorted(map(repr, data.train.examples))


def test_chat_rows_are_found_by_their_messages_column(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "chat.jsonl", chat_rows(20))
    config = causal_config(f"data.source={str(source)!r}")
    data = load_instruction_data(config.data, config.seed)
    example = data.train.examples[0]
    assert example.is_chat and example.response == "hello" and example.messages[0][0] == "user"
    encoded = workspace.client_examples(config, 0)
    assert len(encoded) == len(workspace.federated_task(config).partitions[0])


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"instruction": "x", "output": "y"}, {"instruction": "", "output": "y"}], r"line 2: 'instruction' is empty"),
        ([{"instruction": "x", "output": "y"}, {"instruction": "x", "output": None}], r"line 2: 'output' is missing"),
        ([{"instruction": "x", "answer": "y"}] * 3, r"has no column 'output' for Alpaca"),
        (
            [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]
            + [{"messages": [{"role": "assistant", "content": "b"}, {"role": "user", "content": "a"}]}],
            r"line 2: the last message must be the assistant's answer",
        ),
        (
            [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}] + [{"messages": []}],
            r"line 2: the messages must be a list of at least two",
        ),
    ],
    ids=["empty-instruction", "null-output", "no-output-column", "last-not-assistant", "empty-messages"],
)
def test_a_bad_row_is_refused_in_one_line_naming_it(tmp_path: Path, rows: list[dict], message: str) -> None:
    source = write_jsonl(tmp_path / "bad.jsonl", rows + [rows[0]] * 8)
    config = causal_config(f"data.source={str(source)!r}")
    with pytest.raises(ConfigError, match=message) as raised:
        load_instruction_data(config.data, config.seed)
    assert "\n" not in str(raised.value) and str(source) in str(raised.value)


def test_a_non_iid_partition_without_categories_is_refused_before_anything_runs(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "alpaca.jsonl", alpaca_rows(30))
    config = causal_config(f"data.source={str(source)!r}", "data.partition='dirichlet'")
    with pytest.raises(
        ConfigError, match="data.partition: 'dirichlet' splits instruction data by category; set data.category_column"
    ):
        check_runnable(config)
    with pytest.raises(ConfigError, match="data.category_column: 'genre' is not a column"):
        check_runnable(
            causal_config(f"data.source={str(source)!r}", "data.partition='dirichlet'", "data.category_column='genre'")
        )


def test_a_deployed_node_reads_its_own_instruction_file(tmp_path: Path) -> None:
    from fedlora.data.instruct_sources import load_node_instructions

    source = write_jsonl(tmp_path / "node.jsonl", chat_rows(5))
    config = causal_config()
    examples = load_node_instructions(source, config.data)
    assert len(examples) == 5 and all(e.is_chat and e.response == "hello" for e in examples.examples)
    with pytest.raises(ConfigError, match="node config data-path: .* does not exist"):
        load_node_instructions(tmp_path / "missing.jsonl", config.data)
