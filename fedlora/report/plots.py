"""The report's plots: matplotlib figures (no pyplot, no global state) rendered to PNG bytes.

Every PNG carries its legend's texts in a `Legend` text chunk (JSON), read from the legend
matplotlib drew, so a test or a script can check the labels without reading pixels.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fedlora.report.data import Comparison, Variant, detection_of, epsilon_of
from fedlora.report.tables import byte_unit

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PLOTS = ("accuracy", "loss", "accuracy_uplink", "epsilon", "bytes", "time", "detection")
LEGEND_KEY = "Legend"  # the PNG text chunk holding the legend's labels
LINE_STYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LEGEND_ROWS = 22  # entries per legend column; more variants get more columns


def _figure(ncols: int):
    from matplotlib.figure import Figure  # no pyplot: no global state, Agg canvas

    figure = Figure(figsize=(11.5, 4.4), layout="constrained")
    axes = figure.subplots(1, ncols, squeeze=False)[0]
    for ax in axes:
        ax.grid(alpha=0.3)
    return figure, list(axes)


def _colors(count: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if count <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(count)]


def png_bytes(figure) -> bytes:
    """The figure as PNG, one legend for all its axes (each label once) at its right."""
    handles, labels = [], []
    for ax in figure.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    drawn: list[str] = []
    if handles:
        ncols = -(-len(handles) // LEGEND_ROWS)
        legend = figure.legend(handles, labels, loc="outside right upper", fontsize="small", ncols=ncols)
        drawn = [text.get_text() for text in legend.get_texts()]
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, metadata={LEGEND_KEY: json.dumps(drawn)})
    return buffer.getvalue()


def legend_labels(png: bytes) -> list[str]:
    """The legend texts a plot of this module drew (from its PNG text chunk)."""
    from PIL import Image

    image = Image.open(io.BytesIO(png))
    image.load()
    return json.loads(image.text.get(LEGEND_KEY, "[]"))


def _integer_rounds(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")


def _styled(comparison: Comparison) -> list[tuple[Variant, dict[str, Any]]]:
    """Each variant with its colour, line style and marker: styles and markers keep variants with
    equal values (e.g. equal bytes) visible where their lines overlap."""
    colors = _colors(len(comparison.variants))
    return [
        (variant, {"color": colors[i], "linestyle": LINE_STYLES[i % len(LINE_STYLES)], "marker": MARKERS[i % len(MARKERS)]})
        for i, variant in enumerate(comparison.variants)
    ]


def _plot_bands(
    ax, comparison: Comparison, extract: Callable[[dict[str, Any]], float | None], start: int, scale: float = 1.0
) -> None:
    for variant, style in _styled(comparison):
        rounds, mean, low, high = variant.band(extract, start)
        if not rounds:
            continue
        ax.plot(rounds, [m / scale for m in mean], markersize=4, label=variant.label, **style)
        if len(variant.runs) > 1:
            low, high = [v / scale for v in low], [v / scale for v in high]
            ax.fill_between(rounds, low, high, color=style["color"], alpha=0.18, linewidth=0)
    _integer_rounds(ax)


def _from_zero(*axes) -> None:
    """Bytes and seconds start at zero: a constant 1.229 MB must not look like a swing."""
    for ax in axes:
        ax.set_ylim(bottom=0)


def plot_accuracy(comparison: Comparison) -> Figure:
    """Test accuracy per round: mean over seeds, min-max band."""
    figure, (ax,) = _figure(1)
    _plot_bands(ax, comparison, lambda r: r.get("accuracy"), start=0)
    ax.set_ylabel("test accuracy")
    ax.set_title("Test accuracy per round (line: mean over seeds; band: min to max)")
    return figure


def plot_loss(comparison: Comparison) -> Figure:
    """Test loss per round, where recorded the clients' training loss, and a causal LM's perplexity."""
    figure, axes = _figure(1 + comparison.has_train_loss + comparison.has_perplexity)
    _plot_bands(axes[0], comparison, lambda r: r.get("loss"), start=0)
    axes[0].set_ylabel("test loss")
    axes[0].set_title("Test loss of the global model")
    if comparison.has_train_loss:
        _plot_bands(axes[1], comparison, lambda r: r.get("train_loss"), start=1)
        axes[1].set_ylabel("training loss")
        axes[1].set_title("Clients' training loss (example-weighted mean)")
    if comparison.has_perplexity:
        # Log scale: a random model's perplexity starts in the thousands or beyond.
        _plot_bands(axes[-1], comparison, lambda r: r.get("perplexity"), start=0)
        axes[-1].set_yscale("log")
        axes[-1].set_ylabel("held-out perplexity")
        axes[-1].set_title("Perplexity on the held-out answers")
    return figure


def cumulative_uplink(variant: Variant) -> tuple[list[float], list[float]]:
    """Per round from 0: the mean over its runs of the bytes sent up so far, and of the accuracy."""
    per_run = []
    for run in variant.runs:
        total, points = 0, {}
        for record in run.history:
            total += int(record.get("bytes_up") or 0)
            points[record["round"]] = (total, float(record["accuracy"]))
        per_run.append(points)
    rounds = sorted(set.intersection(*(set(points) for points in per_run)))
    count = len(per_run)
    return (
        [sum(points[k][0] for points in per_run) / count for k in rounds],
        [sum(points[k][1] for points in per_run) / count for k in rounds],
    )


def plot_accuracy_uplink(comparison: Comparison) -> Figure:
    """Test accuracy against the bytes clients have sent so far: what a unit of uplink buys."""
    curves = [(variant, style, *cumulative_uplink(variant)) for variant, style in _styled(comparison)]
    unit, scale = byte_unit(max((max(sent) for _, _, sent, _ in curves), default=0))
    figure, (ax,) = _figure(1)
    for variant, style, sent, accuracy in curves:
        ax.plot([b / scale for b in sent], accuracy, markersize=4, label=variant.label, **style)
    ax.set_xlim(left=0)
    ax.set_xlabel(f"uplink so far ({unit}, all clients; mean over seeds)")
    ax.set_ylabel("test accuracy")
    ax.set_title("Test accuracy against cumulative uplink (one marker per round)")
    return figure


def plot_epsilon(comparison: Comparison) -> Figure:
    """ε per round against its target, and final accuracy against the final ε."""
    figure, (per_round, trade_off) = _figure(2)
    _plot_bands(per_round, comparison, epsilon_of, start=1)
    targets = sorted({t for run in comparison.runs if (t := run.target_epsilon) is not None})
    for target in targets:
        per_round.axhline(target, color="black", linestyle=":", linewidth=1.2, label=f"target ε = {target:g}")
        trade_off.axvline(target, color="black", linestyle=":", linewidth=1.2)
    per_round.set_ylim(bottom=0)
    per_round.set_ylabel("ε spent so far (max over clients)")
    per_round.set_title("ε per round (dotted: target)")
    for variant, style in _styled(comparison):
        points = [(run.final_epsilon, run.final_accuracy) for run in variant.runs if run.final_epsilon is not None]
        acc_mean, acc_std = variant.stat(lambda run: run.final_accuracy)
        if not points:  # no DP: its accuracy is a reference line across the trade-off
            trade_off.axhline(acc_mean, linestyle="--", color=style["color"], alpha=0.8, label=variant.label)
            continue
        trade_off.scatter(*zip(*points), color=style["color"], alpha=0.45, s=22)
        eps_mean, eps_std = variant.stat(lambda run: run.final_epsilon)
        trade_off.errorbar(
            [eps_mean],
            [acc_mean],
            xerr=[eps_std or 0.0],
            yerr=[acc_std or 0.0],
            fmt=style["marker"],
            color=style["color"],
            capsize=4,
            label=variant.label,
        )
    trade_off.set_xlim(left=0)
    trade_off.set_xlabel("ε after the last round (max over clients)")
    trade_off.set_ylabel("final test accuracy")
    trade_off.set_title("Final accuracy against ε (dashed: no DP)")
    return figure


def plot_bytes(comparison: Comparison) -> Figure:
    """Bytes up and down per round, mean over seeds, from zero."""
    peak = max((max(r.get("bytes_up") or 0, r.get("bytes_down") or 0) for run in comparison.runs for r in run.history), default=0)
    unit, scale = byte_unit(peak)
    figure, (up, down) = _figure(2)
    _plot_bands(up, comparison, lambda r: r.get("bytes_up"), start=1, scale=scale)
    _plot_bands(down, comparison, lambda r: r.get("bytes_down"), start=1, scale=scale)
    _from_zero(up, down)
    up.set_ylabel(f"uplink ({unit} per round, all clients)")
    down.set_ylabel(f"downlink ({unit} per round, all clients)")
    up.set_title("Clients to server")
    down.set_title("Server to clients")
    return figure


def plot_time(comparison: Comparison) -> Figure:
    """Server and client seconds per round, mean over seeds, from zero."""
    figure, (server, client) = _figure(2)
    _plot_bands(server, comparison, lambda r: r.get("server_seconds"), start=1)
    _plot_bands(client, comparison, lambda r: r.get("client_seconds"), start=1)
    _from_zero(server, client)
    server.set_ylabel("server seconds per round")
    client.set_ylabel("client seconds per round")
    server.set_title("Server: aggregation and evaluation")
    client.set_title("Clients: local training")
    return figure


def plot_detection(comparison: Comparison) -> Figure:
    """True and false positive rates of flagging attackers per round."""
    figure, (tpr, fpr) = _figure(2)
    _plot_bands(tpr, comparison, lambda r: detection_of(r)[0], start=1)
    _plot_bands(fpr, comparison, lambda r: detection_of(r)[1], start=1)
    for ax, name in ((tpr, "true positive rate (attackers flagged)"), (fpr, "false positive rate (honest flagged)")):
        ax.set_ylabel(name)
        ax.set_ylim(-0.05, 1.05)
    tpr.set_title("Attackers caught")
    fpr.set_title("Honest clients dropped")
    return figure


def make_plots(comparison: Comparison) -> dict[str, bytes]:
    """Every plot the runs have figures for, by name (in the order of PLOTS)."""
    makers = {
        "accuracy": plot_accuracy,
        "loss": plot_loss,
        "accuracy_uplink": plot_accuracy_uplink,
        "bytes": plot_bytes,
        "time": plot_time,
    }
    if comparison.has_epsilon:
        makers["epsilon"] = plot_epsilon
    if comparison.has_detection:
        makers["detection"] = plot_detection
    return {key: png_bytes(makers[key](comparison)) for key in PLOTS if key in makers}
