"""`make bench`: tunesmith against what a competent user would write with Hugging Face, on this machine.

Every measurement runs in a child process of its own (``run.py --child KIND --spec JSON``), so
peak RSS is per configuration and nothing one run leaves behind helps or hurts the next. Each
configuration is repeated (``--repeats``, default 3) in interleaved order (A B C A B C ...), all
children pinned to the same thread count (OMP_NUM_THREADS, MKL_NUM_THREADS, torch.set_num_threads),
and every table reports the median and the min-max over the repeats. A ratio target counts as met
only when the worse end (our slowest repeat against their fastest) meets it. Nothing is pasted:
the matmul peaks, the copy bandwidth and the FLOPs per token are measured here too.
Results: bench/results/LATEST.md and LATEST.json.

    .venv/bin/python bench/run.py                 # everything, about 30 min on a 2-core CPU
    .venv/bin/python bench/run.py --quick         # every code path, tiny step counts, 1 repeat
    .venv/bin/python bench/run.py --only train --repeats 3
    python bench/run.py --device cuda --model DIR --corpus FILE --results DIR   # see bench/gpu.sh
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = ROOT.parent / "shared" / "corpora" / "sherlock.txt"
BLOCK, BATCH, LORA_R, LORA_ALPHA, LR, SEED = 512, 8, 16, 32, 1e-3, 0
GEN_PROMPT = ("To Sherlock Holmes she is always the woman. I have seldom heard him mention her under any "
              "other name. In his eyes she eclipses and predominates the whole of her sex. It was not that")
PARTS = ("peaks", "train", "generate", "estimate", "load")
# Sections in files of their own (bench/<name>.py), each with
#   run(ctx: dict) -> dict     ctx: quick, repeats, env (thread settings), work (a temp dir), model, say
#   render(result: dict) -> str   its markdown section, with its targets marked met or unmet
# They run after the parts above, in this order; `--only NAME` runs one of them alone.
SECTIONS: tuple[str, ...] = ("decode_bench", "serve_bench", "copies_bench", "classify_bench", "prepare_bench",
                             "ddp_bench")
# Batch-1 decoding is measured by the decode_bench section (fresh processes, llama.cpp included);
# the older in-process "generate" part runs only when asked for (`--only generate`).
DEFAULT_OFF = ("generate",)

# ----------------------------------------------------------------------------------------
# Children: each prints one JSON line, prefixed so stray library output cannot be mistaken for it

RESULT = "BENCH-RESULT "


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM). getrusage's ru_maxrss is not used: it carries the parent's
    peak across fork and exec, so every child would report at least the parent's."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def pin_threads(spec: dict) -> None:
    import torch

    torch.set_num_threads(spec["threads"])


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def load_blocks(spec: dict):
    """The packed training blocks in batch order and the validation blocks (written once by the parent)."""
    import numpy as np

    from tunesmith.tokens import Blocks

    data = np.load(spec["blocks"])
    order = data["order"][: spec["steps"] * BATCH]
    return (Blocks(ids=data["train_ids"], mask=data["train_mask"]), order,
            Blocks(ids=data["valid_ids"], mask=data["valid_mask"]))


def same_lora_init(model) -> None:
    """Both sides start from the same adapter: A uniform(+-1/sqrt(fan_in)) as peft draws it, B zero,
    from one seeded generator in parameter-name order (the names are the same on both sides)."""
    import torch

    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_A" in name:
                bound = 1 / math.sqrt(p.shape[1])
                p.copy_(torch.rand(p.shape, generator=gen).mul_(2 * bound).sub_(bound))
            elif "lora_B" in name:
                p.zero_()


def step_stats(start: float, ends: list[float], warmup: int, tokens_per_step: int) -> dict:
    """Steady-state tokens/s over the steps after ``warmup``; the first step's extra time (compile, warm-up)."""
    times = [b - a for a, b in zip([start] + ends[:-1], ends)]
    steady = times[warmup:] if len(times) > warmup else times
    per_step = statistics.median(steady)
    return {"step_seconds": times, "seconds_per_step": per_step, "tokens_per_second": tokens_per_step / per_step,
            "timed_steps": len(steady), "first_step_extra_seconds": max(0.0, times[0] - per_step),
            "train_seconds": ends[-1] - start}


def child_train_tunesmith(spec: dict) -> dict:
    import torch

    from tunesmith.train import (
        TrainConfig,
        build_model,
        compile_layers,
        eager_layers,
        evaluate,
        make_optimizer,
        micro_batch_size,
        train_step,
    )

    pin_threads(spec)
    cfg = TrainConfig(base=spec["model"], batch_size=BATCH, block_size=BLOCK, lora_r=LORA_R, lora_alpha=LORA_ALPHA,
                      lr=LR, seed=SEED, max_steps=spec["steps"], device=spec["device"])
    t = time.perf_counter()
    model, tok, device, compute = build_model(cfg)
    load_seconds, rss_after_load = time.perf_counter() - t, rss_mb()
    same_lora_init(model)
    if spec.get("compile"):  # what `tunesmith train --compile auto` does for long CPU runs
        compile_layers(model)
    blocks, order, valid = load_blocks(spec)
    with eager_layers(model):
        before = evaluate(model, valid, cfg, device, compute)  # the base model (LoRA B is zero)
    opt, sched = make_optimizer(model, cfg, spec["steps"])
    losses, ends = [], []
    start = time.perf_counter()
    for step in range(spec["steps"]):
        result = train_step(model, opt, sched, blocks, order[step * BATCH : (step + 1) * BATCH], cfg, device, compute)
        sync(device)
        losses.append(result["loss"])
        ends.append(time.perf_counter())
    out = step_stats(start, ends, spec["warmup"], BATCH * BLOCK)
    with eager_layers(model):
        scored = evaluate(model, valid, cfg, device, compute)
    out.update(losses=losses, final_loss=losses[-1], validation_loss=scored["loss"], validation_before=before["loss"],
               load_seconds=load_seconds,
               rss_after_load_mb=rss_after_load, micro_batch=micro_batch_size(cfg, device), dtype=str(compute),
               weights_dtype=str(next(p for p in model.parameters() if not p.requires_grad).dtype),
               attention=_attention(model), threads=torch.get_num_threads())
    if device.startswith("cuda"):
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _attention(model) -> str:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return str(getattr(inner.config, "_attn_implementation", None) or "eager")


def child_train_hf(spec: dict) -> dict:
    """Trainer + peft LoRA as the docs write it, configured per ``spec['variant']``; our blocks,
    labels (targets where our loss mask says so), batch order, LoRA init and hyper-parameters."""
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments, default_data_collator

    from tunesmith.models import resolve
    from tunesmith.train import TrainConfig, evaluate

    pin_threads(spec)
    variant, device = spec["variant"], spec["device"]
    bf16_weights = variant.startswith("best")
    micro = spec["micro_batch"] if bf16_weights else BATCH
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(resolve(spec["model"])),
                                                 dtype=torch.bfloat16 if bf16_weights else torch.float32)
    if bf16_weights:
        model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    load_seconds, rss_after_load = time.perf_counter() - t, rss_mb()
    same_lora_init(model)
    blocks, order, valid = load_blocks(spec)
    # Each example is one whole block of BLOCK + 1 tokens; the model shifts labels by one, so the
    # BLOCK targets are exactly tunesmith's, and masked ones (the padding of the last block) are -100.
    labels = torch.where(torch.from_numpy(blocks.mask), torch.from_numpy(blocks.ids), -100)
    dataset = [{"input_ids": torch.from_numpy(blocks.ids[i]), "labels": labels[i]} for i in order]

    class Timer(TrainerCallback):
        def __init__(self):
            self.ends, self.losses, self.start = [], [], None

        def on_train_begin(self, args, state, control, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            sync(device)
            self.ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    class InOrder(Trainer):  # the same batches as tunesmith, in the same order
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    timer = Timer()
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=micro, gradient_accumulation_steps=BATCH // micro,
            max_steps=spec["steps"], learning_rate=LR, lr_scheduler_type="cosine",
            warmup_steps=int(0.05 * spec["steps"]), weight_decay=0.0, max_grad_norm=1.0, seed=SEED,
            logging_steps=1, save_strategy="no", report_to=[], bf16=variant != "fp32", use_cpu=device == "cpu",
            disable_tqdm=True, dataloader_num_workers=0, torch_compile=variant == "best_compiled",
        )
        trainer = InOrder(model=model, args=args, train_dataset=dataset, data_collator=default_data_collator,
                          callbacks=[timer])
        trainer.train()
    out = step_stats(timer.start, timer.ends, spec["warmup"], BATCH * BLOCK)
    # Scored by the same function as tunesmith's rows, in the row's own compute dtype.
    compute = torch.bfloat16 if variant != "fp32" else torch.float32
    cfg = TrainConfig(base=spec["model"], batch_size=BATCH, block_size=BLOCK, micro_batch_size=micro, device=device)
    scored = evaluate(model, valid, cfg, torch.device(device), compute)
    out.update(losses=timer.losses, final_loss=timer.losses[-1], validation_loss=scored["loss"],
               load_seconds=load_seconds, rss_after_load_mb=rss_after_load, micro_batch=micro,
               gradient_accumulation=BATCH // micro, dtype=str(compute),
               weights_dtype=str(next(p for p in model.parameters() if not p.requires_grad).dtype),
               attention=_attention(model), use_cache=model.get_base_model().config.use_cache,
               torch_compile=variant == "best_compiled", threads=torch.get_num_threads())
    if device.startswith("cuda"):
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def child_generate(spec: dict) -> dict:
    """tunesmith's generate against transformers' generate with the model in fp32 and in bf16,
    greedy and sampled (n=4), all in one process, in interleaved rounds."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import tunesmith
    from tunesmith.models import resolve

    pin_threads(spec)
    device, new = spec["device"], spec["tokens"]
    ours = tunesmith.load(spec["model"], device=device)
    path = str(resolve(spec["model"]))
    tok = AutoTokenizer.from_pretrained(path)
    theirs = {name: AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
              for name, dtype in (("hf_fp32", torch.float32), ("hf_bf16", torch.bfloat16))}
    prompt_ids = tok(GEN_PROMPT, return_tensors="pt", add_special_tokens=False).input_ids.to(device)
    mask = torch.ones_like(prompt_ids)

    def hf(model, n: int, tokens: int):
        sample = dict(do_sample=True, temperature=0.8, top_p=1.0, top_k=0, num_return_sequences=n) if n > 1 else \
            dict(do_sample=False)
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(prompt_ids, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens,
                                 pad_token_id=tok.eos_token_id, **sample)
        sync(device)
        seconds = time.perf_counter() - t
        return {"tokens": n * (out.shape[1] - prompt_ids.shape[1]), "seconds": seconds}

    def ts(n: int, tokens: int):
        kw = dict(temperature=0.8, top_p=1.0, seed=SEED, n=n) if n > 1 else dict(temperature=0)
        t = time.perf_counter()
        done = ours.generate(GEN_PROMPT, max_tokens=tokens, **kw)
        sync(device)
        seconds = time.perf_counter() - t
        return {"tokens": sum(c.completion_tokens for c in done), "seconds": seconds,
                "first_token_seconds": done[0].first_token_seconds}

    runs = {"tunesmith_greedy": lambda: ts(1, new), "hf_fp32_greedy": lambda: hf(theirs["hf_fp32"], 1, new),
            "hf_bf16_greedy": lambda: hf(theirs["hf_bf16"], 1, new), "tunesmith_n4": lambda: ts(4, new),
            "hf_fp32_n4": lambda: hf(theirs["hf_fp32"], 4, new), "hf_bf16_n4": lambda: hf(theirs["hf_bf16"], 4, new),
            "hf_fp32_first": lambda: hf(theirs["hf_fp32"], 1, 1), "hf_bf16_first": lambda: hf(theirs["hf_bf16"], 1, 1)}
    ts(1, 8), hf(theirs["hf_fp32"], 1, 8), hf(theirs["hf_bf16"], 1, 8)  # warm-up: allocator, kernels, caches
    rows: dict[str, list] = {key: [] for key in runs}
    for _ in range(spec["repeats"]):
        for key, fn in runs.items():
            rows[key].append(fn())
    out = {key: {"tokens_per_second": [r["tokens"] / r["seconds"] for r in rs], "tokens": [r["tokens"] for r in rs]}
           for key, rs in rows.items() if not key.endswith("_first")}
    out["first_token_seconds"] = {"tunesmith": [r["first_token_seconds"] for r in rows["tunesmith_greedy"]],
                                  "hf_fp32": [r["seconds"] for r in rows["hf_fp32_first"]],
                                  "hf_bf16": [r["seconds"] for r in rows["hf_bf16_first"]]}
    out.update(tunesmith_dtype=str(ours.model.dtype), prompt_tokens=int(prompt_ids.shape[1]),
               attention={"tunesmith": _attention(ours.model), "hf": _attention(theirs["hf_fp32"])},
               threads=torch.get_num_threads())
    return out


def child_load(spec: dict) -> dict:
    """tunesmith.load timed in a fresh process (imports not counted); cold means converting the GGUF first."""
    import tunesmith  # noqa: F401  (imports are not what we time)

    pin_threads(spec)
    t = time.perf_counter()
    model = tunesmith.load(spec["model"], device=spec["device"])
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "rss_mb": rss_mb(), "dtype": str(model.model.dtype)}


def child_peaks(spec: dict) -> dict:
    """This machine's matmul peak (fp32, bf16), copy bandwidth, and the FLOPs per token of a
    tunesmith training step (forward + backward) and of a decoding step, counted by torch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from tunesmith.tokens import Blocks
    from tunesmith.train import TrainConfig, build_model, make_optimizer, train_step

    pin_threads(spec)
    device = spec["device"]
    out: dict = {"threads": torch.get_num_threads()}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        best = 0.0
        for n in spec["matmul_sizes"]:
            a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
            a @ b
            sync(device)
            t = time.perf_counter()
            a @ b
            sync(device)
            calls = max(1, int(0.2 / max(time.perf_counter() - t, 1e-6)))  # about 0.2 s per timing
            for _ in range(spec["matmul_repeats"]):
                t = time.perf_counter()
                for _ in range(calls):
                    a @ b
                sync(device)
                best = max(best, calls * 2 * n**3 / (time.perf_counter() - t) / 1e9)
        out[f"matmul_{name}_gflops"] = best
    src = torch.ones(spec["copy_mb"] * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds = []
    for _ in range(spec["matmul_repeats"]):
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        seconds.append(time.perf_counter() - t)
    out["copy_gbs"] = 2 * src.numel() * 4 / min(seconds) / 1e9  # bytes read + bytes written
    out["copy_mb"] = spec["copy_mb"]

    cfg = TrainConfig(base=spec["model"], batch_size=1, block_size=BLOCK, lora_r=LORA_R, lora_alpha=LORA_ALPHA,
                      device=device, micro_batch_size=1)
    model, tok, dev, compute = build_model(cfg)
    ids = torch.randint(0, len(tok), (1, BLOCK + 1)).numpy()
    blocks = Blocks(ids=ids, mask=ids >= 0)
    opt, sched = make_optimizer(model, cfg, 2)
    with FlopCounterMode(display=False) as counter:
        train_step(model, opt, sched, blocks, [0], cfg, dev, compute)
    out["train_flops_per_token"] = counter.get_total_flops() / BLOCK
    inner = model.get_base_model()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        inner(input_ids=torch.from_numpy(ids[:, :1]).to(dev))
    out["decode_flops_per_token"] = counter.get_total_flops()
    out["params"] = sum(p.numel() for p in inner.parameters())
    out["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return out


def child_estimate_plan(spec: dict) -> dict:
    """`tunesmith train DATA --dry-run` for each run length: the exact plan() path a user runs."""
    from tunesmith.estimate import plan

    pin_threads(spec)
    out = {}
    for name, options in spec["runs"].items():
        t = time.perf_counter()
        out[name] = {"plan": plan(spec["data"], **spec["common"], **options), "seconds": time.perf_counter() - t}
    return out


def child_estimate_run(spec: dict) -> dict:
    """`tunesmith train DATA` itself (the finetune() call the CLI makes), timed."""
    from tunesmith.train import finetune

    pin_threads(spec)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        run = finetune(spec["data"], out=Path(tmp) / "run", progress=False, **spec["common"], **spec["options"])
        seconds = time.perf_counter() - t
        status = run.status
    return {"seconds": seconds, "status": status}


CHILDREN = {"train_tunesmith": child_train_tunesmith, "train_hf": child_train_hf, "generate": child_generate,
            "load": child_load, "peaks": child_peaks, "estimate_plan": child_estimate_plan,
            "estimate_run": child_estimate_run}


def run_child(kind: str, spec: dict, env: dict, timeout: float = 3600) -> dict:
    """Run one measurement in a fresh interpreter; return its result plus wall time and peak RSS."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--spec", json.dumps(spec)]
    t = time.perf_counter()
    load_before = os.getloadavg()[0]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env}, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"{kind} ran past {timeout:.0f} s", "wall_seconds": time.perf_counter() - t}
    wall = time.perf_counter() - t
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        return {"error": f"{kind} exited with {proc.returncode}", "wall_seconds": wall}
    result = json.loads(lines[-1][len(RESULT):])
    result.update(wall_seconds=wall, load_average=[load_before, os.getloadavg()[0]])
    return result


# ----------------------------------------------------------------------------------------
# The machine and the data


def machine(device: str) -> dict:
    import numpy
    import peft
    import torch
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "numpy": numpy.__version__, "cpus": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0))}
    try:
        import accelerate

        info["accelerate"] = accelerate.__version__
    except ImportError:
        pass
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    for line in cpuinfo.splitlines():
        if line.startswith("model name"):
            info["cpu"] = line.split(":", 1)[1].strip()
            break
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    info["bf16_flags"] = sorted(f for f in flags if "bf16" in f or f.startswith("amx"))
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        info["memory_gb"] = round(pages / 2**30, 1)
    except (ValueError, OSError):
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def write_data(args, work: Path) -> dict:
    """Prepare and pack the corpus once, as `tunesmith train` does (book pieces joined), for every child."""
    import numpy as np

    from tunesmith.models import load_tokenizer
    from tunesmith.prepare import prepare
    from tunesmith.train import pack_data

    tok = load_tokenizer(args.model)
    prepared = prepare(args.corpus, out=work / "data", base=args.model, tokenizer=tok, block_size=BLOCK, seed=SEED,
                       overwrite=True)
    rows = {"train": prepared.train, "valid": prepared.valid, "report": prepared.report}
    train, valid = pack_data(rows, tok, BLOCK)
    order = np.random.default_rng(SEED).permutation(len(train))
    if len(order) < args.steps * BATCH:
        raise SystemExit(f"the corpus gives {len(train)} blocks, fewer than {args.steps} steps of {BATCH}")
    full = valid.mask[:, 1:].all(axis=1)  # whole blocks only, so every block weighs the same
    keep = np.flatnonzero(full)[: args.valid_blocks]
    np.savez(work / "blocks.npz", train_ids=train.ids, train_mask=train.mask, order=order,
             valid_ids=valid.ids[keep], valid_mask=valid.mask[keep])
    # A smaller prepared copy for the estimate check: a few steps per epoch.
    small = prepare(args.corpus, out=work / "small", base=args.model, tokenizer=tok, block_size=BLOCK, seed=SEED,
                    overwrite=True, max_tokens=args.estimate_tokens)
    return {"format": prepared.report["format"], "train_blocks": len(train), "valid_blocks": int(len(keep)),
            "small_train_examples": len(small.train), "small_valid_examples": len(small.valid)}


# ----------------------------------------------------------------------------------------
# Statistics


def stats(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def fmt(s: dict, digits: int = 0, scale: float = 1.0) -> str:
    if not s:
        return "-"
    med, lo, hi = s["median"] * scale, s["min"] * scale, s["max"] * scale
    if s["n"] == 1:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def ratio(ours: dict, theirs: dict, lower_is_better: bool = False) -> dict:
    """Median ratio and the worse end: our slowest repeat against their fastest."""
    if not ours or not theirs:
        return {}
    if lower_is_better:
        return {"median": theirs["median"] / ours["median"], "worst": theirs["min"] / ours["max"]}
    return {"median": ours["median"] / theirs["median"], "worst": ours["min"] / theirs["max"]}


# ----------------------------------------------------------------------------------------
# The run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5, help="optimizer steps per training run (default 5)")
    ap.add_argument("--warmup", type=int, default=1, help="steps before the steady-state timing (default 1)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats of each configuration (default 3)")
    ap.add_argument("--valid-blocks", type=int, default=8, help="held-out blocks scored after training (default 8)")
    ap.add_argument("--gen-tokens", type=int, default=200, help="new tokens per generation (default 200)")
    ap.add_argument("--estimate-tokens", type=int, default=16000,
                    help="tokens of the book used for the estimate check (default 16000)")
    ap.add_argument("--estimate-epochs", type=int, nargs=2, default=[1, 2],
                    help="the two run lengths of the estimate check, in epochs (default 1 2)")
    ap.add_argument("--hf-compile", choices=["on", "off"], default="off",
                    help="also time the Trainer with torch_compile=True (default off: see NOTES.md)")
    ap.add_argument("--configs", help="comma-separated training configurations to run (default: all)")
    ap.add_argument("--quick", action="store_true", help="every code path with tiny step counts and 1 repeat")
    ap.add_argument("--only", choices=PARTS + SECTIONS, action="append", help="run only these parts (repeatable)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--model", default="smollm2-135m", help="base model name or HF directory")
    ap.add_argument("--corpus", default=str(DEFAULT_CORPUS), help="training text (default: Sherlock Holmes)")
    ap.add_argument("--results", default=str(ROOT / "bench" / "results"), help="where LATEST.md/json go")
    ap.add_argument("--name", default="LATEST", help="file name stem of the results")
    ap.add_argument("--weights-note", default="", help="a line on the weights used (e.g. random), for the report")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT / "src"))
    if args.child:
        result = CHILDREN[args.child](json.loads(args.spec))
        result["peak_rss_mb"] = peak_rss_mb()
        print(RESULT + json.dumps(result), flush=True)
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.quick:
        args.steps, args.warmup, args.repeats, args.valid_blocks = 2, 1, 1, 2
        args.gen_tokens, args.estimate_tokens, args.estimate_epochs = 16, 5000, [1, 2]
    parts = set(args.only or [p for p in PARTS + SECTIONS if p not in DEFAULT_OFF])
    if args.device != "cpu":
        parts -= {"load", "estimate"}  # the GGUF is not carried to the GPU machine
    began = time.perf_counter()
    say = lambda text: print(f"[{time.perf_counter() - began:6.0f} s] {text}", flush=True)  # noqa: E731

    from tunesmith.device import setup_threads
    from tunesmith.models import resolve

    threads = setup_threads()
    # Every child, ours and theirs, runs with the same threads.
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    resolve(args.model)  # convert the bundled GGUF once, before anything is timed
    work = Path(tempfile.mkdtemp(prefix="tunesmith-bench-"))
    data = write_data(args, work)
    micro = _our_micro(args.device)
    base = {"model": args.model, "device": args.device, "threads": threads, "blocks": str(work / "blocks.npz")}
    report: dict = {"machine": {**machine(args.device), "threads": threads}, "config": {
        "model": args.model, "weights_note": args.weights_note, "corpus": Path(args.corpus).name,
        "device": args.device, "block_size": BLOCK, "batch_size": BATCH, "our_micro_batch": micro, "lora_r": LORA_R,
        "lora_alpha": LORA_ALPHA, "lr": LR, "seed": SEED, "steps": args.steps, "warmup_steps": args.warmup,
        "repeats": args.repeats, "valid_blocks": data["valid_blocks"], "generation_tokens": args.gen_tokens,
        "quick": args.quick, "data": data, "hf_compile": args.hf_compile},
        "started": time.strftime("%Y-%m-%d %H:%M:%S")}

    if "peaks" in parts:
        say("peaks: matmul fp32/bf16, copy bandwidth, FLOPs per token ...")
        sizes = [256, 512] if args.quick else [1024, 2048]
        report["peaks"] = run_child("peaks", {**base, "matmul_sizes": sizes, "matmul_repeats": 2 if args.quick else 5,
                                              "copy_mb": 64 if args.quick else 512}, env)
        say(f"  {_short(report['peaks'], ('matmul_fp32_gflops', 'matmul_bf16_gflops', 'copy_gbs'))}")
    if "train" in parts:
        configs = {"tunesmith": ("train_tunesmith", {}),
                   "tunesmith_compiled": ("train_tunesmith", {"compile": True}),
                   "hf_fp32": ("train_hf", {"variant": "fp32"}),
                   "hf_bf16": ("train_hf", {"variant": "bf16"}),
                   "hf_best": ("train_hf", {"variant": "best", "micro_batch": micro})}
        if args.hf_compile == "on":
            configs["hf_best_compiled"] = ("train_hf", {"variant": "best_compiled", "micro_batch": micro})
        if args.configs:
            configs = {k: v for k, v in configs.items() if k in args.configs.split(",")}
        train = report["train"] = {name: [] for name in configs}
        for repeat in range(args.repeats):
            for name, (kind, extra) in configs.items():
                say(f"train {repeat + 1}/{args.repeats}: {name}, {args.steps} steps ...")
                child_env = dict(env)
                if extra.get("compile") or extra.get("variant") == "best_compiled":
                    cache = tempfile.mkdtemp(prefix="inductor-", dir=work)  # an empty inductor cache: compile counted
                    child_env["TORCHINDUCTOR_CACHE_DIR"] = cache
                result = run_child(kind, {**base, "steps": args.steps, "warmup": args.warmup, **extra}, child_env)
                train[name].append(result)
                say(f"  {_short(result, ('tokens_per_second', 'first_step_extra_seconds', 'final_loss', 'validation_loss', 'peak_rss_mb'))}")
    if "generate" in parts:
        say(f"generate: {args.repeats} interleaved rounds of {args.gen_tokens} tokens ...")
        report["generate"] = run_child("generate", {**base, "repeats": args.repeats, "tokens": args.gen_tokens}, env)
    if "estimate" in parts:
        report["estimate"] = estimate_check(args, base, env, work, say)
    if "load" in parts:
        report["load"] = {"cold": [], "cached": []}
        for repeat in range(args.repeats):
            say(f"load {repeat + 1}/{args.repeats}: cold (GGUF conversion into an empty TUNESMITH_HOME), cached ...")
            with tempfile.TemporaryDirectory() as home:
                report["load"]["cold"].append(run_child("load", base, {**env, "TUNESMITH_HOME": home}))
            report["load"]["cached"].append(run_child("load", base, env))
    report["sections"] = {}
    for name in SECTIONS:
        if name in parts:
            say(f"{name}: ...")
            ctx = {"quick": args.quick, "repeats": args.repeats, "env": env, "work": work, "model": args.model,
                   "device": args.device, "say": say}
            try:
                report["sections"][name] = _section(name).run(ctx)
            except Exception as error:  # one section failing must not lose the others' figures
                report["sections"][name] = {"error": f"{type(error).__name__}: {error}"}
                say(f"  {name} failed: {error}")
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    report["wall_seconds"] = time.perf_counter() - began
    report["summary"] = summarise(report)

    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = render(report)
    (results / f"{args.name}.md").write_text(markdown)
    print("\n" + markdown)
    shutil.rmtree(work, ignore_errors=True)  # the packed data and the inductor caches


def _section(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _our_micro(device: str) -> int:
    from tunesmith.train import TrainConfig, micro_batch_size

    return micro_batch_size(TrainConfig(batch_size=BATCH, block_size=BLOCK), device)


def estimate_check(args, base: dict, env: dict, work: Path, say) -> dict:
    """plan() (what `--dry-run` prints) against the measured time of the same run, at two run lengths.
    A fresh TUNESMITH_HOME (sharing the model cache) makes plan() measure this machine anew."""
    home = work / "estimate-home"
    home.mkdir()
    from tunesmith.home import home as tunesmith_home

    (home / "models").symlink_to(tunesmith_home() / "models", target_is_directory=True)
    child_env = {**env, "TUNESMITH_HOME": str(home)}
    common = {"base": args.model, "block_size": BLOCK, "batch_size": BATCH, "seed": SEED, "device": args.device}
    runs = {f"{e} epoch" + ("s" if e > 1 else ""): {"epochs": e} for e in args.estimate_epochs}
    spec = {**base, "data": str(work / "small"), "common": common}
    say(f"estimate: plan() for {', '.join(runs)} (measures this machine first) ...")
    planned = run_child("estimate_plan", {**spec, "runs": runs}, child_env)
    out: dict = {"plan": planned, "runs": {}}
    for name, options in runs.items():
        say(f"estimate: `tunesmith train` for {name} ...")
        out["runs"][name] = run_child("estimate_run", {**spec, "options": options}, child_env)
        say(f"  {_short(out['runs'][name], ('seconds',))} against {planned.get(name, {}).get('plan', {}).get('estimated seconds')}")
    return out


def _short(result: dict, keys) -> str:
    if "error" in result:
        return result["error"]
    return ", ".join(f"{k} {result[k]:.4g}" for k in keys if isinstance(result.get(k), (int, float)))


def _ok(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "error" not in r]


def summarise(report: dict) -> dict:
    """Medians, ranges, ratios (median and worse end), and the targets."""
    s: dict = {"targets": {}}
    peaks = report.get("peaks", {})
    train = report.get("train", {})
    rows = {}
    for name, runs in train.items():
        ok = _ok(runs)
        if not ok:
            continue
        first = ok[0]
        rows[name] = {
            "tokens_per_second": stats([r["tokens_per_second"] for r in ok]),
            "peak_rss_mb": stats([r["peak_rss_mb"] for r in ok]),
            "first_step_extra_seconds": stats([r["first_step_extra_seconds"] for r in ok]),
            "final_loss": first["final_loss"], "validation_loss": first["validation_loss"],
            "validation_before": first.get("validation_before"),
            "losses": first["losses"], "dtype": first["dtype"], "weights_dtype": first["weights_dtype"],
            "micro_batch": first["micro_batch"], "attention": first["attention"], "repeats": len(ok),
            "loss_spread": max(r["validation_loss"] for r in ok) - min(r["validation_loss"] for r in ok),
        }
        if "train_flops_per_token" in peaks:
            peak = peaks["matmul_bf16_gflops"] if "bfloat16" in first["dtype"] else peaks["matmul_fp32_gflops"]
            gflops = rows[name]["tokens_per_second"]["median"] * peaks["train_flops_per_token"] / 1e9
            rows[name].update(gflops=gflops, fraction_of_peak=gflops / peak)
    s["train"] = rows
    hf = {k: v for k, v in rows.items() if k.startswith("hf_")}
    if "tunesmith" in rows and hf:
        best = max(hf, key=lambda k: hf[k]["tokens_per_second"]["median"])
        s["hf_best_baseline"] = best
        ours = rows["tunesmith"]["tokens_per_second"]
        for name in hf:
            s[f"train_vs_{name}"] = ratio(ours, hf[name]["tokens_per_second"])
        s["train_vs_best"] = ratio(ours, hf[best]["tokens_per_second"])
        s["targets"]["train >= 1.3x the best HF configuration (worse end)"] = s["train_vs_best"]["worst"] >= 1.3
        if "hf_fp32" in hf:
            s["targets"]["train >= 2.0x HF defaults, fp32 (worse end)"] = s["train_vs_hf_fp32"]["worst"] >= 2.0
        s["targets"]["peak RSS <= 3 GB (every repeat)"] = rows["tunesmith"]["peak_rss_mb"]["max"] <= 3072
        # The same objective: both losses against the drop of the held-out loss over the run.
        ours_row = rows["tunesmith"]
        s["loss"] = {}
        for name in hf:
            theirs = rows[name]
            drop = ours_row["validation_before"] - theirs["validation_loss"]
            entry = {
                "validation_before": ours_row["validation_before"],
                "validation_loss_drop": drop,
                "validation_loss_diff": ours_row["validation_loss"] - theirs["validation_loss"],
                "training_loss_diff": ours_row["final_loss"] - theirs["final_loss"],
                "first_step_loss_diff": ours_row["losses"][0] - theirs["losses"][0],
            }
            entry["validation_within"] = abs(entry["validation_loss_diff"]) / drop if drop > 0 else None
            entry["training_within"] = abs(entry["training_loss_diff"]) / drop if drop > 0 else None
            s["loss"][name] = entry
        ref = s["loss"][best]
        ok = ref["validation_within"] is not None and max(ref["validation_within"], ref["training_within"]) <= 0.005
        s["targets"][f"training and validation loss within 0.5% of the loss drop of {best}"] = ok
    if "tunesmith_compiled" in rows and "tunesmith" in rows:
        eager = rows["tunesmith"]["tokens_per_second"]["median"]
        compiled = rows["tunesmith_compiled"]["tokens_per_second"]["median"]
        compile_s = rows["tunesmith_compiled"]["first_step_extra_seconds"]["median"]
        from tunesmith.train import COMPILE_MIN_TOKENS

        tokens = COMPILE_MIN_TOKENS
        s["compile"] = {
            "compile_seconds": rows["tunesmith_compiled"]["first_step_extra_seconds"],
            "steady_speedup": compiled / eager,
            "auto_threshold_tokens": tokens,
            "end_to_end_seconds_eager": tokens / eager,
            "end_to_end_seconds_compiled": compile_s + tokens / compiled,
            "end_to_end_speedup": (tokens / eager) / (compile_s + tokens / compiled),
            "break_even_tokens": compile_s / (1 / eager - 1 / compiled) if compiled > eager else None,
        }
    gen = report.get("generate", {})
    if "tunesmith_greedy" in gen:
        g = {k: stats(v["tokens_per_second"]) for k, v in gen.items() if isinstance(v, dict) and "tokens_per_second" in v}
        s["generate"] = g
        for mode in ("greedy", "n4"):
            best = max(("hf_fp32", "hf_bf16"), key=lambda k: g[f"{k}_{mode}"]["median"])
            s[f"generate_{mode}_best_baseline"] = best
            s[f"generate_{mode}_vs_best"] = ratio(g[f"tunesmith_{mode}"], g[f"{best}_{mode}"])
        s["first_token_seconds"] = {k: stats(v) for k, v in gen["first_token_seconds"].items()}
        s["targets"]["generate batch 1 >= 2.0x the faster transformers dtype (worse end)"] = \
            s["generate_greedy_vs_best"]["worst"] >= 2.0
        if "copy_gbs" in peaks:
            bytes_per_token = peaks["params"] * (2 if "bfloat16" in gen["tunesmith_dtype"] else 4)
            bound = peaks["copy_gbs"] * 1e9 / bytes_per_token
            s["decode_bound_tokens_per_second"] = bound
            s["decode_fraction_of_bound"] = g["tunesmith_greedy"]["median"] / bound
    est = report.get("estimate", {})
    if est.get("runs"):
        s["estimate"] = {}
        for name, run in est["runs"].items():
            planned = est["plan"].get(name, {}).get("plan", {})
            if "seconds" in run and "estimated seconds" in planned:
                s["estimate"][name] = {"estimated": planned["estimated seconds"], "measured": run["seconds"],
                                       "ratio": planned["estimated seconds"] / run["seconds"]}
        if s["estimate"]:
            s["targets"]["estimate within +-20% at both run lengths"] = all(
                abs(e["ratio"] - 1) <= 0.2 for e in s["estimate"].values())
    load = report.get("load", {})
    if load:
        s["load"] = {k: stats([r["seconds"] for r in _ok(v)]) for k, v in load.items()}
    return s


LABELS = {
    "tunesmith": "tunesmith",
    "tunesmith_compiled": "tunesmith, compiled layers (empty inductor cache)",
    "hf_fp32": "HF Trainer + peft, defaults",
    "hf_bf16": "HF Trainer + peft, `bf16=True`",
    "hf_best": "HF Trainer + peft, bf16 weights, `bf16=True`, `use_cache=False`, grad. accumulation",
    "hf_best_compiled": "HF Trainer + peft, as above + `torch_compile=True` (empty inductor cache)",
}


def _dtype(row: dict) -> str:
    w, c = row["weights_dtype"].replace("torch.", ""), row["dtype"].replace("torch.", "")
    return f"{w} weights, {c} compute"


def _setup(report: dict) -> list[str]:
    """The training parts' setup (model, data, optimizer, repeats), shown when one of them ran."""
    c = report["config"]
    n = c["repeats"]
    return [
        "## Setup",
        "",
        f"- model `{c['model']}` on {c['device']}; data `{c['corpus']}` prepared and packed by tunesmith's own code "
        f"(book pieces joined by a paragraph break, as `tunesmith train` does): {c['data']['train_blocks']} blocks",
        f"- block {c['block_size']}, batch {c['batch_size']} ({c['block_size'] * c['batch_size']} tokens/step), LoRA r={c['lora_r']} "
        f"alpha={c['lora_alpha']} on all linear layers, the same initial adapter, AdamW (fused) lr {c['lr']:g} cosine, grad-norm clip 1, "
        "the same batches in the same order",
        f"- the Trainer's labels are our blocks with our loss mask (every target tunesmith trains on, EOS and paragraph "
        f"breaks included; each example is one block of {c['block_size'] + 1} tokens, the model shifts by one)",
        f"- {c['steps']} optimizer steps per training run; tokens/s is the median step after the first {c['warmup_steps']}; "
        f"validation loss: {c['valid_blocks']} held-out blocks scored after training by one function "
        "(`tunesmith.train.evaluate`) in each row's compute dtype",
        f"- each configuration run {n} time{'s' if n > 1 else ''}, interleaved (A B C A B C ...), each run in a fresh process; "
        "tables show median (min-max)",
        "",
        f"Reduced to fit `make bench` in 35 minutes on 2 cores: {c['steps']} training steps per run, "
        f"{c['valid_blocks']} validation blocks, {n} repeat{'s' if n > 1 else ''}, the estimate check on a small part of the book, "
        + ("the Trainer with `torch_compile=True` included. " if c["hf_compile"] == "on" else
           "the Trainer with `torch_compile=True` left out (see bench/NOTES.md). ")
        + "Pass `--steps`, `--repeats`, `--hf-compile on` for longer runs.",
        "",
    ]


def render(report: dict) -> str:
    m, c, s = report["machine"], report["config"], report["summary"]
    n = c["repeats"]
    out = [
        "# tunesmith benchmark" + (" (--quick: checks that every path runs; the numbers mean nothing)" if c["quick"] else ""),
        "",
        f"Run {report['started']} to {report['finished']} ({report['wall_seconds'] / 60:.1f} min) by `bench/run.py`. "
        f"Every figure below was measured in this run.",
        "",
        "## Machine",
        "",
        f"- CPU: {m.get('cpu', '?')}, {m['cpus']} logical CPUs ({m['affinity']} usable), {m.get('memory_gb', '?')} GB RAM"
        + (f"; GPU: {m['gpu']} (CUDA {m.get('cuda')})" if "gpu" in m else ""),
        f"- bf16 CPU flags: {', '.join(m['bf16_flags']) or 'none'}",
        f"- python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}"
        + (f", accelerate {m['accelerate']}" if "accelerate" in m else ""),
        f"- every process, both sides: {m['threads']} threads (OMP_NUM_THREADS, MKL_NUM_THREADS, torch.set_num_threads)",
    ]
    if c.get("weights_note"):
        out.append(f"- weights: {c['weights_note']}")
    peaks = report.get("peaks", {})
    if "copy_gbs" in peaks:
        out += [f"- measured peaks: matmul {peaks['matmul_fp32_gflops']:.0f} GFLOP/s fp32, "
                f"{peaks['matmul_bf16_gflops']:.0f} GFLOP/s bf16 (best square matmul); copy "
                f"{peaks['copy_gbs']:.1f} GB/s (read + write, {peaks['copy_mb']} MB)",
                f"- measured by torch's FLOP counter: {peaks['train_flops_per_token'] / 1e9:.3f} GFLOP per trained token "
                f"(LoRA forward + backward, block {c['block_size']}), {peaks['decode_flops_per_token'] / 1e9:.3f} GFLOP per "
                f"decoded token; {peaks['params'] / 1e6:.1f}M parameters, {peaks['trainable_params'] / 1e6:.2f}M trainable"]
    out.append("")
    if any(part in report for part in ("train", "generate", "estimate", "load")):  # what the training setup describes
        out += _setup(report)
    rows = s.get("train", {})
    if rows:
        out += ["## Training", "",
                "| run | dtype | micro-batch | attention | tokens/s | peak RSS MB | train loss | valid loss | GFLOP/s | of peak |",
                "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for key, label in LABELS.items():
            if key not in report["train"]:
                continue
            r = rows.get(key)
            if not r:
                errors = {x.get("error") for x in report["train"][key]}
                out.append(f"| {label} | | | | {'; '.join(sorted(map(str, errors)))} | | | | | |")
                continue
            accum = BATCH // r["micro_batch"]
            micro = f"{r['micro_batch']}" + (f" (x{accum} accumulated)" if accum > 1 else "")
            out.append(f"| {label} | {_dtype(r)} | {micro} | {r['attention']} | {fmt(r['tokens_per_second'])} | "
                       f"{fmt(r['peak_rss_mb'])} | {r['final_loss']:.4f} | {r['validation_loss']:.4f} | "
                       f"{r.get('gflops', 0):.0f} | {r.get('fraction_of_peak', 0):.0%} |")
        out += ["", "GFLOP/s = measured FLOPs per trained token x median tokens/s; \"of peak\" divides by the measured "
                "matmul peak of the row's compute dtype.", ""]
        if "hf_best_baseline" in s:
            best = s["hf_best_baseline"]
            out.append(f"- fastest HF configuration (the best baseline): **{LABELS[best]}**")
            for name in rows:
                if name.startswith("hf_"):
                    r = s[f"train_vs_{name}"]
                    out.append(f"- tunesmith vs {LABELS[name]}: **{r['median']:.2f}x** median, {r['worst']:.2f}x at the worse end")
        comp = s.get("compile")
        if comp:
            cs = comp["compile_seconds"]
            out += ["", "### Compiled layers, compile counted", "",
                    f"- compile time with an empty inductor cache: {fmt(cs, 1)} s (first step minus a steady step)",
                    f"- steady-state speed-up of a compiled step: {comp['steady_speedup']:.2f}x",
                    f"- end to end for {comp['auto_threshold_tokens']:,} tokens (where `--compile auto` turns it on), "
                    f"computed from the measured compile seconds and steady-state rates: eager "
                    f"{comp['end_to_end_seconds_eager']:.0f} s, compiled {comp['end_to_end_seconds_compiled']:.0f} s: "
                    f"**{comp['end_to_end_speedup']:.2f}x**"
                    + (" (compiling does not pay back at that length)" if comp["end_to_end_speedup"] < 1 else ""),
                    "- compiling pays back after " + (f"{comp['break_even_tokens']:,.0f} tokens" if comp["break_even_tokens"]
                                                      else "no run length (a compiled step is not faster)")]
        if s.get("loss"):
            out += ["", "### Same objective", "",
                    f"Training loss at step {c['steps']} and validation loss after training, tunesmith minus the Trainer; "
                    "\"within\" is the difference as a share of the drop in validation loss over the run (from "
                    f"{next(iter(s['loss'].values()))['validation_before']:.4f} for the base model; target: 0.5%). Runs are "
                    "deterministic: repeats give the same losses.", "",
                    "| against | step-1 loss diff | train loss diff | within | valid loss diff | within |",
                    "| --- | ---: | ---: | ---: | ---: | ---: |"]
            for name, e in s["loss"].items():
                w1 = f"{e['training_within']:.2%}" if e["training_within"] is not None else "-"
                w2 = f"{e['validation_within']:.2%}" if e["validation_within"] is not None else "-"
                out.append(f"| {LABELS[name]} | {e['first_step_loss_diff']:+.5f} | {e['training_loss_diff']:+.5f} | {w1} | "
                           f"{e['validation_loss_diff']:+.5f} | {w2} |")
        out += [""]
    gen = report.get("generate", {})
    if "generate" in s:
        g = s["generate"]
        ft = s["first_token_seconds"]
        out += ["## Generation", "",
                f"Prompt of {gen['prompt_tokens']} tokens, {c['generation_tokens']} new tokens, batch 1; sampled: n=4, "
                f"temperature 0.8, no top-p/top-k. tunesmith in {gen['tunesmith_dtype'].replace('torch.', '')} "
                f"(attention: {gen['attention']['tunesmith']}); transformers `generate()` with the model loaded in fp32 and in "
                f"bf16 (attention: {gen['attention']['hf']}). {n} interleaved round{'s' if n > 1 else ''} in one process.", "",
                "| run | tokens/s greedy | tokens/s n=4 (all sequences) | first token ms |", "| --- | ---: | ---: | ---: |"]
        for key, label in (("tunesmith", "tunesmith"), ("hf_fp32", "transformers, fp32"), ("hf_bf16", "transformers, bf16")):
            out.append(f"| {label} | {fmt(g[f'{key}_greedy'], 1)} | {fmt(g[f'{key}_n4'], 1)} | {fmt(ft[key], 0, 1e3)} |")
        out.append("")
        tokens = {k: v["tokens"] for k, v in gen.items() if isinstance(v, dict) and "tokens" in v}
        short = [k for k, v in tokens.items() if min(v) < c["generation_tokens"] * (4 if k.endswith("n4") else 1)]
        for mode, label in (("greedy", "greedy"), ("n4", "n=4")):
            r, best = s[f"generate_{mode}_vs_best"], s[f"generate_{mode}_best_baseline"]
            out.append(f"- {label} vs the faster transformers dtype ({best.replace('hf_', '')}): **{r['median']:.2f}x** "
                       f"median, {r['worst']:.2f}x at the worse end")
        if short:
            out.append(f"- stopped at EOS before {c['generation_tokens']} tokens (tokens/s counts what was generated): "
                       + ", ".join(short))
        if "decode_bound_tokens_per_second" in s:
            out.append(f"- memory-bandwidth bound at batch 1 (every weight read once per token at the measured copy "
                       f"bandwidth): {s['decode_bound_tokens_per_second']:.0f} tokens/s; tunesmith greedy reaches "
                       f"{s['decode_fraction_of_bound']:.0%} of it")
        out += [""]
    elif gen:
        out += ["## Generation", "", f"- {gen.get('error', 'no result')}", ""]
    est = s.get("estimate")
    if est:
        out += ["## Training-time estimate", "",
                "`tunesmith train DATA --dry-run` (`tunesmith.estimate.plan`, measuring this machine first in a fresh "
                "TUNESMITH_HOME) against the time of `finetune()` for the same run (imports not counted), on a "
                f"{report['config']['data']['small_train_examples']}-example part of the book:", "",
                "| run | estimated s | measured s | ratio |", "| --- | ---: | ---: | ---: |"]
        for name, e in est.items():
            out.append(f"| {name} | {e['estimated']:.0f} | {e['measured']:.0f} | {e['ratio']:.2f} |")
        out.append("")
        plans = report["estimate"]["plan"]
        for name in est:
            p = plans.get(name, {}).get("plan", {})
            if p.get("time parts"):
                out.append(f"- {name}: {p['optimizer steps']} steps, {p['validation']}, {p['samples']}; parts: {p['time parts']}")
        out += [""]
    if s.get("load"):
        out += ["## Load", "",
                f"- cold (the GGUF converted into an empty TUNESMITH_HOME, then loaded): {fmt(s['load'].get('cold'), 1)} s",
                f"- cached: {fmt(s['load'].get('cached'), 1)} s", ""]
    if s.get("targets"):
        out += ["## Targets", "", "A ratio target is met only if the worse end (our slowest repeat against the "
                "baseline's fastest) meets it.", ""]
        out += [f"- [{'x' if ok else ' '}] {name}" for name, ok in s["targets"].items()] + [""]
    for name, result in report.get("sections", {}).items():
        if "error" in result:
            out += [f"## {name}", "", f"Failed: {result['error']}", ""]
        else:
            out += [_section(name).render(result).rstrip(), ""]
    out += ["What the benchmark leaves out and why, and notes on decoding speed: bench/NOTES.md.", ""]
    return "\n".join(out)


if __name__ == "__main__":
    main()
