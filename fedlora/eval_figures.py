"""Figures derived from evaluations: a classifier's per-class figures from its confusion matrix,
and the spread of the clients' own accuracies. Plain Python: the server records them, the report
recomputes and shows them.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

# The worst decile: the mean accuracy of the worst-served tenth of the clients (at least one),
# as federated fairness studies report it; under label skew the mean hides them.
WORST_SHARE = 0.1


def class_figures(confusion: list[list[int]], class_names: list[str]) -> dict[str, Any]:
    """Macro-F1, each class's accuracy (recall) and held-out count, and the confusion matrix with its class names.

    confusion[t][p] counts the examples of class t predicted p. Macro-F1 averages F1 = 2 TP /
    (2 TP + FP + FN) over the classes that occur among the labels or the predictions, as
    scikit-learn's f1_score(average="macro") does by default; a class without examples has no
    accuracy (None).
    """
    classes = range(len(confusion))
    support = [sum(confusion[t]) for t in classes]
    predicted = [sum(confusion[t][p] for t in classes) for p in classes]
    f1 = [2 * confusion[k][k] / (support[k] + predicted[k]) for k in classes if support[k] + predicted[k]]
    return {
        "macro_f1": statistics.fmean(f1) if f1 else None,
        "per_class_accuracy": {name: confusion[k][k] / support[k] if support[k] else None for k, name in enumerate(class_names)},
        "class_examples": dict(zip(class_names, support)),
        "classes": list(class_names),
        "confusion_matrix": [list(row) for row in confusion],
    }


def accuracy_spread(accuracies: dict[str, float]) -> dict[str, Any]:
    """How the clients' accuracies spread: their plain mean (each client counts once), the worst
    decile's mean, the minimum and whose it is."""
    ranked = sorted(accuracies.items(), key=lambda item: (item[1], len(item[0]), item[0]))  # ties: the lowest client id
    worst = [accuracy for _, accuracy in ranked[: max(1, math.ceil(len(ranked) * WORST_SHARE))]]
    return {
        "clients": len(ranked),
        "accuracy_mean": statistics.fmean(accuracies.values()),
        "accuracy_worst_decile": statistics.fmean(worst),
        "accuracy_min": ranked[0][1],
        "worst_client": ranked[0][0],
    }


def label_counts(labels: list[int], num_classes: int) -> list[int]:
    """How many of the labels fall in each class."""
    counts = [0] * num_classes
    for label in labels:
        counts[label] += 1
    return counts
