"""Where one model loses GenEval to another: per-tag scores, the paired per-prompt difference, and why images fail.

    python -m eval_suites.tag_compare teacher=runs/eval/base_s0,runs/eval/base_s1 \
        student=runs/eval/dmd_s0,runs/eval/dmd_s1 --json runs/eval/tags.json

Each side is LABEL=FOLDER[,FOLDER...]: `geneval` folders (geneval.jsonl) of the same prompts, one per image seed,
listed in the same seed order on both sides. Per tag it prints each side's accuracy (mean over seeds, and the spread
between seeds), then the paired difference B - A: per prompt, the share of its images that are correct, averaged
over seeds, differenced, then averaged over the tag's prompts, with a 95% bootstrap interval over prompts (the
images of one prompt are not independent; its prompts are). Then, per side and tag, the failed images by their first
failed requirement: the object missing (a wrong shape or none), too few of it, a wrong colour, a wrong position,
extra objects.
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np

from .geneval_rules import TASKS

FAILURES = ("missing", "too_few", "colour", "position", "extra")


def failure_kind(reason: str) -> str:
    """The first failed requirement of a GenEval reason string (eval_suites/geneval_rules.evaluate)."""
    first = reason.split("\n")[0]
    if first.startswith("no target for") or " target, found " in first:
        return "position"
    if first.startswith("expected") and "<" in first.split(",")[0]:
        return "extra"
    if first.startswith("expected") and ", found " in first and "; and" not in first:
        found = first.rsplit(", found ", 1)[1].split()[0]
        return "missing" if found == "0" else "too_few"
    if "; and" in first:
        return "colour"
    raise ValueError(f"tag_compare: a GenEval reason this script does not know: {first!r}")


def read_folder(folder: str | Path) -> list[dict]:
    path = Path(folder) / "geneval.jsonl"
    if not path.is_file():
        raise SystemExit(f"tag_compare: {path} not found: score the folder first (python -m eval_suites.geneval score)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def per_prompt(rows: list[dict]) -> dict[int, tuple[str, float]]:
    """prompt_index -> (tag, share of its images that are correct)."""
    acc: dict[int, list[bool]] = defaultdict(list)
    tags = {}
    for r in rows:
        acc[r["prompt_index"]].append(bool(r["correct"]))
        tags[r["prompt_index"]] = r["tag"]
    return {i: (tags[i], float(np.mean(v))) for i, v in acc.items()}


def task_scores(rows: list[dict]) -> dict[str, float]:
    by = defaultdict(list)
    for r in rows:
        by[r["tag"]].append(bool(r["correct"]))
    out = {t: float(np.mean(by[t])) for t in TASKS if by[t]}
    out["overall"] = float(np.mean([out[t] for t in TASKS if t in out]))
    return out


def failures(rows: list[dict]) -> dict[str, dict[str, float]]:
    """tag -> failure kind -> share of the tag's images failing that way."""
    n, out = defaultdict(int), defaultdict(lambda: dict.fromkeys(FAILURES, 0.0))
    for r in rows:
        n[r["tag"]] += 1
    for r in rows:
        if not r["correct"]:
            out[r["tag"]][failure_kind(r.get("reason", ""))] += 1.0 / n[r["tag"]]
    return {t: dict(out[t]) for t in TASKS if t in n}


def compare(a: list[list[dict]], b: list[list[dict]], boot: int = 2000, seed: int = 0) -> dict:
    """a, b: geneval rows of each side, one list per image seed (paired by position)."""
    if len(a) != len(b):
        raise SystemExit(f"tag_compare: {len(a)} folders on one side and {len(b)} on the other; pair them by seed")
    pa, pb = [per_prompt(r) for r in a], [per_prompt(r) for r in b]
    common = set.intersection(*(set(p) for p in pa + pb))
    if not common:
        raise SystemExit("tag_compare: the two sides share no prompt_index: were they made from the same prompts?")
    diff = {i: statistics.mean(q[i][1] for q in pb) - statistics.mean(q[i][1] for q in pa) for i in common}
    tag_of = {i: pa[0][i][0] for i in common}
    rng = np.random.default_rng(seed)
    sa, sb = [task_scores(r) for r in a], [task_scores(r) for r in b]
    out = {"seeds": len(a), "prompts": len(common), "tags": {}}
    for t in (*TASKS, "overall"):
        ids = sorted(i for i in common if t == "overall" or tag_of[i] == t)
        if not ids:
            continue
        if t == "overall":  # GenEval's overall: the mean of the six task means, so resample within each task
            groups = [np.array([diff[i] for i in ids if tag_of[i] == k]) for k in TASKS]
            groups = [g for g in groups if len(g)]
            d = float(np.mean([g.mean() for g in groups]))
            draws = [np.mean([rng.choice(g, len(g)).mean() for g in groups]) for _ in range(boot)]
        else:
            g = np.array([diff[i] for i in ids])
            d = float(g.mean())
            draws = [rng.choice(g, len(g)).mean() for _ in range(boot)]
        lo, hi = np.percentile(draws, [2.5, 97.5])
        side = lambda s: {"mean": statistics.mean(x[t] for x in s),  # noqa: E731
                          "seed_sd": statistics.stdev(x[t] for x in s) if len(s) > 1 else None}
        out["tags"][t] = {"a": side(sa), "b": side(sb), "diff": d, "ci95": [float(lo), float(hi)],
                          "prompts": len(ids)}
    merged = lambda side: [r for rows in side for r in rows]  # noqa: E731
    out["failures"] = {"a": failures(merged(a)), "b": failures(merged(b))}
    return out


def markdown(res: dict, la: str, lb: str) -> str:
    lines = [f"| tag | {la} | {lb} | {lb} - {la} (paired, 95% CI over prompts) | prompts |", "|---|---:|---:|---:|---:|"]
    fmt = lambda s: f"{s['mean']:.3f}" + (f" ± {s['seed_sd']:.3f}" if s["seed_sd"] is not None else "")  # noqa: E731
    for t, r in res["tags"].items():
        lines.append(f"| {t} | {fmt(r['a'])} | {fmt(r['b'])} | {r['diff']:+.3f} [{r['ci95'][0]:+.3f}, "
                     f"{r['ci95'][1]:+.3f}] | {r['prompts']} |")
    lines += ["", f"| tag | failed images by first failed requirement: {la} / {lb} |", "|---|---|"]
    for t in TASKS:
        fa, fb = res["failures"]["a"].get(t), res["failures"]["b"].get(t)
        if fa is None or fb is None:
            continue
        cells = ", ".join(f"{k} {fa[k]:.2f} / {fb[k]:.2f}" for k in FAILURES if fa[k] or fb[k])
        lines.append(f"| {t} | {cells or '-'} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", metavar="LABEL=FOLDER[,FOLDER...]")
    p.add_argument("b", metavar="LABEL=FOLDER[,FOLDER...]")
    p.add_argument("--json", default=None)
    p.add_argument("--bootstrap", type=int, default=2000)
    args = p.parse_args(argv)
    sides = []
    for spec in (args.a, args.b):
        if "=" not in spec:
            raise SystemExit(f"tag_compare: a side is LABEL=FOLDER[,FOLDER...], got {spec!r}")
        label, folders = spec.split("=", 1)
        sides.append((label, [read_folder(f) for f in folders.split(",") if f]))
    (la, a), (lb, b) = sides
    res = compare(a, b, args.bootstrap)
    print(markdown(res, la, lb))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"a": la, "b": lb, **res}, indent=2) + "\n")


if __name__ == "__main__":
    main()
