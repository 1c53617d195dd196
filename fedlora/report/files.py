"""Writing a report: results.csv's rows, where a report goes, and its files (all rendered before
any is written, each replaced whole, so a report that cannot be written leaves the old one as it was)."""

from __future__ import annotations

import csv
import io
import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora.report import plots as plotting
from fedlora.report.data import Comparison, ReportError, RunResult, compare
from fedlora.report.evaluation import client_spread, macro_f1
from fedlora.report.pages import render_html, render_markdown
from fedlora.report.paired import FIGURES, PairedTest, accuracy_auc, baseline_tests
from fedlora.report.reading import SWEEP_INDEX, read_runs
from fedlora.report.reproduce import config_toml
from fedlora.report.tables import BASE_CONFIG_FILE, client_seconds, fpr, server_seconds, tpr
from fedlora.results import RUN_REPORT_DIR

HTML_FILE = "report.html"
MARKDOWN_FILE = "report.md"
CSV_FILE = "results.csv"
REPORT_FILES = (HTML_FILE, MARKDOWN_FILE, CSV_FILE, BASE_CONFIG_FILE)


@dataclass
class ReportFiles:
    """Where a report was written."""

    out: Path
    html: Path
    markdown: Path
    csv: Path
    plots: list[Path]
    comparison: Comparison


def default_out(paths: list[Path]) -> Path:
    """Where a report of `paths` goes: into a sweep directory itself (fedlora made it, and `compare`
    wrote its report there), into report/ of a run directory or of any other folder of runs (the
    user's own folder: nothing of theirs is replaced), and for several paths into report/ in the
    folder they share."""
    paths = [Path(p) for p in paths]
    if len(paths) == 1:
        return paths[0] if (paths[0] / SWEEP_INDEX).is_file() else paths[0] / RUN_REPORT_DIR
    return Path(os.path.commonpath([p.resolve() for p in paths])) / RUN_REPORT_DIR


def write_report(
    paths: list[Path],
    out: Path,
    title: str = "fedlora comparison",
    baseline: list[str] | None = None,
    overwrite: bool = True,
) -> ReportFiles:
    """Read the runs under `paths` and write report.html, report.md, results.csv, plots and config.toml
    into `out`; without `overwrite`, a report of other runs already in `out` is refused."""
    runs, excluded = read_runs(paths)
    comparison = compare(runs, excluded, baseline)
    out = Path(out)
    _check_out(out, comparison, overwrite or _is_own_report(out, paths))
    plots = plotting.make_plots(comparison)
    base_toml = config_toml(comparison.base_config)
    files: dict[str, bytes] = {f"{key}.png": data for key, data in plots.items()}
    files[BASE_CONFIG_FILE] = (
        "# The settings every run of this report shares; see report.md for each run's --set overrides.\n" + base_toml
    ).encode()
    files[CSV_FILE] = _csv_text(results_rows(comparison)).encode()
    files[MARKDOWN_FILE] = render_markdown(comparison, title, {k: f"{k}.png" for k in plots}, base_toml).encode()
    files[HTML_FILE] = render_html(comparison, title, plots, base_toml).encode()
    stale = [out / f"{key}.png" for key in plotting.PLOTS if key not in plots]  # plots an earlier report made
    _write(out, files, stale)
    return ReportFiles(
        out, out / HTML_FILE, out / MARKDOWN_FILE, out / CSV_FILE, [out / f"{key}.png" for key in plots], comparison
    )


def _is_own_report(out: Path, paths: list[Path]) -> bool:
    """Whether `out` is one folder's own report (re-rendered with whatever ran since); the report/
    folder several paths share may hold another selection's report, so it is not."""
    return len(paths) == 1 and out.resolve() == default_out(paths).resolve()


def _check_out(out: Path, comparison: Comparison, overwrite: bool) -> None:
    """Refuse an `out` that is a file, or (without `overwrite`) that holds a report of runs other than these."""
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {out}: is a file, not a directory; give --out a directory for the report")
    previous = out / CSV_FILE
    if overwrite:
        return
    if not previous.is_file():
        foreign = sorted(name for name in REPORT_FILES if (out / name).exists())
        if foreign:  # files of ours by name, but no report made them: the user's own
            raise ReportError(
                f"{out}: already holds {', '.join(foreign)} but no report; give --out another directory, "
                "or --overwrite to replace them"
            )
        return
    ours = {str(run.run_dir.resolve()) for run in comparison.runs} | {str(e.path.resolve()) for e in comparison.excluded}
    try:
        with previous.open(newline="") as handle:
            theirs = {str(Path(row["run_dir"]).resolve()) for row in csv.DictReader(handle)}
    except (KeyError, TypeError, UnicodeDecodeError, csv.Error, OSError):  # a damaged or unreadable results.csv
        theirs = {"?"}
    if not theirs <= ours:
        raise ReportError(
            f"{out}: holds the report of other runs ({previous} lists runs these paths do not hold); "
            "give --out another directory, or --overwrite to replace it"
        )


def _write(out: Path, files: dict[str, bytes], stale: list[Path]) -> None:
    """Each file written beside its final name and moved over it: a reader sees the old or the new file, never a part."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            partial = out / f".{name}.partial"
            partial.write_bytes(data)
            os.replace(partial, out / name)
        for path in stale:
            path.unlink(missing_ok=True)
    except OSError as err:
        raise ReportError(
            f"--out {out}: cannot write the report there ({err.strerror}); give --out a writable directory"
        ) from None


# --- results.csv ------------------------------------------------------------------------------


def results_rows(comparison: Comparison) -> list[dict[str, Any]]:
    """results.csv as dicts: one per run, full precision, empty where a figure is not recorded; each
    variant's paired differences from its baseline on its runs' rows; the runs not included last,
    with only why."""
    tests = {id(test.variant): test for test in baseline_tests(comparison)}
    several = len(comparison.groups) > 1
    rows = []
    for variant in comparison.variants:
        group = comparison.group_of(variant)
        for run in variant.runs:
            row: dict[str, Any] = {"run": run.name, "variant": variant.label, "settings": variant.description}
            row.update({f: _csv_value(variant.settings[f]) for f in comparison.fields})
            attack = run.attack
            row.update(
                test_set=group.label if several else "",
                seed=run.seed,
                rounds=run.history[-1]["round"],
                final_accuracy=run.final_accuracy,
                best_accuracy=run.best_accuracy,
                accuracy_auc=accuracy_auc(run),
                final_epsilon=run.final_epsilon,
                target_epsilon=run.target_epsilon,
                bytes_up=run.bytes_up,
                bytes_down=run.bytes_down,
                server_seconds_per_round=server_seconds(run),
                client_seconds_per_round=client_seconds(run),
                attack=attack[0] if attack else None,
                attack_fraction=attack[1] if attack else None,
                defence=" ".join(run.defences) or None,
                tpr=tpr(run),
                fpr=fpr(run),
                macro_f1=macro_f1(run),
                **_client_spread_cells(run),
                baseline=group.baseline.label,
                **_difference_cells(tests.get(id(variant))),
                overrides=" ".join(shlex.quote(item) for item in comparison.overrides[run.name]),
                run_dir=str(run.run_dir.resolve()),
                not_included="",
            )
            rows.append(row)
    for excluded in comparison.excluded:
        rows.append({"run": excluded.path.name, "run_dir": str(excluded.path.resolve()), "not_included": excluded.reason})
    columns = list(rows[0])
    return [{k: "" if row.get(k) is None else row.get(k) for k in columns} for row in rows]


def _client_spread_cells(run: RunResult) -> dict[str, Any]:
    """How the clients' own accuracies spread at their last evaluation (empty where they never evaluated)."""
    spread = client_spread(run) or {}
    keys = ("accuracy_mean", "accuracy_worst_decile", "accuracy_min")
    return {f"client_{key}": spread.get(key) for key in keys}


def _difference_cells(test: PairedTest | None) -> dict[str, Any]:
    """A variant's paired differences from its baseline (empty for the baseline itself)."""
    cells: dict[str, Any] = {"shared_seeds": None if test is None else len(test.seeds)}
    for figure in FIGURES:
        name = figure.replace(" ", "_").lower()
        difference = None if test is None else test.figures[figure]
        cells.update(
            {
                f"diff_{name}": difference and difference.mean,
                f"diff_{name}_ci_low": difference and difference.low,
                f"diff_{name}_ci_high": difference and difference.high,
                f"diff_{name}_p_holm": difference and difference.p_holm,
                f"diff_{name}_verdict": "baseline" if difference is None else difference.verdict,
            }
        )
    return cells


def _csv_value(value: Any) -> Any:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return value


def _csv_text(rows: list[dict[str, Any]]) -> str:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()
