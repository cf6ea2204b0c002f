"""Prompts -> images for every inference mode, from one checkpoint folder.

Modes (Fast-ARDiff Table 2): `baseline` = target AR + teacher head, N-step SDE/ODE, two-pass CFG;
`sd` = speculative decoding (draft AR + target verification) + teacher head; `dmd` = target AR + few-step
CFG-distilled student head; `fastardiff` = draft + target verification + student head + entropy early stop.
`load_pipeline(ckpt, preset, mode)` is what launcher/generate.py, the eval suites and the benchmark call.
"""
from __future__ import annotations

import torch

from .config import Config, apply_overrides
from .models import (ModelBundle, build_image_tokenizer, check_special_token_ids, load_config, load_pretrained,
                     load_text_tokenizer, resolve_asset)
from .models.text_tokenizer import cfg_captions
from .sampling.ar_loop import generate_ar
from .sampling.common import ARFlow, GenerationResult
from .sampling.flow import SamplerConfig
from .sampling.guidance import CFGConfig
from .sampling.noise import make_generators
from .sampling.official import check_mode_settings, resolve_noise_level
from .visual import to_pil

MODES = ("baseline", "sd", "dmd", "fastardiff")


class Pipeline:
    """`generate(prompts, seeds) -> list[PIL.Image]`; the same seed gives the same image."""

    def __init__(self, bundle: ModelBundle, mode: str, device="cpu", progress: bool = False):
        if mode not in MODES:
            raise ValueError(f"unknown mode '{mode}': choose one of {', '.join(MODES)}")
        self.bundle, self.mode, self.device, self.progress = bundle, mode, device, progress
        cfg = bundle.cfg
        cfg.model.text.path = resolve_asset(cfg.model.text.path)
        self.text = load_text_tokenizer(cfg.model.text)
        check_special_token_ids(cfg.model.text, self.text)
        self.image = build_image_tokenizer(cfg.model.image, device)
        if mode in ("dmd", "fastardiff") and bundle.student is None:
            raise ValueError(f"mode '{mode}' needs a distilled student head (student_head.safetensors) in the "
                             "checkpoint: train one with launcher/train_t2i.py, or use --mode baseline / sd")
        if mode in ("sd", "fastardiff") and bundle.draft is None:
            raise ValueError(f"mode '{mode}' needs a draft AR (draft.safetensors) in the checkpoint: train one "
                             "with launcher/train_t2i.py, or use --mode baseline / dmd")
        check_mode_settings(mode, bundle.cfg.inference.sampler, bundle.cfg.inference.negative_prompt)
        self.stats = []
        self.compiler = None
        if self.inf.compile:
            from .sampling.compiled import CompileOptions, Compiler

            self.compiler = Compiler(CompileOptions(mode=self.inf.compile_mode))

    @property
    def inf(self):
        return self.bundle.cfg.inference

    def teacher_flow(self, ar) -> ARFlow:
        inf = self.inf
        sampler = SamplerConfig(inf.sampler, inf.num_steps, resolve_noise_level(inf.sampler, inf.noise_level),
                                inf.time_shift)
        cfg = CFGConfig(inf.cfg_scale, inf.cfg_schedule, "two_pass" if inf.cfg_scale != 1.0 else "none")
        return self._compiled(ARFlow(ar, self.bundle.head, sampler, cfg, self.bundle.cfg.model.image.token_layernorm))

    def _compiled(self, flow: ARFlow) -> ARFlow:
        return self.compiler.flow(flow) if self.compiler is not None else flow

    def student_flow(self, ar, steps: int | None = None) -> ARFlow:
        inf = self.inf
        sampler = SamplerConfig("consistency", steps or inf.student_steps, final_std=inf.student_final_std)
        cfg = CFGConfig(inf.cfg_scale, inf.cfg_schedule, "distilled")
        return self._compiled(ARFlow(ar, self.bundle.student, sampler, cfg,
                                     self.bundle.cfg.model.image.token_layernorm))

    def prompt_batch(self, prompts: list[str], cfg_rows: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask) of the B prompts (+ B negative-prompt rows for two-pass CFG), as NextStep builds them."""
        captions = cfg_captions(list(prompts), cfg_rows, self.inf.positive_prompt, self.inf.negative_prompt)
        return self.text.batch(captions, self.bundle.cfg.model.image.grid)

    def generate_tokens(self, prompts: list[str], seeds: list[int]) -> GenerationResult:
        n = self.bundle.cfg.model.image.num_tokens
        target = self.bundle.target
        flow = self.student_flow(target) if self.mode in ("dmd", "fastardiff") else self.teacher_flow(target)
        ids, mask = self.prompt_batch(prompts, flow.cfg.batch_mult == 2)
        gens = make_generators(seeds, "cpu")
        ids, mask = ids.to(self.device), mask.to(self.device)
        if self.mode in ("baseline", "dmd"):
            return generate_ar(flow, ids, mask, n, gens, progress=self.progress)
        from .sampling.speculative import SpecConfig, speculative_generate

        if self.mode == "fastardiff":
            draft_flow = self.student_flow(self.bundle.draft, self.inf.draft_steps)
        else:
            draft_flow = self.teacher_flow(self.bundle.draft)
        tau = self.inf.tau if self.inf.tau is not None else self.bundle.meta.get("tau")
        if self.mode == "sd" or tau is None:
            tau = float("-inf")  # sd: no early stop
        inf = self.inf
        spec = SpecConfig(inf.gamma, float(tau), inf.accept, inf.relax_temperature, inf.cspd_inner_temperature,
                          inf.max_resample_tries, inf.draft_policy, inf.draft_cost, inf.probe_drafts,
                          inf.prefill_ratio, inf.cspd_independent, inf.feature_threshold, inf.feature_metric,
                          inf.commit)
        return speculative_generate(flow, draft_flow, ids, mask, n, gens, spec, progress=self.progress)

    def rule(self) -> dict:
        """How this pipeline's images are made, as written beside them (stats.json, the benchmark JSON, eval image
        folders): the mode, and for speculative modes the acceptance rule with the tolerances it reads."""
        inf = self.inf
        if self.mode in ("baseline", "dmd"):
            return {"mode": self.mode, "target_distributed": True}
        keys = {"exact": (), "relaxed": ("relax_temperature",),
                "cspd": ("cspd_inner_temperature", "cspd_independent", "commit"),
                "feature": ("feature_threshold", "feature_metric", "commit", "draft_steps")}[inf.accept]
        out = {"mode": self.mode, "accept": inf.accept, "target_distributed": inf.accept == "exact",
               "gamma": inf.gamma, "draft_policy": inf.draft_policy, "prefill_ratio": inf.prefill_ratio,
               "tau": self.inf.tau if self.inf.tau is not None else self.bundle.meta.get("tau")}
        out.update({k: getattr(inf, k) for k in keys})
        if self.mode == "sd":
            out["tau"] = None  # sd: no early stop
        return out

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int]) -> list:
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds: pass one seed per image")
        images, bs = [], max(1, self.inf.batch_size)
        for i in range(0, len(prompts), bs):
            result = self.generate_tokens(prompts[i:i + bs], seeds[i:i + bs])
            self.stats.append(result.stats)
            images += to_pil(self.image.decode(result.tokens.to(torch.float32)))
        return images


def load_pipeline(ckpt: str, preset: str | None = None, mode: str = "baseline", overrides: list[str] | None = None,
                  device: str | None = None, progress: bool = False, bundle: ModelBundle | None = None) -> Pipeline:
    """A pipeline from a checkpoint folder: our export or an official NextStep-1.x download (its config.json is
    mapped; `preset` then only fills what it does not say). A folder without config.json needs `preset`.
    `overrides` apply before the models are built (and to a given `bundle`'s config)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if bundle is None:
        cfg = load_config(ckpt, preset, overrides)
        bundle = load_pretrained(ckpt, cfg, device)
    else:
        apply_overrides(bundle.cfg, overrides or [])
    return Pipeline(bundle, mode, device, progress)


def random_init_bundle(cfg: Config, seed: int = 0) -> ModelBundle:
    """Randomly initialised models (only for --random-init smoke runs: the images are noise)."""
    from .models import build_draft, build_head, build_target
    from .models.weights import resolve_dtype

    torch.manual_seed(seed)
    target, head = build_target(cfg).eval(), build_head(cfg).eval()
    bundle = ModelBundle(cfg, target, head, build_draft(cfg, target).eval(), build_head(cfg, student=True).eval(),
                         {"tau": None, "random_init": True})
    dtype = resolve_dtype(cfg.model.dtype)
    for m in (bundle.target, bundle.head, bundle.draft, bundle.student):
        m.requires_grad_(False).to(dtype)
    return bundle


__all__ = ["MODES", "Pipeline", "load_pipeline", "random_init_bundle"]
