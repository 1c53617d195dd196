"""The `fedlora` command."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedlora.config import ConfigError, ExperimentConfig, load_config
from fedlora.report import SWEEP_INDEX, ReportError, ReportFiles, winners, write_report
from fedlora.results import RoundRecord, default_run_dir, resumable_config

cli = typer.Typer(add_completion=False, no_args_is_help=True, help="Federated LoRA fine-tuning on Flower.")
console = Console()
USER_ERRORS = (ConfigError, ReportError)


def main() -> None:
    """Entry point: user errors print one line and exit 2, without a traceback."""
    try:
        code = cli(standalone_mode=False)
    except USER_ERRORS as err:
        console.print(f"[red]error:[/red] {escape(str(err))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        console.print("aborted")
        sys.exit(130)
    except Exception as err:  # click usage errors and the like
        import click

        if isinstance(err, click.ClickException):
            err.show()
            sys.exit(2)
        raise
    if isinstance(code, int) and code:  # click hands back typer.Exit(code) instead of exiting
        sys.exit(code)


SetOption = Annotated[
    list[str] | None, typer.Option("--set", "-s", help="Override a config key: section.key=value (repeatable).")
]


@cli.command()
def simulate(
    config_path: Annotated[
        Path | None, typer.Argument(metavar="CONFIG", help="Experiment TOML, e.g. simulations/quickstart.toml.")
    ] = None,
    overrides: SetOption = None,
    out: Annotated[Path | None, typer.Option("--out", help="Run directory (default: output.dir/<strategy>-<time>).")] = None,
    resume: Annotated[
        Path | None, typer.Option("--resume", metavar="RUN_DIR", help="Continue a stopped run from its last finished round.")
    ] = None,
) -> None:
    """Run a federation on Flower's simulation engine, showing each round as it finishes."""
    if (config_path is None) == (resume is None):
        raise ConfigError("give either CONFIG or --resume RUN_DIR")
    if resume is not None:
        if overrides or out:
            raise ConfigError("--resume continues a run with its own config and directory: drop --set and --out")
        config, run_dir = resumable_config(resume), resume
    else:
        config = load_config(config_path, overrides)
        run_dir = out or default_run_dir(config)
    summary = run_with_progress(config, run_dir, resume=resume is not None)
    console.print(
        f"\n[bold]final accuracy {summary['final_accuracy']:.4f}[/bold] "
        f"(round 0: {summary['initial_accuracy']:.4f}) in {summary['wall_seconds']:.0f} s"
    )
    files = write_report([run_dir], run_dir / RUN_REPORT_DIR, f"fedlora simulate: {run_dir.name}")
    console.print(f"run directory: {run_dir} (history.jsonl, summary.json)")
    console.print(f"adapter (peft format): {summary['adapter']}")
    console.print(f"report: {files.html}")


RUN_REPORT_DIR = "report"  # inside the run directory: the one-run report `fedlora simulate` writes


def run_with_progress(config: ExperimentConfig, run_dir: Path, resume: bool = False) -> dict:
    """Simulate with a live progress bar and a line per round."""
    from fedlora.simulation import check_runnable, quiet_flower_logs
    from fedlora.simulation import simulate as run_simulation

    check_runnable(config)
    quiet_flower_logs()
    console.print(
        f"[bold]{config.strategy.name}[/bold]: {config.federation.num_clients} clients, "
        f"{config.federation.clients_per_round} a round, {config.federation.rounds} rounds, model {config.model.name}"
    )
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as progress:
        task = progress.add_task("starting the simulation engine", total=config.federation.rounds)

        def on_round(record: RoundRecord) -> None:
            progress.console.print(_round_line(record), highlight=False)
            progress.update(task, completed=record.round, description=f"round {record.round}/{config.federation.rounds}")

        return run_simulation(config, run_dir, on_round, resume)


def _round_line(record: RoundRecord) -> str:
    line = f"round {record.round:>3}  accuracy {record.accuracy:.4f}  loss {record.loss:.4f}"
    if record.round:
        line += f"  up {record.bytes_up / 1e6:.2f} MB  {record.seconds:.1f} s"
    if record.rejected:
        line += f"  rejected {len(record.rejected)}"
    if record.skipped:
        line += "  (skipped)"
    return line


@cli.command()
def strategies() -> None:
    """List the registered aggregation strategies."""
    from strategies import STRATEGIES

    table = Table("name", "clients train", "description")
    for name, cls in STRATEGIES.items():
        table.add_row(name, cls.trains, cls.description)
    console.print(table)


@cli.command()
def compare(
    config_path: Annotated[
        Path,
        typer.Argument(metavar="CONFIG", help="Experiment TOML with a sweep section, e.g. simulations/compare_strategies.toml."),
    ],
    overrides: SetOption = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Sweep directory (default: output.dir/compare-<config name>).")
    ] = None,
) -> None:
    """Run every variant of a config's sweep section (finished runs are kept), then write one report."""
    from fedlora.sweep import load_sweep, run_sweep  # imports Flower and the strategies

    sweep = load_sweep(config_path, overrides)
    out_dir = out or sweep.default_out()
    outcomes = run_sweep(sweep, out_dir, console)
    files = write_report([out_dir], out_dir, f"fedlora compare: {config_path.stem}")  # its sweep.json lists the runs
    _print_report(files)
    failed = [outcome for outcome in outcomes if outcome.status == "failed"]
    if failed:
        console.print(
            f"[red]{len(failed)} run(s) failed[/red]; their error.txt says why; run the same command again to retry them",
            soft_wrap=True,
        )
        raise typer.Exit(1)


@cli.command()
def report(
    run_dirs: Annotated[
        list[Path], typer.Argument(metavar="RUN_DIR...", help="Run directories, or sweep directories (their runs).")
    ],
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Report directory (default: the sweep directory, or <parent of the runs>/report)."),
    ] = None,
) -> None:
    """Write the comparison report (HTML, Markdown, CSV, plots) from existing run directories."""
    if out is None:
        single_sweep = len(run_dirs) == 1 and (run_dirs[0] / SWEEP_INDEX).exists()
        out = run_dirs[0] if single_sweep else run_dirs[0].resolve().parent / "report"
    _print_report(write_report(run_dirs, out))


def _print_report(files: ReportFiles) -> None:
    comparison = files.comparison
    best = winners(comparison)
    mean = best[0].stat(lambda run: run.final_accuracy)[0]
    console.print(
        f"\n[bold]{len(comparison.runs)} runs, {len(comparison.variants)} variants[/bold]; "
        f"best final accuracy {mean:.4f}: {' and '.join(variant.label for variant in best)}{' (tied)' if len(best) > 1 else ''}",
        highlight=False,
        soft_wrap=True,
    )
    if comparison.excluded:
        console.print(f"not included: {len(comparison.excluded)} run(s) that failed or did not finish")
    console.print(f"report: {files.html}\n        {files.markdown}\n        {files.csv}", highlight=False, soft_wrap=True)


# `fedlora deploy ...`: certificates, SuperLink and SuperNodes on Flower's deployment engine.
from fedlora.deploy import deploy as _deploy_cli  # noqa: E402  (light: no Flower or torch import)

cli.add_typer(_deploy_cli, name="deploy")


if __name__ == "__main__":
    main()
