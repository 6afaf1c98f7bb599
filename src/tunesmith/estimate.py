"""How long will training take here? Measured on this machine, not guessed from a constant.

A short measurement (one warm-up and one timed micro-batch through the real training
step) gives tokens/s for a (base, method, block size, device, dtype) setting. It is cached
in ``$TUNESMITH_HOME/throughput.json`` so later estimates are instant.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path

from .atomic import write_json
from .home import home

EVAL_SPEEDUP = 3.0  # a forward pass costs about a third of forward + backward
SAMPLE_TOKENS_PER_SECOND = 30.0  # generation of samples.md, once per epoch


def _key(base: str, method: str, block_size: int, micro: int, device: str, dtype: str, compiled: bool) -> str:
    import torch

    return (f"{base}|{method}|{block_size}|{micro}|{device}|{dtype}|compile{int(compiled)}|torch{torch.__version__}"
            f"|threads{torch.get_num_threads()}|cpus{os.cpu_count()}")


def measure_throughput(base: str, *, block_size: int = 512, batch_size: int = 8, method: str = "lora",
                       dtype: str = "auto", device: str = "auto", compiled: bool = False, refresh: bool = False) -> dict:
    """Tokens/s of a training step here, for this setting (cached); with ``compiled``, also the
    one-off compile time (the warm-up step's extra time)."""
    import numpy as np

    from .device import pick_device, pick_dtype, setup_threads
    from .tokens import Blocks
    from .train import TrainConfig, build_model, compile_layers, make_optimizer, micro_batch_size, train_step

    setup_threads()
    cfg = TrainConfig(base=base, method=method, block_size=block_size, batch_size=batch_size, dtype=dtype, device=device)
    dev = pick_device(device)
    micro_n = micro_batch_size(cfg, dev)
    key = _key(base, method, block_size, micro_n, dev, str(pick_dtype(dev, dtype)), compiled)
    cache_path = home() / "throughput.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    if key in cache and not refresh:
        return cache[key]
    micro = TrainConfig(**{**cfg.__dict__, "batch_size": micro_n})
    model, tok, dev, compute = build_model(micro)
    if compiled:
        compile_layers(model)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, len(tok), size=(micro.batch_size, block_size + 1))
    blocks = Blocks(ids=ids, mask=np.ones_like(ids, dtype=bool))
    opt, sched = make_optimizer(model, micro, 10)
    idx = np.arange(micro.batch_size)
    start = time.perf_counter()
    train_step(model, opt, sched, blocks, idx, micro, dev, compute)  # warm-up (and compile)
    warmup = time.perf_counter() - start
    start = time.perf_counter()
    result = train_step(model, opt, sched, blocks, idx, micro, dev, compute)
    seconds = time.perf_counter() - start
    entry = {"tokens_per_second": result["tokens"] / seconds, "compile_seconds": max(0.0, warmup - seconds) if compiled else 0.0,
             "measured": time.time(), "basis": f"1 timed step of {result['tokens']} tokens on {dev}" + (", compiled" if compiled else "")}
    del model
    cache[key] = entry
    write_json(cache_path, cache)
    return entry


def estimate_training(base: str, tokens: int, *, epochs: int = 4, block_size: int = 512, batch_size: int = 8,
                      method: str = "lora", valid_tokens: int = 0, sample_prompts: int = 1, dtype: str = "auto",
                      device: str = "auto", compile: str = "auto") -> dict:
    """Seconds to train ``tokens`` for ``epochs`` here, with validation and samples each epoch."""
    from .device import pick_device
    from .train import TrainConfig, wants_compile

    blocks = max(1, math.ceil(tokens / block_size))
    train_tokens = blocks * block_size * epochs
    cfg = TrainConfig(base=base, method=method, block_size=block_size, batch_size=batch_size, dtype=dtype, device=device,
                      compile=compile)
    compiled = wants_compile(cfg, pick_device(device), train_tokens)
    speed = measure_throughput(base, block_size=block_size, batch_size=batch_size, method=method, dtype=dtype,
                               device=device, compiled=compiled)
    tps = speed["tokens_per_second"]
    seconds = train_tokens / tps + speed.get("compile_seconds", 0.0)
    seconds += valid_tokens * (epochs + 2) / (tps * EVAL_SPEEDUP)
    seconds += epochs * sample_prompts * 60 / SAMPLE_TOKENS_PER_SECOND
    seconds += 5  # loading the model and tokenizing
    return {"seconds": seconds, "tokens_per_second": tps, "basis": speed["basis"]}


def plan(data: str | Path, **options) -> dict:
    """What `tunesmith train DATA` would do: steps, tokens, estimated time. Trains nothing."""
    from .models import load_tokenizer
    from .prepare import load_prepared, prepare
    from .tokens import pack, tokenize_rows
    from .train import TrainConfig

    cfg = TrainConfig(**options)
    cfg.check()
    tok = load_tokenizer(cfg.base)
    path = Path(data)
    if path.is_dir():
        prepared = load_prepared(path)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            prepared = prepare(path, out=Path(tmp) / "data", base=cfg.base, tokenizer=tok, block_size=cfg.block_size,
                               valid_fraction=cfg.valid_fraction, seed=cfg.seed, overwrite=True, estimate=False)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    train = pack(*tokenize_rows(prepared.train, tok), cfg.block_size, pad)
    valid_tokens = len(pack(*tokenize_rows(prepared.valid, tok), cfg.block_size, pad)) * cfg.block_size if prepared.valid else 0
    steps = math.ceil(len(train) / cfg.batch_size) * cfg.epochs
    if cfg.max_steps:
        steps = min(steps, cfg.max_steps)
    tokens = len(train) * cfg.block_size
    est = estimate_training(cfg.base, tokens, epochs=cfg.epochs, block_size=cfg.block_size, batch_size=cfg.batch_size,
                            method=cfg.method, valid_tokens=valid_tokens, sample_prompts=len(cfg.sample_prompts) or 2,
                            dtype=cfg.dtype, device=cfg.device, compile=cfg.compile)
    if cfg.max_steps:
        est["seconds"] *= steps / (math.ceil(len(train) / cfg.batch_size) * cfg.epochs)
    return {
        "base": cfg.base,
        "method": cfg.method,
        "training blocks": f"{len(train)} x {cfg.block_size} tokens",
        "optimizer steps": steps,
        "tokens per epoch": f"{tokens:,}",
        "validation tokens": f"{valid_tokens:,}",
        "measured speed": f"{est['tokens_per_second']:.0f} tokens/s ({est['basis']})",
        "estimated time": _human(est["seconds"]),
        "estimated seconds": round(est["seconds"], 1),
    }


def _human(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
