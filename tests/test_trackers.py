"""Experiment trackers: what each backend wrote is read back with the backend's own reader and
compared with the history lines it was given (and, end to end, with history.jsonl)."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

from fedlora import cli
from fedlora.config import ConfigError
from fedlora.results import RoundRecord, read_history
from fedlora.trackers import MlflowTracker, TrackerError, Trackers, WandbTracker, config_params, round_scalars
from tests.conftest import one_line_refusal, tiny_config

QUICKSTART = Path(__file__).resolve().parent.parent / "simulations" / "quickstart.toml"
RECORDS = [
    RoundRecord(round=0, accuracy=0.125, loss=2.0),
    RoundRecord(
        round=1,
        accuracy=0.5,
        loss=1.25,
        bytes_up=1_229_000,
        bytes_up_factors=1_200_000,
        bytes_down=2_458_000,
        seconds=3.5,
        server_seconds=0.75,
        client_seconds=2.5,
        train_loss=1.5,
        epsilon_max=0.8,
        epsilon_mean=0.6,
        clients=[0, 1, 3],
        rejected=[{"client": 4, "reason": "no reply before the round timeout"}],
        refused=[{"client": 5, "reason": "budget"}],
        extra={"dropped": [2], "flagged": [2], "malicious": [2], "tpr": 1.0, "fpr": 0.0, "defence": {"name": "zprobe"}},
    ),
    RoundRecord(round=2, accuracy=0.625, loss=1.0, bytes_up=1_229_000, seconds=3.0, skipped=True),
]
SUMMARY = {"rounds": 2, "final_accuracy": 0.625, "best_accuracy": 0.625, "bytes_up": 2_458_000, "wall_seconds": 9.0}


def test_round_scalars_are_the_numbers_of_the_history_line() -> None:
    assert round_scalars(RECORDS[1]) == {
        "accuracy": 0.5,
        "loss": 1.25,
        "bytes_up": 1_229_000.0,
        "bytes_up_factors": 1_200_000.0,
        "bytes_down": 2_458_000.0,
        "seconds": 3.5,
        "server_seconds": 0.75,
        "client_seconds": 2.5,
        "train_loss": 1.5,
        "epsilon_max": 0.8,
        "epsilon_mean": 0.6,
        "clients": 3.0,
        "rejected": 1.0,
        "refused": 1.0,
        "dropped": 1.0,
        "flagged": 1.0,
        "tpr": 1.0,
        "fpr": 0.0,
        "skipped": 0.0,
    }
    first = round_scalars(RECORDS[0])
    assert "train_loss" not in first and "epsilon_max" not in first and "tpr" not in first  # not recorded: left out
    assert round_scalars(RECORDS[2])["skipped"] == 1.0


def run_trackers(names: list[str], run_dir: Path) -> dict:
    config = tiny_config()
    trackers = Trackers(names)
    trackers.start(config, run_dir)
    for record in RECORDS:
        trackers.log_round(record)
    trackers.finish(SUMMARY)
    return config_params(config)


def tensorboard_scalars(log_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], dict[str, object]]:
    """Scalars by tag as (step, value), and the hparams of the session, read with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    hparams = {key: value.WhichOneof("kind") and getattr(value, value.WhichOneof("kind")) for key, value in start.hparams.items()}
    return scalars, hparams


def expected_series(records: list[RoundRecord]) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        for key, value in round_scalars(record).items():
            series.setdefault(key, []).append((record.round, value))
    return series


def assert_same_series(got: dict[str, list[tuple[int, float]]], expected: dict[str, list[tuple[int, float]]]) -> None:
    assert set(got) == set(expected)
    for key, points in expected.items():
        assert [step for step, _ in got[key]] == [step for step, _ in points], key
        # TensorBoard stores float32: relative precision 1e-7.
        assert [value for _, value in got[key]] == pytest.approx([value for _, value in points], rel=1e-6), key


def test_tensorboard_writes_every_round_figure_and_the_config_as_hparams(tmp_path: Path) -> None:
    params = run_trackers(["tensorboard"], tmp_path)
    scalars, hparams = tensorboard_scalars(tmp_path / "tensorboard")
    summary = {tag: points for tag, points in scalars.items() if tag.startswith("summary/")}
    assert_same_series({tag: points for tag, points in scalars.items() if tag not in summary}, expected_series(RECORDS))
    assert scalars["accuracy"] == [(0, 0.125), (1, 0.5), (2, 0.625)]
    assert summary["summary/final_accuracy"] == [(2, 0.625)] and summary["summary/wall_seconds"] == [(2, 9.0)]
    assert hparams["model.name"] == "tiny" and hparams["federation.rounds"] == 2 and hparams["seed"] == 7
    assert hparams["model.target_modules"] == '["query", "value"]'
    assert set(hparams) == set(params)


def mlflow_run(store: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store.resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("fedlora").experiment_id])
    series = {key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)] for key in run.data.metrics}
    return run, series


def test_mlflow_file_store_holds_one_run_with_the_config_as_params_and_a_metric_per_round(tmp_path: Path) -> None:
    params = run_trackers(["mlflow"], tmp_path)
    run, series = mlflow_run(tmp_path / "mlruns")
    assert run.info.status == "FINISHED" and run.info.run_name == tmp_path.name
    assert run.data.params == {key: str(value) for key, value in params.items()}
    assert run.data.params["model.name"] == "tiny" and run.data.params["privacy.enabled"] == "False"
    summary = {key: points for key, points in series.items() if key.startswith("summary.")}
    assert_same_series({key: points for key, points in series.items() if key not in summary}, expected_series(RECORDS))
    assert series["dropped"] == [(0, 0.0), (1, 1.0), (2, 0.0)]
    assert summary["summary.final_accuracy"] == [(2, 0.625)]


def test_a_resumed_mlflow_run_continues_the_run_it_started(tmp_path: Path) -> None:
    config = tiny_config()
    first = Trackers(["mlflow"])
    first.start(config, tmp_path)
    first.log_round(RECORDS[0])  # ... and the process is killed
    again = Trackers(["mlflow"])
    again.start(config, tmp_path, resume=True)
    for record in RECORDS[1:]:
        again.log_round(record)
    again.finish(SUMMARY)
    run, series = mlflow_run(tmp_path / "mlruns")
    assert run.info.status == "FINISHED"
    assert series["accuracy"] == [(0, 0.125), (1, 0.5), (2, 0.625)]


def wandb_records(path: Path) -> list:
    """The records of an offline run's .wandb file: W&B's LevelDB-style log (a 7-byte header, 32 KiB
    blocks of chunks, each with a 7-byte header: crc, length, type 1 full / 2 first / 3 middle / 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, chunk, records = 7, b"", []
    while position + 7 <= len(data):
        left_in_block = BLOCK - position % BLOCK
        if left_in_block < 7:  # too short for a chunk header: padding
            position += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


BLOCK = 32 * 1024


def test_wandb_writes_an_offline_run_with_the_config_and_every_round_in_the_run_directory(tmp_path: Path) -> None:
    params = run_trackers(["wandb"], tmp_path)
    (offline,) = (tmp_path / "wandb").glob("offline-run-*")
    (log,) = offline.glob("run-*.wandb")
    records = wandb_records(log)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert {key: value for key, value in config.items() if key != "_wandb"} == params
    series: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):  # W&B's own _step, _runtime, _timestamp
                    series.setdefault(key, []).append((record.history.step.num, json.loads(item.value_json)))
    assert_same_series(series, expected_series(RECORDS))
    final = {
        item.key: json.loads(item.value_json)
        for r in records
        if r.WhichOneof("record_type") == "summary"
        for item in r.summary.update
    }
    assert final["final_accuracy"] == 0.625 and final["wall_seconds"] == 9.0


def test_a_tracker_without_its_package_is_refused_naming_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(WandbTracker, "module", "fedlora_no_such_module")
    monkeypatch.setattr(MlflowTracker, "module", "fedlora_no_such_module")
    with pytest.raises(ConfigError, match=r"output.trackers: 'wandb' needs the wandb package.*pip install wandb"):
        Trackers(["wandb"])
    with pytest.raises(ConfigError, match=r"'mlflow' needs the mlflow-skinny package"):
        Trackers(["mlflow"])


def test_the_cli_refuses_a_missing_tracker_package_in_one_line_before_anything_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(WandbTracker, "module", "fedlora_no_such_module")
    args = ["simulate", str(QUICKSTART), "--set", 'output.trackers=["wandb"]', "--set", f"output.dir={tmp_path / 'runs'}"]
    monkeypatch.setattr(sys, "argv", ["fedlora", *args])
    with pytest.raises(SystemExit) as done:
        cli.main()
    output = capsys.readouterr().out
    assert done.value.code == 2 and len(output.strip().splitlines()) == 1 and "wandb package" in output
    assert not (tmp_path / "runs").exists()


def test_a_tracker_installed_but_broken_is_refused_in_one_line_before_the_engine_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedlora import simulation

    broken = tmp_path / "site" / "fedlora_broken_wandb"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError(\"cannot import name 'Message' from protobuf\")\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(WandbTracker, "module", "fedlora_broken_wandb")
    monkeypatch.setattr(WandbTracker, "imports", ("fedlora_broken_wandb",))

    def started(**_: object) -> None:
        raise AssertionError("the simulation engine started with a broken tracker")

    monkeypatch.setattr(simulation, "run_simulation", started)
    runs = tmp_path / "runs"
    line = one_line_refusal(
        "simulate", str(QUICKSTART), "--set", 'output.trackers=["wandb"]', "--set", f"output.dir={str(runs)!r}"
    )
    assert "output.trackers: 'wandb' cannot import fedlora_broken_wandb (ImportError: cannot import name" in line
    assert "pip install --force-reinstall wandb" in line
    assert not runs.exists()  # nothing written: a rerun is not blocked


def test_a_tracker_that_fails_to_start_is_one_line_that_says_how_to_go_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fails(*_: object) -> None:
        raise RuntimeError("wandb.init: settings file is corrupt\nand a second line")

    monkeypatch.setattr(WandbTracker, "start", fails)
    with pytest.raises(
        TrackerError, match=r"'wandb' failed to start \(RuntimeError: wandb.init: settings file is corrupt\)"
    ) as err:
        Trackers(["wandb"]).start(tiny_config(), tmp_path / "run")
    assert f"fedlora simulate --resume {tmp_path / 'run'}" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.e2e
@pytest.mark.usefixtures("one_ray")
def test_a_simulated_run_logs_exactly_its_history_to_tensorboard_and_mlflow(tmp_path: Path) -> None:
    from fedlora.simulation import simulate

    run_dir = tmp_path / "tracked"
    simulate(tiny_config('output.trackers=["tensorboard", "mlflow"]'), run_dir)
    history = read_history(run_dir)
    expected = expected_series([RoundRecord(**line) for line in history])
    assert [value for _, value in expected["accuracy"]] == [line["accuracy"] for line in history]
    assert [value for _, value in expected["clients"]] == [len(line["clients"]) for line in history]
    scalars, hparams = tensorboard_scalars(run_dir / "tensorboard")
    assert_same_series({tag: points for tag, points in scalars.items() if not tag.startswith("summary/")}, expected)
    assert hparams["model.name"] == "tiny"
    run, series = mlflow_run(run_dir / "mlruns")
    assert run.info.status == "FINISHED"
    assert_same_series({key: points for key, points in series.items() if not key.startswith("summary.")}, expected)
    assert series["train_loss"][0][0] == 1  # the clients' loss from the first trained round on


# --- trackers as their users run them: project, group, tags, a shared server, artifacts -------------


def finished_run_files(run_dir: Path) -> dict:
    """A summary naming an adapter folder and a summary.json that exist, as a finished run's does."""
    (run_dir / "adapter").mkdir(parents=True)
    (run_dir / "adapter" / "adapter_config.json").write_text("{}")
    summary = {**SUMMARY, "adapter": str(run_dir / "adapter"), "run_dir": str(run_dir)}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return summary


def test_mlflow_on_a_shared_store_files_each_run_under_the_project_with_its_tags_and_artifacts(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    store = (tmp_path / "server-store").resolve().as_uri()
    overrides = (
        f"output.mlflow_uri={store!r}",
        "output.trackers=['mlflow']",
        "output.project='lora-study'",
        "output.group='sweep-a'",
        "output.tags=['dp','v2']",
    )
    config = tiny_config(*overrides)
    for name in ("run-a", "run-b"):  # two runs on one server; run-a is killed after round 0 and resumed
        run_dir = tmp_path / name
        summary = finished_run_files(run_dir)
        first = Trackers(["mlflow"])
        first.start(config, run_dir)
        first.log_round(RECORDS[0])
        if name == "run-a":
            first = Trackers(["mlflow"])
            first.start(config, run_dir, resume=True)
        for record in RECORDS[1:]:
            first.log_round(record)
        first.finish(summary)
    assert not (tmp_path / "run-a" / "mlruns").exists()  # the server's store, not the run directory's
    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("lora-study").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["run-a", "run-b"]  # the resume continued run-a, not run-b
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.tags["group"] == "sweep-a" and "dp" in run.data.tags and "v2" in run.data.tags
        assert [m.step for m in client.get_metric_history(run.info.run_id, "accuracy")] == [0, 1, 2]
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert artifacts == {"adapter", "summary"}, artifacts


def test_wandb_takes_its_project_group_tags_and_mode_from_the_output_section(tmp_path: Path) -> None:
    config = tiny_config(
        "output.trackers=['wandb']", "output.project='lora-study'", "output.group='sweep-a'", "output.tags=['dp']"
    )
    summary = finished_run_files(tmp_path)
    trackers = Trackers(["wandb"])
    trackers.start(config, tmp_path)
    for record in RECORDS:
        trackers.log_round(record)
    trackers.finish(summary)
    (offline,) = (tmp_path / "wandb").glob("offline-run-*")
    records = wandb_records(next(offline.glob("run-*.wandb")))
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.project, run.run_group, list(run.tags)) == ("lora-study", "sweep-a", ["dp"])
    assert any(r.WhichOneof("record_type") == "artifact" for r in records)
    disabled = tmp_path / "disabled"
    disabled.mkdir()
    off = Trackers(["wandb"])
    off.start(tiny_config("output.trackers=['wandb']", "output.wandb_mode='disabled'"), disabled)
    off.finish(SUMMARY)
    assert not list((disabled / "wandb").glob("offline-run-*"))


def test_an_mlflow_run_in_a_folder_with_quotes_in_its_name_resumes_its_own_run(tmp_path: Path) -> None:
    run_dir = tmp_path / 'it\'s "quoted"'
    run_dir.mkdir()
    first = Trackers(["mlflow"])
    first.start(tiny_config(), run_dir)
    first.log_round(RECORDS[0])
    again = Trackers(["mlflow"])
    again.start(tiny_config(), run_dir, resume=True)
    for record in RECORDS[1:]:
        again.log_round(record)
    again.finish(SUMMARY)
    run, series = mlflow_run(run_dir / "mlruns")
    assert series["accuracy"] == [(0, 0.125), (1, 0.5), (2, 0.625)] and run.data.tags["fedlora.run_dir"] == str(run_dir)


def test_a_tracker_failing_mid_run_is_dropped_with_a_warning_and_the_others_go_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    trackers = Trackers(["tensorboard", "mlflow"])
    trackers.start(tiny_config(), tmp_path)

    def server_gone(self, record) -> None:
        raise ConnectionError("the tracking server went away")

    monkeypatch.setattr(MlflowTracker, "log_round", server_gone)
    for record in RECORDS:
        trackers.log_round(record)
    trackers.finish(SUMMARY)
    scalars, _ = tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars["accuracy"] == [(0, 0.125), (1, 0.5), (2, 0.625)]  # the other tracker got every round
    assert [t.name for t in trackers.trackers] == ["tensorboard"]
    assert "'mlflow' stopped recording (ConnectionError: the tracking server went away)" in caplog.text


@pytest.mark.parametrize(
    "override",
    ["output.wandb_mode='cloud'", "output.project=''", "output.tags='dp'", "output.tags=['a;b']", "output.tags=['group']"],
)
def test_tracker_settings_that_cannot_work_are_refused_by_key(override: str) -> None:
    with pytest.raises(ConfigError, match=override.split("=")[0].split(".")[1]):
        tiny_config(override)
