"""Comparison reports: run directories in; report.html, report.md, results.csv and plots out.

    report.html    one self-contained file: CSS inline, plots as base64 PNG; opens offline
    report.md      the same tables, with the plots beside it as PNG files
    results.csv    one row per run, each variant's paired differences from its baseline; runs left out: why
    config.toml    the settings every run shares: each run is `fedlora simulate config.toml`
                   with the `--set` overrides the report lists for it

Runs are grouped into variants by their resolved configs: every key that differs between runs,
except the seed and the output location, is a variant field. A variant's figures are the mean
over its seeds, with the spread (min-max band in plots, standard deviation in tables). Variants
are ranked only against variants evaluated on the same held-out set (same task and test data),
and each is tested against its set's baseline, paired by seed (paired.py). A run whose
history.jsonl and summary.json disagree is left out and listed; a file that is not what a run
writes stops the report with one line naming it.

    reading.py    run directories -> RunResult: finished runs found, their files checked, disagreeing ones left out
    data.py       RunResult, Variant, Group, Comparison: variants by config, groups by held-out set, labels
    paired.py     each variant against its group's baseline: paired differences over shared seeds
    reproduce.py  the shared settings as TOML and each run's --set overrides
    tables.py     summary, differences, runs, versions and reproduce tables; the notes above the plots
    plots.py      the plots, as PNG bytes
    pages.py      HTML and Markdown
    files.py      results.csv, where a report goes, write_report
"""

from fedlora.report.data import Comparison, Excluded, Group, ReportError, RunResult, Variant, compare
from fedlora.report.files import ReportFiles, default_out, write_report
from fedlora.report.reading import SWEEP_INDEX, find_runs, load_run, read_runs
from fedlora.report.reproduce import config_toml, toml_value
from fedlora.report.tables import counted, headline, winners

__all__ = [
    "SWEEP_INDEX",
    "Comparison",
    "Excluded",
    "Group",
    "ReportError",
    "ReportFiles",
    "RunResult",
    "Variant",
    "compare",
    "config_toml",
    "default_out",
    "counted",
    "find_runs",
    "headline",
    "load_run",
    "read_runs",
    "toml_value",
    "winners",
    "write_report",
]
