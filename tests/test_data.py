"""Data sources and partitioning into clients."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from fedlora.config import ConfigError, DataConfig
from fedlora.data.builtin import TextExamples
from fedlora.data.partition import partition_examples
from fedlora.data.sources import load_data

pytestmark = pytest.mark.usefixtures("datasets_cache")

EXAMPLES = TextExamples(
    texts=[f"example {i}" for i in range(400)],
    labels=[i % 4 for i in range(400)],
)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "pathological"])
def test_partitions_cover_every_example_once_and_are_seeded(scheme: str) -> None:
    config = DataConfig(partition=scheme, dirichlet_alpha=0.3, classes_per_client=2)
    parts = partition_examples(EXAMPLES, config, num_clients=5, seed=1)
    texts = [t for p in parts for t in p.texts]
    assert len(set(texts)) == len(texts)  # nobody shares an example
    if scheme != "pathological":  # pathological may leave classes nobody drew unassigned
        assert sorted(texts) == sorted(EXAMPLES.texts)
    again = partition_examples(EXAMPLES, config, num_clients=5, seed=1)
    assert [p.texts for p in parts] == [p.texts for p in again]
    other = partition_examples(EXAMPLES, config, num_clients=5, seed=2)
    assert [p.texts for p in parts] != [p.texts for p in other]


def test_pathological_gives_each_client_at_most_k_classes() -> None:
    parts = partition_examples(EXAMPLES, DataConfig(partition="pathological", classes_per_client=2), 4, seed=0)
    assert all(1 <= len(set(p.labels)) <= 2 for p in parts)


def test_dirichlet_with_small_alpha_skews_labels_more_than_iid() -> None:
    def skew(scheme: str) -> float:
        parts = partition_examples(EXAMPLES, DataConfig(partition=scheme, dirichlet_alpha=0.1), 5, seed=0)
        return sum(max(Counter(p.labels).values()) / len(p.labels) for p in parts) / len(parts)

    assert skew("dirichlet") > skew("iid") + 0.2


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_local_files_load_with_named_columns(tmp_path: Path, suffix: str) -> None:
    rows = [{"sentence": f"text {i}", "topic": ["sport", "food"][i % 2]} for i in range(50)]
    path = tmp_path / f"data{suffix}"
    if suffix == ".csv":
        path.write_text("sentence,topic\n" + "".join(f"{r['sentence']},{r['topic']}\n" for r in rows))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_data(DataConfig(source=str(path), text_column="sentence", label_column="topic", test_fraction=0.2), seed=0)
    assert data.class_names == ["food", "sport"]
    assert len(data.test.texts) == 10 and len(data.train.texts) == 40
    assert set(data.train.texts) | set(data.test.texts) == {r["sentence"] for r in rows}


def test_a_missing_column_is_a_config_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"text": "a", "y": 1}) + "\n")
    with pytest.raises(ConfigError, match="data.label_column: 'label'"):
        load_data(DataConfig(source=str(path)), seed=0)


def test_an_unknown_source_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.source: file not found"):
        load_data(DataConfig(source=str(tmp_path / "somewhere.parquet")), seed=0)
    (tmp_path / "table.xlsx").write_bytes(b"PK")
    with pytest.raises(ConfigError, match="data.source: .*table.xlsx is not a .csv / .jsonl / .json / .parquet file"):
        load_data(DataConfig(source=str(tmp_path / "table.xlsx")), seed=0)
