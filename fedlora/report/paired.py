"""Paired differences between variants of one held-out set, over the seeds both ran.

For each seed two variants share, the difference of a figure (variant minus reference); over those
differences the mean, its 95% t-interval (Student's t with n - 1 degrees of freedom, unadjusted)
and the paired t-test's two-sided p-value. A family of such tests (every variant against its
baseline, in one report) is corrected with Holm's step-down method; a verdict is "better" or
"worse" where the corrected p-value is below ALPHA, else "no difference detected".

Two figures are tested: the final accuracy, and the area under the accuracy curve over the rounds
both runs recorded, divided by their span (the curve's mean height: a variant that learns faster
has more of it, at the same final accuracy).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from scipy import stats

from fedlora.report.data import Comparison, Group, RunResult, Variant, canonical, seed_order

ALPHA = 0.05
CONFIDENCE = 1 - ALPHA
DIGITS = 12  # differences are rounded to this: float noise (0.3 - 0.1 - 0.2) is no difference
FEW_SEEDS = 3  # below this many shared seeds a report warns that the test can hardly tell anything
BETTER, WORSE, NO_DIFFERENCE, BASELINE = "better", "worse", "no difference detected", "baseline"


def accuracy_auc(run: RunResult, rounds: Sequence[int] | None = None) -> float:
    """The area under a run's accuracy curve over `rounds` (all it recorded by default), divided by
    their span; one round: its accuracy."""
    by_round = {r["round"]: float(r["accuracy"]) for r in run.history}
    rounds = sorted(by_round if rounds is None else rounds)
    if len(rounds) == 1:
        return by_round[rounds[0]]
    area = sum((b - a) * (by_round[a] + by_round[b]) / 2 for a, b in zip(rounds, rounds[1:]))
    return area / (rounds[-1] - rounds[0])


def _final_accuracy(run: RunResult, _rounds: Sequence[int]) -> float:
    return run.final_accuracy


# Figure name -> its value for a run over the rounds the pair shares.
FIGURES: dict[str, Callable[[RunResult, Sequence[int]], float]] = {
    "final accuracy": _final_accuracy,
    "accuracy AUC": accuracy_auc,
}


@dataclass
class Difference:
    """One figure's paired difference over the shared seeds; `p_holm` set by `holm_correct`."""

    figure: str
    differences: list[float]
    mean: float | None = None
    low: float | None = None
    high: float | None = None
    p: float | None = None
    p_holm: float | None = None

    @property
    def tested(self) -> bool:
        """Whether there were pairs enough (two) for a t-interval."""
        return self.p is not None

    @property
    def verdict(self) -> str:
        """better, worse, no difference detected (Holm-corrected p at ALPHA), or why it was not tested."""
        if not self.tested:
            return f"not tested ({len(self.differences)} shared seed{'' if len(self.differences) == 1 else 's'})"
        p = self.p if self.p_holm is None else self.p_holm
        if p >= ALPHA or self.mean == 0:
            return NO_DIFFERENCE
        return BETTER if self.mean > 0 else WORSE


@dataclass
class PairedTest:
    """A variant against a reference variant of its group, figure by figure."""

    variant: Variant
    reference: Variant
    seeds: list[Any]
    figures: dict[str, Difference] = field(default_factory=dict)

    @property
    def few_seeds(self) -> bool:
        """Whether it rests on fewer than FEW_SEEDS shared seeds."""
        return len(self.seeds) < FEW_SEEDS


def t_interval(differences: Sequence[float]) -> tuple[float, float, float, float] | None:
    """Mean, 95% t-interval and two-sided p-value of paired differences; None under two of them.

    Equal differences have no spread, where the t-test is undefined (scipy returns nan): the
    interval is the point itself, and p is 1 where they are all zero, otherwise the exact
    two-sided sign test's 2 * 0.5^n (all n of one sign), which needs no spread: two equal
    differences never make a significant lead (p = 0.5), six do (p = 0.03)."""
    n = len(differences)
    if n < 2:
        return None
    mean = statistics.fmean(differences)
    error = statistics.stdev(differences) / math.sqrt(n)
    if error == 0:
        return mean, mean, mean, 1.0 if mean == 0 else min(1.0, 2 * 0.5**n)
    half = stats.t.ppf(1 - ALPHA / 2, n - 1) * error
    p = 2 * stats.t.sf(abs(mean / error), n - 1)
    return mean, mean - half, mean + half, float(p)


def holm_correct(differences: list[Difference]) -> None:
    """Set each tested difference's Holm-adjusted p-value over the family `differences`."""
    tested = sorted((d for d in differences if d.tested), key=lambda d: d.p)
    running = 0.0
    for rank, difference in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - rank) * difference.p))
        difference.p_holm = running


def paired_test(variant: Variant, reference: Variant) -> PairedTest:
    """`variant` minus `reference` for each figure, over the seeds both ran (runs of one seed averaged)."""
    mine, theirs = _by_seed(variant), _by_seed(reference)
    seeds = sorted((seed for seed in mine if seed in theirs), key=lambda s: seed_order(mine[s][0].seed))
    test = PairedTest(variant, reference, [mine[s][0].seed for s in seeds])
    for figure, value in FIGURES.items():
        differences = []
        for seed in seeds:
            rounds = _shared_rounds(mine[seed] + theirs[seed])
            ours = statistics.fmean(value(run, rounds) for run in mine[seed])
            difference = ours - statistics.fmean(value(run, rounds) for run in theirs[seed])
            differences.append(round(difference, DIGITS))
        test.figures[figure] = Difference(figure, differences, *(t_interval(differences) or ()))
    return test


def _by_seed(variant: Variant) -> dict[str, list[RunResult]]:
    runs: dict[str, list[RunResult]] = {}
    for run in variant.runs:
        runs.setdefault(canonical(run.seed), []).append(run)
    return runs


def _shared_rounds(runs: list[RunResult]) -> list[int]:
    return sorted(set.intersection(*({r["round"] for r in run.history} for run in runs)))


def _corrected(tests: list[PairedTest]) -> list[PairedTest]:
    for figure in FIGURES:
        holm_correct([test.figures[figure] for test in tests])
    return tests


def baseline_tests(comparison: Comparison) -> list[PairedTest]:
    """Every variant against its group's baseline, Holm-corrected per figure across the report."""
    return _corrected(
        [
            paired_test(variant, group.baseline)
            for group in comparison.groups
            for variant in group.variants
            if variant is not group.baseline
        ]
    )


def lead_tests(group: Group) -> list[PairedTest]:
    """The group's best variant against each other one, Holm-corrected per figure."""
    best, *others = group.variants
    return _corrected([paired_test(best, other) for other in others])


def lead_is_significant(tests: list[PairedTest]) -> bool:
    """Whether the best variant's final accuracy is significantly better than every other's."""
    return bool(tests) and all(test.figures["final accuracy"].verdict == BETTER for test in tests)
