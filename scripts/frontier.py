"""The speculation frontier: speed (one bench_inference.py JSON) beside quality (shapes_eval.sh folders, per seed).

    python scripts/frontier.py --bench runs/frontier/speed.json --eval-root runs/frontier --reference dmd \
        --point dmd=dmd-compiled:dmd --point feat4t=feat4t-compiled:feat4t ... --plot docs/frontier.png

A point is LABEL=BENCH_ROW:EVAL_PREFIX: the benchmark row (its compiled s/image, accepted length, acceptance, rule)
and the eval folders EVAL_ROOT/EVAL_PREFIX_s<seed> (geneval.json, fid.json, clip.json; every seed found is used).
Quality is the mean over seeds with its seed standard deviation; "d GenEval" is the mean of the per-seed
differences to the reference point on the same image seeds. A point is within noise when |d GenEval| is at most
the reference's seed standard deviation (at least two reference seeds needed). Prints a markdown table and the
rows as JSON; --plot draws s/image ratio against GenEval with the reference's noise band.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def seeds_of(root: Path, prefix: str) -> dict[int, dict]:
    """{seed: {geneval, fid, clip}} of every finished eval folder ROOT/PREFIX_s<seed>."""
    out = {}
    for folder in sorted(root.glob(f"{prefix}_s*")):
        tail = folder.name[len(prefix) + 2:]
        if not (tail.isdigit() and (folder / "clip.json").is_file()):
            continue
        read = lambda n: json.loads((folder / n).read_text())  # noqa: E731
        out[int(tail)] = {"geneval": read("geneval.json")["overall"], "fid": read("fid.json")["fid"],
                          "clip": read("clip.json")["clip_score"]}
    return out


def _mean_sd(values: list[float]) -> tuple[float, float | None]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def frontier(bench: dict, root: Path, points: dict[str, tuple[str, str]], reference: str) -> list[dict]:
    modes = bench["modes"]
    ref_row, ref_prefix = points[reference]
    ref_s = modes[ref_row]["latency_s_per_image_median"]
    ref_q = seeds_of(root, ref_prefix)
    ref_sd = _mean_sd([q["geneval"] for q in ref_q.values()])[1] if ref_q else None
    rows = []
    for label, (row, prefix) in points.items():
        m, q = modes.get(row), seeds_of(root, prefix)
        r = {"label": label, "bench_row": row, "rule": (m or {}).get("rule"), "seeds": sorted(q)}
        if m is not None:
            r.update(s_per_image=m["latency_s_per_image_median"], speedup_vs_reference=ref_s / m[
                "latency_s_per_image_median"], accepted_length=m["mean_accepted_length"],
                acceptance=m["acceptance_rate"])
        for key in ("geneval", "fid", "clip"):
            if q:
                r[key], r[f"{key}_sd"] = _mean_sd([v[key] for v in q.values()])
        paired = [q[s]["geneval"] - ref_q[s]["geneval"] for s in q if s in ref_q]
        if paired:
            r["d_geneval"] = statistics.mean(paired)
            r["within_noise"] = None if ref_sd is None else abs(r["d_geneval"]) <= ref_sd
        rows.append(r)
    return rows


def _fmt(x, f="{:.3f}"):
    return "-" if x is None else f.format(x)


def markdown(rows: list[dict], reference: str) -> str:
    lines = [f"| point | rule | s/image | vs {reference} | accepted length | acceptance | GenEval (seeds) | "
             f"d GenEval vs {reference} | within noise | domain FID | CLIP |", "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        rule = r.get("rule") or {}
        skip = ("mode", "target_distributed", "tau", "draft_policy", "gamma")
        knobs = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in rule.items()
                          if k not in skip and v is not None and not (k == "prefill_ratio" and v == 0))
        ge = f"{_fmt(r.get('geneval'))} +- {_fmt(r.get('geneval_sd'))} ({len(r['seeds'])})" if r["seeds"] else "-"
        within = {None: "-", True: "yes", False: "no"}[r.get("within_noise")]
        lines.append(f"| {r['label']} | {knobs or rule.get('mode', '-')} | {_fmt(r.get('s_per_image'))} | "
                     f"{_fmt(r.get('speedup_vs_reference'), '{:.2f}x')} | {_fmt(r.get('accepted_length'), '{:.2f}')} | "
                     f"{_fmt(r.get('acceptance'))} | {ge} | {_fmt(r.get('d_geneval'), '{:+.3f}')} | {within} | "
                     f"{_fmt(r.get('fid'), '{:.0f}')} | {_fmt(r.get('clip'), '{:.2f}')} |")
    return "\n".join(lines)


def plot(rows: list[dict], reference: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ref = next(r for r in rows if r["label"] == reference)
    if ref.get("geneval_sd"):
        ax.axhspan(ref["geneval"] - ref["geneval_sd"], ref["geneval"] + ref["geneval_sd"], color="0.85",
                   label=f"{reference} +- seed sd")
    for r in rows:
        if "geneval" not in r or "speedup_vs_reference" not in r:
            continue
        ax.errorbar(r["speedup_vs_reference"], r["geneval"], yerr=r.get("geneval_sd") or 0, fmt="o", capsize=3)
        ax.annotate(r["label"], (r["speedup_vs_reference"], r["geneval"]), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    ax.axvline(1.5, ls=":", c="r", lw=1, label="issue floor 1.5x")
    ax.set_xlabel(f"s/image of {reference} / s/image (compiled, batch 1)")
    ax.set_ylabel("shapes-GenEval (mean over image seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", required=True, help="bench_inference.py --json output")
    p.add_argument("--eval-root", required=True, help="folder holding PREFIX_s<seed> eval folders")
    p.add_argument("--point", action="append", required=True, metavar="LABEL=BENCH_ROW:EVAL_PREFIX")
    p.add_argument("--reference", required=True, help="the LABEL speed and quality are compared with (dmd)")
    p.add_argument("--plot", default=None)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    points = {}
    for text in a.point:
        label, _, rest = text.partition("=")
        row, sep, prefix = rest.partition(":")
        if not (label and row and sep and prefix):
            p.error(f"--point {text!r}: write LABEL=BENCH_ROW:EVAL_PREFIX")
        points[label] = (row, prefix)
    if a.reference not in points:
        p.error(f"--reference {a.reference!r} is not one of the points {sorted(points)}")
    rows = frontier(json.loads(Path(a.bench).read_text()), Path(a.eval_root), points, a.reference)
    print(markdown(rows, a.reference))
    print(json.dumps(rows, indent=1, default=str))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1, default=str) + "\n")
    if a.plot:
        plot(rows, a.reference, a.plot)


if __name__ == "__main__":
    main()
