"""Qwen2-architecture decoder built from `transformers`' Qwen2 modules, with our own attention call.

The parameters (and their names: `embed_tokens`, `layers.{i}.self_attn.q_proj`, ..., `norm`) are transformers'
Qwen2 modules, so NextStep-1 / Qwen2.5 checkpoints load unchanged and `tests/unit/test_models.py` checks the forward
against `transformers.Qwen2Model`. The attention call is ours because speculative decoding needs two things HF's
cache API does not give: rows at different lengths with O(1) rollback (`KVCache`), and explicit post-softmax
probabilities for exactly one layer (the draft's entropy layer) while every other layer keeps fused SDPA.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2Attention, Qwen2MLP, Qwen2RMSNorm, Qwen2RotaryEmbedding, apply_rotary_pos_emb,
)

from ..config.schema import ARConfig
from .kv_cache import KVCache


def qwen2_config(ar: ARConfig, num_layers: int | None = None) -> Qwen2Config:
    cfg = Qwen2Config(
        vocab_size=ar.vocab_size, hidden_size=ar.hidden_size, intermediate_size=ar.intermediate_size,
        num_hidden_layers=num_layers if num_layers is not None else ar.num_layers,
        num_attention_heads=ar.num_heads, num_key_value_heads=ar.num_kv_heads,
        max_position_embeddings=ar.max_position_embeddings, rope_theta=ar.rope_theta, rms_norm_eps=ar.rms_norm_eps,
        tie_word_embeddings=False,
    )
    cfg._attn_implementation = "sdpa"
    cfg.o_proj_bias = ar.o_proj_bias
    return cfg


@dataclass
class Positions:
    """Where the T new tokens of every row sit. slots: (B,T) cache slots; rope: (B,T) RoPE positions;
    start: (B,) first real slot (left padding)."""

    slots: torch.Tensor
    rope: torch.Tensor
    start: torch.Tensor

    @classmethod
    def full(cls, attention_mask: torch.Tensor) -> "Positions":
        """Positions of a whole left-padded sequence (no cache). attention_mask: (B,T), 1 = real token."""
        B, T = attention_mask.shape
        start = (attention_mask == 0).long().cumprod(dim=1).sum(dim=1)  # number of leading pads
        slots = torch.arange(T, device=attention_mask.device)[None].expand(B, T)
        return cls(slots, (slots - start[:, None]).clamp(min=0), start)

    @classmethod
    def from_cache(cls, cache: KVCache, num_new: int) -> "Positions":
        slots = cache.slots(num_new)
        return cls(slots, slots - cache.start[:, None], cache.start)


def attention_mask_for(pos: Positions, num_keys: int) -> torch.Tensor:
    """(B,1,T,K) bool: key slot k is visible from a query at slot q iff start <= k <= q.
    A pad query (q < start) sees itself only, so its (unused) output stays finite."""
    k = torch.arange(num_keys, device=pos.slots.device)[None, None]
    q = pos.slots[:, :, None]
    visible = (k <= q) & (k >= pos.start[:, None, None])
    return (visible | (k == q))[:, None]


class DecoderLayer(nn.Module):
    """One Qwen2 block: pre-RMSNorm GQA attention with q/k/v bias + RoPE, then pre-RMSNorm SwiGLU MLP."""

    def __init__(self, config: Qwen2Config, layer_idx: int):
        super().__init__()
        self.self_attn = Qwen2Attention(config, layer_idx)
        if getattr(config, "o_proj_bias", False):  # NextStep `o_attention_bias: true` (Qwen2 has none)
            o = self.self_attn.o_proj
            self.self_attn.o_proj = nn.Linear(o.in_features, o.out_features, bias=True, device=o.weight.device)
        self.mlp = Qwen2MLP(config)
        self.input_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def attend(self, x, rope, pos: Positions, cache: KVCache | None, layer: int, explicit: bool):
        """x: (B,T,H) normed input. Returns (B,T,H) and, if `explicit`, probs (B,heads,T,K) with grad."""
        attn = self.self_attn
        B, T, _ = x.shape
        q = attn.q_proj(x).view(B, T, -1, attn.head_dim).transpose(1, 2)  # (B, nh, T, d)
        k = attn.k_proj(x).view(B, T, -1, attn.head_dim).transpose(1, 2)  # (B, nkv, T, d)
        v = attn.v_proj(x).view(B, T, -1, attn.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *rope)
        if cache is not None:
            k, v = cache.write(layer, pos.slots, k.transpose(1, 2), v.transpose(1, 2))
            k, v = k.transpose(1, 2).to(q.dtype), v.transpose(1, 2).to(q.dtype)
        mask = attention_mask_for(pos, k.shape[2])
        probs = None
        if explicit:  # the one layer whose attention map we need: softmax(QK^T/sqrt(d) + mask) in fp32
            rep = q.shape[1] // k.shape[1]
            kk, vv = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            scores = (q.float() @ kk.float().transpose(-1, -2)) * attn.scaling
            probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
            out = (probs.to(vv.dtype) @ vv)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling, enable_gqa=True)
        out = attn.o_proj(out.transpose(1, 2).reshape(B, T, -1))
        return out, probs

    def forward(self, h, rope, pos, cache=None, layer=0, explicit=False):
        a, probs = self.attend(self.input_layernorm(h), rope, pos, cache, layer, explicit)
        h = h + a
        h = h + self.mlp(self.post_attention_layernorm(h))
        return h, probs


class Output(dict):
    """A dict with attribute access. Model outputs are dicts, not dataclasses, because ZeRO-3 walks the tensors
    of a module's output (tuples, lists, dicts) to hook its backward; a dataclass would hide them."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError as e:
            raise AttributeError(key) from e


class BackboneOutput(Output):
    """hidden (B,T,H) after the final norm; layer_hidden {k: (B,T,H)} output of the first k layers (pre-norm);
    attn_probs (B,heads,T,K) of the explicit layer; attn_valid (B,T,K) bool keys each row may attend to."""

    def __init__(self, hidden, layer_hidden, attn_probs=None, attn_valid=None):
        super().__init__(hidden=hidden, layer_hidden=layer_hidden, attn_probs=attn_probs, attn_valid=attn_valid)


class Qwen2Backbone(nn.Module):
    """embed_tokens, layers, norm, rotary_emb -- Qwen2Model's modules and key names."""

    def __init__(self, ar: ARConfig, num_layers: int | None = None):
        super().__init__()
        self.config = qwen2_config(ar, num_layers)
        c = self.config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(c, i) for i in range(c.num_hidden_layers)])
        self.norm = Qwen2RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.rotary_emb = Qwen2RotaryEmbedding(config=c)
        self.gradient_checkpointing = False  # see activation_checkpointing()

    def activation_checkpointing(self, on: bool = True) -> "Qwen2Backbone":
        """Recompute each decoder layer in backward instead of storing its activations (training forwards
        without a KV cache only; NextStep-1 trains its 14B AR this way). Costs one extra layer forward."""
        self.gradient_checkpointing = bool(on)
        return self

    def rebuild_rope(self, device=None) -> None:
        """Recompute the RoPE frequencies (a non-persistent fp32 buffer, absent from checkpoints) on `device`;
        needed after building on the meta device and loading the weights with `assign=True`."""
        with torch.device(device or "cpu"):
            self.rotary_emb = Qwen2RotaryEmbedding(config=self.config)

    def new_cache(self, batch_size: int, max_len: int, device=None, dtype=None, static: bool = False) -> KVCache:
        c, w = self.config, self.embed_tokens.weight
        return KVCache.empty(len(self.layers), batch_size, max_len, c.num_key_value_heads,
                             c.hidden_size // c.num_attention_heads, device or w.device, dtype or w.dtype, static)

    def forward(self, embeds: torch.Tensor, pos: Positions, cache: KVCache | None = None,
                return_layers: tuple[int, ...] = (), explicit_layer: int | None = None) -> BackboneOutput:
        """embeds: (B,T,H) at positions `pos`. With a cache, keys/values are written to it (caller advances it)."""
        rope = self.rotary_emb(embeds, pos.rope)
        h, probs, layer_hidden = embeds, None, {}
        recompute = self.gradient_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            if recompute:  # non-reentrant: works with ZeRO-3's parameter hooks and inputs without grad
                h, p = checkpoint(layer, h, rope, pos, None, i, i == explicit_layer, use_reentrant=False)
            else:
                h, p = layer(h, rope, pos, cache, i, explicit=(i == explicit_layer))
            if p is not None:
                probs = p
            if i + 1 in return_layers:
                layer_hidden[i + 1] = h
        valid = attention_mask_for(pos, probs.shape[-1])[:, 0] if probs is not None else None
        if valid is not None:
            valid = valid & (torch.arange(valid.shape[-1], device=h.device)[None, None] >= pos.start[:, None, None])
        return BackboneOutput(self.norm(h), layer_hidden, probs, valid)
