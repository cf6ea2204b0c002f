"""The three ARFlows a NextStep run samples with, as inference.py builds them, plus a timing helper.

baseline: the target with the teacher head, the preset's sampler and steps, two-pass CFG (AR batch 2);
dmd / fastardiff: the target (and the draft) with the CFG-distilled student head, a `consistency` chain of
`student_steps` steps, guidance as an input (AR batch 1).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from ..config import Config
from ..sampling.common import ARFlow
from ..sampling.compiled import CompileOptions, Compiler
from ..sampling.flow import SamplerConfig
from ..sampling.guidance import CFGConfig
from ..sampling.official import resolve_noise_level

EXECS = ("eager", "compiled", "cudagraphs")


@dataclass
class Flows:
    teacher: ARFlow  # target + teacher head, two-pass CFG (baseline)
    student: ARFlow  # target + student head, distilled CFG (dmd, fastardiff's verification)
    draft: ARFlow  # draft + student head, distilled CFG (fastardiff's drafting)


def make_flows(cfg: Config, nets: dict, execution: str = "eager") -> Flows:
    """Flows over `nets` (shapes.build_random); execution 'compiled' / 'cudagraphs' goes through
    sampling/compiled.py's Compiler (static KV caches, compiled decode and head steps; 'cudagraphs' = its
    reduce-overhead mode, CUDA only)."""
    inf, ln = cfg.inference, cfg.model.image.token_layernorm
    teacher_s = SamplerConfig(inf.sampler, inf.num_steps, resolve_noise_level(inf.sampler, inf.noise_level),
                              inf.time_shift)
    student_s = SamplerConfig("consistency", inf.student_steps, final_std=inf.student_final_std)
    two_pass = CFGConfig(inf.cfg_scale, inf.cfg_schedule, "two_pass")
    distilled = CFGConfig(inf.cfg_scale, inf.cfg_schedule, "distilled")
    flows = Flows(ARFlow(nets["target"], nets["head"], teacher_s, two_pass, ln),
                  ARFlow(nets["target"], nets["student"], student_s, distilled, ln),
                  ARFlow(nets["draft"], nets["student"], student_s, distilled, ln))
    if execution == "eager":
        return flows
    if execution not in EXECS:
        raise ValueError(f"execution {execution!r}: choose one of {EXECS}")
    mode = "reduce-overhead" if execution == "cudagraphs" else "max-autotune-no-cudagraphs"
    if execution == "compiled" and nets["target"].embed_tokens.weight.device.type == "cpu":
        mode = "default"
    comp = Compiler(CompileOptions(mode=mode))
    return Flows(comp.flow(flows.teacher), comp.flow(flows.student), comp.flow(flows.draft))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device):
    """The clock every figure is taken with: wall time on a GPU; on a CPU this process's CPU time, so that other
    jobs sharing the cores (descheduling us) do not enter the figures. Torch runs single-threaded there
    (launcher --threads 1), so CPU time is the time the work takes."""
    return time.perf_counter if device.type == "cuda" else time.process_time


def median_ms(fn, device: torch.device, reps: int, warmup: int = 2) -> float:
    """Median time of fn() in milliseconds on `clock(device)` (device synchronised around each call)."""
    now = clock(device)
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = now()
        fn()
        sync(device)
        times.append(now() - t0)
    return 1000.0 * statistics.median(times)
