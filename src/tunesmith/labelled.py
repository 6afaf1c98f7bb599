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
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import TunesmithError
from .wording import counted

LABEL_NAMES = ("label", "labels", "score", "target", "rating", "class", "sentiment")
TEXT_NAMES = ("text", "sentence", "review", "content", "input", "document")
TASKS = ("classify", "regress")
REGRESS_MIN_DISTINCT = 10  # numeric labels with more distinct values than this are a regression target
MIN_CLASS_EXAMPLES = 5  # fewer examples of a class than this are reported


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
                where = (f"no cell for column '{header[len(record)]}'" if len(record) < len(header)
                         else f"cell {len(header) + 1} has no column")
                raise TunesmithError(
                    f"this row has {counted(len(record), 'cell')} but the header has {len(header)} columns "
                    f"({', '.join(header)}): {where}", file=path, line=line,
                    field=header[len(record)] if len(record) < len(header) else None,
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
    label_col, text_cols, template, inferred = _probe(path, columns, text_cols, label_col, template)
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


def _finite(value) -> bool:
    number = _as_number(value)
    return number is not None and math.isfinite(number)


def _infer_task(values: list) -> str:
    return infer_task(values)[0]


def infer_task(values: list) -> tuple[str, str]:
    """``(task, why)``: labels that are numbers with more than 10 distinct values are a regression
    target; anything else is classes. A few values that are not finite numbers (NaN, a stray word:
    at most 10%) do not change the decision: they are reported as errors of their lines."""
    present = [v for v in values if v is not None and str(v).strip()]
    numbers = [_as_number(v) for v in present]
    finite = [n for n in numbers if n is not None and math.isfinite(n)]
    distinct = len(set(finite))
    if finite and len(finite) >= 0.9 * len(present) and distinct > REGRESS_MIN_DISTINCT:
        return "regress", f"the labels are numbers with {distinct:,} distinct values"
    if finite and len(finite) == len(present):
        return "classify", (f"the labels are numbers with only {distinct:,} distinct values "
                            f"(more than {REGRESS_MIN_DISTINCT} would make a regression)")
    return "classify", f"the labels are {len(set(map(str, present))):,} distinct values, not all numbers"


def _label(value, task: str, path: Path, line: int, col: str):
    if task == "regress":
        if value is None or not str(value).strip():
            raise TunesmithError("empty target; a regression needs a number on every row", file=path, line=line,
                                 field=col)
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


# ----------------------------------------------------------------------------------------
# `tunesmith prepare` on labelled data: what the legacy prepare_data tool reported, with lines

SHOWN_LINES = 10  # lines named per check before "and N more"


def looks_labelled(path: str | Path, label_col: str | None = None) -> bool:
    """True for a CSV/TSV/JSONL table with a label column (named like label/score/rating, or
    ``label_col``) and no prompt/completion/messages column: data for ``train --task``, not text
    to generate. Reads only the header (the first record of a JSONL file)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".tsv", ".jsonl", ".ndjson") or not path.is_file():
        return False
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            if suffix in (".csv", ".tsv"):
                reader = csv.reader(fh, delimiter="\t" if suffix == ".tsv" else ",")
                header = next((row for row in reader if any(cell.strip() for cell in row)), [])
                columns = [cell.strip() for cell in header]
            else:
                first = next((line for line in fh if line.strip()), "")
                obj = json.loads(first) if first else {}
                columns = list(obj) if isinstance(obj, dict) else []
    except (OSError, UnicodeDecodeError, csv.Error, json.JSONDecodeError):
        return False  # the ordinary reader reports what is wrong
    lower = {c.lower() for c in columns}
    if lower & {"prompt", "completion", "messages"}:
        return False
    if label_col is not None:
        return label_col in columns
    return _pick(columns, LABEL_NAMES) is not None


def _lines(lines: list[int]) -> str:
    shown = ", ".join(str(n) for n in lines[:SHOWN_LINES])
    more = f" and {len(lines) - SHOWN_LINES:,} more" if len(lines) > SHOWN_LINES else ""
    return ("line " if len(lines) == 1 else "lines ") + shown + more


def _check(name: str, status: str, message: str, lines: list[int] | None = None) -> dict:
    return {"name": name, "status": status, "message": message, "lines": list(lines or [])}


def conflicting_duplicates(rows: list[dict]) -> list[dict]:
    """Texts (the same up to whitespace) that occur more than once with different labels:
    ``{"text", "lines", "labels"}`` each, in the order of their first line."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(" ".join(str(row["text"]).split()), []).append(row)
    out = []
    for text, group in groups.items():
        labels = list(dict.fromkeys(r["label"] for r in group))
        if len(group) > 1 and len(labels) > 1:
            out.append({"text": text, "lines": [r["line"] for r in group], "labels": labels})
    return out


def inspect_labelled(
    path: str | Path,
    *,
    task: str = "auto",
    text_cols: list[str] | None = None,
    label_col: str | None = None,
    template: str | None = None,
) -> dict:
    """The report ``tunesmith prepare`` prints for labelled data: the task (classification or
    regression) and why, the label distribution, and checks naming the lines at fault: classes
    with fewer than 5 examples, numeric labels stored as strings, empty and NaN targets, empty
    texts, duplicated texts with conflicting labels. Unlike ``read_labelled`` it does not stop at
    the first bad row: every row is looked at, and a check ``train`` would refuse is an error."""
    path = Path(path)
    if task not in (*TASKS, "auto"):
        raise TunesmithError("must be classify, regress or auto", field="task")
    columns, records = read_table(path)
    if not records:
        raise TunesmithError("the file has a header but no rows", file=path)
    # Column choice and its errors are those of read_labelled: one row is enough to decide them.
    probe = _probe(path, columns, text_cols, label_col, template)
    label_col, text_cols, template, inferred = probe
    raw = [(line, record.get(label_col)) for line, record in records]
    if task == "auto":
        task, why = infer_task([value for _, value in raw])
        inferred = [*inferred, f"task '{task}': {why}"]
    else:
        why = "given"
    checks: list[dict] = []
    rows: list[dict] = []
    empty_text: list[int] = []
    for line, record in records:
        values = {c: "" if record.get(c) is None else str(record.get(c)).strip() for c in text_cols}
        if not all(values.values()):
            empty_text.append(line)
            continue
        rows.append({"text": template.format(**values) if template else values[text_cols[0]], "line": line,
                     "raw": record.get(label_col)})
    if empty_text:
        checks.append(_check("empty text", "error", f"{counted(len(empty_text), 'row')} with an empty text "
                             f"({_lines(empty_text)}); train stops at the first", empty_text))
    else:
        checks.append(_check("empty text", "ok", "every row has its text"))

    report = {"source": str(path.resolve()), "format": "labelled", "task": task, "task_reason": why,
              "rows": len(records), "columns": columns, "text_cols": list(text_cols), "label_col": label_col,
              "template": template, "inferred": inferred, "checks": checks}
    good = _labels_report(path, task, rows, report, checks)
    _string_numbers(path, raw, checks)
    conflicts = conflicting_duplicates(good)
    if conflicts:
        lines = sorted(n for c in conflicts for n in c["lines"])
        shown = "; ".join(f"lines {', '.join(map(str, c['lines']))}: {' vs '.join(map(repr, c['labels']))}"
                          for c in conflicts[:SHOWN_LINES])
        more = f"; and {len(conflicts) - SHOWN_LINES:,} more" if len(conflicts) > SHOWN_LINES else ""
        checks.append(_check(
            "conflicting duplicates", "warning",
            f"{counted(len(conflicts), 'text')} {'occurs' if len(conflicts) == 1 else 'occur'} more than once "
            f"with different labels ({shown}{more}); "
            "correct or remove them: the model cannot learn both", lines))
    else:
        checks.append(_check("conflicting duplicates", "ok", "no text occurs twice with different labels"))
    report["conflicting_duplicates"] = conflicts
    flags = ["--task", task]
    if not any("label column" in note for note in inferred):
        flags += ["--label-col", label_col]
    if not any("text column" in note for note in inferred):
        for col in text_cols:
            flags += ["--text-col", col]
    report["next"] = "tunesmith train " + " ".join(_quote(x) for x in [str(path), *flags])
    return report


def _quote(word: str) -> str:
    import shlex

    return shlex.quote(word)


def _probe(path: Path, columns: list[str], text_cols, label_col, template):
    """The label column, text columns and template ``read_labelled`` would use, with its errors."""
    inferred = []
    if label_col is None:
        label_col = _pick(columns, LABEL_NAMES)
        if label_col is None:
            raise TunesmithError(f"no label column found; the columns are: {', '.join(columns)}", file=path,
                                 field="label", hint="name it with --label-col")
        inferred.append(f"label column '{label_col}' (inferred from its name)")
    elif label_col not in columns:
        raise TunesmithError(f"no such column; the columns are: {', '.join(columns)}", file=path, field=label_col)
    if not text_cols:
        found = _pick([c for c in columns if c != label_col], TEXT_NAMES)
        if found is None:
            raise TunesmithError(f"no text column found; the columns are: {', '.join(columns)}", file=path,
                                 field="text", hint="name it with --text-col (repeat it to join several columns)")
        text_cols = [found]
        inferred.append(f"text column '{found}' (inferred from its name)")
    for col in text_cols:
        if col not in columns:
            raise TunesmithError(f"no such column; the columns are: {', '.join(columns)}", file=path, field=col)
    template = template or default_template(list(text_cols))
    if template:
        try:
            template.format(**{c: "" for c in text_cols})
        except (KeyError, IndexError, ValueError) as exc:
            raise TunesmithError(f"the template names a column it was not given ({exc})", field="template",
                                 hint="use {column} for each --text-col") from None
    return label_col, list(text_cols), template, inferred


def _labels_report(path: Path, task: str, rows: list[dict], report: dict, checks: list[dict]) -> list[dict]:
    """The label distribution and the label checks; returns the rows with a usable label."""
    good, bad = [], []
    for row in rows:
        value = row["raw"]
        if task == "regress":
            number = _as_number(value) if value is not None and str(value).strip() else None
            if number is None or not math.isfinite(number):
                bad.append((row["line"], value))
                continue
            good.append({"text": row["text"], "label": number, "line": row["line"]})
        else:
            if value is None or not str(value).strip():
                bad.append((row["line"], value))
                continue
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            good.append({"text": row["text"], "label": str(value).strip(), "line": row["line"]})
    if bad:
        lines = [line for line, _ in bad]
        if task == "regress":
            kinds = Counter("empty" if v is None or not str(v).strip() else
                            "NaN" if str(v).strip().lower() in ("nan", "-nan", "+nan") else
                            "infinite" if _as_number(v) is not None else "not a number" for _, v in bad)
            what = ", ".join(f"{n:,} {kind}" for kind, n in kinds.most_common())
            checks.append(_check("targets", "error", f"{counted(len(bad), 'target')} a regression cannot use "
                                 f"({what}: {_lines(lines)}); train stops at the first", lines))
        else:
            checks.append(_check("labels", "error", f"{counted(len(bad), 'empty label')} ({_lines(lines)})", lines))
    if task == "regress":
        y = np.array([r["label"] for r in good], dtype=float)
        if len(y):
            report["target"] = {"count": int(len(y)), "mean": float(y.mean()), "std": float(y.std()),
                                "min": float(y.min()), "median": float(np.median(y)), "max": float(y.max())}
            checks.append(_check("distribution", "ok" if y.std() > 0 else "error",
                                 f"target: mean {y.mean():.3g}, std {y.std():.3g}, min {y.min():.3g}, "
                                 f"median {np.median(y):.3g}, max {y.max():.3g}"
                                 + ("" if y.std() > 0 else "; every target is the same: nothing to learn")))
        return good
    counts = Counter(r["label"] for r in good)
    ordered = sort_labels(counts)
    report["label_counts"] = {label: counts[label] for label in ordered}
    total = sum(counts.values()) or 1
    checks.append(_check("distribution", "ok" if len(counts) >= 2 else "error",
                         ", ".join(f"{label}: {counts[label]:,} ({100 * counts[label] / total:.1f}%)" for label in ordered)
                         + ("" if len(counts) >= 2 else "; a single class: a classifier needs at least two")))
    if len(counts) >= 2:
        ratio = max(counts.values()) / min(counts.values())
        report["imbalance"] = ratio
        if ratio >= 1.5:
            checks.append(_check("balance", "warning", f"the classes are imbalanced ({ratio:.1f}:1); training "
                                 "weights the loss by class rarity, and macro-F1 is the figure to watch"))
    small = [label for label in ordered if counts[label] < MIN_CLASS_EXAMPLES]
    report["small_classes"] = small
    if small:
        lines = sorted(r["line"] for r in good if r["label"] in small)
        checks.append(_check(
            "small classes", "warning",
            f"{counted(len(small), 'class', 'classes')} with fewer than {MIN_CLASS_EXAMPLES} examples: "
            + ", ".join(f"{label} ({counts[label]})" for label in small)
            + f" ({_lines(lines)}); add examples or merge them: a class seen a few times is not learned", lines))
    else:
        checks.append(_check("small classes", "ok", f"every class has at least {MIN_CLASS_EXAMPLES} examples"))
    return good


def _string_numbers(path: Path, raw: list[tuple[int, object]], checks: list[dict]) -> None:
    """Numbers written as strings in JSONL ("3" for 3), and one number written several ways ("1", "1.0")."""
    jsonl = Path(path).suffix.lower() in (".jsonl", ".ndjson")
    quoted = [line for line, v in raw if jsonl and isinstance(v, str) and _finite(v)]
    spellings: dict[float, set[str]] = {}
    for _, v in raw:
        number = _as_number(v) if v is not None and str(v).strip() else None
        if number is not None and math.isfinite(number):
            spellings.setdefault(number, set()).add(str(v).strip())
    several = {n: sorted(s) for n, s in spellings.items() if len(s) > 1}
    if quoted:
        checks.append(_check("numeric labels", "warning",
                             f"{counted(len(quoted), 'label')} {'is a number' if len(quoted) == 1 else 'are numbers'} "
                             f"stored as a string ({_lines(quoted)}); write them as JSON numbers", quoted))
    if several:
        shown = "; ".join(" = ".join(repr(s) for s in spelled) for spelled in list(several.values())[:SHOWN_LINES])
        lines = [line for line, v in raw if v is not None and _as_number(v) in several]
        checks.append(_check("numeric labels", "warning",
                             f"the same number is written in different ways ({shown}; {_lines(lines)}); as "
                             "classes they would count as different labels", lines))
    if not quoted and not several:
        checks.append(_check("numeric labels", "ok", "no numbers stored as strings or written two ways"))


def format_labelled_report(report: dict) -> str:
    """The report as the CLI prints it (plain text)."""
    task = {"classify": "classification", "regress": "regression"}[report["task"]]
    cols = ", ".join(report["text_cols"])
    lines = [f"Labelled data {Path(report['source']).name}: {counted(report['rows'], 'row')}, "
             f"text from {cols}, labels from {report['label_col']}",
             f"  task      {task} ({report['task_reason']})"]
    for note in report["inferred"]:
        if not note.startswith("task "):
            lines.append(f"  using     {note}")
    if report.get("label_counts"):
        lines.append("  labels    " + ", ".join(f"{k} {v:,}" for k, v in report["label_counts"].items()))
    lines.append("Checks:")
    for check in report["checks"]:
        lines.append(f"  {check['status']:<8} {check['name']}: {check['message']}")
    if any(c["status"] == "error" for c in report["checks"]):
        lines.append("Fix the errors above, then: " + report["next"])
    else:
        lines.append("Nothing is written for labelled data; train on the file itself:")
        lines.append("  " + report["next"])
    return "\n".join(lines)
