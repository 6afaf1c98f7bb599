"""Writing a merged llama-family model as a GGUF file that llama.cpp (and Ollama, LM Studio) runs.

Written with the ``gguf`` package's writer, following the layout of llama.cpp's own
``convert_hf_to_gguf.py`` for ``LlamaForCausalLM``: llama metadata, a GPT-2 style BPE tokenizer,
the chat template, and tensors under llama.cpp's names with Q/K rows permuted to its rotary layout.
The vocabulary list is built here because the ``gguf`` package ships no reader for byte-level
BPE ``tokenizer.json`` files (llama.cpp keeps that code in its converter script).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from .errors import TunesmithError

QUANTS = ("f16", "bf16", "q8_0", "f32")
EXPORT_KEY = "tunesmith.export"  # marks a file tunesmith wrote, so --overwrite may replace it

# tokenizer.json's pre_tokenizer (canonical JSON, sha256) -> llama.cpp's pre-tokenizer name.
# Both regexes are the ones llama.cpp's llama-vocab.cpp applies for these names.
_BYTELEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_PRE_TOKENIZERS = {
    "gpt-2": _BYTELEVEL,
    "smollm": {
        "type": "Sequence",
        "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTELEVEL],
    },
}


def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


_PRE_BY_HASH = {_fingerprint(v): k for k, v in _PRE_TOKENIZERS.items()}


def pre_tokenizer_name(tokenizer_dir: Path, source_gguf: Path | None = None) -> str:
    """llama.cpp's name for the way this tokenizer splits text before BPE.

    A model that arrived as GGUF keeps the name its file declared; otherwise the
    ``pre_tokenizer`` of ``tokenizer.json`` must be one whose llama.cpp regex is known.
    """
    if source_gguf is not None and source_gguf.is_file():
        from gguf import GGUFReader

        field = GGUFReader(source_gguf).fields.get("tokenizer.ggml.pre")
        if field is not None:
            return str(field.contents())
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text()).get("pre_tokenizer")
    name = _PRE_BY_HASH.get(_fingerprint(spec))
    if name is None:
        raise TunesmithError(
            "this tokenizer splits text in a way tunesmith cannot describe to llama.cpp",
            file=tokenizer_dir / "tokenizer.json", field="pre_tokenizer",
            hint="export with --format hf and convert with llama.cpp's convert_hf_to_gguf.py",
        )
    return name


def _vocab(tokenizer, vocab_size: int):
    """Tokens and their types, as llama.cpp's converter lists them for a GPT-2 style BPE vocab."""
    from gguf import TokenType

    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(TokenType.NORMAL)
    return tokens, types


def _permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder Q/K rows from Hugging Face's rotary layout (halves) to llama.cpp's (interleaved pairs)."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def _tensors(model):
    """(llama.cpp name, fp32 array) for every weight, Q and K permuted."""
    cfg = model.config
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    state = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    yield "token_embd.weight", state["model.embed_tokens.weight"]
    for i in range(cfg.num_hidden_layers):
        for hf, ours in _LAYER_NAMES.items():
            data = state[f"model.layers.{i}.{hf}.weight"]
            if hf == "self_attn.q_proj":
                data = _permute(data, n_head)
            elif hf == "self_attn.k_proj":
                data = _permute(data, n_kv)
            yield f"blk.{i}.{ours}.weight", data
    yield "output_norm.weight", state["model.norm.weight"]
    if not tied:
        yield "output.weight", state["lm_head.weight"]


def _check_supported(config) -> None:
    if getattr(config, "model_type", None) != "llama":
        raise TunesmithError(f"GGUF export supports llama-family models, not '{config.model_type}'", field="model_type")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise TunesmithError(f"GGUF export supports plain rotary positions, not '{rope['rope_type']}'", field="rope_type")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise TunesmithError("GGUF export supports llama models without biases", field="attention_bias")


def _rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _tensor_type(name: str, data: np.ndarray, quant: str):
    from gguf import GGMLQuantizationType as T

    if data.ndim == 1 or quant == "f32":
        return T.F32  # norms stay in f32, as llama.cpp keeps them
    if quant == "q8_0":
        return T.Q8_0 if data.shape[-1] % 32 == 0 else T.F16
    return {"f16": T.F16, "bf16": T.BF16}[quant]


def estimate_size(model, quant: str) -> int:
    per = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32}[quant]
    n = sum(p.numel() for p in model.parameters())
    return int(n * per) + 8 * 2**20  # tensors plus the tokenizer and metadata


def write_gguf(model, tokenizer, tokenizer_dir: Path, path: Path, *, quant: str, name: str,
               pre_tokenizer: str, marker: dict, description: str = "", license_id: str | None = None) -> None:
    """Write ``model`` (a merged LlamaForCausalLM) and its tokenizer to ``path`` (not atomic: the caller renames)."""
    import gguf
    from gguf import GGMLQuantizationType as T

    cfg = model.config
    _check_supported(cfg)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_type("model")
    writer.add_name(name)
    if description:
        writer.add_description(description)
    if license_id:
        writer.add_license(license_id)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(_rope_theta(cfg))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_file_type({
        "f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[quant])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    tokens, types = _vocab(tokenizer, cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=cfg.vocab_size)
    if not special.merges:
        raise TunesmithError("the tokenizer has no BPE merges", file=tokenizer_dir / "tokenizer.json", field="merges")
    # Ids and flags from the tokenizer itself, which is what tunesmith encodes with.
    for kind in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{kind}_token_id")
        if tid is not None:
            special.special_token_ids[kind] = int(tid)
    probe = tokenizer("a")["input_ids"]
    special.add_special_token = {
        "bos": bool(probe) and probe[0] == tokenizer.bos_token_id,
        "eos": bool(probe) and probe[-1] == tokenizer.eos_token_id and len(probe) > 1,
    }
    special.chat_template = tokenizer.chat_template or None
    special.add_to_gguf(writer, quiet=True)
    writer.add_add_space_prefix(False)
    writer.add_string(EXPORT_KEY, json.dumps(marker, sort_keys=True))

    for tname, data in _tensors(model):
        qtype = _tensor_type(tname, data, quant)
        data = np.ascontiguousarray(data)
        if qtype == T.F32:
            writer.add_tensor(tname, data.astype(np.float32))
        elif qtype == T.F16:
            writer.add_tensor(tname, data.astype(np.float16))
        else:
            writer.add_tensor(tname, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def exported_marker(path: Path) -> dict | None:
    """The export record of a GGUF file tunesmith wrote, or None for any other file."""
    try:
        from gguf import GGUFReader

        field = GGUFReader(path).fields.get(EXPORT_KEY)
        return json.loads(field.contents()) if field is not None else None
    except Exception:  # not a GGUF file, or a damaged one: not ours to replace
        return None


def modelfile(gguf_name: str, tokenizer) -> str:
    """An Ollama Modelfile for a ChatML model: the template in Go-template form and its stop tokens."""
    template = tokenizer.chat_template or ""
    if "<|im_start|>" not in template:
        raise TunesmithError(
            "--ollama writes templates for ChatML models (<|im_start|> ... <|im_end|>); this model's chat "
            "template is another kind",
            hint="export without --ollama and write the Modelfile's TEMPLATE by hand",
        )
    # The default system message the template adds when a conversation has none.
    probe = tokenizer.apply_chat_template([{"role": "user", "content": "\x00"}], tokenize=False)
    head = probe.split("<|im_start|>user", 1)[0]
    system = ""
    if head.startswith("<|im_start|>system\n") and head.endswith("<|im_end|>\n"):
        system = head[len("<|im_start|>system\n"):-len("<|im_end|>\n")]
    first = (
        '{{- if and (eq $i 0) (ne .Role "system") }}<|im_start|>system\n' + system + "<|im_end|>\n{{ end }}"
        if system else ""
    )
    go = (
        "{{- range $i, $_ := .Messages }}" + first
        + "<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
    )
    return (
        f"FROM ./{gguf_name}\n"
        f'TEMPLATE """{go}"""\n'
        'PARAMETER stop "<|im_end|>"\n'
        'PARAMETER stop "<|im_start|>"\n'
    )
