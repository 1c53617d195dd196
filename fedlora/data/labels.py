"""Texts and labels as a source holds them, checked before anything trains on them.

A label is a class name (a string) or a class number (an integer, also written as text, as CSV
has it, or as 3.0, as a float column has it); one table holds one kind. A missing label
(empty, null, NaN, or the text "None", "nan", "null", "NA", "N/A") is refused, or its row
dropped when the config asks for it. Nothing is guessed: a mistake names the row it is on.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from fedlora.config import ConfigError

MISSING_LABEL_TEXTS = frozenset({"", "none", "nan", "null", "na", "n/a"})
_INTEGER = re.compile(r"[+-]?\d+", re.ASCII)
# ClassLabel's mark for "no label" (the unlabelled test split of many hub data sets).
CLASS_LABEL_MISSING = -1

Label = int | str


@dataclass(frozen=True)
class RawTable:
    """One split's texts and labels as read, and how a message names row i."""

    texts: list[object]
    labels: list[object]
    place: Callable[[int], str]  # row i -> "/data/x.csv line 8"
    class_names: list[str] | None = None  # a ClassLabel column: labels index these names


@dataclass(frozen=True)
class CheckedRows:
    """The rows kept: string texts and labels normalised to ints or names, one kind throughout."""

    texts: list[str]
    labels: list[Label]
    rows: list[int]  # where each kept row was in the table (for messages)
    dropped: int  # rows without a label, dropped on request

    def subset(self, indices: list[int]) -> CheckedRows:
        """The rows at `indices` (in that order)."""
        return CheckedRows(
            [self.texts[i] for i in indices], [self.labels[i] for i in indices], [self.rows[i] for i in indices], 0
        )


def checked_rows(table: RawTable, drop_missing: bool, who: str) -> CheckedRows:
    """Every row's text and label checked; `who` prefixes messages (the setting to look at).

    Refuses a text that is not a non-empty string, a label that is neither a name nor an
    integer, a missing label (unless `drop_missing`) and a mix of names and integers.
    """
    texts: list[str] = []
    labels: list[Label] = []
    kept: list[int] = []
    first_of_kind: dict[type, tuple[Label, int]] = {}
    dropped = 0
    for row, (text, raw) in enumerate(zip(table.texts, table.labels, strict=True)):
        label = _label(raw, table, row, who)
        if label is None:
            if not drop_missing:
                raise ConfigError(
                    f"{who}: {table.place(row)} has no label ({_describe_missing(raw)}); fill it in, or set "
                    "data.drop_missing_labels = true to drop such rows"
                )
            dropped += 1
            continue
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(
                f"{who}: {table.place(row)}: the text is {_describe_text(text)}; every example needs a non-empty string"
            )
        first_of_kind.setdefault(type(label), (label, row))
        texts.append(text)
        labels.append(label)
        kept.append(row)
    if len(first_of_kind) > 1:
        (number, number_row), (name, name_row) = first_of_kind[int], first_of_kind[str]
        raise ConfigError(
            f"{who}: labels mix class numbers ({number} at {table.place(number_row)}) and names "
            f"({name!r} at {table.place(name_row)}); use one kind"
        )
    return CheckedRows(texts, labels, kept, dropped)


def class_names_of(labels: list[Label]) -> list[str]:
    """The classes of a table's labels: numbers in numeric order, or names in alphabetical order."""
    distinct = set(labels)
    return [str(label) for label in sorted(distinct)]  # one kind (checked_rows), so sorted() compares like with like


def encode_labels(rows: CheckedRows, class_names: list[str], place: Callable[[int], str], who: str) -> list[int]:
    """Class indices 0..C-1 of the rows' labels among `class_names`; one outside them is refused by row."""
    index = {name: i for i, name in enumerate(class_names)}
    encoded = []
    for row, label in zip(rows.rows, rows.labels, strict=True):
        if str(label) not in index:
            raise ConfigError(f"{who}: {place(row)}: label {label!r} is not among the classes {_listed(class_names)}")
        encoded.append(index[str(label)])
    return encoded


def require_two_classes(present: list[str], examples: str, who: str) -> None:
    """Refuse examples of fewer than 2 classes: training on them would reach accuracy 1 and
    loss 0 without learning anything. `examples` names them ("train example of x.csv")."""
    if len(present) < 2:
        only = f"the label {present[0]!r}" if present else "no label"
        raise ConfigError(f"{who}: every {examples} has {only}; a classifier needs at least 2 classes")


def _label(raw: object, table: RawTable, row: int, who: str) -> Label | None:
    """A label as an int or a name; None when it is missing; ConfigError when it is neither."""
    if table.class_names is not None:  # ClassLabel: already an index (or -1 for none)
        if raw is None or raw == CLASS_LABEL_MISSING:
            return None
        return (
            table.class_names[raw]
            if isinstance(raw, int) and 0 <= raw < len(table.class_names)
            else _refuse(raw, table, row, who)
        )
    if raw is None or (isinstance(raw, float) and math.isnan(raw)):
        return None
    if isinstance(raw, str):
        text = raw.strip()
        if text.lower() in MISSING_LABEL_TEXTS:
            return None
        return int(text) if _INTEGER.fullmatch(text) else text
    if isinstance(raw, bool):
        return _refuse(raw, table, row, who)
    if isinstance(raw, int):
        return raw
    if isinstance(raw, float) and raw.is_integer():
        return int(raw)
    return _refuse(raw, table, row, who)


def _refuse(raw: object, table: RawTable, row: int, who: str) -> Label:
    kind = {bool: "a boolean", float: "a fraction", list: "a list", dict: "an object"}.get(type(raw), type(raw).__name__)
    raise ConfigError(f"{who}: {table.place(row)}: the label {raw!r} is {kind}; a label is a class name or a class number")


def _describe_missing(raw: object) -> str:
    if raw is None:
        return "the value is empty or null"
    if isinstance(raw, str) and not raw.strip():
        return "the cell is empty"
    return f"the value is {raw!r}"


def _describe_text(text: object) -> str:
    if text is None:
        return "missing"
    if isinstance(text, str):
        return "empty"
    return f"{text!r}, not a string"


def _listed(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return f"{shown}, ... ({len(names)} in all)" if len(names) > limit else shown
