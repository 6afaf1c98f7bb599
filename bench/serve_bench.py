"""The server under concurrent streaming clients: `tunesmith serve` (a child process, the real
bundled model) answers 1, 2, 4 and 8 clients that start together, each streaming one completion
of the same fixed length through /v1/completions.

Per round: aggregate tokens/s (every client's completion tokens over the wall time from the
first request to the last stream's end) and each client's first-token latency (request sent to
its first text). Every request bans the model's end-of-text tokens (OpenAI's ``logit_bias``,
-100), so each completion writes its full length and every client does the same work whatever
the round: otherwise some seeds end after a few tokens, and their clients must ask again (a new
request, a new prefill that holds the batch up) where the single client of the 1-client rounds
never did. Should a completion still end early, its client asks again at once (the next seed)
until it has its tokens; "completions per round" counts them. Rounds run interleaved (1, 2, 4,
8, 1, 2, 4, 8, ...). Targets (4 clients against 1): aggregate tokens/s >= 3x, and each
stream's first token within 2x of an idle server's.
The server is warmed first (model loaded, each batch size run once), so no round pays a load.

    .venv/bin/python bench/run.py --only serve_bench [--quick]
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = (1, 2, 4, 8)
PROMPTS = [  # fixed prompts, one per client (about 40 tokens each)
    "To Sherlock Holmes she is always the woman. I have seldom heard him mention her under any other name. "
    "In his eyes she eclipses and predominates the whole of her sex. It was not that",
    "The old lighthouse keeper climbed the stairs each evening and lit the lamp, and the ships that passed in "
    "the dark never knew his name. One winter night, when the storm",
    "Write a short story about a baker who discovers that the bread she bakes at midnight grants small wishes "
    "to whoever eats it. Begin with the first customer who",
    "The committee met on Tuesday to discuss the new library. The architect presented three plans, each with "
    "a reading room facing the river, and the mayor asked whether",
    "In the spring of that year the river flooded the lower town. The schoolmaster, who had seen two floods "
    "before, gathered the children on the hill and told them",
    "She opened the letter slowly, knowing already what it would say. Her brother had written from the "
    "coast, where the fishing boats had not gone out for a week because",
    "Explain to a curious child why the sky is blue and why sunsets are red, using an example from a walk "
    "along the beach at the end of a summer day when",
    "The train was late again, and the station master apologised to the three passengers on the platform: "
    "a soldier, a girl with a violin case, and an old man who",
]
TEMPERATURE, TOP_P = 0.8, 0.95


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _end_ids(model: str) -> list[int]:
    """The token ids that end ``model``'s text (its generation config's and tokenizer's eos, as
    tunesmith's Model reads them), from the machine's model cache; none if it is not there."""
    from tunesmith.home import models_dir

    folder = models_dir() / model
    if not (folder / "config.json").exists():
        return []
    from transformers import AutoTokenizer, GenerationConfig

    ids = set()
    try:
        eos = GenerationConfig.from_pretrained(folder).eos_token_id
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    except OSError:
        pass
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def _stream(client, model: str, prompt: str, tokens: int, seed: int, bias: dict) -> dict:
    """Stream completions of ``prompt`` until ``tokens`` completion tokens came back (one, unless
    a completion ends early); the first token's latency is the first stream's."""
    sent = time.perf_counter()
    first = None
    completion_tokens = streams = 0
    while completion_tokens < tokens:
        got = 0
        for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=tokens - completion_tokens,
                                               temperature=TEMPERATURE, top_p=TOP_P, seed=seed + 1000 * streams,
                                               logit_bias=bias or None, stream=True,
                                               stream_options={"include_usage": True}):
            if chunk.choices and chunk.choices[0].text and first is None:
                first = time.perf_counter()
            if chunk.usage:
                got = chunk.usage.completion_tokens
        streams += 1
        if got == 0:
            break  # nothing came back: count what there is rather than ask forever
        completion_tokens += got
    end = time.perf_counter()
    return {"sent": sent, "first": (first or end) - sent, "end": end, "tokens": completion_tokens, "streams": streams}


def _round(client, model: str, clients: int, tokens: int, seed: int, bias: dict) -> dict:
    """``clients`` streams started together; their aggregate tokens/s and first-token latencies."""
    barrier = threading.Barrier(clients)
    results: list = [None] * clients
    errors: list = []

    def work(i: int) -> None:
        try:
            barrier.wait()
            results[i] = _stream(client, model, PROMPTS[i % len(PROMPTS)], tokens, seed + i, bias)
        except Exception as exc:  # noqa: BLE001 - reported with the round
            errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        return {"error": errors[0]}
    start = min(r["sent"] for r in results)
    wall = max(r["end"] for r in results) - start
    firsts = sorted(r["first"] for r in results)
    total = sum(r["tokens"] for r in results)
    return {"tokens": total, "streams": sum(r["streams"] for r in results), "wall_seconds": wall, "tokens_per_second": total / wall, "first_token": firsts,
            "first_p50": statistics.median(firsts), "first_p95": _percentile(firsts, 0.95)}


def _percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile (of 1, 2, 4 or 8 latencies: p95 is the largest)."""
    ranked = sorted(values)
    return ranked[min(len(ranked) - 1, max(0, int(round(q * len(ranked) + 0.5)) - 1))]


def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def run(ctx: dict) -> dict:
    import httpx
    import openai

    say = ctx["say"]
    quick = ctx["quick"]
    repeats = 1 if quick else max(3, ctx["repeats"])
    tokens = 48 if quick else 128
    model = ctx.get("model") or "smollm2-135m"
    from tunesmith.home import models_dir

    port = _free_port()
    home = Path(ctx["work"]) / "serve-home"  # the server's own state (jobs DB), the machine's models
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "models").exists():
        (home / "models").symlink_to(models_dir(), target_is_directory=True)
    env = {**os.environ, **ctx["env"], "PYTHONPATH": str(ROOT / "src"), "TUNESMITH_HOME": str(home)}
    ends = _end_ids(model)
    bias = {str(i): -100 for i in ends}  # every completion runs its full length (the module's docstring)
    log = Path(ctx["work"]) / "serve_bench.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "tunesmith.server", "serve", "--port", str(port),
                                   "--log-level", "warning", "--max-running", str(max(CLIENTS))],
                                  env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the server exited: {log.read_text()[-2000:]}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not start in 120 s")
            time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
        say(f"  warming the server ({model}: load, then each batch size once) ...")
        for clients in CLIENTS:
            _round(client, model, clients, 8, seed=1000, bias=bias)
        rounds: dict[int, list[dict]] = {c: [] for c in CLIENTS}
        for repeat in range(repeats):
            for clients in CLIENTS:
                result = _round(client, model, clients, tokens, seed=repeat * 100, bias=bias)
                rounds[clients].append(result)
                if "error" in result:
                    say(f"  {clients} client(s): {result['error']}")
                else:
                    say(f"  round {repeat + 1}/{repeats}, {clients} client(s): {result['tokens_per_second']:.1f} tok/s, "
                        f"first token p50 {result['first_p50'] * 1000:.0f} ms, p95 {result['first_p95'] * 1000:.0f} ms")
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    rows = {}
    for clients, results in rounds.items():
        ok = [r for r in results if "error" not in r]
        if not ok:
            rows[clients] = {"error": results[0]["error"] if results else "no rounds"}
            continue
        rows[clients] = {"tokens_per_second": _stats([r["tokens_per_second"] for r in ok]),
                         "first_p50": _stats([r["first_p50"] for r in ok]),
                         "first_p95": _stats([r["first_p95"] for r in ok]),
                         "tokens": _stats([r["tokens"] for r in ok]),
                         "streams": _stats([r["streams"] for r in ok])}
    result = {"model": model, "tokens_per_client": tokens, "repeats": repeats, "rows": {str(k): v for k, v in rows.items()},
              "temperature": TEMPERATURE, "top_p": TOP_P, "banned": ends}
    one, four = rows.get(1, {}), rows.get(4, {})
    if "tokens_per_second" in one and "tokens_per_second" in four:
        t1, t4 = one["tokens_per_second"], four["tokens_per_second"]
        result["throughput_ratio"] = {"median": t4["median"] / t1["median"], "worst": t4["min"] / t1["max"]}
        f1, f4 = one["first_p50"], four["first_p95"]
        result["first_token_ratio"] = {"median": f4["median"] / f1["median"], "worst": f4["max"] / f1["min"]}
    return result


def _fmt(s: dict, digits: int = 0, scale: float = 1.0) -> str:
    if not s:
        return "-"
    if s["n"] == 1:
        return f"{s['median'] * scale:.{digits}f}"
    return f"{s['median'] * scale:.{digits}f} ({s['min'] * scale:.{digits}f}-{s['max'] * scale:.{digits}f})"


def render(result: dict) -> str:
    if "error" in result:
        return f"## Server under concurrent clients\n\nfailed: {result['error']}\n"
    lines = [
        "## Server under concurrent clients",
        "",
        f"`tunesmith serve` with {result['model']}, each client streaming {result['tokens_per_client']} tokens "
        f"(temperature {result['temperature']}, top_p {result['top_p']}, a fixed prompt and seed each) through "
        f"/v1/completions; all clients start together; {result['repeats']} interleaved rounds, median (range). "
        f"Every request bans the end-of-text token(s) {result.get('banned') or 'of the model'} (`logit_bias` "
        "-100), so each completion writes its full length and every client does the same work in every round. "
        "A client whose completion still ends early would ask again at once (the next seed) until it has its "
        "tokens; completions per round counts them. Concurrent requests share one batched decoding loop.",
        "",
        "| clients | aggregate tokens/s | first token p50 (ms) | first token p95 (ms) | completions per round |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for clients, row in result["rows"].items():
        if "error" in row:
            lines.append(f"| {clients} | failed: {row['error']} | | | |")
            continue
        lines.append(f"| {clients} | {_fmt(row['tokens_per_second'], 1)} | {_fmt(row['first_p50'], 0, 1000)} | "
                     f"{_fmt(row['first_p95'], 0, 1000)} | {_fmt(row.get('streams', {}), 0)} |")
    lines.append("")
    if "throughput_ratio" in result:
        tr, fr = result["throughput_ratio"], result["first_token_ratio"]
        lines.append(f"- 4 clients' aggregate tokens/s against 1 client: {tr['median']:.2f}x (worse end "
                     f"{tr['worst']:.2f}x); target >= 3x: **{'met' if tr['worst'] >= 3 else 'unmet'}**")
        lines.append(f"- 4 clients' p95 first token against an idle server's: {fr['median']:.2f}x (worse end "
                     f"{fr['worst']:.2f}x); target <= 2x: **{'met' if fr['worst'] <= 2 else 'unmet'}**")
    return "\n".join(lines) + "\n"
