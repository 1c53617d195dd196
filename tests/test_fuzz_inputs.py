"""Fuzz: bad config values and bad data files through the real `fedlora simulate`.

For every generated input, which is invalid by construction, the CLI must exit with code 2 and
print exactly one non-empty line, without a traceback, before the simulation engine starts
(`run_simulation` is replaced by a function that fails the test). The config values come from
the config models themselves, so a key added later is fuzzed too. Output is captured at the file
descriptors, so a line printed by a library's own handler counts as well.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import shutil
import sys
import tempfile
import typing
from pathlib import Path
from typing import Any
from unittest import mock

import annotated_types
import datasets
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from fedlora import cli, simulation
from fedlora.config import ExperimentConfig
from tests.test_cli import QUICKSTART

pytestmark = pytest.mark.usefixtures("datasets_cache")

# 100 examples a test keep the suite within about a minute on 2 shared cores;
# FEDLORA_FUZZ_EXAMPLES=1000 digs deeper.
FUZZ = settings(
    max_examples=int(os.environ.get("FEDLORA_FUZZ_EXAMPLES", "100")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture
def no_simulation(monkeypatch: pytest.MonkeyPatch) -> None:
    """An input nothing refuses fails the test instead of starting Ray."""

    def started(**_: object) -> None:
        raise AssertionError("the simulation engine started: this generated input was not refused")

    monkeypatch.setattr(simulation, "run_simulation", started)


def assert_refused_in_one_line(capfd: pytest.CaptureFixture[str], *args: str) -> str:
    """Run `fedlora ARGS` in-process: exit code 2, one non-empty line, no traceback."""
    capfd.readouterr()  # what an earlier example left behind
    with mock.patch.object(sys, "argv", ["fedlora", *args]):
        try:
            cli.main()
            code = 0
        except SystemExit as done:
            code = done.code
    captured = capfd.readouterr()
    output = captured.out + captured.err
    lines = [line for line in output.splitlines() if line.strip()]
    assert code == 2, f"exit code {code}: {output}"
    assert len(lines) == 1, f"{len(lines)} lines: {output}"
    assert "Traceback" not in output
    return lines[0]


# --- config values -----------------------------------------------------------------------------


def leaf_fields(model: type[BaseModel] = ExperimentConfig, prefix: str = "") -> list[tuple[str, FieldInfo]]:
    """Every key of the config (`federation.lr`), with its field, sections walked into."""
    leaves = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            leaves += leaf_fields(annotation, f"{prefix}{name}.")
        else:
            leaves.append((f"{prefix}{name}", field))
    return leaves


def base_type(annotation: Any) -> Any:
    """`int | None` -> int; anything else as it is."""
    members = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    return members[0] if typing.get_origin(annotation) in (typing.Union, type(int | None)) and len(members) == 1 else annotation


WRONG_STRINGS = st.sampled_from(["yes", "no", "true", "1", "1e-3", "inf", "", "none", "0.5", "[1]"]) | st.text(max_size=20)
NON_FINITE = st.sampled_from([math.inf, -math.inf, math.nan])
LISTS = st.lists(st.integers(-3, 3), max_size=3)


def out_of_range(field: FieldInfo, integer: bool) -> st.SearchStrategy[Any]:
    """Values on the wrong side of the field's bounds (nothing when it has none)."""
    step = st.integers(1, 10**6) if integer else st.floats(1e-9, 1e6)
    below_or_at = st.integers(0, 10**6) if integer else st.floats(0, 1e6)
    options = []
    for bound in field.metadata:
        if isinstance(bound, annotated_types.Ge):
            options.append(step.map(lambda d, b=bound.ge: b - d))
        elif isinstance(bound, annotated_types.Gt):
            options.append(below_or_at.map(lambda d, b=bound.gt: b - d))
        elif isinstance(bound, annotated_types.Le):
            options.append(step.map(lambda d, b=bound.le: b + d))
        elif isinstance(bound, annotated_types.Lt):
            options.append(below_or_at.map(lambda d, b=bound.lt: b + d))
    return st.one_of(options) if options else st.nothing()


def wrong_values(field: FieldInfo) -> st.SearchStrategy[Any]:
    """Values this field must refuse: another type, a non-finite number, or out of its range."""
    kind = base_type(field.annotation)
    if kind is bool:
        return st.integers(-2, 2) | st.floats(allow_nan=False) | WRONG_STRINGS | LISTS
    if kind is int:
        non_integers = st.floats(allow_nan=True, allow_infinity=True)
        return st.booleans() | non_integers | WRONG_STRINGS | LISTS | out_of_range(field, integer=True)
    if kind is float:
        return st.booleans() | NON_FINITE | WRONG_STRINGS | LISTS | out_of_range(field, integer=False)
    if typing.get_origin(kind) is typing.Literal:
        allowed = set(typing.get_args(kind))
        return st.text(max_size=12).filter(lambda s: s not in allowed) | st.integers() | st.booleans()
    if kind is str:
        return st.integers() | st.floats(allow_nan=False) | st.booleans() | LISTS
    if typing.get_origin(kind) is list:
        (item,) = typing.get_args(kind)
        wrong_items = st.text(max_size=4) if item is bool else st.booleans()  # strict: a bool is no str, int or float
        return st.text(max_size=8) | st.integers() | st.lists(wrong_items, min_size=1, max_size=3)
    if typing.get_origin(kind) is dict:
        return st.text(max_size=8) | st.integers() | st.booleans()
    raise AssertionError(f"no wrong values for {kind} yet: teach wrong_values this type")


def toml_literal(value: Any) -> str:
    """A value written as TOML writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    return "[" + ", ".join(toml_literal(item) for item in value) + "]"


KEYS = leaf_fields()
# A string TOML cannot read back (a raw DEL, a lone surrogate) stays a string: still the wrong type.
bad_values = st.sampled_from(KEYS).flatmap(lambda kf: st.tuples(st.just(kf[0]), wrong_values(kf[1])))


def file_with(key: str, literal: str) -> str:
    """A config file extending the quickstart with `key = literal` in its section."""
    *sections, leaf = key.split(".")
    table = f"[{'.'.join(sections)}]\n" if sections else ""
    return f'extends = "{QUICKSTART}"\n{table}{leaf} = {literal}\n'


@pytest.mark.usefixtures("no_simulation")
@FUZZ
@given(item=bad_values, in_file=st.booleans())
def test_a_wrong_config_value_is_one_line_and_exit_2(
    capfd: pytest.CaptureFixture[str], item: tuple[str, Any], in_file: bool
) -> None:
    key, value = item
    if not in_file:
        line = assert_refused_in_one_line(capfd, "simulate", str(QUICKSTART), f"--set={key}={toml_literal(value)}")
    else:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "fuzz.toml"
            path.write_text(file_with(key, toml_literal(value)), encoding="utf-8")
            line = assert_refused_in_one_line(capfd, "simulate", str(path))
    assert key.split(".")[0] in line or "--set" in line or "not valid TOML" in line


KEY_PART = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)
SECTIONS = [
    name
    for name, field in ExperimentConfig.model_fields.items()
    if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
]
no_equals = st.text(min_size=0, max_size=30).filter(lambda s: "=" not in s)
bad_key = st.text(max_size=20).filter(
    lambda key: "=" not in key and not all(KEY_PART.fullmatch(part) for part in key.strip().split("."))
)
unknown_key = st.tuples(st.sampled_from(["", *[f"{s}." for s in SECTIONS]]), st.from_regex(KEY_PART, fullmatch=True)).filter(
    lambda parts: (parts[0] + parts[1]) not in {key for key, _ in KEYS}
)
malformed_overrides = st.one_of(
    no_equals,
    st.tuples(bad_key, st.text(max_size=10)).map("=".join),
    st.tuples(unknown_key.map("".join), st.integers(0, 9).map(str)).map("=".join),
)


@pytest.mark.usefixtures("no_simulation")
@FUZZ
@given(override=malformed_overrides)
def test_a_malformed_or_unknown_set_is_one_line_and_exit_2(capfd: pytest.CaptureFixture[str], override: str) -> None:
    line = assert_refused_in_one_line(capfd, "simulate", str(QUICKSTART), f"--set={override}")
    assert "--set" in line or "unknown key" in line or "must be" in line


# --- huge sizes --------------------------------------------------------------------------------


class EngineStarted(Exception):
    """What the stand-in for the simulation engine raises: the input was accepted."""


@pytest.fixture
def engine_stand_in(monkeypatch: pytest.MonkeyPatch) -> None:
    """The simulation engine replaced by one that says it was reached."""

    def started(**_: object) -> None:
        raise EngineStarted

    monkeypatch.setattr(simulation, "run_simulation", started)


def has_upper_bound(field: FieldInfo) -> bool:
    return any(isinstance(bound, annotated_types.Le | annotated_types.Lt) for bound in field.metadata)


INTEGER_KEYS = [(key, field) for key, field in KEYS if base_type(field.annotation) is int]
# Every size that allocates or loops (rounds, steps, ranks, examples, widths) has a bound; the
# integers without one are caps or counts that a data check or a minimum bounds.
SIZES = {key for key, field in INTEGER_KEYS if has_upper_bound(field)}


@pytest.mark.usefixtures("engine_stand_in")
@FUZZ
@given(key=st.sampled_from([key for key, _ in INTEGER_KEYS]), value=st.integers(2**33, 10**30))  # above every bound
def test_a_huge_integer_is_one_line_and_exit_2_or_runs(capfd: pytest.CaptureFixture[str], key: str, value: int) -> None:
    try:
        with tempfile.TemporaryDirectory() as folder:
            out = f"--set=output.dir={folder!r}"
            line = assert_refused_in_one_line(capfd, "simulate", str(QUICKSTART), f"--set={key}={value}", out)
    except EngineStarted:
        assert key not in SIZES, f"{key} = {value} reached the engine"
        return
    leaf = key.rpartition(".")[2]  # a rule across a section's keys names them in it: "federation: clients_per_round (...)"
    assert leaf in line or "federation.num_clients" in line  # more clients than examples is refused by the count


def test_the_sizes_that_allocate_have_bounds() -> None:
    wanted = {"federation.rounds", "privacy.planned_rounds", "federation.local_steps", "model.lora_rank", "data.num_train"}
    assert wanted <= SIZES


# --- damaged run directories ---------------------------------------------------------------------

RESUMED_ROUND = 2  # the checkpoint's round: history.jsonl holds rounds 0, 1 and 2
MISTYPED = st.sampled_from([None, [], [1], {}, {"a": 1}, "high", ""])


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run stopped after round RESUMED_ROUND: config, history, checkpoint; `summary.json` is
    added by the damage that needs one (a finished run's)."""
    from fedlora import workspace
    from fedlora.checkpoint import Checkpoint, save_checkpoint
    from fedlora.results import CONFIG, HISTORY
    from tests.conftest import tiny_config

    path = tmp_path_factory.mktemp("stopped") / "run"
    path.mkdir()
    config = tiny_config()
    (path / CONFIG).write_text(config.to_json())
    lines = [{"round": r, "accuracy": 0.25, "loss": 2.0, "clients": [0, 1]} for r in range(RESUMED_ROUND + 1)]
    (path / HISTORY).write_text("".join(json.dumps(line) + "\n" for line in lines))
    state = workspace.initial_state(config, workspace.federated_task(config).num_labels)
    save_checkpoint(path, Checkpoint(RESUMED_ROUND, state.tensors(), config.model_dump(mode="json")))
    return path


@st.composite
def run_damage(draw: st.DrawFn) -> tuple[str, Any]:
    """A change to history.jsonl or summary.json that no resume may accept: (file, new content)."""
    lines = [{"round": r, "accuracy": 0.25, "loss": 2.0, "clients": [0, 1]} for r in range(RESUMED_ROUND + 1)]
    text = "".join(json.dumps(line) + "\n" for line in lines)
    kind = draw(st.sampled_from(["cut history", "torn line", "garbage line", "round", "figure", "cut summary", "summary key"]))
    if kind == "cut history":  # at least the last newline goes: the last round is torn, so missing
        return "history.jsonl", text[: draw(st.integers(0, len(text) - 1))]
    at = draw(st.integers(0, RESUMED_ROUND))
    rows = [json.dumps(line) for line in lines]
    if kind == "torn line":
        rows[at] = rows[at][: draw(st.integers(0, len(rows[at]) - 1))]
    elif kind == "garbage line":
        rows[at] = draw(st.sampled_from(["[1, 2]", "7", "null", '"text"', "{", "}{"]) | st.text(max_size=20).filter(_not_a_row))
    elif kind == "round":
        row = dict(lines[at])
        if draw(st.booleans()):
            del row["round"]
        else:
            row["round"] = draw(MISTYPED | st.sampled_from([True, False, 1.0, -1, "0"]))
        rows[at] = json.dumps(row)
    elif kind == "figure":
        figure = draw(st.sampled_from(["accuracy", "loss", "clients"]))
        row = dict(lines[at])
        if draw(st.booleans()) and figure != "clients":
            del row[figure]
        else:
            row[figure] = draw(MISTYPED.filter(lambda v: figure != "clients" or not isinstance(v, list)))
        rows[at] = json.dumps(row)
    if kind in ("torn line", "garbage line", "round", "figure"):
        return "history.jsonl", "\n".join(rows) + "\n"
    summary = {"status": "finished", "rounds": RESUMED_ROUND, "final_accuracy": 0.25, "adapter": "adapter"}
    whole = json.dumps(summary)
    if kind == "cut summary":
        return "summary.json", whole[: draw(st.integers(0, len(whole) - 1))]
    key = draw(st.sampled_from(["status", "rounds", "final_accuracy"]))
    if draw(st.booleans()):
        del summary[key]
    else:
        also_wrong = {"status": "stopped", "rounds": 2.5, "final_accuracy": "0.25"}[key]
        summary[key] = draw(MISTYPED | st.sampled_from([True, also_wrong]))
    return "summary.json", json.dumps(summary)


def _not_a_row(text: str) -> bool:
    """Whether a line is no JSON object with a whole round (a blank line is skipped, not damage)."""
    if not text.strip():
        return False
    try:
        row = json.loads(text)
    except ValueError:
        return True
    return not isinstance(row, dict)


@pytest.mark.usefixtures("no_simulation")
@FUZZ
@given(damage=run_damage())
def test_a_damaged_run_directory_is_one_line_and_exit_2_and_left_as_it_was(
    capfd: pytest.CaptureFixture[str], stopped_run: Path, damage: tuple[str, str]
) -> None:
    name, content = damage
    with tempfile.TemporaryDirectory() as folder:
        run_dir = Path(folder) / "run"
        shutil.copytree(stopped_run, run_dir)
        (run_dir / name).write_text(content, encoding="utf-8")
        before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
        line = assert_refused_in_one_line(capfd, "simulate", "--resume", str(run_dir))
        assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.name != ".lock"} == before
    assert name in line or "checkpoint is after round" in line


# --- data files --------------------------------------------------------------------------------

WORDS = ["goal", "vote", "chip", "bread", "flight", "court", "café", "x"]
TINY_EXPERIMENT = """
[model]
name = "tiny"
max_length = 16
lora_rank = 2
[data]
source = "{source}"
partition = "iid"
[federation]
num_clients = 2
clients_per_round = 2
rounds = 1
local_steps = 1
"""


@st.composite
def valid_rows(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Rows of a good data set: non-empty texts, 2 or 3 class names, each class present."""
    size = draw(st.integers(6, 30))
    classes = draw(st.sampled_from([["sport", "food"], ["a", "b", "c"], ["pos", "neg"]]))
    texts = [" ".join(draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=4))) + f" {i}" for i in range(size)]
    return [{"text": text, "label": classes[i % len(classes)]} for i, text in enumerate(texts)]


def rows_as(rows: list[dict[str, Any]], suffix: str) -> bytes:
    """Rows in a file format, as bytes (parquet through datasets)."""
    if suffix == ".csv":
        out = io.StringIO()
        keys = list(dict.fromkeys(key for row in rows if isinstance(row, dict) for key in row))
        writer = csv.writer(out)
        writer.writerow(keys)
        writer.writerows([row.get(key, "") for key in keys] if isinstance(row, dict) else row for row in rows)
        return out.getvalue().encode("utf-8")
    if suffix == ".jsonl":
        return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
    if suffix == ".json":
        return json.dumps(rows, ensure_ascii=False).encode("utf-8")
    out = io.BytesIO()
    datasets.Dataset.from_list(rows).to_parquet(out)
    return out.getvalue()


SUFFIXES = st.sampled_from([".csv", ".jsonl", ".json", ".parquet"])
MISSING_LABELS = ["", "None", "nan", "NaN", "null", "NA", "n/a", None, "  "]


@st.composite
def bad_data_files(draw: st.DrawFn) -> tuple[str, bytes]:
    """A file name and content that no check may let through, each from one kind of mistake."""
    rows = draw(valid_rows())
    at = draw(st.integers(0, len(rows) - 1))
    mistake = draw(
        st.sampled_from(
            ["bytes", "encoding", "no column", "missing label", "one class", "mixed", "empty text", "ragged", "non-object"]
        )
    )
    suffix = draw(SUFFIXES)
    if mistake == "bytes":
        return f"data{suffix}", draw(st.binary(max_size=600))
    if mistake == "encoding":
        rows[at]["text"] = "déjà vu café"
        suffix = draw(st.sampled_from([".csv", ".jsonl", ".json"]))
        text = rows_as(rows, suffix).decode("utf-8")
        return f"data{suffix}", text.encode(draw(st.sampled_from(["latin-1", "cp1252", "utf-16"])))
    if mistake == "no column":
        dropped = draw(st.sampled_from(["text", "label"]))
        rows = [{key: value for key, value in row.items() if key != dropped} | {"other": 1} for row in rows]
    elif mistake == "missing label":
        rows[at]["label"] = draw(st.sampled_from(MISSING_LABELS))
    elif mistake == "one class":
        rows = [row | {"label": rows[0]["label"]} for row in rows]
    elif mistake == "mixed":
        rows[at]["label"] = draw(st.integers(0, 5))  # in a CSV, a number among names
        if suffix == ".parquet":
            suffix = ".jsonl"  # a parquet column holds one type: the mix cannot be written
    elif mistake == "empty text":
        rows[at]["text"] = draw(st.sampled_from(["", "   ", "\t"]))
    elif mistake == "ragged":
        suffix = ".csv"
        content = rows_as(rows, ".csv").decode("utf-8").splitlines()
        content[at + 1] += "," * draw(st.integers(1, 3)) + "extra"
        return "data.csv", ("\n".join(content) + "\n").encode("utf-8")
    else:  # non-object
        suffix = draw(st.sampled_from([".jsonl", ".json"]))
        rows[at] = draw(st.sampled_from([[1, 2], 7, "text", None, True, []]))
    return f"data{suffix}", rows_as(rows, suffix)


@pytest.mark.usefixtures("no_simulation")
@FUZZ
@given(file=bad_data_files())
def test_a_bad_data_file_is_one_line_and_exit_2_before_ray(capfd: pytest.CaptureFixture[str], file: tuple[str, bytes]) -> None:
    name, content = file
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / name).write_bytes(content)
        config = Path(folder) / "experiment.toml"
        config.write_text(TINY_EXPERIMENT.format(source=name))  # relative: next to the config
        line = assert_refused_in_one_line(capfd, "simulate", str(config))
    assert "data." in line
