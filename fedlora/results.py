"""The run directory: resolved config, per-round history, summary and the exported adapter.

<run_dir>/config.json       the resolved ExperimentConfig
<run_dir>/history.jsonl     one JSON line per round (round 0: the initial model)
<run_dir>/summary.json      final figures, per-client records, package versions, where the run
                            came from (fedlora/metadata.py)
<run_dir>/metadata.json     where the run came from: config file and its git commit, command,
                            start (and resume) times, host, data fingerprint
<run_dir>/adapter/          the final adapter in peft's format
<run_dir>/adapter-rounds/round-N/   the same folder after round N, every output.adapter_every rounds
<run_dir>/checkpoint.pt     the last finished round: global factors, privacy ledgers,
                            elapsed time (a resumed run continues from it)
<run_dir>/report/           the one-run report `fedlora simulate` and `flwr run` write at the end
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from fedlora.config import ConfigError, ExperimentConfig, config_from_json
from fedlora.metadata import read_metadata
from fedlora.rundir import write_atomic

HISTORY = "history.jsonl"
SUMMARY = "summary.json"
CONFIG = "config.json"
ADAPTER = "adapter"
ROUND_ADAPTERS = "adapter-rounds"
CHECKPOINT = "checkpoint.pt"
RUN_REPORT_DIR = "report"
# RoundRecord's wall-clock fields: they differ between two runs that are otherwise identical.
TIMING_FIELDS = ("seconds", "server_seconds", "client_seconds", "train_seconds")
PACKAGES = ("fedlora", "torch", "flwr", "ray", "opacus", "transformers", "peft")


@dataclass
class RoundRecord:
    """One line of history.jsonl.

    For a causal LM (model.task = "causal_lm") `accuracy` is the exact match of greedy
    generations on the held-out split (its first data.exact_match_examples examples), `loss` the
    held-out token loss on the response tokens, and `perplexity` exp(loss); for classification
    `perplexity` is None. `extra["retired"]`, where present: the clients no longer sampled from this
    round on (a spent privacy budget, or a refusal in the round before) and why.
    Under user-level DP (privacy.unit = "user") `epsilon_max` and `epsilon_mean` are both the
    server's user-level epsilon after the round, and `extra["user_dp"]` the round's mechanism
    figures (sampled, summed, clipped, user_clip, clip_bound, noise_std, server_noise_std, denominator,
    noise_shares under distributed noise, unclipped_fraction and next_clip under adaptive clipping;
    fedlora/user_privacy.py).
    `extra["client_eval"]`, in the rounds clients evaluated (evaluation.clients, fedlora/client_eval.py):
    {client id: {accuracy, loss, examples}} of the global model on each client's held-out share,
    with `client_eval_refused` (who was refused and why) and `client_eval_bytes_down`.
    """

    round: int
    accuracy: float
    loss: float
    bytes_up: int = 0
    bytes_up_factors: int = 0
    bytes_down: int = 0
    seconds: float = 0.0
    server_seconds: float = 0.0
    client_seconds: float = 0.0
    train_seconds: float = 0.0  # the clients' own training time, summed (as they report it: untrusted)
    train_loss: float | None = None
    epsilon_max: float | None = None  # over every client that has trained so far (cumulative)
    epsilon_mean: float | None = None
    clients: list[int] = field(default_factory=list)  # whose updates were aggregated
    sampled: list[int] = field(default_factory=list)  # who was asked to train
    rejected: list[dict[str, Any]] = field(default_factory=list)
    refused: list[dict[str, Any]] = field(default_factory=list)
    skipped: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    perplexity: float | None = None


def default_run_dir(config: ExperimentConfig) -> Path:
    """<output.dir>/<output.name>, or a new <output.dir>/<strategy>-<timestamp>[-k] that does not exist yet."""
    if config.output.name:
        return Path(config.output.dir) / config.output.name
    stem = Path(config.output.dir) / f"{config.strategy.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    candidate, count = stem, 1
    while candidate.exists():  # two runs started in the same second
        count += 1
        candidate = stem.with_name(f"{stem.name}-{count}")
    return candidate


def package_versions() -> dict[str, str]:
    """Versions of the packages a result depends on, for reproducing it."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def resumable_config(run_dir: Path) -> ExperimentConfig:
    """The resolved config a run directory was started with (to resume it)."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise ConfigError(f"--resume {run_dir}: not a run directory (no {CONFIG})")
    return config_from_json(path.read_bytes(), path)


class RunRecorder:
    """Writes a run directory as the run goes (history is flushed after every round).

    With `resume_after` (the round of the checkpoint a run resumes from), the history recorded
    up to that round is kept and any later line, written after the checkpoint, is dropped.
    """

    def __init__(self, run_dir: Path, config: ExperimentConfig, resume_after: int | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.rounds: list[RoundRecord] = []
        if resume_after is None:
            write_atomic(self.run_dir / CONFIG, config.to_json())
            write_atomic(self.run_dir / HISTORY, "")
            return
        self.rounds = read_rounds(self.run_dir, resume_after)
        write_atomic(self.run_dir / HISTORY, "".join(json.dumps(asdict(r)) + "\n" for r in self.rounds))

    @property
    def adapter_dir(self) -> Path:
        """Where the final adapter goes."""
        return self.run_dir / ADAPTER

    def round_adapter_dir(self, server_round: int) -> Path:
        """Where the adapter after `server_round` goes (output.adapter_every)."""
        folder = self.run_dir / ROUND_ADAPTERS
        folder.mkdir(exist_ok=True)
        return folder / f"round-{server_round}"

    def record(self, record: RoundRecord) -> None:
        """Append one round to history.jsonl."""
        self.rounds.append(record)
        with (self.run_dir / HISTORY).open("a") as handle:
            handle.write(json.dumps(asdict(record)) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def finish(self, wall_seconds: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write summary.json (with metadata.json's record of where the run came from) and return it."""
        final = self.rounds[-1]
        bytes_up, bytes_down = sum(r.bytes_up for r in self.rounds), sum(r.bytes_down for r in self.rounds)
        causal = {} if final.perplexity is None else {"final_perplexity": final.perplexity}
        summary = {
            **read_metadata(self.run_dir),  # first: the run's own figures below always win
            "status": "finished",
            "rounds": final.round,
            "initial_accuracy": self.rounds[0].accuracy,
            "final_accuracy": final.accuracy,
            "final_loss": final.loss,
            "best_accuracy": max(r.accuracy for r in self.rounds),
            **causal,
            "bytes_up": bytes_up,
            "bytes_down": bytes_down,
            "communication_mb": communication_mb(bytes_up + bytes_down),
            "wall_seconds": wall_seconds,
            "adapter": str(self.adapter_dir.resolve()),
            "versions": package_versions(),
            **(extra or {}),
        }
        write_atomic(self.run_dir / SUMMARY, json.dumps(summary, indent=2))  # last: it marks the run finished
        return summary


def communication_mb(total_bytes: float) -> float:
    """A run's communication as FlowerTune's leaderboard reports it: uplink plus downlink, in MB of 2**20 bytes."""
    return total_bytes / 2**20


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    """The rounds recorded in a run directory (a last line cut short by a kill is left out).

    RunDamaged, naming the line, if any other line is not a JSON object with a whole "round" >= 0.
    """
    path = Path(run_dir) / HISTORY
    text = path.read_text()
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        lines = lines[:-1]  # every line is written with its newline: this one is torn
    history = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or type(record.get("round")) is not int or record["round"] < 0:
            raise RunDamaged(path, f'line {number} is not a JSON object with a whole "round" ({line[:40]!r})')
        history.append(record)
    return history


_ROUND_RECORD = TypeAdapter(RoundRecord)


def read_rounds(run_dir: Path, last: int) -> list[RoundRecord]:
    """The history's rounds up to `last` as records; RunDamaged, naming the round, if one has missing or mistyped figures."""
    rounds = []
    for line in read_history(run_dir):
        if line["round"] > last:
            continue
        try:
            rounds.append(_ROUND_RECORD.validate_python(line))
        except ValidationError as err:
            problem = err.errors()[0]
            key = ".".join(str(part) for part in problem["loc"])
            raise RunDamaged(Path(run_dir) / HISTORY, f"round {line['round']}: {key}: {problem['msg']}") from None
    return rounds


# What the summary of a finished run is read for (even one an older fedlora wrote): types, in words.
FINISHED_FIELDS: dict[str, tuple[type | tuple[type, ...], str]] = {
    "status": (str, '"finished"'),
    "rounds": (int, "a whole number"),
    "final_accuracy": ((int, float), "a number"),
}


def finished_summary(run_dir: Path) -> dict[str, Any] | None:
    """The summary of a finished run, or None if the run has none (it did not finish).

    RunDamaged if summary.json is there but is not a finished run's summary: it is written
    atomically, and last, so only damage from outside makes it so.
    """
    path = Path(run_dir) / SUMMARY
    if not path.exists():
        return None
    try:
        summary = json.loads(path.read_text())
    except ValueError:
        raise RunDamaged(path, "not valid JSON") from None
    if not isinstance(summary, dict):
        raise RunDamaged(path, "not a JSON object")
    for key, (kind, expected) in FINISHED_FIELDS.items():
        value = summary.get(key, ...)
        if value is ...:
            raise RunDamaged(path, f"{key!r} is missing")
        if not isinstance(value, kind) or isinstance(value, bool) or (key == "status" and value != "finished"):
            raise RunDamaged(path, f"{key!r} is {json.dumps(value)[:40]}, where it should be {expected}")
    return summary


def read_summary(run_dir: Path) -> dict[str, Any]:
    """A finished run's summary.json."""
    return json.loads((Path(run_dir) / SUMMARY).read_text())


class RunDamaged(ConfigError):
    """A file of a run directory damaged from outside (its writers never leave it so)."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(
            f"{path}: {problem}; the file is damaged: restore it from a copy, or start a new run (nothing was changed)"
        )
