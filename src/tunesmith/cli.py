"""The `tunesmith` command: a thin layer over the Python API, one command per function."""

from __future__ import annotations

import shlex
import sys
import warnings
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape

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
    out.print(f"\nwrote [bold]{escape(str(result.dir))}[/]  (train.jsonl, valid.jsonl, report.json)")
    out.print(f"next: tunesmith train {shlex.quote(str(result.dir))}", markup=False, highlight=False, soft_wrap=True)


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
    from .wording import counted

    out.print(f"[bold]{counted(len(rows), 'token')}[/] for {counted(len(text), 'character')} "
              f"({len(text) / max(len(rows), 1):.2f} characters per token)")


@app.command()
@user_errors
def train(
    ctx: typer.Context,
    data: Optional[Path] = typer.Argument(None, help="a prepared dir, or any file `prepare` accepts"),
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
    keep_checkpoints: int = typer.Option(2, help="how many of the newest checkpoints to keep (best/ is kept too)"),
    compile: str = typer.Option("auto", help="torch.compile the layers: auto (long CPU runs), on, off"),
    prompt: List[str] = typer.Option([], "--prompt", help="fixed prompt for samples.md (repeatable)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="show the plan and estimated time, train nothing"),
    overwrite: bool = typer.Option(False, help="replace an earlier tunesmith run at --out (never any other folder)"),
    resume: Optional[Path] = typer.Option(None, "--resume", help="continue this interrupted run from its last checkpoint"),
) -> None:
    """Fine-tune a base model on your text. Ctrl-C stops cleanly and keeps the last checkpoint."""
    options = dict(
        base=base, epochs=epochs, lr=lr, batch_size=batch_size, block_size=block_size, method=method,
        lora_r=lora_r, seed=seed, max_steps=max_steps, valid_fraction=valid_fraction, dtype=dtype,
        device=device, save_every=save_every, sample_prompts=list(prompt), compile=compile,
        keep_checkpoints=keep_checkpoints,
    )
    if resume is not None:
        return _resume(ctx, resume, data, options, dry_run=dry_run, out_dir=out_dir, validation=validation,
                       overwrite=overwrite)
    if data is None:
        raise TunesmithError("give the training data (DATA), or --resume RUN")
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

    seen: dict = {}
    try:
        run = finetune(data, validation=validation, out=out_dir, overwrite=overwrite,
                       on_event=_train_events(on_event, seen), **options)
    except KeyboardInterrupt:
        _interrupted(seen.get("path"))
    _done(run)


def _train_events(on_event, seen: dict):
    """Pass training events on, remembering the run directory."""
    def handle(event: dict) -> None:
        if event.get("path") and event["type"] == "done":
            seen["path"] = event["path"]
        on_event(event)
    return handle


def _interrupted(path: str | None) -> None:
    err.print("[yellow]training interrupted; the last checkpoint is saved and usable.[/]")
    err.print(f"resume with: tunesmith train --resume {shlex.quote(path) if path else 'RUN'}", highlight=False, markup=False,
              soft_wrap=True)
    raise typer.Exit(130)


# Options of `train` that are TrainConfig fields under another name.
_OPTION_FIELDS = {"prompt": "sample_prompts"}


def _resume(ctx: typer.Context, run: Path, data, options: dict, *, dry_run: bool, out_dir, validation, overwrite) -> None:
    """`train --resume RUN`: the run's own settings; only options given on the command line are passed on
    (and must match the run unless they do not change the computation)."""
    from click.core import ParameterSource

    from .train import resume as resume_api

    for name, given in (("DATA", data), ("--dry-run", dry_run), ("--out", out_dir), ("--validation", validation),
                        ("--overwrite", overwrite)):
        if given:
            raise TunesmithError(f"--resume continues a run with its own data and directory; {name} cannot be given with it")
    given = {}
    for param in ctx.params:
        field = _OPTION_FIELDS.get(param, param)
        if field in options and ctx.get_parameter_source(param) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT):
            given[field] = options[field]

    def on_event(event: dict) -> None:
        if event["type"] == "info":
            out.print(f"[dim]{event['message']}[/]")

    try:
        result = resume_api(run, on_event=on_event, **given)
    except KeyboardInterrupt:
        _interrupted(str(run))
    _done(result)


def _done(run) -> None:
    out.print(f"\n[bold green]done[/]: {escape(str(run.path))}  (status {run.status})")
    from .watch import best_epoch_note

    best = best_epoch_note(run.path)
    if best:
        out.print(best, markup=False, highlight=False, soft_wrap=True)
    out.print(f"try: tunesmith generate {shlex.quote(str(run.path))} 'Your prompt'", markup=False, highlight=False, soft_wrap=True)


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
    check_copying: bool = typer.Option(
        False, "--check-copying",
        help="mark spans copied from the run's training text (each sample is printed when done, not streamed)",
    ),
) -> None:
    """Write a continuation of PROMPT, streamed as it is written."""
    from .generate import SamplingParams, load

    sampling = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                    repetition_penalty=repetition_penalty, stop=stop, seed=seed)
    if n < 1:
        raise TunesmithError("must be at least 1", field="n")
    SamplingParams(**sampling).check()  # bad settings fail before the model loads
    copy_index = _copy_index(model) if check_copying else None
    loaded = load(model)
    text = loaded.chat_prompt([{"role": "user", "content": prompt}]) if chat else prompt
    for i in range(n):
        if n > 1:
            out.print(f"\n[bold]--- {i + 1} ---[/]")
        out.print(prompt if not chat else "", end="", style="bold", highlight=False)
        seed_i = None if seed is None else seed + i
        _write_sample(loaded.stream(text, **{**sampling, "seed": seed_i}), copy_index)
    if compare_base and loaded.base and loaded.base != loaded.name:
        base_model = load(loaded.base)
        out.print(f"\n[bold]--- base model {loaded.base} ---[/]")
        out.print(prompt, end="", style="bold", highlight=False)
        _write_sample(base_model.stream(text, **sampling), copy_index)


def _copy_index(model: str):
    from .copies import CopyIndex

    if not Path(model).is_dir():
        raise TunesmithError(
            "--check-copying needs a run directory: its training text is what copies are looked for in",
            field="--check-copying", hint="give a run dir, or check any text with `tunesmith copies SOURCE TEXT`",
        )
    return CopyIndex.open(model, say=lambda line: err.print(line, highlight=False, markup=False))


def _write_sample(chunks, copy_index) -> None:
    """Stream a sample; with a copy index, print it whole with its copied spans marked, then the figures."""
    if copy_index is None:
        for chunk in chunks:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return
    from rich.text import Text

    from .copies import format_summary, marked_pieces

    sample = "".join(chunk.text for chunk in chunks)
    if not sample.strip():
        out.print("\n(nothing generated)", highlight=False)
        return
    report = copy_index.check(sample)
    if out.is_terminal:
        shown = Text()
        for piece, copied in marked_pieces(sample, report.spans):
            shown.append(piece, style="bold black on yellow" if copied else None)
        out.print(shown, highlight=False)
    else:
        sys.stdout.write("".join(f"[[{p}]]" if c else p for p, c in marked_pieces(sample, report.spans)) + "\n")
        sys.stdout.flush()
    out.print(format_summary(report), style="dim" if out.is_terminal else None, highlight=False, markup=False,
              soft_wrap=True)


@app.command()
@user_errors
def copies(
    source: Path = typer.Argument(..., help="a run dir, a prepared dir, or the training file itself"),
    text: Optional[str] = typer.Argument(None, help="the text to check (or --file)"),
    file: Optional[Path] = typer.Option(None, "--file", "-f", help="read the text to check from this file"),
    min_tokens: int = typer.Option(12, help="the shortest span that counts as copied, in tokens"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Find the spans of TEXT that occur word for word in the training text, and where they are."""
    import json

    from .copies import CopyIndex, format_report

    if text is not None and file is not None:
        raise TunesmithError("give the text to check as an argument or with --file, not both", field="--file")
    if text is None and file is None:
        raise TunesmithError("no text to check", field="TEXT",
                             hint='tunesmith copies runs/mybook "some text", or --file sample.txt')
    if file is not None:
        from .tokens import read_text_file

        text = read_text_file(file)
    if not text.strip():
        raise TunesmithError("the text to check is empty", file=file)
    index = CopyIndex.open(source, say=lambda line: err.print(line, highlight=False, markup=False))
    report = index.check(text, min_tokens=min_tokens)
    if as_json:
        sys.stdout.write(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n")
    else:
        out.print(format_report(report), highlight=False, markup=False, soft_wrap=True)


@app.command()
@user_errors
def demo(
    text: Optional[Path] = typer.Option(None, "--text", help="use your own book instead of the default"),
    full: bool = typer.Option(False, "--full", help="train on the whole text (slow)"),
    out_dir: Path = typer.Option(Path("runs/demo"), "--out", help="run directory (an earlier tunesmith run there is replaced, nothing else)"),
    seed: int = typer.Option(0),
    skip_eval: bool = typer.Option(False, "--skip-eval", help="end after the before/after text, without the eval table"),
) -> None:
    """Prepare a public-domain book, fine-tune the bundled model on it, compare before and after,
    and end with `tunesmith eval --quick`: does it copy the book, does it sound like the author."""
    from rich.columns import Columns
    from rich.panel import Panel

    from .demo import run_demo

    result = run_demo(
        text=text, full=full, out=out_dir, seed=seed, evaluate=not skip_eval,
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
    if result.evaluation is not None:
        from .evaluate import rich_table

        out.print(rich_table(result.evaluation))
        for warning in result.evaluation["warnings"]:
            err.print(f"[yellow]warning:[/] {warning}", highlight=False)
    files = "samples.md, loss.png, metrics.jsonl" + (", eval.md, eval.png" if result.evaluation is not None else "")
    out.print(f"run: {result.run_dir}  ({files})")


@app.command("eval")
@user_errors
def eval_command(
    run: Path = typer.Argument(..., help="a run directory"),
    quick: bool = typer.Option(False, "--quick", help="fewer samples (2,500 words a side) and probe windows"),
    seed: int = typer.Option(0, help="seed of the samples, probe windows and bootstrap"),
    words: Optional[int] = typer.Option(None, help="words of samples per model (default 5,000; 2,500 with --quick)"),
    probe: Optional[int] = typer.Option(None, help="extraction-probe windows (default 64; 16 with --quick)"),
    min_tokens: int = typer.Option(12, help="the shortest span that counts as copied, in tokens"),
) -> None:
    """Does it copy the book, and does it sound like the author? Base vs fine-tuned vs held-out text."""
    from .evaluate import EvalSettings, evaluate_run, rich_table

    settings = EvalSettings.make(quick, seed=seed, words=words, probe_windows=probe, min_tokens=min_tokens)
    result = evaluate_run(run, settings, quick=quick, say=lambda s: err.print(s, style="dim", highlight=False, markup=False))
    out.print(rich_table(result))
    for warning in result["warnings"]:
        err.print(f"[yellow]warning:[/] {warning}", highlight=False)
    out.print(f"wrote {run / 'eval.json'}, eval.md, eval.png  ({result['seconds']:.0f} s)")


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
