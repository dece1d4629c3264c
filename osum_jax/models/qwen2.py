"""Qwen2 decoder-only LM with peft-style LoRA (Hugging Face ``Qwen2ForCausalLM`` semantics).

Forward, for input embeddings ``x [B, S, D]``, a validity mask ``[B, S]`` and explicit ``positions [B, S]``::

    for each layer (nnx.scan):
        h = x + o_proj(Attn(rope(q_proj(RMS(x))), rope(k_proj(..)), v_proj(..), causal & valid keys))
        x = h + down_proj(silu(gate_proj(RMS(h))) * up_proj(RMS(h)))
    hidden = RMS(x)
    logits = hidden @ lm_head                 # float32, [B, S, V]

Grouped-query attention: ``num_heads`` query heads share ``num_kv_heads`` key/value heads. q/k/v carry
biases, o/gate/up/down do not. LoRA sits on the projections named in ``LoRAConfig.targets`` (OSUM: q, k, v,
o, gate, down — not up).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ..config import LLMConfig, LoRAConfig
from .attention import SequenceMask, dot_product_attention, heads_major, sequence_multiple
from .layers import RMSNorm, as_dtype, param, split_key
from .lora import LoRALinear
from .ops import Ops
from .positions import apply_rope, rope_cos_sin
from .stack import create_stacked, run_stacked


def _proj(name: str, n_in: int, n_out: int, axes, bias: bool, cfg: LLMConfig, lora: LoRAConfig, kw, rngs):
    rank = lora.rank_of(name)
    return LoRALinear(n_in, n_out, axes=axes, use_bias=bias, rank=rank, alpha=lora.alpha,
                      lora_dropout=lora.dropout, init_std=cfg.initializer_range, rngs=rngs, **kw)


class Qwen2Attention(nnx.Module):
    def __init__(self, cfg: LLMConfig, lora: LoRAConfig, *, dtype, param_dtype, ops: Ops | None = None,
                 rngs: nnx.Rngs):
        ops = ops if ops is not None else Ops()
        kw = dict(dtype=dtype, param_dtype=param_dtype, ops=ops)
        d, hd = cfg.hidden_size, cfg.resolved_head_dim
        b = cfg.attention_bias
        self.q_proj = _proj("q_proj", d, cfg.num_heads * hd, ("embed", "heads"), b, cfg, lora, kw, rngs)
        self.k_proj = _proj("k_proj", d, cfg.num_kv_heads * hd, ("embed", "kv_heads"), b, cfg, lora, kw, rngs)
        self.v_proj = _proj("v_proj", d, cfg.num_kv_heads * hd, ("embed", "kv_heads"), b, cfg, lora, kw, rngs)
        self.o_proj = _proj("o_proj", cfg.num_heads * hd, d, ("heads", "embed"), False, cfg, lora, kw, rngs)
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        self.ops = ops

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
                 dropout_key: jax.Array | None = None, cache: tuple[jax.Array, jax.Array] | None = None,
                 write_pos: jax.Array | int = 0):
        """``x [B, T, D]`` -> ``[B, T, D]``.

        With ``cache = (k [B, S_max, KV, H], v)`` the new keys/values are written at ``write_pos`` and attention
        runs over the whole cache (``mask [B, 1, T, S_max]``); returns ``(out, (k, v))``.
        """
        b, s, _ = x.shape
        kq, kk, kv, ko = split_key(dropout_key, 4)
        ops = self.ops
        if isinstance(mask, SequenceMask) and heads_major(ops.attention_impl, self.q_proj.dtype, self.head_dim, s,
                                                          ops.platform):
            q = apply_rope(self.q_proj.to_heads(x, self.num_heads, kq), cos, sin, heads_major=True, ops=ops)
            k = apply_rope(self.k_proj.to_heads(x, self.num_kv_heads, kk), cos, sin, heads_major=True, ops=ops)
            v = self.v_proj.to_heads(x, self.num_kv_heads, kv)
            o = dot_product_attention(q, k, v, mask, ops, heads_major=True)
            return self.o_proj.from_heads(o, ko)
        q = self.q_proj(x, kq).reshape(b, s, self.num_heads, self.head_dim)
        k = self.k_proj(x, kk).reshape(b, s, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x, kv).reshape(b, s, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin, ops=ops), apply_rope(k, cos, sin, ops=ops)
        if cache is not None:
            at = (0, write_pos, 0, 0)
            k = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), at)
            v = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), at)
        o = dot_product_attention(q, k, v, mask, ops)
        out = self.o_proj(o.reshape(b, s, self.num_heads * self.head_dim), ko)
        return out if cache is None else (out, (k, v))


class Qwen2MLP(nnx.Module):
    def __init__(self, cfg: LLMConfig, lora: LoRAConfig, *, dtype, param_dtype, ops: Ops | None = None,
                 rngs: nnx.Rngs):
        ops = ops if ops is not None else Ops()
        kw = dict(dtype=dtype, param_dtype=param_dtype, ops=ops)
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = _proj("gate_proj", d, f, ("embed", "mlp"), False, cfg, lora, kw, rngs)
        self.up_proj = _proj("up_proj", d, f, ("embed", "mlp"), False, cfg, lora, kw, rngs)
        self.down_proj = _proj("down_proj", f, d, ("mlp", "embed"), False, cfg, lora, kw, rngs)
        self.ops = ops

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        kg, ku, kd = split_key(dropout_key, 3)
        return self.down_proj(self.ops.silu(self.gate_proj(x, kg)) * self.up_proj(x, ku), kd)


class Qwen2DecoderLayer(nnx.Module):
    def __init__(self, cfg: LLMConfig, lora: LoRAConfig, *, dtype, param_dtype, ops: Ops | None = None,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
        self.self_attn = Qwen2Attention(cfg, lora, ops=ops, rngs=rngs, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
        self.mlp = Qwen2MLP(cfg, lora, ops=ops, rngs=rngs, **kw)

    def __call__(self, x, cos, sin, mask, dropout_key=None, cache=None, write_pos=0):
        ka, km = split_key(dropout_key, 2)
        h = self.self_attn(self.input_layernorm(x), cos, sin, mask, ka, cache, write_pos)
        if cache is not None:
            h, cache = h
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x), km)
        return x if cache is None else (x, cache)


class Qwen2(nnx.Module):
    """Token embeddings, the stacked decoder layers, the final norm and the (untied) LM head."""

    def __init__(self, cfg: LLMConfig, lora: LoRAConfig, *, dtype="float32", param_dtype="float32",
                 remat: str = "none", ops: Ops | None = None, rngs: nnx.Rngs):
        ops = ops if ops is not None else Ops()
        dt, pdt = as_dtype(dtype), as_dtype(param_dtype)
        std = cfg.initializer_range
        self.embed_tokens = param(std * jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.hidden_size), pdt),
                                  ("vocab", "embed"))
        self.layers = create_stacked(
            lambda r: Qwen2DecoderLayer(cfg, lora, dtype=dt, param_dtype=pdt, ops=ops, rngs=r),
            cfg.num_layers, rngs)
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dt, param_dtype=pdt)
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = param(std * jax.random.normal(rngs.params(), (cfg.hidden_size, cfg.vocab_size), pdt),
                                 ("embed", "vocab"))
        self.cfg = cfg
        self.dtype = dt
        self.remat = remat
        self.ops = ops

    def embed(self, ids: jax.Array) -> jax.Array:
        """``ids [...]`` (all >= 0) -> embeddings ``[..., D]`` in the compute dtype."""
        return jnp.take(self.embed_tokens[...], ids, axis=0).astype(self.dtype)

    def __call__(self, inputs_embeds: jax.Array, valid: jax.Array, positions: jax.Array,
                 dropout_key: jax.Array | None = None) -> jax.Array:
        """``inputs_embeds [B, S, D]``, ``valid [B, S]`` bool, ``positions [B, S]`` -> normed hidden ``[B, S, D]``."""
        s = inputs_embeds.shape[1]
        pad = -s % sequence_multiple(self.ops.attention_impl, self.dtype, self.cfg.resolved_head_dim, s,
                                     self.ops.platform)
        if pad:  # once for all layers: trailing padding is invalid, so no valid position ever attends to it
            inputs_embeds = jnp.pad(inputs_embeds, ((0, 0), (0, pad), (0, 0)))
            valid, positions = jnp.pad(valid, ((0, 0), (0, pad))), jnp.pad(positions, ((0, 0), (0, pad)))
        cos, sin = rope_cos_sin(positions, self.cfg.resolved_head_dim, self.cfg.rope_theta)
        mask = SequenceMask(valid, causal=True)
        x = run_stacked(self.layers, inputs_embeds.astype(self.dtype),
                        lambda layer, h, k: layer(h, cos, sin, mask, k), self.cfg.num_layers,
                        dropout_key=dropout_key, remat=self.remat, ops=self.ops)
        return self.norm(x[:, :s])

    def init_cache(self, batch: int, max_len: int) -> tuple[jax.Array, jax.Array]:
        """Empty KV cache ``[layers, B, max_len, KV, head_dim]`` (keys, values) in the compute dtype."""
        shape = (self.cfg.num_layers, batch, max_len, self.cfg.num_kv_heads, self.cfg.resolved_head_dim)
        return jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype)

    def forward_cached(self, inputs_embeds: jax.Array, mask: jax.Array, positions: jax.Array,
                       cache: tuple[jax.Array, jax.Array], write_pos: jax.Array | int):
        """Run ``inputs_embeds [B, T, D]`` written at cache index ``write_pos``; ``mask [B, 1, T, S_max]``.

        Returns the normed hidden ``[B, T, D]`` and the updated cache. Used for prefill and decoding.
        """
        cos, sin = rope_cos_sin(positions, self.cfg.resolved_head_dim, self.cfg.rope_theta)

        def body(x, layer, k, v):
            x, (k, v) = layer(x, cos, sin, mask, None, (k, v), write_pos)
            return x, (k, v)

        scan = nnx.scan(body, in_axes=(nnx.Carry, 0, 0, 0), out_axes=(nnx.Carry, 0))
        x, cache = scan(inputs_embeds.astype(self.dtype), self.layers, cache[0], cache[1])
        return self.norm(x), cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """``hidden [..., D]`` -> float32 logits ``[..., V]``."""
        w = self.embed_tokens[...].T if self.lm_head is None else self.lm_head[...]
        return jnp.dot(hidden.astype(self.dtype), w.astype(self.dtype),
                       preferred_element_type=jnp.float32).astype(jnp.float32)
