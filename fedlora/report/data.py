"""Run directories in: finished runs, their figures, grouped into variants by their config differences."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlora.config import _parse_value
from fedlora.config_compat import SAME_EXPERIMENT, operational
from fedlora.report.reproduce import override_value, set_nested
from fedlora.results import communication_mb

NO_SPREAD = "—"
# The config keys that decide the server's held-out set, whatever the task (the partition keys
# are not among them: they split the training data only).
HELD_OUT_KEYS = (
    "data.source",
    "data.hf_config",
    "data.train_split",  # without a test split, the held-out set is carved from it
    "data.test_split",
    "data.test_fraction",
    "data.num_test",
    "data.max_test_examples",
    "data.drop_missing_labels",
)
CLASSIFICATION_HELD_OUT_KEYS = (
    "data.text_column",
    "data.label_column",
    # The built-in corpus' test split is generated with these (label_noise changes train labels only).
    "data.corpus.num_classes",
    "data.corpus.distractor_rate",
    "data.corpus.negation_rate",
    "data.corpus.held_out_templates",
    "data.corpus.held_out_words",
)
CAUSAL_HELD_OUT_KEYS = (
    "data.num_train",  # the built-in instruction task keeps training prompts out of its held-out set
    "data.exact_match_examples",
    "data.format",
    "data.instruction_column",
    "data.input_column",
    "data.output_column",
    "data.messages_column",
)
MAX_LABEL = 60  # longer variant labels cover the plots: the variants are then named V1, V2, ... with a key table


class ReportError(ValueError):
    """The runs asked for cannot make a report (missing directory, nothing finished); says what to do."""


@dataclass
class RunResult:
    """One finished run: its records and the figures the report shows for it."""

    name: str
    run_dir: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    history: list[dict[str, Any]]

    @property
    def seed(self) -> Any:
        """The run's seed."""
        return self.config.get("seed")

    @property
    def final_accuracy(self) -> float:
        """Accuracy after the last round."""
        return float(self.history[-1]["accuracy"])

    @property
    def best_accuracy(self) -> float:
        """The best accuracy of any round (round 0 included, as in summary.json)."""
        return max(float(r["accuracy"]) for r in self.history)

    @property
    def final_epsilon(self) -> float | None:
        """The last recorded epsilon (max over clients, cumulative); None without DP."""
        values = [v for r in self.history if (v := epsilon_of(r)) is not None]
        return values[-1] if values else None

    @property
    def final_perplexity(self) -> float | None:
        """A causal LM's held-out perplexity after the last round; None for classification."""
        value = self.history[-1].get("perplexity")
        return None if value is None else float(value)

    @property
    def communication_mb(self) -> float:
        """Uplink plus downlink over the run, in MB of 2**20 bytes (as FlowerTune's leaderboard counts)."""
        return communication_mb(self.bytes_up + self.bytes_down)

    @property
    def bytes_up(self) -> int:
        """Total bytes clients sent."""
        return sum(int(r.get("bytes_up") or 0) for r in self.history)

    @property
    def bytes_down(self) -> int:
        """Total bytes the server sent."""
        return sum(int(r.get("bytes_down") or 0) for r in self.history)

    @property
    def target_epsilon(self) -> float | None:
        """The epsilon its clients were held to (privacy.epsilon), where DP ran."""
        privacy = self.config.get("privacy") or {}
        return float(privacy["epsilon"]) if privacy.get("enabled") and privacy.get("epsilon") is not None else None

    @property
    def attack(self) -> tuple[str, float] | None:
        """The simulated attack's name and the fraction of malicious clients; None without one."""
        attack = self.config.get("attack") or {}
        name = attack.get("name") or "none"
        return None if name == "none" else (str(name), float(attack.get("fraction") or 0.0))

    @property
    def defences(self) -> list[str]:
        """The defence names its history records (extra.defence.name), in the order first seen."""
        names: list[str] = []
        for record in self.history:
            name = ((record.get("extra") or {}).get("defence") or {}).get("name")
            if name and name not in names:
                names.append(str(name))
        return names

    @property
    def has_train_loss(self) -> bool:
        """Whether its history records the clients' training loss."""
        return any(r.get("train_loss") is not None for r in self.history)

    @property
    def client_privacy(self) -> dict[str, dict[str, Any]]:
        """Per client id, the privacy figures summary.json records (ε, reported ε, DP steps, noise,
        sample rate); {} without DP."""
        return self.summary.get("privacy") or {}

    @property
    def retirements(self) -> dict[str, tuple[int | None, str]]:
        """Per retired client id: the first round it was not sampled for (None where the history,
        written before fedlora recorded it, does not say) and why."""
        first: dict[str, int] = {}
        for record in self.history:
            for client in (record.get("extra") or {}).get("retired") or {}:
                first.setdefault(str(client), record["round"])
        return {str(client): (first.get(str(client)), str(why)) for client, why in (self.summary.get("retired") or {}).items()}

    def mean_per_round(self, extract: Callable[[dict[str, Any]], float | None]) -> float | None:
        """The mean of a per-round figure over the trained rounds that record it."""
        values = [v for r in self.history if r["round"] >= 1 and (v := extract(r)) is not None]
        return statistics.fmean(values) if values else None


@dataclass
class Variant:
    """Runs with the same config except the seed: a row of the summary table, a line in the plots."""

    settings: dict[str, Any]
    label: str  # in legends and tables: its settings, or V1, V2, ... where those are too long
    runs: list[RunResult]
    description: str = ""  # its settings as `key=value, ...` (the label, unless the label is a key)

    @property
    def seeds(self) -> list[Any]:
        """The seeds of its runs."""
        return [run.seed for run in self.runs]

    @property
    def seed_count(self) -> int:
        """How many different seeds its runs used."""
        return len({canonical(seed) for seed in self.seeds})

    @property
    def attacks(self) -> list[tuple[str, float]]:
        """The attacks its runs faced (one, as variants share their config but the seed)."""
        return sorted({attack for run in self.runs if (attack := run.attack) is not None})

    @property
    def defences(self) -> list[str]:
        """The defence names its runs' histories record."""
        return list(dict.fromkeys(name for run in self.runs for name in run.defences))

    def stat(self, extract: Callable[[RunResult], float | None]) -> tuple[float | None, float | None]:
        """Mean and standard deviation (None for one value) over the runs that have the figure."""
        values = [v for run in self.runs if (v := extract(run)) is not None]
        if not values:
            return None, None
        return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)

    def band(
        self, extract: Callable[[dict[str, Any]], float | None], start: int = 1
    ) -> tuple[list[int], list[float], list[float], list[float]]:
        """Per round from `start`: rounds, mean, min and max over its runs."""
        per_run = [
            {r["round"]: float(v) for r in run.history if r["round"] >= start and (v := extract(r)) is not None}
            for run in self.runs
        ]
        per_run = [values for values in per_run if values]
        if not per_run:
            return [], [], [], []
        rounds = sorted(set.intersection(*(set(values) for values in per_run)))
        columns = [[values[k] for values in per_run] for k in rounds]
        return rounds, [statistics.fmean(c) for c in columns], [min(c) for c in columns], [max(c) for c in columns]


@dataclass
class Excluded:
    """A run directory the report could not use, and why; `records`: its history and summary disagree."""

    path: Path
    reason: str
    records: bool = False


@dataclass
class Group:
    """Variants evaluated on the same held-out set (same task and test data): they are ranked among
    themselves, never against another group's."""

    settings: dict[str, Any]  # the held-out settings that set it apart from the other groups; {} for one group
    label: str
    variants: list[Variant]  # best mean final accuracy first
    baseline: Variant  # what the others are tested against: the first in run order, or --baseline's


@dataclass
class Comparison:
    """Runs grouped into variants and the variants into groups by held-out set; `variants` runs
    group by group, each group's sorted by mean final accuracy (best first)."""

    runs: list[RunResult]
    fields: list[str]
    variants: list[Variant]
    base_config: dict[str, Any]
    overrides: dict[str, list[str]]  # run name -> the --set items that reproduce it
    excluded: list[Excluded] = field(default_factory=list)
    groups: list[Group] = field(default_factory=list)

    def group_of(self, variant: Variant) -> Group:
        """The group a variant is ranked in."""
        return next(group for group in self.groups if variant in group.variants)

    @property
    def has_epsilon(self) -> bool:
        """Whether any run recorded a privacy budget."""
        return any(run.final_epsilon is not None for run in self.runs)

    @property
    def has_perplexity(self) -> bool:
        """Whether any run is a causal LM's (its history records perplexity)."""
        return any(run.final_perplexity is not None for run in self.runs)

    @property
    def has_detection(self) -> bool:
        """Whether any run recorded detection rates."""
        return any(any(v is not None for v in detection_of(r)) for run in self.runs for r in run.history)

    @property
    def has_attack(self) -> bool:
        """Whether any run had simulated attackers."""
        return any(run.attack is not None for run in self.runs)

    @property
    def has_defence(self) -> bool:
        """Whether any run's history records a defence."""
        return any(run.defences for run in self.runs)

    @property
    def has_train_loss(self) -> bool:
        """Whether any run recorded the clients' training loss."""
        return any(run.has_train_loss for run in self.runs)

    @property
    def keyed(self) -> bool:
        """Whether the variants are labelled V1, V2, ... (their settings are then in the key table)."""
        return any(v.label != v.description for v in self.variants)


# --- per-round figures -----------------------------------------------------------------


def record_value(record: dict[str, Any], key: str) -> Any:
    """A per-round figure, whether recorded as a field of the round or inside its `extra`."""
    value = record.get(key)
    if value is None:
        value = (record.get("extra") or {}).get(key)
    return value


def epsilon_of(record: dict[str, Any]) -> float | None:
    """The round's epsilon (max over clients), if recorded."""
    value = record_value(record, "epsilon_max")
    if value is None:
        value = record_value(record, "epsilon")
    return None if value is None else float(value)


def detection_of(record: dict[str, Any]) -> tuple[float | None, float | None]:
    """The round's true and false positive rates of flagging attackers, recorded or derived.

    Derived from `flagged` and `malicious` client ids when the rates themselves are not
    recorded: the clients seen are the accepted ones plus the flagged ones.
    """
    tpr, fpr = record_value(record, "tpr"), record_value(record, "fpr")
    if tpr is not None or fpr is not None:
        return (None if tpr is None else float(tpr)), (None if fpr is None else float(fpr))
    flagged, malicious = record_value(record, "flagged"), record_value(record, "malicious")
    if flagged is None or malicious is None:
        return None, None
    try:
        flagged_ids = {int(c) for c in flagged}
        malicious_ids = {int(c) for c in malicious}
        seen = {int(c) for c in record.get("clients") or []} | flagged_ids
    except (TypeError, ValueError):
        return None, None
    attackers, honest = seen & malicious_ids, seen - malicious_ids
    return (
        len(flagged_ids & attackers) / len(attackers) if attackers else None,
        len(flagged_ids & honest) / len(honest) if honest else None,
    )


# --- grouping -----------------------------------------------------------------------------


def compare(runs: list[RunResult], excluded: list[Excluded] | None = None, baseline: list[str] | None = None) -> Comparison:
    """Group runs into variants by their config differences (seed, output and the other keys that
    cannot change what a run computes aside: fedlora/config_compat.py SAME_EXPERIMENT), and variants
    into groups by held-out set; `baseline`: KEY=VALUE items that pick each group's baseline."""
    flat = {run.name: _flatten(run.config) for run in runs}
    keys: list[str] = []
    for values in flat.values():
        keys += [k for k in values if k not in keys]
    differing = [k for k in keys if len({canonical(flat[name].get(k)) for name in flat}) > 1]
    experiment_keys = [k for k in keys if k.split(".")[0] != "output"]
    fields = [k for k in differing if k != "seed" and not operational(k, SAME_EXPERIMENT)]
    groups: dict[tuple[str, ...], list[RunResult]] = {}
    for run in runs:
        groups.setdefault(tuple(canonical(flat[run.name].get(k)) for k in fields), []).append(run)
    variants = []
    names = short_keys(fields)
    for members in groups.values():
        settings = {k: flat[members[0].name].get(k) for k in fields}
        members.sort(key=lambda run: seed_order(run.seed))
        description = variant_label(settings, names)
        variants.append(Variant(settings=settings, label=description, runs=members, description=description))
    groups = _held_out_groups(variants, flat, _baseline_settings(baseline or [], fields))
    variants = [variant for group in groups for variant in group.variants]
    if any(len(v.label) > MAX_LABEL for v in variants):
        for number, variant in enumerate(variants, 1):
            variant.label = f"V{number}"
    base: dict[str, Any] = {}
    for key in experiment_keys:
        if key not in differing:
            set_nested(base, key, flat[runs[0].name].get(key))
    overrides = {
        run.name: [
            f"{k}={override_value(flat[run.name][k])}"
            for k in differing
            if k in experiment_keys and flat[run.name].get(k) is not None
        ]
        for run in runs
    }
    return Comparison(runs, fields, variants, base, overrides, list(excluded or []), groups)


def held_out_settings(flat_config: dict[str, Any]) -> dict[str, Any]:
    """The settings that decide a run's held-out set, and so what its accuracy measures."""
    task = flat_config.get("model.task") or "classification"
    keys = HELD_OUT_KEYS + (CAUSAL_HELD_OUT_KEYS if task == "causal_lm" else CLASSIFICATION_HELD_OUT_KEYS)
    return {"model.task": task, **{key: flat_config.get(key) for key in keys}}


def _held_out_groups(variants: list[Variant], flat: dict[str, dict[str, Any]], baseline: dict[str, Any]) -> list[Group]:
    """Variants grouped by held-out set (groups and baselines in run order, each group best first)."""
    held_out = [held_out_settings(flat[v.runs[0].name]) for v in variants]
    members: dict[str, list[int]] = {}
    for index, settings in enumerate(held_out):
        members.setdefault(canonical(settings), []).append(index)
    names = short_keys(list(dict.fromkeys(k for settings in held_out for k in settings)))
    groups = []
    for indices in members.values():
        settings = _distinguishing(held_out[indices[0]], [held_out[i[0]] for i in members.values()])
        in_run_order = [variants[i] for i in indices]
        ranked = sorted(in_run_order, key=lambda v: -(v.stat(lambda run: run.final_accuracy)[0] or 0.0))  # stable
        label = variant_label(settings, names) if settings else "all runs"
        groups.append(Group(settings, label, ranked, _pick_baseline(in_run_order, baseline, label)))
    return groups


def _distinguishing(ours: dict[str, Any], every: list[dict[str, Any]]) -> dict[str, Any]:
    """The held-out settings that tell `ours` apart: the task where tasks differ, and the keys that
    differ among the sets of its task (a causal LM's exact_match_examples says nothing beside a classifier)."""
    tasks = {settings["model.task"] for settings in every}
    same_task = [settings for settings in every if settings["model.task"] == ours["model.task"]]
    differing = [k for k in ours if k != "model.task" and len({canonical(s.get(k)) for s in same_task}) > 1]
    return ({"model.task": ours["model.task"]} if len(tasks) > 1 else {}) | {k: ours[k] for k in differing}


def _baseline_settings(items: list[str], fields: list[str]) -> dict[str, Any]:
    """--baseline KEY=VALUE items as settings; each key one the variants differ in."""
    settings: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or key not in fields:
            known = ", ".join(fields) or "none: only the seed differs"
            raise ReportError(f"--baseline {item}: give KEY=VALUE with a key the variants differ in ({known})")
        settings[key] = _parse_value(text.strip())
    return settings


def _pick_baseline(variants: list[Variant], baseline: dict[str, Any], group: str) -> Variant:
    """The variant whose settings match `baseline`, or the first (in run order) without one."""
    if not baseline:
        return variants[0]
    matching = [v for v in variants if all(canonical(v.settings[k]) == canonical(value) for k, value in baseline.items())]
    if len(matching) != 1:
        asked = ", ".join(f"{k}={override_value(value)}" for k, value in baseline.items())
        found = "none" if not matching else "; ".join(v.description for v in matching)
        raise ReportError(
            f"--baseline {asked}: {len(matching)} variants of {group} match ({found}); "
            "give settings that pick exactly one (repeat --baseline for more keys)"
        )
    return matching[0]


def short_keys(keys: list[str]) -> dict[str, str]:
    """How each config key shows in a label: `strategy.name` and `privacy.enabled` as their section,
    any other key as its last part (`federation.lr` as `lr`), unless that leaves two keys alike."""
    shown = {key: key.rsplit(".", 1)[0] if key.endswith((".name", ".enabled")) else key.rsplit(".", 1)[-1] for key in keys}
    alike = [name for name in shown.values() if list(shown.values()).count(name) > 1]
    return {key: key if name in alike else name for key, name in shown.items()}


def variant_label(settings: dict[str, Any], names: dict[str, str] | None = None) -> str:
    """`strategy=fedit, privacy=true, lr=0.01`: the differing settings, keys shortened by `short_keys`.

    A section switched off says only that (`privacy=false`, not `privacy=false, epsilon=3.0`): its
    other settings differ among the runs but do nothing in this one."""
    names = names or short_keys(list(settings))
    off = [key.removesuffix("enabled") for key, value in settings.items() if key.endswith(".enabled") and value is False]
    parts = [
        f"{names[key]}={'[' + format_value(value) + ']' if isinstance(value, list) else format_value(value)}"
        for key, value in settings.items()
        if key.endswith(".enabled") or not key.startswith(tuple(off))
    ]
    return ", ".join(parts) or "all runs"


def format_value(value: Any) -> str:
    """A config value as a table cell."""
    if value is None:
        return NO_SPREAD
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ", ".join(format_value(v) for v in value)
    return str(value)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def seed_order(seed: Any) -> tuple[int, Any]:
    """A sort key for seeds: integers in order, then anything else by its text."""
    return (0, seed) if isinstance(seed, int) else (1, str(seed))


def canonical(value: Any) -> str:
    """A value as comparable text (JSON with sorted keys): equal settings, equal text."""
    return json.dumps(value, sort_keys=True)
