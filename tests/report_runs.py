"""Synthetic run directories for the report's tests: real configs and RunRecorder files, made-up figures.

The figures follow simple formulas of the settings, so a test can say what every cell and every
plotted point must be without running a federation.
"""

from __future__ import annotations

import math
from pathlib import Path

from fedlora.results import RoundRecord, RunRecorder
from tests.conftest import causal_config, tiny_config

# Six keys that differ among the runs of `many_key_runs`, with long values, as a real sweep over
# strategies, privacy, attacks and defences would have them.
MANY_KEYS = [
    {
        "strategy.name": "fedit",
        "strategy.robust": "none",
        "privacy.enabled": "false",
        "attack.name": "none",
        "attack.fraction": "0.0",
        "federation.lr": "0.005",
        "model.target_modules": '["query", "value"]',
    },
    {
        "strategy.name": "ffa_lora",
        "strategy.robust": "none",
        "privacy.enabled": "true",
        "attack.name": "none",
        "attack.fraction": "0.0",
        "federation.lr": "0.01",
        "model.target_modules": '["query", "value", "key"]',
    },
    {
        "strategy.name": "fedsvd",
        "strategy.robust": "krum",
        "privacy.enabled": "false",
        "attack.name": "sign_flip",
        "attack.fraction": "0.25",
        "federation.lr": "0.005",
        "model.target_modules": '["query", "value", "key", "dense"]',
    },
    {
        "strategy.name": "lora_fair",
        "strategy.robust": "zprobe",
        "privacy.enabled": "true",
        "attack.name": "alie",
        "attack.fraction": "0.25",
        "federation.lr": "0.002",
        "model.target_modules": '["query", "value"]',
    },
    {
        "strategy.name": "fedit",
        "strategy.robust": "median",
        "privacy.enabled": "false",
        "attack.name": "scaling",
        "attack.fraction": "0.2",
        "federation.lr": "0.01",
        "model.target_modules": '["query", "key"]',
    },
    {
        "strategy.name": "ffa_lora",
        "strategy.robust": "trimmed_mean",
        "privacy.enabled": "true",
        "attack.name": "ipm",
        "attack.fraction": "0.1",
        "federation.lr": "0.001",
        "model.target_modules": '["value"]',
    },
]
ROUNDS = 4


def make_run(
    run_dir: Path,
    overrides: list[str],
    quality: float = 0.0,
    finished: bool = True,
    defence_name: str | None = None,
    train_loss: bool = True,
    causal: bool = False,
) -> Path:
    """A run directory of the tiny config (the tiny causal-LM config where `causal`, its history then
    recording perplexity exp(loss)) with `overrides`; accuracy 0.2 + 0.1 round + quality.

    Bytes up are a constant 1_229_000 a round for FedIT (half for B-only strategies), down twice
    that; epsilon 0.7 a round where privacy is on; attackers are clients 2 and 3, the defence
    flags client 2 (and honest client 0 in odd rounds) and records `defence_name`.
    """
    config = (causal_config if causal else tiny_config)(*overrides, "federation.num_clients=6", "federation.clients_per_round=6")
    recorder = RunRecorder(run_dir, config)
    b_only = config.strategy.name in ("ffa_lora", "fedsvd")
    attacked = config.attack.name != "none"
    for round_ in range(ROUNDS + 1):
        extra: dict = {}
        clients = list(range(6)) if round_ else []
        if round_ and attacked:
            flagged = [2, 0] if round_ % 2 else [2]
            clients = [c for c in clients if c not in flagged]
            extra = {"malicious": [2, 3], "flagged": flagged, "dropped": flagged}
            if defence_name:
                extra["defence"] = {"name": defence_name, "clusters": 3}
        recorder.record(
            RoundRecord(
                round=round_,
                accuracy=round(0.2 + 0.1 * round_ + quality, 6),
                loss=2.0 / (round_ + 1),
                perplexity=math.exp(2.0 / (round_ + 1)) if causal else None,
                bytes_up=(614_500 if b_only else 1_229_000) if round_ else 0,
                bytes_down=2_458_000 if round_ else 0,
                seconds=3.0 if round_ else 0.0,
                server_seconds=0.5 if round_ else 0.0,
                client_seconds=2.5 if round_ else 0.0,
                train_loss=(1.5 / round_ if train_loss and round_ else None),
                epsilon_max=0.7 * round_ if config.privacy.enabled and round_ else None,
                epsilon_mean=0.5 * round_ if config.privacy.enabled and round_ else None,
                clients=clients,
                extra=extra,
            )
        )
        if not finished and round_ == 1:
            return run_dir
    recorder.finish(10.0, {"strategy": config.strategy.name})
    return run_dir


def many_key_runs(root: Path) -> list[Path]:
    """Six variants differing in seven keys (two seeds each), plus one run that did not finish."""
    runs = []
    for i, settings in enumerate(MANY_KEYS):
        overrides = [f"{key}={value}" for key, value in settings.items()]
        for seed in (0, 1):
            name = f"v{i}-seed{seed}"
            defence = None if settings["strategy.robust"] == "none" else settings["strategy.robust"]
            runs.append(make_run(root / name, [*overrides, f"seed={seed}"], quality=0.02 * i + 0.01 * seed, defence_name=defence))
    make_run(root / "stopped", ["strategy.name=fedit"], finished=False)
    return runs
