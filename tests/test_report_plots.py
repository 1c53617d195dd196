"""fedlora.report.plots: what each figure draws (line data, axes, legend), checked on synthetic runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedlora.report.data import MAX_LABEL, compare
from fedlora.report.plots import (
    PLOTS,
    legend_labels,
    make_plots,
    plot_accuracy_uplink,
    plot_bytes,
    plot_epsilon,
    plot_loss,
    plot_time,
)
from fedlora.report.reading import find_runs, load_run
from tests.report_runs import ROUNDS, make_run, many_key_runs


def comparison_of(root: Path):
    finished, excluded = find_runs([root])
    return compare([load_run(d) for d in finished], excluded)


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("many")
    many_key_runs(root)
    return comparison_of(root)


def lines_by_label(ax) -> dict[str, tuple[list[float], list[float]]]:
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}


def test_every_plot_is_made_and_its_legend_holds_the_short_labels(many) -> None:
    plots = make_plots(many)
    assert list(plots) == list(PLOTS)
    labels = [v.label for v in many.variants]
    for name, png in plots.items():
        legend = legend_labels(png)
        assert legend and all(len(text) <= MAX_LABEL for text in legend), (name, legend)
        if name == "detection":  # only the variants with attackers and a flagging defence have rates
            assert set(legend) < set(labels)
        elif name == "epsilon":
            assert legend == [v.label for v in many.variants if v.runs[0].target_epsilon] + ["target ε = 3"] + [
                v.label for v in many.variants if not v.runs[0].target_epsilon
            ]
        else:
            assert legend == labels, name


def test_bytes_and_seconds_are_drawn_from_zero(many) -> None:
    for figure in (plot_bytes(many), plot_time(many)):
        for ax in figure.axes:
            bottom, top = ax.get_ylim()
            highest = max(max(ys) for _, ys in lines_by_label(ax).values())
            assert bottom == 0 and top >= highest
    up = plot_bytes(many).axes[0]
    fedit = [v.label for v in many.variants if v.settings["strategy.name"] == "fedit"]
    for label in fedit:  # a constant 1.229 MB a round, drawn as itself on a zero-based axis
        assert lines_by_label(up)[label][1] == pytest.approx([1.229] * ROUNDS)


def test_accuracy_against_uplink_follows_the_cumulative_bytes(many) -> None:
    (ax,) = plot_accuracy_uplink(many).axes
    assert ax.get_xlim()[0] == 0 and "MB" in ax.get_xlabel()
    for variant in many.variants:
        sent, accuracy = lines_by_label(ax)[variant.label]
        per_round = 0.6145 if variant.settings["strategy.name"] in ("ffa_lora", "fedsvd") else 1.229
        assert sent == pytest.approx([per_round * k for k in range(ROUNDS + 1)])
        finals = [run.history[-1]["accuracy"] for run in variant.runs]
        assert accuracy[-1] == pytest.approx(sum(finals) / len(finals))


def test_the_epsilon_plot_draws_the_target_and_the_budget_per_round(many) -> None:
    per_round, trade_off = plot_epsilon(many).axes
    target = lines_by_label(per_round)["target ε = 3"]
    assert set(target[1]) == {3.0}
    private = [v for v in many.variants if v.runs[0].target_epsilon]
    for variant in private:
        rounds, spent = lines_by_label(per_round)[variant.label]
        assert rounds == list(range(1, ROUNDS + 1)) and spent == pytest.approx([0.7 * k for k in rounds])
    assert any(set(line.get_xdata()) == {3.0} for line in trade_off.get_lines())  # the target, upright
    for variant in many.variants:
        if variant not in private:  # no DP: a dashed line at its accuracy
            assert set(lines_by_label(trade_off)[variant.label][1]) == {variant.stat(lambda run: run.final_accuracy)[0]}


def test_the_loss_plot_shows_test_loss_and_training_loss_where_recorded(many, tmp_path: Path) -> None:
    test_loss, train_loss = plot_loss(many).axes
    variant = many.variants[0]
    assert lines_by_label(test_loss)[variant.label] == (list(range(ROUNDS + 1)), pytest.approx([2 / (k + 1) for k in range(5)]))
    assert lines_by_label(train_loss)[variant.label][1] == pytest.approx([1.5 / k for k in range(1, ROUNDS + 1)])
    make_run(tmp_path / "a", ["strategy.name=fedit"], train_loss=False)
    make_run(tmp_path / "b", ["strategy.name=ffa_lora"], train_loss=False)
    plain = comparison_of(tmp_path)
    assert len(plot_loss(plain).axes) == 1
    assert list(make_plots(plain)) == ["accuracy", "loss", "accuracy_uplink", "bytes", "time"]
