"""What tunesmith has on disk: base models, runs and exports, with their size and what each can be
used for (``tunesmith models list|show|rm``).

Base models are those of ``models.list_models`` (bundled, and the copies cached in
``$TUNESMITH_HOME/models``). Runs are run directories in a runs folder (and one level below it,
as ``runs/two-stage/stage1-lm``) and the server's fine-tuning jobs' runs in
``$TUNESMITH_HOME/runs``. Exports are directories and ``.gguf`` files that ``tunesmith export``
wrote (its marker), in an exports folder and the runs folder.

Removal never reaches outside ``$TUNESMITH_HOME`` and the folders it was pointed at: the path is
resolved (symbolic links followed, ``..`` folded) and must lie strictly inside one of them; a run
that a process is training is refused. The item is renamed away first, then deleted, so a half
deleted run never looks like a run.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .errors import TunesmithError
from .home import home, models_dir

KINDS = ("base", "run", "export")
RUNS = Path("runs")
EXPORTS = Path("exports")
# What a run's hyperparameters are in config.json (the TrainConfig fields that shape the result).
HYPERPARAMETERS = ("method", "epochs", "learning_rate", "batch_size", "block_size", "lora_r", "lora_alpha",
                   "lora_dropout", "weight_decay", "warmup_fraction", "max_steps", "seed", "dtype", "chat_loss",
                   "task", "labels")


@dataclass
class Item:
    """One thing on disk: its kind (base, run or export), name, path, size in bytes, what it can be
    used for (the tunesmith commands and other tools that take it) and a one-line state."""

    kind: str
    name: str
    path: Path
    size: int
    uses: list[str] = field(default_factory=list)
    state: str = ""


def disk_size(path: Path) -> int:
    """Bytes of the files under ``path`` (a file: its own size); links are not followed."""
    try:
        if not path.is_dir():
            return path.lstat().st_size
    except OSError:
        return 0
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass  # removed while we looked
    return total


# --- listing ---------------------------------------------------------------------------------------


def base_items() -> list[Item]:
    from .models import list_models

    items = []
    for row in list_models():
        cached = models_dir() / row["name"]
        path = cached if (cached / "config.json").is_file() else Path(row["source"].removeprefix("missing: "))
        ready = row["available"] or row["cached"]
        uses = ["train --base", "generate", "serve", "export"] if ready else []
        state = ("cached" if row["cached"] else "not converted yet") if ready else row["source"]
        items.append(Item("base", row["name"], path, disk_size(cached) if cached.is_dir() else 0, uses,
                          f"{state}; {row['description']}"))
    return items


def _candidates(folder: Path) -> list[Path]:
    """Entries of ``folder`` and of its sub-folders, sorted; nothing when it does not exist."""
    if not folder.is_dir():
        return []
    found = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue  # temporary names of atomic writes
        found.append(entry)
        if entry.is_dir() and not entry.is_symlink():
            found += [e for e in sorted(entry.iterdir()) if not e.name.startswith(".")]
    return found


def run_item(path: Path) -> Item:
    from .export import training_now
    from .rundir import Run

    run = Run(path)
    config = run.config
    if training_now(run):
        return Item("run", _rel_name(path), path, disk_size(path), [], "training now")
    if not run.has_weights():
        return Item("run", _rel_name(path), path, disk_size(path), ["train --resume"], f"{run.status}, no weights yet")
    if config.get("task"):
        uses = ["predict", "serve (/v1/classifications)"]
    else:
        uses = ["generate", "serve", "eval", "export", "copies", "train --base"]
    if run.status in ("interrupted", "cancelled", "failed") or (run.status == "running"):
        uses.append("train --resume")
    state = f"{run.status}, {config.get('task') or 'language model'} on {config.get('base', '?')}"
    best = run.best
    if best and best.get("validation_loss") is not None:
        state += f", best validation loss {best['validation_loss']:.3f}"
    return Item("run", _rel_name(path), path, disk_size(path), uses, state)


def export_marker(path: Path) -> dict | None:
    """The record ``tunesmith export`` left in ``path`` (a directory or a .gguf file), or None."""
    from .export import MARKER
    from .gguf_export import exported_marker

    if path.is_dir():
        try:
            marker = json.loads((path / MARKER).read_text())
        except (OSError, ValueError):
            return None
        return marker if isinstance(marker, dict) else None
    if path.suffix == ".gguf" and path.is_file():
        return exported_marker(path)
    return None


def export_item(path: Path, marker: dict) -> Item:
    if marker.get("format") == "gguf":
        uses = ["llama.cpp", "LM Studio", "train --base", "generate", "serve"]
        if _modelfile_of(path):
            uses.insert(1, "Ollama")
    else:
        uses = ["transformers", "train --base", "generate", "serve", "export"]
    state = f"{marker.get('format')} {marker.get('quant')} of {Path(str(marker.get('source', '?'))).name}"
    return Item("export", _rel_name(path), path, disk_size(path), uses, state)


def _modelfile_of(gguf: Path) -> Path | None:
    """The Ollama Modelfile ``export --ollama`` wrote beside ``gguf``, if it is for this file."""
    modelfile = gguf.with_name("Modelfile")
    try:
        text = modelfile.read_text(errors="replace")
    except OSError:
        return None
    return modelfile if text.startswith("# tunesmith export") and f"FROM ./{gguf.name}\n" in text else None


def _rel_name(path: Path) -> str:
    """How an item is named: its path as given (relative to the working directory when inside it)."""
    try:
        return str(path.absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def run_and_export_items(runs: Path = RUNS, exports: Path = EXPORTS) -> list[Item]:
    from .rundir import is_run_dir

    items, seen = [], set()
    for folder in dict.fromkeys([Path(runs), Path(exports), home() / "runs"]):
        for path in _candidates(folder):
            key = path.absolute()
            if key in seen:
                continue
            seen.add(key)
            if path.is_dir() and is_run_dir(path):
                items.append(run_item(path))
                continue
            marker = export_marker(path)
            if marker is not None:
                items.append(export_item(path, marker))
    return items


def list_items(runs: Path = RUNS, exports: Path = EXPORTS) -> list[Item]:
    """Base models, then runs and exports (in ``runs`` and ``exports``, and one level below)."""
    return base_items() + run_and_export_items(runs, exports)


# --- one item --------------------------------------------------------------------------------------


def find(name: str, runs: Path = RUNS, exports: Path = EXPORTS) -> Item:
    """The item called ``name`` (as ``list_items`` names it, or a folder name under runs/exports),
    or at the path ``name``."""
    items = list_items(runs, exports)
    matches = [i for i in items if name in (i.name, i.path.name) or (i.kind == "base" and i.path.name == name)]
    if not matches:
        path = Path(name).expanduser()
        if path.exists() or path.is_symlink():
            key = path.absolute()
            matches = [i for i in items if i.path.absolute() == key] or _item_at(path)
    if len(matches) > 1:
        kinds = ", ".join(f"{i.kind} {i.path}" for i in matches)
        raise TunesmithError(f"'{name}' names more than one thing: {kinds}", hint="give its path instead")
    if not matches:
        raise TunesmithError(
            f"no base model, run or export called '{name}'",
            hint=f"see `tunesmith models list` (runs are looked for in {runs}/, exports in {exports}/ and {runs}/; "
            "--runs and --exports point elsewhere)",
        )
    return matches[0]


def _item_at(path: Path) -> list[Item]:
    from .rundir import is_run_dir

    if path.is_dir() and is_run_dir(path):
        return [run_item(path)]
    marker = export_marker(path)
    if marker is not None:
        return [export_item(path, marker)]
    if path.is_dir() and (path / "config.json").is_file() and _inside(path, [models_dir()]):
        return [Item("base", path.name, path, disk_size(path), ["train --base", "generate", "serve", "export"])]
    return []


def show(name: str, runs: Path = RUNS, exports: Path = EXPORTS) -> dict:
    """Everything worth knowing about one item: for a run its base, corpus, hyperparameters,
    metrics and files; for an export its source and format; for a base its source."""
    item = find(name, runs, exports)
    info: dict = {"kind": item.kind, "name": item.name, "path": str(item.path), "size": item.size,
                  "uses": item.uses, "state": item.state}
    if item.kind == "run":
        info.update(_run_details(item.path))
    elif item.kind == "export":
        info["export"] = export_marker(item.path) or {}
        modelfile = _modelfile_of(item.path) if item.path.is_file() else None
        if modelfile:
            info["modelfile"] = str(modelfile)
    else:
        try:
            info["source"] = json.loads((item.path / "tunesmith-source.json").read_text()).get("source")
        except (OSError, ValueError):
            info["source"] = str(item.path)
    info["files"] = _files(item.path)
    return info


def _run_details(path: Path) -> dict:
    from .rundir import Run

    run = Run(path)
    config = run.config
    data = config.get("data") or {}
    report = data.get("report") or {}
    details = {
        "base": config.get("base"),
        "corpus": {
            "source": data.get("source") or report.get("source"),
            "format": report.get("format"),
            "examples": report.get("examples"),
            "tokens": report.get("tokens"),
        },
        "hyperparameters": {k: config[k] for k in HYPERPARAMETERS if config.get(k) is not None
                            and (k != "chat_loss" or report.get("format") == "chat")},
        "status": run.state,
    }
    metrics: dict = {}
    for file in ("summary.json", "eval.json"):
        try:
            metrics[file.removesuffix(".json")] = json.loads((path / file).read_text())
        except (OSError, ValueError):
            pass
    validations = [row for row in run.metrics() if "validation_loss" in row]
    if validations:
        metrics["last_validation"] = validations[-1]
    if run.best:
        metrics["best"] = run.best
    details["metrics"] = metrics
    return details


def _files(path: Path) -> list[dict]:
    """The entries directly in ``path`` (or the file itself) with their sizes."""
    if not path.is_dir():
        return [{"name": path.name, "size": disk_size(path)}]
    return [{"name": entry.name + ("/" if entry.is_dir() else ""), "size": disk_size(entry)}
            for entry in sorted(path.iterdir()) if not entry.name.startswith(".")]


# --- removal ---------------------------------------------------------------------------------------


def _inside(path: Path, roots: list[Path]) -> bool:
    """Whether ``path``, resolved, lies strictly inside one of ``roots`` (resolved too)."""
    target = path.resolve()
    for root in roots:
        root = root.resolve()
        if target != root and target.is_relative_to(root):
            return True
    return False


def remove(item: Item | str, runs: Path = RUNS, exports: Path = EXPORTS) -> Item:
    """Delete a base model's cached copy, a run or an export (with its Ollama Modelfile).

    Refused when the item's real path (links followed) is not strictly inside ``$TUNESMITH_HOME``,
    ``runs`` or ``exports``, or when a process is training the run."""
    from .export import training_now
    from .rundir import Run, is_run_dir

    item = item if isinstance(item, Item) else find(item, runs, exports)
    path = item.path
    roots = [home(), Path(runs), Path(exports)]
    if not (path.exists() or path.is_symlink()):
        raise TunesmithError("nothing to remove: it is not on disk", file=path)
    if not _inside(path, roots):
        raise TunesmithError(
            f"this path resolves to {path.resolve()}, outside $TUNESMITH_HOME ({home()}), the runs folder ({runs}) "
            f"and the exports folder ({exports}); tunesmith removes nothing there",
            file=path, hint="remove it yourself, or point --runs/--exports at the folder that holds it",
        )
    if item.kind == "run" and is_run_dir(path) and training_now(Run(path)):
        raise TunesmithError("a process is training this run; stop it first", file=path)
    modelfile = _modelfile_of(path) if item.kind == "export" and path.is_file() else None
    real = path.resolve()
    gone = real.with_name(f".{real.name}.removing-{os.getpid()}")
    try:
        os.replace(real, gone)  # one rename: the item is whole or gone, never half a run
        if gone.is_dir():
            shutil.rmtree(gone)
        else:
            gone.unlink()
        if path.is_symlink():
            path.unlink()
        if modelfile is not None and _inside(modelfile, roots):
            modelfile.unlink()
    except OSError as exc:
        raise TunesmithError(f"cannot remove it: {exc.strerror or exc}", file=path) from None
    return item
