"""Classifiers and regressors on labelled text: the second fine-tune.

The base (a base model, or a language-model run whose LoRA is merged first) gets a
sequence-classification head (``AutoModelForSequenceClassification``: the last token's hidden
state times a linear ``score`` layer). With LoRA (the default) the base is frozen, a new adapter
is trained and the head is trained fully (peft ``modules_to_save``); ``method="full"`` trains
everything. Classification uses class-weighted cross-entropy; regression trains on standardised
targets and reports in the original units.

The run directory is the one ``train`` writes (config.json with ``"task"``, status.json,
metrics.jsonl, adapter/ or model/, tokenizer/, data/), plus confusion.png or scatter.png.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from .atomic import append_jsonl, atomic_dir, atomic_path, write_json, write_jsonl, write_text
from .config import TrainConfig, check_fields, spec
from .errors import TunesmithError
from .labelled import Labelled, read_labelled, split
from .models import DEFAULT_BASE
from .rundir import RUN_FORMAT, Run, check_out_dir, is_run_dir
from .scores import classification_metrics, plot_confusion, plot_scatter, regression_metrics
from .version import library_versions

BLOCK_SIZE = spec(TrainConfig, "block_size")["default"]  # one setting for LM and classifier runs
PREDICT_BATCH_TOKENS = 4096  # tokens per inference batch (texts sorted by length, padded per batch)


@dataclass
class ClassifyConfig:
    """Everything that decides what a classifier/regressor run computes; saved in config.json."""

    task: str = "classify"  # classify | regress
    base: str = DEFAULT_BASE  # a base name/path, or a language-model run dir (merged first)
    method: str = "lora"  # lora | full
    epochs: int = 3
    lr: float | None = None  # None: 1e-3 for LoRA, 5e-5 for full
    batch_size: int = 16
    block_size: int = BLOCK_SIZE  # tokens of a text (longer ones are truncated); TrainConfig.block_size
    lora_r: int = 16
    lora_alpha: int = 32
    weight_decay: float = 0.0
    warmup_fraction: float = 0.06
    max_steps: int | None = None
    seed: int = 0
    valid_fraction: float = 0.1
    class_weights: bool = True
    dtype: str = "auto"
    device: str = "auto"

    def check(self) -> None:
        if self.task not in ("classify", "regress"):
            raise TunesmithError("must be classify or regress", field="task")
        if self.method not in ("lora", "full"):
            raise TunesmithError("must be 'lora' or 'full'", field="method")
        for name in ("epochs", "batch_size", "lora_r"):
            if getattr(self, name) < 1:
                raise TunesmithError("must be at least 1", field=name)
        check_fields(TrainConfig(block_size=self.block_size), ["block_size"])  # its bounds, written once
        if self.lr is not None and not 0 < self.lr < 1:
            raise TunesmithError("must be between 0 and 1", field="lr")
        if not 0 < self.valid_fraction <= 0.5:
            raise TunesmithError("must be above 0 and at most 0.5", field="valid_fraction")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (1e-3 if self.method == "lora" else 5e-5)


# ----------------------------------------------------------------------------------------
# The model


def _causal_base(base: str, dtype):
    """``(causal LM, tokenizer, description)`` for a base name/path or a language-model run dir."""
    from .models import load_base

    if is_run_dir(base):
        run = Run(base)
        if run.config.get("task") in ("classify", "regress"):
            raise TunesmithError("this run is a classifier/regressor; a base must be a language model or an LM run",
                                 file=base, field="base")
        model, tok = run.load_model(dtype=dtype)  # stage 1: its LoRA merged into its base
        return model, tok
    return load_base(base, dtype=dtype)


def _with_head(causal, tok, num_labels: int, task: str):
    """Move a causal LM's backbone under a freshly initialised sequence-classification head."""
    import torch
    from transformers import AutoModelForSequenceClassification

    config = causal.config
    config.num_labels = num_labels
    config.problem_type = "regression" if task == "regress" else "single_label_classification"
    config.pad_token_id = tok.pad_token_id  # the head pools the last token that is not padding
    config.use_cache = False
    torch.manual_seed(0)
    seq = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    prefix = seq.base_model_prefix
    getattr(seq, prefix).load_state_dict(getattr(causal, prefix).state_dict())
    return seq


def build_classifier(cfg: ClassifyConfig, num_labels: int):
    """Return ``(model, tokenizer, device, compute dtype)`` ready to train."""
    import torch

    from .device import pick_device, pick_dtype, setup_threads

    setup_threads()
    device = pick_device(cfg.device)
    compute = pick_dtype(device, cfg.dtype)
    causal, tok = _causal_base(cfg.base, torch.float32)
    model = _with_head(causal, tok, num_labels, cfg.task)
    del causal
    if cfg.method == "lora":
        from peft import LoraConfig, get_peft_model

        getattr(model, model.base_model_prefix).to(compute)  # frozen backbone in the compute dtype
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules="all-linear",
                          task_type="SEQ_CLS", modules_to_save=["score"])
        model = get_peft_model(model, lora)
        for p in model.parameters():  # adapters and head train in fp32
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
    model.to(device).train()
    return model, tok, device, compute


def _encode(tok, texts: list[str], max_length: int) -> list[list[int]]:
    ids = tok(texts, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]
    return [row if row else [tok.eos_token_id] for row in ids]


def _batch(ids: list[list[int]], pad: int, device):
    import torch

    width = max(len(r) for r in ids)
    arr = np.full((len(ids), width), pad, dtype=np.int64)
    mask = np.zeros((len(ids), width), dtype=np.int64)
    for i, row in enumerate(ids):
        arr[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return torch.from_numpy(arr).to(device), torch.from_numpy(mask).to(device)


def _logits(model, ids, mask, compute):
    import torch

    with torch.autocast(ids.device.type, dtype=compute, enabled=compute != torch.float32):
        return model(input_ids=ids, attention_mask=mask).logits.float()


def _length_batches(lengths: list[int], max_tokens: int, max_rows: int = 256) -> list[list[int]]:
    """Indices grouped by similar length, each batch about ``max_tokens`` padded tokens."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches, current, width = [], [], 0
    for i in order:
        new_width = max(width, lengths[i])
        if current and (new_width * (len(current) + 1) > max_tokens or len(current) >= max_rows):
            batches.append(current)
            current, new_width = [], lengths[i]
        current.append(i)
        width = new_width
    if current:
        batches.append(current)
    return batches


def _raw_outputs(model, tok, ids: list[list[int]], device, compute, on_batch=None) -> np.ndarray:
    """Logits (classify) or standardised scores (regress) for encoded texts, in their order."""
    import torch

    pad = tok.pad_token_id
    out: np.ndarray | None = None
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for batch in _length_batches([len(r) for r in ids], PREDICT_BATCH_TOKENS):
            x, m = _batch([ids[i] for i in batch], pad, device)
            logits = _logits(model, x, m, compute).cpu().numpy()
            if out is None:
                out = np.zeros((len(ids), logits.shape[1]), dtype=np.float32)
            out[batch] = logits
            if on_batch:
                on_batch(len(batch))
    model.train(was_training)
    return out if out is not None else np.zeros((0, 1), dtype=np.float32)


# ----------------------------------------------------------------------------------------
# Training


def finetune_classifier(
    data: str | Path,
    *,
    out: str | Path | None = None,
    text_cols: list[str] | None = None,
    label_col: str | None = None,
    template: str | None = None,
    overwrite: bool = False,
    on_event: Callable[[dict], None] | None = None,
    progress: bool = True,
    **options,
) -> Run:
    """Train a classifier (``task="classify"``) or regressor (``task="regress"``) on labelled text.

    ``data`` is a CSV/TSV/JSONL file; ``text_cols`` (several are joined with ``template``) and
    ``label_col`` name its columns, inferred from common names when left out. ``options`` are
    ClassifyConfig fields (task, base, method, epochs, lr, batch_size, block_size, ...);
    ``task="auto"`` decides from the labels. Returns the run.
    """
    unknown = set(options) - set(ClassifyConfig.__dataclass_fields__)
    if unknown:
        raise TunesmithError(f"unknown option(s): {', '.join(sorted(unknown))}")
    task = options.pop("task", "auto")
    labelled = read_labelled(data, task=task, text_cols=text_cols, label_col=label_col, template=template)
    cfg = ClassifyConfig(task=labelled.task, **options)
    cfg.check()
    emit = on_event or (lambda event: None)
    for note in labelled.inferred:
        emit({"type": "info", "message": f"using {note}"})
    out = Path(out) if out else Path("runs") / f"{Path(data).stem}-{cfg.task}-{time.strftime('%Y%m%d-%H%M%S')}"
    check_out_dir(out, overwrite)  # only a new or empty folder, or an earlier run with --overwrite
    if not is_run_dir(cfg.base):
        from .models import resolve

        resolve(cfg.base)  # fail on an unknown base before anything is written
    train_rows, valid_rows = split(labelled, cfg.valid_fraction, cfg.seed)
    if not valid_rows:
        raise TunesmithError("too few rows to hold any out for validation", file=data)
    report = _report(labelled, train_rows, valid_rows)
    for line in report["notes"]:
        emit({"type": "info", "message": line})

    from .models import load_tokenizer

    tok = _run_tokenizer(cfg.base) if is_run_dir(cfg.base) else load_tokenizer(cfg.base)
    with atomic_dir(out, overwrite=True, replace_if=lambda p: check_out_dir(p, overwrite) is None) as tmp:
        (tmp / "data").mkdir()
        write_jsonl(tmp / "data" / "train.jsonl", train_rows)
        write_jsonl(tmp / "data" / "valid.jsonl", valid_rows)
        write_json(tmp / "data" / "report.json", report)
        tok.save_pretrained(tmp / "tokenizer")
        targets = np.array([r["label"] for r in train_rows], dtype=float) if cfg.task == "regress" else None
        config = {
            "tunesmith_run": RUN_FORMAT,
            "name": out.name,
            **asdict(cfg),
            "learning_rate": cfg.learning_rate,
            "base": str(Path(cfg.base).resolve()) if is_run_dir(cfg.base) else cfg.base,
            "base_is_run": is_run_dir(cfg.base),
            "labels": labelled.labels if cfg.task == "classify" else None,
            "target_mean": float(targets.mean()) if targets is not None else None,
            "target_std": float(targets.std() or 1.0) if targets is not None else None,
            "text_cols": labelled.text_cols,
            "label_col": labelled.label_col,
            "template": labelled.template,
            "data": {"source": str(Path(data).resolve()), "report": report},
            "versions": library_versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_json(tmp / "config.json", config)
        write_json(tmp / "status.json", {"status": "running", "step": 0, "updated": time.time()})
    run = Run(out)
    try:
        _train(run, cfg, config, train_rows, valid_rows, emit, progress)
    except KeyboardInterrupt:
        run.set_status("interrupted")
        raise
    except TunesmithError as err:
        run.set_status("failed", error=str(err))
        raise
    except Exception as err:
        run.set_status("failed", error=f"{type(err).__name__}: {err}")
        raise
    return run


def _run_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(Path(path) / "tokenizer"))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _report(data: Labelled, train: list[dict], valid: list[dict]) -> dict:
    report = {"format": "labelled", "task": data.task, "rows": len(data.rows), "train": len(train),
              "valid": len(valid), "text_cols": data.text_cols, "label_col": data.label_col,
              "template": data.template, "inferred": data.inferred, "notes": []}
    notes = report["notes"]
    notes.append(f"{len(data.rows)} rows: {len(train)} to train on, {len(valid)} held out for validation")
    if data.task == "classify":
        counts = {label: 0 for label in data.labels}
        for row in data.rows:
            counts[row["label"]] += 1
        report["label_counts"] = counts
        notes.append("labels: " + ", ".join(f"{k} ({v})" for k, v in counts.items()))
        ratio = max(counts.values()) / min(counts.values())
        report["imbalance"] = ratio
        if ratio >= 1.5:
            notes.append(f"classes are imbalanced ({ratio:.1f}:1); the loss weights each class by its rarity")
        small = [k for k, v in counts.items() if v < 5]
        if small:
            notes.append(f"classes with fewer than 5 examples: {', '.join(small)}")
    else:
        y = np.array([r["label"] for r in data.rows], dtype=float)
        report["target"] = {"mean": float(y.mean()), "std": float(y.std()), "min": float(y.min()), "max": float(y.max())}
        notes.append(f"target: mean {y.mean():.3g}, std {y.std():.3g}, range {y.min():.3g} to {y.max():.3g}")
    return report


def _train(run: Run, cfg: ClassifyConfig, config: dict, train_rows, valid_rows, emit, show_progress: bool) -> None:
    import torch
    from transformers import get_cosine_schedule_with_warmup

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    labels = config["labels"] or []
    n_out = len(labels) if cfg.task == "classify" else 1
    model, tok, device, compute = build_classifier(cfg, n_out)
    emit({"type": "info", "message": f"loaded {cfg.base} with a {n_out}-output head on {device} "
          f"({str(compute).replace('torch.', '')}) in {time.perf_counter() - t0:.1f}s"})

    train_ids = _encode(tok, [r["text"] for r in train_rows], cfg.block_size)
    valid_ids = _encode(tok, [r["text"] for r in valid_rows], cfg.block_size)
    if cfg.task == "classify":
        index = {label: i for i, label in enumerate(labels)}
        y_train = np.array([index[r["label"]] for r in train_rows])
        y_valid = np.array([index[r["label"]] for r in valid_rows])
        counts = np.bincount(y_train, minlength=n_out).astype(float)
        weights = len(y_train) / (n_out * np.maximum(counts, 1)) if cfg.class_weights else np.ones(n_out)
        loss_fn = torch.nn.CrossEntropyLoss(weight=torch.tensor(weights, dtype=torch.float32, device=device))
        majority = int(np.argmax(counts))
    else:
        mean, std = config["target_mean"], config["target_std"]
        y_train = (np.array([r["label"] for r in train_rows], dtype=float) - mean) / std
        y_valid = np.array([r["label"] for r in valid_rows], dtype=float)
        loss_fn = torch.nn.MSELoss()

    steps_per_epoch = math.ceil(len(train_ids) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError):
        opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, foreach=True)
    sched = get_cosine_schedule_with_warmup(opt, int(cfg.warmup_fraction * total), max(total, 1))
    emit({"type": "info", "message": f"{len(train_ids)} examples, {total} steps, "
          f"{sum(p.numel() for p in params):,} trainable parameters"})

    def log(row: dict) -> None:
        append_jsonl(run.path / "metrics.jsonl", row)

    def validate(step: int, epoch: float) -> dict:
        raw = _raw_outputs(model, tok, valid_ids, device, compute)
        if cfg.task == "classify":
            result = classification_metrics(y_valid, raw.argmax(1), n_out, majority)
            result["loss"] = float(torch.nn.functional.cross_entropy(torch.from_numpy(raw), torch.from_numpy(y_valid)))
        else:
            predicted = raw[:, 0] * config["target_std"] + config["target_mean"]
            result = regression_metrics(y_valid, predicted, config["target_mean"])
            result["predicted"] = predicted
        row = {"step": step, "epoch": epoch, **{f"validation_{k}": v for k, v in result.items() if k != "predicted"}}
        log(row)
        emit({"type": "validation", **row})
        bar.note(describe(row, epoch))
        return result

    bar = _Progress(total, enabled=show_progress)
    before = validate(0, 0.0)
    step, started, after = 0, time.perf_counter(), before
    pad = tok.pad_token_id
    for epoch in range(cfg.epochs):
        order = np.random.default_rng(cfg.seed + epoch).permutation(len(train_ids))
        for b in range(steps_per_epoch):
            if step >= total:
                break
            idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            x, m = _batch([train_ids[i] for i in idx], pad, device)
            logits = _logits(model, x, m, compute)
            if cfg.task == "classify":
                loss = loss_fn(logits, torch.from_numpy(y_train[idx]).to(device))
            else:
                loss = loss_fn(logits[:, 0], torch.from_numpy(y_train[idx]).float().to(device))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            seconds = time.perf_counter() - started
            row = {"step": step, "epoch": round(epoch + (b + 1) / steps_per_epoch, 4), "training_loss": loss.item(),
                   "learning_rate": sched.get_last_lr()[0], "examples_per_second": step * cfg.batch_size / seconds,
                   "elapsed_seconds": seconds}
            log(row)
            emit({"type": "metrics", "total_steps": total, **row})
            bar.update(step, row["training_loss"], row["examples_per_second"])
        after = validate(step, float(epoch + 1))
        if step >= total:
            break
    bar.close()
    seconds = time.perf_counter() - started
    _save_weights(run, model, cfg)
    if cfg.task == "classify":
        plot_confusion(after["confusion"], labels, run.path / "confusion.png", title=f"{run.name}: validation")
    else:
        plot_scatter(y_valid, after["predicted"], run.path / "scatter.png", title=f"{run.name}: validation")
    clean = lambda r: {k: v for k, v in r.items() if k != "predicted"}  # noqa: E731
    summary = {"status": "succeeded", "task": cfg.task, "seconds": seconds, "steps": step,
               "validation_before": clean(before), "validation_after": clean(after)}
    write_json(run.path / "summary.json", summary)
    write_text(run.path / "README.md", _readme(run, cfg, summary))
    run.set_status("succeeded", step=step)
    emit({"type": "done", "status": "succeeded", "path": str(run.path)})


def _save_weights(run: Run, model, cfg: ClassifyConfig) -> None:
    name = "adapter" if cfg.method == "lora" else "model"
    with atomic_dir(run.path / name, overwrite=True) as tmp:
        model.save_pretrained(tmp)


def describe(row: dict, epoch: float | None = None) -> str:
    """One line of validation metrics beside their baseline."""
    head = "base model" if row.get("step") == 0 else f"epoch {epoch:g}" if epoch is not None else f"step {row['step']}"
    if "validation_accuracy" in row:
        return (f"{head}: validation accuracy {row['validation_accuracy']:.3f} (majority class "
                f"{row['validation_baseline_accuracy']:.3f}), macro-F1 {row['validation_macro_f1']:.3f} "
                f"(majority {row['validation_baseline_macro_f1']:.3f})")
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    return (f"{head}: validation Pearson {fmt(row['validation_pearson'])}, Spearman {fmt(row['validation_spearman'])}, "
            f"MSE {row['validation_mse']:.3f} (mean predictor: MSE {row['validation_baseline_mse']:.3f}, Pearson 0)")


def _readme(run: Run, cfg: ClassifyConfig, summary: dict) -> str:
    after = summary["validation_after"]
    line = describe({"step": summary["steps"], **{f"validation_{k}": v for k, v in after.items()}})
    return "\n".join([
        f"# Run {run.name}",
        "",
        f"- task: **{cfg.task}**, base: `{cfg.base}`, method: {cfg.method}",
        f"- epochs: {cfg.epochs}, batch size: {cfg.batch_size}, learning rate: {cfg.learning_rate:g}, seed: {cfg.seed}",
        f"- {line}",
        "",
        "Predict with it:",
        "",
        "```",
        f'tunesmith predict {run.path} "some text"',
        f"tunesmith predict {run.path} --file texts.csv --out predictions.csv",
        "```",
        "",
    ])


class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if not enabled:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[eps]} examples/s"),
                            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
        self.bar.start()
        self.task = self.bar.add_task("train", total=total, loss="-", eps="-")

    def update(self, step: int, loss: float, eps: float) -> None:
        if self.bar:
            self.bar.update(self.task, completed=step, loss=f"{loss:.3f}", eps=f"{eps:.1f}")

    def note(self, text: str) -> None:
        if self.bar:
            self.bar.console.print(text, highlight=False)

    def close(self) -> None:
        if self.bar:
            self.bar.stop()
            self.bar = None


# ----------------------------------------------------------------------------------------
# Prediction


def is_classifier_run(path: str | Path) -> bool:
    if not is_run_dir(path):
        return False
    return Run(path).config.get("task") in ("classify", "regress")


class Classifier:
    """A trained classifier or regressor, ready to predict: ``Classifier.load(run).predict(texts)``."""

    def __init__(self, model, tokenizer, config: dict, device, compute, name: str):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.device, self.compute, self.name = device, compute, name
        self.task = config["task"]
        self.labels = config.get("labels") or []
        self.block_size = config.get("block_size") or config.get("max_length", 128)  # older runs: max_length

    @classmethod
    def load(cls, path: str | Path, *, device: str | None = None, dtype: str | None = "auto") -> Classifier:
        import torch

        from .device import pick_device, pick_dtype, setup_threads

        path = Path(path)
        if not is_classifier_run(path):
            raise TunesmithError("not a classifier or regressor run (its config.json has no task)", file=path,
                                 hint="train one with: tunesmith train DATA --task classify")
        run = Run(path)
        config = run.config
        if not run.has_weights():
            raise TunesmithError("this run has no weights yet (it did not finish)", file=path)
        setup_threads()
        dev = pick_device(device)
        compute = pick_dtype(dev, dtype)
        tok = _run_tokenizer(path)
        n_out = len(config["labels"]) if config["task"] == "classify" else 1
        if config.get("method", "lora") == "full":
            from transformers import AutoModelForSequenceClassification

            model = AutoModelForSequenceClassification.from_pretrained(str(run.weights_dir), dtype=torch.float32)
        else:
            from peft import PeftModel

            causal, base_tok = _causal_base(config["base"], torch.float32)
            model = _with_head(causal, base_tok, n_out, config["task"])
            del causal
            model = PeftModel.from_pretrained(model, str(run.weights_dir)).merge_and_unload()
        model.config.pad_token_id = tok.pad_token_id
        model.to(device=dev, dtype=compute).eval()
        return cls(model, tok, config, torch.device(dev), compute, run.name)

    def format(self, record: dict) -> str:
        """The text of a record with the run's text columns, joined with its template."""
        cols, template = self.config["text_cols"], self.config.get("template")
        values = {c: str(record.get(c, "")).strip() for c in cols}
        return template.format(**values) if template else values[cols[0]]

    def predict(self, texts: list[str], on_batch: Callable[[int], None] | None = None) -> list[dict]:
        """``{"label", "probabilities"}`` per text for a classifier, ``{"score"}`` for a regressor."""
        ids = _encode(self.tokenizer, list(texts), self.block_size)
        raw = _raw_outputs(self.model, self.tokenizer, ids, self.device, self.compute, on_batch)
        if self.task == "regress":
            scores = raw[:, 0] * self.config["target_std"] + self.config["target_mean"]
            return [{"score": float(s)} for s in scores]
        z = raw - raw.max(axis=1, keepdims=True)
        probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        return [{"label": self.labels[int(p.argmax())],
                 "probabilities": {label: float(v) for label, v in zip(self.labels, p)}} for p in probs]


def read_texts(path: str | Path, classifier: Classifier) -> tuple[list[str], list[dict]]:
    """Texts to predict from a file: .txt (one per line), or CSV/TSV/JSONL with the run's text
    columns (or a column named like text). Returns the texts and the rows they came from."""
    from .labelled import TEXT_NAMES, read_table

    path = Path(path)
    if path.suffix.lower() in (".txt", ""):
        if not path.is_file():
            raise TunesmithError("no such file", file=path)
        lines = path.read_text(encoding="utf-8-sig").splitlines()
        rows = [{"text": line} for line in lines if line.strip()]
        return [r["text"] for r in rows], rows
    columns, records = read_table(path)
    cols = classifier.config["text_cols"]
    if all(c in columns for c in cols):
        fmt = classifier.format
    else:
        lower = {c.lower(): c for c in columns}
        found = next((lower[n] for n in TEXT_NAMES if n in lower), None)
        if found is None:
            raise TunesmithError(f"no text column: the run reads {', '.join(cols)}; this file has {', '.join(columns)}",
                                 file=path, field=cols[0])
        fmt = lambda record: str(record.get(found, "")).strip()  # noqa: E731
    texts = []
    for line, record in records:
        text = fmt(record)
        if not text.strip():
            raise TunesmithError("empty text", file=path, line=line, field=cols[0])
        texts.append(text)
    return texts, [record for _, record in records]


def predict_file(classifier: Classifier, path: str | Path, out: str | Path, progress: bool = True) -> int:
    """Predict every text of ``path`` into ``out`` (.csv or .jsonl, written atomically)."""
    import csv

    out = Path(out)
    if out.suffix.lower() not in (".csv", ".jsonl", ".tsv"):
        raise TunesmithError("the output must be .csv, .tsv or .jsonl", file=out)
    texts, rows = read_texts(path, classifier)
    results = _predict_with_bar(classifier, texts, progress)
    merged = []
    for row, result in zip(rows, results):
        extra = {}
        if "label" in result:
            extra = {"predicted_label": result["label"],
                     **{f"p_{label}": round(p, 6) for label, p in result["probabilities"].items()}}
        else:
            extra = {"predicted_score": round(result["score"], 6)}
        merged.append({**row, **extra})
    if out.suffix.lower() == ".jsonl":
        write_jsonl(out, merged)
    else:
        fields = list(dict.fromkeys(k for row in merged for k in row))
        with atomic_path(out) as tmp:
            with open(tmp, "w", encoding="utf-8", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=fields, delimiter="\t" if out.suffix.lower() == ".tsv" else ",")
                writer.writeheader()
                writer.writerows(merged)
    return len(merged)


def _predict_with_bar(classifier: Classifier, texts: list[str], progress: bool) -> list[dict]:
    if not progress:
        return classifier.predict(texts)
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(TextColumn("[bold]predict"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("ETA"), TimeRemainingColumn()) as bar:
        task = bar.add_task("predict", total=len(texts))
        return classifier.predict(texts, on_batch=lambda n: bar.advance(task, n))


def predict(run: str | Path, texts: Iterable[str] | str) -> list[dict]:
    """Predict with a classifier/regressor run: one dict per text."""
    if isinstance(texts, str):
        texts = [texts]
    return Classifier.load(run).predict(list(texts))
