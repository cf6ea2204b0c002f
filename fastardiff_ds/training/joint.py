"""One Fast-ARDiff joint training step (DESIGN.md §3, paper Eqs. 4-9).

Per step, with teacher forcing on real image tokens:
- AR branch: L_reg = SmoothL1(draft feature, sg target feature) at the N positions that condition image tokens,
  L_ent = -normalised attention entropy of the draft's penultimate layer (rows over those positions).
- Head branch, L_dist: stage 1 consistency distillation of the student against one CFG-guided teacher ODE step
  (EMA target), stage 2 DMD (fake score every step, generator every `gen_every` steps: DMD2's two time-scale
  update), with DMD2's backward simulation (train.backward_simulation) and optionally its GAN term on the fake
  score's features (train.gan_weight: the classifier tells data tokens from the student's).
- L = alpha(t) (L_reg + lambda_ent L_ent) + (1 - alpha(t)) L_dist. The draft, student (and target) are separate
  engines, so each gets the gradient of its own term: draft <- L_reg + lambda L_ent, student <- L_dist, and a
  trainable target receives dL_dist/dcond through a surrogate backward (the student's engine never touches the
  target's parameters). train.alpha_mode=lr (default) puts alpha on the learning rates (draft x alpha, student
  and target x (1 - alpha)); =loss weights the losses instead (schedules/alpha.py says why lr is the default).
  `step` is the optimizer step: the micro-batches of one accumulation window pass the same step.
Every engine call happens in the same order on every rank (ZeRO-3 collectives); branching depends on the step
number only.
"""
from __future__ import annotations

import copy
import logging

import torch

from .. import engines as E
from ..config import Config
from ..losses.consistency import ConsistencyConfig, consistency_distillation_loss
from ..losses.dmd import DMDConfig, dmd_fake_score_loss, dmd_generator_loss, few_step_generate
from ..losses.gan import gan_discriminator_loss, gan_generator_loss
from ..config.rules import align_layer
from ..losses.entropy import entropy_alignment_loss, entropy_loss
from ..losses.regression import feature_regression_loss
from ..schedules.alpha import AlphaSchedule, eq9_weights
from ..schedules.timesteps import time_grid
from .networks import head_fn

log = logging.getLogger(__name__)

class NonFiniteLoss(FloatingPointError):
    pass


def alpha_schedule(cfg: Config) -> AlphaSchedule:
    t = cfg.train
    return AlphaSchedule(t.alpha_kind, t.alpha0, t.alphaT, max(t.steps, 1), t.alpha_step_at)


def stage_of(cfg: Config, step: int) -> str:
    return "cd" if step < cfg.train.cd_steps else "dmd"


class JointStep:
    """Computes the losses of one step and steps the engines. `engines`: draft, student, fake [, target];
    `teacher`: frozen engine over a `TeacherNet`; `ema`: EMA tracker of the student with `ema_module` its copy
    (the CD target); `export_ema`: the tracker of the exported EMA (train.student_ema_decay > 0), else None.
    `disc_copy` (train.gan_weight > 0): a plain, replicated module of the fake-score network's shape. The
    generator's GAN term differentiates the classifier with respect to the student's samples only; run through the
    fake engine, that backward would start DeepSpeed's gradient reduction of an engine that has no gradients (ZeRO-2
    fails on it), so it runs on this copy, refreshed from the engine (gathered under ZeRO-3) before each generator
    step. None: a deep copy of the fake engine's module (unpartitioned engines only, e.g. the tests' stand-ins)."""

    def __init__(self, cfg: Config, engines: dict, teacher, ema, ema_module, uncond_prompt, rt=None,
                 export_ema=None, disc_copy=None):
        self.cfg, self.engines, self.teacher = cfg, engines, teacher
        self.rt = rt or E.Runtime()  # the finiteness vote; a world of one without a process group
        self.ema, self.ema_head = ema, head_fn(ema_module)
        self.export_ema, self.step_now, self.skipped = export_ema, 0, set()
        self.skips: dict[str, int] = {}  # per network: updates train.on_nonfinite=skip dropped in this process
        self.uncond_ids, self.uncond_mask = uncond_prompt  # (1, P) ids / mask of the negative ("" = empty) prompt
        self.alpha = alpha_schedule(cfg)
        self.alpha_mode = cfg.train.alpha_mode
        eq9_weights(self.alpha(0), self.alpha_mode)  # refuses an unknown mode before the first step
        self.measure, self.updates = False, {}
        self.draft_layer = cfg.model.draft.entropy_layer % cfg.model.draft.num_layers
        self.align_layer = align_layer(cfg) if cfg.train.entropy_objective == "align" else None
        self.eagle = cfg.model.draft.kind == "eagle"
        t = cfg.train
        grid = tuple(float(x) for x in time_grid(t.student_steps)[:-1]) if t.cd_on_grid else ()
        self.cd = ConsistencyConfig(delta=t.cd_delta, solver_steps=t.cd_solver_steps, t_max=max(0.98, 1.0 - t.cd_delta),
                                    guidance_min=t.guidance_min, guidance_max=t.guidance_max, t_grid=grid)
        self.dmd = DMDConfig()
        self.disc_copy = self.disc_sync = None
        if t.gan_weight > 0:
            fake = getattr(engines["fake"], "module", engines["fake"])
            if disc_copy is None:
                if any(hasattr(p, "ds_id") for p in fake.parameters()):
                    raise ValueError("train.gan_weight > 0 on a partitioned fake-score engine needs `disc_copy`: a "
                                     "plain module built from the unpartitioned network (training/trainer.py does)")
                disc_copy = copy.deepcopy(fake).requires_grad_(False)
            self.disc_copy, self.disc_sync = disc_copy, E.EMA(fake, disc_copy)

    # -- pieces ---------------------------------------------------------------------------------------------------
    def teacher_velocity(self, cond_c, cond_u):
        """(x, t, w) -> CFG-guided teacher velocity v_u + w (v_c - v_u), both branches in one head call."""
        def fn(x, t, w):
            v = self.teacher("velocity", torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond_c, cond_u]))
            v_c, v_u = v.chunk(2)
            return v_u + w.to(v.dtype)[:, None] * (v_c - v_u)
        return fn

    def _check(self, loss: str, value: torch.Tensor, step: int, net: str) -> bool:
        """All ranks agree on whether the loss `loss` of network `net` is finite (a rank-local decision would
        desynchronise ZeRO-3)."""
        if self.rt.all_finite(value):  # flag made on the loss's device, reduced on the communication device
            return True
        self._nonfinite(f"loss '{loss}' of network '{net}' is not finite at step {step}", net)
        return False

    def _nonfinite(self, what: str, net: str) -> None:
        """train.on_nonfinite: stop with `what`, or count the dropped update of `net` and warn naming it."""
        if self.cfg.train.on_nonfinite == "stop":
            raise NonFiniteLoss(f"{what}: stopping (train.on_nonfinite=stop). The last checkpoint is intact; lower "
                                "the learning rates (bf16: check for overflowing activations) or set "
                                "train.on_nonfinite=skip to skip such updates")
        self.skips[net] = self.skips.get(net, 0) + 1
        if self.rt.is_rank0:
            log.warning("%s: update of '%s' skipped (train.on_nonfinite=skip; %d so far for '%s', metric "
                        "nonfinite/%s)", what, net, self.skips[net], net, net)

    def _skip(self, name: str) -> None:
        """A loss train.on_nonfinite=skip dropped. With grad_accum > 1 the engine still takes its micro-step, with no
        backward (this micro-batch adds nothing to the window's gradient), so its accumulation windows stay aligned
        with the step numbers and the other engines'; at a window's end the others' gradients are applied."""
        self.skipped.add(name)
        if self.cfg.train.grad_accum > 1:
            self._step(name)

    def _step(self, name: str) -> None:
        """Step one engine; on logging steps record its relative update size ‖Δθ‖/‖θ‖ as update/<name>. An update
        DeepSpeed dropped for non-finite gradients (a finite loss whose backward overflowed: bf16) goes through
        train.on_nonfinite like a non-finite loss (the ranks agree: DeepSpeed's grad norm is all-reduced)."""
        size = E.step_with_update_size(self.engines[name], self.measure)
        if getattr(self.engines[name], "dropped", False):
            if name not in self.skipped:
                self._nonfinite(f"the gradients of network '{name}' are not finite at step {self.step_now} (its loss "
                                f"was finite: the backward overflowed) and DeepSpeed dropped the update", name)
            self.skipped.add(name)
            size = None
        if size is not None:
            self.updates[f"update/{name}"] = size
        if name == "student" and self.export_ema is not None:  # decay from the step number: resumes continue it
            self.export_ema.update(E.ema_decay(self.cfg.train.student_ema_decay, self.step_now))

    def _apply_alpha(self, step: int):
        """Eq. 9's weights at `step`: lr factors (and the student's stage factor) set on the engines now, loss
        factors returned."""
        w = eq9_weights(self.alpha(step), self.alpha_mode)
        self.step_now, self.skipped = step, set()
        # the student's CD -> DMD factor comes from the step number, not from the student's own LambdaLR: its
        # optimizer-step count lags the step after a skipped step (train.on_nonfinite=skip)
        stage = {"student": stage_lr_lambda(self.cfg)(step)}
        for name, scale in w.lr.items():
            if name in self.engines:
                self.engines[name].set_lr_scale(scale * stage.get(name, 1.0))
        log = max(self.cfg.train.log_every, 1)
        self.measure, self.updates = step == 0 or (step + 1) % log == 0, {}  # the steps the trainer logs
        return w

    # -- the step functions (training/loop.py calls the one of the step's stage) -----------------------------------
    def cd_step(self, inputs: tuple, step: int, gen: torch.Generator) -> dict:
        """Stage 1: AR branch + consistency distillation. inputs = (ids, mask, tokens)."""
        return self(*inputs, step, gen, stage="cd")

    def dmd_step(self, inputs: tuple, step: int, gen: torch.Generator) -> dict:
        """Stage 2: AR branch + DMD (fake score every step, generator every gen_every)."""
        return self(*inputs, step, gen, stage="dmd")

    def __call__(self, ids, mask, tokens, step: int, gen: torch.Generator, stage: str | None = None) -> dict:
        """ids/mask: (B,P) prompts (text dropout applied); tokens: (B,N,D) clean image tokens.
        `stage`: "cd" | "dmd" (default: from the step number, `stage_of`)."""
        cfg, e, B = self.cfg, self.engines, ids.shape[0]
        stage = stage or stage_of(cfg, step)
        w = self._apply_alpha(step)
        a = w.alpha
        uids = self.uncond_ids.expand(B, -1).to(ids.device)
        umask = self.uncond_mask.expand(B, -1).to(ids.device)
        if self.align_layer is None and not self.eagle:
            cond_t, hid_t = self.teacher("features", ids, mask, tokens)
            ent_t = feats = None
        else:  # the target's entropy rows (alignment) and a feature-level draft's inputs come from the same pass
            cond_t, hid_t, ent_t, feats = self.teacher("features_and_entropy", ids, mask, tokens, self.align_layer,
                                                       self.eagle)
        cond_u, _ = self.teacher("features", uids, umask, tokens)
        if "target" in e:
            out = e["target"]("forward_train", ids, mask, tokens)
            cond_s, hid_target = out.cond, out.hidden
        else:
            cond_s, hid_target = cond_t, hid_t
        metrics = {"alpha": a, "stage": 0.0 if stage == "cd" else 1.0}
        metrics.update({f"lr_scale/{n}": s for n, s in w.lr.items() if n in e})
        metrics.update(self.ar_branch(ids, mask, tokens, hid_target, w.loss["ar"], step, ent_t, feats))
        C, D = cond_s.shape[-1], tokens.shape[-1]
        cond_in = cond_s.detach().reshape(-1, C).requires_grad_("target" in e)
        guided = self.teacher_velocity(cond_t.reshape(-1, C), cond_u.reshape(-1, C))
        if stage == "cd":
            m = cfg.train.cd_batch_mul  # noise draws per token: every row (token, conditions) repeated m times

            def rep(a):
                rows = a.reshape(-1, a.shape[-1])
                return rows if m == 1 else rows.repeat(m, 1)
            guided_cd = guided if m == 1 else self.teacher_velocity(rep(cond_t), rep(cond_u))
            metrics.update(self.cd_branch(rep(tokens), rep(cond_in), guided_cd, w.loss["dist"], step, gen))
        else:
            metrics.update(self.dmd_branch(cond_in, guided, w.loss["dist"], step, gen, tokens.reshape(-1, D), B))
        if "target" in e and cond_in.grad is not None:  # surrogate: d(sum cond * g)/dtheta = dL_dist/dtheta
            # cond_in.grad already carries the student engine's 1/grad_accum; the target's backward divides again
            e["target"].backward((cond_s.reshape(-1, C) * cond_in.grad).sum() * cfg.train.grad_accum)
            self._step("target")
        elif "target" in e and "student" in self.skipped:  # L_dist was dropped: the target skips with the student
            self._skip("target")
        return {**metrics, **self.updates, **{f"nonfinite/{n}": float(self.skips.get(n, 0)) for n in e}}

    def ar_branch(self, ids, mask, tokens, hid_target, weight, step, target_entropy=None, feats=None) -> dict:
        """L_reg + lambda_ent * (L_ent, or the entropy alignment loss when `target_entropy` (B,N) is given).
        feats: a feature-level draft's inputs (the teacher's hidden states, `draft_features`)."""
        out = self.engines["draft"]("forward_train", ids, mask, tokens, explicit_layer=self.draft_layer, feats=feats)
        l_reg, m_reg = feature_regression_loss(out.hidden, hid_target)
        if feats is not None and self.cfg.train.draft_unroll > 1:
            l_reg, m_reg = self._unrolled_reg(ids, mask, tokens, hid_target, feats, out.hidden, l_reg, m_reg)
        if target_entropy is None:
            l_ent, m_ent, ents = entropy_loss(out.attn_probs, out.attn_valid)
        else:
            l_ent, m_ent, ents = entropy_alignment_loss(out.attn_probs, target_entropy, out.attn_valid)
        loss = l_reg + self.cfg.train.lambda_ent * l_ent
        if self._check("L_reg + L_ent", loss, step, "draft"):
            self.engines["draft"].backward(weight * loss)
            self._step("draft")
        else:
            self._skip("draft")
        return {**m_reg, **m_ent, "loss/ar": float(loss.detach()), "_draft_entropy": ents}

    def _unrolled_reg(self, ids, mask, tokens, hid_target, feats, hidden, l_reg, m_reg):
        """L_reg averaged over train.draft_unroll passes of a feature-level draft. Pass k reads, at every image
        position, the draft's own (detached) hidden state of pass k - 1 where pass 1 read the target's: what the
        draft sees when it drafts the k-th token of a round. The prompt positions keep the target's states, as in
        the sampler. Metrics: reg/loss and reg/cos of pass 1, reg/cos_pass{k} of the others."""
        n_fed = tokens.shape[1] - 1  # feats[:, -n_fed:] are the hidden states of image positions 0..N-2
        total, metrics = l_reg, dict(m_reg)
        for k in range(2, self.cfg.train.draft_unroll + 1):
            fed = torch.cat([feats[:, :-n_fed], hidden[:, :-1].detach().to(feats.dtype)], 1) if n_fed else feats
            hidden = self.engines["draft"]("forward_train", ids, mask, tokens, feats=fed).hidden
            l_k, m_k = feature_regression_loss(hidden, hid_target)
            total = total + l_k
            metrics[f"reg/cos_pass{k}"] = m_k["reg/cos"]
        return total / self.cfg.train.draft_unroll, metrics

    def cd_branch(self, tokens, cond_in, guided, weight, step, gen) -> dict:
        """tokens / cond_in: (M, D) / (M, C) rows, with `guided` over the same rows. train.cd_batch_mul > 1: every
        token's rows are repeated (__call__); the repeated conditions keep their graph to cond_in, so a trained
        target gets the mean of the draws' gradients."""
        student = self.engines["student"]
        l_cd, m = consistency_distillation_loss(head_fn(student), self.ema_head, guided, tokens, cond_in, gen,
                                                config=self.cd)
        if self._check("L_cd", l_cd, step, "student"):
            student.backward(weight * l_cd)
            self._step("student")
            self.ema.update(self.cfg.train.ema_decay)
        else:
            self._skip("student")
        return {**m, "loss/dist": float(l_cd.detach())}

    def dmd_branch(self, cond_in, guided, weight, step, gen, tokens, B: int) -> dict:
        """tokens: (B*N, D) clean image tokens (only DMD1's regression term, train.dmd_reg_weight, reads them)."""
        t = self.cfg.train
        N, D = tokens.shape[0] // B, tokens.shape[1]
        student, fake = self.engines["student"], self.engines["fake"]
        w = torch.full((B * N,), float(t.dmd_guidance), device=cond_in.device)
        grid = time_grid(t.student_steps, device=cond_in.device)[:-1]
        gen_step = (step - t.cd_steps) % t.gen_every == 0
        noise = torch.randn(B * N, D, generator=gen).to(cond_in.device)  # CPU generator: same draws on any device
        # The trained step k must be the same on every rank: it sets how many times the student (a ZeRO-3
        # engine, whose forwards are collective) runs, so it comes from the step number, not the rank's RNG.
        k = int(torch.randint(t.student_steps, (1,), generator=torch.Generator().manual_seed(self.cfg.seed + step)))
        with torch.set_grad_enabled(gen_step):  # backward simulation off: step k starts from noised data tokens
            x, _ = few_step_generate(head_fn(student), cond_in, noise, grid, gen, guidance=w, step_index=k,
                                     backward_simulation=t.backward_simulation, data=tokens)
        metrics = {}
        if gen_step:  # generator update against the current fake score (DMD2 order)
            real = lambda xx, tt: guided(xx, tt, w)  # noqa: E731
            fake_v = lambda xx, tt: head_fn(fake)(xx, tt, cond_in.detach())  # noqa: E731
            l_g, m = dmd_generator_loss(x.reshape(B, N, D), real, fake_v, gen, config=self.dmd)
            if t.dmd_reg_weight > 0:  # DMD1's regression onto the teacher's samples, at the DMD guidance
                l_r, _ = consistency_distillation_loss(head_fn(student), self.ema_head, guided, tokens, cond_in, gen,
                                                       config=self.cd, guidance=w)
                m["dmd/reg_loss"] = float(l_r.detach())
                l_g = l_g + t.dmd_reg_weight * l_r
            if t.gan_weight > 0:  # DMD2's GAN term: fool the fake score's classifier (its weights get no gradient)
                self.disc_sync.update(0.0)  # the copy := the fake-score network now (collective under ZeRO-3)
                frozen = lambda xx, tt: self.disc_copy("discriminate", xx, tt, cond_in.detach())  # noqa: E731
                l_a, m_a = gan_generator_loss(frozen, x, gen, self.dmd.t_min, self.dmd.t_max)
                m.update(m_a)
                l_g = l_g + t.gan_weight * l_a
            if self._check("L_dmd", l_g, step, "student"):
                student.backward(weight * l_g)
                self._step("student")
            else:
                self._skip("student")
            metrics.update(m)
            metrics["loss/dist"] = float(l_g.detach())
        l_f, m_f = dmd_fake_score_loss(head_fn(fake), x.detach(), cond_in.detach(), gen, config=self.dmd)
        if t.gan_weight > 0:  # the classifier learns data tokens (real) from the student's (fake) with the fake score
            disc = lambda xx, tt: fake("discriminate", xx, tt, cond_in.detach())  # noqa: E731
            l_d, m_d = gan_discriminator_loss(disc, tokens, x.detach(), gen, self.dmd.t_min, self.dmd.t_max)
            m_f.update(m_d)
            l_f = l_f + t.gan_disc_weight * l_d
        if self._check("L_fake", l_f, step, "fake"):
            fake.backward(l_f)  # DMD's auxiliary score: outside Eq. 9, never weighted
            self._step("fake")
        else:
            self._skip("fake")
        metrics.update(m_f)
        return metrics


def stage_lr_lambda(cfg: Config):
    """Student lr multiplier at training step `step`: lr_student_cd during stage 1, lr_student_dmd after (paper
    S2.3). JointStep applies it with alpha's factor (set_lr_scale); the student engine's own schedule is flat."""
    ratio = cfg.train.lr_student_dmd / cfg.train.lr_student_cd
    cd = cfg.train.cd_steps

    def fn(step: int) -> float:
        return 1.0 if step < cd else ratio
    return fn
