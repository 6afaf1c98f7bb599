"""Fine-tune a base model on prepared data. The loop reads top to bottom.

Fast by default on a laptop CPU: frozen base weights in bf16 where the CPU multiplies bf16
natively (fp32 LoRA weights and optimizer state), examples packed into full blocks, the
batch split into micro-batches so memory stays small, the loss computed without the full
logits (loss.py), and a fused AdamW. We write the loop ourselves rather than use the HF
``Trainer`` because those choices are what make it ~2x faster here (see bench/).
"""

from __future__ import annotations

import math
import platform
import random
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import __version__
from .atomic import append_jsonl, atomic_dir, write_json, write_text
from .errors import TunesmithError
from .models import DEFAULT_BASE
from .rundir import RUN_FORMAT, Run

# Tokens per forward/backward. On a CPU this bounds activation memory (~0.7 GB per 512 tokens)
# at no cost in speed; on a GPU bigger is faster.
MICRO_BATCH_TOKENS = {"cpu": 1024, "cuda": 65536, "mps": 8192}


@dataclass
class TrainConfig:
    """Everything that decides what a run computes. Saved as the run's config.json."""

    base: str = DEFAULT_BASE
    method: str = "lora"  # lora | full
    epochs: int = 4
    lr: float | None = None  # None: 1e-3 for LoRA, 5e-5 for full
    batch_size: int = 8
    micro_batch_size: int | None = None  # None: MICRO_BATCH_TOKENS // block_size
    block_size: int = 512
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    weight_decay: float = 0.0
    warmup_fraction: float = 0.05
    max_steps: int | None = None
    seed: int = 0
    valid_fraction: float = 0.05
    dtype: str = "auto"  # auto | bf16 | fp32
    device: str = "auto"
    gradient_checkpointing: bool = False
    compile: str = "auto"  # auto | on | off: torch.compile the decoder layers (auto: long CPU runs)
    save_every: int | None = None  # optimizer steps between checkpoints (besides each epoch end)
    sample_prompts: list[str] = field(default_factory=list)
    sample_tokens: int = 60

    def check(self) -> None:
        if self.method not in ("lora", "full"):
            raise TunesmithError("must be 'lora' or 'full'", field="method")
        for name in ("epochs", "batch_size", "block_size", "lora_r"):
            if getattr(self, name) < 1:
                raise TunesmithError("must be at least 1", field=name)
        if self.block_size > 8192:
            raise TunesmithError("must be at most 8192", field="block_size")
        if self.lr is not None and not 0 < self.lr < 1:
            raise TunesmithError("must be between 0 and 1", field="lr")
        if self.max_steps is not None and self.max_steps < 1:
            raise TunesmithError("must be at least 1", field="max_steps")
        if not 0 <= self.valid_fraction <= 0.5:
            raise TunesmithError("must be between 0 and 0.5", field="valid_fraction")
        if self.compile not in ("auto", "on", "off"):
            raise TunesmithError("must be auto, on or off", field="compile")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (1e-3 if self.method == "lora" else 5e-5)

    @property
    def micro_batch(self) -> int:
        return micro_batch_size(self, "cpu")


def micro_batch_size(cfg: TrainConfig, device) -> int:
    """Blocks per forward/backward: small on a CPU (memory), the whole batch on a GPU (throughput)."""
    budget = MICRO_BATCH_TOKENS.get(getattr(device, "type", str(device)).split(":")[0], MICRO_BATCH_TOKENS["cpu"])
    micro = cfg.micro_batch_size or max(1, budget // cfg.block_size)
    return max(1, min(micro, cfg.batch_size))


# ----------------------------------------------------------------------------------------
# Pieces the loop (and the time estimate) use


def build_model(cfg: TrainConfig):
    """Return ``(model, tokenizer, device, compute_dtype)`` ready to train."""
    import torch

    from .device import pick_device, pick_dtype, setup_threads
    from .models import load_base

    setup_threads()
    device = pick_device(cfg.device)
    compute = pick_dtype(device, cfg.dtype)
    # LoRA: the frozen base can live in the compute dtype; full: fp32 master weights.
    weights = compute if cfg.method == "lora" else torch.float32
    model, tok = load_base(cfg.base, dtype=weights, device=device)
    model.config.use_cache = False
    if cfg.method == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)  # adapters stay fp32 (autocast_adapter_dtype)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.method == "lora":
            model.enable_input_require_grads()
    model.train()
    return model, tok, device, compute


def _causal_lm(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


COMPILE_MIN_TOKENS = 100_000  # auto-compile pays back its ~20 s once a run trains this many tokens


def wants_compile(cfg: TrainConfig, device, tokens: int) -> bool:
    """Compile for long CPU runs: ~25% faster steps here for a one-off ~20 s compile (bench/)."""
    if cfg.compile != "auto":
        return cfg.compile == "on"
    return str(device) == "cpu" and not cfg.gradient_checkpointing and tokens >= COMPILE_MIN_TOKENS


def compile_layers(model) -> None:
    """``torch.compile`` each decoder layer. The layers share code and shapes, so one compiled
    graph serves all of them; inductor fuses the norms, rotary and activation elementwise ops."""
    for layer in _causal_lm(model).model.layers:
        layer.compile(dynamic=False)


def uncompile_layers(model) -> list:
    """Make the decoder layers run eagerly; returns what they had, to restore."""
    layers = list(_causal_lm(model).model.layers)
    saved = [getattr(layer, "_compiled_call_impl", None) for layer in layers]
    for layer in layers:
        layer._compiled_call_impl = None
    return saved


@contextmanager
def eager_layers(model):
    """Run the decoder layers uncompiled inside the block: validation and samples see other
    shapes, which would otherwise trigger recompiles."""
    saved = uncompile_layers(model)
    try:
        yield
    finally:
        for layer, compiled in zip(_causal_lm(model).model.layers, saved):
            layer._compiled_call_impl = compiled


def lm_loss(model, ids, mask, compute_dtype):
    """Summed next-token loss, correct predictions and target count for a micro-batch."""
    import torch

    from .loss import linear_cross_entropy

    inputs = ids[:, :-1]
    targets = torch.where(mask[:, 1:], ids[:, 1:], torch.full_like(ids[:, 1:], -100))
    causal = _causal_lm(model)
    with torch.autocast(ids.device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32):
        hidden = causal.model(input_ids=inputs).last_hidden_state
        loss_sum, correct = linear_cross_entropy(
            hidden.reshape(-1, hidden.shape[-1]),
            causal.get_output_embeddings().weight,
            targets.reshape(-1),
            compute_dtype,
        )
    return loss_sum, correct, int((targets >= 0).sum())


def make_optimizer(model, cfg: TrainConfig, total_steps: int):
    import torch
    from transformers import get_cosine_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    try:
        opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError):  # fused needs a device kernel; foreach is the next best
        opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, foreach=True)
    warmup = int(cfg.warmup_fraction * total_steps)
    return opt, get_cosine_schedule_with_warmup(opt, warmup, max(total_steps, 1))


def train_step(model, opt, sched, blocks, batch_idx, cfg: TrainConfig, device, compute_dtype) -> dict:
    """One optimizer step over ``batch_idx`` blocks, in micro-batches, loss averaged per target token."""
    import torch

    ids = torch.from_numpy(blocks.ids[batch_idx]).to(device, non_blocking=True)
    mask = torch.from_numpy(blocks.mask[batch_idx]).to(device, non_blocking=True)
    n_targets = int(blocks.mask[batch_idx][:, 1:].sum())  # from numpy: no device sync
    micro = micro_batch_size(cfg, device)
    total_loss = torch.zeros((), device=device)
    total_correct = torch.zeros((), dtype=torch.int64, device=device)
    for start in range(0, len(batch_idx), micro):
        loss_sum, correct, _ = lm_loss(model, ids[start : start + micro], mask[start : start + micro], compute_dtype)
        (loss_sum / max(n_targets, 1)).backward()
        total_loss += loss_sum.detach()
        total_correct += correct
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    total_loss, total_correct = total_loss.item(), int(total_correct)  # one sync per step
    return {
        "loss": total_loss / max(n_targets, 1),
        "accuracy": total_correct / max(n_targets, 1),
        "tokens": int(ids.shape[0] * (ids.shape[1] - 1)),
    }


def evaluate(model, blocks, cfg: TrainConfig, device, compute_dtype) -> dict:
    """Mean loss, perplexity and token accuracy over ``blocks``."""
    import torch

    if blocks is None or len(blocks) == 0:
        return {}
    was_training = model.training
    model.eval()
    loss, correct, count = 0.0, 0, 0
    with torch.no_grad():
        micro = micro_batch_size(cfg, device)
        for start in range(0, len(blocks), micro):
            ids = torch.from_numpy(blocks.ids[start : start + micro]).to(device)
            mask = torch.from_numpy(blocks.mask[start : start + micro]).to(device)
            loss_sum, c, n = lm_loss(model, ids, mask, compute_dtype)
            loss, correct, count = loss + loss_sum.item(), correct + int(c), count + n
    model.train(was_training)
    mean = loss / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50)), "accuracy": correct / max(count, 1)}


# ----------------------------------------------------------------------------------------
# The run


def load_data(data: str | Path, cfg: TrainConfig, tokenizer, data_dir: Path, validation: str | Path | None = None) -> dict:
    """Put the prepared data in ``data_dir`` (preparing raw files on the fly) and return it.
    With ``validation`` (a prepared dir or raw file), all of it is the validation set and all
    of ``data`` is trained on."""
    from .atomic import write_jsonl

    prepared = _examples(data, cfg, tokenizer, data_dir, hold_out=validation is None)
    if not prepared.train:
        raise TunesmithError("no training examples", file=data)
    train, valid = prepared.train, prepared.valid
    if validation is not None:
        held = _examples(validation, cfg, tokenizer, data_dir / "validation", hold_out=False)
        shutil.rmtree(data_dir / "validation", ignore_errors=True)
        train, valid = train + valid, held.train + held.valid
        write_jsonl(data_dir / "train.jsonl", train)
        write_jsonl(data_dir / "valid.jsonl", valid)
    return {"train": train, "valid": valid, "report": prepared.report}


def _examples(source: str | Path, cfg: TrainConfig, tokenizer, out: Path, hold_out: bool):
    from .prepare import load_prepared, prepare

    path = Path(source)
    if not path.exists():
        raise TunesmithError("no such file or directory", file=path)
    if path.is_dir():
        prepared = load_prepared(path)
        out.mkdir(parents=True, exist_ok=True)
        for name in ("train.jsonl", "valid.jsonl", "report.json"):
            if (path / name).exists():
                shutil.copy2(path / name, out / name)
        return prepared
    return prepare(
        path, out=out, base=cfg.base, tokenizer=tokenizer, block_size=cfg.block_size,
        valid_fraction=cfg.valid_fraction if hold_out else 0.0, seed=cfg.seed, overwrite=True, estimate=False,
    )


def pack_data(prepared: dict, tok, block_size: int):
    """Training and validation blocks of ``prepared`` (as load_data returns it), as the run
    trains on them; the pieces of a book are joined by a paragraph break. The time estimate
    counts blocks with this too."""
    from .tokens import book_joiner, pack, tokenize_rows

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    joiner = book_joiner(tok) if (prepared.get("report") or {}).get("format") == "book" else None
    train_blocks = pack(*tokenize_rows(prepared["train"], tok, joiner), block_size, pad)
    valid_blocks = pack(*tokenize_rows(prepared["valid"], tok, joiner), block_size, pad) if prepared["valid"] else None
    return train_blocks, valid_blocks


def default_out(data: str | Path) -> Path:
    stem = Path(data).name.split(".")[0] or "run"
    return Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def finetune(
    data: str | Path,
    *,
    validation: str | Path | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    on_event: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    progress: bool = True,
    samples: bool = True,
    **options,
) -> Run:
    """Fine-tune ``options['base']`` on ``data`` (a prepared dir or a raw file) into run dir ``out``.

    ``validation`` (optional, a prepared dir or raw file) replaces the held-out share of ``data``.
    ``options`` are TrainConfig fields (epochs, lr, batch_size, block_size, method, seed, ...).
    ``on_event`` receives progress events; ``should_stop()`` is polled each step for a clean stop.
    Ctrl-C saves a checkpoint, marks the run interrupted and re-raises KeyboardInterrupt.
    """
    unknown = set(options) - set(TrainConfig.__dataclass_fields__)
    if unknown:
        raise TunesmithError(f"unknown option(s): {', '.join(sorted(unknown))}")
    cfg = TrainConfig(**options)
    cfg.check()
    emit = on_event or (lambda event: None)
    out = Path(out) if out else default_out(data)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise TunesmithError("run directory already exists", file=out, hint="choose another --out, or pass --overwrite")
        shutil.rmtree(out)
    if not Path(data).exists():
        raise TunesmithError("no such file or directory", file=data)
    from .models import resolve

    base_path = resolve(cfg.base)  # fail on an unknown base before anything is written

    # Prepare the data and the model in a scratch dir, so a bad input leaves nothing behind.
    from .models import load_tokenizer

    tokenizer = load_tokenizer(cfg.base)
    with atomic_dir(out, overwrite=True) as tmp:
        prepared = load_data(data, cfg, tokenizer, tmp / "data", validation)
        tokenizer.save_pretrained(tmp / "tokenizer")
        config = {
            "tunesmith_run": RUN_FORMAT,
            "name": out.name,
            **asdict(cfg),
            "learning_rate": cfg.learning_rate,
            "base_path": str(base_path),
            "data": {"source": str(Path(data).resolve()), "report": prepared["report"],
                     "validation": str(Path(validation).resolve()) if validation else None},
            "versions": _versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_json(tmp / "config.json", config)
        write_json(tmp / "status.json", {"status": "running", "step": 0, "updated": time.time()})
    run = Run(out)
    try:
        _train(run, cfg, prepared, emit, should_stop, progress, samples)
    except KeyboardInterrupt:
        raise
    except TunesmithError as err:
        run.set_status("failed", error=str(err))
        raise
    except Exception as err:
        run.set_status("failed", error=f"{type(err).__name__}: {err}")
        raise
    return run


def _train(run: Run, cfg: TrainConfig, prepared: dict, emit, should_stop, show_progress: bool, samples: bool) -> None:
    import torch

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    t_load = time.perf_counter()
    model, tok, device, compute = build_model(cfg)
    emit({"type": "info", "message": f"loaded {cfg.base} on {device} ({str(compute).replace('torch.', '')}) in {time.perf_counter() - t_load:.1f}s"})

    train_blocks, valid_blocks = pack_data(prepared, tok, cfg.block_size)
    steps_per_epoch = math.ceil(len(train_blocks) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    opt, sched = make_optimizer(model, cfg, total_steps)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    emit({"type": "info", "message": f"{len(train_blocks)} blocks of {cfg.block_size} tokens, {total_steps} steps, {trainable:,} trainable parameters"})
    prompts = cfg.sample_prompts or _default_prompts(prepared)
    sample_log: list[dict] = []

    def log(row: dict) -> None:
        append_jsonl(run.path / "metrics.jsonl", row)

    compiled = wants_compile(cfg, device, total_steps * cfg.batch_size * cfg.block_size)
    if compiled:
        compile_layers(model)
        emit({"type": "info", "message": "compiling the decoder layers (the first step takes ~20 s longer)"})

    def validate(step: int, epoch: float, elapsed_tokens: int) -> dict:
        with eager_layers(model):
            result = evaluate(model, valid_blocks, cfg, device, compute)
        if result:
            row = {"step": step, "epoch": epoch, "elapsed_tokens": elapsed_tokens,
                   "validation_loss": result["loss"], "validation_token_accuracy": result["accuracy"],
                   "validation_perplexity": result["perplexity"]}
            log(row)
            emit({"type": "validation", "step": step, "validation_loss": result["loss"],
                  "validation_token_accuracy": result["accuracy"], "perplexity": result["perplexity"]})
        return result

    def checkpoint(step: int, epoch: int, batch_in_epoch: int) -> None:
        path = save_checkpoint(run, model, opt, sched, cfg, step, epoch, batch_in_epoch)
        emit({"type": "checkpoint", "step": step, "path": str(path)})

    before = validate(0, 0.0, 0)
    bar = _Progress(total_steps, enabled=show_progress)
    step, elapsed_tokens, started = 0, 0, time.perf_counter()
    status, epoch, batch_in_epoch, after = "succeeded", 0, 0, {}
    try:
        for epoch in range(cfg.epochs):
            order = np.random.default_rng(cfg.seed + epoch).permutation(len(train_blocks))
            for batch_in_epoch in range(steps_per_epoch):
                if step >= total_steps:
                    break
                if should_stop and should_stop():
                    status = "cancelled"
                    break
                idx = order[batch_in_epoch * cfg.batch_size : (batch_in_epoch + 1) * cfg.batch_size]
                try:
                    result = train_step(model, opt, sched, train_blocks, idx, cfg, device, compute)
                except Exception as err:  # a compiler missing or failing here: go on uncompiled
                    if not compiled or step > 0:
                        raise
                    compiled = False
                    uncompile_layers(model)
                    opt.zero_grad(set_to_none=True)
                    emit({"type": "info", "message": f"torch.compile failed ({type(err).__name__}); training uncompiled"})
                    result = train_step(model, opt, sched, train_blocks, idx, cfg, device, compute)
                step += 1
                elapsed_tokens += result["tokens"]
                seconds = time.perf_counter() - started
                row = {"step": step, "epoch": round(epoch + (batch_in_epoch + 1) / steps_per_epoch, 4),
                       "elapsed_tokens": elapsed_tokens, "training_loss": result["loss"],
                       "training_token_accuracy": result["accuracy"], "learning_rate": sched.get_last_lr()[0],
                       "tokens_per_second": elapsed_tokens / seconds, "elapsed_seconds": seconds}
                log(row)
                emit({"type": "metrics", "total_steps": total_steps, **row})
                bar.update(step, result["loss"], row["tokens_per_second"])
                if cfg.save_every and step % cfg.save_every == 0:
                    checkpoint(step, epoch, batch_in_epoch + 1)
            if status == "cancelled":
                break
            after = validate(step, float(epoch + 1), elapsed_tokens)
            if after:
                bar.note(f"epoch {epoch + 1}: validation loss {after['loss']:.3f}, perplexity {after['perplexity']:.2f}")
            if samples and prompts:
                with eager_layers(model):
                    samples_now = _write_samples(model, tok, prompts, cfg)
                sample_log.append({"epoch": epoch + 1, "step": step, "samples": samples_now})
                _save_samples(run, sample_log)
            checkpoint(step, epoch + 1, 0)
            if step >= total_steps:
                break
    except KeyboardInterrupt:
        bar.close()
        checkpoint(step, epoch, batch_in_epoch)
        run.set_status("interrupted", step=step)
        _finish(run, cfg, before, None, time.perf_counter() - started, elapsed_tokens)
        emit({"type": "done", "status": "interrupted", "path": str(run.path)})
        raise
    bar.close()
    if status == "cancelled":
        checkpoint(step, epoch, batch_in_epoch)
    seconds = time.perf_counter() - started
    final = after if status == "succeeded" else None  # a finished run ends with a validation
    run.set_status(status, step=step)
    _finish(run, cfg, before, final, seconds, elapsed_tokens)
    emit({"type": "done", "status": status, "path": str(run.path)})


def save_checkpoint(run: Run, model, opt, sched, cfg: TrainConfig, step: int, epoch: int, batch_in_epoch: int) -> Path:
    """Write checkpoints/step-N (weights + everything an exact resume needs), then publish its
    weights as the run's current weights. Each directory appears whole or not at all."""
    import torch

    target = run.path / "checkpoints" / f"step-{step:06d}"
    weights_name = "adapter" if cfg.method == "lora" else "model"
    with atomic_dir(target, overwrite=True) as tmp:
        model.save_pretrained(tmp / weights_name)
        torch.save(
            {
                "step": step,
                "epoch": epoch,
                "batch_in_epoch": batch_in_epoch,  # data position: batches of this epoch already seen
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
            },
            tmp / "trainer_state.pt",
        )
    with atomic_dir(run.path / weights_name, overwrite=True) as tmp:
        shutil.copytree(target / weights_name, tmp, dirs_exist_ok=True)
    for old in run.checkpoints()[:-2]:  # keep the last two
        shutil.rmtree(old["path"], ignore_errors=True)
    return target


def _default_prompts(prepared: dict) -> list[str]:
    """The opening words of the first two validation (or training) examples."""
    rows = prepared["valid"] or prepared["train"]
    prompts = []
    for row in rows[:2]:
        if "prompt" in row:
            prompts.append(row["prompt"])
        else:
            prompts.append(" ".join(row["text"].split()[:12]))
    return prompts


def _write_samples(model, tok, prompts: list[str], cfg: TrainConfig) -> list[dict]:
    import torch

    from .generate import Model

    model.eval()
    try:
        wrapped = Model(model, tok, name="training")
        out = []
        for i, prompt in enumerate(prompts):
            with torch.autocast(wrapped.device.type, dtype=torch.bfloat16, enabled=model.dtype == torch.bfloat16):
                text = wrapped.generate(prompt, max_tokens=cfg.sample_tokens, temperature=0.8, top_p=0.95, seed=cfg.seed + i)[0].text
            out.append({"prompt": prompt, "text": text})
        return out
    finally:
        model.train()


def _save_samples(run: Run, sample_log: list[dict]) -> None:
    lines = [f"# Samples from {run.name}", "", "Fixed prompts, sampled at temperature 0.8 after each epoch.", ""]
    for entry in sample_log:
        lines += [f"## Epoch {entry['epoch']} (step {entry['step']})", ""]
        for s in entry["samples"]:
            quote = lambda text: "\n".join("> " + line for line in text.split("\n"))  # noqa: E731
            lines += ["Prompt:", "", quote(s["prompt"]), "", "Continuation:", "", quote(s["text"].strip()), ""]
    write_text(run.path / "samples.md", "\n".join(lines))


def _finish(run: Run, cfg: TrainConfig, before: dict, after: dict | None, seconds: float, tokens: int) -> None:
    from .plot import plot_loss

    metrics = run.metrics()
    try:
        plot_loss(metrics, run.path / "loss.png", title=run.name)
    except Exception as err:  # a plot must never lose a finished run
        write_text(run.path / "loss.png.error", str(err))
    summary = {
        "status": run.status,
        "seconds": seconds,
        "tokens": tokens,
        "tokens_per_second": tokens / seconds if seconds > 0 else None,
        "validation_before": before or None,
        "validation_after": after or None,
    }
    write_json(run.path / "summary.json", summary)
    write_text(run.path / "README.md", _run_readme(run, cfg, summary))


def _run_readme(run: Run, cfg: TrainConfig, summary: dict) -> str:
    before, after = summary.get("validation_before"), summary.get("validation_after")
    lines = [
        f"# Run {run.name}",
        "",
        f"- status: **{summary['status']}**",
        f"- base model: `{cfg.base}`, method: {cfg.method}" + (f" (r={cfg.lora_r}, alpha={cfg.lora_alpha})" if cfg.method == "lora" else ""),
        f"- epochs: {cfg.epochs}, batch size: {cfg.batch_size}, block size: {cfg.block_size}, learning rate: {cfg.learning_rate:g}, seed: {cfg.seed}",
        f"- trained on {summary['tokens']:,} tokens in {summary['seconds']:.0f} s"
        + (f" ({summary['tokens_per_second']:.0f} tokens/s)" if summary.get("tokens_per_second") else ""),
    ]
    if before:
        lines.append(f"- validation perplexity before: {before['perplexity']:.2f}" + (f", after: {after['perplexity']:.2f}" if after else ""))
    lines += [
        "",
        "Write with it:",
        "",
        "```",
        f'tunesmith generate {run.path} "Once upon a time"',
        "```",
        "",
        "Files: `config.json` (reproduces the run), `metrics.jsonl`, `loss.png`, `samples.md`, "
        f"`{'adapter' if cfg.method == 'lora' else 'model'}/` (weights), `checkpoints/`, `data/`, `tokenizer/`.",
        "",
    ]
    return "\n".join(lines)


def _versions() -> dict:
    import peft
    import torch
    import transformers

    return {"tunesmith": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "python": platform.python_version()}


class _Progress:
    """A rich progress bar: step, loss, tokens/s, ETA."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        )
        self.bar.start()
        self.task = self.bar.add_task("train", total=total, loss="-", tps="-")

    def update(self, step: int, loss: float, tps: float) -> None:
        if self.bar:
            self.bar.update(self.task, completed=step, loss=f"{loss:.3f}", tps=f"{tps:.0f}")

    def note(self, text: str) -> None:
        if self.bar:
            self.bar.console.print(text)

    def close(self) -> None:
        if self.bar:
            self.bar.stop()
            self.bar = None
