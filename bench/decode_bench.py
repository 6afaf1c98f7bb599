"""Batch-1 decoding: tunesmith (bf16, int8) against llama.cpp and transformers, in fresh processes.

Every engine writes 200 new tokens after the same ~40-token prompt, greedy and sampled
(temperature 0.8, nothing else: no top-k/top-p/min-p, no repetition penalty), at batch 1, with
the bench's thread settings (2 threads). Each configuration is one child process (load, a short
warm-up, then the timed runs), and the configurations are repeated in interleaved order
(A B C ... A B C ...). Rows:

- tunesmith, default path (bf16 weights, eager fused decoder), and ``quant="int8"``;
- tunesmith with the compiled decoding step (``Model.warm``), its compile time measured with an
  empty inductor cache in the first repeat and with the cache warm afterwards;
- llama.cpp through llama-cpp-python on a bf16 GGUF of the same weights (written once by
  ``tunesmith export``), on q8_0 (same writer), and on the bundled Q4_1 file;
- ``transformers`` ``generate()`` with the model in bf16 and in fp32.

The bandwidth bound of a row is the measured copy bandwidth (read + write, as bench/run.py
measures it) over the bytes of weights that row reads per token.
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
RESULT = "DECODE-RESULT "
PROMPT = ("To Sherlock Holmes she is always the woman. I have seldom heard him mention her under any "
          "other name. In his eyes she eclipses and predominates the whole of her sex. It was not that")
TEMPERATURE, SEED = 0.8, 0

CONFIGS = {
    "ts_bf16": ("tunesmith, bf16 (default)", {"engine": "tunesmith", "quant": "none"}),
    "ts_int8": ("tunesmith, int8 weights (`--quant int8`)", {"engine": "tunesmith", "quant": "int8"}),
    "ts_bf16_compiled": ("tunesmith, bf16, compiled step (`warm()`)", {"engine": "tunesmith", "quant": "none",
                                                                        "compile": True}),
    "llama_bf16": ("llama.cpp, bf16 GGUF (same weights)", {"engine": "llama", "gguf": "bf16"}),
    "llama_q8_0": ("llama.cpp, q8_0 GGUF (same weights)", {"engine": "llama", "gguf": "q8_0"}),
    "llama_q4_1": ("llama.cpp, bundled Q4_1 GGUF", {"engine": "llama", "gguf": "bundled"}),
    "hf_bf16": ("transformers `generate()`, bf16", {"engine": "hf", "dtype": "bf16"}),
    "hf_fp32": ("transformers `generate()`, fp32", {"engine": "hf", "dtype": "fp32"}),
}
TARGETS = (("ts_bf16", "llama_bf16", "default decoding (bf16) >= 1.0x llama.cpp bf16"),
           ("ts_int8", "llama_q8_0", "int8 decoding >= 1.0x llama.cpp q8_0"))


# ----------------------------------------------------------------------------------------
# Children


def _timed_runs(generate, tokens: int, repeats: int) -> dict:
    """``generate(mode, tokens) -> (tokens written, first-token seconds or None)``, greedy and sampled, timed."""
    out: dict = {}
    for mode in ("greedy", "sampled"):
        rates, written = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            n, _ = generate(mode, tokens)
            seconds = time.perf_counter() - t
            rates.append(n / seconds)
            written.append(n)
        out[mode] = {"tokens_per_second": max(rates), "tokens": written[0]}
    t = time.perf_counter()
    _, first = generate("greedy", 1)
    out["first_token_seconds"] = first if first is not None else time.perf_counter() - t
    return out


def child_tunesmith(spec: dict) -> dict:
    import torch

    import tunesmith

    torch.set_num_threads(spec["threads"])
    t = time.perf_counter()
    model = tunesmith.load(spec["model"], quant=spec["quant"])
    out = {"load_seconds": time.perf_counter() - t, "dtype": str(model.model.dtype).replace("torch.", ""),
           "fused_decoder": model.decoder is not None, "prompt_tokens": model.count_tokens(PROMPT)}
    if spec.get("compile"):
        prompt_tokens = model.count_tokens(PROMPT)
        out["compile_seconds"] = model.warm(rows=1, positions=prompt_tokens + spec["tokens"])

    def generate(mode: str, tokens: int):
        kw = {"temperature": 0} if mode == "greedy" else {"temperature": TEMPERATURE, "seed": SEED}
        done = model.generate(PROMPT, max_tokens=tokens, **kw)[0]
        return done.completion_tokens, done.first_token_seconds

    generate("greedy", 8)  # warm-up: allocator, kernels
    out.update(_timed_runs(generate, spec["tokens"], spec["inner"]))
    out["weight_bytes_per_token"] = _tunesmith_bytes(model)
    out["threads"] = torch.get_num_threads()
    return out


def _tunesmith_bytes(model) -> int:
    """Bytes a decoding step reads: every weight but the input embedding (one row per token);
    a tied output head is the embedding matrix, read whole."""
    inner = model.model
    embed = inner.get_input_embeddings().weight
    seen, total = set(), 0
    for tensor in list(inner.parameters()) + list(inner.buffers()):
        key = tensor.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += tensor.untyped_storage().nbytes()
    head = inner.get_output_embeddings()
    tied = head is not None and getattr(head, "weight", None) is not None and \
        head.weight.untyped_storage().data_ptr() == embed.untyped_storage().data_ptr()
    if not tied:
        total -= embed.untyped_storage().nbytes()
    return total


def child_llama(spec: dict) -> dict:
    import llama_cpp

    low = llama_cpp.llama_cpp
    default = low.llama_model_default_params

    def as_stored():  # llama.cpp's AMX/AVX-512 weight repacking crashes on this CPU (see tests/test_export.py)
        params = default()
        params.use_extra_bufts = False
        return params

    low.llama_model_default_params = as_stored
    t = time.perf_counter()
    llm = llama_cpp.Llama(model_path=spec["path"], n_threads=spec["threads"], n_threads_batch=spec["threads"],
                          n_ctx=512, verbose=False, seed=SEED)
    out = {"load_seconds": time.perf_counter() - t}

    def generate(mode: str, tokens: int):
        llm.reset()  # no prompt reuse between runs: every run prefills
        kw = {"temperature": 0.0} if mode == "greedy" else {"temperature": TEMPERATURE, "seed": SEED}
        done = llm.create_completion(PROMPT, max_tokens=tokens, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0,
                                     repeat_penalty=1.0, **kw)
        return done["usage"]["completion_tokens"], None

    generate("greedy", 8)
    out.update(_timed_runs(generate, spec["tokens"], spec["inner"]))
    out["weight_bytes_per_token"] = _gguf_bytes(spec["path"])
    out["prompt_tokens"] = len(llm.tokenize(PROMPT.encode(), add_bos=False))
    return out


def _gguf_bytes(path: str) -> int:
    """Bytes of the weights a step reads from a GGUF: every tensor but the input embedding,
    which is read whole when it doubles as the output head (no ``output.weight``)."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(path).tensors}
    total = sum(tensors.values())
    if "output.weight" in tensors:
        total -= tensors.get("token_embd.weight", 0)
    return total


def child_hf(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.models import resolve

    torch.set_num_threads(spec["threads"])
    path = str(resolve(spec["model"]))
    t = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(path)
    dtype = torch.bfloat16 if spec["dtype"] == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    out = {"load_seconds": time.perf_counter() - t}
    ids = tok(PROMPT, return_tensors="pt", add_special_tokens=False).input_ids
    mask = torch.ones_like(ids)

    def generate(mode: str, tokens: int):
        kw = dict(do_sample=False) if mode == "greedy" else dict(do_sample=True, temperature=TEMPERATURE, top_k=0,
                                                                 top_p=1.0)
        torch.manual_seed(SEED)
        with torch.inference_mode():
            done = model.generate(ids, attention_mask=mask, max_new_tokens=tokens, pad_token_id=tok.eos_token_id, **kw)
        return int(done.shape[1] - ids.shape[1]), None

    generate("greedy", 8)
    out.update(_timed_runs(generate, spec["tokens"], spec["inner"]))
    out["weight_bytes_per_token"] = sum(p.numel() * p.element_size() for p in model.parameters()) - (
        0 if model.config.tie_word_embeddings else model.get_input_embeddings().weight.nbytes)
    return out


def child_bandwidth(spec: dict) -> dict:
    """Copy bandwidth (bytes read + written per second) of a 512 MB tensor, best of 5."""
    import torch

    torch.set_num_threads(spec["threads"])
    src = torch.ones(spec["mb"] * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(_time(lambda: dst.copy_(src)) for _ in range(5))
    return {"copy_gbs": 2 * src.numel() * 4 / best / 1e9, "mb": spec["mb"]}


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


CHILDREN = {"tunesmith": child_tunesmith, "llama": child_llama, "hf": child_hf, "bandwidth": child_bandwidth}


def _peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM): unlike getrusage's ru_maxrss, it does not carry the
    parent's peak across fork and exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(kind: str, spec: dict, env: dict, timeout: float = 900) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), kind, json.dumps(spec)]
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env}, timeout=timeout,
                              cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"{kind} ran past {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-2000:])
        return {"error": f"{kind} exited with {proc.returncode}"}
    result = json.loads(lines[-1][len(RESULT):])
    result["wall_seconds"] = time.perf_counter() - t
    return result


# ----------------------------------------------------------------------------------------
# The section


def _ggufs(ctx: dict) -> dict:
    """The GGUF files llama.cpp reads: bf16 and q8_0 written once by tunesmith's exporter, and the bundled Q4_1."""
    from tunesmith.export import export
    from tunesmith.models import BUNDLED, bundled_gguf_path

    work = Path(ctx["work"]) / "decode-gguf"
    work.mkdir(parents=True, exist_ok=True)
    out = {}
    for quant in ("bf16", "q8_0"):
        path = work / f"model-{quant}.gguf"
        if not path.exists():
            export(ctx["model"], format="gguf", out=path, quant=quant)
        out[quant] = str(path)
    spec = BUNDLED.get(ctx["model"]) if isinstance(BUNDLED, dict) else None
    bundled = bundled_gguf_path(spec) if spec is not None else None
    if bundled is not None:
        out["bundled"] = str(bundled)
    return out


def run(ctx: dict) -> dict:
    say = ctx["say"]
    threads = int(ctx["env"].get("OMP_NUM_THREADS", "2"))
    tokens = 16 if ctx["quick"] else 200
    repeats = 1 if ctx["quick"] else max(3, ctx["repeats"])
    base = {"model": ctx["model"], "threads": threads, "tokens": tokens, "inner": 1}
    t0 = time.perf_counter()
    say("decode_bench: GGUF files (bf16, q8_0 from tunesmith's exporter; the bundled Q4_1) ...")
    ggufs = _ggufs(ctx)
    configs = {k: v for k, v in CONFIGS.items() if v[1].get("gguf") in (None, *ggufs)
               and not (ctx["quick"] and v[1].get("compile"))}  # --quick: no compile (minutes on 2 cores)
    inductor = Path(ctx["work"]) / "decode-inductor"  # empty at the first compiled run: compile counted
    rows: dict[str, list] = {k: [] for k in configs}
    bandwidth = []
    for repeat in range(repeats):
        bandwidth.append(_child("bandwidth", {"threads": threads, "mb": 64 if ctx["quick"] else 512}, ctx["env"]))
        for key, (label, extra) in configs.items():
            spec = {**base, **extra}
            env = dict(ctx["env"])
            if extra["engine"] == "llama":
                spec["path"] = ggufs[extra["gguf"]]
            if extra.get("compile"):
                env["TORCHINDUCTOR_CACHE_DIR"] = str(inductor)
            say(f"  decode {repeat + 1}/{repeats}: {label} ...")
            result = _child(extra["engine"], spec, env)
            rows[key].append(result)
            if "error" in result:
                say(f"    {result['error']}")
            else:
                say(f"    greedy {result['greedy']['tokens_per_second']:.1f} tok/s, sampled "
                    f"{result['sampled']['tokens_per_second']:.1f} tok/s, peak RSS {result['peak_rss_mb']:.0f} MB")
    return {"rows": rows, "labels": {k: v[0] for k, v in configs.items()}, "bandwidth": bandwidth,
            "tokens": tokens, "repeats": repeats, "threads": threads, "quick": ctx["quick"],
            "ggufs": {k: Path(v).name for k, v in ggufs.items()}, "wall_seconds": time.perf_counter() - t0}


def _stats(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def _fmt(s, digits=1, scale=1.0) -> str:
    if not s:
        return "-"
    if s["n"] == 1:
        return f"{s['median'] * scale:.{digits}f}"
    return f"{s['median'] * scale:.{digits}f} ({s['min'] * scale:.{digits}f}-{s['max'] * scale:.{digits}f})"


def summarise(result: dict) -> dict:
    out: dict = {"rows": {}, "targets": {}}
    bw = _stats([b.get("copy_gbs") for b in result["bandwidth"] if "error" not in b])
    out["copy_gbs"] = bw
    for key, runs in result["rows"].items():
        ok = [r for r in runs if "error" not in r]
        if not ok:
            out["rows"][key] = {"error": "; ".join(sorted({r["error"] for r in runs}))}
            continue
        row = {mode: _stats([r[mode]["tokens_per_second"] for r in ok]) for mode in ("greedy", "sampled")}
        row["tokens"] = {mode: min(r[mode]["tokens"] for r in ok) for mode in ("greedy", "sampled")}
        row["first_token_seconds"] = _stats([r["first_token_seconds"] for r in ok])
        row["peak_rss_mb"] = _stats([r["peak_rss_mb"] for r in ok])
        row["bytes_per_token"] = ok[0]["weight_bytes_per_token"]
        if bw:
            row["bound"] = bw["median"] * 1e9 / row["bytes_per_token"]
            row["fraction_of_bound"] = row["greedy"]["median"] / row["bound"]
        if "compile_seconds" in ok[0]:
            row["compile_seconds"] = [r.get("compile_seconds") for r in ok]
        out["rows"][key] = row
    for ours, theirs, name in TARGETS:
        a, b = out["rows"].get(ours), out["rows"].get(theirs)
        if not a or not b or "error" in a or "error" in b:
            continue
        for mode in ("greedy", "sampled"):
            ratio = {"median": a[mode]["median"] / b[mode]["median"], "worst": a[mode]["min"] / b[mode]["max"]}
            out.setdefault("ratios", {})[f"{ours}/{theirs}/{mode}"] = ratio
        worst = min(out["ratios"][f"{ours}/{theirs}/{m}"]["worst"] for m in ("greedy", "sampled"))
        out["targets"][f"{name}, greedy and sampled (worse end)"] = worst >= 1.0
    return out


def render(result: dict) -> str:
    s = summarise(result)
    labels = result["labels"]
    n = result["repeats"]
    prompt = next((r["prompt_tokens"] for runs in result["rows"].values() for r in runs if "prompt_tokens" in r), None)
    lines = ["## Decoding, batch 1" + (" (--quick: the numbers mean nothing)" if result["quick"] else ""), "",
             f"{result['tokens']} new tokens after a {prompt or '~40'}-token prompt, batch 1, "
             f"{result['threads']} threads in every process; sampled = temperature {TEMPERATURE} only. Each row is a "
             f"fresh process per repeat, {n} interleaved repeat{'s' if n > 1 else ''}, median (min-max). "
             "llama.cpp through llama-cpp-python with its CPU weight repacking off (it crashes on this AMX CPU); "
             f"GGUF files: {', '.join(result['ggufs'].values())}.", ""]
    bw = s["copy_gbs"]
    lines += ["| engine | greedy tok/s | sampled tok/s | first token ms | MB read per token | bound tok/s | "
              "greedy of bound | peak RSS MB |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for key, label in labels.items():
        row = s["rows"].get(key)
        if not row or "error" in row:
            lines.append(f"| {label} | {row['error'] if row else 'no result'} | | | | | | |")
            continue
        bound = f"{row['bound']:.0f}" if "bound" in row else "-"
        frac = f"{row['fraction_of_bound']:.0%}" if "fraction_of_bound" in row else "-"
        lines.append(f"| {label} | {_fmt(row['greedy'])} | {_fmt(row['sampled'])} | "
                     f"{_fmt(row['first_token_seconds'], 0, 1e3)} | {row['bytes_per_token'] / 1e6:.0f} | {bound} | "
                     f"{frac} | {_fmt(row['peak_rss_mb'], 0)} |")
    lines.append("")
    if bw:
        lines.append(f"- bound = measured copy bandwidth ({_fmt(bw)} GB/s, read + write) / bytes of weights read "
                     "per token; a row above 100% is served partly from the CPU's large last-level cache")
    for key, r in s.get("ratios", {}).items():
        ours, theirs, mode = key.split("/")
        lines.append(f"- {labels[ours]} vs {labels[theirs]}, {mode}: **{r['median']:.2f}x** median, "
                     f"{r['worst']:.2f}x at the worse end")
    comp = s["rows"].get("ts_bf16_compiled", {})
    if comp.get("compile_seconds"):
        secs = comp["compile_seconds"]
        lines.append(f"- compiled step: {secs[0]:.0f} s to compile with an empty inductor cache (first repeat)"
                     + (f", {statistics.median(secs[1:]):.1f} s from the warm cache" if len(secs) > 1 else ""))
    short = [labels[k] for k, r in s["rows"].items() if "tokens" in r and min(r["tokens"].values()) < result["tokens"]]
    if short:
        lines.append(f"- stopped at EOS before {result['tokens']} tokens (tok/s counts what was written): "
                     + ", ".join(short))
    lines.append(f"- section wall time: {result['wall_seconds'] / 60:.1f} min")
    lines += ["", "Targets (worse end: our slowest repeat against the peer's fastest):", ""]
    lines += [f"- [{'x' if ok else ' '}] {name}" for name, ok in s["targets"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    kind, spec = sys.argv[1], json.loads(sys.argv[2])
    result = CHILDREN[kind](spec)
    result["peak_rss_mb"] = _peak_rss_mb()
    print(RESULT + json.dumps(result), flush=True)
