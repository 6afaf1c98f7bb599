"""Exporting a run (or a base model) for other tools: a merged Hugging Face directory, or a GGUF file.

Every export is written under a temporary name and renamed into place, so the output path holds
the whole export or nothing. An existing output is replaced only with ``overwrite`` and only when
tunesmith wrote it (a ``tunesmith-export.json`` in a directory, a ``tunesmith.export`` key in a GGUF).
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .atomic import atomic_dir, atomic_path, write_text
from .errors import TunesmithError
from .gguf_export import QUANTS as GGUF_QUANTS

FORMATS = ("hf", "gguf")
HF_DTYPES = ("f32", "bf16", "f16")
MARKER = "tunesmith-export.json"

# What a model card needs about the bundled bases: the upstream repository and its licence.
UPSTREAM = {"smollm2-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")}


@dataclass
class Source:
    """What is exported: merged weights, the tokenizer and what the model card says about them."""

    model: object
    tokenizer: object
    tokenizer_dir: Path
    name: str
    base: str
    base_path: Path
    run: object | None  # rundir.Run, or None for a base model


def training_now(run) -> bool:
    """Whether a process is training ``run`` now: it holds the run's train.lock. A run whose
    status still says "running" after its process died (killed, power loss) is not training,
    and its last complete weights are usable."""
    import fcntl

    if run.status != "running":
        return False
    try:
        handle = open(run.path / "train.lock", "a+")
    except OSError:
        return True  # cannot tell: treat it as training
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        handle.close()  # closing releases the lock if we took it
    return False


def load_source(source: str | Path) -> Source:
    """A finished (or stopped) run with its LoRA merged, or a base model as it is."""
    import torch

    from . import models, rundir

    path = Path(str(source)).expanduser()
    if rundir.is_run_dir(path):
        run = rundir.Run(path)
        if training_now(run):
            raise TunesmithError(
                "this run is still training; export it when it has finished or been stopped",
                file=path / "status.json", field="status",
            )
        base = run.config.get("base", "")
        try:
            if run.config.get("method", "lora") == "full":  # full weights need no base
                base_path = Path(run.config.get("base_path", ""))
            else:
                base_path = models.resolve(base)
        except TunesmithError as exc:
            raise TunesmithError(
                f"this run's base model '{base}' cannot be found: {exc.message}",
                file=path / "config.json", field="base", hint=exc.hint,
            ) from None
        model, tok = run.load_model(dtype=torch.float32)
        return Source(model.eval(), tok, path / "tokenizer", run.name, base, base_path, run)
    base_path = models.resolve(str(source))
    model, tok = models.load_base(str(source), dtype=torch.float32)
    return Source(model.eval(), tok, base_path, Path(str(source)).name, str(source), base_path, None)


def _check_output(out: Path, overwrite: bool, is_ours) -> None:
    if not out.exists() and not out.is_symlink():
        return
    if not overwrite:
        raise TunesmithError("the output path already exists", file=out, hint="choose another --out, or pass --overwrite")
    if not is_ours(out):
        raise TunesmithError(
            "the output path exists and was not written by tunesmith export; it is left alone", file=out,
            hint="choose another --out, or remove it yourself",
        )


def _check_space(directory: Path, needed: int, out: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise TunesmithError(
            f"not enough disk space: the export needs about {needed / 2**20:.0f} MiB, {free / 2**20:.0f} MiB are free",
            file=out,
        )


def _disk_errors(out: Path):
    """Turn a full disk (or another write failure) into one clear message; the temp file is already gone."""
    from contextlib import contextmanager

    @contextmanager
    def guard():
        try:
            yield
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise TunesmithError("the disk filled up while writing the export; nothing was written", file=out) from None
            raise TunesmithError(f"cannot write the export: {exc.strerror or exc}", file=out) from None

    return guard()


def _sha256(path: Path) -> str | None:
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _marker(src: Source, fmt: str, quant: str) -> dict:
    from . import __version__

    return {
        "tunesmith_export": 1, "format": fmt, "quant": quant, "source": str(src.run.path if src.run else src.base),
        "base": src.base, "tunesmith": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def model_card(src: Source, fmt: str, quant: str) -> str:
    """README.md: what the model is, what it was trained on and how, and how well it did."""
    upstream, licence = UPSTREAM.get(src.base, (src.base, None))
    lines = ["---"]
    lines.append(f"license: {licence or 'other'}")
    lines.append(f"base_model: {upstream}")
    lines += ["library_name: transformers" if fmt == "hf" else "library_name: gguf", "tags:", "- tunesmith"]
    lines += ["---", "", f"# {src.name}", ""]
    if src.run is None:
        lines.append(f"The base model `{src.base}` ({upstream}), exported by tunesmith without changes.")
    else:
        lines.append(f"A fine-tune of `{src.base}` ({upstream}) made with tunesmith; LoRA weights merged into the base.")
    lines += ["", f"- Base model: {upstream}", f"- Licence of the base model: {licence or 'see the base model'}"]
    lines.append(f"- Format: {'Hugging Face safetensors' if fmt == 'hf' else 'GGUF'}, {quant}")
    if src.run is not None:
        cfg = src.run.config
        data = cfg.get("data") or {}
        report = data.get("report") or {}
        corpus = Path(data.get("source") or report.get("source") or "unknown").name
        lines += ["", "## Training data", "", f"- Corpus: `{corpus}`"]
        corpus_sha = _sha256(Path(report.get("source") or data.get("source") or ""))
        if corpus_sha:
            lines.append(f"- Corpus sha256 (at export): `{corpus_sha}`")
        for split in ("train", "valid"):
            sha = _sha256(src.run.path / "data" / f"{split}.jsonl")
            if sha:
                lines.append(f"- `{split}.jsonl` as trained on: sha256 `{sha}`")
        examples, tokens = report.get("examples") or {}, report.get("tokens") or {}
        if examples:
            lines.append(f"- Examples: {examples.get('train')} train, {examples.get('valid')} validation; "
                         f"tokens: {tokens.get('train')} train, {tokens.get('valid')} validation")
        lines += ["", "## Hyperparameters", "", "| setting | value |", "|---|---|"]
        for key in ("method", "epochs", "learning_rate", "batch_size", "block_size", "lora_r", "lora_alpha",
                    "lora_dropout", "weight_decay", "warmup", "seed", "max_steps", "dtype", "chat_loss"):
            if key == "chat_loss" and report.get("format") != "chat":
                continue  # what chat examples learn; other data has none
            if cfg.get(key) is not None:
                lines.append(f"| {key} | {cfg[key]} |")
        lines += _results(src.run.path)
    lines += ["", "Exported with tunesmith `export`."]
    return "\n".join(lines) + "\n"


def _results(run_path: Path) -> list[str]:
    lines = []
    summary_file, eval_file = run_path / "summary.json", run_path / "eval.json"
    rows = []
    for file in (summary_file, eval_file):
        try:
            data = json.loads(file.read_text()) if file.is_file() else {}
        except json.JSONDecodeError:
            continue
        for key, value in _flat(data):
            if isinstance(value, (int, float)) and not isinstance(value, bool) and (
                file is eval_file or "validation" in key or "perplexity" in key
            ):
                rows.append(f"| {file.stem}: {key} | {value:.4g} |")
    if rows:
        lines += ["", "## Evaluation", "", "| measure | value |", "|---|---|", *rows]
    return lines


def _flat(data, prefix=""):
    if isinstance(data, dict):
        for key, value in data.items():
            yield from _flat(value, f"{prefix}{key}.")
    elif not isinstance(data, list):
        yield prefix.rstrip("."), data


def _hf_ours(path: Path) -> bool:
    return path.is_dir() and (path / MARKER).is_file()


def export_hf(src: Source, out: Path, *, dtype: str = "f32", overwrite: bool = False) -> Path:
    """A directory that plain ``transformers.AutoModelForCausalLM.from_pretrained`` loads."""
    import torch
    from transformers import GenerationConfig

    if dtype not in HF_DTYPES:
        raise TunesmithError(f"unknown --quant '{dtype}' for --format hf; choose one of {', '.join(HF_DTYPES)}", field="quant")
    _check_output(out, overwrite, _hf_ours)
    torch_dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[dtype]
    n = sum(p.numel() for p in src.model.parameters())
    _check_space(out.parent, n * torch_dtype.itemsize + 16 * 2**20, out)
    model, tok = src.model.to(torch_dtype), src.tokenizer
    eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    given = model.generation_config.eos_token_id if model.generation_config else None
    eos |= set(given if isinstance(given, list) else [given] if given is not None else [])
    eos_ids = sorted(eos)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (eos_ids[0] if eos_ids else None)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=eos_ids[0] if len(eos_ids) == 1 else eos_ids, pad_token_id=pad,
    )
    with _disk_errors(out), atomic_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(src, "hf", dtype), encoding="utf-8")
        (tmp / MARKER).write_text(json.dumps(_marker(src, "hf", dtype), indent=2) + "\n")
        mode = (tmp / MARKER).stat().st_mode & 0o777
        for file in tmp.iterdir():
            file.chmod(mode)  # some writers create their files 0600; an export is meant to be shared
    src.model.to(torch.float32)
    return out


def export_gguf(src: Source, out: Path, *, quant: str = "f16", overwrite: bool = False, ollama: bool = False) -> Path:
    """One ``.gguf`` file for llama.cpp, Ollama and LM Studio; with ``ollama`` a ``Modelfile`` beside it."""
    from .gguf_export import estimate_size, exported_marker, modelfile, pre_tokenizer_name, write_gguf
    from .models import CACHE_MARKER

    if quant not in GGUF_QUANTS:
        raise TunesmithError(f"unknown --quant '{quant}'; choose one of {', '.join(GGUF_QUANTS)}", field="quant")
    if out.suffix != ".gguf":
        raise TunesmithError("a GGUF export's file name ends in .gguf", file=out)
    _check_output(out, overwrite, lambda p: p.is_file() and exported_marker(p) is not None)
    model_file = out.with_name("Modelfile")
    template = modelfile(out.name, src.tokenizer) if ollama else None
    if ollama:
        _check_output(model_file, overwrite, lambda p: p.is_file() and p.read_text(errors="replace").startswith("# tunesmith export"))
    _check_space(out.parent, estimate_size(src.model, quant), out)
    source_gguf = None
    marker_file = src.base_path / CACHE_MARKER
    if marker_file.is_file():
        source_gguf = Path(json.loads(marker_file.read_text()).get("source", ""))
    pre = pre_tokenizer_name(src.tokenizer_dir, source_gguf)
    upstream, licence = UPSTREAM.get(src.base, (src.base, None))
    description = f"{'fine-tune of ' if src.run else ''}{upstream}, exported by tunesmith"
    with _disk_errors(out), atomic_path(out) as tmp:
        write_gguf(
            src.model, src.tokenizer, src.tokenizer_dir, tmp, quant=quant, name=src.name, pre_tokenizer=pre,
            marker=_marker(src, "gguf", quant), description=description, license_id=licence,
        )
    if template is not None:
        with _disk_errors(model_file):
            write_text(model_file, f"# tunesmith export of {src.name}\n" + template)
    return out


def export(source: str | Path, *, format: str, out: str | Path, quant: str | None = None,
           overwrite: bool = False, ollama: bool = False) -> Path:
    """Export a run (LoRA merged) or a base model: ``format`` "hf" (a directory) or "gguf" (one file)."""
    if format not in FORMATS:
        raise TunesmithError(f"unknown format '{format}'; choose hf or gguf", field="format")
    if format == "hf" and quant is not None and quant not in HF_DTYPES:
        raise TunesmithError(f"unknown --quant '{quant}' for --format hf; choose one of {', '.join(HF_DTYPES)}", field="quant")
    if format == "gguf" and quant is not None and quant not in GGUF_QUANTS:
        raise TunesmithError(f"unknown --quant '{quant}'; choose one of {', '.join(GGUF_QUANTS)}", field="quant")
    if ollama and format != "gguf":
        raise TunesmithError("--ollama goes with --format gguf", field="ollama")
    out = Path(out).expanduser()
    if format == "gguf":
        # Check the output before loading the model: a refused path should not cost a model load.
        from .gguf_export import exported_marker

        if out.suffix != ".gguf":
            raise TunesmithError("a GGUF export's file name ends in .gguf", file=out)
        _check_output(out, overwrite, lambda p: p.is_file() and exported_marker(p) is not None)
        src = load_source(source)
        return export_gguf(src, out, quant=quant or "f16", overwrite=overwrite, ollama=ollama)
    _check_output(out, overwrite, _hf_ours)
    src = load_source(source)
    return export_hf(src, out, dtype=quant or "f32", overwrite=overwrite)
