"""Data-parallel efficiency on the CPU: 2 processes of 1 thread (DDP over gloo, through accelerate's
launcher) against 1 process of 2 threads, the same global batch and steps of the real model.

Both use the same 2 cores, so the ideal is the same throughput; what DDP costs is the gradient
all-reduce, the per-rank overheads and smaller matrix products per thread. Little is expected on 2
cores: the point is that the same code runs on GPUs. Each run is a fresh child (the 2-process one
through ``accelerate launch``), A B A B ...; seconds per step come from metrics.jsonl, between the
first and the last step (the first step's warm-up left out).

Targets, judged at the worse end of the repeats: the 2-process run's losses agree with the
1-process run's (relative 2e-2 in bf16, 1e-4 in fp32: the ranks multiply smaller matrices and sum
gradients in another order); informational: 2 processes reach >= 0.8x the 1-process throughput.

    .venv/bin/python bench/run.py --quick --only ddp_bench --results /tmp/bench
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "corpora" / "sherlock.txt"
BLOCK, BATCH = 128, 8
EFFICIENCY_TARGET = 0.8
CHILD = """
import json, sys
import tunesmith
args = json.loads(sys.argv[1])
tunesmith.finetune(args["data"], out=args["out"], progress=False, samples=False, **args["options"])
"""


def _text(chars: int) -> str:
    if CORPUS.is_file():
        return CORPUS.read_text(encoding="utf-8-sig")[20_000 : 20_000 + chars]
    words = "the lamp burned low in the study while holmes leaned back and closed his eyes".split()
    return "\n\n".join(" ".join(words[(i + j) % len(words)] for j in range(60)) + "." for i in range(chars // 400))


def _run(kind: str, work: Path, data: Path, options: dict, env: dict, tag: str) -> dict:
    out = work / f"run-{tag}"
    script = work / "ddp_child.py"
    args = json.dumps({"data": str(data), "out": str(out), "options": options})
    if kind == "one_process_2_threads":
        command = [sys.executable, str(script), args]
        child_env = {**env, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
                   "--num_processes", "2", "--num_cpu_threads_per_process", "1", "--main_process_port", "0",
                   "--mixed_precision", "no", "--dynamo_backend", "no", str(script), args]
        child_env = {**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    started = time.perf_counter()
    done = subprocess.run(command, env=child_env, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{kind} failed: {done.stderr[-1500:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "training_loss" in r]
    per_step = (steps[-1]["elapsed_seconds"] - steps[0]["elapsed_seconds"]) / (len(steps) - 1)
    tokens_per_step = steps[-1]["elapsed_tokens"] / len(steps)
    return {"seconds_per_step": per_step, "tokens_per_second": tokens_per_step / per_step, "wall_seconds": wall,
            "losses": [r["training_loss"] for r in steps],
            "validation_loss": [r["validation_loss"] for r in rows if "validation_loss" in r][-1]}


def run(ctx: dict) -> dict:
    say, work = ctx["say"], Path(ctx["work"]) / "ddp"
    work.mkdir(parents=True, exist_ok=True)
    (work / "ddp_child.py").write_text(CHILD)
    steps = 3 if ctx["quick"] else 6
    repeats = max(1, ctx["repeats"]) if ctx["quick"] else max(3, ctx["repeats"])
    data = work / "book.txt"
    data.write_text(_text(BLOCK * BATCH * (steps + 2) * 5))  # ~4-5 characters a token: enough for the steps
    options = {"base": ctx["model"], "block_size": BLOCK, "batch_size": BATCH, "epochs": 1, "max_steps": steps,
               "valid_fraction": 0.02, "compile": "off", "device": "cpu", "seed": 0}
    env = {**os.environ, **ctx["env"], "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    kinds = ("one_process_2_threads", "two_processes_1_thread")
    results: dict = {kind: [] for kind in kinds}
    for repeat in range(repeats):
        for kind in kinds:
            say(f"ddp {repeat + 1}/{repeats}: {kind}, {steps} steps of {BATCH} x {BLOCK} tokens ...")
            result = _run(kind, work, data, options, env, f"{kind}-{repeat}")
            results[kind].append(result)
            say(f"  {result['seconds_per_step']:.2f} s/step, {result['tokens_per_second']:.0f} tokens/s")
    from tunesmith.device import pick_dtype

    dtype = str(pick_dtype("cpu", "auto")).replace("torch.", "")
    one, two = results["one_process_2_threads"], results["two_processes_1_thread"]
    ratios = [b["tokens_per_second"] / a["tokens_per_second"] for a, b in zip(one, two)]
    loss_gaps = [max(abs(x - y) / abs(y) for x, y in zip(b["losses"], a["losses"])) for a, b in zip(one, two)]
    return {"steps": steps, "repeats": repeats, "block_size": BLOCK, "batch_size": BATCH, "dtype": dtype,
            "model": ctx["model"], "runs": results, "throughput_ratio": ratios, "loss_relative_gap": loss_gaps,
            "loss_tolerance": 2e-2 if dtype == "bfloat16" else 1e-4}


def _median_range(values: list[float], fmt: str) -> str:
    return f"{format(statistics.median(values), fmt)} ({format(min(values), fmt)}–{format(max(values), fmt)})"


def render(result: dict) -> str:
    if "error" in result:
        return f"## Data-parallel training (2 CPU processes)\n\nfailed: {result['error']}\n"
    one, two = result["runs"]["one_process_2_threads"], result["runs"]["two_processes_1_thread"]
    ratio_worst, gap_worst = min(result["throughput_ratio"]), max(result["loss_relative_gap"])
    loss_met = gap_worst <= result["loss_tolerance"]
    speed_met = ratio_worst >= EFFICIENCY_TARGET
    lines = [
        "## Data-parallel training (2 CPU processes)",
        "",
        f"{result['model']}, LoRA, {result['dtype']}, {result['steps']} steps of a global batch of "
        f"{result['batch_size']} x {result['block_size']} tokens; 1 process with 2 threads against 2 processes "
        f"(DDP over gloo, accelerate's launcher) with 1 thread each, on the same 2 cores; {result['repeats']} "
        "interleaved repeats, median (range). Seconds per step between the first and last step.",
        "",
        "| run | s/step | tokens/s | wall s (incl. start) |",
        "|---|---|---|---|",
        f"| 1 process, 2 threads | {_median_range([r['seconds_per_step'] for r in one], '.2f')} | "
        f"{_median_range([r['tokens_per_second'] for r in one], '.0f')} | {_median_range([r['wall_seconds'] for r in one], '.0f')} |",
        f"| 2 processes, 1 thread each | {_median_range([r['seconds_per_step'] for r in two], '.2f')} | "
        f"{_median_range([r['tokens_per_second'] for r in two], '.0f')} | {_median_range([r['wall_seconds'] for r in two], '.0f')} |",
        "",
        f"- throughput of 2 processes / 1 process: {_median_range(result['throughput_ratio'], '.2f')}; "
        f"target >= {EFFICIENCY_TARGET} (informational; little is expected on 2 cores): "
        f"**{'met' if speed_met else 'unmet'}** (worst {ratio_worst:.2f})",
        f"- largest relative difference of a training loss: {gap_worst:.1e}; target <= {result['loss_tolerance']:.0e}: "
        f"**{'met' if loss_met else 'unmet'}**",
        "- not yet run on GPUs (NCCL); see docs/SCALING.md",
        "",
    ]
    return "\n".join(lines)
