"""Local data files read the Hugging Face way: `datasets.load_dataset` with the csv, json or
parquet builder, or `load_from_disk` for a saved folder.

The builders report a broken file as a chain of library errors without a line number ("Expected
object or value"). So a text file is first checked to be UTF-8 (cheap, and the builders would
only fail somewhere inside), and when a builder still fails the file is read again, line by
line, to name the line it chokes on. A row's line number for later messages (an empty label)
is worked out only when one is needed.
"""

from __future__ import annotations

import codecs
import csv
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlora.config import ConfigError

if TYPE_CHECKING:
    import datasets

# File suffix -> the `datasets` builder that reads it.
LOCAL_FORMATS = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_CHUNK = 1 << 20


def read_table(path: Path, what: str) -> datasets.Dataset | datasets.DatasetDict:
    """The table in a local file (a Dataset) or a `save_to_disk` folder (a Dataset or DatasetDict).

    `what` names the setting the path came from, for messages ("data.source"). Anything that
    cannot be read is a ConfigError naming the file and, for text files, the line.
    """
    if path.is_dir():
        return _load_saved(path, what)
    if not path.is_file():
        raise ConfigError(f"{what}: file not found: {path}")
    builder = LOCAL_FORMATS.get(path.suffix.lower())
    if builder is None:
        raise ConfigError(
            f"{what}: {path} is not a {' / '.join(LOCAL_FORMATS)} file nor a save_to_disk folder (or use 'builtin' or 'hf:NAME')"
        )
    try:
        if builder != "parquet":
            _check_utf8(path, what)
        options: dict[str, Any] = _csv_options(path, what) if builder == "csv" else {}
    except OSError as err:
        raise ConfigError(f"{what}: cannot read {path} ({err.strerror or err})") from None
    import datasets

    if builder == "json":
        return _json_table(path, what)
    try:
        with quiet_datasets():
            return datasets.load_dataset(builder, data_files=str(path), split="train", **options)
    except Exception as err:  # the builders raise pandas, pyarrow and their own errors alike
        if "corresponds to no data" in str(err):
            raise ConfigError(f"{what}: {path} holds no examples") from None
        raise ConfigError(f"{what}: {path}: {_why_unreadable(path, builder, err)}") from None


def row_places(path: Path) -> Callable[[int], str]:
    """How messages name row i (0-based) of a table read from `path`: its line in a CSV or JSON
    Lines file, its record in a JSON array, its row in a parquet file."""
    suffix = path.suffix.lower()

    @cache
    def lines() -> list[int] | None:  # None: rows are not lines (or the file cannot say)
        try:
            if suffix == ".csv":
                return _csv_row_lines(path)
            return None if suffix == ".parquet" or _is_json_array(path) else _json_row_lines(path)
        except (OSError, UnicodeDecodeError, csv.Error):
            return None

    def place(row: int) -> str:
        found = lines()
        if found is not None and row < len(found):
            return f"{path} line {found[row]}"
        return f"{path} {'record' if suffix in ('.json', '.jsonl') else 'row'} {row + 1}"

    return place


@contextmanager
def quiet_datasets() -> Iterator[None]:
    """No progress bars and no logged errors from `datasets` while it reads local files: what
    goes wrong becomes one ConfigError line, and a small file needs no progress bar."""
    import datasets

    bars_were_off = datasets.utils.are_progress_bars_disabled()
    verbosity = datasets.logging.get_verbosity()
    datasets.utils.disable_progress_bars()
    datasets.logging.set_verbosity(logging.CRITICAL + 1)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if not bars_were_off:
            datasets.utils.enable_progress_bars()


def root_cause(err: BaseException) -> str:
    """The first line of the innermost error of a chain (the library's own wrapper says little)."""
    seen = {id(err)}
    while True:
        inner = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
        if inner is None or id(inner) in seen:
            break
        seen.add(id(inner))
        err = inner
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _why_unreadable(path: Path, builder: str, err: Exception) -> str:
    """The line a text file breaks on, found by reading it again; else what the builder said."""
    found = {"csv": _diagnose_csv, "json": _diagnose_json}.get(builder, lambda _: None)(path)
    return found or f"cannot read it as {builder} ({root_cause(err)})"


def _load_saved(path: Path, what: str) -> datasets.Dataset | datasets.DatasetDict:
    import datasets

    try:
        with quiet_datasets():
            return datasets.load_from_disk(str(path))
    except Exception as err:  # not a saved data set, or a damaged one
        raise ConfigError(f"{what}: {path} is a folder but not one written by save_to_disk ({root_cause(err)})") from None


def _check_utf8(path: Path, what: str) -> None:
    """Refuse a text file that is not UTF-8, naming the line and the byte."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line, offset = 1, 0
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                bad = offset + err.start
                line += chunk[: err.start].count(b"\n")
                raise ConfigError(
                    f"{what}: {path} is not UTF-8 text: byte {chunk[err.start]:#04x} at offset {bad} (line {line}); "
                    "save it as UTF-8 (a binary file is not a data set)"
                ) from None
            line += chunk.count(b"\n")
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise ConfigError(f"{what}: {path} is not UTF-8 text: it ends inside a character; save it as UTF-8") from None


def _csv_options(path: Path, what: str) -> dict[str, Any]:
    """Read every column as text, as it is in the file: no number guessing, and an empty cell or
    "nan" stays what it is, for the label checks to name (pandas would make it NaN)."""
    import datasets

    with path.open(newline="", encoding="utf-8-sig") as handle:  # pandas skips a byte-order mark too
        try:
            header = next(csv.reader(handle), None)
        except csv.Error as err:
            raise ConfigError(f"{what}: {path} line 1: not a CSV header ({err})") from None
    if not header:
        raise ConfigError(f"{what}: {path} is empty; a CSV data set starts with a header line naming its columns")
    duplicates = sorted({name for name in header if header.count(name) > 1})
    if duplicates:
        raise ConfigError(f"{what}: {path}: the header names column {duplicates[0]!r} more than once")
    features = datasets.Features({name: datasets.Value("string") for name in header})
    return {"features": features, "keep_default_na": False}


def _diagnose_csv(path: Path) -> str | None:
    """The first line whose cells do not match the header, if any."""
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        try:
            header = next(reader, [])
            for row in reader:
                if len(row) > len(header):
                    return f"line {reader.line_num} has {len(row)} cells but the header has {len(header)}"
        except csv.Error as err:
            return f"line {reader.line_num}: not valid CSV ({err})"
    return None


def _diagnose_json(path: Path) -> str | None:
    """The first place that is not valid JSON, the first record that is not a JSON object, or whose
    key changes kind (a number in one record, a string in another, which no column can hold), if any."""
    unit, records = _json_records(path)
    try:
        return _first_bad_record(records, unit)
    except ValueError as err:
        return str(err)


def _json_records(path: Path) -> tuple[str, Iterator[tuple[int, Any]]]:
    """("record", a JSON array's records) or ("line", a JSON Lines file's, read line by line),
    numbered; iterating raises ValueError naming the first place that is not valid JSON."""
    if _is_json_array(path):
        return "record", _array_records(path)
    return "line", _line_records(path)


def _array_records(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        records = json.loads(path.read_text(encoding="utf-8-sig"))  # a byte order mark is allowed, as pyarrow allows it
    except json.JSONDecodeError as err:
        raise ValueError(f"not valid JSON (line {err.lineno}: {err.msg})") from None
    except RecursionError:
        raise ValueError("not valid JSON (nested too deeply)") from None
    if not isinstance(records, list):
        raise ValueError("not a list of objects")
    yield from enumerate(records, start=1)


def _line_records(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open(encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"line {number} is not valid JSON ({err.msg})") from None
            except RecursionError:
                raise ValueError(f"line {number} is not valid JSON (nested too deeply)") from None


def _json_table(path: Path, what: str) -> datasets.Dataset:
    """A JSON array or JSON Lines file read by Python's parser into a Dataset, not by the `datasets`
    json builder: its pyarrow reader (rapidjson) crashed test workers with SIGSEGV on fuzzed files,
    where a bad file must be one line. Anything not valid JSON (or nested too deeply), a record that
    is not an object, or a key whose kind changes is one line naming the file and the place."""
    import datasets

    unit, numbered = _json_records(path)
    try:
        records = [record for _, record in numbered]
    except ValueError as err:
        raise ConfigError(f"{what}: {path}: {err}") from None
    problem = _first_bad_record(enumerate(records, start=1), unit) if unit == "record" else _diagnose_json(path)
    if problem:
        raise ConfigError(f"{what}: {path}: {problem}")
    if not records:
        raise ConfigError(f"{what}: {path} holds no examples")
    try:
        return datasets.Dataset.from_list(records)
    except Exception as err:  # pyarrow's conversion errors (a nested value of changing shape)
        raise ConfigError(f"{what}: {path}: {_why_unreadable(path, 'json', err)}") from None


def _first_bad_record(records: Iterable[tuple[int, Any]], unit: str) -> str | None:
    first_kind: dict[str, tuple[str, int]] = {}
    for number, record in records:
        if not isinstance(record, dict):
            return f"{unit} {number} is {_json_kind(record)}, not an object with the text and label"
        for key, value in record.items():
            if value is None:
                continue
            kind, since = first_kind.setdefault(key, (_json_kind(value), number))
            if _json_kind(value) != kind:
                return f"{unit} {number}: {key!r} is {_json_kind(value)} but {kind} in {unit} {since}; a column holds one kind of value"
    return None


def _json_kind(value: object) -> str:
    kinds = {list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


def _is_json_array(path: Path) -> bool:
    with path.open("rb") as handle:
        start = handle.read(4096).removeprefix(codecs.BOM_UTF8).lstrip()
    return start.startswith(b"[")


def _csv_row_lines(path: Path) -> list[int]:
    """The line each data row starts on, as pandas counts rows (blank lines skipped)."""
    starts = []
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        next(reader, None)
        start = reader.line_num + 1
        for row in reader:
            if row:
                starts.append(start)
            start = reader.line_num + 1
    return starts


def _json_row_lines(path: Path) -> list[int]:
    """The number of every line of a JSON Lines file that holds a record (blank lines skipped)."""
    with path.open(encoding="utf-8") as handle:
        return [number for number, line in enumerate(handle, start=1) if line.strip()]
