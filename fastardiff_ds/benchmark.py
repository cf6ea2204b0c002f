"""Side-by-side inference benchmark: the four modes on the same prompts and seeds in one process.

Latency is wall-clock per image (warm-up excluded); ratios are what to read, not absolute CPU times. Time in the
AR vs the head is measured with forward hooks. Per-token FLOPs (AR vs head, with two-pass CFG) are computed from
the architecture so a CPU run can be related to `nextstep-1-large`, where the split is what sets the speedup.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass, field

import torch

from .config import Config, get_preset
from .models import DraftAR, build_head, build_target, count_params


def _nonembed(module: torch.nn.Module) -> int:
    return count_params(module) - sum(p.numel() for n, p in module.named_parameters() if "embed_tokens" in n)


def flops_per_token(cfg: Config, head_steps: int | None = None, cfg_mult: int = 2) -> dict:
    """Baseline per-token FLOPs: AR decode 2*params (+ attention over the average context) and K head evals of
    2*params, both x `cfg_mult` rows for two-pass CFG. Built on the meta device (free for 14B)."""
    with torch.device("meta"):
        ar, head = build_target(cfg), build_head(cfg)
    K = head_steps or cfg.inference.num_steps
    ctx = cfg.model.text.max_length // 2 + cfg.model.image.num_tokens // 2  # average keys attended per token
    ar_f = cfg_mult * (2 * _nonembed(ar) + 4 * cfg.model.ar.num_layers * ctx * cfg.model.ar.hidden_size)
    head_f = cfg_mult * K * 2 * count_params(head)
    return {"ar_gflop": ar_f / 1e9, "head_gflop": head_f / 1e9, "ar_share": ar_f / (ar_f + head_f),
            "head_steps": K, "ar_params": count_params(ar), "head_params": count_params(head)}


@torch.no_grad()
def decode_seconds(ar, token_dim: int, prompt_len: int = 40, tokens: int = 64, repeats: int = 3) -> float:
    """Median wall time of one single-token KV-cached decode at batch 1 (eager): a prompt of `prompt_len` ids, then
    `tokens` image tokens one at a time, `repeats` times. The draft : target ratio of this is what speculation pays
    per drafted token (issue 13 asks for <= 0.2 on the cost-matched preset)."""
    w = ar.embed_tokens.weight
    ids = torch.randint(4, ar.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    times = []
    H = w.shape[1]
    feats = (lambda T: {"feats": torch.zeros(1, T, H, device=w.device, dtype=w.dtype)}) \
        if getattr(ar, "reads_features", False) else (lambda T: {})  # a feature-level draft's extra input
    for _ in range(repeats):
        cache = ar.new_cache(1, prompt_len + tokens + 1)
        ar.prefill(ids.to(w.device), torch.ones_like(ids, device=w.device), cache, **feats(prompt_len))
        x = torch.zeros(1, 1, token_dim, device=w.device, dtype=w.dtype)
        for _ in range(tokens):
            t0 = time.perf_counter()
            ar.decode(x, cache, **feats(1))
            if w.is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


class SectionTimer:
    """Wall time spent inside the forwards of registered modules (outermost call only)."""

    def __init__(self):
        self.seconds, self._depth, self._t0, self._handles = {}, {}, {}, []

    def watch(self, name: str, module: torch.nn.Module) -> None:
        self.seconds.setdefault(name, 0.0)
        self._depth.setdefault(name, 0)

        def pre(*_):
            if self._depth[name] == 0:
                self._sync()
                self._t0[name] = time.perf_counter()
            self._depth[name] += 1

        def post(*_):
            self._depth[name] -= 1
            if self._depth[name] == 0:
                self._sync()
                self.seconds[name] += time.perf_counter() - self._t0[name]

        self._handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
        self._enter, self._exit = getattr(self, "_enter", {}), getattr(self, "_exit", {})
        self._enter[name], self._exit[name] = pre, post

    @contextlib.contextmanager
    def section(self, name: str):
        """Time a block as section `name` (compiled steps call no module forward, so no hook sees them)."""
        if name not in self._enter:
            yield
            return
        self._enter[name]()
        try:
            yield
        finally:
            self._exit[name]()

    @staticmethod
    def _sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def reset(self):
        self.seconds = {k: 0.0 for k in self.seconds}

    def close(self):
        for h in self._handles:
            h.remove()


@dataclass
class ModeResult:
    latencies: list[float] = field(default_factory=list)  # seconds per image, per batch
    stats: dict = field(default_factory=dict)
    ar_seconds: float = 0.0
    head_seconds: float = 0.0
    warmup_s: float = 0.0  # the excluded warm-up run(s), compilation included
    graphs_warmup: int = 0  # graphs compiled during warm-up
    recompiles: int = 0  # graphs compiled during the timed runs


def sum_stats(stats_list) -> dict:
    """Add up DecodeStats of several batches (counters summed, rates recomputed)."""
    out, lengths = {}, []
    for s in stats_list:
        d = s.as_dict()
        lengths += s.accepted_lengths
        for k, v in d.items():
            if isinstance(v, dict):
                out.setdefault(k, {})
                for kk, vv in v.items():
                    out[k][kk] = out[k].get(kk, 0) + vv
            elif k not in ("acceptance_rate", "early_stop_rate", "mean_accepted_length"):
                out[k] = out.get(k, 0) + v
    out["acceptance_rate"] = out["accepted"] / out["drafted"] if out.get("drafted") else 0.0
    out["early_stop_rate"] = out["early_stops"] / out["draft_sessions"] if out.get("draft_sessions") else 0.0
    out["mean_accepted_length"] = (sum(lengths) + len(lengths)) / len(lengths) if lengths else 1.0
    return out


def percentile(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(q * (len(v) - 1))))]


def summarize(results: dict[str, ModeResult], images: int) -> dict:
    """Per-mode JSON: latency median/p90, speedup vs baseline, counts per image, time shares, count bounds."""
    base = results.get("baseline")
    out = {}
    for mode, r in results.items():
        med = statistics.median(r.latencies)
        s = r.stats
        per_img = lambda x: x / images  # noqa: E731
        row = {"latency_s_per_image_median": med, "latency_s_per_image_p90": percentile(r.latencies, 0.9),
               "target_forwards_per_image": per_img(s["target_forwards"]),
               "draft_forwards_per_image": per_img(s["draft_forwards"]),
               "head_evals_per_image": per_img(s["target_head"]["rows"] + s["draft_head"]["rows"]),
               "head_calls_per_image": per_img(s["target_head"]["calls"] + s["draft_head"]["calls"]),
               "mean_accepted_length": s["mean_accepted_length"], "acceptance_rate": s["acceptance_rate"],
               "early_stop_rate": s["early_stop_rate"], "resample_fallbacks": s["fallbacks"],
               "policy_skips_per_image": per_img(s["policy_skips"]),
               "time_share_ar": r.ar_seconds / max(r.ar_seconds + r.head_seconds, 1e-12),
               "time_share_head": r.head_seconds / max(r.ar_seconds + r.head_seconds, 1e-12)}
        row.update(warmup_s=r.warmup_s, graphs_compiled_warmup=r.graphs_warmup, recompiles_timed=r.recompiles)
        if "baseline-compiled" in results:  # the baseline users would deploy (static cache + torch.compile)
            row["speedup_vs_compiled_baseline"] = statistics.median(results["baseline-compiled"].latencies) / med
        if base is not None:
            b = out["baseline"] if mode != "baseline" else row
            row["speedup_vs_baseline"] = statistics.median(base.latencies) / med
            fwd = b["target_forwards_per_image"] / max(row["target_forwards_per_image"], 1e-9)
            heads = b["head_evals_per_image"] / max(row["head_evals_per_image"], 1e-9)
            share = b["time_share_ar"]
            # Amdahl over the baseline's AR/head split: the best speedup these counts allow (draft cost ignored)
            row["count_implied_speedup_upper_bound"] = 1.0 / (share / fwd + (1 - share) / heads)
        out[mode] = row
    return out


TABLE_COLUMNS = (  # (header, key, format) of the README's benchmark tables
    ("s/image (median)", "latency_s_per_image_median", "{:.3f}"), ("p90", "latency_s_per_image_p90", "{:.3f}"),
    ("speedup", "speedup_vs_baseline", "{:.2f}x"), ("vs compiled baseline", "speedup_vs_compiled_baseline", "{:.2f}x"),
    ("target fwd / img", "target_forwards_per_image", "{:.1f}"),
    ("draft fwd / img", "draft_forwards_per_image", "{:.1f}"), ("head evals / img", "head_evals_per_image", "{:.0f}"),
    ("accepted length", "mean_accepted_length", "{:.2f}"), ("acceptance", "acceptance_rate", "{:.3f}"),
    ("early stop", "early_stop_rate", "{:.2f}"), ("policy skips / img", "policy_skips_per_image", "{:.1f}"),
    ("AR time share", "time_share_ar", "{:.2f}"), ("count bound", "count_implied_speedup_upper_bound", "{:.2f}x"),
    ("warm-up s", "warmup_s", "{:.1f}"), ("graphs (warm-up)", "graphs_compiled_warmup", "{:d}"),
    ("recompiles (timed)", "recompiles_timed", "{:d}"),
)


def markdown_table(modes: dict) -> str:
    """The per-mode summary (summarize's output) as a markdown table, one row per mode."""
    cols = [c for c in TABLE_COLUMNS if all(c[1] in row for row in modes.values())]
    lines = ["| mode | " + " | ".join(h for h, _, _ in cols) + " |", "|---|" + "---:|" * len(cols)]
    for mode, row in modes.items():
        lines.append(f"| {mode} | " + " | ".join(f.format(row[k]) for _, k, f in cols) + " |")
    return "\n".join(lines)


def parse_variant(text: str, modes: tuple[str, ...]) -> tuple[str, str, list[str]]:
    """'LABEL=MODE[:key=value,key=value]' -> (label, mode, dotted overrides), e.g.
    'fastardiff-cspd=fastardiff:inference.accept=cspd,inference.cspd_inner_temperature=42'."""
    label, sep, rest = text.partition("=")
    mode, _, over = rest.partition(":")
    if not sep or not label or mode not in modes:
        raise ValueError(f"--variant {text!r}: write LABEL=MODE[:key=value,...] with MODE one of {', '.join(modes)}")
    overrides = [o for o in over.split(",") if o]
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ValueError(f"--variant {text!r}: override(s) {bad} are not key=value")
    return label, mode, overrides


def large_preset_split() -> dict:
    return flops_per_token(get_preset("nextstep-1-large"))


__all__ = ["DraftAR", "ModeResult", "SectionTimer", "flops_per_token", "large_preset_split", "markdown_table",
           "parse_variant", "sum_stats", "summarize"]


def _median_ms(fn, reps: int, sync: bool) -> float:
    for _ in range(3):  # warm-up: compilation and first-touch allocations
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


@torch.no_grad()
def per_call_ms(pipe, gamma: int, prompt_len: int = 40, context: int = 32, reps: int = 20) -> dict:
    """Median ms, batch 1, of each call a speculative round is made of, on `pipe`'s models as it runs them (eager or
    compiled): target decode of 1 token and verification of k = 1..gamma+1 tokens, draft decode of 1 and 2 tokens
    (its window), and the student chain (all its steps) at 1 and gamma+1 rows. Each after `context` image tokens."""
    from .sampling.common import make_field, sample_rows
    from .sampling.guidance import HeadCounter
    from .sampling.noise import make_generators

    target, draft = pipe.student_flow(pipe.bundle.target), pipe.student_flow(pipe.bundle.draft, pipe.inf.draft_steps)
    w = pipe.bundle.target.embed_tokens.weight
    dev, D, sync = w.device, target.token_dim, w.is_cuda
    ids = torch.randint(4, pipe.bundle.target.config.vocab_size, (1, prompt_len),
                        generator=torch.Generator().manual_seed(0)).to(dev)
    out, H = {}, w.shape[1]
    for name, flow in (("target", target), ("draft", draft)):
        feats = (lambda T: {"feats": torch.zeros(1, T, H, device=dev, dtype=w.dtype)}) \
            if getattr(flow.ar, "reads_features", False) else (lambda T: {})
        cache = flow.ar.new_cache(1, prompt_len + context + gamma + 2)
        step = flow.ar.prefill(ids, torch.ones_like(ids), cache, **feats(prompt_len))
        for _ in range(context):
            flow.ar.decode(torch.zeros(1, 1, D, device=dev, dtype=w.dtype), cache, **feats(1))
        base = cache.lengths.clone()
        sizes = range(1, gamma + 2) if name == "target" else (1, 2)
        for T in sizes:
            x = torch.zeros(1, T, D, device=dev, dtype=w.dtype)

            def call(x=x, T=T, flow=flow, cache=cache, base=base, feats=feats):
                cache.rollback(base)
                flow.ar.decode(x, cache, **feats(T))
            out[f"{name}_decode_{T}"] = _median_ms(call, reps, sync)
    cond = step.cond[:, -1].repeat(gamma + 1, 1).float()
    gens = make_generators(range(gamma + 1), "cpu")
    for R in (1, gamma + 1):
        rows, act = torch.arange(R, device=dev), torch.arange(gamma + 1, device=dev) < R
        index = torch.zeros(gamma + 1, dtype=torch.long, device=dev)

        def chain(rows=rows, act=act, index=index, R=R):
            fld = make_field(target, cond, index, pipe.bundle.cfg.model.image.num_tokens, rows, HeadCounter(),
                             torch.float32)
            sample_rows(target, fld, gens, rows, act, torch.float32)
        out[f"student_chain_{R}"] = _median_ms(chain, reps, sync)
    if draft.sampler.steps != target.sampler.steps:
        out["draft_chain_1"] = _median_ms(lambda: sample_rows(draft, make_field(
            draft, cond, torch.zeros(gamma + 1, dtype=torch.long, device=dev), pipe.bundle.cfg.model.image.num_tokens,
            torch.arange(1, device=dev), HeadCounter(), torch.float32), gens, torch.arange(1, device=dev),
            torch.arange(gamma + 1, device=dev) < 1, torch.float32), reps, sync)
    return out


def round_cost_model(ms: dict, gamma: int) -> dict:
    """What the measured calls alone (no Python glue between them) allow at batch 1: dmd's ms per token, and a
    round of gamma drafts that all pass (draft window + gamma-1 draft decodes + gamma draft chains + one verification
    of gamma+1 tokens + one target chain over gamma+1 rows), i.e. the speedup over dmd at acceptance 1."""
    dmd = ms["target_decode_1"] + ms["student_chain_1"]
    draft_chain = ms.get("draft_chain_1", ms["student_chain_1"])
    rnd = (ms["draft_decode_2"] + (gamma - 1) * ms["draft_decode_1"] + gamma * draft_chain
           + ms[f"target_decode_{gamma + 1}"] + ms[f"student_chain_{gamma + 1}"])
    return {"dmd_ms_per_token": dmd, "round_ms_all_accepted": rnd, "tokens_per_round": gamma + 1,
            "speedup_bound_vs_dmd_at_acceptance_1": dmd * (gamma + 1) / rnd}
