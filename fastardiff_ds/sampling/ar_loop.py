"""Baseline generation: prefill, then per image token a full head chain (with CFG) and one KV-cached decode.

NextStep-1 `sample_image_tokens`: the condition of token i is the AR output at the position before it, so
prefill yields token 0's condition and decoding token i yields token i+1's: N tokens cost 1 prefill + N-1 decodes
and N chains of K head calls (a two-pass CFG call evaluates both branches in one batched call).
"""
from __future__ import annotations

from typing import Sequence

import torch

from .common import ARFlow, DecodeStats, GenerationResult, ar_rows, chain_dtype, make_field, prompt_rows, sample_rows


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="image tokens", leave=False)


@torch.no_grad()
def generate_ar(model: ARFlow, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_tokens: int,
                generators: Sequence[torch.Generator], progress: bool = False) -> GenerationResult:
    """Sample `num_tokens` image tokens per prompt.

    input_ids / attention_mask: (B*m, T) left-padded prompts ending in <boi>, m = model.cfg.batch_mult (rows [B,2B)
    are the unconditional prompts for two-pass CFG); generators: B per-sample generators.
    Returns tokens (B, N, D) and DecodeStats (target_forwards counts AR calls, target_head the head calls).
    """
    if num_tokens < 1:
        raise ValueError(f"num_tokens={num_tokens}: generate at least one image token")
    B, m = len(generators), model.cfg.batch_mult
    ids, mask = prompt_rows(input_ids, attention_mask, B, m)
    stats = DecodeStats()
    cache = model.ar.new_cache(B * m, ids.shape[1] + num_tokens)
    cond = model.ar.prefill(ids, mask, cache).cond[:, -1]  # (B*m, C): token 0's condition
    stats.target_forwards += 1
    dtype = chain_dtype(cond)
    everyone = torch.ones(B, dtype=torch.bool, device=ids.device)
    rows = torch.arange(B, device=ids.device)
    out = torch.zeros(B, num_tokens, model.token_dim, device=ids.device, dtype=dtype)
    bar = _progress(num_tokens, progress)
    for i in range(num_tokens):
        index = torch.full((B,), i, device=ids.device, dtype=torch.long)
        fld = make_field(model, cond, index, num_tokens, rows, stats.target_head, dtype)
        out[:, i] = model.finalize(sample_rows(model, fld, generators, rows, everyone, dtype).token)
        if i + 1 < num_tokens:  # the last token conditions nothing
            cond = model.ar.decode(ar_rows(out[:, i : i + 1], m), cache).cond[:, -1]
            stats.target_forwards += 1
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    stats.tokens = B * num_tokens
    return GenerationResult(out, stats)
