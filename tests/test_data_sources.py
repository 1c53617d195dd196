"""Data sources the Hugging Face way: local CSV / JSON Lines / JSON / parquet and saved folders
through `datasets`, hub ids with a slash, a seeded test carve, and the offline hub refused fast."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import datasets
import pytest

from fedlora.config import ConfigError, DataConfig, config_from_dict
from fedlora.data import hub
from fedlora.data.sources import load_data, load_node_examples

pytestmark = pytest.mark.usefixtures("datasets_cache")

ROWS = [{"sentence": f"text number {i}", "topic": ["sport", "food", "art"][i % 3]} for i in range(60)]


def write_rows(path: Path, rows: list[dict]) -> Path:
    """`rows` in the format the suffix of `path` names."""
    if path.suffix == ".csv":
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".json", ".parquet"])
def test_every_local_format_loads_the_same_task(tmp_path: Path, suffix: str) -> None:
    path = write_rows(tmp_path / f"data{suffix}", ROWS)
    data = load_data(DataConfig(source=str(path), text_column="sentence", label_column="topic", test_fraction=0.25), seed=3)
    assert data.class_names == ["art", "food", "sport"]
    assert len(data.test.texts) == 15 and len(data.train.texts) == 45
    by_text = {row["sentence"]: row["topic"] for row in ROWS}
    for split in (data.train, data.test):
        assert all(data.class_names[label] == by_text[text] for text, label in zip(split.texts, split.labels))
    assert set(data.train.texts) | set(data.test.texts) == set(by_text)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_file_with_a_byte_order_mark_loads_as_without(tmp_path: Path, suffix: str) -> None:
    plain = write_rows(tmp_path / f"plain{suffix}", ROWS)
    marked = tmp_path / f"marked{suffix}"
    marked.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())  # as Excel saves "CSV UTF-8"
    config = {"text_column": "sentence", "label_column": "topic"}
    assert load_data(DataConfig(source=str(marked), **config), seed=0) == load_data(
        DataConfig(source=str(plain), **config), seed=0
    )


def test_the_test_carve_is_seeded(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "data.jsonl", ROWS)
    config = DataConfig(source=str(path), text_column="sentence", label_column="topic")
    assert load_data(config, seed=1).test.texts == load_data(config, seed=1).test.texts
    assert load_data(config, seed=1).test.texts != load_data(config, seed=2).test.texts


def test_integer_labels_keep_their_order_and_class_label_columns_their_names(tmp_path: Path) -> None:
    numbered = write_rows(tmp_path / "numbered.parquet", [{"text": f"t{i}", "label": [10, 2, 7][i % 3]} for i in range(30)])
    assert load_data(DataConfig(source=str(numbered)), seed=0).class_names == ["2", "7", "10"]
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    table = datasets.Dataset.from_dict(
        {"text": [f"t{i}" for i in range(20)], "label": [i % 2 for i in range(20)]}, features=features
    )
    table.to_parquet(str(tmp_path / "named.parquet"))
    data = load_data(DataConfig(source=str(tmp_path / "named.parquet")), seed=0)
    assert data.class_names == ["neg", "pos"]  # ClassLabel's order, not alphabetical of something else
    assert sorted(set(data.train.labels)) == [0, 1]


def test_a_saved_dataset_dict_uses_its_splits_and_a_missing_test_split_is_carved(tmp_path: Path) -> None:
    def split(start: int, size: int) -> datasets.Dataset:
        return datasets.Dataset.from_dict(
            {"text": [f"t{i}" for i in range(start, start + size)], "label": [i % 2 for i in range(size)]}
        )

    datasets.DatasetDict({"train": split(0, 40), "test": split(100, 10)}).save_to_disk(str(tmp_path / "both"))
    data = load_data(DataConfig(source=str(tmp_path / "both")), seed=0)
    assert len(data.train.texts) == 40 and data.test.texts == [f"t{i}" for i in range(100, 110)]
    datasets.DatasetDict({"train": split(0, 40)}).save_to_disk(str(tmp_path / "train-only"))
    data = load_data(DataConfig(source=str(tmp_path / "train-only"), test_fraction=0.25), seed=0)
    assert len(data.train.texts) == 30 and len(data.test.texts) == 10
    with pytest.raises(ConfigError, match="data.test_split: no split 'validation'.*leave data.test_split unset"):
        load_data(DataConfig(source=str(tmp_path / "train-only"), test_split="validation"), seed=0)


@pytest.mark.parametrize(
    ("source", "dataset_id"),
    [("hf:fancyzhx/ag_news", "fancyzhx/ag_news"), ("hf:imdb", "imdb"), ("hf:nyu-mll/glue", "nyu-mll/glue")],
)
def test_a_hub_id_is_the_whole_name_after_hf(source: str, dataset_id: str) -> None:
    assert DataConfig(source=source).hf_dataset_id == dataset_id
    assert DataConfig(source=source, hf_config="sst2").hf_config == "sst2"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.source='hf:nyu-mll/glue/sst2'", "hf:NAME or hf:OWNER/NAME; put its config (subset) in data.hf_config"),
        ("data.source='hf:'", "hf:NAME or hf:OWNER/NAME"),
        ("data.source='hf:a b'", "hf:NAME or hf:OWNER/NAME"),
        ("data.hf_config='sst2'", "hf_config ('sst2') is for hub sources"),
    ],
)
def test_a_malformed_hub_source_is_refused_by_the_config(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_from_dict({}, [override])


def fake_hub(monkeypatch: pytest.MonkeyPatch, splits: dict[str, int]) -> list[tuple]:
    """The hub answers with a DatasetDict of these split sizes (ClassLabel labels); the calls are recorded."""
    calls: list[tuple] = []
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["a", "b", "c"])})

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return datasets.DatasetDict(
            {
                name: datasets.Dataset.from_dict(
                    {"text": [f"{name} {i}" for i in range(size)], "label": [i % 3 for i in range(size)]}, features=features
                )
                for name, size in splits.items()
            }
        )

    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=hub.PROBE_SECONDS: True)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_a_hub_data_set_is_loaded_by_its_id_and_config_with_its_test_split(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_hub(monkeypatch, {"train": 30, "test": 9})
    data = load_data(DataConfig(source="hf:nyu-mll/glue", hf_config="sst2"), seed=0)
    assert calls == [(("nyu-mll/glue", "sst2"), {})]
    assert data.class_names == ["a", "b", "c"] and len(data.train.texts) == 30 and len(data.test.texts) == 9


def test_a_hub_data_set_without_a_test_split_gets_a_seeded_carve(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_hub(monkeypatch, {"train": 40, "validation": 5})
    data = load_data(DataConfig(source="hf:owner/name", test_fraction=0.25), seed=0)
    assert len(data.train.texts) == 30 and len(data.test.texts) == 10
    assert all(text.startswith("train") for text in data.test.texts)
    data = load_data(DataConfig(source="hf:owner/name", test_split="validation"), seed=0)
    assert len(data.train.texts) == 40 and len(data.test.texts) == 5


def unreachable_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub's endpoint is a closed local port and no proxy is set, whatever this machine has."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    for proxy in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)


def test_an_unreachable_hub_is_refused_at_once_naming_the_id(monkeypatch: pytest.MonkeyPatch) -> None:
    unreachable_hub(monkeypatch)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    start = time.monotonic()
    with pytest.raises(ConfigError) as refused:
        load_data(DataConfig(source="hf:fancyzhx/ag_news"), seed=0)
    assert time.monotonic() - start < hub.PROBE_SECONDS + 1
    message = str(refused.value)
    assert "hf:fancyzhx/ag_news needs the network" in message and "HF_HUB_OFFLINE=1" in message and "local copy" in message


def test_offline_mode_without_a_cached_copy_is_refused_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    unreachable_hub(monkeypatch)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(ConfigError, match="hf:fancyzhx/ag_news .*is not in the local Hugging Face cache"):
        load_data(DataConfig(source="hf:fancyzhx/ag_news", hf_config="default"), seed=0)
    assert time.monotonic() - start < 5


def test_the_probe_answers_within_its_timeout() -> None:
    start = time.monotonic()
    hub.hub_reachable(timeout=0.5)
    assert time.monotonic() - start < 1.5


@pytest.mark.parametrize("suffix", [".json", ".parquet"])
def test_a_node_reads_the_new_formats_too(tmp_path: Path, suffix: str) -> None:
    rows = [{"text": f"t{i}", "label": ["sports", "politics"][i % 2]} for i in range(6)]
    path = write_rows(tmp_path / f"own{suffix}", rows)
    examples = load_node_examples(path, DataConfig(), lambda: ["sports", "politics", "arts"])
    assert examples.texts == [row["text"] for row in rows] and examples.labels == [0, 1, 0, 1, 0, 1]


@pytest.mark.e2e
@pytest.mark.usefixtures("one_ray")
def test_a_federation_trains_on_a_parquet_file_named_relative_to_its_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedlora.config import load_config
    from fedlora.results import read_history, read_summary
    from fedlora.simulation import simulate
    from tests.conftest import TINY

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))  # for the Ray workers, which read it too
    rows = [
        {"text": f"{['goal', 'vote', 'chip'][i % 3]} report {i}", "label": ["sport", "politics", "tech"][i % 3]}
        for i in range(90)
    ]
    (tmp_path / "data").mkdir()
    write_rows(tmp_path / "data" / "news.parquet", rows)
    federation = "".join(f"{key} = {value}\n" for key, value in TINY["federation"].items())
    model = "".join(f"{key} = {json.dumps(value)}\n" for key, value in TINY["model"].items())
    config_file = tmp_path / "experiments" / "news.toml"
    config_file.parent.mkdir()
    config_file.write_text(
        f'seed = 7\n[model]\n{model}[data]\nsource = "../data/news.parquet"\npartition = "iid"\n[federation]\n{federation}'
    )
    config = load_config(config_file)
    run_dir = tmp_path / "run"
    simulate(config, run_dir)
    assert read_summary(run_dir)["status"] == "finished"
    history = read_history(run_dir)
    assert [line["round"] for line in history] == [0, 1, 2] and all(not line["rejected"] for line in history)
    assert json.loads((run_dir / "config.json").read_text())["data"]["source"] == str(tmp_path / "data" / "news.parquet")


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_json_nested_too_deeply_for_any_parser_is_one_line(tmp_path: Path, suffix: str) -> None:
    """Python's parser reads a JSON file before pyarrow's (which has crashed the process on a
    random one): nesting past Python's recursion limit is a refusal naming the file, not a crash."""
    from fedlora.data.files import read_table

    path = tmp_path / f"deep{suffix}"
    path.write_text('[{"text": ' + "[" * 100_000 + "\n")
    with pytest.raises(ConfigError) as refused:
        read_table(path, "data.source")
    assert str(refused.value).startswith(f"data.source: {path}: ") and "nested too deeply" in str(refused.value)
