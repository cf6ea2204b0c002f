"""Compiled decode: a static KV cache, `torch.compile`d AR decode / verification steps and flow-head chain steps.

Eager decoding is launch-bound: per image token one AR decode and K head steps (x2 CFG branches), each a chain of
small kernels driven from Python. This module keeps the sampling code unchanged and swaps what it calls
(gpt-fast's recipe, plus one exact rewrite of the head loop):

- `CompiledAR` has the AR protocol of models/ar.py (`new_cache`, `prefill`, `decode`). Its caches are *static*
  (models/kv_cache.py: attention reads the whole preallocated buffer, the mask hides unwritten slots), so the
  one-token decode and the gamma+1-token verification pass each compile to one graph that is replayed for every
  token (a CUDA graph with mode="reduce-overhead" on GPU, inductor C++ kernels on CPU). Per-row lengths, left
  padding and O(1) rollback are the cache's as before. The prefill runs eagerly (once per image).
- `HeadChain` runs a token's K-step chain (flow.py's `sample_tokens`, same transitions, same noise) as ONE compiled
  graph: the adaLN modulations depend on (t, cond, guidance) only, so they are computed for all K steps in one
  batched call (`FlowHead.chain_modulations`), then the K state-dependent steps -- the head's MLP on x, the CFG
  combination and the Gaussian transition -- follow, unrolled (one graph per K and batch width).

Outputs equal the eager path's within float32 tolerance for the same seeds (tests/unit/test_compiled.py);
every step of a chain is still a Gaussian transition, so the exact speculative test is unchanged.
Compilations are counted (`graphs_compiled`), so benchmarks report warm-up cost and recompilations.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass

import torch

from ..models.ar import ARStep, row_entropy
from ..models.backbone import Positions, Qwen2Backbone
from .flow import SamplerConfig, Trajectory, sample_tokens, time_grid, transition_mean, transition_stds

CACHE_BUCKET = 128  # static caches are allocated in multiples of this many slots
COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class CompileOptions:
    """How steps are compiled. mode 'auto': 'reduce-overhead' (CUDA graphs) on CUDA, inductor's default on CPU."""

    # 'aot_eager' traces and checks graphs without generating kernels (fast, for tests); the environment variable
    # FASTARDIFF_COMPILE_BACKEND sets it for whole launcher runs (scripts/gpu_check.sh --cpu-dry-run)
    backend: str = dataclasses.field(default_factory=lambda: os.environ.get("FASTARDIFF_COMPILE_BACKEND", "inductor"))
    mode: str = "auto"
    dynamic: bool | None = None  # None: static first, a dimension turns dynamic when it is seen to change

    def __post_init__(self):
        if self.mode not in COMPILE_MODES:
            raise ValueError(f"compile mode {self.mode!r} (config key inference.compile_mode): choose one of "
                             f"{COMPILE_MODES}")

    def resolved_mode(self, device: torch.device) -> str | None:
        if self.backend != "inductor":
            return None
        if self.mode == "auto":
            return "reduce-overhead" if device.type == "cuda" else None
        return None if self.mode == "default" else self.mode


def graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process so far (first compilations and recompilations)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _allow_recompiles() -> None:
    """Each model, batch width and sampler is its own graph of the same code: allow many before falling back."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    if hasattr(torch._dynamo.config, "accumulated_cache_size_limit"):
        torch._dynamo.config.accumulated_cache_size_limit = max(512, torch._dynamo.config.accumulated_cache_size_limit)


class _Compiled:
    """A function compiled once per CompileOptions; on CUDA graphs, outputs are cloned before the next replay."""

    def __init__(self, fn, opts: CompileOptions, device: torch.device):
        _allow_recompiles()
        mode = opts.resolved_mode(device)
        self.cudagraphs = device.type == "cuda" and mode in ("reduce-overhead", "max-autotune")
        self.fn = torch.compile(fn, backend=opts.backend, mode=mode, dynamic=opts.dynamic)

    def __call__(self, *args):
        if self.cudagraphs:  # a replay overwrites the previous replay's outputs: keep copies
            torch.compiler.cudagraph_mark_step_begin()
            return tuple(None if o is None else o.clone() for o in self.fn(*args))
        return self.fn(*args)


def _decode(ar, tokens: torch.Tensor, cache, explicit_layer: int | None, feats: torch.Tensor | None = None):
    """T image tokens (B,T,D) appended at each row's length of a static cache -> (cond, hidden, entropy | None).
    feats (B,T,H): a feature-level draft's inputs."""
    T = tokens.shape[1]
    slots = cache.lengths[:, None] + torch.arange(T, device=tokens.device)[None]
    pos = Positions(slots, slots - cache.start[:, None], cache.start)
    embeds = ar.fuse(ar.image_in_projector(tokens.to(ar.image_in_projector.weight.dtype)), feats)
    out = Qwen2Backbone.forward(ar, embeds, pos, cache, (), explicit_layer)  # not ar(...): no module hooks inside
    ent = row_entropy(out["attn_probs"], out["attn_valid"]) if out["attn_probs"] is not None else None
    return ar.image_out_projector(out["hidden"]), out["hidden"], ent


class CompiledAR:
    """An AR model (TargetAR / DraftAR) behind the same protocol, decoding with a static cache and compiled steps."""

    def __init__(self, ar, opts: CompileOptions | None = None, timer=None):
        opts = opts or CompileOptions()  # built per call: the backend default reads the environment then
        self.ar, self.timer = ar, timer  # timer: benchmark.SectionTimer, whose hooks cannot see compiled steps
        self.device = ar.embed_tokens.weight.device
        # a decode sees a handful of shapes (T = 1, the draft's 2-token window, gamma+1 verified positions): each
        # gets its own static graph, since dynamic-shape kernels for small T run up to 2x slower on CPU
        static = dataclasses.replace(opts, dynamic=False) if opts.dynamic is None else opts
        self._decode = _Compiled(_decode, static, self.device)

    def __getattr__(self, name):  # token_dim, explicit_layer, parameters(), ... of the wrapped model
        return getattr(self.ar, name)

    def new_cache(self, batch_size: int, max_len: int, device=None, dtype=None):
        # Round the length up to a bucket: prompts of other lengths then reuse the same graphs (no recompilation)
        max_len = -(-max_len // CACHE_BUCKET) * CACHE_BUCKET
        cache = self.ar.new_cache(batch_size, max_len, device, dtype, static=True)
        return cache.mark_static_addresses() if self.device.type == "cuda" else cache

    def prefill(self, input_ids, attention_mask, cache, **kw) -> ARStep:
        return self.ar.prefill(input_ids, attention_mask, cache, **kw)

    def decode(self, tokens: torch.Tensor, cache, explicit_layer: int | None = None, feats=None) -> ARStep:
        cache.slots(tokens.shape[1])  # overflow check on the host, outside the graph
        layer = explicit_layer if explicit_layer is not None else self.ar.explicit_layer
        with _section(self.timer, "ar"):
            cond, hidden, ent = self._decode(self.ar, tokens, cache, layer, feats)
        cache.advance(tokens.shape[1])
        return ARStep(cond, hidden, ent)


def _modulated_step(head, x, mods, w, t, t_next, std, eps, cfg: SamplerConfig, two_pass: bool):
    """One transition of N chains with precomputed modulations -> (mean (N,D), next state (N,D))."""
    n = x.shape[0]
    if two_pass:  # mods rows: [conditional; unconditional]; both branches see the same x
        v = head.modulated(torch.cat([x, x]), mods).to(x.dtype)
        v = v[n:] + w[:, None] * (v[:n] - v[n:])
    else:
        v = head.modulated(x, mods).to(x.dtype)
    m = transition_mean(cfg, x, v, t.expand(n), t_next.expand(n))
    return m, m + std * eps


def _whole_chain(head, cond, guidance, w, noise, grid, stds, cfg: SamplerConfig, two_pass: bool):
    """A token's K-step chain as one graph: its adaLN modulations, then K `_modulated_step`s (K = noise.shape[1]-1,
    static) -> (states (N,K+1,D), means (N,K,D))."""
    mods = head.chain_modulations(grid[:-1], cond, guidance)
    x, states, means = noise[:, 0], [noise[:, 0]], []
    for k in range(noise.shape[1] - 1):
        m, x = _modulated_step(head, x, [mk[k] for mk in mods], w, grid[k], grid[k + 1], stds[k], noise[:, k + 1],
                               cfg, two_pass)
        states.append(x)
        means.append(m)
    return torch.stack(states, 1), torch.stack(means, 1)


def _field_step(field, x, t, t_next, std, eps, cfg: SamplerConfig):
    """The same transition for a head without `chain_modulations` (e.g. the analytic toy heads of the tests)."""
    n = x.shape[0]
    m = transition_mean(cfg, x, field(x, t.to(x.dtype).expand(n)), t.expand(n), t_next.expand(n))
    return m, m + std * eps


class HeadChain:
    """`chain(field, sampler, noise) -> Trajectory`, a drop-in for flow.sample_tokens (same draws, same chain)."""

    def __init__(self, head, opts: CompileOptions | None = None, device: torch.device | str = "cpu", timer=None):
        opts = opts or CompileOptions()
        self.head, self.timer = head, timer
        device = torch.device(device)
        self._chain = _Compiled(_whole_chain, opts, device)
        self._field_step = _Compiled(_field_step, opts, device)

    def __call__(self, fld, cfg: SamplerConfig, noise: torch.Tensor) -> Trajectory:
        K = cfg.steps
        if noise.dim() != 3 or noise.shape[1] != K + 1:
            raise ValueError(f"noise must be (N, K+1={K + 1}, D), got {tuple(noise.shape)}")
        if fld.head is not self.head:
            return sample_tokens(fld, cfg, noise)
        with _section(self.timer, "head"):
            return self._run(fld, cfg, noise)

    def _run(self, fld, cfg: SamplerConfig, noise: torch.Tensor) -> Trajectory:
        K, N = cfg.steps, noise.shape[0]
        grid = time_grid(cfg, noise.device, torch.float64)
        stds = transition_stds(cfg, noise.device, noise.dtype)
        if hasattr(self.head, "chain_modulations"):
            mode = fld.cfg.mode
            cond = torch.cat([fld.cond, fld.uncond]) if mode == "two_pass" else fld.cond
            guidance = fld.scale if mode == "distilled" else None
            w = fld.scale.to(fld.cond.dtype) if mode == "two_pass" else None
            states, means = self._chain(self.head, cond, guidance, w, noise, grid, stds, cfg, mode == "two_pass")
        else:
            states, means = self._field_chain(fld, grid, stds, cfg, noise)
        if fld.counter is not None:  # the same counts as K calls of the VelocityField
            fld.counter.calls += K
            fld.counter.rows += K * N * fld.cfg.batch_mult
        return Trajectory(states, means, stds)

    def _field_chain(self, fld, grid, stds, cfg: SamplerConfig, noise: torch.Tensor):
        """A head without `chain_modulations` (e.g. the analytic toy heads of the tests): one compiled step each."""
        plain = dataclasses.replace(fld, counter=None)
        x, states, means = noise[:, 0], [noise[:, 0]], []
        for k in range(cfg.steps):
            m, x = self._field_step(plain, x, grid[k], grid[k + 1], stds[k], noise[:, k + 1], cfg)
            states.append(x)
            means.append(m)
        return torch.stack(states, 1), torch.stack(means, 1)


def _section(timer, name: str):
    return timer.section(name) if timer is not None else contextlib.nullcontext()


class Compiler:
    """One compiled wrapper per model, shared by every flow built on it (teacher and student flows of a target)."""

    def __init__(self, opts: CompileOptions | None = None, timer=None):
        self.opts, self.timer, self._ars, self._chains = opts or CompileOptions(), timer, {}, {}

    def flow(self, flow):
        """An ARFlow (sampling/common.py) whose AR decodes on a static cache and whose head chains are compiled."""
        ar, head = flow.ar, flow.head
        if id(ar) not in self._ars:
            self._ars[id(ar)] = CompiledAR(ar, self.opts, self.timer)
        if id(head) not in self._chains:
            device = next(iter(head.parameters())).device if hasattr(head, "parameters") else "cpu"
            self._chains[id(head)] = HeadChain(head, self.opts, device, self.timer)
        return dataclasses.replace(flow, ar=self._ars[id(ar)], chain=self._chains[id(head)])
