"""How long will training take here? Measured on this machine, not guessed from a constant.

A short calibration runs the training run's own pieces once: it loads the model, trains a
warm-up and two timed steps of one micro-batch, validates one micro-batch, writes one sample
as the run writes samples.md, saves a checkpoint and draws the loss plot. The timings are
cached in ``$TUNESMITH_HOME/throughput.json`` for the setting (base, method, block size,
micro-batch, device, dtype, compile, torch version, threads), so later estimates are instant.

``plan()`` then reads and packs the data with train's own code (its time is measured as it
goes) and counts what the run will do from its settings: blocks trained, validation passes,
samples and checkpoints. The estimate is the sum of those counts times the measured costs.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path

from .atomic import write_json
from .config import TrainConfig, with_overrides
from .home import home

CALIBRATION_FORMAT = 2  # part of the cache key: older entries lack fields this module reads
CALIBRATION_PROMPT = "It was a cold night, and the wind came down from the hills over the town"
CALIBRATION_SAMPLE_TOKENS = 16


def calibrate(cfg: TrainConfig, *, compiled: bool = False, refresh: bool = False) -> dict:
    """Seconds each piece of a run takes here, for ``cfg``'s setting (cached unless ``refresh``)."""
    import numpy as np
    import torch

    from .device import pick_device, pick_dtype, setup_threads
    from .rundir import RUN_FORMAT, Run
    from .tokens import Blocks
    from .train import (
        build_model,
        compile_layers,
        eager_layers,
        evaluate,
        make_optimizer,
        micro_batch_size,
        save_checkpoint,
        train_step,
    )

    setup_threads()
    dev = pick_device(cfg.device)
    micro_n = micro_batch_size(cfg, dev)
    key = (f"v{CALIBRATION_FORMAT}|{cfg.base}|{cfg.method}|{cfg.block_size}|{micro_n}|{dev}|{pick_dtype(dev, cfg.dtype)}"
           f"|compile{int(compiled)}|ckpt{int(cfg.gradient_checkpointing)}|torch{torch.__version__}"
           f"|threads{torch.get_num_threads()}|cpus{os.cpu_count()}")
    cache_path = home() / "throughput.json"
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache and not refresh:
        return cache[key]

    began = time.perf_counter()
    micro = TrainConfig(**{**cfg.__dict__, "batch_size": micro_n})
    start = time.perf_counter()
    model, tok, dev, compute = build_model(micro)
    load = time.perf_counter() - start
    if compiled:
        compile_layers(model)
    ids = np.random.default_rng(0).integers(0, len(tok), size=(micro_n, cfg.block_size + 1))
    blocks = Blocks(ids=ids, mask=np.ones_like(ids, dtype=bool))
    opt, sched = make_optimizer(model, micro, 10)
    idx = np.arange(micro_n)

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        if str(dev).startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def step() -> None:
        train_step(model, opt, sched, blocks, idx, micro, dev, compute)

    first = timed(step)  # warm-up: allocator, kernel selection and, compiled, the compile itself
    steady = min(timed(step) for _ in range(2))
    with eager_layers(model):  # validation and samples run the layers eagerly, as in train
        evaluate(model, blocks, micro, dev, compute)
        eval_seconds = min(timed(lambda: evaluate(model, blocks, micro, dev, compute)) for _ in range(2))
        prefill, per_token = _sample_timing(model, tok)
    with tempfile.TemporaryDirectory() as tmp:
        write_json(Path(tmp) / "config.json", {"tunesmith_run": RUN_FORMAT})
        checkpoint = timed(lambda: save_checkpoint(Run(tmp), model, opt, sched, micro, 1, 0, 1))
        finish = timed(lambda: _plot(Path(tmp)))
    entry = {
        "load_seconds": load,
        "micro_batch": micro_n,
        "block_seconds": steady / micro_n,
        "first_step_extra_seconds": max(0.0, first - steady),
        "compiled": compiled,
        "eval_block_seconds": eval_seconds / micro_n,
        "sample_prefill_seconds": prefill,
        "sample_token_seconds": per_token,
        "checkpoint_seconds": checkpoint,
        "finish_seconds": finish,
        "tokens_per_second": micro_n * cfg.block_size / steady,
        "calibration_seconds": time.perf_counter() - began,
        "measured": time.time(),
        "basis": f"measured on {dev}: 2 timed steps of {micro_n} x {cfg.block_size} tokens"
                 + (", compiled" if compiled else ""),
    }
    cache[key] = entry
    write_json(cache_path, cache)
    return entry


def _sample_timing(model, tok) -> tuple[float, float]:
    """Seconds to the first token and per later token of one sample, as train writes samples.md."""
    import torch

    from .generate import Model

    model.eval()
    try:
        wrapped = Model(model, tok, name="calibration")
        with torch.autocast(wrapped.device.type, dtype=torch.bfloat16, enabled=model.dtype == torch.bfloat16):
            wrapped.generate(CALIBRATION_PROMPT, max_tokens=2, temperature=0.8, top_p=0.95, seed=0)
            done = wrapped.generate(CALIBRATION_PROMPT, max_tokens=CALIBRATION_SAMPLE_TOKENS, temperature=0.8,
                                    top_p=0.95, seed=0)[0]
    finally:
        model.train()
    later = max(done.completion_tokens - 1, 1)
    return done.first_token_seconds, max(done.seconds - done.first_token_seconds, 0.0) / later


def _plot(tmp: Path) -> None:
    from .plot import plot_loss

    plot_loss([{"step": i, "training_loss": 3.0 - 0.01 * i} for i in range(50)], tmp / "loss.png")


def run_counts(cfg: TrainConfig, train_blocks: int, valid_blocks: int, prompts: int) -> dict:
    """What a run with ``cfg`` does on this many blocks, counted as train's loop does it."""
    steps_per_epoch = math.ceil(train_blocks / cfg.batch_size)
    steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        steps = min(steps, cfg.max_steps)
    epochs = math.ceil(steps / steps_per_epoch)  # epochs begun: each ends with validation, samples, checkpoint
    full, rest = divmod(steps, steps_per_epoch)
    return {
        "steps": steps,
        "epochs": epochs,
        "blocks_trained": full * train_blocks + min(rest * cfg.batch_size, train_blocks),
        "validation_passes": 1 + epochs if valid_blocks else 0,  # the base model, then after each epoch
        "valid_blocks": valid_blocks,
        "samples": epochs * prompts,
        "sample_tokens": cfg.sample_tokens,
        "checkpoints": epochs + (steps // cfg.save_every if cfg.save_every else 0),
    }


def seconds_from(cal: dict, counts: dict, data_seconds: float) -> dict:
    """The estimate in parts: measured costs (``cal``) times what the run does (``counts``)."""
    per_sample = cal["sample_prefill_seconds"] + max(counts["sample_tokens"] - 1, 0) * cal["sample_token_seconds"]
    parts = {
        "data": data_seconds,
        "load": cal["load_seconds"],
        "compile" if cal["compiled"] else "first step": cal["first_step_extra_seconds"],
        "training": counts["blocks_trained"] * cal["block_seconds"],
        "validation": counts["validation_passes"] * counts["valid_blocks"] * cal["eval_block_seconds"],
        "samples": counts["samples"] * per_sample,
        "checkpoints": counts["checkpoints"] * cal["checkpoint_seconds"],
        "finish": cal["finish_seconds"],
    }
    return {"seconds": sum(parts.values()), "parts": parts}


def _estimate(cfg: TrainConfig, train_blocks, valid_blocks, prompts: int, data_seconds: float) -> dict:
    from .device import pick_device
    from .train import wants_compile

    counts = run_counts(cfg, len(train_blocks), len(valid_blocks) if valid_blocks is not None else 0, prompts)
    compiled = wants_compile(cfg, pick_device(cfg.device), counts["steps"] * cfg.batch_size * cfg.block_size)
    cal = calibrate(cfg, compiled=compiled)
    return {"counts": counts, "calibration": cal, **seconds_from(cal, counts, data_seconds)}


def plan(data: str | Path, config: TrainConfig | None = None, *, validation: str | Path | None = None,
         **overrides) -> dict:
    """What `tunesmith train DATA` would do with ``config`` (and keyword overrides of its fields):
    steps, tokens, estimated time. Trains nothing."""
    from .models import load_tokenizer
    from .train import _default_prompts, load_data, pack_data

    cfg = with_overrides(config or TrainConfig(), overrides)
    cfg.check()
    start = time.perf_counter()
    tok = load_tokenizer(cfg.base)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = load_data(data, cfg, tok, Path(tmp) / "data", validation)
        train, valid = pack_data(prepared, tok, cfg.block_size)
        prompts = len(cfg.sample_prompts or _default_prompts(prepared))
        data_seconds = time.perf_counter() - start
    est = _estimate(cfg, train, valid, prompts, data_seconds)
    counts, cal = est["counts"], est["calibration"]
    return {
        "base": cfg.base,
        "method": cfg.method,
        "training blocks": f"{len(train)} x {cfg.block_size} tokens",
        "optimizer steps": counts["steps"],
        "epochs": counts["epochs"],
        "tokens per epoch": f"{len(train) * cfg.block_size:,}",
        "validation": f"{counts['validation_passes']} passes over {counts['valid_blocks']} blocks",
        "samples": f"{counts['samples']} of up to {cfg.sample_tokens} tokens",
        "checkpoints": counts["checkpoints"],
        "compiled layers": "yes" if cal["compiled"] else "no",
        "measured speed": f"{cal['tokens_per_second']:.0f} tokens/s ({cal['basis']})",
        "time parts": ", ".join(f"{name} {_human(sec)}" for name, sec in est["parts"].items()),
        "estimated time": _human(est["seconds"]),
        "estimated seconds": round(est["seconds"], 1),
    }


def report_estimate(prepared) -> dict:
    """The estimate for prepare's report: `tunesmith train` of this prepared data with its
    default settings. Pass it as ``prepare(..., estimate=report_estimate)``."""
    from .models import load_tokenizer
    from .train import _default_prompts, pack_data

    cfg = TrainConfig(base=prepared.report["base"], block_size=prepared.report["block_size"])
    start = time.perf_counter()
    tok = load_tokenizer(cfg.base)
    rows = {"train": prepared.train, "valid": prepared.valid, "report": prepared.report, "dir": prepared.dir}
    train, valid = pack_data(rows, tok, cfg.block_size)
    est = _estimate(cfg, train, valid, len(_default_prompts(rows)), time.perf_counter() - start)
    return {
        "seconds": round(est["seconds"], 1),
        "tokens_per_second": est["calibration"]["tokens_per_second"],
        "basis": f"{cfg.epochs} epochs at batch {cfg.batch_size}, `tunesmith train`'s defaults; "
                 f"{est['calibration']['basis']}",
        "parts": {name: round(sec, 1) for name, sec in est["parts"].items()},
    }


def _human(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
