"""fedlora.report.paired: each variant against its baseline paired by seed (mean difference, 95%
t-interval, Holm-corrected verdict), checked against scipy and on runs whose differences are known,
and how the report, results.csv and the terminal show it."""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

import pytest
from scipy import stats

from fedlora.report import compare, config_toml, read_runs
from fedlora.report.paired import BETTER, NO_DIFFERENCE, WORSE, Difference, accuracy_auc, baseline_tests, holm_correct, t_interval
from fedlora.report.tables import headline, ranking_note
from tests.conftest import TINY, one_line_refusal, run_cli
from tests.report_runs import make_run

BASE_FINAL = 0.6  # make_run's final accuracy (round 4) at quality 0

# Final accuracies of a baseline and a variant over five seeds, the variant ahead by 0.01-0.05.
BASELINE = [0.61, 0.64, 0.58, 0.66, 0.63]
AHEAD = [0.63, 0.69, 0.60, 0.67, 0.66]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def make_variants(root: Path, finals: dict[str, list[float]]) -> Path:
    """One variant per strategy, a run per seed with the given final accuracies (the first listed is run first)."""
    for order, (strategy, values) in enumerate(finals.items()):
        for seed, final in enumerate(values):
            make_run(
                root / f"{order}-{strategy}-seed{seed}", [f"strategy.name={strategy}", f"seed={seed}"], quality=final - BASE_FINAL
            )
    return root


def paired_tests_of(root: Path, baseline: list[str] | None = None):
    comparison = compare(read_runs([root])[0], baseline=baseline)
    return comparison, baseline_tests(comparison)


def test_the_interval_and_p_value_are_scipys_t_interval_and_ttest_rel() -> None:
    differences = [a - b for a, b in zip(AHEAD, BASELINE)]
    mean, low, high, p = t_interval(differences)
    expected_low, expected_high = stats.t.interval(0.95, len(differences) - 1, loc=mean, scale=stats.sem(differences))
    assert mean == pytest.approx(statistics.fmean(differences), abs=1e-12)
    assert (low, high) == (pytest.approx(expected_low, abs=1e-12), pytest.approx(expected_high, abs=1e-12))
    assert p == pytest.approx(stats.ttest_rel(AHEAD, BASELINE).pvalue, abs=1e-12)
    assert t_interval([0.1]) is None  # one pair: no interval
    assert t_interval([0.0, 0.0, 0.0]) == (0.0, 0.0, 0.0, 1.0)  # no spread, no difference (scipy: nan)
    # Equal differences: no spread to test with; the sign test decides (before: p = 0, "better" from two seeds).
    assert t_interval([1 / 600, 1 / 600])[3] == 0.5
    assert t_interval([0.01] * 6)[3] == pytest.approx(stats.binomtest(6, 6).pvalue)


def test_the_report_shows_scipys_interval_for_a_variant_ahead_on_every_seed(tmp_path: Path) -> None:
    root = make_variants(tmp_path, {"fedit": BASELINE, "ffa_lora": AHEAD})
    code, output = run_cli("report", str(root))
    assert code == 0, output
    expected_low, expected_high = stats.ttest_rel(AHEAD, BASELINE).confidence_interval(0.95)
    rows = [row for row in read_csv(root / "report" / "results.csv") if row["strategy.name"] == "ffa_lora"]
    assert len(rows) == 5 and {row["baseline"] for row in rows} == {"strategy=fedit"}
    row = rows[0]
    assert float(row["diff_final_accuracy_ci_low"]) == pytest.approx(expected_low, abs=1e-9)
    assert float(row["diff_final_accuracy_ci_high"]) == pytest.approx(expected_high, abs=1e-9)
    assert float(row["diff_final_accuracy_p_holm"]) == pytest.approx(stats.ttest_rel(AHEAD, BASELINE).pvalue, abs=1e-9)
    assert row["diff_final_accuracy_verdict"] == BETTER and row["shared_seeds"] == "5"
    markdown = (root / "report" / "report.md").read_text()
    assert f"| +0.0260 | {expected_low:+.4f} to {expected_high:+.4f} |" in markdown
    assert "t-interval on the paired differences" in markdown and "Holm-corrected" in markdown
    assert "Fewer than 3 seeds" not in markdown
    # The winner line says its lead is tested and significant; the terminal says so too.
    assert "Its lead is significant" in markdown and "(lead significant)" in output


def test_a_variant_better_on_every_seed_is_better_and_the_baseline_against_it_worse(tmp_path: Path) -> None:
    root = make_variants(tmp_path, {"fedit": BASELINE, "ffa_lora": AHEAD})
    (_, [test]) = paired_tests_of(root)
    assert [test.figures[f].verdict for f in ("final accuracy", "accuracy AUC")] == [BETTER, BETTER]
    (_, [reverse]) = paired_tests_of(root, ["strategy.name=ffa_lora"])
    assert reverse.variant.settings["strategy.name"] == "fedit" and reverse.figures["final accuracy"].verdict == WORSE


def test_two_variants_with_identical_runs_show_no_difference_and_no_winner(tmp_path: Path) -> None:
    root = make_variants(tmp_path, {"fedit": BASELINE, "ffa_lora": BASELINE})
    comparison, [test] = paired_tests_of(root)
    assert {f: d.verdict for f, d in test.figures.items()} == {"final accuracy": NO_DIFFERENCE, "accuracy AUC": NO_DIFFERENCE}
    assert test.figures["final accuracy"].differences == [0.0] * 5 and test.figures["final accuracy"].p_holm == 1.0
    assert ranking_note(comparison.groups[0])[0].startswith("No winner: 2 variants tie")


def test_a_lead_within_the_seed_noise_is_said_not_to_be_significant(tmp_path: Path) -> None:
    noisy = [b + d for b, d in zip(BASELINE, [0.02, -0.01, 0.01, -0.005, 0.015])]
    root = make_variants(tmp_path, {"fedit": BASELINE, "ffa_lora": noisy})
    comparison, [test] = paired_tests_of(root)
    assert test.figures["final accuracy"].verdict == NO_DIFFERENCE
    text, warn = ranking_note(comparison.groups[0])
    # Before: "The lead of 0.0060 exceeds the spread over seeds" or the like, from the standard deviations alone.
    assert warn and "Its lead is not significant: no difference detected against strategy=fedit" in text
    assert headline(comparison) == ["best final accuracy 0.6300: strategy=ffa_lora (lead not significant)"]


def test_holm_adjusts_step_down_over_the_tested_differences_only() -> None:
    family = [Difference("f", [1, 2], mean=0.1, p=p) for p in (0.01, 0.04, 0.03)] + [Difference("f", [1])]
    holm_correct(family)
    assert [d.p_holm for d in family] == [pytest.approx(0.03), pytest.approx(0.06), pytest.approx(0.06), None]
    assert family[0].verdict == BETTER and family[1].verdict == NO_DIFFERENCE  # 0.04 alone would pass; corrected it does not


def test_holm_corrects_across_the_variants_of_a_report(tmp_path: Path) -> None:
    small = [b + d for b, d in zip(BASELINE, [0.012, 0.004, 0.009, 0.002, 0.010])]
    root = make_variants(tmp_path, {"fedit": BASELINE, "ffa_lora": AHEAD, "fedsvd": small, "lora_fair": BASELINE})
    _, tests = paired_tests_of(root)
    finals = {t.variant.settings["strategy.name"]: t.figures["final accuracy"] for t in tests}
    alone = {
        name: stats.ttest_rel([d + b for d, b in zip(f.differences, BASELINE)], BASELINE).pvalue
        for name, f in finals.items()
        if name != "lora_fair"
    }
    alone["lora_fair"] = 1.0  # identical runs: scipy's nan, no difference
    order = sorted(alone, key=alone.get)
    expected, running = {}, 0.0
    for rank, name in enumerate(order):  # Holm by hand: m - rank times the p-value, never below the one before
        running = max(running, min(1.0, (3 - rank) * alone[name]))
        expected[name] = running
    assert {name: f.p_holm for name, f in finals.items()} == pytest.approx(expected, abs=1e-9)
    assert finals["fedsvd"].p < 0.05 and finals["fedsvd"].p_holm > finals["fedsvd"].p


def test_under_three_shared_seeds_warns_and_one_is_not_tested(tmp_path: Path) -> None:
    root = make_variants(tmp_path / "two", {"fedit": BASELINE[:2], "ffa_lora": AHEAD[:2]})
    assert run_cli("report", str(root))[0] == 0
    markdown = (root / "report" / "report.md").read_text()
    assert "Fewer than 3 seeds shared with the baseline: strategy=ffa_lora (2 shared seeds)" in markdown
    root = make_variants(tmp_path / "one", {"fedit": BASELINE[:1], "ffa_lora": AHEAD[:1]})
    code, output = run_cli("report", str(root))
    assert code == 0 and "(lead not tested: under 2 shared seeds)" in output
    (row,) = [row for row in read_csv(root / "report" / "results.csv") if row["strategy.name"] == "ffa_lora"]
    assert row["diff_final_accuracy_verdict"] == "not tested (1 shared seed)" and row["diff_final_accuracy_ci_low"] == ""
    assert "rests on single runs" in (root / "report" / "report.md").read_text()


def test_the_accuracy_auc_is_the_trapezoid_over_the_rounds_divided_by_their_span(tmp_path: Path) -> None:
    run = read_runs([make_run(tmp_path / "r", [])])[0][0]
    curve = [0.2, 0.3, 0.4, 0.5, 0.6]  # make_run: 0.2 + 0.1 round
    assert accuracy_auc(run) == pytest.approx(sum((a + b) / 2 for a, b in zip(curve, curve[1:])) / 4)
    assert accuracy_auc(run, [1, 2]) == pytest.approx(0.35) and accuracy_auc(run, [3]) == pytest.approx(0.5)


def test_baseline_picks_the_variant_and_a_bad_one_is_refused_in_one_line(tmp_path: Path) -> None:
    root = make_variants(tmp_path, {"fedit": BASELINE, "ffa_lora": AHEAD})
    assert run_cli("report", str(root), "--baseline", "strategy.name=ffa_lora")[0] == 0
    rows = read_csv(root / "report" / "results.csv")
    assert {row["baseline"] for row in rows} == {"strategy=ffa_lora"}
    assert {row["diff_final_accuracy_verdict"] for row in rows if row["strategy.name"] == "fedit"} == {WORSE}
    message = one_line_refusal("report", str(root), "--baseline", "federation.lr=0.1", "--overwrite")
    assert "--baseline federation.lr=0.1" in message and "strategy.name" in message
    message = one_line_refusal("report", str(root), "--baseline", "strategy.name=fedsvd")
    assert "0 variants of all runs match" in message


def test_compare_hands_its_baseline_to_the_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fedlora.sweep

    def made_up_sweep(sweep, out, console=None, stop=None):  # the runs, without the simulation engine
        make_variants(out, {"fedit": BASELINE, "ffa_lora": AHEAD})
        return []

    monkeypatch.setattr(fedlora.sweep, "run_sweep", made_up_sweep)
    config = tmp_path / "sweep.toml"
    config.write_text(config_toml({**TINY, "sweep": {"strategy.name": ["fedit", "ffa_lora"], "seed": [0, 1]}}))
    code, output = run_cli("compare", str(config), "--out", str(tmp_path / "out"), "--baseline", "strategy.name=ffa_lora")
    assert code == 0, output
    assert {row["baseline"] for row in read_csv(tmp_path / "out" / "results.csv")} == {"strategy=ffa_lora"}
