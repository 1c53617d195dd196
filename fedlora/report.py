"""Comparison reports: run directories in; report.html, report.md, results.csv and plots out.

    report.html    one self-contained file: CSS inline, plots as base64 PNG; opens offline
    report.md      the same tables, with the plots beside it as PNG files
    results.csv    one row per run
    config.toml    the settings every run shares: each run is `fedlora simulate config.toml`
                   with the `--set` overrides the report lists for it

Runs are grouped into variants by their resolved configs: every key that differs between runs,
except the seed and the output location, is a variant field. A variant's figures are the mean
over its seeds, with the spread (min-max band in plots, standard deviation in tables).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import shlex
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlora.config import _parse_value
from fedlora.results import CONFIG, HISTORY, SUMMARY, read_history, read_summary

HTML_FILE = "report.html"
MARKDOWN_FILE = "report.md"
CSV_FILE = "results.csv"
BASE_CONFIG_FILE = "config.toml"
SWEEP_INDEX = "sweep.json"  # written by fedlora.sweep
ERROR_FILE = "error.txt"
PLOTS = ("accuracy", "epsilon", "bytes", "time", "detection")
NO_SPREAD = "—"
LINE_STYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


class ReportError(ValueError):
    """The runs asked for cannot make a report (missing directory, nothing finished); says what to do."""


@dataclass
class RunResult:
    """One finished run: its records and the figures the report shows for it."""

    name: str
    run_dir: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    history: list[dict[str, Any]]

    @property
    def seed(self) -> Any:
        """The run's seed."""
        return self.config.get("seed")

    @property
    def final_accuracy(self) -> float:
        """Accuracy after the last round."""
        return float(self.history[-1]["accuracy"])

    @property
    def best_accuracy(self) -> float:
        """The best accuracy of any round (round 0 included, as in summary.json)."""
        return max(float(r["accuracy"]) for r in self.history)

    @property
    def final_epsilon(self) -> float | None:
        """The last recorded epsilon (max over clients, cumulative); None without DP."""
        values = [v for r in self.history if (v := epsilon_of(r)) is not None]
        return values[-1] if values else None

    @property
    def bytes_up(self) -> int:
        """Total bytes clients sent."""
        return sum(int(r.get("bytes_up") or 0) for r in self.history)

    @property
    def bytes_down(self) -> int:
        """Total bytes the server sent."""
        return sum(int(r.get("bytes_down") or 0) for r in self.history)

    def mean_per_round(self, extract: Callable[[dict[str, Any]], float | None]) -> float | None:
        """The mean of a per-round figure over the trained rounds that record it."""
        values = [v for r in self.history if r["round"] >= 1 and (v := extract(r)) is not None]
        return statistics.fmean(values) if values else None


@dataclass
class Variant:
    """Runs with the same config except the seed: a row of the summary table, a line in the plots."""

    settings: dict[str, Any]
    label: str
    runs: list[RunResult]

    @property
    def seeds(self) -> list[Any]:
        """The seeds of its runs."""
        return [run.seed for run in self.runs]

    def stat(self, extract: Callable[[RunResult], float | None]) -> tuple[float | None, float | None]:
        """Mean and standard deviation (None for one value) over the runs that have the figure."""
        values = [v for run in self.runs if (v := extract(run)) is not None]
        if not values:
            return None, None
        return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)

    def band(
        self, extract: Callable[[dict[str, Any]], float | None], start: int = 1
    ) -> tuple[list[int], list[float], list[float], list[float]]:
        """Per round from `start`: rounds, mean, min and max over its runs."""
        per_run = [
            {r["round"]: float(v) for r in run.history if r["round"] >= start and (v := extract(r)) is not None}
            for run in self.runs
        ]
        per_run = [values for values in per_run if values]
        if not per_run:
            return [], [], [], []
        rounds = sorted(set.intersection(*(set(values) for values in per_run)))
        columns = [[values[k] for values in per_run] for k in rounds]
        return rounds, [statistics.fmean(c) for c in columns], [min(c) for c in columns], [max(c) for c in columns]


@dataclass
class Excluded:
    """A run directory the report could not use, and why."""

    path: Path
    reason: str


@dataclass
class Comparison:
    """Runs grouped into variants, sorted by mean final accuracy (best first)."""

    runs: list[RunResult]
    fields: list[str]
    variants: list[Variant]
    base_config: dict[str, Any]
    overrides: dict[str, list[str]]  # run name -> the --set items that reproduce it
    excluded: list[Excluded] = field(default_factory=list)

    @property
    def has_epsilon(self) -> bool:
        """Whether any run recorded a privacy budget."""
        return any(run.final_epsilon is not None for run in self.runs)

    @property
    def has_detection(self) -> bool:
        """Whether any run recorded detection rates."""
        return any(any(v is not None for v in detection_of(r)) for run in self.runs for r in run.history)


@dataclass
class ReportFiles:
    """Where a report was written."""

    out: Path
    html: Path
    markdown: Path
    csv: Path
    plots: list[Path]
    comparison: Comparison


# --- reading runs -------------------------------------------------------------------------


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


def _expand(path: Path) -> list[tuple[Path, str | None]]:
    if any((path / name).exists() for name in (CONFIG, SUMMARY, HISTORY, ERROR_FILE)):
        return [(path, None)]
    if (path / SWEEP_INDEX).exists():
        try:
            index = json.loads((path / SWEEP_INDEX).read_text())
            return [(path / run["name"], run.get("error")) for run in index["runs"]]
        except (ValueError, KeyError, TypeError) as err:
            raise ReportError(f"{path / SWEEP_INDEX}: unreadable sweep index ({err}); re-run `fedlora compare`") from None
    runs = sorted(child for child in path.iterdir() if (child / CONFIG).exists())
    if not runs:
        raise ReportError(f"{path}: neither a run directory (config.json) nor a sweep directory (sweep.json)")
    return [(run, None) for run in runs]


def _unfinished_reason(run_dir: Path, known_error: str | None) -> str | None:
    try:
        summary = json.loads((run_dir / SUMMARY).read_text())
        if summary.get("status") == "finished" and (run_dir / CONFIG).exists() and read_history(run_dir):
            return None
    except (OSError, ValueError):
        pass
    if (run_dir / ERROR_FILE).exists():
        lines = (run_dir / ERROR_FILE).read_text().strip().splitlines()
        return f"failed: {lines[0] if lines else 'see error.txt'}"
    if known_error:
        return f"failed: {known_error}"
    return "not finished" if run_dir.exists() else "not started"


def load_run(run_dir: Path, name: str | None = None) -> RunResult:
    """A finished run directory's config, summary and history."""
    run_dir = Path(run_dir)
    return RunResult(
        name=name or run_dir.name,
        run_dir=run_dir,
        config=json.loads((run_dir / CONFIG).read_text()),
        summary=read_summary(run_dir),
        history=read_history(run_dir),
    )


def record_value(record: dict[str, Any], key: str) -> Any:
    """A per-round figure, whether recorded as a field of the round or inside its `extra`."""
    value = record.get(key)
    if value is None:
        value = (record.get("extra") or {}).get(key)
    return value


def epsilon_of(record: dict[str, Any]) -> float | None:
    """The round's epsilon (max over clients), if recorded."""
    value = record_value(record, "epsilon_max")
    if value is None:
        value = record_value(record, "epsilon")
    return None if value is None else float(value)


def detection_of(record: dict[str, Any]) -> tuple[float | None, float | None]:
    """The round's true and false positive rates of flagging attackers, recorded or derived.

    Derived from `flagged` and `malicious` client ids when the rates themselves are not
    recorded: the clients seen are the accepted ones plus the flagged ones.
    """
    tpr, fpr = record_value(record, "tpr"), record_value(record, "fpr")
    if tpr is not None or fpr is not None:
        return (None if tpr is None else float(tpr)), (None if fpr is None else float(fpr))
    flagged, malicious = record_value(record, "flagged"), record_value(record, "malicious")
    if flagged is None or malicious is None:
        return None, None
    try:
        flagged_ids = {int(c) for c in flagged}
        malicious_ids = {int(c) for c in malicious}
        seen = {int(c) for c in record.get("clients") or []} | flagged_ids
    except (TypeError, ValueError):
        return None, None
    attackers, honest = seen & malicious_ids, seen - malicious_ids
    return (
        len(flagged_ids & attackers) / len(attackers) if attackers else None,
        len(flagged_ids & honest) / len(honest) if honest else None,
    )


# --- grouping -----------------------------------------------------------------------------


def compare(runs: list[RunResult], excluded: list[Excluded] | None = None) -> Comparison:
    """Group runs into variants by their config differences (seed and output aside)."""
    flat = {run.name: _flatten(run.config) for run in runs}
    keys: list[str] = []
    for values in flat.values():
        keys += [k for k in values if k not in keys]
    differing = [k for k in keys if len({_canonical(flat[name].get(k)) for name in flat}) > 1]
    experiment_keys = [k for k in keys if k.split(".")[0] != "output"]
    fields = [k for k in differing if k != "seed" and k.split(".")[0] != "output"]
    groups: dict[tuple[str, ...], list[RunResult]] = {}
    for run in runs:
        groups.setdefault(tuple(_canonical(flat[run.name].get(k)) for k in fields), []).append(run)
    variants = []
    for members in groups.values():
        settings = {k: flat[members[0].name].get(k) for k in fields}
        members.sort(key=lambda run: _seed_order(run.seed))
        variants.append(Variant(settings=settings, label=variant_label(settings), runs=members))
    variants.sort(key=lambda v: -(v.stat(lambda run: run.final_accuracy)[0] or 0.0))  # stable: ties keep run order
    base: dict[str, Any] = {}
    for key in experiment_keys:
        if key not in differing:
            _set_nested(base, key, flat[runs[0].name].get(key))
    overrides = {
        run.name: [
            f"{k}={_override_value(flat[run.name][k])}"
            for k in differing
            if k in experiment_keys and flat[run.name].get(k) is not None
        ]
        for run in runs
    }
    return Comparison(runs, fields, variants, base, overrides, list(excluded or []))


def variant_label(settings: dict[str, Any]) -> str:
    """`strategy=fedit, privacy.enabled=true`: a `.name` key shows as its section."""
    parts = [f"{key.removesuffix('.name')}={format_value(value)}" for key, value in settings.items()]
    return ", ".join(parts) or "all runs"


def format_value(value: Any) -> str:
    """A config value as a table cell."""
    if value is None:
        return NO_SPREAD
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ", ".join(format_value(v) for v in value)
    return str(value)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _set_nested(tree: dict[str, Any], key: str, value: Any) -> None:
    *sections, leaf = key.split(".")
    for section in sections:
        tree = tree.setdefault(section, {})
    tree[leaf] = value


def _seed_order(seed: Any) -> tuple[int, Any]:
    return (0, seed) if isinstance(seed, int) else (1, str(seed))


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _override_value(value: Any) -> str:
    """A value as `--set` reads it: bare where that reads back the same, TOML otherwise."""
    if isinstance(value, str) and _parse_value(value) == value and value.strip() == value and value:
        return value
    return toml_value(value)


def toml_value(value: Any) -> str:
    """A TOML literal for a plain value (string, number, boolean, list, table)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON's escapes are valid in a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {toml_value(v)}" for k, v in value.items() if v is not None) + " }"
    raise TypeError(f"no TOML literal for {value!r}")


def _toml_key(key: str) -> str:
    return key if key and all(c.isalnum() or c in "_-" for c in key) and key.isascii() else json.dumps(key)


def config_toml(tree: dict[str, Any], _path: tuple[str, ...] = ()) -> str:
    """A config tree as TOML; None values are left out (every optional key defaults to None)."""
    lines = [f"[{'.'.join(_toml_key(p) for p in _path)}]"] if _path else []
    tables = []
    for key, value in tree.items():
        if isinstance(value, dict):
            tables.append((key, value))
        elif value is not None:
            lines.append(f"{_toml_key(key)} = {toml_value(value)}")
    text = "\n".join(lines) + "\n" if lines else ""
    for key, value in tables:
        text += ("\n" if text else "") + config_toml(value, (*_path, key))
    return text


# --- plots ----------------------------------------------------------------------------------


def _accuracy(record: dict[str, Any]) -> float | None:
    return record.get("accuracy")


def _figure(ncols: int):
    from matplotlib.figure import Figure  # no pyplot: no global state, Agg canvas

    figure = Figure(figsize=(11.5, 4.4), layout="constrained")
    axes = figure.subplots(1, ncols, squeeze=False)[0]
    for ax in axes:
        ax.grid(alpha=0.3)
    return figure, list(axes)


def _colors(count: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if count <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(count)]


def _png(figure) -> bytes:
    handles, labels = [], []
    for ax in figure.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    if handles:
        figure.legend(handles, labels, loc="outside right upper", fontsize="small")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _integer_rounds(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")


def _plot_bands(
    ax, comparison: Comparison, extract: Callable[[dict[str, Any]], float | None], start: int, scale: float = 1.0
) -> None:
    for i, (variant, color) in enumerate(zip(comparison.variants, _colors(len(comparison.variants)))):
        rounds, mean, low, high = variant.band(extract, start)
        if not rounds:
            continue
        # Line styles and markers keep variants with equal values (e.g. equal bytes) visible.
        style, marker = LINE_STYLES[i % len(LINE_STYLES)], MARKERS[i % len(MARKERS)]
        ax.plot(rounds, [m / scale for m in mean], linestyle=style, marker=marker, markersize=4, color=color, label=variant.label)
        if len(variant.runs) > 1:
            ax.fill_between(rounds, [v / scale for v in low], [v / scale for v in high], color=color, alpha=0.18, linewidth=0)
    _integer_rounds(ax)


def plot_accuracy(comparison: Comparison) -> bytes:
    """Test accuracy per round: mean over seeds, min-max band."""
    figure, (ax,) = _figure(1)
    _plot_bands(ax, comparison, _accuracy, start=0)
    ax.set_ylabel("test accuracy")
    ax.set_title("Test accuracy per round (line: mean over seeds; band: min to max)")
    return _png(figure)


def plot_epsilon(comparison: Comparison) -> bytes:
    """Final accuracy against the final epsilon; variants without DP as dashed reference lines."""
    figure, (ax,) = _figure(1)
    for variant, color in zip(comparison.variants, _colors(len(comparison.variants))):
        points = [(run.final_epsilon, run.final_accuracy) for run in variant.runs if run.final_epsilon is not None]
        if points:
            ax.scatter(*zip(*points), color=color, alpha=0.45, s=22)
            eps_mean, eps_std = variant.stat(lambda run: run.final_epsilon)
            acc_mean, acc_std = variant.stat(lambda run: run.final_accuracy)
            ax.errorbar(
                [eps_mean],
                [acc_mean],
                xerr=[eps_std or 0.0],
                yerr=[acc_std or 0.0],
                fmt="D",
                color=color,
                capsize=4,
                label=variant.label,
            )
        else:
            acc_mean, _ = variant.stat(lambda run: run.final_accuracy)
            ax.axhline(acc_mean, linestyle="--", color=color, alpha=0.8, label=f"{variant.label} (no DP)")
    ax.set_xlabel("ε after the last round (max over clients)")
    ax.set_ylabel("final test accuracy")
    ax.set_title("Final accuracy against privacy budget (dots: runs; diamonds: mean ± std)")
    return _png(figure)


def plot_bytes(comparison: Comparison) -> bytes:
    """Bytes up and down per round, mean over seeds."""
    peak = max((max(r.get("bytes_up") or 0, r.get("bytes_down") or 0) for run in comparison.runs for r in run.history), default=0)
    unit, scale = _byte_unit(peak)
    figure, (up, down) = _figure(2)
    _plot_bands(up, comparison, lambda r: r.get("bytes_up"), start=1, scale=scale)
    _plot_bands(down, comparison, lambda r: r.get("bytes_down"), start=1, scale=scale)
    up.set_ylabel(f"uplink ({unit} per round, all clients)")
    down.set_ylabel(f"downlink ({unit} per round, all clients)")
    up.set_title("Clients to server")
    down.set_title("Server to clients")
    return _png(figure)


def plot_time(comparison: Comparison) -> bytes:
    """Server and client seconds per round, mean over seeds."""
    figure, (server, client) = _figure(2)
    _plot_bands(server, comparison, lambda r: r.get("server_seconds"), start=1)
    _plot_bands(client, comparison, lambda r: r.get("client_seconds"), start=1)
    server.set_ylabel("server seconds per round")
    client.set_ylabel("client seconds per round")
    server.set_title("Server: aggregation and evaluation")
    client.set_title("Clients: local training")
    return _png(figure)


def plot_detection(comparison: Comparison) -> bytes:
    """True and false positive rates of flagging attackers per round."""
    figure, (tpr, fpr) = _figure(2)
    _plot_bands(tpr, comparison, lambda r: detection_of(r)[0], start=1)
    _plot_bands(fpr, comparison, lambda r: detection_of(r)[1], start=1)
    for ax, name in ((tpr, "true positive rate (attackers flagged)"), (fpr, "false positive rate (honest flagged)")):
        ax.set_ylabel(name)
        ax.set_ylim(-0.05, 1.05)
    tpr.set_title("Attackers caught")
    fpr.set_title("Honest clients dropped")
    return _png(figure)


def _byte_unit(peak: float) -> tuple[str, float]:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if peak >= scale:
            return unit, scale
    return "bytes", 1.0


# --- tables ---------------------------------------------------------------------------------


@dataclass
class Table:
    """Rows of cells for both renderings; `text` columns are left-aligned, `highlight` is the winner row."""

    headers: list[str]
    rows: list[list[str]]
    text: set[int] = field(default_factory=set)
    highlight: set[int] = field(default_factory=set)


def _number(value: float | None, digits: int = 4) -> str:
    return NO_SPREAD if value is None else f"{value:.{digits}f}"


def _mean_std(mean: float | None, std: float | None, digits: int = 4) -> str:
    if mean is None:
        return NO_SPREAD
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def format_bytes(value: float | None) -> str:
    """Bytes in a readable unit."""
    if value is None:
        return NO_SPREAD
    unit, scale = _byte_unit(value)
    return f"{value / scale:.2f} {unit}" if scale > 1 else f"{value:.0f} bytes"


def _server_seconds(run: RunResult) -> float | None:
    return run.mean_per_round(lambda r: r.get("server_seconds"))


def _client_seconds(run: RunResult) -> float | None:
    return run.mean_per_round(lambda r: r.get("client_seconds"))


def _tpr(run: RunResult) -> float | None:
    return run.mean_per_round(lambda r: detection_of(r)[0])


def _fpr(run: RunResult) -> float | None:
    return run.mean_per_round(lambda r: detection_of(r)[1])


def summary_table(comparison: Comparison) -> Table:
    """One row per variant, best mean final accuracy first, the winner marked."""
    headers = ["rank", *comparison.fields, "seeds", "final accuracy", "best accuracy"]
    if comparison.has_epsilon:
        headers.append("final ε")
    headers += ["uplink / run", "downlink / run", "server s / round", "client s / round"]
    if comparison.has_detection:
        headers += ["TPR", "FPR"]
    rows = []
    top = winners(comparison)
    for rank, variant in enumerate(comparison.variants, 1):
        if variant in top and len(comparison.variants) > 1:
            row = ["1 ★ tied" if len(top) > 1 else "1 ★ winner"]
        else:
            row = [str(rank)]
        row += [format_value(variant.settings[f]) for f in comparison.fields]
        row.append(", ".join(format_value(s) for s in variant.seeds))
        row.append(_mean_std(*variant.stat(lambda run: run.final_accuracy)))
        row.append(_mean_std(*variant.stat(lambda run: run.best_accuracy)))
        if comparison.has_epsilon:
            row.append(_mean_std(*variant.stat(lambda run: run.final_epsilon), digits=2))
        row.append(format_bytes(variant.stat(lambda run: run.bytes_up)[0]))
        row.append(format_bytes(variant.stat(lambda run: run.bytes_down)[0]))
        row.append(_number(variant.stat(_server_seconds)[0], 3))
        row.append(_number(variant.stat(_client_seconds)[0], 3))
        if comparison.has_detection:
            row.append(_mean_std(*variant.stat(_tpr), digits=3))
            row.append(_mean_std(*variant.stat(_fpr), digits=3))
        rows.append(row)
    text = set(range(len(comparison.fields) + 2))
    highlight = set(range(len(top))) if len(comparison.variants) > 1 else set()
    return Table(headers, rows, text, highlight)


def winners(comparison: Comparison) -> list[Variant]:
    """The variant(s) with the best mean final accuracy: more than one on a tie."""
    means = [v.stat(lambda run: run.final_accuracy)[0] for v in comparison.variants]
    return [v for v, mean in zip(comparison.variants, means) if mean == means[0]]


def runs_table(comparison: Comparison) -> Table:
    """One row per run, in the order of the summary table."""
    headers = ["run", *comparison.fields, "seed", "final accuracy", "best accuracy"]
    if comparison.has_epsilon:
        headers.append("final ε")
    headers += ["uplink", "downlink", "server s / round", "client s / round"]
    if comparison.has_detection:
        headers += ["TPR", "FPR"]
    rows = []
    for variant in comparison.variants:
        for run in variant.runs:
            row = [run.name, *(format_value(variant.settings[f]) for f in comparison.fields), format_value(run.seed)]
            row += [_number(run.final_accuracy), _number(run.best_accuracy)]
            if comparison.has_epsilon:
                row.append(_number(run.final_epsilon, 2))
            row += [format_bytes(run.bytes_up), format_bytes(run.bytes_down)]
            row += [_number(_server_seconds(run), 3), _number(_client_seconds(run), 3)]
            if comparison.has_detection:
                row += [_number(_tpr(run), 3), _number(_fpr(run), 3)]
            rows.append(row)
    return Table(headers, rows, set(range(len(comparison.fields) + 2)))


def versions_table(comparison: Comparison) -> tuple[Table, bool]:
    """Package versions; one column per distinct set (and whether there is more than one)."""
    sets: dict[str, list[str]] = {}
    recorded: dict[str, dict[str, str]] = {}
    for run in comparison.runs:
        versions = run.summary.get("versions") or {}
        sets.setdefault(_canonical(versions), []).append(run.name)
        recorded.setdefault(_canonical(versions), versions)
    packages: list[str] = []
    for versions in recorded.values():
        packages += [p for p in versions if p not in packages]
    if len(sets) == 1:
        headers = ["package", "version"]
    else:
        headers = ["package", *(f"runs: {', '.join(names)}" for names in sets.values())]
    rows = [[package, *(str(recorded[key].get(package, NO_SPREAD)) for key in sets)] for package in packages]
    return Table(headers, rows, set(range(len(headers)))), len(sets) > 1


def reproduce_table(comparison: Comparison) -> Table:
    """The command that re-runs each run from config.toml."""
    rows = [
        [run.name, " ".join(f"--set {shlex.quote(item)}" for item in comparison.overrides[run.name])]
        for variant in comparison.variants
        for run in variant.runs
    ]
    return Table(["run", f"fedlora simulate {BASE_CONFIG_FILE} ..."], rows, {0, 1})


def notes(comparison: Comparison) -> list[tuple[str, bool]]:
    """What a reader must know before trusting the ranking: (text, is a warning)."""
    found: list[tuple[str, bool]] = []
    variants = comparison.variants
    first = variants[0]
    first_mean, first_std = first.stat(lambda run: run.final_accuracy)
    if len(variants) == 1:
        found.append((f"One variant ({first.label}): nothing to rank; the tables show its spread over seeds.", False))
    else:
        second = variants[1]
        second_mean, second_std = second.stat(lambda run: run.final_accuracy)
        lead = first_mean - second_mean
        text = (
            f"Winner: {first.label}, final accuracy {_mean_std(first_mean, first_std)} over {len(first.runs)} "
            f"seed{'s' if len(first.runs) > 1 else ''}. Runner-up: {second.label}, {_mean_std(second_mean, second_std)}."
        )
        spread = max(first_std or 0.0, second_std or 0.0)
        if lead == 0:
            tied = winners(comparison)
            found.append(
                (
                    f"No winner: {len(tied)} variants tie at final accuracy {first_mean:.4f} ({'; '.join(v.label for v in tied)}).",
                    True,
                )
            )
        elif first_std is None or second_std is None:
            found.append((text + f" The lead of {lead:.4f} comes from single runs: it may be seed noise; add seeds.", True))
        elif lead <= spread:
            found.append(
                (
                    text
                    + f" The lead of {lead:.4f} is within the spread over seeds (std up to {spread:.4f}): more seeds are needed to call it.",
                    True,
                )
            )
        else:
            found.append((text + f" The lead of {lead:.4f} exceeds the spread over seeds (std up to {spread:.4f}).", False))
    seed_sets = {tuple(sorted(map(str, v.seeds))) for v in variants}
    if len(seed_sets) > 1:
        found.append(("The variants did not all run on the same seeds: compare them with care.", True))
    if comparison.excluded:
        found.append((f"{len(comparison.excluded)} run(s) are not included (failed or not finished): see the list below.", True))
    return found


# --- rendering ------------------------------------------------------------------------------

CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;max-width:1240px;margin:1.5rem auto;padding:0 1.2rem;color:#1d232b;line-height:1.45}
h1{font-size:1.6rem;margin:0 0 .3rem}
h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #d8dee6;padding-bottom:.25rem}
.meta,figcaption,.empty{color:#5b6673;font-size:.9rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.86rem;font-variant-numeric:tabular-nums}
th,td{border:1px solid #d8dee6;padding:.28rem .55rem;text-align:right;vertical-align:top}
td{white-space:nowrap}
th{background:#eef2f6;text-align:center}
td.text{text-align:left;white-space:normal}
tr.winner td{background:#fff3c4;font-weight:600}
figure{margin:.8rem 0}
img{max-width:100%;height:auto;border:1px solid #e6eaef}
.note{background:#eef2f6;border-left:4px solid #6f8498;padding:.45rem .8rem;margin:.5rem 0}
.note.warn{background:#fff6e0;border-left-color:#c98a00}
pre{background:#f5f7f9;padding:.7rem;overflow:auto;font-size:.8rem}
code{font-size:.85em}
"""

SECTIONS = (
    (
        "accuracy",
        "Accuracy per round",
        "Test accuracy of the global model on the server's held-out set after each round (round 0: before training).",
    ),
    (
        "epsilon",
        "Final accuracy against ε",
        "ε: the privacy budget spent by the end of the run, the maximum over clients (δ as configured).",
    ),
    (
        "bytes",
        "Communication per round",
        "Bytes of LoRA factors (and head) sent in each round, summed over the clients of the round.",
    ),
    ("time", "Time per round", "Server: aggregation plus evaluation. Clients: local training, as the clients reported it."),
    (
        "detection",
        "Detection of attackers",
        "Per round: the share of attackers flagged (TPR) and of honest clients flagged (FPR).",
    ),
)
EMPTY = {
    "epsilon": "No run used differential privacy (no ε recorded): there is no accuracy–ε trade-off to plot.",
    "detection": "No run recorded detection rates (runs with attackers and a robust filter record them).",
}


def _html_table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.headers)
    body = []
    for i, row in enumerate(table.rows):
        cells = "".join(
            f'<td class="text">{html.escape(c)}</td>' if j in table.text else f"<td>{html.escape(c)}</td>"
            for j, c in enumerate(row)
        )
        body.append(f'<tr class="winner">{cells}</tr>' if i in table.highlight else f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _md_table(table: Table) -> str:
    def cell(text: str, bold: bool) -> str:
        text = text.replace("|", "\\|")
        return f"**{text}**" if bold and text else text

    lines = ["| " + " | ".join(cell(h, False) for h in table.headers) + " |"]
    lines.append("|" + "|".join(":---" if j in table.text else "---:" for j in range(len(table.headers))) + "|")
    for i, row in enumerate(table.rows):
        lines.append("| " + " | ".join(cell(c, i in table.highlight) for c in row) + " |")
    return "\n".join(lines)


def _meta(comparison: Comparison) -> str:
    seeds = [format_value(s) for s in sorted({run.seed for run in comparison.runs}, key=_seed_order)]
    fields = ", ".join(comparison.fields) or "none (only the seed differs)"
    return (
        f"{len(comparison.runs)} runs in {len(comparison.variants)} variants · seeds {', '.join(seeds)} · "
        f"variant fields: {fields} · generated {time.strftime('%Y-%m-%d %H:%M')}"
    )


def render_html(comparison: Comparison, title: str, plots: dict[str, bytes], base_toml: str) -> str:
    """The self-contained HTML report."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="meta">{html.escape(_meta(comparison))}</p>',
        "<h2>Summary</h2>",
        "<p>Sorted by final accuracy, mean ± standard deviation over seeds; the winner is marked ★.</p>",
        _html_table(summary_table(comparison)),
    ]
    for text, warn in notes(comparison):
        parts.append(f'<p class="note{" warn" if warn else ""}">{html.escape(text)}</p>')
    for key, heading, caption in SECTIONS:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        if key in plots:
            data = base64.b64encode(plots[key]).decode("ascii")
            parts.append(
                f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(heading)}">'
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
        else:
            parts.append(f'<p class="empty">{html.escape(EMPTY[key])}</p>')
    parts += ["<h2>Runs</h2>", _html_table(runs_table(comparison))]
    if comparison.excluded:
        rows = [[str(e.path), e.reason] for e in comparison.excluded]
        parts += ["<h2>Not included</h2>", _html_table(Table(["run directory", "why"], rows, {0, 1}))]
    versions, mixed = versions_table(comparison)
    parts += [
        "<h2>Reproduce</h2>",
        f"<p>The settings every run shares are in <code>{BASE_CONFIG_FILE}</code> beside this report "
        "(output settings left out); each run is that file plus its own <code>--set</code> overrides. "
        "Every run directory also holds its full resolved <code>config.json</code>.</p>",
        f"<pre>{html.escape(base_toml)}</pre>",
        _html_table(reproduce_table(comparison)),
        "<h3>Package versions</h3>",
    ]
    if mixed:
        parts.append('<p class="note warn">The runs used different package versions.</p>')
    parts += [_html_table(versions), "</body></html>"]
    return "\n".join(parts) + "\n"


def render_markdown(comparison: Comparison, title: str, plots: dict[str, str], base_toml: str) -> str:
    """The Markdown report; `plots` maps a plot to its PNG file name beside the report."""
    parts = [
        f"# {title}",
        _meta(comparison),
        "## Summary",
        "Sorted by final accuracy, mean ± standard deviation over seeds; the winner is marked ★.",
        _md_table(summary_table(comparison)),
    ]
    parts += [f"> {'**Note:** ' if warn else ''}{text}" for text, warn in notes(comparison)]
    for key, heading, caption in SECTIONS:
        parts.append(f"## {heading}")
        parts.append(f"![{heading}]({plots[key]})\n\n{caption}" if key in plots else f"_{EMPTY[key]}_")
    parts += ["## Runs", _md_table(runs_table(comparison))]
    if comparison.excluded:
        rows = [[str(e.path), e.reason] for e in comparison.excluded]
        parts += ["## Not included", _md_table(Table(["run directory", "why"], rows, {0, 1}))]
    versions, mixed = versions_table(comparison)
    parts += [
        "## Reproduce",
        f"The settings every run shares are in `{BASE_CONFIG_FILE}` beside this report (output settings left out); "
        "each run is that file plus its own `--set` overrides. Every run directory also holds its full resolved `config.json`.",
        f"```toml\n{base_toml}```",
        _md_table(reproduce_table(comparison)),
        "### Package versions",
    ]
    if mixed:
        parts.append("> **Note:** the runs used different package versions.")
    parts.append(_md_table(versions))
    return "\n\n".join(parts) + "\n"


def results_rows(comparison: Comparison) -> list[dict[str, Any]]:
    """results.csv as dicts: one per run, full precision, empty where a figure is not recorded."""
    rows = []
    for variant in comparison.variants:
        for run in variant.runs:
            row: dict[str, Any] = {"run": run.name, "variant": variant.label}
            row.update({f: _csv_value(variant.settings[f]) for f in comparison.fields})
            row.update(
                seed=run.seed,
                rounds=run.history[-1]["round"],
                final_accuracy=run.final_accuracy,
                best_accuracy=run.best_accuracy,
                final_epsilon=run.final_epsilon,
                bytes_up=run.bytes_up,
                bytes_down=run.bytes_down,
                server_seconds_per_round=_server_seconds(run),
                client_seconds_per_round=_client_seconds(run),
                tpr=_tpr(run),
                fpr=_fpr(run),
                overrides=" ".join(shlex.quote(item) for item in comparison.overrides[run.name]),
                run_dir=str(run.run_dir),
            )
            rows.append({k: "" if v is None else v for k, v in row.items()})
    return rows


def _csv_value(value: Any) -> Any:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return value


def write_report(paths: list[Path], out: Path, title: str = "fedlora comparison") -> ReportFiles:
    """Read the runs under `paths` and write report.html, report.md, results.csv, plots and config.toml into `out`."""
    run_dirs, excluded = find_runs(paths)
    names = [d.name for d in run_dirs]
    runs = [load_run(d, d.name if names.count(d.name) == 1 else f"{d.parent.name}/{d.name}") for d in run_dirs]
    comparison = compare(runs, excluded)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    makers = {"accuracy": plot_accuracy, "bytes": plot_bytes, "time": plot_time}
    if comparison.has_epsilon:
        makers["epsilon"] = plot_epsilon
    if comparison.has_detection:
        makers["detection"] = plot_detection
    plots = {key: makers[key](comparison) for key in PLOTS if key in makers}
    plot_files = []
    for key in PLOTS:
        path = out / f"{key}.png"
        if key in plots:
            path.write_bytes(plots[key])
            plot_files.append(path)
        else:
            path.unlink(missing_ok=True)  # a stale plot from an earlier report
    base_toml = config_toml(comparison.base_config)
    (out / BASE_CONFIG_FILE).write_text(
        "# The settings every run of this report shares; see report.md for each run's --set overrides.\n" + base_toml
    )
    rows = results_rows(comparison)
    with (out / CSV_FILE).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / MARKDOWN_FILE).write_text(render_markdown(comparison, title, {k: f"{k}.png" for k in plots}, base_toml))
    (out / HTML_FILE).write_text(render_html(comparison, title, plots, base_toml))
    return ReportFiles(out, out / HTML_FILE, out / MARKDOWN_FILE, out / CSV_FILE, plot_files, comparison)
