"""Budgets nobody can bend: through Ray no client overspends, and resume keeps the run's contract."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedlora import workspace
from fedlora.accounting import PrivacyAccounts
from fedlora.checkpoint import Checkpoint, load_resumable, save_checkpoint
from fedlora.config import ConfigError
from fedlora.privacy import epsilon_of
from fedlora.results import CHECKPOINT, CONFIG, HISTORY, read_history, read_summary
from fedlora.simulation import simulate
from tests.conftest import one_line_refusal, tiny_config

# 6 clients, 2 a round, 6 rounds: each is expected to join 2 rounds and is calibrated for that;
# sampling at random, some are drawn more often and must then be retired, never overspend. (One
# CPU a client, as the other Ray tests: the shared pool of client actors serves it as it is.)
BUDGETED = (
    "federation.num_clients=6",
    "federation.clients_per_round=2",
    "federation.rounds=6",
    "data.num_train=360",
    "privacy.enabled=true",
    "privacy.epsilon=3.0",
)


@pytest.mark.e2e
@pytest.mark.usefixtures("one_ray")
def test_no_client_exceeds_its_budget_and_a_spent_client_is_not_sampled_again(tmp_path: Path) -> None:
    config = tiny_config(*BUDGETED)
    simulate(config, tmp_path / "run")
    history, summary = read_history(tmp_path / "run"), read_summary(tmp_path / "run")
    privacy = summary["privacy"]
    for client, figures in privacy.items():
        recomputed = (
            epsilon_of("prv", ((figures["noise-multiplier"], figures["sample-rate"], figures["dp-steps"]),), config.privacy.delta)
            if figures["dp-steps"]
            else 0.0
        )
        assert figures["epsilon"] == pytest.approx(recomputed, abs=1e-9), client
        assert figures["epsilon"] <= config.privacy.epsilon + 1e-9, client
        if figures["dp-steps"]:
            assert figures["reported-epsilon"] == pytest.approx(figures["epsilon"], rel=1e-6)
    assert summary["retired"], "with 2 expected rounds each and random sampling, someone must run out"
    for line in history[1:]:
        assert not line["refused"] and not line["rejected"]  # the server never asked a spent client
    joined = {int(c): sum(int(c) in line["sampled"] for line in history[1:]) for c in privacy}
    for client in map(int, summary["retired"]):
        assert privacy[str(client)]["dp-steps"] == joined[client] * config.federation.local_steps
        last = max(line["round"] for line in history[1:] if client in line["sampled"])
        assert all(client not in line["sampled"] for line in history if line["round"] > last)


def make_run_dir(path: Path, config, rounds_done: int = 1) -> Path:
    """A run directory as a DP run leaves it after `rounds_done` rounds: config, history, checkpoint."""
    path.mkdir(parents=True)
    (path / CONFIG).write_text(config.to_json())
    lines = [{"round": r, "accuracy": 0.1, "loss": 2.0} for r in range(rounds_done + 1)]
    (path / HISTORY).write_text("".join(json.dumps(line) + "\n" for line in lines))
    num_labels = workspace.federated_task(config).num_labels
    sizes = {c: len(p.labels) for c, p in enumerate(workspace.federated_task(config).partitions)}
    accounts = PrivacyAccounts.for_run(config, sizes)
    state = workspace.initial_state(config, num_labels)
    save_checkpoint(path, Checkpoint(rounds_done, state.tensors(), config.model_dump(mode="json"), accounts.state()))
    return path


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (lambda c: c["privacy"].update(epsilon=30.0), "privacy.epsilon"),
        (lambda c: c["privacy"].update(delta=0.5), "privacy.delta"),
        (lambda c: c["federation"].update(rounds=4), "federation.rounds"),
        (lambda c: c["federation"].update(clients_per_round=2), "federation.clients_per_round"),
        (lambda c: c["data"].update(num_train=480), "data.num_train"),
        (lambda c: c.update(seed=8), "seed"),
    ],
    ids=["epsilon", "delta", "rounds", "participation", "data", "seed"],
)
def test_resume_with_an_edited_setting_is_refused_in_one_line(edit, key: str, tmp_path: Path) -> None:
    run_dir = make_run_dir(tmp_path / "run", tiny_config("privacy.enabled=true", "privacy.epsilon=3.0"))
    recorded = json.loads((run_dir / CONFIG).read_text())
    edit(recorded)
    (run_dir / CONFIG).write_text(json.dumps(recorded))
    history_before = (run_dir / HISTORY).read_text()
    assert one_line_refusal("simulate", "--resume", str(run_dir)).startswith(f"error: {key}:")
    assert (run_dir / HISTORY).read_text() == history_before  # nothing touched


def test_a_reformatted_but_equal_config_is_accepted(tmp_path: Path) -> None:
    config = tiny_config("privacy.enabled=true", "privacy.epsilon=3.0")
    run_dir = make_run_dir(tmp_path / "run", config)
    recorded = json.loads((run_dir / CONFIG).read_text())
    reordered = {key: recorded[key] for key in reversed(list(recorded))}
    (run_dir / CONFIG).write_text(json.dumps(reordered, indent=7, sort_keys=True))
    from fedlora.results import resumable_config

    again = resumable_config(run_dir)
    checkpoint = load_resumable(run_dir, again, workspace.initial_state(again, workspace.federated_task(again).num_labels))
    assert checkpoint is not None and checkpoint.round == 1


def test_a_run_with_history_but_no_checkpoint_is_refused(tmp_path: Path) -> None:
    run_dir = make_run_dir(tmp_path / "run", tiny_config("privacy.enabled=true", "privacy.epsilon=3.0"), rounds_done=2)
    (run_dir / CHECKPOINT).unlink()
    assert "2 rounds recorded but no checkpoint.pt" in one_line_refusal("simulate", "--resume", str(run_dir))
    with pytest.raises(ConfigError, match="no checkpoint.pt"):
        load_resumable(run_dir, tiny_config("privacy.enabled=true", "privacy.epsilon=3.0"))
