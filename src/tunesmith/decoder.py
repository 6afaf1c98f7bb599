"""The forward pass used for decoding llama-family models, and their int8 weights.

transformers' forward pass builds each step out of ~20 modules per layer, a growing cache
(``torch.cat`` per layer and token) and mask logic; at batch 1 on a CPU that overhead, not the
arithmetic, is most of a step. ``Decoder`` runs the same computation with the same rounding
(RMSNorm in fp32, rotary tables from the model's own rotary module) on:

- fused weights: q, k and v in one matrix, gate and up in another (two matmuls fewer per layer);
  the model's own ``nn.Linear`` modules are pointed at views of the fused matrices, so the
  weights are held once and every other forward pass (perplexity, training code) sees them;
- a KV cache allocated once for the whole generation (prompt + max_tokens), written in place;
- optionally ``torch.compile`` of the one-token step (``Decoder.compile``), with the cache at a
  fixed size and the position as a tensor, so one graph serves every step.

``quantize_int8`` swaps each linear layer of the decoder (and the output head) for an
``Int8Linear``: symmetric int8 weights with one bf16 scale per output row, multiplied by
``torch._weight_int8pack_mm`` (weight-only: activations stay bf16). It halves the bytes a
decoding step reads; it is for generation only (training keeps bf16/fp32 weights).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F


class Int8Linear(torch.nn.Module):
    """``y = x @ (q * scale).T`` with int8 ``q`` (out, in) and one scale per output row."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        q, scale = quantize_rows(weight)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale.to(dtype))
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1]).to(self.scale.dtype)
        return torch._weight_int8pack_mm(flat, self.qweight, self.scale).reshape(*shape[:-1], self.out_features)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (q * scale), for code that reads a layer's matrix (the
        chunked loss of perplexity evaluation); the forward pass never builds it."""
        return self.qweight.to(self.scale.dtype) * self.scale[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights"


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: ``scale = max|w| / 127``, ``q = round(w / scale)``, computed in fp32."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale


def quantize_int8(model) -> None:
    """Replace the decoder's linear layers and the output head by ``Int8Linear`` (in place).

    The input embedding stays in the model's dtype (one row is read per token); a tied output
    head becomes its own int8 matrix."""
    dtype = model.dtype if model.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.bfloat16
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    for layer in inner.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    setattr(parent, name, Int8Linear(child.weight, dtype))
    head = inner.get_output_embeddings()
    if isinstance(head, torch.nn.Linear):
        inner.lm_head = Int8Linear(head.weight, dtype)
        if hasattr(inner.config, "tie_word_embeddings"):
            inner.config.tie_word_embeddings = False
    inner.tunesmith_quant = "int8"


def is_quantized(model) -> bool:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(inner, "tunesmith_quant", None) == "int8"


def supports(model) -> bool:
    """True for a frozen model of the llama layout this decoder implements (SmolLM2, Llama, and
    their merged fine-tunes). A model being trained (any parameter that requires grad, or LoRA
    layers not merged, as in training's samples) is not: its weights change under it."""
    if hasattr(model, "get_base_model") or any(p.requires_grad for p in model.parameters()):
        return False
    cfg = model.config
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if not (
        getattr(cfg, "model_type", None) == "llama"
        and not getattr(cfg, "attention_bias", False)
        and not getattr(cfg, "mlp_bias", False)
        and getattr(cfg, "hidden_act", "silu") == "silu"
        and rope.get("rope_type", "default") == "default"
        and getattr(cfg, "pretraining_tp", 1) == 1
    ):
        return False
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for layer in model.model.layers:
        mods = [getattr(layer.self_attn, n, None) for n in names[:4]] + [getattr(layer.mlp, n, None) for n in names[4:]]
        if not all(type(m) in (torch.nn.Linear, Int8Linear) for m in mods):
            return False
    return type(model.get_output_embeddings()) in (torch.nn.Linear, Int8Linear)


@dataclass
class _Linear:
    """One (possibly fused) weight: bf16/fp32 ``weight``, or int8 ``weight`` with ``scale``."""

    weight: torch.Tensor
    scale: torch.Tensor | None = None
    # oneDNN's own layout of a bf16 ``weight``, once ``pack()`` made it (see __call__)
    packed: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale is None:
            rows = x.numel() // x.shape[-1]
            if rows == 1:
                # One row: a matrix-vector product. With oneDNN on it gives the bits oneDNN's
                # matrix product gives that row (alone or in a batch), and reads the weights
                # at 15.5 GB/s against 10.7 (measured here, bench/NOTES.md).
                return torch.mv(self.weight, x.reshape(-1)).reshape(*x.shape[:-1], self.weight.shape[0])
            if self.packed is not None:
                # Several rows (the server's batch and prompts, eval's samples): oneDNN on weights
                # it reordered once, 21 ms a step's products for 4 rows against 29 for F.linear,
                # which reorders them on every call. Each row gets the bits torch.mv gives it
                # alone, whatever the other rows, in blocks of up to PACKED_BLOCK rows (F.linear's
                # rows change with the row count from 40 rows on; bench/NOTES.md). So a prompt
                # gives the same cache and logits alone or prefilled beside others.
                flat = x.reshape(rows, x.shape[-1])
                outs = [torch.ops.mkldnn._linear_pointwise(flat[r : r + PACKED_BLOCK], self.packed, None, "none", [], "")
                        for r in range(0, rows, PACKED_BLOCK)]
                out = outs[0] if len(outs) == 1 else torch.cat(outs)
                return out.reshape(*x.shape[:-1], self.weight.shape[0])
            return F.linear(x, self.weight)
        shape = x.shape
        out = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]), self.weight, self.scale)
        return out.reshape(*shape[:-1], self.weight.shape[0])


    def pack(self) -> None:
        """Make ``packed`` (once; bf16 weights on a CPU with oneDNN, else F.linear stays). It is a
        second copy of the weight, so only code that runs several rows makes it."""
        if self.packed is None and self.scale is None and self.weight.dtype == torch.bfloat16 \
                and self.weight.device.type == "cpu" and _onednn_bf16():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, 1)


def _onednn_bf16() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        return False


# Rows per call on oneDNN's reordered weights: blocks of up to 128 rows give each row the bits
# it gets alone; 160-256 rows did not for a (576, 1536) weight (measured, 2 threads).
PACKED_BLOCK = 128


def _fuse(parent, names: tuple[str, ...]) -> _Linear:
    """One matrix for several linear layers of ``parent`` (stacked by output rows); each layer's
    weight then becomes a view of it, so nothing is held twice."""
    mods = [getattr(parent, n) for n in names]
    if all(isinstance(m, Int8Linear) for m in mods):
        weight = torch.cat([m.qweight for m in mods]).contiguous()
        scale = torch.cat([m.scale for m in mods]).contiguous()
        row = 0
        for m in mods:
            rows = m.qweight.shape[0]
            m.qweight, m.scale = weight[row : row + rows], scale[row : row + rows]
            row += rows
        return _Linear(weight, scale)
    weight = torch.cat([m.weight.detach() for m in mods]).contiguous()
    row = 0
    for m in mods:
        rows = m.weight.shape[0]
        m.weight = torch.nn.Parameter(weight[row : row + rows], requires_grad=False)
        row += rows
    return _Linear(weight)


def _plain(module) -> _Linear:
    if isinstance(module, Int8Linear):
        return _Linear(module.qweight, module.scale)
    return _Linear(module.weight.detach())


class KVCache:
    """Keys and values of every layer for ``rows`` sequences of up to ``length`` positions,
    allocated once; ``filled`` positions hold data."""

    def __init__(self, layers: int, rows: int, kv_heads: int, length: int, head_dim: int, dtype, device):
        shape = (layers, rows, kv_heads, length, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.filled = 0

    @property
    def length(self) -> int:
        return self.k.shape[3]

    def rows(self, start: int, stop: int) -> KVCache:
        """A cache over rows ``start:stop`` of this one (views: writes land in this cache), empty."""
        view = KVCache.__new__(KVCache)
        view.k, view.v, view.filled = self.k[:, start:stop], self.v[:, start:stop], 0
        return view

    def grown(self, rows: int, length: int) -> KVCache:
        """A larger cache of ``rows`` rows and ``length`` positions holding this one's contents."""
        new = KVCache.__new__(KVCache)
        shape = (self.k.shape[0], rows, self.k.shape[2], length, self.k.shape[4])
        new.k = torch.zeros(shape, dtype=self.k.dtype, device=self.k.device)
        new.v = torch.zeros(shape, dtype=self.v.dtype, device=self.v.device)
        old_rows, old_length = self.k.shape[1], self.k.shape[3]
        new.k[:, :old_rows, :, :old_length] = self.k
        new.v[:, :old_rows, :, :old_length] = self.v
        new.filled = self.filled
        return new

    def move_row(self, src: int, dst: int, positions: int) -> None:
        """Copy row ``src``'s first ``positions`` positions into row ``dst``."""
        self.k[:, dst, :, :positions] = self.k[:, src, :, :positions]
        self.v[:, dst, :, :positions] = self.v[:, src, :, :positions]

    def repeat_first_row(self) -> None:
        """Copy sequence 0's cache into every other row (one prefill for n samples)."""
        self.k[:, 1:] = self.k[:, :1]
        self.v[:, 1:] = self.v[:, :1]


class Decoder:
    """The forward pass of a llama-family ``model`` for generation, on fused weights and a
    preallocated cache. ``forward(tokens, cache)`` appends ``tokens`` (rows, T) at position
    ``cache.filled`` and returns the float logits of the last position."""

    def __init__(self, model):
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        cfg = inner.config
        body = inner.model
        self.dtype = body.embed_tokens.weight.dtype
        self.device = body.embed_tokens.weight.device
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        self.scaling = self.head_dim**-0.5
        self.embed = body.embed_tokens.weight.detach()
        self.layers = []
        for layer in body.layers:
            a, m = layer.self_attn, layer.mlp
            self.layers.append((
                layer.input_layernorm.weight.detach(),
                _fuse(a, ("q_proj", "k_proj", "v_proj")),
                _plain(a.o_proj),
                layer.post_attention_layernorm.weight.detach(),
                _fuse(m, ("gate_proj", "up_proj")),
                _plain(m.down_proj),
            ))
        self.norm = body.norm.weight.detach()
        self.head = _plain(inner.lm_head)
        self.intermediate = cfg.intermediate_size
        self.q_size = self.heads * self.head_dim
        self.kv_size = self.kv_heads * self.head_dim
        # cos/sin for every position, from the model's own rotary module (same values as its forward)
        positions = torch.arange(cfg.max_position_embeddings, device=self.device)[None]
        probe = torch.zeros(1, dtype=self.dtype, device=self.device)
        cos, sin = body.rotary_emb(probe, positions)
        self.cos, self.sin = cos[0].contiguous(), sin[0].contiguous()
        self._compiled = None
        self._pack_lock = threading.Lock()
        self._kernel = None  # the C++ step: None until tried, False where it cannot be had
        self.use_kernel = True  # False: steps stay on the Python path (tests compare the two)

    def pack(self) -> None:
        """Multiply several rows on oneDNN's reordered copy of every bf16 weight from now on (see
        ``_Linear``): faster for a batch, and each row's bits then do not depend on the other
        rows. It holds the weights twice (270 MB more for the bundled model), so generation of
        one row does not call it; the server's batch and generations of several rows do."""
        with self._pack_lock:
            for layer in self.layers:
                for product in layer[1:3] + layer[4:6]:
                    product.pack()
            self.head.pack()

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def new_cache(self, rows: int, length: int) -> KVCache:
        return KVCache(self.num_layers, rows, self.kv_heads, length, self.head_dim, self.dtype, self.device)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * h.to(x.dtype)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def kernel(self):
        """The C++ decoding step over these weights (``decode_kernel``), or None where it cannot be
        had (not a CPU, not built, turned off)."""
        if self._kernel is None:
            with self._pack_lock:
                if self._kernel is None:
                    module = _decode_kernel().load() if self.device.type == "cpu" else None
                    if module is None:
                        self._kernel = False
                    else:
                        none = torch.empty(0)

                        def product(p: _Linear) -> list[torch.Tensor]:
                            return [p.weight, none if p.scale is None else p.scale]

                        layers = [[ln1, *product(qkv), *product(o), ln2, *product(gate_up), *product(down)]
                                  for ln1, qkv, o, ln2, gate_up, down in self.layers]
                        self._kernel = module.Step(self.embed, layers, self.norm, *product(self.head), self.cos,
                                                   self.sin, self.heads, self.kv_heads, self.head_dim,
                                                   self.intermediate, float(self.eps), float(self.scaling))
        return self._kernel or None

    def _prefill_step(self):
        """The C++ step for prompts (several tokens a row) of up to KERNEL_PROMPT_TOKENS, where its
        products of many rows are fast: bf16 weights multiplied on AMX tiles. Each token is then one row of the step, fed
        into its prompt's cache row, so a prompt's cache and logits are the same alone or
        prefilled beside others, whatever the thread count (oneDNN's products, the Python
        prefill's, keep rows apart only up to some number of rows, which depends on the threads:
        bench/NOTES.md, decoding round 6). Four prompts of 136 tokens: about 52 ms against 95."""
        if not self.use_kernel or self.dtype != torch.bfloat16 or self.head.scale is not None:
            return None
        step = self.kernel()
        if step is None or not _decode_kernel().load().tiles():
            return None
        return step

    def _attend(self, h: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int) -> torch.Tensor:
        """Attention of one layer for ``h`` (rows, T, q+k+v), the fused projections of T tokens at
        positions ``start`` on: rotate q and k, write k and v into the layer's cache ``keys`` /
        ``values`` (rows, kv_heads, length, head_dim), attend over positions up to the last one.
        Returns (rows, T, q_size)."""
        rows, t = h.shape[0], h.shape[1]
        end = start + t
        q_size, kv_size = self.q_size, self.kv_size
        cos, sin = self.cos[start:end][None, None], self.sin[start:end][None, None]
        q = h[..., :q_size].view(rows, t, self.heads, self.head_dim).transpose(1, 2)
        k = h[..., q_size : q_size + kv_size].view(rows, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = h[..., q_size + kv_size :].view(rows, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        attn = F.scaled_dot_product_attention(
            q, keys[:, :, :end], values[:, :, :end], is_causal=t > 1 and start == 0,
            attn_mask=_mask(t, start, end, q.device) if t > 1 and start > 0 else None,
            scale=self.scaling, enable_gqa=True)
        return attn.transpose(1, 2).reshape(rows, t, q_size)

    def forward(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Run ``tokens`` (rows, T) from position ``cache.filled``; float logits (rows, vocab) of the last one.
        One token per row runs the C++ step where it is available (``kernel``)."""
        rows, t = tokens.shape
        start = cache.filled
        end = start + t
        if end > cache.length:
            raise ValueError(f"the cache holds {cache.length} positions, {end} needed")
        if t == 1 and self.use_kernel and (step := self.kernel()) is not None:
            # one row alone: the AVX-512 products (a little faster); a batch: AMX tiles (kernel docs)
            logits = step(tokens[:, 0].tolist(), [start] * rows, cache.k, cache.v, rows > 1)
            cache.filled = end
            return logits
        if 1 < t <= KERNEL_PROMPT_TOKENS and (step := self._prefill_step()) is not None:
            ids = tokens.tolist()
            logits = _prompt_rows(step, [i for row in ids for i in row], list(range(start, end)) * rows,
                                  [r for r in range(rows) for _ in range(t)], [r * t + t - 1 for r in range(rows)],
                                  cache)
            cache.filled = end
            return logits
        x = F.embedding(tokens, self.embed)
        for i, (ln1, qkv, o, ln2, gate_up, down) in enumerate(self.layers):
            h = qkv(self._norm(x, ln1))
            x = x + o(self._attend(h, cache.k[i, :rows], cache.v[i, :rows], start))
            g, u = gate_up(self._norm(x, ln2)).split(self.intermediate, dim=-1)
            x = x + down(F.silu(g) * u)
        cache.filled = end
        return self.head(self._norm(x[:, -1:], self.norm))[:, -1].float()

    def prefill(self, prompts: list[torch.Tensor], cache: KVCache, rows: list[int]) -> torch.Tensor:
        """Run several prompts (1-D token ids) from position 0 in one pass, prompt ``i`` into row
        ``rows[i]`` of ``cache``; float logits (prompts, vocab) of each one's last token.

        The weight products run once over all the prompts' tokens (their weights are read once,
        not once per prompt), attention runs per prompt over its own positions. Each prompt's
        logits and cache rows hold the bits ``forward`` gives it alone (tested): a product's rows
        do not depend on the other rows, and each attention call has the shapes it has alone.
        (Padding the prompts to one length instead changes the bits of the shorter ones.)"""
        lengths = [int(p.numel()) for p in prompts]
        if max(lengths) > cache.length:
            raise ValueError(f"the cache holds {cache.length} positions, {max(lengths)} needed")
        step = self._prefill_step()
        short = [i for i, t in enumerate(lengths) if t <= KERNEL_PROMPT_TOKENS] if step is not None else []
        if short:
            # short prompts through the C++ step, the others through the Python pass; each prompt
            # takes the same path alone or beside others (its length decides)
            tokens, positions, cache_rows, last = [], [], [], []
            for i in short:
                tokens += prompts[i].reshape(-1).tolist()
                positions += range(lengths[i])
                cache_rows += [rows[i]] * lengths[i]
                last.append(len(tokens) - 1)
            logits = _prompt_rows(step, tokens, positions, cache_rows, last, cache)
            long = [i for i in range(len(prompts)) if i not in short]
            if not long:
                return logits
            rest = self._prefill_python([prompts[i] for i in long], cache, [rows[i] for i in long])
            out = torch.empty((len(prompts), logits.shape[1]), dtype=logits.dtype, device=logits.device)
            out[short], out[long] = logits, rest
            return out
        return self._prefill_python(prompts, cache, rows)

    def _prefill_python(self, prompts: list[torch.Tensor], cache: KVCache, rows: list[int]) -> torch.Tensor:
        """``prefill`` through PyTorch's operators (oneDNN's products on the reordered weights)."""
        lengths = [int(p.numel()) for p in prompts]
        starts = [sum(lengths[:i]) for i in range(len(lengths))]
        x = F.embedding(torch.cat([p.reshape(-1) for p in prompts])[None], self.embed)
        # every token's own position: q and k are rotated for all the prompts at once (the
        # rotation is elementwise, so each prompt gets the values it gets alone)
        positions = torch.cat([torch.arange(t, device=x.device) for t in lengths])
        cos, sin = self.cos[positions][None, None], self.sin[positions][None, None]
        total, q_size, kv_size = x.shape[1], self.q_size, self.kv_size
        for i, (ln1, qkv, o, ln2, gate_up, down) in enumerate(self.layers):
            h = qkv(self._norm(x, ln1))
            q = self._rotate(h[..., :q_size].view(1, total, self.heads, self.head_dim).transpose(1, 2), cos, sin)
            k = self._rotate(h[..., q_size : q_size + kv_size].view(1, total, self.kv_heads, self.head_dim)
                             .transpose(1, 2), cos, sin)
            v = h[..., q_size + kv_size :].view(1, total, self.kv_heads, self.head_dim).transpose(1, 2)
            outs = []
            for start, t, row in zip(starts, lengths, rows):
                keys, values = cache.k[i, row : row + 1], cache.v[i, row : row + 1]
                keys[:, :, :t] = k[:, :, start : start + t]
                values[:, :, :t] = v[:, :, start : start + t]
                outs.append(F.scaled_dot_product_attention(q[:, :, start : start + t], keys[:, :, :t], values[:, :, :t],
                                                           is_causal=t > 1, scale=self.scaling, enable_gqa=True))
            x = x + o(torch.cat(outs, dim=2).transpose(1, 2).reshape(1, total, q_size))
            g, u = gate_up(self._norm(x, ln2)).split(self.intermediate, dim=-1)
            x = x + down(F.silu(g) * u)
        last = x[0, [start + t - 1 for start, t in zip(starts, lengths)]][:, None]
        return self.head(self._norm(last, self.norm))[:, -1].float()

    def step_rows(self, tokens: list[int], positions: list[int], k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One token per row, row ``r`` at position ``positions[r]``, over the cache buffers
        ``k``/``v`` (``KVCache.k``/``.v``): the server's batched step. Float logits (rows, vocab).

        It runs the C++ step where it is available (``kernel``), whose rows each get the bits
        they get alone, whatever the other rows (its products sum every row and vector in one
        fixed order, on AMX tiles where the CPU has them, for one row too); elsewhere
        ``step_static`` (on ``pack``ed weights, which keep rows apart too)."""
        if self.use_kernel and (step := self.kernel()) is not None:
            return step(tokens, positions, k, v, True)  # tiles at every batch size: a row's bits never change
        device = self.embed.device
        return self.step_static(torch.tensor(tokens, device=device), torch.tensor(positions, device=device), k, v)

    # -- the one-token step with a position per row (compiled by Model.warm) -------------------
    def step_static(self, tokens: torch.Tensor, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One token per row, row ``r`` at position ``pos[r]`` (a (rows,) long tensor), over the
        whole cache buffers ``k``/``v`` (``KVCache.k``/``.v``; each row sees its positions up to
        its own). Shapes do not depend on the positions, so one compiled graph serves every step,
        and rows may be at different positions (sequences that joined a batch at different times).
        Returns float logits (rows, vocab); the caller advances ``pos``."""
        rows = tokens.shape[0]
        length = k.shape[3]
        row_ids = torch.arange(rows, device=tokens.device)
        cos = self.cos.index_select(0, pos)[:, None, None, :]
        sin = self.sin.index_select(0, pos)[:, None, None, :]
        mask = (torch.arange(length, device=tokens.device)[None, :] <= pos[:, None])[:, None, None, :]
        x = F.embedding(tokens[:, None], self.embed)
        q_size, kv_size = self.q_size, self.kv_size
        for i, (ln1, qkv, o, ln2, gate_up, down) in enumerate(self.layers):
            h = qkv(self._norm(x, ln1))
            q = h[..., :q_size].view(rows, 1, self.heads, self.head_dim).transpose(1, 2)
            kk = h[..., q_size : q_size + kv_size].view(rows, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            vv = h[..., q_size + kv_size :].view(rows, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            q, kk = self._rotate(q, cos, sin), self._rotate(kk, cos, sin)
            keys, values = k[i, :rows], v[i, :rows]
            keys[row_ids, :, pos] = kk[:, :, 0]
            values[row_ids, :, pos] = vv[:, :, 0]
            attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scaling, enable_gqa=True)
            x = x + o(attn.transpose(1, 2).reshape(rows, 1, q_size))
            g, u = gate_up(self._norm(x, ln2)).split(self.intermediate, dim=-1)
            x = x + down(F.silu(g) * u)
        return self.head(self._norm(x, self.norm))[:, -1].float()


# Prompts of at most this many tokens go through the C++ step (bf16, AMX); longer ones through
# the Python pass, whose attention (one call per prompt and layer) is faster from about 256
# tokens on (measured: 128 tokens 48 ms against 68, 256 106 against 113, 384 184 against 158).
KERNEL_PROMPT_TOKENS = 256
# Prompt tokens through the C++ step: at most this many (row, position) pairs a call, which
# bounds its attention scratch (4 bytes a pair and head) for long prompts; a token's results do
# not depend on which call it is in.
PROMPT_ATTENDED = 1 << 20


def _prompt_rows(step, tokens: list[int], positions: list[int], cache_rows: list[int], last: list[int],
                 cache: KVCache) -> torch.Tensor:
    """``step`` (the C++ step) over prompt tokens, a token a row, in order, in calls of at most
    PROMPT_ATTENDED attended positions; the float logits of the rows ``last`` (ascending)."""
    out, begin = [], 0
    while begin < len(tokens):
        end, widest = begin, 0
        while end < len(tokens) and (end == begin or (end + 1 - begin) * max(widest, positions[end] + 1) <= PROMPT_ATTENDED):
            widest = max(widest, positions[end] + 1)
            end += 1
        wanted = [r - begin for r in last if begin <= r < end]
        if wanted:
            out.append(step(tokens[begin:end], positions[begin:end], cache.k, cache.v, True, cache_rows[begin:end],
                            wanted))
        else:
            step(tokens[begin:end], positions[begin:end], cache.k, cache.v, True, cache_rows[begin:end], [end - begin - 1])
        begin = end
    return out[0] if len(out) == 1 else torch.cat(out)


def _decode_kernel():
    from . import decode_kernel

    return decode_kernel


def _mask(t: int, start: int, end: int, device) -> torch.Tensor:
    """Boolean attention mask for ``t`` new tokens at ``start`` over ``end`` positions (causal)."""
    rows = torch.arange(start, end, device=device)[:, None]
    cols = torch.arange(end, device=device)[None, :]
    return (cols <= rows)[None, None]


def cache_length(needed: int, limit: int, bucket: int = 256) -> int:
    """The cache size for ``needed`` positions: rounded up to ``bucket`` (so a compiled step is
    reused across generations of similar length), at most ``limit``."""
    return min(limit, max(bucket, math.ceil(needed / bucket) * bucket))
