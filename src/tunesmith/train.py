"""Fine-tune a base model on prepared data. The loop reads top to bottom.

Fast by default on a laptop CPU: frozen base weights in bf16 where the CPU multiplies bf16
natively (fp32 LoRA weights and optimizer state), examples packed into full blocks, the
batch split into micro-batches so memory stays small, the loss computed without the full
logits (loss.py), and a fused AdamW. We write the loop ourselves rather than use the HF
``Trainer`` because those choices are what make it ~2x faster here (see bench/).
"""

from __future__ import annotations

import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np

from .atomic import DiskFull, append_jsonl, atomic_dir, write_json, write_text
from .config import MICRO_BATCH_TOKENS, TrainConfig, micro_batch_size, with_overrides  # noqa: F401 (re-exported)
from .distributed import Processes, processes
from .errors import TunesmithError
from .events import TrainEvent
from .rundir import RUN_FORMAT, Run
from .version import library_versions
from .watch import EpochWatch

# ----------------------------------------------------------------------------------------
# Pieces the loop (and the time estimate) use


def build_model(cfg: TrainConfig, load_on: str | None = None):
    """Return ``(model, tokenizer, device, compute_dtype)`` ready to train (its weights on
    ``load_on`` where given: FSDP moves each rank's shards to ``device``)."""
    import torch

    from .device import pick_device, pick_dtype, setup_threads
    from .models import load_base

    setup_threads()
    device = pick_device(cfg.device)
    compute = pick_dtype(device, cfg.dtype)
    # LoRA: the frozen base can live in the compute dtype; full: fp32 master weights.
    weights = compute if cfg.method == "lora" else torch.float32
    model, tok = load_base(cfg.base, dtype=weights, device=load_on or device)
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
    """Compile for long CPU runs: ~33% faster steps here for a one-off ~23 s compile (bench/)."""
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


def lm_loss(model, ids, mask, compute_dtype, segments=None, positions=None):
    """Summed next-token loss, correct predictions and target count for a micro-batch.

    With ``segments`` (examples packed apart, see tokens.pack_examples) a token attends only to
    earlier tokens of its own segment, at ``positions`` that restart for each segment.
    """
    import torch

    from .loss import linear_cross_entropy

    inputs = ids[:, :-1]
    targets = torch.where(mask[:, 1:], ids[:, 1:], torch.full_like(ids[:, 1:], -100))
    causal = _causal_lm(model)
    extra = {}
    if segments is not None:
        extra = {"attention_mask": segment_mask(segments[:, :-1], causal), "position_ids": positions[:, :-1]}
    with torch.autocast(ids.device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32):
        hidden = causal.model(input_ids=inputs, **extra).last_hidden_state
        loss_sum, correct = linear_cross_entropy(
            hidden.reshape(-1, hidden.shape[-1]),
            causal.get_output_embeddings().weight,
            targets.reshape(-1),
            compute_dtype,
        )
    return loss_sum, correct, int((targets >= 0).sum())


def segment_mask(segments, model):
    """The (batch, 1, T, T) attention mask of packed segments: causal within a segment, nothing across."""
    import torch

    n = segments.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=segments.device).tril()
    allowed = (segments[:, :, None] == segments[:, None, :]) & causal
    if getattr(model.config, "_attn_implementation", "sdpa") == "eager":  # eager adds the mask to the scores
        dtype = model.get_input_embeddings().weight.dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=segments.device).masked_fill_(
            ~allowed, torch.finfo(dtype).min
        )[:, None]
    return allowed[:, None]


def _segments(blocks, index, device):
    """``blocks``' segments and positions at ``index`` on ``device``, or (None, None) for one stream."""
    import torch

    if blocks.segments is None:
        return None, None
    return (torch.from_numpy(blocks.segments[index]).to(device), torch.from_numpy(blocks.positions[index]).to(device))


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


def train_step(model, opt, sched, blocks, batch_idx, cfg: TrainConfig, device, compute_dtype, procs=None,
               forward=None) -> dict:
    """One optimizer step over ``batch_idx`` blocks, in micro-batches, loss averaged per target token.

    In several processes (``procs``; ``forward`` is ``procs.wrap(model, lm_loss)``) each rank takes
    its slice of the batch, and DDP averages the gradients in the last micro-batch's backward."""
    import torch

    procs = procs or Processes()
    forward = forward or (lambda *args: lm_loss(model, *args))
    n_targets = int(blocks.mask[batch_idx][:, 1:].sum())  # the whole batch's, from numpy: no device sync
    mine, ranks = procs.shard(batch_idx), procs.world  # DDP divides by the ranks; multiplying first undoes it
    if len(mine) == 0:  # fewer blocks than ranks: a pass weighted 0 keeps this rank in step with the others
        mine, ranks = batch_idx[:1], 0
    ids = torch.from_numpy(blocks.ids[mine]).to(device, non_blocking=True)
    mask = torch.from_numpy(blocks.mask[mine]).to(device, non_blocking=True)
    segments, positions = _segments(blocks, mine, device)
    micro = micro_batch_size(cfg, device)
    total_loss = torch.zeros((), device=device)
    total_correct = torch.zeros((), dtype=torch.int64, device=device)
    starts = range(0, len(mine), micro)
    passes = procs.most(len(starts))  # FSDP: as many passes on every rank, the extra ones weighted 0
    for n in range(passes):
        part, weight = (slice(starts[n], starts[n] + micro), ranks) if n < len(starts) else (slice(0, 1), 0)
        seg, pos = (segments[part], positions[part]) if segments is not None else (None, None)
        with procs.no_sync(forward, sync=n == passes - 1):
            loss_sum, correct, _ = forward(ids[part], mask[part], compute_dtype, seg, pos)
            (loss_sum * weight / max(n_targets, 1)).backward()
        if weight:
            total_loss += loss_sum.detach()
            total_correct += correct
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    total_loss, total_correct = procs.sum(torch.stack([total_loss.double(), total_correct.double()])).tolist()  # one sync
    return {
        "loss": total_loss / max(n_targets, 1),
        "accuracy": int(total_correct) / max(n_targets, 1),
        "tokens": int(len(batch_idx) * (blocks.ids.shape[1] - 1)),
    }


def evaluate(model, blocks, cfg: TrainConfig, device, compute_dtype, procs=None) -> dict:
    """Mean loss, perplexity and token accuracy over ``blocks`` (in several processes, each rank
    measures its slice and the sums are added up over ranks)."""
    import torch

    if blocks is None or len(blocks) == 0:
        return {}
    procs = procs or Processes()
    was_training = model.training
    model.eval()
    loss, correct, count = 0.0, 0, 0
    mine = procs.shard(np.arange(len(blocks)))
    with torch.no_grad():
        micro = micro_batch_size(cfg, device)
        starts = range(0, len(mine), micro)
        for i in range(procs.most(len(starts))):  # FSDP: as many passes on every rank, the extra ones not counted
            part = mine[starts[i] : starts[i] + micro] if i < len(starts) else np.arange(1)
            ids = torch.from_numpy(blocks.ids[part]).to(device)
            mask = torch.from_numpy(blocks.mask[part]).to(device)
            segments, positions = _segments(blocks, part, device)
            loss_sum, c, n = lm_loss(model, ids, mask, compute_dtype, segments, positions)
            if i < len(starts):
                loss, correct, count = loss + loss_sum.item(), correct + int(c), count + n
    model.train(was_training)
    loss, correct, count = procs.sum(torch.tensor([loss, correct, count], dtype=torch.float64)).tolist()
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
    warnings: list[str] = []
    if validation is not None:
        from .atomic import write_json
        from .prepare import normalised_key
        from .wording import counted

        held = _examples(validation, cfg, tokenizer, data_dir / "validation", hold_out=False)
        train, valid = train + valid, held.train + held.valid
        shutil.rmtree(data_dir / "validation", ignore_errors=True)
        seen = {normalised_key(row) for row in train}
        shared = sum(normalised_key(row) in seen for row in valid)
        if shared:
            check = {"name": "validation", "status": "warning", "message": (
                f"{counted(shared, 'example')} of {len(valid):,} in the validation file "
                f"{'is' if shared == 1 else 'are'} also in the training data, so validation loss will look "
                "better than it is; remove them from one of the two files"
            )}
            warnings.append(check["message"])
        else:
            check = {"name": "validation", "status": "ok",
                     "message": f"{counted(len(valid), 'example')} from the validation file, none in the training data"}
        checks = [c for c in prepared.report.get("checks", []) if c.get("name") != "validation"]
        prepared.report["checks"] = checks + [check]
        write_jsonl(data_dir / "train.jsonl", train)
        write_jsonl(data_dir / "valid.jsonl", valid)
        write_json(data_dir / "report.json", prepared.report)
        for name in _shard_files(data_dir):  # the rows changed: tokenized again when training starts
            (data_dir / name).unlink()
    return {"train": train, "valid": valid, "report": prepared.report, "warnings": warnings, "dir": data_dir}


def _shard_files(directory: Path) -> list[str]:
    """The token shard files of a prepared directory (tokens.py), the index last."""
    from .tokens import SHARD_INDEX

    names = sorted(p.name for p in Path(directory).glob("tokens-*.bin")) + \
        sorted(p.name for p in Path(directory).glob("examples-*.npy"))
    return names + ([SHARD_INDEX] if (Path(directory) / SHARD_INDEX).exists() else [])


def _examples(source: str | Path, cfg: TrainConfig, tokenizer, out: Path, hold_out: bool):
    from .prepare import load_prepared, prepare

    path = Path(source)
    if not path.exists():
        raise TunesmithError("no such file or directory", file=path)
    if path.is_dir():
        prepared = load_prepared(path)
        out.mkdir(parents=True, exist_ok=True)
        for name in ("train.jsonl", "valid.jsonl", "report.json", *_shard_files(path)):
            if (path / name).exists():
                try:  # a hard link where the file system allows (files are only ever replaced, never rewritten)
                    os.link(path / name, out / name)
                except OSError:
                    shutil.copy2(path / name, out / name)
        return prepared
    return prepare(
        path, out=out, base=cfg.base, tokenizer=tokenizer, block_size=cfg.block_size,
        valid_fraction=cfg.valid_fraction if hold_out else 0.0, seed=cfg.seed, overwrite=True, estimate=False,
    )


def _moved(prepared: dict, data_dir: Path) -> dict:
    """``prepared`` with its rows read from ``data_dir``, where the scratch directory was moved."""
    from .prepare import load_prepared

    moved = load_prepared(data_dir)
    return {**prepared, "train": moved.train, "valid": moved.valid, "dir": data_dir}


def pack_data(prepared: dict, tok, block_size: int, chat_loss: str = "assistant"):
    """Training and validation blocks of ``prepared`` (as load_data returns it), as the run
    trains on them (tokens.make_blocks: books join their pieces by a paragraph break, records get
    one attention segment each). The time estimate counts blocks with this too.

    Where ``prepared["dir"]`` holds token shards for this tokenizer (tokens.py), the blocks are
    read from them on demand (the same blocks, in the same order); a directory without them (one
    prepared by an older version) gets them written first, from its rows."""
    from .tokens import make_blocks, open_shards, write_shards

    fmt = (prepared.get("report") or {}).get("format")
    directory = prepared.get("dir")
    # Chat data is packed from its rows: its mask covers every assistant message, which the
    # shards (one prompt boundary per example) cannot hold.
    if directory is not None and Path(directory).is_dir() and fmt and fmt != "chat":
        shards = open_shards(Path(directory), tok, block_size, fmt)
        if shards is None:
            write_shards(Path(directory), {"train": prepared["train"], "valid": prepared["valid"]}, tok, fmt)
            shards = open_shards(Path(directory), tok, block_size, fmt)
        if shards is not None and shards["train"] is not None:
            return shards["train"], shards["valid"]
    train_blocks = make_blocks(prepared["train"], tok, block_size, fmt, chat_loss)
    valid_blocks = make_blocks(prepared["valid"], tok, block_size, fmt, chat_loss) if prepared["valid"] else None
    return train_blocks, valid_blocks


def default_out(data: str | Path) -> Path:
    stem = Path(data).name.split(".")[0] or "run"
    return Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def finetune(
    data: str | Path,
    config: TrainConfig | None = None,
    *,
    validation: str | Path | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    on_event: Callable[[TrainEvent], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    progress: bool = True,
    samples: bool = True,
    **overrides,
) -> Run:
    """Fine-tune ``config.base`` on ``data`` (a prepared dir or a raw file) into run dir ``out``.

    ``config`` (default: ``TrainConfig()``) holds every setting; ``overrides`` are TrainConfig
    fields set on top of it, a shorthand for scripts: ``finetune(data, epochs=2)``.
    ``validation`` (optional, a prepared dir or raw file) replaces the held-out share of ``data``.
    ``on_event`` receives each ``TrainEvent`` (events.py); ``should_stop()`` is polled each step for a
    clean stop. Ctrl-C saves a checkpoint, marks the run interrupted and re-raises KeyboardInterrupt.
    """
    cfg = with_overrides(config or TrainConfig(), overrides)
    cfg.check()
    procs = processes(cfg.device)
    if not procs.is_main:  # rank 0 checks everything and writes the run directory; the others train in it
        run = Run(procs.share(None))
        _guarded_train(run, cfg, _run_data(run), lambda event: None, None, False, False, resume=False)
        return run
    from .device import pick_device, pick_dtype
    from .rundir import check_out_dir

    pick_dtype(pick_device(cfg.device), cfg.dtype)  # an unusable device or dtype fails before anything is written
    emit = on_event or (lambda event: None)
    out = Path(out) if out else default_out(data)
    check_out_dir(out, overwrite)  # replaces only an earlier run (or an empty folder), never anything else
    if not Path(data).exists():
        raise TunesmithError("no such file or directory", file=data)
    from .models import resolve

    base_path = resolve(cfg.base)  # fail on an unknown base before anything is written
    check_free_space(out, checkpoint_bytes(cfg, base_path))

    # Prepare the data and the model in a scratch dir, so a bad input leaves nothing behind.
    from .models import load_tokenizer

    tokenizer = load_tokenizer(cfg.base)
    with atomic_dir(out, overwrite=True, replace_if=lambda p: check_out_dir(p, overwrite) is None) as tmp:
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
            "versions": library_versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_json(tmp / "config.json", config)
        write_json(tmp / "status.json", {"status": "running", "step": 0, "updated": time.time()})
    run = Run(out)
    prepared = _moved(prepared, run.path / "data")
    procs.share(str(out))
    with run.training_lock():
        _guarded_train(run, cfg, prepared, emit, should_stop, progress, samples, resume=False)
    return run


# Options that do not change what a run computes: a resume may set them anew.
RESUMABLE_CHANGES = ("save_every", "keep_checkpoints", "sample_prompts", "sample_tokens")


def resume(
    run: str | Path | Run,
    *,
    on_event: Callable[[TrainEvent], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    progress: bool = True,
    samples: bool = True,
    **options,
) -> Run:
    """Continue an interrupted, cancelled or failed run from its newest complete checkpoint.

    The configuration and data come from the run directory. ``options`` may repeat its
    TrainConfig fields (they must match) or set those that do not change the computation
    (``RESUMABLE_CHANGES``). Weights, optimizer, scheduler, RNG states and the data position
    are restored, so the result equals a run that was never interrupted. A run without a
    checkpoint trains again from its first step.
    """
    from .models import resolve

    run = run if isinstance(run, Run) else Run(run)
    config = run.config
    unknown = set(options) - set(TrainConfig.__dataclass_fields__)
    if unknown:
        raise TunesmithError(f"unknown option(s): {', '.join(sorted(unknown))}")
    stored = {k: config[k] for k in TrainConfig.__dataclass_fields__ if k in config}
    for key, value in options.items():
        if key not in RESUMABLE_CHANGES and value != stored.get(key):
            raise TunesmithError(
                f"the run was trained with {key}={stored.get(key)!r}; a resume cannot change it to {value!r}",
                file=run.path / "config.json", field=key,
                hint="resume with the run's own settings, or start a new run",
            )
    cfg = TrainConfig(**{**stored, **options})
    cfg.check()
    if run.status == "succeeded":
        raise TunesmithError("this run has already finished; there is nothing to resume", file=run.path)
    procs = processes(cfg.device)
    with run.training_lock() if procs.is_main else nullcontext():  # the lock is rank 0's
        checkpoints = run.checkpoints()
        need = _dir_bytes(Path(checkpoints[-1]["path"])) + _dir_bytes(run.weights_dir) if checkpoints else None
        check_free_space(run.path, need or checkpoint_bytes(cfg, resolve(cfg.base)))
        _guarded_train(run, cfg, _run_data(run), on_event or (lambda event: None), should_stop, progress, samples,
                       resume=True)
    return run


def _run_data(run: Run) -> dict:
    """The examples a run trains on, read back from its data/ (what resume and the ranks after rank 0 use)."""
    from .prepare import load_prepared

    prepared = load_prepared(run.path / "data")
    return {"train": prepared.train, "valid": prepared.valid, "report": prepared.report, "dir": run.path / "data"}


def _guarded_train(run: Run, cfg: TrainConfig, prepared: dict, emit, should_stop, progress: bool, samples: bool,
                   resume: bool) -> None:
    """Train, recording a failure in status.json; Ctrl-C (KeyboardInterrupt) passes through."""
    if not processes().is_main:  # the run directory, status.json included, is rank 0's to write
        return _train(run, cfg, prepared, emit, should_stop, progress, samples, resume=resume)
    try:
        _train(run, cfg, prepared, emit, should_stop, progress, samples, resume=resume)
    except KeyboardInterrupt:
        if run.status == "running":  # stopped before the first step
            run.set_status("interrupted", step=run.state.get("step", 0))
        raise
    except TunesmithError as err:
        _mark_failed(run, str(err))
        raise
    except Exception as err:
        _mark_failed(run, f"{type(err).__name__}: {err}")
        raise


def _mark_failed(run: Run, error: str) -> None:
    try:
        run.set_status("failed", error=error)
    except TunesmithError:  # a full disk: the error itself still reaches the caller
        pass


# ----------------------------------------------------------------------------------------
# Disk space: a checkpoint must fit before a run starts or resumes


def checkpoint_bytes(cfg: TrainConfig, base_path: str | Path) -> int:
    """Bytes one checkpoint takes, and the copy of its weights published beside it: fp32
    trainable weights twice, plus AdamW's two fp32 moments. Counted on a weightless (meta) model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .models import quiet_transformers

    quiet_transformers()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(base_path)))
        if cfg.method == "lora":
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                                     target_modules="all-linear", task_type="CAUSAL_LM"))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return 4 * trainable * 4 + (1 << 20)  # weights x2, moments x2; 1 MiB for configs and state


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def check_free_space(path: str | Path, needed: int) -> None:
    """Refuse when the disk holding ``path`` has less free space than ``needed`` bytes."""
    where = Path(path).absolute()
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if free < needed:
        raise TunesmithError(
            f"not enough free disk space: a checkpoint needs {_size(needed)}, {_size(free)} is free", file=path,
            hint="free some space, or write the run to another disk (--out)",
        )


def _train(run: Run, cfg: TrainConfig, prepared: dict, emit, should_stop, show_progress: bool, samples: bool,
           resume: bool = False) -> None:
    import torch

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    procs = processes(cfg.device)  # one process, or this rank of several: only rank 0 reports and writes
    if not procs.is_main:
        emit, show_progress, samples = (lambda event: None), False, False
    if procs.sharded and cfg.method != "lora":
        raise TunesmithError("under FSDP tunesmith trains LoRA adapters only (--method lora)",
                             hint="train --method full in one process or data-parallel (DDP)")
    t_load = time.perf_counter()
    model, tok, device, compute = build_model(cfg, load_on="cpu" if procs.sharded else None)
    emit(TrainEvent("info", message=f"loaded {cfg.base} on {device} ({str(compute).replace('torch.', '')}) in {time.perf_counter() - t_load:.1f}s"))

    train_blocks, valid_blocks = pack_data(prepared, tok, cfg.block_size, cfg.chat_loss)
    for warning in prepared.get("warnings", []):
        emit(TrainEvent("info", message=f"warning: {warning}", level="warning"))
    steps_per_epoch = math.ceil(len(train_blocks) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    opt, sched = make_optimizer(model, cfg, total_steps)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    from .wording import counted

    emit(TrainEvent("info", message=f"{counted(len(train_blocks), 'block')} of {cfg.block_size} tokens, "
                                    f"{counted(total_steps, 'step')}, {trainable:,} trainable parameters"))
    prompts = cfg.sample_prompts or _default_prompts(prepared)
    watch = EpochWatch(run.path)  # copying in each epoch's samples, overfitting

    # A resume restores everything the loop below depends on, and drops the metric rows
    # written after the checkpoint (they are written again, identically).
    state = load_checkpoint(run, cfg, model, opt, sched, str(device), str(compute), emit) if resume else None
    if resume and procs.is_main:
        _keep_metric_rows(run, state["metrics_rows"] if state else 0)
        run.set_status("running", step=state["step"] if state else 0)
    state = state or {}
    sample_log: list[dict] = list(state.get("samples", []))
    rows_logged = state.get("metrics_rows", 0)

    def log(row: dict) -> None:
        nonlocal rows_logged
        if procs.is_main:
            append_jsonl(run.path / "metrics.jsonl", row)
        rows_logged += 1

    compiled = wants_compile(cfg, device, total_steps * cfg.batch_size * cfg.block_size) and not procs.sharded
    if compiled:
        compile_layers(model)
        emit(TrainEvent("info", message="compiling the decoder layers (the first step takes ~20 s longer)"))
    # the loss; with several ranks, DDP averages its gradients (or FSDP shards the decoder layers and the body)
    forward = procs.wrap(model, lm_loss, opt, units=[*_causal_lm(model).model.layers, _causal_lm(model).model])
    if procs.sharded:
        for param in model.parameters():  # outside the FSDP units (an untied lm_head): whole on every rank
            if param.device.type != torch.device(device).type:
                param.data = param.data.to(device)
        emit(TrainEvent("info", message=f"sharded (FSDP) over {procs.world} processes: each takes its share of "
                                        f"the {cfg.batch_size} blocks of a step; no samples after each epoch"))
        samples = False  # generating would need every rank to decode in step with rank 0
    elif procs.world > 1:
        emit(TrainEvent("info", message=f"data-parallel over {procs.world} processes: "
                                        f"each takes its share of the {cfg.batch_size} blocks of a step"))

    def validate(step: int, epoch: float, elapsed_tokens: int) -> dict:
        with eager_layers(model):
            result = evaluate(model, valid_blocks, cfg, device, compute, procs)
        if result:
            row = {"step": step, "epoch": epoch, "elapsed_tokens": elapsed_tokens,
                   "validation_loss": result["loss"], "validation_token_accuracy": result["accuracy"],
                   "validation_perplexity": result["perplexity"]}
            log(row)
            emit(TrainEvent("validation", step, metrics={k: v for k, v in row.items() if k != "step"}))
        return result

    before = state["before"] if "before" in state else validate(0, 0.0, 0)
    step, elapsed_tokens = state.get("step", 0), state.get("elapsed_tokens", 0)
    started = time.perf_counter() - state.get("seconds", 0.0)
    after, best = state.get("after") or {}, state.get("best")
    # ``done``: the data position, (epoch, batches of it finished). ``epoch_end``: while the
    # validation and samples after an epoch run, the metric rows and samples from before them.
    done = (state.get("epoch", 0), state.get("batch_in_epoch", 0))
    epoch_end: tuple[int, int] | None = None

    def checkpoint(step: int, epoch: int, batch_in_epoch: int) -> None:
        weights, optimizer = procs.gather(model, opt)  # under FSDP, on every rank
        if not procs.is_main:
            return
        rows, n_samples = epoch_end or (rows_logged, len(sample_log))
        extra = {"elapsed_tokens": elapsed_tokens, "seconds": time.perf_counter() - started, "metrics_rows": rows,
                 "samples": sample_log[:n_samples], "before": before, "after": after, "best": best,
                 "device": str(device), "dtype": str(compute)}
        try:
            path = save_checkpoint(run, model, opt, sched, cfg, step, epoch, batch_in_epoch, extra=extra,
                                   weights=weights, optimizer=optimizer)
        except DiskFull as err:  # the newest complete checkpoint stands
            newest = run.checkpoints()[-1]["step"] if run.checkpoints() else None
            raise TunesmithError(f"{err.message}; training stopped at step {step}" + (
                f", and its checkpoint at step {newest} is kept" if newest is not None else ""), file=err.file,
                hint=f"free some space, then continue with: tunesmith train --resume {run.path}") from None
        emit(TrainEvent("checkpoint", step, path=str(path)))

    bar = _Progress(total_steps, enabled=show_progress, done=step)
    status, busy = "succeeded", False
    stop = _DeferredInterrupt()
    try:
        with stop:
            for epoch in range(done[0], cfg.epochs):
                if step >= total_steps:
                    break
                order = np.random.default_rng(cfg.seed + epoch).permutation(len(train_blocks))
                for batch_in_epoch in range(done[1] if epoch == done[0] else 0, steps_per_epoch):
                    if step >= total_steps:
                        break
                    if should_stop and should_stop():
                        status = "cancelled"
                        break
                    idx = order[batch_in_epoch * cfg.batch_size : (batch_in_epoch + 1) * cfg.batch_size]
                    busy = True  # weights, optimizer and position disagree until the step is logged
                    try:
                        result = train_step(model, opt, sched, train_blocks, idx, cfg, device, compute, procs, forward)
                    except Exception as err:  # a compiler missing or failing here: go on uncompiled
                        if not compiled or step > 0:
                            raise
                        compiled = False
                        uncompile_layers(model)
                        opt.zero_grad(set_to_none=True)
                        emit(TrainEvent("info", message=f"torch.compile failed ({type(err).__name__}); training uncompiled"))
                        result = train_step(model, opt, sched, train_blocks, idx, cfg, device, compute, procs, forward)
                    step += 1
                    done = (epoch, batch_in_epoch + 1)
                    elapsed_tokens += result["tokens"]
                    seconds = time.perf_counter() - started
                    row = {"step": step, "epoch": round(epoch + (batch_in_epoch + 1) / steps_per_epoch, 4),
                           "elapsed_tokens": elapsed_tokens, "training_loss": result["loss"],
                           "training_token_accuracy": result["accuracy"], "learning_rate": sched.get_last_lr()[0],
                           "tokens_per_second": elapsed_tokens / seconds, "elapsed_seconds": seconds}
                    log(row)
                    busy = False
                    emit(TrainEvent("metrics", step, metrics={k: v for k, v in row.items() if k != "step"}, total_steps=total_steps))
                    bar.update(step, result["loss"], row["tokens_per_second"])
                    if cfg.save_every and step % cfg.save_every == 0:
                        checkpoint(step, *done)
                    stop.check()
                if status == "cancelled":
                    break
                epoch_end = (rows_logged, len(sample_log))
                after = validate(step, float(epoch + 1), elapsed_tokens)
                if after:
                    bar.note(f"epoch {epoch + 1}: validation loss {after['loss']:.3f}, perplexity {after['perplexity']:.2f}")
                    if best is None or after["loss"] < best["validation_loss"]:
                        best = {"step": step, "validation_loss": after["loss"]}
                        weights, _ = procs.gather(model, opt)  # under FSDP, on every rank
                        if procs.is_main:
                            save_best(run, model, cfg, best, weights)
                stop.check()
                samples_now = []
                if samples and prompts:
                    with eager_layers(model):
                        samples_now = _write_samples(model, tok, prompts, cfg)
                    sample_log.append({"epoch": epoch + 1, "step": step, "samples": samples_now})
                    _save_samples(run, sample_log)
                if procs.is_main:
                    watch.epoch_end(step, float(epoch + 1), samples_now, log, emit)
                stop.check()
                epoch_end, done = None, (epoch + 1, 0)
                checkpoint(step, *done)
                stop.check()
    except KeyboardInterrupt:
        bar.close()
        if not busy and not stop.hard:  # otherwise the last checkpoint on disk stands
            checkpoint(step, *done)
        if not procs.is_main:
            raise
        run.set_status("interrupted", step=step)
        _finish(run, cfg, before, None, time.perf_counter() - started, elapsed_tokens)
        emit(TrainEvent("done", step, status="interrupted", path=str(run.path)))
        raise
    bar.close()
    if status == "cancelled":
        checkpoint(step, *done)
    seconds = time.perf_counter() - started
    if not procs.is_main:
        return
    final = after if status == "succeeded" else None  # a finished run ends with a validation
    watch.index()  # built now, `tunesmith copies` and `eval` start at once
    run.set_status(status, step=step)
    _finish(run, cfg, before, final, seconds, elapsed_tokens)
    emit(TrainEvent("done", step, status=status, path=str(run.path)))


class _DeferredInterrupt:
    """While training in the main thread, the first Ctrl-C asks for a stop at the next safe point
    (after the current step), so the checkpoint written on the way out is consistent; a second
    Ctrl-C stops at once and the newest checkpoint on disk stands. A caller's own SIGINT
    handler (the server's worker) is left alone."""

    def __init__(self):
        self.requested = False
        self.hard = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            self.hard = True
            raise KeyboardInterrupt
        self.requested = True
        sys.stderr.write("\nstopping after the current step (Ctrl-C again to stop at once)\n")

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt


def _weights_name(cfg: TrainConfig) -> str:
    return "adapter" if cfg.method == "lora" else "model"


def _sync_dir(path: Path) -> None:
    """Flush a directory's files and the directory itself to disk, so that once it is renamed
    into place it survives a power loss whole."""
    import os

    for item in sorted(path.rglob("*"), reverse=True):
        fd = os.open(item, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run: Run, model, opt, sched, cfg: TrainConfig, step: int, epoch: int, batch_in_epoch: int,
                    extra: dict | None = None, weights: dict | None = None, optimizer: dict | None = None) -> Path:
    """Write checkpoints/step-N (weights + everything an exact resume needs), then publish its
    weights as the run's current weights, and keep the newest ``cfg.keep_checkpoints``. Each
    directory appears whole or not at all, and is on disk before it appears. ``weights`` and
    ``optimizer``, where given, stand for the model's and optimizer's own (gathered from shards)."""
    import torch

    target = run.path / "checkpoints" / f"step-{step:06d}"
    weights_name = _weights_name(cfg)
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    with atomic_dir(target, overwrite=True) as tmp:
        model.save_pretrained(tmp / weights_name, **({} if weights is None else {"state_dict": weights}))
        torch.save(
            {
                "step": step,
                "epoch": epoch,
                "batch_in_epoch": batch_in_epoch,  # data position: batches of this epoch already done
                "optimizer": opt.state_dict() if optimizer is None else optimizer,
                "scheduler": sched.state_dict(),
                "rng": rng,
                **(extra or {}),
            },
            tmp / "trainer_state.pt",
        )
        _sync_dir(tmp)
    with atomic_dir(run.path / weights_name, overwrite=True) as tmp:
        shutil.copytree(target / weights_name, tmp, dirs_exist_ok=True)
        _sync_dir(tmp)
    for old in run.checkpoints()[: -cfg.keep_checkpoints]:
        shutil.rmtree(old["path"], ignore_errors=True)
    return target


def save_best(run: Run, model, cfg: TrainConfig, best: dict, weights: dict | None = None) -> None:
    """Publish the current weights (or ``weights``, gathered from shards) as best/ (the lowest
    validation loss so far), with best.json naming the step and the loss."""
    with atomic_dir(run.path / "best", overwrite=True) as tmp:
        model.save_pretrained(tmp / _weights_name(cfg), **({} if weights is None else {"state_dict": weights}))
        write_json(tmp / "best.json", best)
        _sync_dir(tmp)


def _load_weights(model, path: Path, cfg: TrainConfig) -> None:
    """Load saved trainable weights into ``model`` in place."""
    import torch
    from safetensors.torch import load_file

    if cfg.method == "lora":
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(str(path / "adapter_model.safetensors")))
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"unexpected adapter weights: {result.unexpected_keys[:3]}")
        return
    index = path / "model.safetensors.index.json"
    if index.exists():
        import json

        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        weights = {k: v for name in files for k, v in load_file(str(path / name)).items()}
    else:
        weights = load_file(str(path / "model.safetensors"))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise ValueError(f"weights do not fit the model (missing {list(missing)[:3]}, unexpected {unexpected[:3]})")
    with torch.no_grad():
        model.tie_weights()


def load_checkpoint(run: Run, cfg: TrainConfig, model, opt, sched, device: str, dtype: str, emit) -> dict | None:
    """Restore the newest readable checkpoint into ``model``, ``opt`` and ``sched`` and set the RNG
    states; returns its trainer state, or None when the run has no checkpoint."""
    import torch

    for ckpt in reversed(run.checkpoints()):
        path = Path(ckpt["path"])
        try:
            state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
            _load_weights(model, path / _weights_name(cfg), cfg)
        except Exception as err:  # a damaged checkpoint: an older one may still be whole
            emit(TrainEvent("info", message=f"skipping checkpoint {path.name}: {type(err).__name__}: {err}"))
            continue
        for key, now in (("device", device), ("dtype", dtype)):
            if state.get(key, now) != now:
                raise TunesmithError(
                    f"the checkpoint was trained with {key} {state[key]}, this machine gives {now}; "
                    "resuming there would not continue the same computation", file=path, field=key,
                )
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        rng = state["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        emit(TrainEvent("info", message=f"resuming from {path.name} (step {state['step']}, epoch {state['epoch']}, "
                                        f"{state['batch_in_epoch']} batches of it done)"))
        return state
    emit(TrainEvent("info", message="no checkpoint to resume from; training from the first step"))
    return None


def _keep_metric_rows(run: Run, count: int) -> None:
    """Keep the first ``count`` rows of metrics.jsonl: the rows a checkpoint knew of."""
    from .atomic import write_jsonl

    write_jsonl(run.path / "metrics.jsonl", run.metrics()[:count])


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
    import shlex

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
        f'tunesmith generate {shlex.quote(str(run.path))} "Once upon a time"',
        "```",
        "",
        "Files: `config.json` (reproduces the run), `metrics.jsonl`, `loss.png`, `samples.md`, "
        f"`{'adapter' if cfg.method == 'lora' else 'model'}/` (weights), `checkpoints/`, `data/`, `tokenizer/`.",
        "",
    ]
    return "\n".join(lines)


class _Progress:
    """A rich progress bar: step, loss, tokens/s, ETA."""

    def __init__(self, total: int, enabled: bool, done: int = 0):
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

        self.bar = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        )
        self.bar.start()
        self.task = self.bar.add_task("train", total=total, completed=done, loss="-", tps="-")

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
