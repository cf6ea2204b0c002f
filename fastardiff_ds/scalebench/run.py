"""One scale benchmark: shape -> plan -> random nets -> per-call costs and per-image rows per execution -> JSON.

Rows: baseline (the preset's head steps, two-pass CFG), dmd (student_steps, distilled CFG), fastardiff at each
forced acceptance. Each row has its measured seconds per image (the mean over its images) and the cost model's
(`costmodel.price` of the calls each image made, at the per-call costs measured just before and just after that
image: the images of all rows run in `repeats` rounds with a per-call measurement after each, so a slow spell of a
shared machine enters an image and the costs it is priced at alike); with `tokens` < 1024 a measured prefix is
timed and both are scaled to the full image by the expected model's full / prefix ratio (`extrapolated: true`). The JSON is rewritten after every execution, so a run
cut short still leaves what it measured.
"""
from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import costmodel as cm
from .calls import average_costs, measure_calls, prompt
from .flows import make_flows
from .replay import AcceptPattern, loop_log, replay_fastardiff, run_loop
from .shapes import build_random, check_fits, param_count, planned_bytes, scaled_config

ACCEPTANCES = (0.2, 0.4, 0.6, 0.8, 0.95)


@dataclass
class BenchArgs:
    shape: str = "nextstep-1.1"
    scale: float = 1.0
    device: str = "cuda"
    executions: tuple[str, ...] = ("eager",)
    acceptances: tuple[float, ...] = ACCEPTANCES
    tokens: int | None = None  # measured prefix of the image's tokens (None: all of them)
    prompt_len: int = 128
    gamma: int | None = None  # None: the preset's inference.gamma
    student_steps: int = 4
    reps: int = 10
    repeats: int = 1  # per-image runs per row (the median is reported)
    seed: int = 0
    json: str | None = None
    notes: dict = field(default_factory=dict)


def _flat(costs: dict, L: float) -> dict:
    """Per-call ms with every KV-dependent call at KV length L."""
    from .calls import interp

    out = {k: round(interp(v, L), 4) for k, v in costs["at_kv"].items()}
    out.update({k: round(v, 4) for k, v in costs["fixed"].items()})
    return out


def _images(a: BenchArgs, flows, ids, mask, T: int, gamma: int, measure) -> tuple[dict, list]:
    """Every row's images, `repeats` rounds over all rows (so each row's images fall in different spells of a
    shared machine), with a per-call measurement (`measure()`) before the first image and after every image.
    -> ({row: [(seconds, CallLog, index of the measurement taken just before it)]}, [measurements])."""
    specs = [(kind, None) for kind in ("baseline", "dmd")] + [(f"fastardiff@{acc}", acc) for acc in a.acceptances]
    sets = [measure()]
    raw: dict[str, list] = {name: [] for name, _ in specs}
    for _ in range(a.repeats):
        for name, acc in specs:
            if acc is None:
                secs, log = run_loop(flows, name, ids, mask, T, a.seed), loop_log(name, a.prompt_len, T)
            else:
                secs, log = replay_fastardiff(flows, ids, mask, T, gamma, AcceptPattern(acc, a.seed))
            raw[name].append((secs, log, len(sets) - 1))
            sets.append(measure())
    return raw, sets


def _reprice(raw: dict, sets: list, costs: dict, a: BenchArgs, cfg, N: int, T: int, gamma: int) -> dict:
    """Rows: the mean measured seconds over a row's images beside the mean of the cost model's price of each
    image's calls at the per-call costs measured just before and just after that image; a prefix run is scaled to
    the full image by the model's full / prefix ratio (at `costs`, the mean of every measurement)."""
    P, K = a.prompt_len, cfg.inference.student_steps
    rows = {}
    for name, images in raw.items():
        acc = None if not name.startswith("fastardiff@") else float(name.split("@")[1])
        per_image = [(secs, cm.price(log, average_costs(sets[i], sets[i + 1]))) for secs, log, i in images]
        m = sum(x for x, _ in per_image) / len(per_image)
        modelled = sum(y for _, y in per_image) / len(per_image)
        at_mean = sum(cm.price(log, costs) for _, log, _ in images) / len(images)  # the cross-check pricing
        log = images[-1][1]
        if acc is None:
            full, pre = (cm.loop_seconds(costs, name, P, n) for n in (N, T))
            extra = {}
        else:
            full, pre = (cm.expected_fastardiff(acc, costs, P, n, gamma, K) for n in (N, T))
            extra = {"forced_acceptance": acc, **log.summary(), "expected_model_s_per_image": full}
        ratio = full / pre
        rows[name] = {"measured_s_per_image": m * ratio, "modelled_s_per_image": modelled * ratio,
                      "model_error": abs(modelled - m) / m, "measured_prefix_s": m,
                      "modelled_at_mean_costs_s_per_image": at_mean * ratio,
                      "model_error_at_mean_costs": abs(at_mean - m) / m,
                      "images": [{"measured_s": x, "modelled_s": y} for x, y in per_image],
                      "calls": log.counts(), **extra}
    return rows


def _device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"type": "cuda", "name": torch.cuda.get_device_name(device),
                "total_bytes": torch.cuda.get_device_properties(device).total_memory}
    return {"type": "cpu", "name": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}


def run_bench(a: BenchArgs) -> dict:
    device = torch.device(a.device)
    cfg = scaled_config(a.shape, a.scale, student_steps=a.student_steps)
    gamma = a.gamma if a.gamma is not None else cfg.inference.gamma
    N = cfg.model.image.num_tokens
    T = min(a.tokens or N, N)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    plan = planned_bytes(cfg, dtype, a.prompt_len, gamma)
    check_fits(plan, device)  # before any allocation
    ar = cfg.model.ar
    out = {"shape": a.shape, "scale": a.scale, "device": _device_info(device), "dtype": str(dtype),
           "clock": "wall" if device.type == "cuda" else "process CPU time (1 thread; shared cores do not enter)",
           "torch": torch.__version__, "model": {"hidden": ar.hidden_size, "layers": ar.num_layers,
           "heads": ar.num_heads, "kv_heads": ar.num_kv_heads, "intermediate": ar.intermediate_size,
           "draft_layers": cfg.model.draft.num_layers, "draft_kind": cfg.model.draft.kind,
           "head_width": cfg.model.head.width, "head_depth": cfg.model.head.depth, "params": param_count(cfg)},
           "planned_bytes": plan, "num_tokens": N, "measured_tokens": T, "extrapolated": T < N,
           "prompt_len": a.prompt_len, "gamma": gamma, "head_steps": {"baseline": cfg.inference.num_steps,
           "dmd": cfg.inference.student_steps, "fastardiff": cfg.inference.student_steps},
           "cfg_scale": cfg.inference.cfg_scale, "batch": 1, "notes": a.notes, "model_terms": cm.MODEL_TERMS,
           "per_call_ms": {}, "rows": {}}
    t_build = time.perf_counter()
    nets = build_random(cfg, device, dtype, a.seed)
    out["build_s"] = time.perf_counter() - t_build
    ids, mask = prompt(2, a.prompt_len, ar.vocab_size, device)
    for ex in a.executions:
        t0 = time.perf_counter()
        flows = make_flows(cfg, nets, ex)
        # per-call costs on the KV grid of the full image, measured before the first image and after every image
        raw, sets = _images(a, flows, ids, mask, T, gamma,
                            lambda: measure_calls(flows, a.prompt_len, N, gamma, device, a.reps))
        costs = average_costs(*sets)
        rows = _reprice(raw, sets, costs, a, cfg, N, T, gamma)
        out["per_call_ms"][ex] = {"at_mean_kv": _flat(costs, a.prompt_len + N / 2), "measurements": len(sets),
                                  "statistic": "mean of the repetitions, then of the measurements",
                                  "by_kv": {k: {str(L): round(v, 4) for L, v in pts.items()}
                                            for k, pts in costs["at_kv"].items()}}
        out["rows"].update({f"{k}/{ex}" if ex != "eager" else k: v for k, v in rows.items()})
        out.setdefault("acceptance_targets", {})[ex] = cm.acceptance_targets(costs, a.prompt_len, N, gamma,
                                                                             cfg.inference.student_steps)
        out.setdefault("seconds", {})[ex] = time.perf_counter() - t0
        _finish(out, a.json)
    return out


def _finish(out: dict, path: str | None) -> None:
    errs = [r["model_error"] for r in out["rows"].values()]
    out["max_model_error"] = max(errs) if errs else None
    targets = out.get("acceptance_targets", {})
    if targets:  # the last execution measured (the fastest kind requested comes last)
        ex, last = list(targets.items())[-1]
        out["break_even_acceptance"] = last["break_even_acceptance"]
        out["break_even_execution"] = ex
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(out, indent=2) + "\n")
