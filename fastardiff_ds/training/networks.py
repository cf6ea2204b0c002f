"""The networks of a Fast-ARDiff run and how their weights map onto checkpoint keys.

DeepSpeed's ZeRO-3 hooks start at the module handed to `deepspeed.initialize`, and an engine only calls that
module's `forward`. Our models expose several entry points (`forward_train`, `prefill`, `decode`, the head call),
so every network is wrapped in `Dispatch`, whose forward(method, *args) calls that method: one root module, every
entry point under the engine's hooks. Parameter names gain an `inner.` prefix; `*_keys` map them back to the
NextStep-1 layout of the teacher checkpoint.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import Config
from ..models import DraftAR, FlowHead, TargetAR, build_head, build_target, grow_state
from ..models.ar import target_to_draft_state


class Dispatch(nn.Module):
    """Root module for an engine: forward(method, *args, **kw) -> inner.method(*args, **kw)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, method: str, *args, **kwargs):
        return getattr(self.inner, method)(*args, **kwargs)


class TeacherNet(nn.Module):
    """The frozen original model: AR + flow head in one module (one inference engine, one process group)."""

    def __init__(self, ar: TargetAR, head: FlowHead):
        super().__init__()
        self.ar, self.head = ar, head

    def features(self, input_ids, attention_mask, tokens):
        """(cond (B,N,C), hidden (B,N,H)) for teacher-forced image tokens (B,N,D)."""
        out = self.ar.forward_train(input_ids, attention_mask, tokens)
        return out.cond, out.hidden

    def features_and_entropy(self, input_ids, attention_mask, tokens, layer: int | None = None,
                             draft_feats: bool = False):
        """(cond, hidden, entropy (B,N) of `layer` or None, a feature-level draft's input (B,P+N-1,H) or None)
        from one teacher-forced pass."""
        out = self.ar.forward_train(input_ids, attention_mask, tokens, explicit_layer=layer, draft_feats=draft_feats)
        return out.cond, out.hidden, out.entropy, out.draft_feats

    def entropy(self, input_ids, attention_mask, tokens, layer: int):
        """Normalised attention entropy (B,N) of `layer` at the image-conditioning positions."""
        return self.ar.forward_train(input_ids, attention_mask, tokens, explicit_layer=layer).entropy

    def velocity(self, x, t, cond):
        return self.head(x, t, cond)


def head_fn(engine):
    """Adapt a head engine (or Dispatch module) to the head protocol head(x, t, cond, guidance=None)."""
    return lambda x, t, cond, guidance=None: engine("forward", x, t, cond, guidance)


def teacher_key(name: str) -> str:
    """`inner.ar.layers.0...` -> `layers.0...`; `inner.head.net...` -> `image_head.net...` (NextStep-1)."""
    name = name.removeprefix("inner.")
    return "image_head." + name.removeprefix("head.") if name.startswith("head.") else name.removeprefix("ar.")


def build_teacher_net(cfg: Config) -> Dispatch:
    return Dispatch(TeacherNet(build_target(cfg), build_head(cfg)).eval().requires_grad_(False))


def load_teacher_state(cfg: Config) -> dict[str, torch.Tensor]:
    """The teacher checkpoint as a flat NextStep-layout state dict (validated against the preset)."""
    from pathlib import Path

    from ..models import from_pretrained, nextstep_state, resolve_asset

    cfg.train.teacher = resolve_asset(cfg.train.teacher)
    if not Path(cfg.train.teacher).exists():
        raise FileNotFoundError(f"teacher checkpoint '{cfg.train.teacher}' not found: set train.teacher to a "
                                "local NextStep-1 folder or a checkpoint written by launcher/pretrain_t2i.py "
                                "(the tiny preset ships assets/tiny_teacher)")
    target, head = from_pretrained(cfg.train.teacher, cfg)
    return nextstep_state(target, head)


def init_networks(cfg: Config, teacher_state: dict[str, torch.Tensor]) -> dict[str, nn.Module]:
    """Trainable networks initialised from the teacher: target AR (only with train.target_ar), draft (first k layers
    + own norm), student head (teacher head + zero-initialised guidance embedding, grown to model.student_head
    as the same function), fake score (teacher head, with a fresh GAN classifier when train.gan_weight > 0).
    The trained ARs recompute their layers in backward when train.activation_checkpointing is set.
    The full target is not built unless it is trained: at 14B it would be a 56 GB fp32 copy per rank."""
    ar_state = {k: v for k, v in teacher_state.items() if not k.startswith("image_head.")}
    head_state = {k.removeprefix("image_head."): v for k, v in teacher_state.items() if k.startswith("image_head.")}
    student, fake = build_head(cfg, student=True), build_head(cfg, discriminator=cfg.train.gan_weight > 0)
    student.load_state_dict(grow_state(head_state, student.state_dict()))  # = the teacher head (model.student_head)
    fake.load_state_dict({**fake.state_dict(), **head_state})  # the teacher head; a GAN classifier keeps its init
    draft = DraftAR(cfg.model).load_target_state(target_to_draft_state(ar_state, cfg.model.draft.num_layers))
    if not cfg.model.draft.train_embeddings:  # 778M frozen params at 14B scale: the draft reuses the target's
        draft.embed_tokens.requires_grad_(False)
    draft.activation_checkpointing(cfg.train.activation_checkpointing)
    nets = {"draft": Dispatch(draft), "student": Dispatch(student), "fake": Dispatch(fake)}
    if cfg.train.target_ar:
        target = build_target(cfg)
        target.load_state_dict(ar_state)
        nets["target"] = Dispatch(target.activation_checkpointing(cfg.train.activation_checkpointing))
    return nets
