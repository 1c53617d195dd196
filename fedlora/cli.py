"""The `fedlora` command."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from typer.utils import get_params_from_function

from fedlora.config import ConfigError, ExperimentConfig, config_from_dict, load_config, read_config_file
from fedlora.interrupt import EXIT_CODE, RunInterrupted, stop_on_signals
from fedlora.metadata import runs_from
from fedlora.report import ReportError, ReportFiles, counted, default_out, headline, write_report
from fedlora.results import RUN_REPORT_DIR, RoundRecord, default_run_dir, finished_summary, package_versions, resumable_config

HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}  # click hands it down to every subcommand
cli = typer.Typer(
    add_completion=False, no_args_is_help=True, context_settings=HELP_OPTIONS, help="Federated LoRA fine-tuning on Flower."
)
console = Console()
USER_ERRORS = (ConfigError, ReportError)


def main() -> None:
    """Entry point: user errors print one line and exit 2, without a traceback."""
    try:
        code = cli_command()(standalone_mode=False)
    except USER_ERRORS as err:
        _print_error(str(err))
    except OSError as err:
        if err.filename is None:  # not about a file (a socket, a bug): its traceback says more
            raise
        # A path the user gave or the file system refused (read-only, no permission, disk full,
        # a name too long); the run's files are written atomically, so nothing whole is lost.
        _print_error(
            f"{err.filename}: {err.strerror or err}; check that path (it can be written, the disk has room) and run again"
        )
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except RunInterrupted as stopped:
        console.print(
            f"{stopped}: the checkpoint and history are consistent; continue with "
            f"[bold]fedlora simulate --resume {stopped.run_dir}[/bold]",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(EXIT_CODE)
    except (typer.Abort, KeyboardInterrupt):
        console.print("aborted")
        sys.exit(EXIT_CODE)
    except Exception as err:  # click usage errors and the like
        if isinstance(err, click.ClickException):
            err.show()
            sys.exit(2)
        raise
    if isinstance(code, int) and code:  # click hands back typer.Exit(code) instead of exiting
        sys.exit(code)


def _print_error(message: str) -> NoReturn:
    """A user error: one line, exit code 2."""
    console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(2)


def cli_command() -> click.Command:
    """The click command typer builds from `cli`, with every argument's help in place."""
    command = typer.main.get_command(cli)
    _restore_argument_help(command)
    return command


def _restore_argument_help(command: click.Command) -> None:
    """Put back the help of positional arguments, which `fedlora -h` would otherwise not show.

    typer 0.20 stores an argument's help before calling click's constructor, and click 8.5 (which
    added `help` to arguments) resets it there; typer still holds it in the function's annotations.
    """
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            _restore_argument_help(sub)
    if command.callback is None:
        return
    declared = get_params_from_function(inspect.unwrap(command.callback))
    for param in command.params:
        info = declared.get(param.name or "")
        if isinstance(param, click.Argument) and info is not None and not param.help:
            param.help = getattr(info.default, "help", None)


def _print_version(asked: bool) -> None:
    if not asked:
        return
    versions = package_versions()
    console.print(f"fedlora {versions.pop('fedlora')}", highlight=False)
    for name, number in versions.items():
        console.print(f"  {name} {number}", highlight=False)
    raise typer.Exit()


@cli.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            "-V",
            is_eager=True,  # before click asks for a command
            callback=_print_version,
            help="Print fedlora's version and the key packages', then exit.",
        ),
    ] = False,
) -> None:
    """Federated LoRA fine-tuning on Flower: simulate, compare, report, deploy."""


SetOption = Annotated[
    list[str] | None, typer.Option("--set", "-s", help="Override a config key: section.key=value (repeatable).")
]


BaselineOption = Annotated[
    list[str] | None,
    typer.Option(
        "--baseline",
        help="The variant the others are tested against, by a setting it alone has: KEY=VALUE (repeatable; default: the first variant).",
    ),
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
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace the run already in --out (its files are deleted).")
    ] = False,
) -> None:
    """Run a federation on Flower's simulation engine, showing each round as it finishes.

    Ctrl-C (or SIGTERM) stops it after the round in progress; `--resume RUN_DIR` continues it.
    """
    from fedlora.rundir import RunLock, claim_run_dir

    if (config_path is None) == (resume is None):
        raise ConfigError("give either CONFIG or --resume RUN_DIR")
    if resume is not None:
        if overrides or out or overwrite:
            raise ConfigError("--resume continues a run with its own config and directory: drop --set, --out and --overwrite")
        config, run_dir = resumable_config(resume), resume
    else:
        config = load_config(config_path, overrides)
        run_dir = out or default_run_dir(config)
    from fedlora.simulation import check_runnable

    check_runnable(config)  # what the config alone cannot show, before the run directory exists
    with RunLock(run_dir):  # held from the first check to the last file written
        if resume is not None:
            done = finished_summary(run_dir)
            if done is not None:
                console.print(
                    f"{run_dir} already finished: round {done['rounds']}, final accuracy {done['final_accuracy']:.4f}",
                    soft_wrap=True,
                )
                return
            check_resumable(config, run_dir)
        else:
            claim_run_dir(run_dir, overwrite)
        with runs_from(config_path):  # its git commit goes into summary.json
            summary = run_with_progress(config, run_dir, resume=resume is not None)
        console.print(
            f"\n[bold]final accuracy {summary['final_accuracy']:.4f}[/bold] "
            f"(round 0: {summary['initial_accuracy']:.4f}) in {summary['wall_seconds']:.0f} s"
        )
        files = write_report([run_dir], run_dir / RUN_REPORT_DIR, f"fedlora simulate: {run_dir.name}")
    console.print(f"run directory: {run_dir} (history.jsonl, summary.json)")
    console.print(f"adapter (peft format): {summary['adapter']}")
    console.print(f"report: {files.html}")


def check_resumable(config: ExperimentConfig, run_dir: Path) -> None:
    """Refuse, before the simulation engine starts, a resume that cannot continue this run exactly."""
    from fedlora import workspace
    from fedlora.checkpoint import load_resumable

    num_labels = workspace.federated_task(config).num_labels
    load_resumable(run_dir, config, workspace.initial_state(config, num_labels))


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
    rounds = config.federation.rounds
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as progress:
        task = progress.add_task("starting the simulation engine", total=rounds)
        timer = RoundTimer(rounds)

        def on_round(record: RoundRecord) -> None:
            eta = timer.eta(record)
            progress.console.print(_round_line(record, eta), highlight=False)
            description = f"round {record.round}/{rounds}" + (f", ETA {_duration(eta)}" if eta is not None else "")
            progress.update(task, completed=record.round, description=description)

        with stop_on_signals(lambda note: progress.console.print(note, highlight=False)) as stop:
            return run_simulation(config, run_dir, on_round, resume, stop=stop)


class RoundTimer:
    """The time left, from the mean duration of the rounds this process has seen trained."""

    def __init__(self, rounds: int) -> None:
        self.rounds = rounds
        self.seconds: list[float] = []

    def eta(self, record: RoundRecord) -> float | None:
        """Seconds until the last round is done, after `record`; None before a trained round or after the last."""
        if record.round:
            self.seconds.append(record.seconds)
        left = self.rounds - record.round
        if not self.seconds or left <= 0:
            return None
        return left * sum(self.seconds) / len(self.seconds)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _round_line(record: RoundRecord, eta: float | None = None) -> str:
    """One line per round: accuracy, loss, uplink, time, privacy spent, what the defence dropped, ETA,
    and who was retired and why."""
    line = f"round {record.round:>3}  accuracy {record.accuracy:.4f}  loss {record.loss:.4f}"
    if record.round:
        line += f"  up {record.bytes_up / 1e6:.2f} MB  {record.seconds:.1f} s"
    if record.epsilon_max is not None:
        line += f"  eps {record.epsilon_max:.2f}"
    dropped = record.extra.get("dropped") or []
    defence = record.extra.get("defence") or {}
    if dropped or defence:
        # Seen by the defence: the replies it kept (clients) and those it dropped.
        line += f"  {defence.get('name', 'defence')} dropped {len(dropped)}/{len(record.clients) + len(dropped)}"
    if record.rejected:
        line += f"  rejected {len(record.rejected)}"
    if record.refused:
        line += f"  refused {len(record.refused)}"
    if record.skipped:
        line += "  (skipped)"
    if eta is not None:
        line += f"  ETA {_duration(eta)}"
    retired = record.extra.get("retired") or {}
    if retired:  # last: the reasons are long, and the figures before them keep their place
        line += "  retired " + ", ".join(f"client {client} ({why})" for client, why in retired.items())
    return line


@cli.command()
def strategies() -> None:
    """List the registered aggregation strategies."""
    from strategies import STRATEGIES

    table = Table("name", "clients train", "description")
    for name, cls in STRATEGIES.items():
        table.add_row(name, cls.trains_label or cls.trains, cls.description)
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
    baseline: BaselineOption = None,
) -> None:
    """Run every variant of a config's sweep section (finished runs are kept), then write one report."""
    from fedlora.sweep import load_sweep, run_sweep  # imports Flower and the strategies

    sweep = load_sweep(config_path, overrides)
    out_dir = out or sweep.default_out()
    with stop_on_signals(lambda note: console.print(note, highlight=False)) as stop, runs_from(config_path):
        outcomes = run_sweep(sweep, out_dir, console, stop)
    files = write_report([out_dir], out_dir, f"fedlora compare: {config_path.stem}", baseline)  # its sweep.json lists the runs
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
        typer.Option(
            "--out",
            help="Report directory (default: the sweep directory or folder of runs given, a run directory's report/, "
            "or report/ in the folder several paths share).",
        ),
    ] = None,
    baseline: BaselineOption = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a report of other runs already in the report directory.")
    ] = False,
) -> None:
    """Write the comparison report (HTML, Markdown, CSV, plots) from existing run directories."""
    _print_report(write_report(run_dirs, out or default_out(run_dirs), baseline=baseline, overwrite=overwrite))


def _print_report(files: ReportFiles) -> None:
    """What the report found, in a line per held-out set, and where it is."""
    comparison = files.comparison
    counts = f"{counted(len(comparison.runs), 'run')}, {counted(len(comparison.variants), 'variant')}"
    found = headline(comparison)
    console.print(f"\n[bold]{counts}[/bold]; {escape(found[0])}", highlight=False, soft_wrap=True)
    for line in found[1:]:
        console.print(escape(line), highlight=False, soft_wrap=True)
    if comparison.excluded:
        console.print(f"not included: {counted(len(comparison.excluded), 'run')} (see the report for why)")
    console.print(f"report: {files.html}\n        {files.markdown}\n        {files.csv}", highlight=False, soft_wrap=True)


@cli.command("export")
def export_command(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="A finished run's directory.", show_default=False)],
    to: Annotated[Path, typer.Option("--to", metavar="DIR", help="The folder to write (created).", show_default=False)],
    merged: Annotated[
        bool, typer.Option("--merged", help="Fold the LoRA factors into the base: a plain transformers model.")
    ] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace what DIR holds.")] = False,
) -> None:
    """Write a run's adapter as a folder that loads wherever it is copied (base, tokenizer, labels, card), or its
    merged model (--merged) for AutoModelFor... and pipeline(...)."""
    from fedlora.export_run import export_run

    folder = export_run(run_dir, to, merged=merged, overwrite=overwrite)
    what = "merged model" if merged else "adapter with its base"
    console.print(f"{what}: {folder} (its README.md says how to load it)", highlight=False, soft_wrap=True)


config_cli = typer.Typer(no_args_is_help=True, help="Look at configs: one resolved, or every key there is.")
cli.add_typer(config_cli, name="config")


@config_cli.command("show")
def config_show(
    config_path: Annotated[
        Path, typer.Argument(metavar="CONFIG", help="Experiment TOML, e.g. simulations/quickstart.toml.", show_default=False)
    ],
    overrides: SetOption = None,
) -> None:
    """Print the config as it resolves (its `extends` chain merged, --set applied, every default filled in) as TOML.

    A sweep config prints its base settings resolved and its [sweep] section as written.
    """
    from fedlora.report import config_toml

    raw = read_config_file(config_path)
    sweep = raw.pop("sweep", None)
    config = config_from_dict(raw, overrides)
    print(config_toml(config.model_dump(mode="json")), end="")
    if sweep is not None:
        print("\n" + config_toml({"sweep": sweep}), end="")


@config_cli.command("keys")
def config_keys_command() -> None:
    """List every config key with its type, default and what it does (generated from the config models)."""
    from rich.padding import Padding
    from rich.text import Text

    from fedlora.config_keys import config_keys

    for key in config_keys():
        console.print(Text.assemble((key.key, "bold"), f"  {key.type}; default {key.default}"))
        console.print(Padding(Text(key.description), (0, 0, 0, 4), expand=False))


# `fedlora deploy ...`: certificates, SuperLink and SuperNodes on Flower's deployment engine.
from fedlora.deploy import deploy as _deploy_cli  # noqa: E402  (light: no Flower or torch import)

cli.add_typer(_deploy_cli, name="deploy")


if __name__ == "__main__":
    main()
