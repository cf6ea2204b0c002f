"""Target and draft AR models on NextStep-1's sequence layout.

Layout: `text · <|image_area|> h*w · <|begin_of_image|> · h·w image tokens · <|end_of_image|>`. Text positions take
`embed_tokens`, image positions take `image_in_projector(token)`. The head for image token i conditions on
`image_out_projector(h)` where h is the final-norm hidden state of the position *before* token i, so `prefill`
returns the condition of token 0 (the <boi> position) and `decode(tokens)` the conditions of the following tokens.
State-dict keys follow NextStep-1 (no `model.` prefix): `embed_tokens`, `layers.{i}.…`, `norm`, `image_*_projector`.

Feature-level (EAGLE-style) drafts read, besides each position's embedding, the target's final-norm hidden state of
the position before it (`feats`, see `draft_features`); the two are fused by `feature_fuse` before the first layer.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..config.schema import ModelConfig
from .backbone import Output, Positions, Qwen2Backbone
from .kv_cache import KVCache


def row_entropy(probs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Normalised attention entropy per row (Fast-ARDiff Eq. 5, Drift-AR normalisation).

    probs: (B, heads, T, K) post-softmax; valid: (B, T, K) bool. Heads are averaged first, then
    E = -sum_c A log A / log(n_valid), in [0, 1]; rows with fewer than 2 valid keys get 0. Returns (B, T).
    """
    a = probs.float().mean(dim=1)
    ent = -(a * a.clamp_min(1e-12).log()).masked_fill(~valid, 0.0).sum(dim=-1)
    n = valid.sum(dim=-1).float()
    return torch.where(n >= 2, ent / n.clamp_min(2).log(), torch.zeros_like(ent)).clamp(0.0, 1.0)


def draft_features(hidden: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """What a feature-level draft reads at each of T positions: the hidden state (B,T,H) of the position before it
    (zeros at the first position and after padding; `valid` (B,T) marks real positions of a left-padded prompt)."""
    prev = hidden if valid is None else hidden * valid[..., None].to(hidden.dtype)
    return torch.cat([torch.zeros_like(prev[:, :1]), prev[:, :-1]], 1)


class ARStep(Output):
    """What one AR call returns for its T input positions: cond (B,T,C) head condition for the token that follows
    each position; hidden (B,T,H) final-norm hidden states (the features the draft regresses); entropy (B,T)
    normalised entropy of the explicit layer; layer_hidden {k: (B,T,H)}; attn_probs (B,heads,T,K) with grad and
    attn_valid (B,T,K), explicit layer only; draft_feats (B,P+N-1,H) what a feature-level draft reads at every
    position of the same sequence (forward_train with draft_feats=True, `draft_features` of its hidden states)."""

    def __init__(self, cond, hidden, entropy=None, layer_hidden=None, attn_probs=None, attn_valid=None,
                 draft_feats=None):
        super().__init__(cond=cond, hidden=hidden, entropy=entropy, layer_hidden=layer_hidden or {},
                         attn_probs=attn_probs, attn_valid=attn_valid, draft_feats=draft_feats)


class ARModel(Qwen2Backbone):
    """Qwen2 backbone + NextStep-1's image projectors; KV-cached prefill/decode and a teacher-forcing forward."""

    def __init__(self, cfg: ModelConfig, num_layers: int | None = None):
        super().__init__(cfg.ar, num_layers)
        H, D = cfg.ar.hidden_size, cfg.image.token_dim
        self.token_dim = D
        self.image_in_projector = nn.Linear(D, H)
        self.image_out_projector = nn.Linear(H, H)
        self.explicit_layer: int | None = None  # layer whose attention entropy `decode` reports
        self.feature_fuse: nn.Linear | None = None  # feature-level drafts: [embedding, previous hidden] -> H

    @property
    def reads_features(self) -> bool:
        """True for a feature-level draft: every call needs `feats`, the target's previous hidden states."""
        return self.feature_fuse is not None

    def fuse(self, embeds: torch.Tensor, feats: torch.Tensor | None) -> torch.Tensor:
        if self.feature_fuse is None:
            if feats is not None:
                raise ValueError("feats given to an AR that does not read features (model.draft.kind=truncated)")
            return embeds
        if feats is None or feats.shape != embeds.shape:
            raise ValueError(f"a feature-level draft (model.draft.kind=eagle) needs feats of shape "
                             f"{tuple(embeds.shape)} (the target's hidden states), got "
                             f"{None if feats is None else tuple(feats.shape)}")
        return self.feature_fuse(torch.cat([embeds, feats.to(embeds.dtype)], -1))

    def _step(self, embeds, pos, cache, return_layers=(), explicit_layer=None, feats=None) -> ARStep:
        explicit = explicit_layer if explicit_layer is not None else self.explicit_layer
        out = self(self.fuse(embeds, feats), pos, cache, return_layers, explicit)
        ent = row_entropy(out.attn_probs, out.attn_valid) if out.attn_probs is not None else None
        return ARStep(self.image_out_projector(out.hidden), out.hidden, ent, out.layer_hidden, out.attn_probs,
                      out.attn_valid)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: KVCache, **kw) -> ARStep:
        """Write a left-padded prompt (B,T) ending in <boi> to an empty cache; cond[:, -1] conditions token 0."""
        if bool((cache.lengths != 0).any()):
            raise ValueError("prefill expects an empty cache; create one with new_cache()")
        pos = Positions.full(attention_mask)
        cache.start = pos.start.clone()
        cache.slots(input_ids.shape[1])  # overflow check
        step = self._step(self.embed_tokens(input_ids), pos, cache, **kw)
        cache.advance(input_ids.shape[1])
        return step

    def decode(self, tokens: torch.Tensor, cache: KVCache, **kw) -> ARStep:
        """Append image tokens (B,T,D) at each row's length; cond[:, j] conditions the token after tokens[:, j].
        A feature-level draft takes feats=(B,T,H): the hidden state that conditioned each of `tokens`."""
        pos = Positions.from_cache(cache, tokens.shape[1])
        step = self._step(self.image_in_projector(tokens.to(self.image_in_projector.weight.dtype)), pos, cache, **kw)
        cache.advance(tokens.shape[1])
        return step

    def forward_train(self, input_ids, attention_mask, image_tokens, return_layers=(), explicit_layer=None,
                      feats=None, draft_feats=False) -> ARStep:
        """Teacher forcing. input_ids/mask: (B,P) prompt ending in <boi>; image_tokens: (B,N,D).
        Returns ARStep over the N positions whose outputs condition tokens 0..N-1 (and, draft_feats=True, what a
        feature-level draft reads at all P+N-1 positions). feats (B,P+N-1,H): such a draft's input."""
        N = image_tokens.shape[1]
        emb = torch.cat([self.embed_tokens(input_ids),
                         self.image_in_projector(image_tokens[:, : N - 1].to(self.image_in_projector.weight.dtype))], 1)
        mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], N - 1)], 1)
        step = self._step(emb, Positions.full(mask), None, return_layers, explicit_layer, feats)
        cut = lambda t: None if t is None else t[:, -N:]  # noqa: E731
        probs = None if step.attn_probs is None else step.attn_probs[:, :, -N:]
        return ARStep(cut(step.cond), cut(step.hidden), cut(step.entropy),
                      {k: cut(v) for k, v in step.layer_hidden.items()}, probs, cut(step.attn_valid),
                      draft_features(step.hidden, mask) if draft_feats else None)


class TargetAR(ARModel):
    """The full-depth target (and teacher) AR."""


class DraftAR(ARModel):
    """Shallow draft: the first k layers of a target (weights copied) with its own final norm (Fast-ARDiff §4.1).

    `entropy_layer` (trained, penultimate by default) and `shallow_layer` (early stop at inference) are the only
    layers that compute attention probabilities explicitly; `decode` reports the shallow layer's entropy.
    With model.draft.kind=eagle (beyond the paper; EAGLE, Li et al. 2024) each position also reads the target's
    final-norm hidden state of the position before it -- the draft's own prediction of it for drafted tokens --
    through `feature_fuse` (2H -> H), initialised to pass the embedding through, so the draft starts as the
    truncated one.
    """

    def __init__(self, cfg: ModelConfig):
        k = cfg.draft.num_layers
        if not 1 <= k <= cfg.ar.num_layers:
            raise ValueError(f"model.draft.num_layers={k} must be in [1, model.ar.num_layers={cfg.ar.num_layers}]")
        super().__init__(cfg, num_layers=k)
        self.entropy_layer = cfg.draft.entropy_layer % k
        self.shallow_layer = cfg.draft.shallow_layer % k
        self.explicit_layer = self.shallow_layer
        if cfg.draft.kind == "eagle":
            H = cfg.ar.hidden_size
            self.feature_fuse = nn.Linear(2 * H, H)
            with torch.no_grad():  # [I | 0]: the embedding passes through, the features start with no weight
                self.feature_fuse.weight.zero_()
                self.feature_fuse.weight[:, :H].copy_(torch.eye(H))
                self.feature_fuse.bias.zero_()

    def load_target_state(self, state: dict) -> "DraftAR":
        """Initialise from a target's state dict (`target_to_draft_state`); the feature fuse keeps its init."""
        missing, unexpected = self.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith("feature_fuse.") for k in missing):
            raise ValueError(f"draft init from the target: unexpected keys {unexpected[:4]}, missing {missing[:4]}")
        return self

    @classmethod
    def from_target(cls, target: TargetAR, cfg: ModelConfig) -> "DraftAR":
        draft = cls(cfg).to(device=target.embed_tokens.weight.device, dtype=target.embed_tokens.weight.dtype)
        return draft.load_target_state(target_to_draft_state(target.state_dict(), cfg.draft.num_layers))


def target_to_draft_state(target_state: dict, num_layers: int) -> dict:
    """Draft initial weights: embeddings, projectors, layers < k and the final norm copied from the target."""
    out = {}
    for key, value in target_state.items():
        if key.startswith("layers."):
            if int(key.split(".")[1]) >= num_layers:
                continue
        out[key] = copy.deepcopy(value)
    return out
