"""The run directory: the unit that train writes and everything downstream reads.

Layout (see docs/ARCHITECTURE.md):

    config.json       everything needed to reproduce the run ("tunesmith_run": 1 marks it)
    status.json       {"status": running|succeeded|cancelled|interrupted|failed, "step", "error", "updated"}
    metrics.jsonl     one row per logged step: step, epoch, elapsed_tokens, training_loss,
                      training_token_accuracy, validation_loss, validation_token_accuracy, ...
    data/             train.jsonl, valid.jsonl, report.json: the prepared data the run saw
    tokenizer/        the tokenizer (with chat template)
    adapter/          LoRA weights (method lora)   | model/  full weights (method full)
    checkpoints/step-NNNNNN/  the same weights + trainer_state.pt (optimizer, scheduler,
                      RNG states, data position) for exact resume; the newest K are kept
    best/             the weights with the lowest validation loss so far + best.json (step, loss)
    train.lock        held (flock) by the process training the run
    loss.png, samples.md, README.md
"""

from __future__ import annotations

import fcntl
import json
import time
from contextlib import contextmanager
from pathlib import Path

from .atomic import write_json
from .errors import TunesmithError
from .wording import counted

RUN_FORMAT = 1


def is_run_dir(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return "tunesmith_run" in json.loads(config.read_text())
    except (OSError, json.JSONDecodeError):
        return False


def check_out_dir(path: str | Path, overwrite: bool, option: str = "--out") -> None:
    """Refuse to write a run to ``path`` unless it is new, an empty folder, or (with ``overwrite``)
    an earlier tunesmith run. The message says what is there instead."""
    path = Path(path)
    if path.is_symlink():
        raise TunesmithError(
            f"this is a symbolic link (to {path.readlink()}); tunesmith writes a run only into a new or empty "
            "folder, or replaces a run it made", file=path, hint=f"choose another {option}",
        )
    if not path.exists():
        above = next((p for p in path.absolute().parents if p.exists()), None)
        if above is not None and not above.is_dir():
            raise TunesmithError(
                f"{above} is a file, so no folder can be made inside it", file=path, hint=f"choose another {option}"
            )
        return
    if not path.is_dir():
        what = "a file" if path.is_file() else "something that is not a folder"
        raise TunesmithError(
            f"{what} is already there; a run is written into a new or empty folder",
            file=path, hint=f"choose another {option}",
        )
    entries = list(path.iterdir())
    if not entries:
        return
    if is_run_dir(path):
        if overwrite:
            return
        status = Run(path).status
        raise TunesmithError(
            f"a tunesmith run already exists here (status: {status})", file=path,
            hint=f"choose another {option}, or pass --overwrite to replace that run",
        )
    if (path / "report.json").is_file() and (path / "train.jsonl").is_file():
        what = "this folder already exists and holds prepared data (from `tunesmith prepare`), not a training run"
    else:
        held = counted(len(entries), "file or folder", "files or folders")
        what = f"this folder already exists and holds {held} that tunesmith did not make (no run config.json)"
    raise TunesmithError(
        f"{what}; tunesmith never writes into or replaces such a folder"
        + (", even with --overwrite" if overwrite else ""),
        file=path, hint=f"choose a new or empty folder for {option}",
    )


class Run:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not is_run_dir(self.path):
            raise TunesmithError("not a tunesmith run directory (no run config.json)", file=self.path)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, status={self.status!r})"

    @property
    def name(self) -> str:
        return self.config.get("name") or self.path.name

    @property
    def config(self) -> dict:
        return json.loads((self.path / "config.json").read_text())

    @property
    def state(self) -> dict:
        try:
            return json.loads((self.path / "status.json").read_text())
        except (OSError, json.JSONDecodeError):
            return {"status": "unknown"}

    @property
    def status(self) -> str:
        return self.state.get("status", "unknown")

    def set_status(self, status: str, **extra) -> None:
        write_json(self.path / "status.json", {"status": status, "updated": time.time(), **extra})

    def metrics(self) -> list[dict]:
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return []
        rows = []
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a kill -9 mid-write
        return rows

    def checkpoints(self) -> list[dict]:
        root = self.path / "checkpoints"
        found = []
        for ckpt in root.glob("step-*") if root.exists() else []:
            if (ckpt / "trainer_state.pt").exists() and ckpt.name[5:].isdigit():
                found.append({"step": int(ckpt.name[5:]), "path": str(ckpt)})
        return sorted(found, key=lambda c: c["step"])

    @property
    def best(self) -> dict | None:
        """``{"step", "validation_loss"}`` of the weights in best/, or None before the first validation."""
        try:
            return json.loads((self.path / "best" / "best.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None

    @contextmanager
    def training_lock(self):
        """Hold the run's train.lock while training it; refuse when another process holds it.
        The kernel releases the lock when that process dies, even on SIGKILL."""
        handle = open(self.path / "train.lock", "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise TunesmithError("another process is training this run", file=self.path) from None
        try:
            yield
        finally:
            handle.close()

    @property
    def weights_dir(self) -> Path:
        return self.path / ("adapter" if self.config.get("method", "lora") == "lora" else "model")

    def has_weights(self) -> bool:
        return (self.weights_dir / "adapter_config.json").exists() or (self.weights_dir / "config.json").exists()

    def _no_weights_error(self) -> TunesmithError:
        """Say what the run has instead of its current weights, and how to use a checkpoint."""
        import shlex

        name = self.weights_dir.name
        saved = [c for c in self.checkpoints() if (Path(c["path"]) / name).is_dir()]
        if not saved:
            when = "it is still training, or" if self.status == "running" else "it"
            when += " stopped before its first checkpoint"
            return TunesmithError(f"this run has no weights yet ({when}; no {name}/ and no checkpoints)", file=self.path)
        steps = ", ".join(str(c["step"]) for c in saved)
        latest = Path(saved[-1]["path"]) / name
        return TunesmithError(
            f"this run has no {name}/ (its current weights), but its checkpoints hold weights from "
            f"{'step' if len(saved) == 1 else 'steps'} {steps}",
            file=self.path,
            hint=f"to use the latest: cp -r {shlex.quote(str(latest))} {shlex.quote(str(self.weights_dir))}",
        )

    def load_model(self, dtype=None, merge: bool = True):
        """Return ``(model, tokenizer)``: base + adapter merged (or the full weights), ready to use."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .models import load_base

        if not self.has_weights():
            raise self._no_weights_error()
        if self.config.get("task") in ("classify", "regress"):
            raise TunesmithError("this run is a classifier/regressor, not a language model", file=self.path,
                                 hint=f"use: tunesmith predict {self.path} \"some text\"")
        dtype = dtype or torch.float32
        tok = AutoTokenizer.from_pretrained(str(self.path / "tokenizer"))
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        if self.config.get("method", "lora") == "full":
            return AutoModelForCausalLM.from_pretrained(str(self.weights_dir), dtype=dtype), tok
        from peft import PeftModel

        # Merge in fp32, then cast: merging into bf16 weights would round the small LoRA update away.
        base, _ = load_base(self.config["base"], dtype=torch.float32)
        model = PeftModel.from_pretrained(base, str(self.weights_dir))
        if merge:
            model = model.merge_and_unload()
        return model.to(dtype), tok

