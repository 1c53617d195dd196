"""Reading run directories: which runs finished, their files checked, and runs whose records disagree left out.

A file the report cannot read as a run writes it (not JSON, not an object, a figure that is
not a number) stops the report with one line naming the file, the line or key and what is
wrong. A run whose files read well but disagree with each other (a history line lost, so
history.jsonl ends before the round summary.json names) is left out of the comparison and
listed with the disagreement: its figures cannot be trusted either way.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fedlora.config_compat import with_defaults
from fedlora.report.data import Excluded, ReportError, RunResult
from fedlora.results import CONFIG, HISTORY, SUMMARY

SWEEP_INDEX = "sweep.json"  # written by fedlora.sweep
ERROR_FILE = "error.txt"
DAMAGED = "; fix or remove that run directory and run `fedlora report` again"

# What the report reads of a history line: required numbers, optional numbers, lists and objects.
# `extra` holds the figures some rounds add (privacy, attack and defence records).
REQUIRED = ("accuracy", "loss")
OPTIONAL = {
    "": (
        "bytes_up",
        "bytes_up_factors",
        "bytes_down",
        "seconds",
        "server_seconds",
        "client_seconds",
        "train_loss",
        "epsilon_max",
        "epsilon_mean",
        "perplexity",
    ),
    "extra.": ("epsilon_max", "epsilon", "tpr", "fpr"),
}
LISTS = {"": ("clients",), "extra.": ("flagged", "malicious")}
OBJECTS = {"": ("extra",), "extra.": ("defence", "retired", "client_eval")}
# Config sections whose settings the report reads (privacy.epsilon, attack.fraction, ...).
CONFIG_SECTIONS = ("model", "data", "privacy", "attack", "strategy", "federation")
# summary.json's figures and how to compute each from the history, to check that the two agree.
AGREEING = {
    "rounds": lambda history: history[-1]["round"],
    "final_accuracy": lambda history: history[-1]["accuracy"],
    "best_accuracy": lambda history: max(r["accuracy"] for r in history),
    "initial_accuracy": lambda history: history[0]["accuracy"],
    "bytes_up": lambda history: sum(r.get("bytes_up") or 0 for r in history),
    "bytes_down": lambda history: sum(r.get("bytes_down") or 0 for r in history),
    "final_perplexity": lambda history: history[-1].get("perplexity"),
}


# --- finding runs ---------------------------------------------------------------------------


def find_runs(paths: list[Path]) -> tuple[list[Path], list[Excluded]]:
    """Finished run directories among `paths` (a sweep directory stands for its runs), and the rest."""
    finished: list[Path] = []
    excluded: list[Excluded] = []
    seen: set[Path] = set()
    for path in map(Path, paths):
        if not path.is_dir():
            raise ReportError(f"{path}: no such run or sweep directory")
        for candidate, known_error in _expand(path):
            resolved = candidate.resolve()
            if resolved in seen:
                continue
            seen.add(resolved)
            reason = _unfinished_reason(candidate, known_error)
            if reason is None:
                finished.append(candidate)
            else:
                excluded.append(Excluded(candidate, reason))
    if not finished:
        where = ", ".join(str(p) for p in paths)
        raise ReportError(f"no finished runs in {where}; run `fedlora compare CONFIG` or `fedlora simulate CONFIG` first")
    return finished, excluded


def is_run_dir(path: Path) -> bool:
    """Whether `path` is one run's directory (rather than a sweep or a folder of runs)."""
    return any((path / name).exists() for name in (CONFIG, SUMMARY, HISTORY, ERROR_FILE))


def _expand(path: Path) -> list[tuple[Path, str | None]]:
    if is_run_dir(path):
        return [(path, None)]
    if (path / SWEEP_INDEX).exists():
        try:
            index = json.loads((path / SWEEP_INDEX).read_text())
            return [(path / run["name"], run.get("error")) for run in index["runs"]]
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ReportError(f"{path / SWEEP_INDEX}: unreadable sweep index ({err}); re-run `fedlora compare`") from None
    runs = sorted(child for child in path.iterdir() if (child / CONFIG).exists())
    if not runs:
        raise ReportError(f"{path}: neither a run directory (config.json) nor a sweep directory (sweep.json)")
    return [(run, None) for run in runs]


def _unfinished_reason(run_dir: Path, known_error: str | None) -> str | None:
    """Why a run directory holds no finished run, or None; a summary.json that is not an object stops the report."""
    if (run_dir / SUMMARY).is_file():
        summary = read_object(run_dir / SUMMARY)
        if summary.get("status") == "finished" and (run_dir / CONFIG).exists() and _has_history(run_dir):
            return None
    if (run_dir / ERROR_FILE).exists():
        lines = (run_dir / ERROR_FILE).read_text().strip().splitlines()
        return f"failed: {lines[0] if lines else 'see error.txt'}"
    if known_error:
        return f"failed: {known_error}"
    return "not finished" if run_dir.exists() else "not started"


def _has_history(run_dir: Path) -> bool:
    return (run_dir / HISTORY).is_file() and bool(read_text(run_dir / HISTORY).strip())


# --- reading one run ------------------------------------------------------------------------


def read_runs(paths: list[Path]) -> tuple[list[RunResult], list[Excluded]]:
    """The finished runs under `paths`, read and checked; the rest (and runs whose records disagree) excluded."""
    run_dirs, excluded = find_runs(paths)
    names = [d.name for d in run_dirs]
    runs = []
    for run_dir in run_dirs:
        run = load_run(run_dir, run_dir.name if names.count(run_dir.name) == 1 else f"{run_dir.parent.name}/{run_dir.name}")
        disagreement = records_disagree(run)
        if disagreement is None:
            runs.append(run)
        else:
            excluded.append(Excluded(run_dir, disagreement, records=True))
    if not runs:
        reasons = "; ".join(f"{e.path.name}: {e.reason}" for e in excluded)
        raise ReportError(f"no run to report: {reasons}")
    return runs, excluded


def load_run(run_dir: Path, name: str | None = None) -> RunResult:
    """A finished run directory's config, summary and history, each checked as the report reads it."""
    run_dir = Path(run_dir)
    return RunResult(
        name=name or run_dir.name,
        run_dir=run_dir,
        config=read_config(run_dir / CONFIG),
        summary=read_summary(run_dir / SUMMARY),
        history=read_history(run_dir / HISTORY),
    )


def read_text(path: Path) -> str:
    """A run file's text; one that cannot be read, or is not text, stops the report naming it."""
    try:
        return path.read_text()
    except UnicodeDecodeError:
        raise ReportError(f"{path}: not a text file{DAMAGED}") from None
    except OSError as err:
        raise ReportError(f"{path}: cannot be read ({err.strerror}){DAMAGED}") from None


def read_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object."""
    return _json_object(read_text(path), str(path))


def _json_object(text: str, where: str) -> dict[str, Any]:
    """`text` parsed as a JSON object; a ReportError naming `where` (a file, or a file's line) otherwise."""
    try:
        value = json.loads(text)
    except ValueError as err:
        raise ReportError(f"{where}: not valid JSON ({err}){DAMAGED}") from None
    if not isinstance(value, dict):
        raise ReportError(f"{where}: holds a JSON {_json_type(value)}, not an object{DAMAGED}")
    return value


def read_config(path: Path) -> dict[str, Any]:
    """config.json, its sections objects; keys added to fedlora since the run filled in as the run
    had them (fedlora/config_compat.py), so that its runs group with newer runs of the same settings."""
    config = read_object(path)
    for section in CONFIG_SECTIONS:
        if not isinstance(config.get(section, {}), dict):
            raise ReportError(f"{path}: {section!r} is {_shown(config[section])}, not a section (an object){DAMAGED}")
    _check_numbers(path, config, {"privacy.": ("epsilon",), "attack.": ("fraction",)})
    return with_defaults(config)


def read_summary(path: Path) -> dict[str, Any]:
    """summary.json, its figures numbers."""
    summary = read_object(path)
    _check_numbers(path, summary, {"": tuple(AGREEING)})
    _check_client_sections(path, summary)
    _check_evaluation_sections(path, summary)
    return summary


def _check_client_sections(path: Path, summary: dict[str, Any]) -> None:
    """`privacy` and `retired`, where recorded: objects by client id; each client's privacy figures numbers."""
    for section in ("privacy", "retired"):
        value = summary.get(section)
        if value is not None and not isinstance(value, dict):
            raise ReportError(f"{path}: {section!r} is {_shown(value)}, not an object{DAMAGED}")
    for client, figures in (summary.get("privacy") or {}).items():
        if not isinstance(figures, dict):
            raise ReportError(f"{path}: 'privacy.{client}' is {_shown(figures)}, not an object{DAMAGED}")
        _check_numbers(path, summary, {f"privacy.{client}.": tuple(figures)})


def _check_evaluation_sections(path: Path, summary: dict[str, Any]) -> None:
    """`held_out` and `label_mix`, where recorded (fedlora/client_eval.py): class names and counts
    that fit them, a square confusion matrix, clients by id."""
    held_out, mix = summary.get("held_out"), summary.get("label_mix")
    if held_out is not None:
        classes = _class_names(path, "held_out", held_out)
        matrix = held_out.get("confusion_matrix")
        if not (isinstance(matrix, list) and len(matrix) == len(classes) and all(_counts(row, len(classes)) for row in matrix)):
            raise ReportError(
                f"{path}: 'held_out.confusion_matrix' is not a {len(classes)} x {len(classes)} table of counts{DAMAGED}"
            )
    if mix is not None:
        classes = _class_names(path, "label_mix", mix)
        clients = mix.get("clients")
        if not (isinstance(clients, dict) and all(_is_client_id(c) and _counts(n, len(classes)) for c, n in clients.items())):
            raise ReportError(f"{path}: 'label_mix.clients' is not {len(classes)} counts per client id{DAMAGED}")


def _class_names(path: Path, section: str, value: Any) -> list[str]:
    classes = value.get("classes") if isinstance(value, dict) else None
    if not (isinstance(classes, list) and classes and all(isinstance(name, str) for name in classes)):
        raise ReportError(f"{path}: {section!r} has no list of class names{DAMAGED}")
    return classes


def _counts(value: Any, size: int) -> bool:
    return isinstance(value, list) and len(value) == size and all(type(v) is int and v >= 0 for v in value)


def _is_client_id(key: str) -> bool:
    return key.isdigit()


def _check_client_eval(where: str, record: dict[str, Any]) -> None:
    """`extra.client_eval`, where recorded: each client id's accuracy (0 to 1), loss and examples;
    `extra.client_eval_refused` a list of refusals (objects)."""
    refused = _nested(record, "extra.client_eval_refused")
    if refused is not None and not (isinstance(refused, list) and all(isinstance(r, dict) for r in refused)):
        raise ReportError(f"{where}: 'extra.client_eval_refused' is {_shown(refused)}, not a list of refusals{DAMAGED}")
    for client, figures in (_nested(record, "extra.client_eval") or {}).items():
        if not (_is_client_id(client) and isinstance(figures, dict)):
            raise ReportError(
                f"{where}: 'extra.client_eval' has {_shown(client)}: {_shown(figures)}, not a client's figures{DAMAGED}"
            )
        accuracy, loss, examples = (figures.get(key) for key in ("accuracy", "loss", "examples"))
        if not (_is_number(accuracy) and 0 <= accuracy <= 1 and _is_number(loss) and type(examples) is int):
            raise ReportError(
                f"{where}: 'extra.client_eval.{client}' is {_shown(figures)}, not accuracy (0 to 1), loss and examples{DAMAGED}"
            )


def read_history(path: Path) -> list[dict[str, Any]]:
    """history.jsonl, every line an object with the figures the report reads (a torn last line, cut
    short by a kill before its newline, is left out as fedlora.results.read_history does)."""
    text = read_text(path)
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        lines = lines[:-1]
    history = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        record = _json_object(line, where)
        _check_record(where, record)
        history.append(record)
    return history


def _check_record(where: str, record: dict[str, Any]) -> None:
    round_ = record.get("round")
    if not isinstance(round_, int) or isinstance(round_, bool) or round_ < 0:
        raise ReportError(f"{where}: 'round' is {_shown(round_)}, not a round number{DAMAGED}")
    for key in REQUIRED:
        if key not in record:
            raise ReportError(f"{where}: {key!r} is missing{DAMAGED}")
    accuracy = record["accuracy"]
    if not _is_number(accuracy) or not 0 <= accuracy <= 1:
        raise ReportError(f"{where}: 'accuracy' is {_shown(accuracy)}, not a number from 0 to 1{DAMAGED}")
    for prefix, names in OBJECTS.items():
        for name in names:
            value = _nested(record, prefix + name)
            if value is not None and not isinstance(value, dict):
                raise ReportError(f"{where}: {prefix + name!r} is {_shown(value)}, not an object{DAMAGED}")
    for prefix, names in LISTS.items():
        for name in names:
            value = _nested(record, prefix + name)
            if value is not None and not (isinstance(value, list) and all(_is_number(v) for v in value)):
                raise ReportError(f"{where}: {prefix + name!r} is {_shown(value)}, not a list of client ids{DAMAGED}")
    _check_numbers(where, record, {**OPTIONAL, "": REQUIRED + OPTIONAL[""]})
    _check_client_eval(where, record)


def _check_numbers(where: Any, tree: dict[str, Any], keys: dict[str, tuple[str, ...]]) -> None:
    """Every key in `keys` (by section prefix) is a number where present (None counts as not recorded)."""
    for prefix, names in keys.items():
        for name in names:
            value = _nested(tree, prefix + name)
            if value is not None and not _is_number(value):
                raise ReportError(f"{where}: {prefix + name!r} is {_shown(value)}, not a number{DAMAGED}")


def _nested(tree: dict[str, Any], key: str) -> Any:
    *sections, leaf = key.split(".")
    for section in sections:
        tree = tree.get(section)
        if not isinstance(tree, dict):
            return None
    return tree.get(leaf)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _json_type(value: Any) -> str:
    return {list: "list", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(value), "null")


def _shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


# --- do the records agree? ------------------------------------------------------------------


def records_disagree(run: RunResult) -> str | None:
    """How a run's history.jsonl and summary.json disagree (a lost or repeated round, other final
    figures), or None where they agree."""
    rounds = [r["round"] for r in run.history]
    if not rounds:  # e.g. one line without its newline: torn, so dropped as results.read_history drops it
        return f"{HISTORY} holds no whole round"
    if rounds[0] != 0:
        return f"{HISTORY} starts at round {rounds[0]}, not 0 (lines lost)"
    for before, after in zip(rounds, rounds[1:]):
        if after != before + 1:
            return f"{HISTORY} has round {after} after round {before} (rounds go up by one: lines lost or repeated)"
    different = [
        f"{key} {_figure(ours)} in {HISTORY}, {_figure(theirs)} in {SUMMARY}"
        for key, compute in AGREEING.items()
        if (theirs := run.summary.get(key)) is not None and not _same(ours := compute(run.history), theirs)
    ]
    return f"{HISTORY} and {SUMMARY} disagree: {'; '.join(different)}" if different else None


def _same(ours: Any, theirs: Any) -> bool:
    if ours is None:
        return False
    return math.isclose(float(ours), float(theirs), rel_tol=1e-9, abs_tol=1e-12) or (math.isnan(ours) and math.isnan(theirs))


def _figure(value: Any) -> str:
    return "none" if value is None else f"{value:g}" if isinstance(value, float) else str(value)
