"""User-level DP through Flower's simulation engine: FedIT (central noise, adaptive clip) and FedSVD (distributed,
secret), and resume."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from fedlora.interrupt import RunInterrupted
from fedlora.privacy import epsilon_of
from fedlora.results import read_history, read_summary
from fedlora.simulation import simulate
from fedlora.user_privacy import SECRET_NOISE
from tests.conftest import tiny_config

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("one_ray")]

# 6 clients, 3 expected a round by Poisson sampling (q = 0.5), 3 rounds, user-level epsilon 8. (One
# CPU a client, as the other Ray tests: the shared pool of client actors serves it as it is.)
USER_LEVEL = (
    "federation.num_clients=6",
    "federation.clients_per_round=3",
    "federation.rounds=3",
    "privacy.enabled=true",
    "privacy.unit='user'",
    "privacy.epsilon=8.0",
    "privacy.user_clip=0.5",
)


def assert_user_level_ledger(run_dir: Path, noise: str) -> None:
    """Every round's epsilon is Opacus' for the rounds so far, the summary's for all three, within the budget; every
    round's noise is the update's multiplier times its clip, which an adaptive clip carries from round to round."""
    history, summary = read_history(run_dir), read_summary(run_dir)
    privacy = summary["user_privacy"]
    adaptive = privacy["adaptive_clip"] or {"update_noise_multiplier": privacy["noise_multiplier"]}
    clip = 0.5  # privacy.user_clip: every round's (fixed), the first round's (adaptive)
    assert (privacy["unit"], privacy["noise"], privacy["rounds"], privacy["sample_rate"]) == ("user", noise, 3, 0.5)
    assert summary["privacy"] is None and set(summary["weights"].values()) == {1.0}  # equal weights, no per-client ledgers
    for line in history[1:]:
        expected = epsilon_of("prv", ((privacy["noise_multiplier"], 0.5, line["round"]),), 1e-5)
        assert line["epsilon_max"] == pytest.approx(expected, abs=1e-6)
        figures = line["extra"]["user_dp"]
        assert figures["sampled"] == len(line["sampled"]) and figures["denominator"] == 3
        assert figures["user_clip"] == pytest.approx(clip)
        assert figures["noise_std"] == pytest.approx(adaptive["update_noise_multiplier"] * clip)
        clip = figures.get("next_clip", clip)
    assert privacy["clip"] == pytest.approx(clip)
    assert privacy["epsilon"] == pytest.approx(history[-1]["epsilon_max"]) and privacy["epsilon"] <= 8.0


def test_fedsvd_with_distributed_secret_noise_runs_at_user_level(tmp_path: Path) -> None:
    secret = ("privacy.noise='distributed'", "privacy.secret_noise=true")  # the clients draw their shares from the OS
    simulate(tiny_config(*USER_LEVEL, "strategy.name='fedsvd'", *secret), tmp_path / "run")
    assert_user_level_ledger(tmp_path / "run", "distributed")
    history = read_history(tmp_path / "run")
    for line in history[1:]:  # honest clients: every share arrived, none was clipped by the server
        figures = line["extra"]["user_dp"]
        assert figures["noise_shares"] == len(line["clients"]) and figures["clipped"] == 0 and not figures["noise_withheld"]
    privacy = read_summary(tmp_path / "run")["user_privacy"]
    assert "secure aggregation" in privacy["trust"] and privacy["noise_source"] == SECRET_NOISE


def test_fedit_at_user_level_with_an_adaptive_clip_resumes_with_its_ledger_and_clip(tmp_path: Path) -> None:
    # sigma is about 0.8 at epsilon 8: a count noise of 2 (2 sigma_b = 4) leaves the update most of it.
    config = tiny_config(*USER_LEVEL, "privacy.adaptive_clip=true", "privacy.clip_count_noise=2.0")
    simulate(config, tmp_path / "whole")
    assert_user_level_ledger(tmp_path / "whole", "central")
    clips = [line["extra"]["user_dp"]["user_clip"] for line in read_history(tmp_path / "whole")[1:]]
    assert len(set(clips)) == 3  # the clip moved every round
    stop, run_dir = threading.Event(), tmp_path / "resumed"
    with pytest.raises(RunInterrupted):
        simulate(config, run_dir, on_round=lambda record: stop.set() if record.round == 1 else None, stop=stop)
    simulate(config, run_dir, resume=True)
    assert_user_level_ledger(run_dir, "central")  # rounds 2 and 3 continued the ledger and the clip of round 1
    keep = ("round", "accuracy", "loss", "sampled", "clients", "epsilon_max")
    assert [({k: line[k] for k in keep}, line["extra"].get("user_dp")) for line in read_history(run_dir)] == [
        ({k: line[k] for k in keep}, line["extra"].get("user_dp")) for line in read_history(tmp_path / "whole")
    ]
