"""Labelled text for classifiers and regressors: read a CSV/TSV/JSONL table, pick the text and
label columns, check every row, and split it (stratified by class for classification).

Nothing here needs a model. Every problem is a ``TunesmithError`` naming the file, the line and
the column, raised before anything is written.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import TunesmithError

LABEL_NAMES = ("label", "labels", "score", "target", "rating", "class", "sentiment")
TEXT_NAMES = ("text", "sentence", "review", "content", "input", "document")
TASKS = ("classify", "regress")


@dataclass
class Labelled:
    """Rows ``{"text", "label", "line"}`` and how they were read."""

    task: str
    rows: list[dict]
    text_cols: list[str]
    label_col: str
    template: str | None
    inferred: list[str] = field(default_factory=list)  # what was guessed, said in the report
    labels: list[str] = field(default_factory=list)  # classes, for classification
    source: str = ""


def default_template(cols: list[str]) -> str | None:
    """One column is the text itself; several become "a: {a} ; b: {b}"."""
    if len(cols) == 1:
        return None
    return " ; ".join(f"{c}: {{{c}}}" for c in cols)


def read_table(path: str | Path) -> tuple[list[str], list[tuple[int, dict]]]:
    """Return the column names and ``(line, row)`` pairs of a CSV, TSV or JSONL file."""
    from .corpus import read_text

    path = Path(path)
    text = read_text(path)  # UTF-8, UTF-16 with a BOM, Windows-1252/Latin-1; links, folders, binary refused
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return _read_jsonl(text, path)
    if suffix in (".csv", ".tsv"):
        return _read_csv(text, path, "\t" if suffix == ".tsv" else ",")
    raise TunesmithError("labelled data must be .csv, .tsv or .jsonl", file=path)


def _read_jsonl(text: str, path: Path):
    rows, columns = [], {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TunesmithError(f"invalid JSON ({exc.msg}, column {exc.colno})", file=path, line=number) from None
        if not isinstance(obj, dict):
            raise TunesmithError("each line must be a JSON object", file=path, line=number)
        columns.update(dict.fromkeys(obj))
        rows.append((number, obj))
    return list(columns), rows


def _read_csv(text: str, path: Path, delimiter: str):
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    rows, header, start = [], None, 1
    try:
        for record in reader:
            line, start = start, reader.line_num + 1
            if not record or all(not cell.strip() for cell in record):
                continue
            if header is None:
                header = [cell.strip() for cell in record]
                continue
            if len(record) != len(header):
                raise TunesmithError(
                    f"this row has {len(record)} cells but the header has {len(header)} columns "
                    f"({', '.join(header)})", file=path, line=line,
                    hint="quote cells that contain the delimiter",
                )
            rows.append((line, dict(zip(header, record))))
    except csv.Error as exc:
        raise TunesmithError(f"malformed {'TSV' if delimiter == chr(9) else 'CSV'}: {exc}", file=path,
                             line=reader.line_num) from None
    if header is None:
        raise TunesmithError("the file is empty", file=path)
    return header, rows


def _pick(columns: list[str], wanted: tuple[str, ...]) -> str | None:
    lower = {c.lower(): c for c in columns}
    for name in wanted:
        if name in lower:
            return lower[name]
    return None


def read_labelled(
    path: str | Path,
    *,
    task: str = "auto",
    text_cols: list[str] | None = None,
    label_col: str | None = None,
    template: str | None = None,
) -> Labelled:
    """Read labelled text. ``task`` is classify, regress or auto (numbers with more than 10
    distinct values: regress; anything else: classify)."""
    path = Path(path)
    if task not in (*TASKS, "auto"):
        raise TunesmithError("must be classify, regress or auto", field="task")
    columns, records = read_table(path)
    inferred = []
    if label_col is None:
        label_col = _pick(columns, LABEL_NAMES)
        if label_col is None:
            raise TunesmithError(
                f"no label column found; the columns are: {', '.join(columns)}", file=path, field="label",
                hint="name it with --label-col",
            )
        inferred.append(f"label column '{label_col}' (inferred from its name)")
    elif label_col not in columns:
        raise TunesmithError(f"no such column; the columns are: {', '.join(columns)}", file=path, field=label_col)
    if not text_cols:
        found = _pick([c for c in columns if c != label_col], TEXT_NAMES)
        if found is None:
            rest = [c for c in columns if c != label_col]
            raise TunesmithError(
                f"no text column found; the columns are: {', '.join(columns)}", file=path, field="text",
                hint="name it with --text-col (repeat it to join several columns)" if rest else None,
            )
        text_cols = [found]
        inferred.append(f"text column '{found}' (inferred from its name)")
    for col in text_cols:
        if col not in columns:
            raise TunesmithError(f"no such column; the columns are: {', '.join(columns)}", file=path, field=col)
    template = template or default_template(text_cols)
    if template:
        try:
            template.format(**{c: "" for c in text_cols})
        except (KeyError, IndexError, ValueError) as exc:
            raise TunesmithError(f"the template names a column it was not given ({exc})", field="template",
                                 hint="use {column} for each --text-col") from None

    if task == "auto":
        task = _infer_task([r.get(label_col) for _, r in records])
        inferred.append(f"task '{task}' (inferred from the labels)")
    rows = []
    for line, record in records:
        values = {}
        for col in text_cols:
            value = record.get(col)
            value = "" if value is None else str(value)
            if not value.strip():
                raise TunesmithError("empty text", file=path, line=line, field=col)
            values[col] = value.strip()
        text = template.format(**values) if template else values[text_cols[0]]
        label = _label(record.get(label_col), task, path, line, label_col)
        rows.append({"text": text, "label": label, "line": line})
    if not rows:
        raise TunesmithError("no rows", file=path)
    data = Labelled(task, rows, list(text_cols), label_col, template, inferred, source=str(path))
    if task == "classify":
        data.labels = sort_labels({r["label"] for r in rows})
        if len(data.labels) < 2:
            raise TunesmithError(f"every row has the same label ({data.labels[0]!r}): nothing to learn",
                                 file=path, field=label_col, hint="a classifier needs at least two classes")
    return data


def _as_number(value) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(str(value).strip())
    except ValueError:
        return None


def _infer_task(values: list) -> str:
    numbers = [_as_number(v) for v in values if v is not None and str(v).strip()]
    if numbers and all(n is not None and math.isfinite(n) for n in numbers) and len(set(numbers)) > 10:
        return "regress"
    return "classify"


def _label(value, task: str, path: Path, line: int, col: str):
    if task == "regress":
        number = _as_number(value)
        if number is None:
            raise TunesmithError(f"the target {value!r} is not a number", file=path, line=line, field=col)
        if not math.isfinite(number):
            raise TunesmithError(f"the target is {value!r}; a regression needs a finite number", file=path,
                                 line=line, field=col)
        return number
    if value is None or not str(value).strip():
        raise TunesmithError("empty label", file=path, line=line, field=col)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def sort_labels(labels) -> list[str]:
    """Numeric labels in numeric order, others alphabetically."""
    labels = list(labels)
    if all(_as_number(x) is not None for x in labels):
        return sorted(labels, key=lambda x: (_as_number(x), x))
    return sorted(labels)


def split(data: Labelled, valid_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out ``valid_fraction`` of the rows; per class for classification (stratified)."""
    rng = np.random.default_rng(seed)
    if valid_fraction <= 0:
        return list(data.rows), []
    if data.task == "classify":
        groups: dict[str, list[dict]] = {}
        for row in data.rows:
            groups.setdefault(row["label"], []).append(row)
        groups_list = [groups[label] for label in data.labels]
    else:
        groups_list = [data.rows]
    train, valid = [], []
    for group in groups_list:
        order = rng.permutation(len(group))
        n_valid = int(round(len(group) * valid_fraction))
        if len(group) >= 2:
            n_valid = min(max(n_valid, 1), len(group) - 1)
        else:
            n_valid = 0
        valid += [group[i] for i in order[:n_valid]]
        train += [group[i] for i in order[n_valid:]]
    valid.sort(key=lambda r: r["line"])
    train = [train[i] for i in rng.permutation(len(train))]
    return train, valid
