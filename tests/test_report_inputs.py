"""`fedlora report` on damaged or mixed inputs: files that are not what a run writes stop it in one
line (exit 2, an earlier report kept whole); a run whose history and summary disagree is left out
and listed; runs on different held-out sets are never ranked together; a report goes into the
folder it is asked for and does not replace another report unasked."""

from __future__ import annotations

import csv
import html
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedlora.report import compare, write_report
from fedlora.report.reading import read_runs
from fedlora.report.tables import notes, summary_table
from tests.conftest import one_line_refusal, run_cli
from tests.report_runs import ROUNDS, make_run

DAMAGE = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two intact runs (seeds 0 and 1) and a report of them in report/ beside them."""
    root = tmp_path_factory.mktemp("intact")
    make_run(root / "runs" / "a", ["seed=0"])
    make_run(root / "runs" / "b", ["seed=1"], quality=0.01)
    write_report([root / "runs"], root / "report")
    return root / "runs", root / "report"


@pytest.fixture
def copies(reported: tuple[Path, Path]) -> Iterator[Any]:
    """A function that copies the intact runs and their report into a fresh folder (one per hypothesis example)."""
    made: list[str] = []

    def copy() -> tuple[Path, Path]:
        root = Path(tempfile.mkdtemp())
        made.append(str(root))
        shutil.copytree(reported[0], root / "runs")
        shutil.copytree(reported[1], root / "report")
        return root / "runs", root / "report"

    yield copy
    for root in made:
        shutil.rmtree(root)


def refused_keeping_the_report(runs: Path, report: Path) -> str:
    """`fedlora report RUNS --out REPORT` exits 2 in one line and leaves the earlier report as it was."""
    before = snapshot(report)
    line = one_line_refusal("report", str(runs), "--out", str(report), "--overwrite")
    assert snapshot(report) == before
    return line


# --- case 7: damaged files end in one line naming the file ---------------------------------------

NOT_A_NUMBER = ["x", "0.5", True, [1], {"a": 1}]
DELETE = "delete"
# What a history line may not hold: per key, values of the wrong kind (and, for the keys every line
# needs, no value at all).
WRONG = {
    "round": [DELETE, -1, 1.5, *NOT_A_NUMBER],
    "accuracy": [DELETE, 1.5, -0.1, float("nan"), *NOT_A_NUMBER],
    "loss": [DELETE, *NOT_A_NUMBER],
    **{key: NOT_A_NUMBER for key in ("bytes_up", "bytes_down", "server_seconds", "train_loss", "epsilon_max", "perplexity")},
    "clients": ["x", 3, {"a": 1}, ["x"]],
    "extra": ["x", 3, [1]],
}
DAMAGED_KEY = st.sampled_from(sorted(WRONG)).flatmap(lambda key: st.tuples(st.just(key), st.sampled_from(WRONG[key])))


@DAMAGE
@given(line=st.integers(0, ROUNDS), damage=DAMAGED_KEY)
def test_a_history_line_with_a_key_missing_or_of_the_wrong_kind_is_refused_naming_file_line_and_key(
    copies, line: int, damage: tuple[str, Any]
) -> None:
    runs, report = copies()
    path = runs / "a" / "history.jsonl"
    records = [json.loads(text) for text in path.read_text().splitlines()]
    key, value = damage
    if value == DELETE:
        del records[line][key]
    else:
        records[line][key] = value
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    message = refused_keeping_the_report(runs, report)
    assert f"{path} line {line + 1}: '{key}'" in message


@DAMAGE
@given(line=st.integers(0, ROUNDS), text=st.sampled_from(["{", "[1, 2]", '"round"', "7", "null", "{'round': 0}"]))
def test_a_history_line_that_is_not_a_json_object_is_refused_naming_its_line(copies, line: int, text: str) -> None:
    runs, report = copies()
    path = runs / "b" / "history.jsonl"
    lines = path.read_text().splitlines()
    lines[line] = text
    path.write_text("\n".join(lines) + "\n")
    assert f"{path} line {line + 1}: " in refused_keeping_the_report(runs, report)


@DAMAGE
@given(content=st.sampled_from(["[1, 2]", '"finished"', "3", "{not json"]))
def test_a_summary_that_is_not_a_json_object_is_refused(copies, content: str) -> None:
    runs, report = copies()
    (runs / "a" / "summary.json").write_text(content)
    assert f"{runs / 'a' / 'summary.json'}: " in refused_keeping_the_report(runs, report)


@DAMAGE
@given(key=st.sampled_from(["rounds", "final_accuracy", "best_accuracy", "bytes_up"]), value=st.sampled_from(NOT_A_NUMBER))
def test_a_summary_figure_that_is_not_a_number_is_refused_naming_the_key(copies, key: str, value: Any) -> None:
    runs, report = copies()
    path = runs / "b" / "summary.json"
    summary = json.loads(path.read_text())
    summary[key] = value
    path.write_text(json.dumps(summary))
    assert f"{path}: '{key}'" in refused_keeping_the_report(runs, report)


@pytest.mark.parametrize(
    ("content", "said"),
    [
        ("{seed: 1", "not valid JSON"),
        ("[1, 2]", "holds a JSON list, not an object"),
        (b"\xff\xfe", "not a text file"),
        ({"privacy": "on"}, "'privacy' is \"on\", not a section"),
        ({"privacy": {"enabled": True, "epsilon": "8"}}, "'privacy.epsilon' is \"8\", not a number"),
        ({"attack": {"name": "alie", "fraction": [0.2]}}, "'attack.fraction' is [0.2], not a number"),
    ],
)
def test_a_config_that_is_not_json_or_has_a_section_of_the_wrong_kind_is_refused(copies, content: Any, said: str) -> None:
    runs, report = copies()
    path = runs / "a" / "config.json"
    if isinstance(content, dict):
        path.write_text(json.dumps({**json.loads(path.read_text()), **content}))
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    message = refused_keeping_the_report(runs, report)
    assert message.startswith(f"error: {path}: ") and said in message


def test_an_out_that_is_a_file_is_refused_and_left_as_it_was(reported: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "notes.txt"
    out.write_text("mine")
    message = one_line_refusal("report", str(reported[0]), "--out", str(out))
    assert f"--out {out}: is a file" in message and out.read_text() == "mine"


def test_a_read_only_out_is_refused_and_its_report_left_whole(copies, monkeypatch: pytest.MonkeyPatch) -> None:
    runs, report = copies()
    report.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: fail the writes there as a read-only folder would
        real = Path.write_bytes

        def read_only(self: Path, data: bytes) -> int:
            if self.parent == report:
                raise PermissionError(13, "Permission denied", str(self))
            return real(self, data)

        monkeypatch.setattr(Path, "write_bytes", read_only)
    try:
        assert "cannot write the report there (Permission denied)" in refused_keeping_the_report(runs, report)
    finally:
        report.chmod(0o755)


# --- case 6: a run whose history and summary disagree is left out, and the report says so ------------


def test_a_run_whose_history_lost_its_last_line_is_left_out_and_marked_everywhere(copies) -> None:
    runs, report = copies()
    path = runs / "a" / "history.jsonl"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))  # round 4 lost
    code, output = run_cli("report", str(runs), "--out", str(report), "--overwrite")
    assert code == 0 and "not included: 1 run" in output
    rows = {row["run"]: row for row in read_csv(report / "results.csv")}
    # Before: a's row said rounds 3, final_accuracy 0.5 (its history) while its summary says 4 and 0.6.
    assert rows["a"]["final_accuracy"] == "" and rows["a"]["rounds"] == ""
    assert rows["a"]["not_included"] == (
        "history.jsonl and summary.json disagree: rounds 3 in history.jsonl, 4 in summary.json; "
        "final_accuracy 0.5 in history.jsonl, 0.6 in summary.json; best_accuracy 0.5 in history.jsonl, 0.6 in summary.json; "
        "bytes_up 3687000 in history.jsonl, 4916000 in summary.json; bytes_down 7374000 in history.jsonl, 9832000 in summary.json"
    )
    assert rows["b"]["not_included"] == "" and rows["b"]["final_accuracy"] == "0.61"
    for page in ("report.md", "report.html"):
        text = html.unescape(re.sub(r"<[^>]+>", "", (report / page).read_text()))  # the HTML's text, <wbr> and all tags out
        assert "1 run is not included (history.jsonl and summary.json disagree)" in text
        assert "rounds 3 in history.jsonl, 4 in summary.json" in text and "Not included" in text


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lost=st.sets(st.integers(0, ROUNDS), min_size=1, max_size=ROUNDS))
def test_any_lost_history_lines_leave_the_run_out_with_the_disagreement(copies, lost: set[int]) -> None:
    runs, _ = copies()
    path = runs / "b" / "history.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(line for i, line in enumerate(lines) if i not in lost))
    kept, excluded = read_runs([runs])
    assert [run.name for run in kept] == ["a"]
    assert [(e.path.name, e.records) for e in excluded] == [("b", True)] and "history.jsonl" in excluded[0].reason
    message = one_line_refusal("report", str(runs / "b"))  # nothing else to report
    assert message.startswith(f"error: no run to report: b: {excluded[0].reason}")


# --- case 6: runs on different held-out sets are never ranked together --------------------------


@pytest.mark.parametrize(
    ("other", "apart"),
    [
        (["model.task=causal_lm"], True),
        (["data.num_test=30"], True),
        (["data.max_test_examples=20"], True),
        (["data.test_fraction=0.3"], True),
        (["data.corpus.held_out_words=false"], True),  # the built-in corpus' test split is generated with it
        (["data.corpus.num_classes=4"], True),
        (["data.corpus.label_noise=0.1"], False),  # train labels only
        (["data.partition=dirichlet"], False),  # splits the training data only
        (["federation.lr=0.01"], False),
        (["strategy.name=ffa_lora"], False),
    ],
)
def test_runs_are_grouped_apart_exactly_when_their_held_out_sets_differ(tmp_path: Path, other: list[str], apart: bool) -> None:
    causal = other == ["model.task=causal_lm"]
    base = make_run(tmp_path / "base", ["data.num_test=30"] if causal else [], causal=causal)
    changed = make_run(tmp_path / "changed", [] if causal else other, quality=0.1)
    runs, _ = read_runs([base, changed])
    groups = compare(runs).groups
    assert len(groups) == (2 if apart else 1)
    if apart:
        assert [[v.runs[0].name for v in g.variants] for g in groups] == [["base"], ["changed"]]


def test_a_causal_lm_run_and_a_classifier_get_a_table_and_a_winner_each(tmp_path: Path) -> None:
    for seed in (0, 1, 2):
        make_run(tmp_path / f"cls-fedit-{seed}", ["strategy.name=fedit", f"seed={seed}"], quality=0.05)
        make_run(tmp_path / f"cls-ffa-{seed}", ["strategy.name=ffa_lora", f"seed={seed}"])
        make_run(tmp_path / f"lm-fedit-{seed}", ["strategy.name=fedit", f"seed={seed}"], quality=0.3, causal=True)
        make_run(tmp_path / f"lm-ffa-{seed}", ["strategy.name=ffa_lora", f"seed={seed}"], quality=0.31, causal=True)
    code, output = run_cli("report", str(tmp_path))
    assert code == 0, output
    markdown = (tmp_path / "report" / "report.md").read_text()
    # Before: one table ranked all four, the causal LM's exact match 0.91 "winning" over accuracy 0.65.
    assert markdown.count("### Held-out set: ") == 2 and markdown.count("1 ★ winner") == 2
    assert "nothing is ranked across them" in markdown
    comparison = compare(read_runs([tmp_path])[0])
    classification, causal = comparison.groups
    assert (classification.label, causal.label) == ("task=classification", "task=causal_lm")
    assert [v.settings["strategy.name"] for v in classification.variants] == ["fedit", "ffa_lora"]
    assert [v.settings["strategy.name"] for v in causal.variants] == ["ffa_lora", "fedit"]
    assert [row[0] for row in summary_table(comparison, causal).rows] == ["1 ★ winner", "2"]
    assert any("2 different held-out sets" in text for text, warn in notes(comparison) if warn)
    rows = read_csv(tmp_path / "report" / "results.csv")
    assert {row["test_set"] for row in rows} == {classification.label, causal.label}
    assert {row["baseline"] for row in rows if row["test_set"] == causal.label} == {causal.variants[1].label}
    terminal = [line for line in output.splitlines() if "best final accuracy" in line]
    assert len(terminal) == 2 and terminal[1].startswith(causal.label)


# --- case 6: where a report goes ------------------------------------------------------------------


def test_report_folder_writes_into_that_folder_so_sibling_reports_do_not_overwrite_each_other(tmp_path: Path) -> None:
    make_run(tmp_path / "first" / "a", ["seed=0"])
    make_run(tmp_path / "second" / "b", ["seed=1"])
    for folder in ("first", "second"):
        (tmp_path / folder / "config.toml").write_text("# the user's own\n")
        code, output = run_cli("report", str(tmp_path / folder))
        assert code == 0 and str(tmp_path / folder / "report" / "report.html") in output
    # Before: both went to tmp_path/report, the second replacing the first.
    assert not (tmp_path / "report").exists()
    assert [row["run"] for row in read_csv(tmp_path / "first" / "report" / "results.csv")] == ["a"]
    assert [row["run"] for row in read_csv(tmp_path / "second" / "report" / "results.csv")] == ["b"]
    # A folder the user made keeps its own files: the report goes to its report/ folder.
    assert (tmp_path / "first" / "config.toml").read_text() == "# the user's own\n"
    code, output = run_cli("report", str(tmp_path / "first" / "a"))
    assert code == 0 and (tmp_path / "first" / "a" / "report" / "report.html").exists()
    make_run(tmp_path / "first" / "c", ["seed=2"])
    shutil.rmtree(tmp_path / "first" / "a")
    assert run_cli("report", str(tmp_path / "first"))[0] == 0  # a folder's own report follows what it holds
    assert [row["run"] for row in read_csv(tmp_path / "first" / "report" / "results.csv")] == ["c"]


def test_an_out_holding_files_of_the_reports_names_but_no_report_is_refused(tmp_path: Path) -> None:
    run = make_run(tmp_path / "runs" / "a", ["seed=0"])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.toml").write_text("# the user's own\n")
    message = one_line_refusal("report", str(run), "--out", str(mine))
    assert "config.toml" in message and "--overwrite" in message
    assert (mine / "config.toml").read_text() == "# the user's own\n" and not (mine / "report.html").exists()


def test_a_history_of_one_line_without_its_newline_leaves_the_run_out(tmp_path: Path) -> None:
    good = make_run(tmp_path / "runs" / "good", ["seed=0"])
    torn = make_run(tmp_path / "runs" / "torn", ["seed=1"])
    first = (torn / "history.jsonl").read_text().splitlines()[0]
    (torn / "history.jsonl").write_text(first)  # one whole JSON line, but no newline: a torn write
    code, output = run_cli("report", str(good), str(torn))
    assert code == 0 and "Traceback" not in output
    markdown = (tmp_path / "runs" / "report" / "report.md").read_text()
    assert "holds no whole round" in markdown


def test_a_report_of_other_runs_is_replaced_only_with_overwrite(tmp_path: Path) -> None:
    a = make_run(tmp_path / "runs" / "a", ["seed=0"])
    b = make_run(tmp_path / "runs" / "b", ["seed=1"])
    c = make_run(tmp_path / "runs" / "c", ["seed=2"])
    assert run_cli("report", str(a), str(b))[0] == 0  # into runs/report, the folder they share
    before = snapshot(tmp_path / "runs" / "report")
    message = one_line_refusal("report", str(b), str(c))
    assert "holds the report of other runs" in message and "--overwrite" in message
    assert snapshot(tmp_path / "runs" / "report") == before
    assert run_cli("report", str(a), str(b), str(c))[0] == 0  # more runs than before: its own report, re-rendered
    assert run_cli("report", str(b), str(c), "--overwrite")[0] == 0
    assert [row["run"] for row in read_csv(tmp_path / "runs" / "report" / "results.csv")] == ["b", "c"]
