"""fedlora.report.data: which runs are read, how they group into variants, and how variants are named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedlora.report.data import MAX_LABEL, ReportError, compare, short_keys, variant_label
from fedlora.report.reading import find_runs, load_run
from tests.report_runs import MANY_KEYS, make_run, many_key_runs


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("many")
    many_key_runs(root)
    return root


def comparison_of(root: Path):
    finished, excluded = find_runs([root])
    return compare([load_run(d) for d in finished], excluded)


def test_unfinished_runs_are_skipped_and_listed_with_the_reason(many: Path) -> None:
    finished, excluded = find_runs([many])
    assert len(finished) == 12 and "stopped" not in {d.name for d in finished}
    assert [(e.path.name, e.reason) for e in excluded] == [("stopped", "not finished")]
    with pytest.raises(ReportError, match="no finished runs"):
        find_runs([many / "stopped"])


def test_variants_are_the_runs_that_differ_only_in_the_seed_and_fields_are_the_differing_keys(many: Path) -> None:
    comparison = comparison_of(many)
    assert set(comparison.fields) == set(MANY_KEYS[0]) and "seed" not in comparison.fields
    assert len(comparison.variants) == len(MANY_KEYS)
    for variant in comparison.variants:
        assert variant.seed_count == 2 and sorted(variant.seeds) == [0, 1]
        assert len({json.dumps(run.config | {"seed": 0}, sort_keys=True) for run in variant.runs}) == 1
    means = [v.stat(lambda run: run.final_accuracy)[0] for v in comparison.variants]
    assert means == sorted(means, reverse=True)


def test_labels_longer_than_the_limit_become_v_numbers_in_rank_order_and_keep_their_settings(many: Path) -> None:
    comparison = comparison_of(many)
    assert comparison.keyed
    assert [v.label for v in comparison.variants] == [f"V{i}" for i in range(1, 7)]
    for variant in comparison.variants:
        assert len(variant.description) > 0 and variant.label != variant.description
        run_settings = {key: value for key, value in variant.settings.items()}
        assert variant.description == variant_label(run_settings, short_keys(comparison.fields))
    assert max(len(v.description) for v in comparison.variants) > MAX_LABEL  # why they are keyed


def test_short_labels_name_only_the_differing_keys_shortened(tmp_path: Path) -> None:
    make_run(tmp_path / "a", ["strategy.name=fedit", "privacy.enabled=true", "federation.lr=0.01"], quality=0.1)
    make_run(tmp_path / "b", ["strategy.name=ffa_lora", "privacy.enabled=true", "federation.lr=0.02"])
    comparison = comparison_of(tmp_path)
    assert not comparison.keyed
    assert [v.label for v in comparison.variants] == ["lr=0.01, strategy=fedit", "lr=0.02, strategy=ffa_lora"]
    assert short_keys(["strategy.name", "privacy.enabled", "federation.lr", "model.lr"]) == {
        "strategy.name": "strategy",
        "privacy.enabled": "privacy",
        "federation.lr": "federation.lr",  # two keys end in lr: the full key says which
        "model.lr": "model.lr",
    }


def test_a_single_run_is_one_variant_labelled_all_runs(tmp_path: Path) -> None:
    make_run(tmp_path / "only", [])
    comparison = comparison_of(tmp_path / "only")
    assert comparison.fields == [] and [v.label for v in comparison.variants] == ["all runs"]
    assert not comparison.keyed


def test_attack_target_epsilon_and_recorded_defence_come_from_config_and_history(many: Path) -> None:
    comparison = comparison_of(many)
    by_robust = {v.settings["strategy.robust"]: v for v in comparison.variants}
    zprobe = by_robust["zprobe"]
    assert zprobe.attacks == [("alie", 0.25)]
    assert zprobe.defences == ["zprobe"]  # as the history names it (extra.defence.name)
    assert {run.target_epsilon for run in zprobe.runs} == {3.0}
    assert by_robust["none"].defences == [] and by_robust["krum"].runs[0].target_epsilon is None
    assert comparison.has_attack and comparison.has_defence and comparison.has_epsilon and comparison.has_train_loss


def test_a_variant_without_dp_is_not_labelled_with_an_epsilon(tmp_path: Path) -> None:
    for name, privacy in [("off", "false"), ("eps1", "true"), ("eps3", "true")]:
        epsilon = "1.0" if name == "eps1" else "3.0"
        make_run(tmp_path / name, [f"privacy.enabled={privacy}", f"privacy.epsilon={epsilon}"])
    labels = sorted(v.label for v in comparison_of(tmp_path).variants)
    assert labels == ["privacy=false", "privacy=true, epsilon=1.0", "privacy=true, epsilon=3.0"]


def test_a_defence_the_history_never_records_is_not_reported_from_the_config(tmp_path: Path) -> None:
    make_run(tmp_path / "configured-only", ["strategy.robust=krum"], defence_name=None)
    assert comparison_of(tmp_path / "configured-only").variants[0].defences == []


def test_bands_are_mean_min_and_max_over_the_seeds_per_round(many: Path) -> None:
    variant = comparison_of(many).variants[-1]  # quality 0 and 0.01 for its two seeds
    rounds, mean, low, high = variant.band(lambda r: r["accuracy"], start=0)
    assert rounds == [0, 1, 2, 3, 4]
    assert low == pytest.approx([0.2, 0.3, 0.4, 0.5, 0.6]) and high == pytest.approx([0.21, 0.31, 0.41, 0.51, 0.61])
    assert mean == pytest.approx([(a + b) / 2 for a, b in zip(low, high)])
