"""Per-client and per-class evaluation in the report: how the clients' own accuracies spread, the
server's held-out figures per class with its confusion matrix, and each client's label mix.

The figures come from the run's records (fedlora/client_eval.py writes them): the clients' last
evaluation from history.jsonl's `extra.client_eval`, the confusion matrix (`held_out`) and the
label mix (`label_mix`) from summary.json. Macro-F1 and per-class accuracy are recomputed from the
confusion matrix (fedlora/eval_figures.py), so they cannot disagree with it. reading.py checks the
shapes when it reads a run.
"""

from __future__ import annotations

from typing import Any

from fedlora.eval_figures import WORST_SHARE, accuracy_spread, class_figures
from fedlora.report.data import NO_SPREAD, Comparison, RunResult
from fedlora.report.tables import Column, Table, number

MAX_DETAILED_RUNS = 6  # runs whose per-class and per-client tables the page shows; results.csv has every run's figures
EVALUATION_INTRO = (
    "Under label skew the global model can serve some clients far worse than the mean says. Clients: each one's accuracy "
    "on its own held-out share (evaluation.holdout of its examples, never trained on) at the last round they evaluated "
    "(evaluation.clients), as the clients report them (checked, never used to aggregate); the mean counts every client "
    f"once, the worst decile is the mean of the worst-served {WORST_SHARE:.0%} of them (at least one). Macro-F1: the "
    "mean F1 over the classes of the server's held-out set, after the last round."
)
CLIENTS_CAPTION = (
    "Each client's examples per class, as the server partitioned the task (simulation), and its own evaluation of the "
    "global model on its held-out share at the last round clients evaluated:"
)


def last_client_eval(run: RunResult) -> tuple[int, dict[str, dict[str, Any]], list[dict[str, Any]]] | None:
    """(round, each client's figures, the refusals) of the run's last client evaluation; None if clients never evaluated."""
    for record in reversed(run.history):
        extra = record.get("extra") or {}
        if extra.get("client_eval"):
            return record["round"], extra["client_eval"], list(extra.get("client_eval_refused") or [])
    return None


def client_spread(run: RunResult) -> dict[str, Any] | None:
    """The spread of the clients' accuracies at their last evaluation (fedlora.eval_figures.accuracy_spread)."""
    found = last_client_eval(run)
    return None if found is None else accuracy_spread({c: float(f["accuracy"]) for c, f in found[1].items()})


def held_out_classes(run: RunResult) -> dict[str, Any] | None:
    """Macro-F1, per-class accuracy and the confusion matrix of the server's held-out set; None where not recorded."""
    held_out = run.summary.get("held_out")
    return None if not held_out else class_figures(held_out["confusion_matrix"], held_out["classes"])


def macro_f1(run: RunResult) -> float | None:
    """The macro-F1 of the final model on the server's held-out set."""
    figures = held_out_classes(run)
    return None if figures is None else figures["macro_f1"]


def has_evaluation(run: RunResult) -> bool:
    """Whether the run recorded per-class or per-client figures."""
    return held_out_classes(run) is not None or last_client_eval(run) is not None or bool(run.summary.get("label_mix"))


def _spread_cell(key: str, digits: int = 4):
    def cell(run: RunResult) -> str:
        spread = client_spread(run)
        return NO_SPREAD if spread is None else number(spread[key], digits)

    return cell


def evaluation_table(comparison: Comparison) -> Table:
    """One row per run: macro-F1 on the server's held-out set and how its clients' accuracies spread."""
    runs = [run for variant in comparison.variants for run in variant.runs if has_evaluation(run)]

    def evaluated(run: RunResult) -> str:
        found = last_client_eval(run)
        return NO_SPREAD if found is None else f"{len(found[1])} in round {found[0]}"

    def worst(run: RunResult) -> str:
        spread = client_spread(run)
        return NO_SPREAD if spread is None else f"{spread['accuracy_min']:.4f} (client {spread['worst_client']})"

    def refused(run: RunResult) -> str:
        found = last_client_eval(run)
        return NO_SPREAD if found is None else str(len(found[2]))

    columns = [
        Column("run", lambda run: run.name, text=True),
        Column("final accuracy", lambda run: number(run.final_accuracy)),
        Column("macro-F1", lambda run: number(macro_f1(run))),
        Column("clients evaluated", evaluated),
        Column("client accuracy: mean", _spread_cell("accuracy_mean")),
        Column("worst decile", _spread_cell("accuracy_worst_decile")),
        Column("min", worst),
        Column("refused", refused),
    ]
    return Table([c.header for c in columns], [[c.cell(run) for c in columns] for run in runs], {0})


def class_table(run: RunResult) -> Table:
    """The server's held-out set per class: examples, accuracy (recall) and how often the class was predicted."""
    figures = held_out_classes(run)
    matrix = figures["confusion_matrix"]
    rows = [
        [name, str(sum(matrix[k])), number(figures["per_class_accuracy"][name]), str(sum(row[k] for row in matrix))]
        for k, name in enumerate(figures["classes"])
    ]
    return Table(["class", "held-out examples", "accuracy", "predicted"], rows, {0})


def confusion_table(run: RunResult) -> Table:
    """The confusion matrix: a row per true class, a column per predicted class, counts of examples."""
    figures = held_out_classes(run)
    names = figures["classes"]
    rows = [[f"{name} (true)", *(str(count) for count in row)] for name, row in zip(names, figures["confusion_matrix"])]
    return Table(["true \\ predicted", *names], rows, {0})


def client_table(run: RunResult) -> Table:
    """A row per client: its examples per class (the partition at a glance) and its own last evaluation."""
    mix = run.summary.get("label_mix") or {}
    found = last_client_eval(run)
    figures = found[1] if found else {}
    refusals = {str(r.get("client")): str(r.get("reason")) for r in found[2]} if found else {}
    classes = list(mix.get("classes") or [])
    counts = mix.get("clients") or {}
    clients = sorted(set(counts) | set(figures) | set(refusals), key=int)
    headers = ["client", *classes] + (["examples"] if classes else [])
    if found:
        headers += ["held-out examples", "accuracy", "loss"]
    rows = []
    for client in clients:
        row = [client]
        if classes:
            own = counts.get(client)
            row += [str(c) for c in own] + [str(sum(own))] if own else [NO_SPREAD] * (len(classes) + 1)
        if found:
            mine = figures.get(client)
            row += (
                [str(mine["examples"]), number(float(mine["accuracy"])), number(float(mine["loss"]))]
                if mine
                else [NO_SPREAD, f"refused: {refusals[client]}" if client in refusals else NO_SPREAD, NO_SPREAD]
            )
        rows.append(row)
    text = {0} | ({len(headers) - 2} if found else set())
    return Table(headers, rows, text)
