"""Where a run came from in summary.json (git, command, start, host, data fingerprint, absolute
paths); retired clients on the console and in the report; a model that cannot be had refused
before the engine starts."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from fedlora import metadata, simulation, workspace
from fedlora.cli import _round_line
from fedlora.config import ConfigError
from fedlora.data import hub
from fedlora.metadata import METADATA, command_line, data_fingerprint, git_state, record_start, runs_from, start_record
from fedlora.report import ReportError, write_report
from fedlora.report.reproduce import config_toml
from fedlora.results import RoundRecord, RunRecorder, read_history, read_summary
from fedlora.simulation import check_model_available
from tests.conftest import TINY, causal_config, one_line_refusal, run_cli, tiny_config
from tests.test_privacy_contract import BUDGETED  # 6 clients calibrated for 2 rounds of 6: someone runs out

SPENT = "privacy budget spent: another round would take epsilon to 3.412"


def git(folder: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(folder), *args],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def config_repo(folder: Path) -> Path:
    """A git repository holding the tiny experiment as experiment.toml, committed; the file's path."""
    folder.mkdir(parents=True)
    git(folder, "init", "-q")
    config = folder / "experiment.toml"
    config.write_text(config_toml(TINY))
    git(folder, "add", "experiment.toml")
    git(folder, "commit", "-q", "-m", "experiment")
    return config


# --- metadata ------------------------------------------------------------------------------------


def test_git_state_names_the_commit_and_a_changed_tree_and_is_none_outside_a_repository(tmp_path: Path) -> None:
    config = config_repo(tmp_path / "repo")
    head = git(config.parent, "rev-parse", "HEAD")
    assert git_state(config.parent) == {"commit": head, "dirty": False}
    config.write_text(config.read_text() + "\n# edited\n")
    assert git_state(config.parent) == {"commit": head, "dirty": True}
    outside = tmp_path / "plain"
    outside.mkdir()
    assert git_state(outside) is None


def test_without_git_the_commit_is_none_not_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = config_repo(tmp_path / "repo")
    monkeypatch.setenv("PATH", str(tmp_path / "no-such-bin"))
    assert git_state(config.parent) is None


def test_a_new_run_records_its_config_file_commit_command_start_and_host(tmp_path: Path) -> None:
    config = config_repo(tmp_path / "repo")
    with runs_from(config):
        record = start_record("f" * 64)
    assert record["config_file"] == str(config.resolve())
    assert record["git"] == {"commit": git(config.parent, "rev-parse", "HEAD"), "dirty": False}
    assert record["command"] == sys.argv and record["data_fingerprint"] == "f" * 64
    started = datetime.datetime.fromisoformat(record["started_at"])
    assert started.utcoffset() == datetime.timedelta(0)
    assert abs((datetime.datetime.now(datetime.UTC) - started).total_seconds()) < 60
    host = record["host"]
    assert host["cpu_count"] == os.cpu_count() and host["cpu"] and host["platform"] and isinstance(host["gpus"], list)
    outside = start_record("f" * 64)  # started from Python: no config file
    assert outside["config_file"] is None and outside["git"] is None


def test_a_resumed_run_keeps_its_start_lists_each_resume_and_warns_when_its_data_changed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    record_start(tmp_path, "a" * 64, resume=False)
    first = json.loads((tmp_path / METADATA).read_text())
    record_start(tmp_path, "a" * 64, resume=True)
    assert "data differ" not in caplog.text
    record_start(tmp_path, "b" * 64, resume=True)
    assert "the data differ from those the run started with (fingerprint aaaaaaaaaaaa, now bbbbbbbbbbbb)" in caplog.text
    after = json.loads((tmp_path / METADATA).read_text())
    assert {k: v for k, v in after.items() if k != "resumed"} == first
    assert [sorted(entry) for entry in after["resumed"]] == [["at", "command", "host"]] * 2


def test_a_run_from_before_metadata_resumed_records_what_can_still_be_known(tmp_path: Path) -> None:
    record_start(tmp_path, "a" * 64, resume=True)
    recorded = json.loads((tmp_path / METADATA).read_text())
    assert recorded["data_fingerprint"] == "a" * 64 and recorded["host"] and len(recorded["resumed"]) == 1


def test_a_secret_on_the_command_line_is_not_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["flwr-serverapp", "--token", "s3cret", "--run-once", "--token=s3cret2"])
    assert "s3cret" not in json.dumps(start_record("a" * 64))
    assert command_line() == ["flwr-serverapp", "--token", "<hidden>", "--run-once", "--token=<hidden>"]


def test_the_summary_holds_the_metadata_and_absolute_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    recorder = RunRecorder(Path("runs/one"), tiny_config())  # relative, as `--out runs/one` gives it
    record_start(Path("runs/one"), "c" * 64, resume=False)
    recorder.record(RoundRecord(round=0, accuracy=0.5, loss=1.0))
    summary = recorder.finish(1.0)
    assert summary["adapter"] == str(tmp_path / "runs" / "one" / "adapter")
    assert summary["data_fingerprint"] == "c" * 64 and summary["started_at"] and summary["host"]
    assert read_summary(tmp_path / "runs" / "one") == summary


def test_the_data_fingerprint_is_stable_across_builds_and_changes_with_the_data() -> None:
    def fresh(config) -> str:
        workspace._federated_task.cache_clear()
        return data_fingerprint(workspace.federated_task(config))

    base = fresh(tiny_config())
    assert fresh(tiny_config()) == base
    assert fresh(tiny_config("data.num_train=180")) != base  # other texts
    assert fresh(tiny_config("seed=8")) != base  # the same corpus split otherwise among the clients
    assert len(base) == 64 and int(base, 16) >= 0


# --- retired clients: console and report ---------------------------------------------------------


def test_the_round_line_names_the_retired_clients_and_why() -> None:
    record = RoundRecord(round=4, accuracy=0.5, loss=1.0, extra={"retired": {"1": SPENT, "4": "refused: no budget"}})
    assert _round_line(record).endswith(f"  retired client 1 ({SPENT}), client 4 (refused: no budget)")
    assert "retired" not in _round_line(RoundRecord(round=4, accuracy=0.5, loss=1.0))


def dp_run(run_dir: Path) -> Path:
    """A finished DP run of three rounds whose client 1 was retired before round 2."""
    config = tiny_config("privacy.enabled=true", "privacy.epsilon=3.0")
    recorder = RunRecorder(run_dir, config)
    for round_ in range(4):
        extra = {"retired": {"1": SPENT}} if round_ == 2 else {}
        recorder.record(RoundRecord(round=round_, accuracy=0.3 + 0.1 * round_, loss=1.0, epsilon_max=0.9 * round_, extra=extra))
    figures = {"noise-multiplier": 1.1, "sample-rate": 0.1, "delta": 1e-5}
    privacy = {
        "0": {**figures, "dp-steps": 9, "epsilon": 2.7, "reported-epsilon": 2.7},
        "1": {**figures, "dp-steps": 6, "epsilon": 2.95, "reported-epsilon": 2.95},
        "2": {**figures, "dp-steps": 0, "epsilon": 0.0, "reported-epsilon": None},
    }
    recorder.finish(5.0, {"privacy": privacy, "retired": {"1": SPENT}})
    return run_dir


def test_the_report_shows_each_client_s_epsilon_and_the_retirements(tmp_path: Path) -> None:
    files = write_report([dp_run(tmp_path / "run")], tmp_path / "report")
    markdown = files.markdown.read_text()
    assert "### Privacy per client" in markdown
    rows = {line.split(" | ")[0].strip("| "): line for line in markdown.splitlines() if line.startswith("| ")}
    assert rows["1"].startswith("| 1 | 2.950 | 2.950 | 6 | 1.100 | 0.1000 | from round 2: " + SPENT)
    assert rows["2"].startswith("| 2 | 0.000 | — | 0 |") and rows["2"].endswith("|  |")
    html = files.html.read_text()
    assert "Privacy per client" in html and "from round 2: privacy budget spent" in html


def test_a_report_of_runs_without_dp_has_no_client_privacy_table(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    recorder = RunRecorder(run_dir, tiny_config())
    recorder.record(RoundRecord(round=0, accuracy=0.5, loss=1.0))
    recorder.finish(1.0, {"privacy": None, "retired": {}})
    assert "Privacy per client" not in write_report([run_dir], tmp_path / "report").markdown.read_text()


def test_a_damaged_privacy_section_stops_the_report_in_one_line(tmp_path: Path) -> None:
    run_dir = dp_run(tmp_path / "run")
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["privacy"]["1"]["epsilon"] = "lots"
    (run_dir / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(ReportError, match=r"'privacy\.1\.epsilon' is \"lots\", not a number") as raised:
        write_report([run_dir], tmp_path / "report")
    assert "\n" not in str(raised.value)


# --- a model that cannot be had --------------------------------------------------------------------


@pytest.fixture
def unreachable_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The hub's endpoint is a closed local port, no proxy is set, the cache is empty, offline mode off."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for proxy in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)


@pytest.mark.usefixtures("unreachable_hub")
def test_a_made_up_model_id_is_refused_in_one_line_before_the_engine_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_engine(*args, **kwargs):
        raise AssertionError("the simulation engine started")

    monkeypatch.setattr(simulation, "_run_engine", no_engine)
    config = tmp_path / "experiment.toml"
    config.write_text(config_toml(TINY))
    started = time.monotonic()
    line = one_line_refusal(
        "simulate", str(config), "--set", "model.name='no-such-owner/no-such-model'", "--out", str(tmp_path / "run")
    )
    assert time.monotonic() - started < hub.PROBE_SECONDS + 2  # it took ~48 s of engine start-up before
    assert "model.name: 'no-such-owner/no-such-model' is neither a local folder nor in the local Hugging Face cache" in line
    assert "cannot be reached" in line and not (tmp_path / "run").exists()


@pytest.mark.usefixtures("unreachable_hub")
def test_a_causal_model_id_is_checked_too() -> None:
    with pytest.raises(ConfigError, match="model.name: 'no-such-owner/llm' is neither a local folder"):
        check_model_available(causal_config("model.name='no-such-owner/llm'").model)


def fake_hub(monkeypatch: pytest.MonkeyPatch, models: set[str]) -> list[str]:
    """The hub is reachable and holds `models`; the ids asked about are recorded."""
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    asked: list[str] = []

    def model_info(repo_id: str, timeout: float | None = None) -> object:
        asked.append(repo_id)
        if repo_id not in models:
            response = httpx.Response(404, request=httpx.Request("GET", f"https://huggingface.co/api/models/{repo_id}"))
            raise RepositoryNotFoundError("404 Client Error", response=response)
        return object()

    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=hub.PROBE_SECONDS: True)
    monkeypatch.setattr(huggingface_hub, "model_info", model_info)
    return asked


@pytest.mark.usefixtures("unreachable_hub")
def test_a_model_on_the_hub_passes_and_one_it_does_not_hold_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    asked = fake_hub(monkeypatch, {"prajjwal1/bert-tiny"})
    check_model_available(tiny_config("model.name='prajjwal1/bert-tiny'").model)
    with pytest.raises(ConfigError, match="nor a model on the Hugging Face hub .*check the id"):
        check_model_available(tiny_config("model.name='prajjwal1/bert-tinyy'").model)
    assert asked == ["prajjwal1/bert-tiny", "prajjwal1/bert-tinyy"]


def cache_copy(cache: Path, repo_id: str) -> None:
    """A model's config.json in a Hugging Face cache laid out as the hub client writes it."""
    folder = cache / f"models--{repo_id.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    (folder / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (folder / "snapshots" / ("0" * 40) / "config.json").write_text("{}")


@pytest.mark.usefixtures("unreachable_hub")
def test_offline_a_cached_model_passes_and_an_uncached_one_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=hub.PROBE_SECONDS: pytest.fail("offline: no probe"))
    cache_copy(Path(constants.HF_HUB_CACHE), "owner/cached")
    check_model_available(tiny_config("model.name='owner/cached'").model)
    with pytest.raises(ConfigError, match="nor in the local Hugging Face cache, and HF_HUB_OFFLINE is set"):
        check_model_available(tiny_config("model.name='owner/elsewhere'").model)


def test_built_in_names_and_local_folders_need_no_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=hub.PROBE_SECONDS: pytest.fail("no probe needed"))
    for name in ("minilm", "tiny", str(tmp_path)):
        check_model_available(tiny_config(f"model.name={name!r}").model)
    for name in ("tiny-llama", "tiny-gpt2"):
        check_model_available(causal_config(f"model.name={name!r}").model)
    with pytest.raises(ConfigError, match="neither a local folder nor a hub id"):
        check_model_available(causal_config("model.name='a/b/c'").model)


# --- through the real engine ---------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.usefixtures("one_ray")
def test_a_dp_run_from_a_config_in_git_records_its_origin_and_shows_its_retirements(tmp_path: Path) -> None:
    config = config_repo(tmp_path / "repo")
    run_dir = tmp_path / "run"
    sets = [item for override in BUDGETED for item in ("--set", override)]
    code, output = run_cli("simulate", str(config), *sets, "--out", str(run_dir))
    assert code == 0, output
    summary = read_summary(run_dir)
    assert summary["git"] == {"commit": git(config.parent, "rev-parse", "HEAD"), "dirty": False}
    assert summary["config_file"] == str(config.resolve()) and summary["command"][1:3] == ["simulate", str(config)]
    assert summary["started_at"] and summary["host"]["cpu_count"] == os.cpu_count()
    assert summary["run_dir"] == str(run_dir.resolve()) and Path(summary["adapter"]).is_absolute()
    assert summary["data_fingerprint"] == data_fingerprint(workspace.federated_task(tiny_config(*BUDGETED)))
    assert summary["retired"], "with 2 expected rounds each and random sampling, someone must run out"
    retirements = {client: why for line in read_history(run_dir) for client, why in line["extra"].get("retired", {}).items()}
    assert retirements == summary["retired"]
    shown = " ".join(output.split())  # the console wraps long lines at its width
    for client, why in summary["retired"].items():
        assert f"retired client {client} ({why})" in shown or f", client {client} ({why})" in shown
    report = (run_dir / "report" / "report.md").read_text()
    assert "### Privacy per client" in report and report.count("privacy budget spent") == len(summary["retired"])
    assert metadata._CONFIG_FILES == []  # the CLI's scope is closed
