"""Sizes of scripts/gpu_check.py's stages: the GPU run (fits ~10 min on one GPU, cold compile caches included)
and the CPU dry run (gloo, a few steps, 2 sampler steps: it tests the check's logic, not the figures)."""
from __future__ import annotations

MODES = ("baseline", "sd", "dmd", "fastardiff")

_COMMON = ["train.log_every=1", "train.gen_every=2", "train.keep_last=2", "wandb.enabled=false"]

# train_timeout_s: DeepSpeed start-up and 40 steps (the GPU engines use torch's AdamW: no JIT-built extension)
GPU = {
    "steps": 40, "budget_s": 450, "train_timeout_s": 300, "generate_timeout_s": 150, "bench_timeout_s": 240,
    "samples": 1024, "threads": 4, "bench_prompts": 4,
    "resume_rtol": 1e-2,  # bf16 on the GPU: an atomics-ordered gradient sum can flip one bf16 rounding of a weight
    "train": [*_COMMON, "train.steps=40", "train.save_every=10", "train.cd_steps=15", "data.batch_size=16",
              "data.num_workers=2", "train.tau_batches=2"],
    # the preset's samplers as they ship (50 head steps, 2 student steps); batch 1 as the bench, whose compiled
    # graphs the compiled generations then find in inductor's cache
    "infer": ["inference.batch_size=1"],
    "prompts": ["a photo of a red circle", "a photo of a blue square"],
}

CPU_DRY_RUN = {
    "steps": 6, "budget_s": 1200, "train_timeout_s": 240, "generate_timeout_s": 180, "bench_timeout_s": 300,
    "samples": 32, "threads": 1, "bench_prompts": 1, "resume_rtol": 1e-5,
    "train": [*_COMMON, "train.steps=6", "train.save_every=2", "train.cd_steps=2", "data.batch_size=2",
              "data.num_workers=1", "train.tau_batches=1"],  # a forked worker: the kill must spare it
    "infer": ["inference.batch_size=1", "inference.num_steps=2", "inference.student_steps=1"],
    "prompts": ["a photo of a red circle"],
}


def settings(dry_run: bool) -> dict:
    return CPU_DRY_RUN if dry_run else GPU


# Printed by a child process, so the check's own process never touches CUDA (its memory would count as the ranks').
ENV_PROBE = r"""
import json, platform, torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
        "torch_cuda": torch.version.cuda}
for name in ("deepspeed", "transformers"):
    try:
        info[name] = __import__(name).__version__
    except Exception as e:
        info[name] = "missing: %s" % e
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, gpu_count=torch.cuda.device_count(), gpu_mem_gib=round(p.total_memory / 2**30, 1),
                capability="%d.%d" % (p.major, p.minor), bf16=torch.cuda.is_bf16_supported(),
                nccl=".".join(map(str, torch.cuda.nccl.version())))
try:
    from deepspeed.accelerator import get_accelerator
    info["deepspeed_accelerator"] = get_accelerator().device_name()
    acc = get_accelerator()
    info["comm_backend"] = "gloo" if info["deepspeed_accelerator"] == "cpu" else acc.communication_backend_name()
except Exception as e:
    info["deepspeed_accelerator"] = "error: %s" % e
print(json.dumps(info))
"""
