"""`make bench`: tunesmith against what a user would write with plain Hugging Face, on this machine.

Every measurement runs in a child process of its own (``run.py --child KIND --spec JSON``), so
peak RSS is per configuration and nothing one run leaves behind (caches, threads, allocator
state) helps or hurts the next. Generation is the exception: both sides are loaded in one
child and timed in alternating rounds, because other work on a shared machine moves absolute
timings a lot more than it moves ratios. Results: bench/results/LATEST.md and LATEST.json.

    .venv/bin/python bench/run.py                 # everything, ~15 min on a 2-core laptop CPU
    .venv/bin/python bench/run.py --quick         # a few steps of each, to check it works
    .venv/bin/python bench/run.py --only train --steps 10
    python bench/run.py --device cuda --model DIR --corpus FILE --results DIR   # see bench/gpu.sh
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = ROOT.parent / "shared" / "corpora" / "sherlock.txt"
BLOCK, BATCH, LORA_R, LORA_ALPHA, LR, SEED = 512, 8, 16, 32, 1e-3, 0
GEN_TOKENS = 200
GEN_PROMPT = ("To Sherlock Holmes she is always the woman. I have seldom heard him mention her under any "
              "other name. In his eyes she eclipses and predominates the whole of her sex. It was not that")


# ----------------------------------------------------------------------------------------
# Children: each prints one JSON line, prefixed so stray library output cannot be mistaken for it

RESULT = "BENCH-RESULT "


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def bench_blocks(spec: dict, tokenizer):
    """The book, prepared and packed exactly as `tunesmith train` does, and the batch order of epoch 0."""
    import numpy as np

    from tunesmith.prepare import prepare
    from tunesmith.tokens import pack, tokenize_rows

    with tempfile.TemporaryDirectory() as tmp:
        prepared = prepare(spec["corpus"], out=Path(tmp) / "data", base=spec["model"], tokenizer=tokenizer,
                           block_size=BLOCK, seed=SEED, overwrite=True, estimate=False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    blocks = pack(*tokenize_rows(prepared.train, tokenizer), BLOCK, pad)
    order = np.random.default_rng(SEED).permutation(len(blocks))[: spec["steps"] * BATCH]
    if len(order) < spec["steps"] * BATCH:
        raise SystemExit(f"the corpus gives {len(blocks)} blocks, fewer than {spec['steps']} steps of {BATCH}")
    return blocks, order


def throughput(step_ends: list[float], start: float, warmup: int, tokens_per_step: int) -> dict:
    """Tokens/s over the steps after ``warmup`` (all steps when there are too few)."""
    first = warmup if len(step_ends) > warmup else 0
    t0 = step_ends[first - 1] if first else start
    timed = len(step_ends) - first
    seconds = step_ends[-1] - t0
    return {"tokens_per_second": timed * tokens_per_step / seconds, "timed_steps": timed,
            "seconds_per_step": seconds / timed, "train_seconds": step_ends[-1] - start}


def child_train_tunesmith(spec: dict) -> dict:
    import torch

    from tunesmith.train import TrainConfig, build_model, compile_layers, make_optimizer, train_step

    cfg = TrainConfig(base=spec["model"], batch_size=BATCH, block_size=BLOCK, lora_r=LORA_R, lora_alpha=LORA_ALPHA,
                      lr=LR, seed=SEED, max_steps=spec["steps"], micro_batch_size=spec.get("micro_batch"),
                      gradient_checkpointing=spec.get("checkpointing", False), device=spec["device"])
    t = time.perf_counter()
    torch.manual_seed(SEED)
    model, tok, device, compute = build_model(cfg)
    load_seconds, rss_after_load = time.perf_counter() - t, rss_mb()
    if spec.get("compile"):  # what `tunesmith train` does for runs of COMPILE_MIN_TOKENS or more
        compile_layers(model)
    blocks, order = bench_blocks(spec, tok)
    opt, sched = make_optimizer(model, cfg, spec["steps"])
    losses, ends = [], []
    start = time.perf_counter()
    for step in range(spec["steps"]):
        result = train_step(model, opt, sched, blocks, order[step * BATCH : (step + 1) * BATCH], cfg, device, compute)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        losses.append(result["loss"])
        ends.append(time.perf_counter())
    out = throughput(ends, start, spec["warmup"], BATCH * BLOCK)
    out["first_step_extra_seconds"] = (ends[0] - start) - out["seconds_per_step"]
    out.update(losses=losses, final_loss=losses[-1], load_seconds=load_seconds, rss_after_load_mb=rss_after_load,
               micro_batch=cfg.micro_batch, checkpointing=cfg.gradient_checkpointing, dtype=str(compute))
    if device.startswith("cuda"):
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def child_train_hf(spec: dict) -> dict:
    """The Trainer + peft LoRA script from the docs, with our data order and hyper-parameters so losses compare."""
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import SequentialSampler
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from tunesmith.models import resolve

    path = str(resolve(spec["model"]))
    t = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path)  # the docs' default: fp32
    torch.manual_seed(SEED)
    model = get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    load_seconds, rss_after_load = time.perf_counter() - t, rss_mb()
    blocks, order = bench_blocks(spec, tok)
    # Each example is a whole 513-token window, so the 512 targets are the ones tunesmith trains on.
    dataset = [{"input_ids": blocks.ids[i].tolist()} for i in order]

    class Timer(TrainerCallback):
        def __init__(self):
            self.ends, self.losses, self.start = [], [], None

        def on_train_begin(self, args, state, control, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available() and spec["device"].startswith("cuda"):
                torch.cuda.synchronize()
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
            output_dir=tmp, per_device_train_batch_size=BATCH, max_steps=spec["steps"], learning_rate=LR,
            lr_scheduler_type="cosine", warmup_steps=int(0.05 * spec["steps"]), weight_decay=0.0, seed=SEED,
            logging_steps=1, save_strategy="no", report_to=[], bf16=spec.get("bf16", False),
            use_cpu=spec["device"] == "cpu", disable_tqdm=True, dataloader_num_workers=0,
        )
        trainer = InOrder(model=model, args=args, train_dataset=dataset,
                          data_collator=DataCollatorForLanguageModeling(tok, mlm=False), callbacks=[timer])
        trainer.train()
    out = throughput(timer.ends, timer.start, spec["warmup"], BATCH * BLOCK)
    out.update(losses=timer.losses, final_loss=timer.losses[-1], load_seconds=load_seconds,
               rss_after_load_mb=rss_after_load, bf16=spec.get("bf16", False))
    if spec["device"].startswith("cuda"):
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def child_generate(spec: dict) -> dict:
    """tunesmith's generate and plain transformers' generate, alternating, in one process."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import tunesmith
    from tunesmith.models import resolve

    device = spec["device"]
    ours = tunesmith.load(spec["model"], device=device)
    path = str(resolve(spec["model"]))
    tok = AutoTokenizer.from_pretrained(path)
    theirs = AutoModelForCausalLM.from_pretrained(path).to(device).eval()  # default fp32
    prompt_ids = tok(GEN_PROMPT, return_tensors="pt").input_ids.to(device)
    mask = torch.ones_like(prompt_ids)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def hf(n: int, new: int):
        sample = dict(do_sample=True, temperature=0.8, top_p=1.0, top_k=0, num_return_sequences=n) if n > 1 else \
            dict(do_sample=False)
        t = time.perf_counter()
        with torch.inference_mode():
            out = theirs.generate(prompt_ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                  pad_token_id=tok.eos_token_id, **sample)
        sync()
        return out.shape[1] - prompt_ids.shape[1], time.perf_counter() - t

    def ts(n: int, new: int):
        kw = dict(temperature=0.8, seed=SEED, n=n) if n > 1 else dict(temperature=0)
        t = time.perf_counter()
        done = ours.generate(GEN_PROMPT, max_tokens=new, **kw)
        sync()
        return min(c.completion_tokens for c in done), time.perf_counter() - t, done[0].first_token_seconds

    rows = {key: [] for key in ("tunesmith_greedy", "hf_greedy", "tunesmith_n4", "hf_n4", "hf_first")}
    ts(1, 8), hf(1, 8)  # warm-up: allocator, kernels, tokenizer caches
    for _ in range(spec["rounds"]):
        rows["tunesmith_greedy"].append(ts(1, GEN_TOKENS))
        rows["hf_greedy"].append(hf(1, GEN_TOKENS))
        rows["hf_first"].append(hf(1, 1))
        rows["tunesmith_n4"].append(ts(4, GEN_TOKENS))
        rows["hf_n4"].append(hf(4, GEN_TOKENS))

    def best(runs, per_sequence=1):  # the fastest round: the one least disturbed by other work
        tokens, seconds = max(((r[0], r[1]) for r in runs), key=lambda r: r[0] / r[1])
        return {"tokens": tokens, "seconds": seconds, "tokens_per_second": tokens * per_sequence / seconds,
                "all_tokens_per_second": [r[0] * per_sequence / r[1] for r in runs]}

    out = {
        "tunesmith_greedy": best(rows["tunesmith_greedy"]),
        "hf_greedy": best(rows["hf_greedy"]),
        "tunesmith_n4": best(rows["tunesmith_n4"], 4),
        "hf_n4": best(rows["hf_n4"], 4),
        "tunesmith_first_token_seconds": min(r[2] for r in rows["tunesmith_greedy"]),
        "hf_first_token_seconds": min(r[1] for r in rows["hf_first"]),
        "tunesmith_dtype": str(ours.model.dtype),
        "prompt_tokens": int(prompt_ids.shape[1]),
    }
    return out


def child_load(spec: dict) -> dict:
    """tunesmith.load timed in a fresh process (imports not counted); cold means converting the GGUF first."""
    import tunesmith  # noqa: F401  (imports are not what we time)

    t = time.perf_counter()
    model = tunesmith.load(spec["model"], device=spec["device"])
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "rss_mb": rss_mb(), "dtype": str(model.model.dtype)}


def child_estimate(spec: dict) -> dict:
    from tunesmith.estimate import estimate_training, measure_throughput

    measure_throughput(spec["model"], block_size=BLOCK, batch_size=BATCH, device=spec["device"], refresh=True)
    est = estimate_training(spec["model"], spec["steps"] * BATCH * BLOCK, epochs=1, block_size=BLOCK,
                            batch_size=BATCH, valid_tokens=0, sample_prompts=0, device=spec["device"])
    return est


CHILDREN = {"train_tunesmith": child_train_tunesmith, "train_hf": child_train_hf, "generate": child_generate,
            "load": child_load, "estimate": child_estimate}


def run_child(kind: str, spec: dict, env: dict | None = None, timeout: float = 3600) -> dict:
    """Run one measurement in a fresh interpreter; return its result plus wall time and peak RSS."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--spec", json.dumps(spec)]
    t = time.perf_counter()
    load_before = os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=timeout,
                          cwd=ROOT)
    wall = time.perf_counter() - t
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        return {"error": f"{kind} exited with {proc.returncode}", "wall_seconds": wall}
    result = json.loads(lines[-1][len(RESULT):])
    result.update(wall_seconds=wall, load_average=[load_before, os.getloadavg()[0]])
    return result


# ----------------------------------------------------------------------------------------
# The machine


def machine() -> dict:
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
    if Path("/proc/meminfo").exists():
        info["memory_gb"] = round(int(Path("/proc/meminfo").read_text().split()[1]) / 2**20, 1)
    from tunesmith.device import setup_threads

    info["threads"] = setup_threads()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def memory_bandwidth_gbs() -> float:
    """Read bandwidth of a 512 MB sum: the ceiling for batch-1 decoding, which reads every weight per token."""
    import torch

    from tunesmith.device import setup_threads

    setup_threads()
    a = torch.ones(2**27)  # 512 MB of fp32
    a.sum()
    best = min(_timed(a.sum) for _ in range(5))
    return a.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def weight_bytes(model: str) -> dict:
    """Bytes read per decoded token at batch 1 (every parameter once, the tied embedding as lm_head)."""
    from safetensors import safe_open

    from tunesmith.models import resolve

    params = 0
    with safe_open(str(resolve(model) / "model.safetensors"), "pt") as f:
        for name in f.keys():
            params += _numel(f.get_slice(name).get_shape())
    return {"params": params, "fp32_mb": params * 4 / 1e6, "bf16_mb": params * 2 / 1e6}


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# ----------------------------------------------------------------------------------------
# The plan and the report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10, help="optimizer steps per training run (default 10)")
    ap.add_argument("--warmup", type=int, default=2, help="steps not timed (default 2)")
    ap.add_argument("--sweep-steps", type=int, default=5, help="steps per micro-batch/checkpointing sweep run")
    ap.add_argument("--rounds", type=int, default=3, help="alternating generation rounds (default 3)")
    ap.add_argument("--quick", action="store_true", help="3 steps, 1 round: checks that everything runs")
    ap.add_argument("--only", choices=["train", "sweep", "generate", "load", "estimate"], action="append",
                    help="run only these parts (repeatable)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--model", default="smollm2-135m", help="base model name or HF directory")
    ap.add_argument("--corpus", default=str(DEFAULT_CORPUS), help="training text (default: Sherlock Holmes)")
    ap.add_argument("--results", default=str(ROOT / "bench" / "results"), help="where LATEST.md/json go")
    ap.add_argument("--name", default="LATEST", help="file name stem of the results")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        sys.path.insert(0, str(ROOT / "src"))
        result = CHILDREN[args.child](json.loads(args.spec))
        result["peak_rss_mb"] = peak_rss_mb()
        print(RESULT + json.dumps(result), flush=True)
        return
    sys.path.insert(0, str(ROOT / "src"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.quick:
        args.steps, args.warmup, args.sweep_steps, args.rounds = 3, 1, 2, 1
    parts = set(args.only or ["train", "sweep", "generate", "load", "estimate"])
    if args.device == "cuda":
        parts.discard("load")  # the GGUF is not carried to the GPU machine
        parts.discard("estimate")
    base = {"model": args.model, "corpus": args.corpus, "device": args.device, "warmup": args.warmup}

    from tunesmith.models import resolve

    resolve(args.model)  # convert the bundled GGUF once, before anything is timed
    report: dict = {"machine": machine(), "config": {
        "model": args.model, "corpus": Path(args.corpus).name, "device": args.device, "block_size": BLOCK,
        "batch_size": BATCH, "lora_r": LORA_R, "lora_alpha": LORA_ALPHA, "lr": LR, "seed": SEED,
        "steps": args.steps, "warmup_steps": args.warmup, "sweep_steps": args.sweep_steps,
        "generation_tokens": GEN_TOKENS, "generation_rounds": args.rounds}, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if args.device == "cpu":
        report["machine"]["read_bandwidth_gbs"] = round(memory_bandwidth_gbs(), 1)
        report["weights"] = weight_bytes(args.model)
    say = lambda text: print(text, flush=True)  # noqa: E731

    if "train" in parts:
        train = report["train"] = {}
        runs = [("tunesmith", "train_tunesmith", {}), ("tunesmith_compiled", "train_tunesmith", {"compile": True}),
                ("hf_fp32", "train_hf", {"bf16": False}),
                ("hf_bf16", "train_hf", {"bf16": True})]
        for name, kind, extra in runs:
            say(f"train: {name}, {args.steps} steps ...")
            train[name] = run_child(kind, {**base, "steps": args.steps, **extra})
            say(f"  {_fmt_train(train[name])}")
    if "sweep" in parts:
        sweep = report["sweep"] = {}
        for checkpointing in (False, True):
            for micro in (1, 2, 4):
                name = f"micro{micro}" + ("+ckpt" if checkpointing else "")
                say(f"sweep: {name}, {args.sweep_steps} steps ...")
                sweep[name] = run_child("train_tunesmith", {**base, "steps": args.sweep_steps, "micro_batch": micro,
                                                            "checkpointing": checkpointing,
                                                            "warmup": min(args.warmup, args.sweep_steps - 1)})
                say(f"  {_fmt_train(sweep[name])}")
    if "estimate" in parts:
        say("estimate ...")
        report["estimate"] = run_child("estimate", {**base, "steps": args.steps})
    if "generate" in parts:
        say(f"generate: {args.rounds} alternating rounds ...")
        report["generate"] = run_child("generate", {**base, "rounds": args.rounds})
    if "load" in parts:
        say("load: cold (GGUF conversion into an empty TUNESMITH_HOME), then cached ...")
        with tempfile.TemporaryDirectory() as home:
            cold = run_child("load", base, env={"TUNESMITH_HOME": home})
        report["load"] = {"cold": cold, "cached": run_child("load", base)}
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    report["summary"] = summarise(report)

    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = render(report)
    (results / f"{args.name}.md").write_text(markdown)
    print("\n" + markdown)


def _fmt_train(r: dict) -> str:
    if "error" in r:
        return r["error"]
    return (f"{r['tokens_per_second']:.0f} tok/s, peak RSS {r['peak_rss_mb']:.0f} MB, final loss {r['final_loss']:.4f}, "
            f"load avg {r['load_average'][0]:.1f}")


def _ratio(a, b):
    return round(a / b, 2) if a and b else None


def summarise(report: dict) -> dict:
    """The ratios the targets are stated in, and whether each target is met."""
    s: dict = {}
    train = report.get("train", {})
    ts, fp32, bf16 = (train.get(k, {}) for k in ("tunesmith", "hf_fp32", "hf_bf16"))
    compiled = train.get("tunesmith_compiled", {})
    if "tokens_per_second" in compiled:
        for name, other in (("fp32", fp32), ("bf16", bf16)):
            if "tokens_per_second" in other:
                s[f"train_compiled_speed_vs_hf_{name}"] = _ratio(compiled["tokens_per_second"], other["tokens_per_second"])
        s["compile_seconds"] = round(compiled["first_step_extra_seconds"], 1)
    if "tokens_per_second" in ts:
        for name, other in (("fp32", fp32), ("bf16", bf16)):
            if "tokens_per_second" in other:
                s[f"train_speed_vs_hf_{name}"] = _ratio(ts["tokens_per_second"], other["tokens_per_second"])
                s[f"train_rss_vs_hf_{name}"] = _ratio(ts["peak_rss_mb"], other["peak_rss_mb"])
                s[f"final_loss_diff_vs_hf_{name}"] = round(ts["final_loss"] / other["final_loss"] - 1, 4)
        s["targets"] = {
            "train >= 2.0x HF default (fp32)": (s.get("train_speed_vs_hf_fp32") or 0) >= 2.0,
            "train >= 1.3x HF best (bf16)": (s.get("train_speed_vs_hf_bf16") or 0) >= 1.3,
            "peak RSS <= 3 GB": ts["peak_rss_mb"] <= 3072,
            "final loss within 2% of HF fp32": abs(s.get("final_loss_diff_vs_hf_fp32", 1)) <= 0.02,
        }
    gen = report.get("generate", {})
    if "hf_greedy" in gen:
        s["generate_greedy_vs_hf"] = _ratio(gen["tunesmith_greedy"]["tokens_per_second"], gen["hf_greedy"]["tokens_per_second"])
        s["generate_n4_vs_hf"] = _ratio(gen["tunesmith_n4"]["tokens_per_second"], gen["hf_n4"]["tokens_per_second"])
        s["first_token_vs_hf"] = _ratio(gen["tunesmith_first_token_seconds"], gen["hf_first_token_seconds"])
        s.setdefault("targets", {})["generate batch 1 >= 2.0x HF"] = (s["generate_greedy_vs_hf"] or 0) >= 2.0
        bw = report["machine"].get("read_bandwidth_gbs")
        if bw and "weights" in report:
            bytes_per_token = report["weights"]["bf16_mb"] if "bfloat16" in gen["tunesmith_dtype"] else report["weights"]["fp32_mb"]
            s["decode_bandwidth_bound_tok_s"] = round(bw * 1e3 / bytes_per_token, 1)
            s["decode_fraction_of_bound"] = round(gen["tunesmith_greedy"]["tokens_per_second"] / s["decode_bandwidth_bound_tok_s"], 2)
    est = report.get("estimate", {})
    if "seconds" in est and "train_seconds" in ts:
        measured = ts["train_seconds"] + ts["load_seconds"]
        s["estimate_vs_measured"] = _ratio(est["seconds"], measured)
        s.setdefault("targets", {})["estimate within +-30%"] = abs(s["estimate_vs_measured"] - 1) <= 0.3
    load = report.get("load", {})
    if "seconds" in load.get("cold", {}) and "seconds" in load.get("cached", {}):
        s["load_cold_vs_cached"] = _ratio(load["cold"]["seconds"], load["cached"]["seconds"])
    return s


def render(report: dict) -> str:
    m, c, s = report["machine"], report["config"], report["summary"]
    out = [
        "# tunesmith benchmark",
        "",
        f"Run {report['started']} to {report['finished']} by `bench/run.py` (`make bench`).",
        "",
        "## Machine",
        "",
        f"- CPU: {m.get('cpu', '?')}, {m['cpus']} logical CPUs ({m['affinity']} usable), torch threads {m['threads']}, "
        f"{m.get('memory_gb', '?')} GB RAM" + (f", GPU: {m['gpu']}" if "gpu" in m else ""),
        f"- bf16 CPU flags: {', '.join(m['bf16_flags']) or 'none'}"
        + (f"; measured read bandwidth {m['read_bandwidth_gbs']} GB/s" if "read_bandwidth_gbs" in m else ""),
        f"- python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}"
        + (f", accelerate {m['accelerate']}" if "accelerate" in m else ""),
        "",
        "## Config",
        "",
        f"- model `{c['model']}` on {c['device']}; data `{c['corpus']}` (prepared and packed as `tunesmith train` does)",
        f"- block {c['block_size']}, batch {c['batch_size']} ({c['block_size'] * c['batch_size']} tokens/step), LoRA r={c['lora_r']} "
        f"alpha={c['lora_alpha']} on all linear layers, lr {c['lr']:g} cosine, seed {c['seed']}, same batches in the same order",
        f"- {c['steps']} optimizer steps per training run, tokens/s over the steps after the first {c['warmup_steps']}; "
        f"sweep runs {c['sweep_steps']} steps. (The issue asks for 30; the default of 10 keeps `make bench` near 15 min "
        "on 2 cores: pass `--steps 30` for the long version.)",
        f"- generation: {c['generation_tokens']} new tokens, {c['generation_rounds']} alternating rounds, best round reported",
        "",
        "Other work shares this machine, so absolute numbers move from run to run. Generation alternates both sides",
        "in one process; training runs are one subprocess each, back to back (load average at each start is in",
        "LATEST.json). Sweep rows time only the steps after warm-up, so few steps make them noisy.",
        "",
    ]
    train = report.get("train")
    if train:
        out += ["## Training", "", "| run | tokens/s | peak RSS MB | final loss | load s |", "| --- | ---: | ---: | ---: | ---: |"]
        labels = {"tunesmith": "tunesmith (bf16 base, fused loss)",
                  "tunesmith_compiled": "tunesmith, compiled layers (auto for runs of 100k+ tokens)",
                  "hf_fp32": "HF Trainer + peft, defaults (fp32)",
                  "hf_bf16": "HF Trainer + peft, `bf16=True`"}
        for key, label in labels.items():
            r = train.get(key, {})
            if "error" in r or not r:
                out.append(f"| {label} | {r.get('error', 'not run')} | | | |")
                continue
            out.append(f"| {label} | {r['tokens_per_second']:.0f} | {r['peak_rss_mb']:.0f} | {r['final_loss']:.4f} | {r['load_seconds']:.1f} |")
        out += [""]
        for key in ("train_speed_vs_hf_fp32", "train_speed_vs_hf_bf16", "train_compiled_speed_vs_hf_fp32",
                    "train_compiled_speed_vs_hf_bf16", "compile_seconds", "train_rss_vs_hf_fp32",
                    "final_loss_diff_vs_hf_fp32", "final_loss_diff_vs_hf_bf16"):
            if key in s:
                out.append(f"- {key.replace('_', ' ')}: **{s[key]}**")
        out += [""]
    sweep = report.get("sweep")
    if sweep:
        out += ["### tunesmith micro-batch and gradient checkpointing", "",
                "| config | tokens/s | peak RSS MB | RSS after load MB |", "| --- | ---: | ---: | ---: |"]
        for name, r in sweep.items():
            if "error" in r:
                out.append(f"| {name} | {r['error']} | | |")
            else:
                out.append(f"| {name} | {r['tokens_per_second']:.0f} | {r['peak_rss_mb']:.0f} | {r['rss_after_load_mb']:.0f} |")
        out += [""]
    gen = report.get("generate")
    if gen and "hf_greedy" in gen:
        out += ["## Generation", "", f"Prompt of {gen['prompt_tokens']} tokens; tunesmith in {gen['tunesmith_dtype']}, "
                "transformers `model.generate()` in its default fp32.", "",
                "| run | tokens/s | all rounds |", "| --- | ---: | --- |"]
        for key, label in (("tunesmith_greedy", "tunesmith greedy, batch 1"), ("hf_greedy", "transformers greedy, batch 1"),
                           ("tunesmith_n4", "tunesmith sampling n=4 (total tokens)"), ("hf_n4", "transformers sampling n=4")):
            r = gen[key]
            out.append(f"| {label} | {r['tokens_per_second']:.1f} | {', '.join(f'{v:.1f}' for v in r['all_tokens_per_second'])} |")
        out += ["", f"- time to first token: tunesmith {gen['tunesmith_first_token_seconds'] * 1e3:.0f} ms, "
                f"transformers {gen['hf_first_token_seconds'] * 1e3:.0f} ms",
                f"- greedy speed vs transformers: **{s.get('generate_greedy_vs_hf')}x**; n=4: **{s.get('generate_n4_vs_hf')}x**"]
        if "decode_bandwidth_bound_tok_s" in s:
            out.append(f"- memory-bandwidth bound at batch 1 ({report['weights']['params'] / 1e6:.0f}M weights read per token at "
                       f"{m['read_bandwidth_gbs']} GB/s): {s['decode_bandwidth_bound_tok_s']} tok/s; tunesmith reaches "
                       f"{s['decode_fraction_of_bound']:.0%} of it")
        out += [""]
    load = report.get("load")
    if load:
        out += ["## Load", ""]
        for key in ("cold", "cached"):
            r = load.get(key, {})
            out.append(f"- {key}: " + (f"{r['seconds']:.1f} s, RSS {r['rss_mb']:.0f} MB" if "seconds" in r else r.get("error", "?")))
        out += [""]
    est = report.get("estimate")
    if est and "seconds" in est:
        out += ["## Training-time estimate", "",
                f"- `estimate_training` said {est['seconds']:.0f} s ({est['tokens_per_second']:.0f} tok/s, {est['basis']}); "
                f"measured load + {c['steps']} steps: {train['tunesmith']['train_seconds'] + train['tunesmith']['load_seconds']:.0f} s; "
                f"ratio **{s.get('estimate_vs_measured')}**", ""]
    if s.get("targets"):
        out += ["## Targets", ""] + [f"- [{'x' if ok else ' '}] {name}" for name, ok in s["targets"].items()] + [""]
    notes = ROOT / "bench" / "NOTES.md"
    if notes.exists() and report["config"]["device"] == "cpu":
        out += [notes.read_text().rstrip(), ""]
    return "\n".join(out)


if __name__ == "__main__":
    main()
