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
                      RNG states, data position) for exact resume
    loss.png, samples.md, README.md
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .atomic import write_json
from .errors import TunesmithError

RUN_FORMAT = 1


def is_run_dir(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return "tunesmith_run" in json.loads(config.read_text())
    except (OSError, json.JSONDecodeError):
        return False


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
        for ckpt in sorted(root.glob("step-*")) if root.exists() else []:
            if (ckpt / "trainer_state.pt").exists():
                found.append({"step": int(ckpt.name.split("-")[1]), "path": str(ckpt)})
        return found

    @property
    def weights_dir(self) -> Path:
        return self.path / ("adapter" if self.config.get("method", "lora") == "lora" else "model")

    def has_weights(self) -> bool:
        return (self.weights_dir / "adapter_config.json").exists() or (self.weights_dir / "config.json").exists()

    def load_model(self, dtype=None, merge: bool = True):
        """Return ``(model, tokenizer)``: base + adapter merged (or the full weights), ready to use."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .models import load_base

        if not self.has_weights():
            raise TunesmithError(
                "this run has no weights yet (it stopped before its first checkpoint)", file=self.path
            )
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


def list_runs(root: str | Path) -> list[Run]:
    root = Path(root)
    if not root.is_dir():
        return []
    return [Run(p) for p in sorted(root.iterdir()) if p.is_dir() and is_run_dir(p)]
