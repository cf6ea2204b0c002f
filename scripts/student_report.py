"""The student study (issue 25): each recipe's quality over image seeds beside the teacher's, its head cost, its
chain gap, and the plots (step curve, training curves).

    python scripts/student_report.py --eval-root runs/s25/eval --teacher teacher \
        --row "shipped=dmd_ship:4:assets/tiny_teacher" --row "k1=k1:1:runs/s25/k1" ... \
        --gap-root runs/s25/gap --step-curve k1,k2,shipped,k8 --step-plot docs/student_steps.png \
        --curves runs/s25/k1,runs/s25/gan5e-3 --curve-plot docs/student_curves.png --json runs/s25/report.json

A row is LABEL=EVAL_PREFIX:STEPS:RUN_DIR. Its quality is the mean over the image seeds found
(EVAL_ROOT/EVAL_PREFIX_s<seed>, as scripts/frontier.py reads them) with the seed standard deviation; "d teacher" is
the mean of the per-seed differences to the teacher on the same image seeds. Head evaluations per image: tokens x
steps (a CFG-distilled student runs one pass; the teacher two per step). GAP_ROOT/LABEL.json, when present, is
launcher/student_gap.py's output for the row (variance ratio and conditional-mean distance).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from frontier import seeds_of  # noqa: E402


def _mean_sd(v):
    return (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else None) if v else (None, None)


def rows(root: Path, teacher: str, specs: list[str], gap_root: Path | None, tokens: int,
         teacher_steps: int) -> list[dict]:
    ref = seeds_of(root, teacher)
    if not ref:
        raise SystemExit(f"student_report: no finished eval folder {root}/{teacher}_s<seed>")
    out = [{"label": "teacher", "steps": teacher_steps, "head_evals": tokens * teacher_steps * 2,
            **_quality(ref, ref)}]
    for spec in specs:
        try:
            label, rest = spec.split("=", 1)
            prefix, steps, run = rest.split(":", 2)
        except ValueError:
            raise SystemExit(f"student_report: a row is LABEL=EVAL_PREFIX:STEPS:RUN_DIR, got {spec!r}") from None
        q = seeds_of(root, prefix)
        if not q:
            print(f"student_report: no eval folders for {label} ({root}/{prefix}_s*), skipped", file=sys.stderr)
            continue
        r = {"label": label, "steps": int(steps), "head_evals": tokens * int(steps), "run": run, **_quality(q, ref)}
        gap = gap_root / f"{label}.json" if gap_root else None
        if gap and gap.is_file():
            g = json.loads(gap.read_text())
            r.update(var_ratio=g["var_ratio"], mean_dist_vs_var=g["mean_dist"] / g["teacher_var"], gap0=g["gap"][0],
                     gap0_teacher_euler=g["gap_euler_teacher"][0])
        out.append(r)
    return out


def _quality(q: dict, ref: dict) -> dict:
    r = {"seeds": sorted(q)}
    for k in ("geneval", "fid", "clip"):
        r[k], r[f"{k}_sd"] = _mean_sd([v[k] for v in q.values()])
    r["geneval_seeds"] = [q[s]["geneval"] for s in sorted(q)]
    paired = [q[s]["geneval"] - ref[s]["geneval"] for s in q if s in ref]
    r["d_teacher"] = statistics.mean(paired) if paired else None
    r["paired_seeds"] = len(paired)
    return r


def _f(x, f="{:.3f}"):
    return "-" if x is None else f.format(x)


def markdown(rs: list[dict]) -> str:
    lines = ["| recipe | steps | head evals / image | image seeds | GenEval (mean ± seed sd) | d teacher (paired) | "
             "FID | CLIP | variance ratio | mean dist / teacher var |", "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rs:
        ge = _f(r["geneval"]) + (f" ± {r['geneval_sd']:.3f}" if r["geneval_sd"] is not None else "")
        lines.append(f"| {r['label']} | {r['steps']} | {r['head_evals']} | {','.join(map(str, r['seeds']))} | {ge} | "
                     f"{_f(r['d_teacher'], '{:+.3f}') if r['label'] != 'teacher' else '-'} | {_f(r['fid'], '{:.0f}')} | "
                     f"{_f(r['clip'], '{:.1f}')} | {_f(r.get('var_ratio'), '{:.2f}')} | "
                     f"{_f(r.get('mean_dist_vs_var'), '{:.2f}')} |")
    return "\n".join(lines)


def _teacher_band(ax, t: dict, label: str) -> None:
    """The teacher's GenEval with its seed-sd band, and the goal line 0.03 below it."""
    sd = t["geneval_sd"] or 0
    ax.axhspan(t["geneval"] - sd, t["geneval"] + sd, color="grey", alpha=0.25)
    ax.axhline(t["geneval"], color="grey", label=label)
    ax.axhline(t["geneval"] - 0.03, color="grey", ls=":", label="teacher - 0.03 (the goal)")


def _metrics(run: str) -> list[dict]:
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _plot_losses(axes, m: list[dict], keys, label: str | None = None) -> None:
    """One line per metric key over the logged steps, a key per axis, titled with the key."""
    for ax, k in zip(axes, keys):
        xy = [(r["step"], r[k]) for r in m if k in r and "step" in r]
        if xy:
            ax.plot(*zip(*xy), label=label, lw=1)
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("step", fontsize=8)


def step_plot(rs: list[dict], labels: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {r["label"]: r for r in rs}
    pts = [by[lb] for lb in labels if lb in by]
    t = by["teacher"]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    x = [p["head_evals"] for p in pts]
    ax.errorbar(x, [p["geneval"] for p in pts], yerr=[p["geneval_sd"] or 0 for p in pts], marker="o", capsize=3,
                label="student (mean ± seed sd)")
    for p in pts:
        ax.annotate(f"{p['steps']} step{'s' if p['steps'] > 1 else ''}", (p["head_evals"], p["geneval"]),
                    textcoords="offset points", xytext=(4, 4), fontsize=8)
    _teacher_band(ax, t, f"teacher, {t['head_evals']} head evals / image")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("head evaluations per image")
    ax.set_ylabel("shapes-GenEval")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def curve_plot(runs: list[str], path: str, keys=("cd/loss", "dmd/loss", "fake/loss", "gan/d_loss")) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.0))
    for run in runs:
        _plot_losses(axes, _metrics(run), keys, Path(run).name)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def train_plot(rs: list[dict], points: list[str], run: str, path: str,
               keys=("dmd/loss", "fake/loss")) -> None:
    """GenEval against the training step (points "STEP=ROW_LABEL": the row scoring the export taken at STEP) with the
    teacher's band and the goal, beside the run's DMD and fake-score losses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {r["label"]: r for r in rs}
    pts = sorted((int(step), by[lb]) for step, lb in (pt.split("=", 1) for pt in points) if lb in by)
    t = by["teacher"]
    fig, axes = plt.subplots(1, 1 + len(keys), figsize=(4.6 + 3.0 * len(keys), 3.4))
    ax = axes[0]
    for step, r in pts:
        ax.scatter([step] * len(r["geneval_seeds"]), r["geneval_seeds"], color="C0", s=10, alpha=0.5)
    ax.plot([s for s, _ in pts], [r["geneval"] for _, r in pts], marker="o", color="C0",
            label="4-step student (mean of image seeds; dots: each seed)")
    _teacher_band(ax, t, "teacher")
    ax.set_xlabel("training step (export)")
    ax.set_ylabel("shapes-GenEval")
    ax.legend(fontsize=7, loc="lower left")
    _plot_losses(axes[1:], _metrics(run), keys)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--eval-root", required=True)
    p.add_argument("--teacher", required=True, help="eval prefix of the teacher's folders")
    p.add_argument("--teacher-steps", type=int, default=50)
    p.add_argument("--tokens", type=int, default=64, help="image tokens per image")
    p.add_argument("--row", action="append", default=[], help="LABEL=EVAL_PREFIX:STEPS:RUN_DIR")
    p.add_argument("--gap-root", default=None)
    p.add_argument("--step-curve", default="", help="comma-separated row labels for the step plot")
    p.add_argument("--step-plot", default=None)
    p.add_argument("--curves", default="", help="comma-separated run dirs for the training-curve plot")
    p.add_argument("--curve-plot", default=None)
    p.add_argument("--train-curve", default="", help="comma-separated STEP=ROW_LABEL: GenEval over training")
    p.add_argument("--train-run", default=None, help="the run dir whose losses go beside --train-curve")
    p.add_argument("--train-plot", default=None)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    rs = rows(Path(a.eval_root), a.teacher, a.row, Path(a.gap_root) if a.gap_root else None, a.tokens,
              a.teacher_steps)
    print(markdown(rs))
    if a.step_plot and a.step_curve:
        step_plot(rs, a.step_curve.split(","), a.step_plot)
    if a.curve_plot and a.curves:
        curve_plot(a.curves.split(","), a.curve_plot)
    if a.train_plot and a.train_curve and a.train_run:
        train_plot(rs, a.train_curve.split(","), a.train_run, a.train_plot)
    if a.json:
        Path(a.json).write_text(json.dumps(rs, indent=2) + "\n")


if __name__ == "__main__":
    main()
