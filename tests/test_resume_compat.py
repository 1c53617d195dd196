"""A run written by an older fedlora is read by a newer one: keys added since take the values the run had (resume, sweeps, reports)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import tiny_config
from tests.report_runs import make_run


def test_a_run_recorded_before_keys_were_added_resumes_with_them_at_their_defaults() -> None:
    from fedlora.config_compat import config_changes, with_defaults

    now = tiny_config().model_dump(mode="json")
    older = {**now, "data": {k: v for k, v in now["data"].items() if k != "corpus"}}
    older.pop("evaluation", None)
    older["model"] = {**now["model"], "tiny": {k: v for k, v in now["model"]["tiny"].items() if not k.startswith("pretrain")}}
    assert config_changes(older, now)  # compared as recorded, every added key looks changed
    assert config_changes(with_defaults(older), now) == []
    changed = {**older, "seed": 8}
    assert config_changes(with_defaults(changed), now) == ["seed"]


def test_multikrum_runs_recorded_before_the_plain_mean_keep_the_example_weighted_mean() -> None:
    from fedlora.config_compat import with_defaults

    now = tiny_config("strategy.robust='multikrum'").model_dump(mode="json")
    assert now["strategy"]["multikrum_mean"] == "plain"
    older = {**now, "strategy": {k: v for k, v in now["strategy"].items() if k != "multikrum_mean"}}
    assert with_defaults(older)["strategy"]["multikrum_mean"] == "examples"
    assert with_defaults(now)["strategy"]["multikrum_mean"] == "plain"
    # Other defences never read the key: an old run of theirs matches a new one.
    plain = tiny_config("strategy.robust='median'").model_dump(mode="json")
    old_plain = {**plain, "strategy": {k: v for k, v in plain["strategy"].items() if k != "multikrum_mean"}}
    assert with_defaults(old_plain) == plain


def test_a_report_groups_an_older_run_with_newer_runs_of_the_same_settings(tmp_path: Path) -> None:
    """Seeds 0 and 1 recorded before keys were added (and on other CPUs), seed 2 after: one variant of 3 seeds."""
    from fedlora.report.data import compare
    from fedlora.report.reading import load_run

    runs = [make_run(tmp_path / f"fedit-{seed}", [f"seed={seed}"]) for seed in range(3)]
    runs.append(make_run(tmp_path / "ffa-0", ["strategy.name='ffa_lora'"]))
    for old in (runs[0], runs[1], runs[3]):
        recorded = json.loads((old / "config.json").read_text())
        recorded.pop("evaluation")
        recorded["strategy"].pop("multikrum_mean")
        recorded["federation"]["client_cpus"] = 2.0
        (old / "config.json").write_text(json.dumps(recorded))
    comparison = compare([load_run(run) for run in runs])
    assert sorted(len(variant.runs) for variant in comparison.variants) == [1, 3]
    assert comparison.fields == ["strategy.name"]
    # A round timeout changes which replies arrive: runs that differ in it are not one variant.
    timed = json.loads((runs[2] / "config.json").read_text())
    timed["federation"]["round_timeout"] = 5.0
    (runs[2] / "config.json").write_text(json.dumps(timed))
    assert "federation.round_timeout" in compare([load_run(run) for run in runs]).fields
