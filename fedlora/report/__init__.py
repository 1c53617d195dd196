"""Comparison reports: run directories in; report.html, report.md, results.csv and plots out.

    report.html    one self-contained file: CSS inline, plots as base64 PNG; opens offline
    report.md      the same tables, with the plots beside it as PNG files
    results.csv    one row per run
    config.toml    the settings every run shares: each run is `fedlora simulate config.toml`
                   with the `--set` overrides the report lists for it

Runs are grouped into variants by their resolved configs: every key that differs between runs,
except the seed and the output location, is a variant field. A variant's figures are the mean
over its seeds, with the spread (min-max band in plots, standard deviation in tables).

    data.py       run directories -> RunResult, Variant, Comparison (reading, grouping, labels)
    reproduce.py  the shared settings as TOML and each run's --set overrides
    tables.py     summary, runs, versions and reproduce tables; the notes above the plots
    plots.py      the plots, as PNG bytes
    pages.py      HTML, Markdown and CSV; write_report
"""

from fedlora.report.data import SWEEP_INDEX, Comparison, Excluded, ReportError, RunResult, Variant, compare, find_runs, load_run
from fedlora.report.pages import ReportFiles, write_report
from fedlora.report.reproduce import config_toml, toml_value
from fedlora.report.tables import counted, winners

__all__ = [
    "SWEEP_INDEX",
    "Comparison",
    "Excluded",
    "ReportError",
    "ReportFiles",
    "RunResult",
    "Variant",
    "compare",
    "config_toml",
    "counted",
    "find_runs",
    "load_run",
    "toml_value",
    "winners",
    "write_report",
]
