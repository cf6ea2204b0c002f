"""Fig. 6 at tiny scale and the early-stop threshold: draft vs target attention entropy, and what tau does.

    python launcher/entropy_study.py --ckpt paper=runs/j_full/export align=runs/j_align/export \
        --num-prompts 16 --head student --json runs/entropy/study.json --plot runs/entropy/fig6.png

For each checkpoint (teacher-forced on the target's own samples, fastardiff_ds/analysis/entropy_study.py): the
histograms of the draft's shallow-layer entropy and the target's at the corresponding layer (Fig. 6), acceptance
against entropy, and two thresholds with what they keep: tau from Eq. 10 and the calibrated tau (the one that keeps
exactly the drafts whose acceptance pays for their cost). With W&B enabled (WANDB_MODE=offline) the plot and the
table are logged too.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from fastardiff_ds.config.rules import align_layer
from fastardiff_ds.data.shapes import prompt_seeds
from fastardiff_ds.inference import load_pipeline
from fastardiff_ds.sampling.draft_policy import draft_cost_ratio
from fastardiff_ds.analysis.entropy_study import calibrate_tau, entropy_study


def _overlap(a: torch.Tensor, b: torch.Tensor, bins: int = 40) -> float:
    """Histogram intersection of two samples on [0, 1] (1 = the same distribution)."""
    ha = torch.histc(a, bins, 0.0, 1.0) / max(a.numel(), 1)
    hb = torch.histc(b, bins, 0.0, 1.0) / max(b.numel(), 1)
    return float(torch.minimum(ha, hb).sum())


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def study_one(ckpt: str, head: str, num_prompts: int, seed: int, cost: float | None, overrides: list[str]):
    try:
        pipe = load_pipeline(ckpt, None, "dmd" if head == "student" else "baseline", overrides)
    except (FileNotFoundError, ValueError, KeyError) as e:  # a bad folder or override: one line naming it
        raise SystemExit(f"error: {ckpt}: {e}") from None
    if pipe.bundle.draft is None:
        raise SystemExit(f"{ckpt} has no draft AR (draft.safetensors): export one with launcher/train_t2i.py")
    prompts, seeds = prompt_seeds(num_prompts, seed)
    tokens = pipe.generate_tokens(prompts, seeds).tokens
    flow_of = pipe.student_flow if head == "student" else pipe.teacher_flow
    target, draft = flow_of(pipe.bundle.target), flow_of(pipe.bundle.draft)
    ids, mask = pipe.prompt_batch(prompts, target.cfg.batch_mult == 2)
    cfg = pipe.bundle.cfg
    layer = align_layer(cfg)
    st = entropy_study(target, draft, ids, mask, tokens, layer, seed)
    c = cost if cost is not None else draft_cost_ratio(target, draft)
    tau_ckpt = pipe.bundle.meta.get("tau")
    taus = {"eq10": st.eq10_tau(), "calibrated": calibrate_tau(st, c)}
    if tau_ckpt is not None:
        taus["checkpoint"] = float(tau_ckpt)
    return st, {
        "ckpt": ckpt, "head": head, "draft_kind": cfg.model.draft.kind, "tokens": int(st.alpha.numel()),
        "draft_shallow_layer": cfg.model.draft.shallow_layer, "target_layer": layer, "cost": c,
        "draft_entropy_mean": float(st.draft_entropy.mean()), "draft_entropy_std": float(st.draft_entropy.std()),
        "target_entropy_mean": float(st.target_entropy.mean()), "target_entropy_std": float(st.target_entropy.std()),
        "histogram_overlap": _overlap(st.draft_entropy, st.target_entropy),
        "alpha_mean": float(st.alpha.mean()), "spearman_entropy_alpha": _spearman(st.draft_entropy, st.alpha),
        "taus": {k: st.summary(v) for k, v in taus.items()},
    }


def plot(results: list[tuple[str, object, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(10, 3.2 * len(results)), squeeze=False)
    bins = torch.linspace(0, 1, 41).numpy()
    for row, (label, st, info) in enumerate(results):
        ax = axes[row, 0]
        ax.hist(st.target_entropy.numpy(), bins=bins, alpha=0.55, density=True,
                label=f"target layer {info['target_layer']}")
        ax.hist(st.draft_entropy.numpy(), bins=bins, alpha=0.55, density=True,
                label=f"draft layer {info['draft_shallow_layer']}")
        for name, s in info["taus"].items():
            if abs(s["tau"]) != float("inf"):
                ax.axvline(s["tau"], ls="--", lw=1, color="k" if name == "eq10" else "r")
        ax.set_title(f"{label}: entropy (overlap {info['histogram_overlap']:.2f})", fontsize=9)
        ax.set_xlabel("normalised attention entropy")
        ax.legend(fontsize=8)
        ax = axes[row, 1]
        e, a = st.draft_entropy, st.alpha
        edges = torch.quantile(e, torch.linspace(0, 1, 11))
        idx = torch.bucketize(e, edges[1:-1])
        xs = [float(e[idx == k].mean()) for k in range(10) if bool((idx == k).any())]
        ys = [float(a[idx == k].mean()) for k in range(10) if bool((idx == k).any())]
        ax.plot(xs, ys, "o-")
        ax.axhline(info["cost"], ls=":", color="gray", label=f"draft cost c = {info['cost']:.2f}")
        ax.set_title(f"{label}: acceptance vs entropy (Spearman {info['spearman_entropy_alpha']:.2f})", fontsize=9)
        ax.set_xlabel("draft shallow-layer entropy (decile means)")
        ax.set_ylabel("acceptance probability")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", nargs="+", required=True, help="LABEL=FOLDER (or FOLDER) of exports with a draft")
    p.add_argument("--head", choices=("teacher", "student"), default="student")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--cost", type=float, default=None, help="draft cost c (default: draft_cost_ratio)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    p.add_argument("--wandb-dir", default=None, help="log the plot and table to W&B from this run folder")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. inference.student_final_std=0.1")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    results = []
    for item in a.ckpt:
        label, _, folder = item.rpartition("=")
        st, info = study_one(folder, a.head, a.num_prompts, a.seed, a.cost, a.overrides)
        label = label or Path(folder).name
        results.append((label, st, info))
        print(f"{label}: draft entropy {info['draft_entropy_mean']:.3f}±{info['draft_entropy_std']:.3f}, target "
              f"{info['target_entropy_mean']:.3f}±{info['target_entropy_std']:.3f}, overlap "
              f"{info['histogram_overlap']:.2f}, alpha {info['alpha_mean']:.3f}, Spearman(e, alpha) "
              f"{info['spearman_entropy_alpha']:.2f}")
        for name, s in info["taus"].items():
            print(f"   tau {name:>10} = {s['tau']:8.4f}: keeps {s['kept']:.2f} of drafts, alpha kept "
                  f"{s['alpha_kept']}, dropped {s['alpha_dropped']}")
    out = {label: info for label, _, info in results}
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    if a.plot:
        plot(results, Path(a.plot))
        if a.wandb_dir:
            from fastardiff_ds.logging import WandbConfig, make_logger

            logger = make_logger(WandbConfig(), a.wandb_dir, {"entropy_study": out}, name="entropy-study")
            logger.image("entropy/fig6", a.plot)
            logger.log({f"entropy/{lbl}/{k}": v for lbl, info in out.items() for k, v in info.items()
                        if isinstance(v, float)})
            logger.finish()


if __name__ == "__main__":
    main()
