"""The analytic per-image cost from per-call costs (calls.py), and the acceptances where speculation pays.

Two forms:
- `price(log, costs)`: the sum over the calls a run actually made (replay.CallLog), each decode priced at the KV
  length it ran at (piecewise-linear in L between measured points), each chain and head call at its measured cost,
  and the loops' glue (glue.py) once per token of a plain loop and once per speculative round.
  This is what is compared with the measured seconds of every row (`max_model_error`). Per row (MODEL_TERMS):
    baseline   prefill_t_b2 + N chain_teacher + sum_{i<N-1} decode_t_b2@(P+i) + N glue_token_baseline
    dmd        prefill_t_b1 + N chain_student + sum_{i<N-1} verify_t_b1_k1@(P+i) + N glue_token_dmd
    fastardiff prefill_t_b1 + prefill_d_b1 + chain_student + per round r (g_r drafts, a_r accepted, at n_r):
               draft_b1_k{1 first round, else 2}@(P+n_r-w) + g_r chain_student + (g_r-1) draft_b1_k1@(P+n_r+j)
               + verify_t_b1_k{g_r+1}@(P+n_r-1) + logprob_r{g_r K} + chain_student + [a_r<g_r] logprob_r{K}
               + glue_round
- `expected_fastardiff(a, ...)`: the same round in expectation at per-draft acceptance a, drafting gamma tokens:
  accepted per round E = a + a^2 + ... + a^gamma, tokens per round 1 + E, a round costs
  window + (gamma+1) chains + (gamma-1) draft decodes + verify(gamma+1) + logprob(gamma K) + (1 - a^gamma) logprob(K)
  + glue_round, at the mean KV length. `solve_acceptance` inverts it against a target time (dmd, or a speedup over dmd).
"""
from __future__ import annotations

from .calls import interp

MODEL_TERMS = {
    "baseline": "prefill_t_b2 + N chain_teacher + sum_{i=0}^{N-2} decode_t_b2@(P+i) + N glue_token_baseline",
    "dmd": "prefill_t_b1 + N chain_student + sum_{i=0}^{N-2} verify_t_b1_k1@(P+i) + N glue_token_dmd",
    "fastardiff": "prefill_t_b1 + prefill_d_b1 + chain_student + sum over rounds (g drafts, a accepted, n tokens "
                  "so far) of [draft_b1_k{1|2}@(P+n-w) + g chain_student + (g-1) draft_b1_k1@(P+n+j) + "
                  "verify_t_b1_k{g+1}@(P+n-1) + logprob_r{gK} + chain_student + (a<g) logprob_r{K} + glue_round]",
    "kv": "decode costs piecewise linear in the KV length L between the measured grid points, net of kv_rollback",
}


def call_ms(costs: dict, name: str, kv: int | None) -> float:
    if name in costs["at_kv"]:
        return interp(costs["at_kv"][name], kv)
    return costs["fixed"][name]


def price(log, costs: dict) -> float:
    """Seconds the calls of `log` cost at `costs`."""
    return sum(call_ms(costs, name, kv) for name, kv in log.calls) / 1000.0


def loop_seconds(costs: dict, kind: str, prompt_len: int, num_tokens: int) -> float:
    from .replay import loop_log

    return price(loop_log(kind, prompt_len, num_tokens), costs)


def tokens_per_round(a: float, gamma: int) -> float:
    """Expected tokens a round commits at per-draft acceptance a, truncated at the first rejection:
    1 + a + a^2 + ... + a^gamma (the accepted drafts plus the round's own token)."""
    return 1 + sum(a**j for j in range(1, gamma + 1))


def _smallest(pred, iters: int = 40) -> float:
    """The smallest a in [0, 1] where the monotone (False ... True) predicate holds, by bisection (the upper end)."""
    lo, hi = 0.0, 1.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if pred(mid) else (mid, hi)
    return hi


def expected_fastardiff(a: float, costs: dict, prompt_len: int, num_tokens: int, gamma: int, steps: int) -> float:
    """Expected seconds per image of fastardiff at per-draft acceptance a (see the module docstring)."""
    L = prompt_len + num_tokens / 2
    c = lambda name, kv=None: call_ms(costs, name, kv)  # noqa: E731
    rnd = (c("draft_b1_k2", L) + (gamma + 1) * c("chain_student") + (gamma - 1) * c("draft_b1_k1", L)
           + c(f"verify_t_b1_k{gamma + 1}", L) + c(f"logprob_r{gamma * steps}") + (1 - a**gamma) * c(f"logprob_r{steps}")
           + c("glue_round"))
    start = c("prefill_t_b1") + c("prefill_d_b1") + c("chain_student")
    return (start + (num_tokens - 1) / tokens_per_round(a, gamma) * rnd) / 1000.0


def solve_acceptance(goal_s: float, costs: dict, prompt_len: int, num_tokens: int, gamma: int,
                     steps: int) -> float | None:
    """The smallest per-draft acceptance a in [0, 1] whose expected time is <= goal_s (None: not even a = 1)."""
    f = lambda a: expected_fastardiff(a, costs, prompt_len, num_tokens, gamma, steps)  # noqa: E731
    if f(1.0) > goal_s:
        return None
    if f(0.0) <= goal_s:
        return 0.0
    return round(_smallest(lambda a: f(a) <= goal_s), 4)


# The bundled model's default rule (exact, adaptive gamma): accepted length 1.52 tokens per round on the bundled
# tiny model (docs/results/speculation.md, "The paper's Table 2 on the bundled model"), the figure the README's
# per-image seconds at the real shape are read at.
BUNDLED_ACCEPTED_LENGTH = 1.52


def acceptance_for_length(length: float, gamma: int) -> float:
    """The per-draft acceptance a whose expected tokens per round, 1 + a + ... + a^gamma, is `length`."""
    if not 1.0 <= length <= gamma + 1:
        raise ValueError(f"accepted length {length}: must be in [1, gamma + 1 = {gamma + 1}]")
    return round(_smallest(lambda a: tokens_per_round(a, gamma) >= length, iters=50), 4)


def acceptance_targets(costs: dict, prompt_len: int, num_tokens: int, gamma: int, steps: int,
                       bundled_length: float = BUNDLED_ACCEPTED_LENGTH) -> dict:
    """break_even (fastardiff = dmd) and the acceptances for 1.5x / 1.8x over dmd and over the baseline; the
    modelled seconds of the three modes at the bundled rule's accepted length (`at_bundled_rule`)."""
    dmd = loop_seconds(costs, "dmd", prompt_len, num_tokens)
    base = loop_seconds(costs, "baseline", prompt_len, num_tokens)
    solve = lambda goal: solve_acceptance(goal, costs, prompt_len, num_tokens, gamma, steps)  # noqa: E731
    a_b = acceptance_for_length(bundled_length, gamma)
    fa_b = expected_fastardiff(a_b, costs, prompt_len, num_tokens, gamma, steps)
    return {"break_even_acceptance": solve(dmd),
            "at_bundled_rule": {"accepted_length": bundled_length, "per_draft_acceptance": a_b,
                                "modelled_s": {"baseline": base, "dmd": dmd, "fastardiff": fa_b},
                                "fastardiff_vs_dmd": dmd / fa_b, "fastardiff_vs_baseline": base / fa_b},
            "acceptance_for_speedup_over_dmd": {"1.5x": solve(dmd / 1.5), "1.8x": solve(dmd / 1.8)},
            "speedup_over_dmd_at_acceptance_1": dmd / expected_fastardiff(1.0, costs, prompt_len, num_tokens,
                                                                           gamma, steps),
            "modelled_baseline_s": base, "modelled_dmd_s": dmd}
