"""The `tunesmith` command: a thin layer over the Python API, one command per function."""

from __future__ import annotations

import os
import shlex
import sys
import warnings
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape

from .config import SamplingConfig, TrainConfig, spec
from .errors import TunesmithError, user_errors
from .events import TrainEvent

app = typer.Typer(
    help="Fine-tune a small language model on a text you love, then write in its style.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="Base models, runs and exports on this machine.", no_args_is_help=True)
app.add_typer(models_app, name="models")
# Deprecation notices from the libraries are for us, not for the user.
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)
out = Console()
err = Console(stderr=True)


def _setting(cls: type, name: str, *decls: str):
    """A Typer option whose default and help come from field ``name`` of ``cls`` (config.py); the
    CLI's own default where the field names one (``cli``)."""
    meta = spec(cls, name)
    default = meta.get("cli", meta["default"])
    return typer.Option(list(default) if isinstance(default, (list, tuple)) else default, *decls, help=meta["help"])


_RUNS_OPTION = typer.Option(Path("runs"), "--runs", help="the folder that holds your runs")
_EXPORTS_OPTION = typer.Option(Path("exports"), "--exports", help="the folder that holds your exports")


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


@models_app.command("list")
@user_errors
def models_list(
    runs: Path = _RUNS_OPTION,
    exports: Path = _EXPORTS_OPTION,
    as_json: bool = typer.Option(False, "--json", help="print JSON: kind, name, path, size (bytes), uses, state"),
) -> None:
    """Show base models, runs and exports, their size on disk and what each is for (nothing is downloaded)."""
    import json
    from dataclasses import asdict

    from rich.table import Table

    from .inventory import list_items

    items = list_items(runs, exports)
    if as_json:
        out.print_json(json.dumps([asdict(item) for item in items], default=str))
        return
    table = Table("kind", "name", "size", "use with", "state")
    for item in items:
        table.add_row(item.kind, escape(item.name), _size(item.size), ", ".join(item.uses) or "-", escape(item.state))
    out.print(table)


@models_app.command("show")
@user_errors
def models_show(
    name: str = typer.Argument(..., help="a base model, run or export (as `models list` names it), or its path"),
    runs: Path = _RUNS_OPTION,
    exports: Path = _EXPORTS_OPTION,
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Details of one base model, run or export: base, corpus, hyperparameters, metrics, files."""
    import json

    from .inventory import show

    info = show(name, runs, exports)
    if as_json:
        out.print_json(json.dumps(info, default=str))
        return
    out.print(f"[bold]{escape(info['name'])}[/] ({info['kind']}, {_size(info['size'])}) at {escape(info['path'])}",
              soft_wrap=True)
    out.print(f"  use with: {', '.join(info['uses']) or '-'}")
    if info["state"]:
        out.print(f"  state: {escape(info['state'])}", soft_wrap=True)
    for key in ("base", "source", "modelfile"):
        if info.get(key):
            out.print(f"  {key}: {escape(str(info[key]))}", soft_wrap=True)
    for section in ("corpus", "hyperparameters", "export", "metrics"):
        if info.get(section):
            out.print(f"[bold]{section}[/]")
            for key, value in info[section].items():
                text = json.dumps(value, default=str) if isinstance(value, (dict, list)) else str(value)
                out.print(f"  {key}: {escape(text)}", soft_wrap=True)
    out.print("[bold]files[/]")
    for entry in info["files"]:
        out.print(f"  {_size(entry['size']):>9}  {escape(entry['name'])}", soft_wrap=True)


@models_app.command("rm")
@user_errors
def models_rm(
    name: str = typer.Argument(..., help="a base model's cached copy, a run or an export, or its path"),
    runs: Path = _RUNS_OPTION,
    exports: Path = _EXPORTS_OPTION,
    yes: bool = typer.Option(False, "--yes", "-y", help="do not ask"),
) -> None:
    """Delete a base model's cached copy, a run or an export. Never anything outside $TUNESMITH_HOME,
    --runs and --exports."""
    from .inventory import find, remove

    item = find(name, runs, exports)
    what = f"{item.kind} {item.name} ({_size(item.size)}) at {item.path}"
    if not yes and not typer.confirm(f"remove {what}?", default=False):
        err.print("nothing removed")
        raise typer.Exit(1)
    remove(item, runs, exports)
    out.print(f"removed {escape(what)}", soft_wrap=True)


@app.command()
@user_errors
def prepare(
    file: Path = typer.Argument(..., help="a book (.txt/.md), .jsonl/.json records, .csv/.tsv/.xlsx, or a folder "
                                          "or quoted glob ('books/*.txt') of them"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="output dir (default: NAME.prepared beside the input)"),
    base: str = typer.Option(spec(TrainConfig, "base")["default"], help="base model whose tokenizer counts tokens"),
    block_size: int = _setting(TrainConfig, "block_size"),
    fraction: float = typer.Option(1.0, help="use only the first part of the data (0 < f <= 1)"),
    max_tokens: Optional[int] = typer.Option(None, help="use only the first N tokens"),
    valid_fraction: float = _setting(TrainConfig, "valid_fraction"),
    dedupe: bool = typer.Option(True, help="drop exact duplicate examples"),
    seed: int = _setting(TrainConfig, "seed"),
    overwrite: bool = typer.Option(False, help="replace an existing output dir"),
    estimate: bool = typer.Option(True, help="measure this machine to estimate training time"),
    label_col: Optional[str] = typer.Option(None, "--label-col", help="labelled data: the label column"),
    text_col: List[str] = typer.Option([], "--text-col", help="labelled data: the text column (repeatable)"),
) -> None:
    """Clean, cut and split a text into training examples, and report on it. A table with a label
    column (label, score, rating, ... or --label-col) is checked as labelled data instead."""
    from .labelled import looks_labelled

    if looks_labelled(file, label_col):
        from .labelled import format_labelled_report, inspect_labelled

        report = inspect_labelled(file, text_cols=list(text_col) or None, label_col=label_col)
        out.print(format_labelled_report(report), highlight=False, markup=False, soft_wrap=True)
        if any(check["status"] == "error" for check in report["checks"]):
            raise typer.Exit(1)
        return
    if text_col:
        raise TunesmithError("is for labelled data: this file has no label column", field="text_col",
                             hint="name the label column with --label-col")
    from .estimate import report_estimate
    from .prepare import format_report
    from .prepare import prepare as prepare_api

    result = prepare_api(
        file, out=out_dir, base=base, block_size=block_size, fraction=fraction, max_tokens=max_tokens,
        valid_fraction=valid_fraction, dedupe=dedupe, seed=seed, overwrite=overwrite,
        estimate=report_estimate if estimate else None, progress=True,
    )
    out.print(format_report(result.report), highlight=False, markup=False, soft_wrap=True)
    out.print(f"\nwrote [bold]{escape(str(result.dir))}[/]  (train.jsonl, valid.jsonl, report.json, token shards)")
    out.print(f"next: tunesmith train {shlex.quote(str(result.dir))}", markup=False, highlight=False, soft_wrap=True)


@app.command()
@user_errors
def tokenize(
    text: Optional[str] = typer.Argument(None, help="text to split"),
    file: Optional[Path] = typer.Option(None, "--file", "-f", help="read the text from a file"),
    base: str = typer.Option(spec(TrainConfig, "base")["default"], help="whose tokenizer"),
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
    base: str = _setting(TrainConfig, "base"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="run directory (default runs/NAME-TIME)"),
    epochs: int = _setting(TrainConfig, "epochs"),
    lr: Optional[float] = _setting(TrainConfig, "lr"),
    batch_size: int = _setting(TrainConfig, "batch_size"),
    block_size: int = _setting(TrainConfig, "block_size"),
    method: str = _setting(TrainConfig, "method"),
    lora_r: int = _setting(TrainConfig, "lora_r"),
    seed: int = _setting(TrainConfig, "seed"),
    max_steps: Optional[int] = _setting(TrainConfig, "max_steps"),
    valid_fraction: float = _setting(TrainConfig, "valid_fraction"),
    validation: Optional[Path] = typer.Option(None, help="a separate validation file or prepared dir (then nothing is held out)"),
    dtype: str = _setting(TrainConfig, "dtype"),
    device: str = _setting(TrainConfig, "device"),
    save_every: Optional[int] = _setting(TrainConfig, "save_every"),
    keep_checkpoints: int = _setting(TrainConfig, "keep_checkpoints"),
    compile: str = _setting(TrainConfig, "compile"),
    chat_loss: str = _setting(TrainConfig, "chat_loss"),
    prompt: List[str] = _setting(TrainConfig, "sample_prompts", "--prompt"),
    dry_run: bool = typer.Option(False, "--dry-run", help="show the plan and estimated time, train nothing"),
    overwrite: bool = typer.Option(False, help="replace an earlier tunesmith run at --out (never any other folder)"),
    resume: Optional[Path] = typer.Option(None, "--resume", help="continue this interrupted run from its last checkpoint"),
    task: Optional[str] = typer.Option(None, help="classify or regress: train a head on labelled CSV/TSV/JSONL"),
    text_col: List[str] = typer.Option([], "--text-col", help="text column of labelled data (repeatable)"),
    label_col: Optional[str] = typer.Option(None, "--label-col", help="label column of labelled data"),
    template: Optional[str] = typer.Option(None, help='joins several --text-col, e.g. "q: {q} ; a: {a}"'),
    num_processes: int = typer.Option(1, "--num-processes", min=1,
                                      help="train data-parallel in N processes on this machine (accelerate; one GPU each)"),
) -> None:
    """Fine-tune a base model on your text. Ctrl-C stops cleanly and keeps the last checkpoint.

    With --task classify|regress, DATA is labelled text and the run is a classifier or regressor
    (--base may be a language-model run: the two-stage fine-tune)."""
    if num_processes > 1 and not dry_run and task is None and "WORLD_SIZE" not in os.environ:
        from .distributed import launch

        raise typer.Exit(launch(num_processes, _without_option(sys.argv[1:], "--num-processes")))
    if task is not None:
        _train_classifier(data, task=task, base=base, out_dir=out_dir, epochs=epochs, lr=lr, method=method,
                          lora_r=lora_r, seed=seed, batch_size=batch_size, block_size=block_size,
                          max_steps=max_steps, dtype=dtype,
                          device=device, overwrite=overwrite, text_col=text_col, label_col=label_col,
                          template=template)
        return
    options = dict(
        base=base, epochs=epochs, lr=lr, batch_size=batch_size, block_size=block_size, method=method,
        lora_r=lora_r, seed=seed, max_steps=max_steps, valid_fraction=valid_fraction, dtype=dtype,
        device=device, save_every=save_every, sample_prompts=list(prompt), compile=compile,
        keep_checkpoints=keep_checkpoints, chat_loss=chat_loss,
    )
    if resume is not None:
        return _resume(ctx, resume, data, options, dry_run=dry_run, out_dir=out_dir, validation=validation,
                       overwrite=overwrite)
    if data is None:
        raise TunesmithError("give the training data (DATA), or --resume RUN")
    if dry_run:
        from .estimate import plan

        info = plan(data, TrainConfig(**options), validation=validation)
        for key, value in info.items():
            out.print(f"{key:>22}: {value}")
        return
    from .train import finetune

    def on_event(event: TrainEvent) -> None:
        if event.type == "info":
            out.print(f"[dim]{event.message}[/]")
        elif event.type == "validation" and event.step == 0:
            out.print(f"base model: validation loss {event.metrics['validation_loss']:.3f}, "
                      f"perplexity {event.metrics['validation_perplexity']:.2f}")

    seen: dict = {}
    try:
        run = finetune(data, TrainConfig(**options), validation=validation, out=out_dir, overwrite=overwrite,
                       on_event=_train_events(on_event, seen))
    except KeyboardInterrupt:
        _interrupted(seen.get("path"))
    _done(run)


def _without_option(args: list[str], name: str) -> list[str]:
    """``args`` without ``name VALUE`` or ``name=VALUE``."""
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            kept.append(arg)
    return kept


def _train_events(on_event, seen: dict):
    """Pass training events on, remembering the run directory."""
    def handle(event: TrainEvent) -> None:
        if event.path and event.type == "done":
            seen["path"] = event.path
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

    def on_event(event: TrainEvent) -> None:
        if event.type == "info":
            out.print(f"[dim]{event.message}[/]")

    try:
        result = resume_api(run, on_event=on_event, **given)
    except KeyboardInterrupt:
        _interrupted(str(run))
    _done(result)


def _done(run) -> None:
    from .distributed import processes

    if not processes().is_main:  # in a data-parallel run, rank 0 reports
        return
    out.print(f"\n[bold green]done[/]: {escape(str(run.path))}  (status {run.status})")
    from .watch import best_epoch_note

    best = best_epoch_note(run.path)
    if best:
        out.print(best, markup=False, highlight=False, soft_wrap=True)
    out.print(f"try: tunesmith generate {shlex.quote(str(run.path))} 'Your prompt'", markup=False, highlight=False, soft_wrap=True)


def _train_classifier(data: Path, *, task: str, out_dir: Optional[Path], text_col: List[str], label_col: Optional[str],
                      template: Optional[str], overwrite: bool, epochs: int, **options) -> None:
    from .classify import finetune_classifier

    def on_event(event: dict) -> None:
        if event["type"] == "info":
            out.print(f"[dim]{event['message']}[/]", highlight=False)

    run = finetune_classifier(
        data, out=out_dir, text_cols=list(text_col) or None, label_col=label_col, template=template,
        overwrite=overwrite, on_event=on_event, task=task, epochs=epochs, **options,
    )
    out.print(f"\n[bold green]done[/]: {run.path}  (status {run.status})")
    out.print(f'try: tunesmith predict {run.path} "some text"')


@app.command()
@user_errors
def predict(
    run: Path = typer.Argument(..., help="a classifier or regressor run directory"),
    text: Optional[str] = typer.Argument(None, help="the text to label or score"),
    file: Optional[Path] = typer.Option(None, "--file", "-f", help="a .txt (one text a line), .csv, .tsv or .jsonl"),
    out_file: Optional[Path] = typer.Option(None, "--out", help="write predictions to .csv, .tsv or .jsonl"),
) -> None:
    """Label or score text with a classifier/regressor run."""
    import json

    from .classify import Classifier, predict_file, read_texts

    if (text is None) == (file is None):
        raise TunesmithError("give one text, or --file FILE", field="TEXT")
    classifier = Classifier.load(run)
    if text is not None:
        result = classifier.predict([text])[0]
        if "score" in result:
            out.print(f"{result['score']:.4f}")
        else:
            ranked = sorted(result["probabilities"].items(), key=lambda kv: -kv[1])
            out.print(f"[bold]{result['label']}[/]  " + "  ".join(f"{k} {v:.3f}" for k, v in ranked), highlight=False)
        return
    if out_file is not None:
        n = predict_file(classifier, file, out_file, progress=err.is_terminal)
        out.print(f"wrote {n} predictions to {out_file}")
        return
    texts, _ = read_texts(file, classifier)
    for result in classifier.predict(texts):
        sys.stdout.write(json.dumps(result, ensure_ascii=False) + "\n")


@app.command()
@user_errors
def generate(
    model: str = typer.Argument(..., help="a run dir, a base name, a model dir or a .gguf"),
    prompt: str = typer.Argument(..., help="the text to continue"),
    max_tokens: int = _setting(SamplingConfig, "max_tokens"),
    temperature: float = _setting(SamplingConfig, "temperature"),
    top_p: float = _setting(SamplingConfig, "top_p"),
    top_k: int = _setting(SamplingConfig, "top_k"),
    repetition_penalty: float = _setting(SamplingConfig, "repetition_penalty"),
    stop: List[str] = _setting(SamplingConfig, "stop", "--stop"),
    n: int = typer.Option(1, help="how many continuations"),
    seed: Optional[int] = _setting(SamplingConfig, "seed"),
    chat: bool = typer.Option(False, help="wrap the prompt in the chat template as a user message"),
    compare_base: bool = typer.Option(False, "--compare-base", help="also show the base model's continuation"),
    check_copying: bool = typer.Option(
        False, "--check-copying",
        help="mark spans copied from the run's training text (each sample is printed when done, not streamed)",
    ),
    quant: str = typer.Option("none", "--quant", help="weights while generating: none (the model's dtype) or int8"),
    compile: str = typer.Option(
        "auto", "--compile",
        help="compile the decoding step: auto (when n x max-tokens is long enough to pay for the compile), on, off",
    ),
) -> None:
    """Write a continuation of PROMPT, streamed as it is written."""
    from .generate import check_quant, load, should_compile

    sampling = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                    repetition_penalty=repetition_penalty, stop=stop, seed=seed)
    if n < 1:
        raise TunesmithError("must be at least 1", field="n")
    SamplingConfig(**sampling).check()  # bad settings fail before the model loads
    check_quant(quant)
    if compile not in ("auto", "on", "off"):
        raise TunesmithError("must be auto, on or off", field="--compile")
    copy_index = _copy_index(model) if check_copying else None
    loaded = load(model, quant=quant)
    text = loaded.chat_prompt([{"role": "user", "content": prompt}]) if chat else prompt
    if should_compile(compile, n * max_tokens) and loaded.decoder is not None:
        positions = loaded.count_tokens(text) + max_tokens
        err.print(f"compiling the decoding step ({n} x {max_tokens} tokens; --compile off skips it) ...",
                  style="dim", highlight=False)
        seconds = loaded.warm(rows=1, positions=positions)
        if seconds is not None:
            err.print(f"compiled in {seconds:.0f} s", style="dim", highlight=False)
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
    two_stage: bool = typer.Option(False, "--two-stage", help="LM fine-tune, then a rating regressor, on movie reviews"),
    skip_eval: bool = typer.Option(False, "--skip-eval", help="end after the before/after text, without the eval table"),
) -> None:
    """Prepare a public-domain book, fine-tune the bundled model on it, compare before and after,
    and end with `tunesmith eval --quick`: does it copy the book, does it sound like the author."""
    if two_stage:
        from .two_stage import format_effect, format_table, run_two_stage

        say = lambda s: out.print(s, highlight=False, markup=False, soft_wrap=True)  # noqa: E731
        result = run_two_stage(out=out_dir if out_dir != Path("runs/demo") else Path("runs/two-stage"), full=full,
                               seed=seed, say=say)
        say("\n" + format_table(result))
        say(format_effect(result.effect))
        say(f"total {result.seconds / 60:.1f} min (CPU time {result.cpu_seconds / 60:.1f} min); runs in "
            f"{result.stage1_dir.parent}")
        return
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
    quant: str = typer.Option("none", "--quant", help="weights of both models: none (their dtype) or int8"),
) -> None:
    """Does it copy the book, and does it sound like the author? Base vs fine-tuned vs held-out text."""
    from .evaluate import EvalSettings, evaluate_run, rich_table
    from .generate import check_quant

    settings = EvalSettings.make(quick, seed=seed, words=words, probe_windows=probe, min_tokens=min_tokens,
                                 quant=check_quant(quant))
    result = evaluate_run(run, settings, quick=quick, say=lambda s: err.print(s, style="dim", highlight=False, markup=False))
    out.print(rich_table(result))
    for warning in result["warnings"]:
        err.print(f"[yellow]warning:[/] {warning}", highlight=False)
    out.print(f"wrote {run / 'eval.json'}, eval.md, eval.png  ({result['seconds']:.0f} s)")


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
    from .server.commands import jobs_app, serve_command

    app.command("serve")(user_errors(serve_command))
    app.add_typer(jobs_app, name="jobs")


_mount_server()


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
