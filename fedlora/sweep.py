"""Sweeps: the `[sweep]` section of an experiment config, expanded into runs of one comparison.

    [sweep]
    "strategy.name" = ["fedit", "ffa_lora"]
    "privacy.enabled" = [false, true]
    seed = [0, 1, 2]

Each axis is a dotted config key with the list of values to try. Every combination of the
values is one variant: the rest of the file with those keys set. A value that is a table sets
several keys of a section at once, so that settings which only make sense together stay one
axis (DP off, or on at three budgets: four variants, not six):

    "privacy" = [{enabled = false}, {enabled = true, epsilon = 1.0}, {enabled = true, epsilon = 3.0}]
 `--set key=value` overrides
the base config; on a key that is an axis it fixes that axis to the one value, and
`--set sweep.key=[...]` replaces an axis's list.

Every variant's config is validated before anything runs, and what only a start can show
(strategy and defence names, trackers, resources, the data, the privacy calibration) is checked
for every setting of the other axes at the first seed; each other seed's data split is checked
as its run starts. Each runs into `<out>/<run name>/`, where the run name spells its settings
(`strategy.name-fedit__seed-0`). `<out>/sweep.json` lists the axes
and every run's status. A run whose summary.json says finished is not run again, so a killed
sweep resumes where it stopped; a run that fails leaves its error in `error.txt`, the sweep goes
on, and the next invocation tries it again.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import re
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedlora.config import ConfigError, ExperimentConfig, _parse_value, config_from_dict, read_config_file
from fedlora.config_compat import config_changes, with_defaults
from fedlora.interrupt import RunInterrupted
from fedlora.results import CONFIG, SUMMARY, RoundRecord
from fedlora.rundir import make_dir

INDEX = "sweep.json"
ERROR = "error.txt"
SEED_AXIS = "seed"
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")
MAX_NAME = 200


class SweepError(ConfigError):
    """A sweep that cannot run as written (bad axis, bad value, stale results in the way)."""


@dataclass(frozen=True)
class Variant:
    """One run of a sweep: its directory name, its axis values and its validated config."""

    name: str
    settings: dict[str, Any]
    config: ExperimentConfig


@dataclass(frozen=True)
class Sweep:
    """A config's base settings and axes, expanded and validated."""

    source: Path
    axes: dict[str, list[Any]]
    variants: list[Variant]

    def default_out(self) -> Path:
        """`<output.dir>/compare-<config file stem>`."""
        return Path(self.variants[0].config.output.dir) / f"compare-{self.source.stem}"


@dataclass
class RunOutcome:
    """What became of one variant in this invocation."""

    variant: Variant
    status: str  # "finished" (this time), "done" (finished before), "failed"
    error: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> Sweep:
    """Read a config with a `[sweep]` section and validate every variant; SweepError names the bad one."""
    path = Path(path)
    raw = read_config_file(path)
    axes = _read_axes(raw.pop("sweep", {}))
    base_overrides = []
    for item in overrides or []:
        key, sep, text = item.partition("=")
        key = key.strip()
        if sep and key.startswith("sweep."):
            key, value = key.removeprefix("sweep."), _parse_value(text.strip())
            axes[key] = _axis_values(key, value if isinstance(value, list) else [value])
        elif sep and key in axes:
            axes[key] = [_parse_value(text.strip())]
        else:
            base_overrides.append(item)
    return Sweep(source=path, axes=axes, variants=_expand(raw, axes, base_overrides))


def _read_axes(section: Any) -> dict[str, list[Any]]:
    if not isinstance(section, dict):
        raise SweepError("[sweep] must be a table of axes, e.g. seed = [0, 1, 2]")
    return {key: _axis_values(key, values) for key, values in section.items()}


def _axis_values(key: str, values: Any) -> list[Any]:
    if key.split(".")[0] == "output":
        raise SweepError(f"[sweep] {key}: output keys cannot be swept (each run's directory is named after its variant)")
    if isinstance(values, dict):
        raise SweepError(f'[sweep] {key}: a table; write the axis as a quoted dotted key, e.g. "{key}.name" = [...]')
    if not isinstance(values, list):
        raise SweepError(f"[sweep] {key}: expected a list of values, e.g. {key} = [{_toml_value(values)}]")
    if not values:
        raise SweepError(f"[sweep] {key}: the list is empty; give at least one value")
    seen = [json.dumps(v, sort_keys=True) for v in values]
    if len(set(seen)) != len(seen):
        raise SweepError(f"[sweep] {key}: a value is listed twice ({values})")
    return list(values)


def _expand(raw: dict[str, Any], axes: dict[str, list[Any]], overrides: list[str]) -> list[Variant]:
    """Every variant, its config validated; then what only a start can show (`check_runnable`) for
    each setting of the other axes, at its first seed. (Checking each seed's data split too would
    take seconds a seed: that is left to its run's start, where a failure is recorded and the sweep goes on.)"""
    variants = _validated_variants(raw, axes, overrides)
    checked: set[str] = set()
    for variant in variants:
        unseeded = {key: value for key, value in variant.settings.items() if key != SEED_AXIS}
        setting = json.dumps(unseeded, sort_keys=True)
        if setting not in checked:
            checked.add(setting)
            _check_variant(variant)
    return variants


def _validated_variants(raw: dict[str, Any], axes: dict[str, list[Any]], overrides: list[str]) -> list[Variant]:
    """Every combination of the axes' values as a validated config (a fraction of a millisecond each)."""
    # The seed varies slowest, so a sweep stopped early still compares every variant on seed 0.
    order = sorted(axes, key=lambda key: key != SEED_AXIS)
    variants: list[Variant] = []
    names: dict[str, dict[str, Any]] = {}
    for values in itertools.product(*(axes[key] for key in order)):
        chosen = dict(zip(order, values))
        settings = {key: chosen[key] for key in axes}  # in the order the file lists the axes
        name = run_name(settings)
        tree = copy.deepcopy(raw)
        try:
            for key, value in settings.items():
                _set_key(tree, key, value)
            config = config_from_dict(tree, overrides)
        except ConfigError as err:
            raise SweepError(f"sweep variant {name}: {err}") from None
        if name in names:
            raise SweepError(
                f"sweep variants {names[name]} and {settings} get the same run name {name!r}; make the values differ"
            )
        names[name] = settings
        variants.append(Variant(name=name, settings=settings, config=config))
    return variants


def _check_variant(variant: Variant) -> None:
    """What the config alone cannot show (strategy, trackers, resources, data, privacy), or SweepError naming the variant."""
    from fedlora.simulation import check_runnable  # imports the strategy registry (and Flower)

    try:
        check_runnable(variant.config)
    except ConfigError as err:
        raise SweepError(f"sweep variant {variant.name}: {err}") from None


def _set_key(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted key; a table value sets each of its keys inside that section."""
    *sections, leaf = key.split(".")
    node = tree
    for section in sections:
        node = node.setdefault(section, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {section} is not a section")
    if isinstance(value, dict):
        for inner, inner_value in value.items():
            _set_key(tree, f"{key}.{inner}", inner_value)
        return
    node[leaf] = copy.deepcopy(value)


def run_name(settings: dict[str, Any]) -> str:
    """A stable, filesystem-safe directory name for a variant: `strategy.name-fedit__seed-0`."""
    parts = [f"{key}-{_slug(value)}" for key, value in settings.items()]
    name = _UNSAFE.sub("-", "__".join(parts)) or "base"
    if len(name) > MAX_NAME:  # keep it a legal file name; the hash keeps it unique
        import hashlib

        digest = hashlib.sha256(name.encode()).hexdigest()[:10]
        name = f"{name[: MAX_NAME - 11]}-{digest}"
    return name


def _slug(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "+".join(_slug(v) for v in value) or "empty"
    if isinstance(value, dict):
        return "+".join(f"{k}-{_slug(v)}" for k, v in value.items()) or "empty"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _toml_value(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, bool) else ("true" if value else "false")


def run_status(run_dir: Path) -> str:
    """The run's status: "finished" when summary.json says so, "failed" when error.txt is there, else "pending"."""
    try:
        summary = json.loads((run_dir / SUMMARY).read_text())
        if isinstance(summary, dict) and summary.get("status") == "finished":
            return "finished"
    except (OSError, ValueError):  # absent, or cut short by a kill (not an object: damaged, so not finished)
        pass
    return "failed" if (run_dir / ERROR).exists() else "pending"


def _check_finished_config(run_dir: Path, variant: Variant) -> None:
    """A finished run is reused only if it ran this variant's config, as a resume would judge it:
    keys added to fedlora since the run was recorded count at their defaults, and where and how
    fast it ran (output, CPUs, Ray address) may differ."""
    try:
        recorded = json.loads((run_dir / CONFIG).read_text())
    except (OSError, ValueError):
        recorded = None
    recorded = with_defaults(recorded) if isinstance(recorded, dict) else {}
    changed = config_changes(recorded, variant.config.model_dump(mode="json"))
    if changed:
        raise SweepError(
            f"{run_dir} finished with a different config ({', '.join(changed)} changed); delete it or choose another --out"
        )


def _write_index(out: Path, sweep: Sweep, statuses: dict[str, dict[str, Any]]) -> None:
    index = {
        "config": str(sweep.source),
        "axes": sweep.axes,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "runs": [{"name": v.name, "settings": v.settings, **statuses[v.name]} for v in sweep.variants],
    }
    partial = out / (INDEX + ".partial")
    partial.write_text(json.dumps(index, indent=2))
    partial.replace(out / INDEX)  # atomic: a kill never leaves half an index


def run_sweep(sweep: Sweep, out: Path, console: Console | None = None, stop: threading.Event | None = None) -> list[RunOutcome]:
    """Run every variant not yet finished into `<out>/<name>/`, with a progress bar and a line per run.

    A variant left unfinished by an earlier invocation starts again from scratch. Once `stop` is
    set, the run in progress stops after its round (RunInterrupted) and so does the sweep.
    """
    from fedlora.simulation import one_ray_for_every_run, quiet_flower_logs, ray_init_args, restart_ray, simulate

    console = console or Console()
    out = Path(out)
    make_dir(out)
    statuses: dict[str, dict[str, Any]] = {}
    for variant in sweep.variants:
        status = run_status(out / variant.name)
        if status == "finished":
            _check_finished_config(out / variant.name, variant)
        statuses[variant.name] = {"status": status}
        if status == "failed":
            statuses[variant.name]["error"] = _first_line((out / variant.name / ERROR).read_text())
    _write_index(out, sweep, statuses)
    quiet_flower_logs()
    outcomes: list[RunOutcome] = []
    done = sum(s["status"] == "finished" for s in statuses.values())
    console.print(
        f"[bold]sweep[/bold] {sweep.source.name}: {len(sweep.variants)} runs over "
        f"{', '.join(f'{k} ({len(v)})' for k, v in sweep.axes.items()) or 'no axes'}; "
        f"{done} already finished; writing to {out}",
        highlight=False,
        soft_wrap=True,
    )
    # One Ray instance for every variant saves Ray's start-up (several seconds) per run; variants
    # that would start Ray differently (another ray_address) each start their own.
    init_args = {json.dumps(ray_init_args(variant.config), sort_keys=True) for variant in sweep.variants}
    shared_ray = one_ray_for_every_run() if len(init_args) == 1 else contextlib.nullcontext()
    with (
        shared_ray,
        Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
        ) as progress,
    ):
        overall = progress.add_task("[bold]runs[/bold]", total=len(sweep.variants), completed=done)
        for variant in sweep.variants:
            run_dir = out / variant.name
            if statuses[variant.name]["status"] == "finished":
                outcomes.append(RunOutcome(variant, "done"))
                continue
            statuses[variant.name] = {"status": "running"}
            _write_index(out, sweep, statuses)
            (run_dir / ERROR).unlink(missing_ok=True)
            config = variant.config.model_copy(deep=True)
            config.output.dir = str(out)
            config.output.name = variant.name
            rounds = config.federation.rounds
            line = progress.add_task(f"  {variant.name}: starting", total=rounds)

            def on_round(record: RoundRecord, line: int = line, name: str = variant.name, rounds: int = rounds) -> None:
                progress.update(
                    line,
                    completed=record.round,
                    description=f"  {name}: round {record.round}/{rounds}, accuracy {record.accuracy:.4f}",
                )

            started = time.perf_counter()
            try:
                summary = simulate(config, run_dir, on_round, overwrite=True, stop=stop)
            except RunInterrupted:
                statuses[variant.name] = {"status": "pending"}
                _write_index(out, sweep, statuses)
                raise
            except Exception as err:  # a failed run is recorded and the sweep goes on
                restart_ray()  # whatever broke in Ray stays with this run
                run_dir.mkdir(parents=True, exist_ok=True)
                message = f"{type(err).__name__}: {err}"
                (run_dir / ERROR).write_text(message + "\n\n" + traceback.format_exc())
                statuses[variant.name] = {"status": "failed", "error": _first_line(message)}
                outcomes.append(RunOutcome(variant, "failed", error=_first_line(message)))
                progress.console.print(
                    f"[red]failed[/red]   {variant.name}: {escape(_first_line(message))}", highlight=False, soft_wrap=True
                )
            else:
                seconds = time.perf_counter() - started
                statuses[variant.name] = {"status": "finished", "final_accuracy": summary["final_accuracy"]}
                outcomes.append(RunOutcome(variant, "finished", summary=summary))
                progress.console.print(
                    f"[green]finished[/green] {variant.name}: accuracy {summary['final_accuracy']:.4f} in {seconds:.0f} s",
                    highlight=False,
                    soft_wrap=True,
                )
            progress.remove_task(line)
            progress.advance(overall)
            _write_index(out, sweep, statuses)
    return outcomes


def _first_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[0][:500]
