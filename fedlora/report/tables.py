"""The report's tables and notes, as rows of text cells that the HTML and Markdown pages both render."""

from __future__ import annotations

import shlex
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from fedlora.report.data import NO_SPREAD, Comparison, Excluded, Group, RunResult, Variant, canonical, detection_of, format_value
from fedlora.report.paired import ALPHA, BETTER, FEW_SEEDS, FIGURES, Difference, PairedTest, lead_is_significant, lead_tests
from fedlora.results import HISTORY, SUMMARY

BASE_CONFIG_FILE = "config.toml"
FINAL = "final accuracy"
CAUSAL_NOTE = (
    "Causal LM runs: accuracy is the exact match of greedy generations on the held-out prompts (data.exact_match_examples "
    "of them), loss the held-out token loss on the answers, perplexity exp(loss); communication is uplink plus downlink "
    "over the run in MB of 2^20 bytes, as FlowerTune's leaderboard reports it."
)


def byte_unit(peak: float) -> tuple[str, float]:
    """The unit (and its size in bytes) to show `peak` bytes in."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if peak >= scale:
            return unit, scale
    return "bytes", 1.0


@dataclass
class Table:
    """Rows of cells for both renderings; `text` columns are left-aligned, `highlight` is the winner row."""

    headers: list[str]
    rows: list[list[str]]
    text: set[int] = field(default_factory=set)
    highlight: set[int] = field(default_factory=set)


def number(value: float | None, digits: int = 4) -> str:
    """A figure with `digits` decimals, or a dash where it is not recorded."""
    return NO_SPREAD if value is None else f"{value:.{digits}f}"


def mean_std(mean: float | None, std: float | None, digits: int = 4) -> str:
    """`mean ± std`, the mean alone for one value, a dash for none."""
    if mean is None:
        return NO_SPREAD
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def format_bytes(value: float | None) -> str:
    """Bytes in a readable unit."""
    if value is None:
        return NO_SPREAD
    unit, scale = byte_unit(value)
    return f"{value / scale:.2f} {unit}" if scale > 1 else f"{value:.0f} bytes"


def server_seconds(run: RunResult) -> float | None:
    """Mean server seconds per trained round."""
    return run.mean_per_round(lambda r: r.get("server_seconds"))


def client_seconds(run: RunResult) -> float | None:
    """Mean client seconds per trained round."""
    return run.mean_per_round(lambda r: r.get("client_seconds"))


def tpr(run: RunResult) -> float | None:
    """Mean true positive rate of flagging attackers per round."""
    return run.mean_per_round(lambda r: detection_of(r)[0])


def fpr(run: RunResult) -> float | None:
    """Mean false positive rate per round."""
    return run.mean_per_round(lambda r: detection_of(r)[1])


@dataclass
class Column:
    """A table column: its header, the cell it shows for a row's subject, and whether it is text."""

    header: str
    cell: Callable[[Any], str]
    text: bool = False


def _table(columns: list[Column], subjects: list[Any], highlight: set[int] | None = None) -> Table:
    rows = [[column.cell(subject) for column in columns] for subject in subjects]
    text = {i for i, column in enumerate(columns) if column.text}
    return Table([c.header for c in columns], rows, text, highlight or set())


def _setting_columns(comparison: Comparison, variant_of: Callable[[Any], Variant]) -> list[Column]:
    """The variant's label where the variants are keyed (V1, V2, ...), else one column per setting
    (the attack's own columns, where present, stand for attack.name and attack.fraction)."""
    if comparison.keyed:
        return [Column("variant", lambda s: variant_of(s).label, text=True)]
    shown = [f for f in comparison.fields if not (comparison.has_attack and f in ("attack.name", "attack.fraction"))]
    return [Column(f, lambda s, f=f: format_value(variant_of(s).settings[f]), text=True) for f in shown]


def _attack_columns(comparison: Comparison, attacks_of: Callable[[Any], list[tuple[str, float]]]) -> list[Column]:
    if not comparison.has_attack:
        return []
    return [
        Column("attack", lambda s: ", ".join(name for name, _ in attacks_of(s)) or "none", text=True),
        Column("attack fraction", lambda s: ", ".join(f"{fraction:g}" for _, fraction in attacks_of(s)) or NO_SPREAD),
    ]


def _defence_columns(comparison: Comparison, defences_of: Callable[[Any], list[str]]) -> list[Column]:
    """The defence as the histories name it (zprobe and zprobe_refined are different rules)."""
    if not comparison.has_defence:
        return []
    return [Column("defence", lambda s: ", ".join(defences_of(s)) or "none", text=True)]


def summary_table(comparison: Comparison, group: Group | None = None) -> Table:
    """One row per variant of a group (the first by default), best mean final accuracy first, the winner marked."""
    group = group or comparison.groups[0]
    top = winners(group)
    ranked = len(group.variants) > 1

    def rank(variant: Variant) -> str:
        if ranked and variant in top:
            return "1 ★ tied" if len(top) > 1 else "1 ★ winner"
        return str(group.variants.index(variant) + 1)

    def stat(extract: Callable[[RunResult], float | None], digits: int = 4) -> Callable[[Variant], str]:
        return lambda variant: mean_std(*variant.stat(extract), digits=digits)

    columns = [
        Column("rank", rank, text=True),
        *_setting_columns(comparison, lambda v: v),
        Column("seeds", lambda v: str(v.seed_count)),
        *_attack_columns(comparison, lambda v: v.attacks),
        *_defence_columns(comparison, lambda v: v.defences),
        Column("final accuracy", stat(lambda run: run.final_accuracy)),
        Column("best accuracy", stat(lambda run: run.best_accuracy)),
    ]
    if comparison.has_perplexity:
        columns += [
            Column("final perplexity", stat(lambda run: run.final_perplexity, 3)),
            Column("communication (MB)", stat(lambda run: run.communication_mb, 2)),
        ]
    if comparison.has_epsilon:
        columns += [
            Column("final ε", stat(lambda run: run.final_epsilon, 2)),
            Column("target ε", lambda v: _distinct(run.target_epsilon for run in v.runs)),
        ]
    columns += [
        Column("uplink / run", lambda v: format_bytes(v.stat(lambda run: run.bytes_up)[0])),
        Column("downlink / run", lambda v: format_bytes(v.stat(lambda run: run.bytes_down)[0])),
        Column("server s / round", lambda v: number(v.stat(server_seconds)[0], 3)),
        Column("client s / round", lambda v: number(v.stat(client_seconds)[0], 3)),
    ]
    if comparison.has_detection:
        columns += [Column("TPR", stat(tpr, 3)), Column("FPR", stat(fpr, 3))]
    return _table(columns, group.variants, set(range(len(top))) if ranked else set())


def winners(group: Group) -> list[Variant]:
    """The variant(s) of a group with the best mean final accuracy: more than one on a tie."""
    means = [v.stat(lambda run: run.final_accuracy)[0] for v in group.variants]
    return [v for v, mean in zip(group.variants, means) if mean == means[0]]


def runs_table(comparison: Comparison) -> Table:
    """One row per run, in the order of the summary table."""
    subjects = [(variant, run) for variant in comparison.variants for run in variant.runs]
    columns = [
        Column("run", lambda s: s[1].name, text=True),
        *_setting_columns(comparison, lambda s: s[0]),
        Column("seed", lambda s: format_value(s[1].seed)),
        *_attack_columns(comparison, lambda s: [s[1].attack] if s[1].attack else []),
        *_defence_columns(comparison, lambda s: s[1].defences),
        Column("final accuracy", lambda s: number(s[1].final_accuracy)),
        Column("best accuracy", lambda s: number(s[1].best_accuracy)),
    ]
    if comparison.has_perplexity:
        columns += [
            Column("final perplexity", lambda s: number(s[1].final_perplexity, 3)),
            Column("communication (MB)", lambda s: number(s[1].communication_mb, 2)),
        ]
    if comparison.has_epsilon:
        columns += [
            Column("final ε", lambda s: number(s[1].final_epsilon, 2)),
            Column("target ε", lambda s: _distinct([s[1].target_epsilon])),
        ]
    columns += [
        Column("uplink", lambda s: format_bytes(s[1].bytes_up)),
        Column("downlink", lambda s: format_bytes(s[1].bytes_down)),
        Column("server s / round", lambda s: number(server_seconds(s[1]), 3)),
        Column("client s / round", lambda s: number(client_seconds(s[1]), 3)),
    ]
    if comparison.has_detection:
        columns += [Column("TPR", lambda s: number(tpr(s[1]), 3)), Column("FPR", lambda s: number(fpr(s[1]), 3))]
    return _table(columns, subjects)


# summary.json's per-client privacy figures: (header, key, decimals).
PRIVACY_FIGURES = (
    ("ε", "epsilon", 3),
    ("reported ε", "reported-epsilon", 3),
    ("DP steps", "dp-steps", 0),
    ("noise multiplier", "noise-multiplier", 3),
    ("sample rate", "sample-rate", 4),
)


def privacy_table(comparison: Comparison) -> Table:
    """One row per client of every run with DP: its privacy figures, and from which round and why it was retired."""
    runs = [run for variant in comparison.variants for run in variant.runs if run.client_privacy]
    subjects = [(run, client) for run in runs for client in run.client_privacy]
    columns = [Column("run", lambda s: s[0].name, text=True)] if len(runs) > 1 else []
    columns.append(Column("client", lambda s: s[1]))
    columns += [
        Column(header, lambda s, key=key, digits=digits: number(s[0].client_privacy[s[1]].get(key), digits))
        for header, key, digits in PRIVACY_FIGURES
    ]
    columns.append(Column("retired", lambda s: _retirement(s[0], s[1]), text=True))
    return _table(columns, subjects)


def _retirement(run: RunResult, client: str) -> str:
    if client not in run.retirements:
        return ""
    first, why = run.retirements[client]
    return why if first is None else f"from round {first}: {why}"


def key_table(comparison: Comparison) -> Table:
    """Where the variants are labelled V1, V2, ...: each label's settings, one column per differing key."""
    columns = [Column("variant", lambda v: v.label, text=True)]
    columns += [Column(f, lambda v, f=f: format_value(v.settings[f]), text=True) for f in comparison.fields]
    return _table(columns, comparison.variants)


def _distinct(values: Iterable[float | None]) -> str:
    shown = sorted({v for v in values if v is not None})
    return ", ".join(f"{v:g}" for v in shown) or NO_SPREAD


def counted(count: int, noun: str) -> str:
    """`1 run`, `2 runs`."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def versions_table(comparison: Comparison) -> tuple[Table, bool]:
    """Package versions; one column per distinct set (and whether there is more than one)."""
    sets: dict[str, list[str]] = {}
    recorded: dict[str, dict[str, str]] = {}
    for run in comparison.runs:
        versions = run.summary.get("versions") or {}
        sets.setdefault(canonical(versions), []).append(run.name)
        recorded.setdefault(canonical(versions), versions)
    packages: list[str] = []
    for versions in recorded.values():
        packages += [p for p in versions if p not in packages]
    if len(sets) == 1:
        headers = ["package", "version"]
    else:
        headers = ["package", *(f"runs: {', '.join(names)}" for names in sets.values())]
    rows = [[package, *(str(recorded[key].get(package, NO_SPREAD)) for key in sets)] for package in packages]
    return Table(headers, rows, set(range(len(headers)))), len(sets) > 1


def reproduce_table(comparison: Comparison) -> Table:
    """The command that re-runs each run from config.toml."""
    rows = [
        [run.name, " ".join(f"--set {shlex.quote(item)}" for item in comparison.overrides[run.name])]
        for variant in comparison.variants
        for run in variant.runs
    ]
    return Table(["run", f"fedlora simulate {BASE_CONFIG_FILE} ..."], rows, {0, 1})


def ranking_note(group: Group) -> tuple[str, bool]:
    """The group's winner and whether its lead is significant (paired by seed against every other
    variant, Holm-corrected), or why nothing is ranked: (text, is a warning)."""
    first = group.variants[0]
    first_mean, first_std = first.stat(_final)
    if len(group.variants) == 1:
        if len(first.runs) == 1:
            return "One run: nothing to rank.", False
        return (
            f"One variant ({first.label}), {counted(first.seed_count, 'seed')}: nothing to rank; the tables show its spread.",
            False,
        )
    tied = winners(group)
    if len(tied) > 1:
        return (
            f"No winner: {len(tied)} variants tie at final accuracy {first_mean:.4f} ({'; '.join(v.label for v in tied)}).",
            True,
        )
    second = group.variants[1]
    text = (
        f"Winner: {first.label}, final accuracy {mean_std(first_mean, first_std)} over {counted(first.seed_count, 'seed')}. "
        f"Runner-up: {second.label}, {mean_std(*second.stat(_final))}."
    )
    tests = lead_tests(group)
    untested = [t.reference.label for t in tests if not t.figures[FINAL].tested]
    if untested:
        return (
            text
            + f" Its lead over {', '.join(untested)} rests on single runs (under 2 shared seeds): it cannot be tested; add seeds.",
            True,
        )
    over_runner_up = tests[0].figures[FINAL]
    lead = f"over the runner-up {_signed(over_runner_up.mean)} (95% CI {_interval(over_runner_up)}, {counted(len(tests[0].seeds), 'shared seed')})"
    if lead_is_significant(tests):
        return (
            text
            + f" Its lead is significant: paired by seed it is better than every other variant (paired t-test, Holm-corrected, p < {ALPHA}); {lead}.",
            False,
        )
    level = [t.reference.label for t in tests if t.figures[FINAL].verdict != BETTER]
    return (
        text
        + f" Its lead is not significant: no difference detected against {', '.join(level)} (paired t-test, Holm-corrected); {lead}; more seeds may tell them apart.",
        True,
    )


def differences_table(comparison: Comparison, tests: list[PairedTest]) -> Table:
    """Each variant against its group's baseline: per figure the mean paired difference, its 95%
    t-interval, the Holm-corrected p-value and the verdict."""
    columns = (
        [Column("test set", lambda t: comparison.group_of(t.variant).label, text=True)] if len(comparison.groups) > 1 else []
    )
    columns += [
        Column("variant", lambda t: t.variant.label, text=True),
        Column("baseline", lambda t: t.reference.label, text=True),
        Column("shared seeds", lambda t: str(len(t.seeds))),
    ]
    for figure in FIGURES:
        columns += [
            Column(f"Δ {figure}", lambda t, f=figure: _signed(t.figures[f].mean)),
            Column("95% CI", lambda t, f=figure: _interval(t.figures[f])),
            Column("p (Holm)", lambda t, f=figure: _p_value(t.figures[f].p_holm)),
            Column("verdict", lambda t, f=figure: t.figures[f].verdict, text=True),
        ]
    return _table(columns, tests)


def differences_notes(comparison: Comparison, tests: list[PairedTest]) -> list[tuple[str, bool]]:
    """How the differences were tested, which baseline, and a warning where few seeds are shared."""
    baselines = "; ".join(
        f"{g.baseline.label} for {g.label}" if len(comparison.groups) > 1 else g.baseline.label for g in comparison.groups
    )
    found = [
        (
            f"Baseline: {baselines} (the first variant in run order unless --baseline KEY=VALUE picks one). Paired by seed: "
            "for every seed a variant and its baseline both ran, the variant's figure minus the baseline's. Δ is the mean of "
            "those differences and 95% CI its t-interval on the paired differences (Student's t, n − 1 degrees of freedom, not "
            f"adjusted for multiplicity); the verdict is better or worse where the paired t-test's p-value, Holm-corrected "
            f"across the {counted(len(tests), 'variant')} tested in this report (figure by figure), is below {ALPHA}, else "
            "no difference detected. Accuracy AUC: the area under the accuracy curve over the rounds both runs recorded, "
            "divided by their span (the curve's mean height).",
            False,
        )
    ]
    few = [f"{t.variant.label} ({counted(len(t.seeds), 'shared seed')})" for t in tests if t.few_seeds]
    if few:
        found.append(
            (
                f"Fewer than {FEW_SEEDS} seeds shared with the baseline: {', '.join(few)}. So few pairs can hardly detect a "
                "difference, and the t-interval assumes the differences are near normal, which they cannot show; add seeds.",
                True,
            )
        )
    return found


def _p_value(p: float | None) -> str:
    if p is None:
        return NO_SPREAD
    return "< 1e-12" if p < 1e-12 else f"{p:.3g}"


def _signed(value: float | None) -> str:
    return NO_SPREAD if value is None else f"{value:+.4f}"


def _interval(difference: Difference) -> str:
    return NO_SPREAD if difference.low is None else f"{difference.low:+.4f} to {difference.high:+.4f}"


def _final(run: RunResult) -> float:
    return run.final_accuracy


def notes(comparison: Comparison) -> list[tuple[str, bool]]:
    """What a reader must know before trusting the report, beyond each group's ranking: (text, is a warning)."""
    found: list[tuple[str, bool]] = []
    if len(comparison.groups) > 1:
        found.append(
            (
                f"These runs were evaluated on {len(comparison.groups)} different held-out sets "
                f"({'; '.join(g.label for g in comparison.groups)}): accuracy measures something else on each (exact match "
                "for causal LMs, classification accuracy otherwise, or other test data), so each is ranked and tested on "
                "its own; nothing is ranked across them.",
                True,
            )
        )
    if comparison.has_perplexity:
        found.append((CAUSAL_NOTE, False))
    if any(len({tuple(sorted(map(str, v.seeds))) for v in g.variants}) > 1 for g in comparison.groups):
        found.append(("The variants did not all run on the same seeds: compare them with care.", True))
    if comparison.excluded:
        found.append((_excluded_note(comparison.excluded), True))
    return found


def _excluded_note(excluded: list[Excluded]) -> str:
    disagreeing = sum(e.records for e in excluded)
    unfinished = len(excluded) - disagreeing
    reasons = [
        (f"{unfinished} " if disagreeing else "") + "failed or not finished" if unfinished else "",
        (f"{disagreeing}: " if unfinished else "") + f"{HISTORY} and {SUMMARY} disagree" if disagreeing else "",
    ]
    count = len(excluded)
    return f"{counted(count, 'run')} {'is' if count == 1 else 'are'} not included ({'; '.join(r for r in reasons if r)}): see the list below."


def headline(comparison: Comparison) -> list[str]:
    """What a report found, a line per held-out set, for the terminal: the best variant and whether its lead is significant."""
    lines = []
    for group in comparison.groups:
        best = winners(group)
        mean = best[0].stat(_final)[0]
        where = f"{group.label}: " if len(comparison.groups) > 1 else ""
        if len(group.variants) == 1:
            lines.append(f"{where}{'final accuracy' if len(best[0].runs) == 1 else 'mean final accuracy'} {mean:.4f}")
            continue
        labels = " and ".join(f"{v.label} ({v.description})" if comparison.keyed else v.label for v in best)
        lines.append(f"{where}best final accuracy {mean:.4f}: {labels}{' (tied)' if len(best) > 1 else _lead_status(group)}")
    return lines


def _lead_status(group: Group) -> str:
    tests = lead_tests(group)
    if not all(test.figures[FINAL].tested for test in tests):
        return " (lead not tested: under 2 shared seeds)"
    return " (lead significant)" if lead_is_significant(tests) else " (lead not significant)"
