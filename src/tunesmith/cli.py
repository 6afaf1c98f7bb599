"""The `tunesmith` command: a thin layer over the Python API, one command per function."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from .errors import TunesmithError
from .errors import reported as user_errors
from .models import DEFAULT_BASE

app = typer.Typer(
    help="Fine-tune a small language model on a text you love, then write in its style.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="Base models available on this machine.", no_args_is_help=True)
app.add_typer(models_app, name="models")
# Deprecation notices from the libraries are for us, not for the user.
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)
out = Console()
err = Console(stderr=True)


@models_app.command("list")
@user_errors
def models_list() -> None:
    """Show the base models you can fine-tune (nothing is downloaded)."""
    from rich.table import Table

    from .models import list_models

    table = Table("name", "params", "ready", "description", "source")
    for row in list_models():
        ready = "cached" if row["cached"] else ("yes" if row["available"] else "[red]no[/]")
        table.add_row(row["name"], row["params"], ready, row["description"], row["source"])
    out.print(table)


@app.command()
@user_errors
def prepare(
    file: Path = typer.Argument(..., help="a book (.txt/.md), .jsonl/.json records, or .csv/.tsv"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="output dir (default: NAME.prepared beside the input)"),
    base: str = typer.Option(DEFAULT_BASE, help="base model whose tokenizer counts tokens"),
    block_size: int = typer.Option(512, help="longest example, in tokens"),
    fraction: float = typer.Option(1.0, help="use only the first part of the data (0 < f <= 1)"),
    max_tokens: Optional[int] = typer.Option(None, help="use only the first N tokens"),
    valid_fraction: float = typer.Option(0.05, help="share of examples held out for validation"),
    dedupe: bool = typer.Option(True, help="drop exact duplicate examples"),
    seed: int = typer.Option(0, help="seed of the train/validation split"),
    overwrite: bool = typer.Option(False, help="replace an existing output dir"),
    estimate: bool = typer.Option(True, help="measure this machine to estimate training time"),
) -> None:
    """Clean, cut and split a text into training examples, and report on it."""
    from .prepare import format_report
    from .prepare import prepare as prepare_api

    result = prepare_api(
        file, out=out_dir, base=base, block_size=block_size, fraction=fraction, max_tokens=max_tokens,
        valid_fraction=valid_fraction, dedupe=dedupe, seed=seed, overwrite=overwrite, estimate=estimate,
    )
    out.print(format_report(result.report), highlight=False, markup=False, soft_wrap=True)
    out.print(f"\nwrote [bold]{result.dir}[/]  (train.jsonl, valid.jsonl, report.json)")
    out.print(f"next: tunesmith train {result.dir}")


@app.command()
@user_errors
def tokenize(
    text: Optional[str] = typer.Argument(None, help="text to split"),
    file: Optional[Path] = typer.Option(None, "--file", "-f", help="read the text from a file"),
    base: str = typer.Option(DEFAULT_BASE, help="whose tokenizer"),
    ids: bool = typer.Option(False, "--ids", help="print only the ids"),
) -> None:
    """Show how the base model's subword tokenizer splits text into tokens."""
    from .models import load_tokenizer
    from .tokens import tokenize_text

    if file is not None:
        from .tokens import read_text_file

        text = read_text_file(file)
    if not text:
        raise TunesmithError("give some text, or --file FILE")
    rows = tokenize_text(text, load_tokenizer(base))
    if ids:
        out.print(" ".join(str(r["id"]) for r in rows))
        return
    colours = ["on grey23", "on dark_blue", "on dark_green", "on purple4"]
    from rich.text import Text

    shown = Text()
    for i, row in enumerate(rows):
        shown.append(row["text"], style=colours[i % len(colours)])
    out.print(shown)
    from rich.table import Table

    table = Table("#", "token", "id", "text")
    for i, row in enumerate(rows[:200]):
        table.add_row(str(i), row["token"], str(row["id"]), repr(row["text"]))
    out.print(table)
    if len(rows) > 200:
        out.print(f"... {len(rows) - 200} more")
    out.print(f"[bold]{len(rows)} tokens[/] for {len(text)} characters ({len(text) / max(len(rows), 1):.2f} characters per token)")


@app.command()
@user_errors
def train(
    data: Path = typer.Argument(..., help="a prepared dir, or any file `prepare` accepts"),
    base: str = typer.Option(DEFAULT_BASE, help="base model: a name, a model dir or a .gguf"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="run directory (default runs/NAME-TIME)"),
    epochs: int = typer.Option(4, help="passes over the training data"),
    lr: Optional[float] = typer.Option(None, help="peak learning rate (default 1e-3 LoRA, 5e-5 full)"),
    batch_size: int = typer.Option(8, help="blocks per optimizer step"),
    block_size: int = typer.Option(512, help="tokens per block"),
    method: str = typer.Option("lora", help="lora or full"),
    lora_r: int = typer.Option(16, help="LoRA rank"),
    seed: int = typer.Option(0),
    max_steps: Optional[int] = typer.Option(None, help="stop after this many optimizer steps"),
    valid_fraction: float = typer.Option(0.05, help="held-out share when DATA is a raw file"),
    validation: Optional[Path] = typer.Option(None, help="a separate validation file or prepared dir (then nothing is held out)"),
    dtype: str = typer.Option("auto", help="auto (bf16 where supported), bf16 or fp32"),
    device: str = typer.Option("auto", help="auto, cpu, cuda"),
    save_every: Optional[int] = typer.Option(None, help="also checkpoint every N steps"),
    compile: str = typer.Option("auto", help="torch.compile the layers: auto (long CPU runs), on, off"),
    prompt: List[str] = typer.Option([], "--prompt", help="fixed prompt for samples.md (repeatable)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="show the plan and estimated time, train nothing"),
    overwrite: bool = typer.Option(False, help="replace an existing run directory"),
) -> None:
    """Fine-tune a base model on your text. Ctrl-C stops cleanly and keeps the last checkpoint."""
    options = dict(
        base=base, epochs=epochs, lr=lr, batch_size=batch_size, block_size=block_size, method=method,
        lora_r=lora_r, seed=seed, max_steps=max_steps, valid_fraction=valid_fraction, dtype=dtype,
        device=device, save_every=save_every, sample_prompts=list(prompt), compile=compile,
    )
    if dry_run:
        from .estimate import plan

        info = plan(data, **options)
        for key, value in info.items():
            out.print(f"{key:>22}: {value}")
        return
    from .train import finetune

    def on_event(event: dict) -> None:
        if event["type"] == "info":
            out.print(f"[dim]{event['message']}[/]")
        elif event["type"] == "validation" and event["step"] == 0:
            out.print(f"base model: validation loss {event['validation_loss']:.3f}, perplexity {event['perplexity']:.2f}")

    try:
        run = finetune(data, validation=validation, out=out_dir, overwrite=overwrite, on_event=on_event, **options)
    except KeyboardInterrupt:
        err.print("[yellow]training interrupted; the last checkpoint is saved and usable.[/]")
        raise typer.Exit(130)
    out.print(f"\n[bold green]done[/]: {run.path}  (status {run.status})")
    out.print(f'try: tunesmith generate {run.path} "Your prompt"')


@app.command()
@user_errors
def generate(
    model: str = typer.Argument(..., help="a run dir, a base name, a model dir or a .gguf"),
    prompt: str = typer.Argument(..., help="the text to continue"),
    max_tokens: int = typer.Option(200, help="most new tokens"),
    temperature: float = typer.Option(0.8, help="0 = greedy"),
    top_p: float = typer.Option(0.95),
    top_k: int = typer.Option(0, help="0 = off"),
    repetition_penalty: float = typer.Option(1.1),
    stop: List[str] = typer.Option([], "--stop", help="stop at this text (repeatable)"),
    n: int = typer.Option(1, help="how many continuations"),
    seed: Optional[int] = typer.Option(None, help="same seed, same text"),
    chat: bool = typer.Option(False, help="wrap the prompt in the chat template as a user message"),
    compare_base: bool = typer.Option(False, "--compare-base", help="also show the base model's continuation"),
) -> None:
    """Write a continuation of PROMPT, streamed as it is written."""
    from .generate import load

    loaded = load(model)
    text = loaded.chat_prompt([{"role": "user", "content": prompt}]) if chat else prompt
    sampling = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                    repetition_penalty=repetition_penalty, stop=stop, seed=seed)
    for i in range(n):
        if n > 1:
            out.print(f"\n[bold]--- {i + 1} ---[/]")
        out.print(prompt if not chat else "", end="", style="bold", highlight=False)
        seed_i = None if seed is None else seed + i
        for chunk in loaded.stream(text, **{**sampling, "seed": seed_i}):
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
    if compare_base and loaded.base and loaded.base != loaded.name:
        base_model = load(loaded.base)
        out.print(f"\n[bold]--- base model {loaded.base} ---[/]")
        out.print(prompt, end="", style="bold", highlight=False)
        for chunk in base_model.stream(text, **sampling):
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
        sys.stdout.write("\n")


@app.command()
@user_errors
def demo(
    text: Optional[Path] = typer.Option(None, "--text", help="use your own book instead of the default"),
    full: bool = typer.Option(False, "--full", help="train on the whole text (slow)"),
    out_dir: Path = typer.Option(Path("runs/demo"), "--out", help="run directory (replaced)"),
    seed: int = typer.Option(0),
) -> None:
    """Prepare a public-domain book, fine-tune the bundled model on it, compare before and after."""
    from rich.columns import Columns
    from rich.panel import Panel

    from .demo import run_demo

    result = run_demo(
        text=text, full=full, out=out_dir, seed=seed,
        say=lambda s: out.print(s, highlight=False, markup=False, soft_wrap=True),
    )
    out.print(Panel(result.prompt, title="prompt"))
    out.print(
        Columns(
            [Panel(result.base_text.strip(), title="base model", width=60),
             Panel(result.tuned_text.strip(), title="fine-tuned", width=60)]
        )
    )
    if result.perplexity_before and result.perplexity_after:
        out.print(
            f"validation perplexity: [bold]{result.perplexity_before:.2f}[/] (base) -> "
            f"[bold green]{result.perplexity_after:.2f}[/] (fine-tuned)"
        )
    out.print(f"run: {result.run_dir}  (samples.md, loss.png, metrics.jsonl)")


@app.command()
@user_errors
def export(
    source: str = typer.Argument(..., help="a run dir (LoRA merged into its base) or a base model"),
    format: str = typer.Option(..., "--format", help="hf (a transformers directory) or gguf (one file for llama.cpp/Ollama)"),
    out_path: Path = typer.Option(..., "--out", help="output directory (hf) or FILE.gguf"),
    quant: Optional[str] = typer.Option(None, help="gguf: f16 (default), bf16, q8_0, f32; hf: f32 (default), bf16, f16"),
    ollama: bool = typer.Option(False, "--ollama", help="gguf: also write an Ollama Modelfile beside the file"),
    overwrite: bool = typer.Option(False, help="replace an earlier export at --out"),
) -> None:
    """Export a run or a base model for transformers, llama.cpp, Ollama or LM Studio."""
    from .export import export as export_api

    done = export_api(source, format=format, out=out_path, quant=quant, overwrite=overwrite, ollama=ollama)
    out.print(f"wrote [bold]{done}[/]")
    if format == "gguf":
        out.print(f'try: llama-cli -m {done} -p "Once upon a time" -n 64')
        if ollama:
            out.print(f"     ollama create {Path(done).stem} -f {Path(done).with_name('Modelfile')}")
    else:
        out.print(f"try: AutoModelForCausalLM.from_pretrained({str(done)!r})")


def _mount_server() -> None:
    try:
        from .server.commands import jobs_app, serve_command
    except ImportError:  # the server package is optional at import time
        return
    app.command("serve")(user_errors(serve_command))
    app.add_typer(jobs_app, name="jobs")


_mount_server()


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
