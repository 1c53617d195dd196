"""Data that would train on nonsense is refused before the simulation engine starts, in one line
naming the file, the line and the value (issue 14's data cases, each by name)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedlora import simulation
from fedlora.config import ConfigError, DataConfig
from fedlora.data.builtin import TextExamples
from fedlora.data.partition import partition_examples
from fedlora.data.sources import load_data
from tests.conftest import one_line_refusal

pytestmark = pytest.mark.usefixtures("datasets_cache")

TINY_TOML = """
[model]
name = "tiny"
max_length = 16
lora_rank = 2
[data]
source = "{source}"
partition = "{partition}"
[federation]
num_clients = {clients}
clients_per_round = 2
rounds = 1
local_steps = 1
"""


def three_class_csv(path: Path, labels: list[str] | None = None) -> Path:
    labels = labels if labels is not None else [["sport", "food", "art"][i % 3] for i in range(30)]
    path.write_text("text,label\n" + "".join(f"example {i},{label}\n" for i, label in enumerate(labels)))
    return path


@pytest.fixture
def no_simulation(monkeypatch: pytest.MonkeyPatch) -> None:
    """A test of a refusal fails loudly, instead of starting Ray, if nothing refuses."""

    def started(**_: object) -> None:
        raise AssertionError("the simulation engine started: nothing refused the input")

    monkeypatch.setattr(simulation, "run_simulation", started)


def simulate_one_line(tmp_path: Path, source: str, partition: str = "iid", clients: int = 2) -> str:
    """`fedlora simulate` on a tiny config reading `source` (relative to the config): exit 2, one line."""
    config = tmp_path / "experiment.toml"
    config.write_text(TINY_TOML.format(source=source, partition=partition, clients=clients))
    return one_line_refusal("simulate", str(config))


@pytest.mark.usefixtures("no_simulation")
@pytest.mark.parametrize(
    ("bad", "shown"),
    [("", "the cell is empty"), ("None", "the value is 'None'"), ("nan", "the value is 'nan'"), ("NaN", "the value is 'NaN'")],
)
def test_an_empty_or_none_or_nan_label_cell_is_refused_naming_the_line(tmp_path: Path, bad: str, shown: str) -> None:
    labels = [["sport", "food", "art"][i % 3] for i in range(30)]
    labels[6] = bad
    three_class_csv(tmp_path / "data.csv", labels)
    line = simulate_one_line(tmp_path, "data.csv")
    assert f"{tmp_path / 'data.csv'} line 8 has no label ({shown})" in line and "data.drop_missing_labels" in line


def test_missing_labels_are_dropped_when_asked_and_no_class_is_invented(tmp_path: Path) -> None:
    labels = [["sport", "food", "art"][i % 3] for i in range(30)]
    labels[3], labels[4], labels[5] = "", "None", "nan"
    path = three_class_csv(tmp_path / "data.csv", labels)
    data = load_data(DataConfig(source=str(path), drop_missing_labels=True), seed=0)
    assert data.class_names == ["art", "food", "sport"]  # 3 classes, not 4 or 6
    assert len(data.train.texts) + len(data.test.texts) == 27
    assert not {"example 3", "example 4", "example 5"} & set(data.train.texts + data.test.texts)


@pytest.mark.usefixtures("no_simulation")
def test_a_mix_of_names_and_numbers_is_refused_naming_both(tmp_path: Path) -> None:
    labels = [["sport", "food", "art"][i % 3] for i in range(30)]
    labels[9] = "2"
    three_class_csv(tmp_path / "data.csv", labels)
    line = simulate_one_line(tmp_path, "data.csv")
    assert "labels mix class numbers (2 at" in line and "line 11" in line and "('sport' at" in line


@pytest.mark.usefixtures("no_simulation")
def test_a_file_with_one_class_is_refused(tmp_path: Path) -> None:
    three_class_csv(tmp_path / "data.csv", ["sport"] * 30)
    line = simulate_one_line(tmp_path, "data.csv")
    assert "every train example of" in line and "the label 'sport'" in line and "at least 2 classes" in line


@pytest.mark.usefixtures("no_simulation")
def test_dirichlet_that_cannot_give_every_client_examples_is_refused_with_what_to_change(tmp_path: Path) -> None:
    three_class_csv(tmp_path / "small.csv", [["a", "b", "c"][i % 3] for i in range(12)])
    line = simulate_one_line(tmp_path, "small.csv", partition="dirichlet", clients=9)
    assert "data.partition: dirichlet cannot split 10 train examples among 9 clients" in line
    assert "raise data.dirichlet_alpha" in line and "fewer federation.num_clients" in line and "'iid'" in line


def test_dirichlet_on_a_small_file_that_can_be_split_gives_every_client_examples(tmp_path: Path) -> None:
    path = three_class_csv(tmp_path / "small.csv")
    data = load_data(DataConfig(source=str(path)), seed=0)
    parts = partition_examples(data.train, DataConfig(partition="dirichlet", dirichlet_alpha=0.5), 8, seed=0)
    assert all(part.labels for part in parts) and sum(len(p.labels) for p in parts) == len(data.train.labels)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    size=st.integers(2, 40),
    num_clients=st.integers(1, 12),
    num_classes=st.integers(2, 4),
    scheme=st.sampled_from(["iid", "dirichlet", "pathological"]),
    alpha=st.sampled_from([0.05, 0.5, 5.0]),
    seed=st.integers(0, 3),
)
def test_every_client_gets_examples_or_the_split_is_refused_in_one_line(
    size: int, num_clients: int, num_classes: int, scheme: str, alpha: float, seed: int
) -> None:
    examples = TextExamples([f"t{i}" for i in range(size)], [i % num_classes for i in range(size)])
    config = DataConfig(partition=scheme, dirichlet_alpha=alpha, classes_per_client=1)
    try:
        parts = partition_examples(examples, config, num_clients, seed)
    except ConfigError as refused:
        message = str(refused)
        assert "\n" not in message and ("federation.num_clients" in message or "data.partition" in message)
        return
    assert len(parts) == num_clients and all(part.labels for part in parts)


@pytest.mark.usefixtures("no_simulation")
@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("data.jsonl", '{"text": "a", "label": "x"}\n{"text": "b"}\n', "data.jsonl line 2 has no label"),
        ("data.jsonl", '{"text": "a", "label": "x"}\n\n["b", "y"]\n', "data.jsonl: line 3 is a list, not an object"),
        ("data.jsonl", '{"text": "a", "label": "x"}\n17\n', "line 2 is a number, not an object"),
        ("data.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": \n', "line 2 is not valid JSON"),
        ("data.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": "y"}\n\n', "line 2: 'label' is a string but a number"),
        (
            "data.jsonl",
            '{"text": 5, "label": "x"}\n{"text": "b", "label": "y"}\n',
            "line 2: 'text' is a string but a number in line 1",
        ),
        ("data.json", '{"rows": [{"text": "a", "label": "x"}]}', "data.text_column: 'text' is not a column"),
        ("data.csv", "text,label\na,x\nb,y,z\n", "data.csv: line 3 has 3 cells but the header has 2"),
        ("data.csv", "", "data.csv is empty; a CSV data set starts with a header"),
        ("data.csv", "text,label\n", "data.csv holds no examples"),
        ("data.csv", "words,label\na,x\nb,y\n", "data.text_column: 'text' is not a column"),
        ("data.parquet", "not parquet at all", "cannot read it as parquet"),
        ("data.xlsx", "text,label\n", "is not a .csv / .jsonl / .json / .parquet file"),
    ],
)
def test_a_malformed_file_is_refused_in_one_line_naming_the_line(tmp_path: Path, name: str, content: str, expected: str) -> None:
    (tmp_path / name).write_text(content)
    assert expected in simulate_one_line(tmp_path, name)


@pytest.mark.usefixtures("no_simulation")
@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("text,label\ncafé,food\nthé,drink\n".encode("latin-1"), "byte 0xe9 at offset 14 (line 2)"),
        ("text,label\nhello,a\n".encode("utf-16"), "byte 0xff at offset 0 (line 1)"),
        (bytes(range(256)) * 4, "byte 0x80 at offset 128 (line 2)"),
    ],
    ids=["latin-1", "utf-16", "binary"],
)
def test_a_file_that_is_not_utf8_is_refused_naming_the_byte(tmp_path: Path, content: bytes, expected: str) -> None:
    for suffix in (".csv", ".jsonl"):
        (tmp_path / f"data{suffix}").write_bytes(content)
        line = simulate_one_line(tmp_path, f"data{suffix}")
        assert f"data{suffix} is not UTF-8 text: {expected}" in line and "save it as UTF-8" in line


def test_a_separate_test_split_with_a_class_the_train_split_lacks_names_its_row(tmp_path: Path) -> None:
    import datasets

    train = datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": ["x", "y", "x"]})
    test = datasets.Dataset.from_dict({"text": ["d", "e"], "label": ["y", "z"]})
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ConfigError, match=r"split 'test' row 2: label 'z' is not among the classes x, y"):
        load_data(DataConfig(source=str(tmp_path / "saved")), seed=0)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ([1, 2.5, 1], "the label 2.5 is a fraction"),
        ([True, False, True], "the label True is a boolean"),
        ([1, [2], 1], "line 2: 'label' is a list but a number in line 1"),
    ],
)
def test_a_label_that_is_neither_a_name_nor_a_number_is_refused(tmp_path: Path, labels: list, message: str) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"text": f"t{i}", "label": label}) + "\n" for i, label in enumerate(labels)))
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_data(DataConfig(source=str(path)), seed=0)
