"""fedlora.report.tables: the cells of the summary, runs and key tables, and the notes, from synthetic runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedlora.report.data import compare
from fedlora.report.reading import find_runs, load_run
from fedlora.report.tables import counted, key_table, notes, ranking_note, runs_table, summary_table
from tests.report_runs import MANY_KEYS, make_run, many_key_runs


def comparison_of(root: Path):
    finished, excluded = find_runs([root])
    return compare([load_run(d) for d in finished], excluded)


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("many")
    many_key_runs(root)
    return comparison_of(root)


def as_dicts(table) -> list[dict[str, str]]:
    return [dict(zip(table.headers, row)) for row in table.rows]


def test_a_keyed_summary_names_variants_counts_seeds_and_shows_attack_defence_and_target(many) -> None:
    table = summary_table(many)
    assert table.headers[:7] == ["rank", "variant", "seeds", "attack", "attack fraction", "defence", "final accuracy"]
    assert not any(field in table.headers for field in MANY_KEYS[0])  # the key table has them
    rows = as_dicts(table)
    assert [r["variant"] for r in rows] == ["V1", "V2", "V3", "V4", "V5", "V6"]
    assert {r["seeds"] for r in rows} == {"2"}
    assert rows[0]["rank"] == "1 ★ winner" and rows[1]["rank"] == "2" and table.highlight == {0}
    # V1 is the best: MANY_KEYS[5] (quality 0.10 and 0.11): ipm on 10% of the clients, trimmed mean, DP at ε 3.
    assert (rows[0]["attack"], rows[0]["attack fraction"], rows[0]["defence"]) == ("ipm", "0.1", "trimmed_mean")
    assert rows[0]["final accuracy"] == "0.7050 ± 0.0071" and rows[0]["final ε"] == "2.80 ± 0.00"
    assert rows[0]["target ε"] == "3"
    zprobe = next(r for r in rows if r["attack"] == "alie")
    assert zprobe["defence"] == "zprobe"
    clean = [r for r in rows if r["attack"] == "none"]
    assert len(clean) == 2 and all(r["attack fraction"] == "—" and r["defence"] == "none" for r in clean)


def test_the_key_table_maps_each_label_to_its_settings(many) -> None:
    rows = as_dicts(key_table(many))
    assert [r["variant"] for r in rows] == ["V1", "V2", "V3", "V4", "V5", "V6"]
    written = MANY_KEYS
    for row in rows:
        shown = {key: value for key, value in row.items() if key != "variant"}
        matching = [
            w for w in written if w["strategy.name"] == shown["strategy.name"] and w["federation.lr"] == shown["federation.lr"]
        ]
        assert len(matching) == 1
        expected = matching[0]
        assert shown["strategy.robust"] == expected["strategy.robust"] and shown["attack.name"] == expected["attack.name"]
        assert shown["model.target_modules"] == ", ".join(json.loads(expected["model.target_modules"]))


def test_the_runs_table_has_a_row_per_run_with_its_seed_and_variant(many) -> None:
    rows = as_dicts(runs_table(many))
    assert len(rows) == 12
    assert [(r["variant"], r["seed"]) for r in rows[:2]] == [("V1", "0"), ("V1", "1")]
    assert rows[0]["final accuracy"] == "0.7000" and rows[1]["final accuracy"] == "0.7100"
    assert rows[0]["uplink"] == "2.46 MB"  # ffa_lora sends B only: half of FedIT's 4 x 1.229 MB


def test_the_winner_note_is_short_and_counts_come_in_singular_and_plural(many, tmp_path: Path) -> None:
    winner = ranking_note(many.groups[0])
    (excluded,) = notes(many)
    assert winner[0].startswith("Winner: V1, final accuracy 0.7050 ± 0.0071 over 2 seeds. Runner-up: V2,")
    # V1 leads by the same 0.02 on both seeds: no spread for a t-test, and two of one sign are no
    # evidence (sign test p = 0.5). Before, equal differences gave p = 0 and a "significant" lead.
    assert "Its lead is not significant" in winner[0] and winner[1] is True  # said as a warning
    assert "=" not in winner[0] and len(winner[0]) < 400
    assert excluded == ("1 run is not included (failed or not finished): see the list below.", True)
    assert counted(1, "run") == "1 run" and counted(2, "variant") == "2 variants" and counted(0, "seed") == "0 seeds"
    make_run(tmp_path / "one", [])
    single = comparison_of(tmp_path / "one")
    assert ranking_note(single.groups[0]) == ("One run: nothing to rank.", False) and notes(single) == []
    assert as_dicts(summary_table(single))[0]["rank"] == "1" and summary_table(single).highlight == set()


def test_unkeyed_summaries_show_the_setting_columns_and_no_attack_columns_without_attacks(tmp_path: Path) -> None:
    make_run(tmp_path / "a", ["strategy.name=fedit"], quality=0.1)
    make_run(tmp_path / "b", ["strategy.name=ffa_lora"])
    table = summary_table(comparison_of(tmp_path))
    assert table.headers[:3] == ["rank", "strategy.name", "seeds"]
    assert "attack" not in table.headers and "defence" not in table.headers and "final ε" not in table.headers
    assert [row[1] for row in table.rows] == ["fedit", "ffa_lora"]
