"""The README's quality table from `shapes_eval.sh` output folders: one markdown row per folder, plus the noise row.

    python -m eval_suites.shapes_table baseline=runs/eval/baseline dmd=runs/eval/dmd --noise runs/eval/baseline \
        runs/eval/baseline_s1

Each folder holds geneval.json, fid.json and clip.json (any missing suite prints "-"). `--noise A B` adds the
absolute difference between two folders of the same exact mode under two seeds: the noise level the other rows'
differences are read against.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
HEADER = ("| row | GenEval overall | single | two obj | counting | colours | position | colour attr | "
          "single = 1 object | objects / img | domain FID | CLIP score |")


def metrics(folder: str | Path) -> dict:
    """The table's numbers of one eval folder (NaN for a missing suite)."""
    folder, nan = Path(folder), float("nan")
    read = lambda name: json.loads((folder / name).read_text()) if (folder / name).is_file() else {}  # noqa: E731
    g, f, c = read("geneval.json"), read("fid.json"), read("clip.json")
    out = {"overall": g.get("overall", nan), **{t: g.get("tasks", {}).get(t, nan) for t in TASKS},
           "single_exact": g.get("exact_count_per_task", {}).get("single_object", nan),
           "objects": g.get("objects_per_image", nan), "fid": f.get("fid", nan), "clip": c.get("clip_score", nan),
           "images": g.get("n_images", 0)}
    return out


def _fmt(v: float, digits: int) -> str:
    return "-" if v != v else f"{v:.{digits}f}"


def row(label: str, m: dict) -> str:
    cells = [_fmt(m["overall"], 3), *(_fmt(m[t], 2) for t in TASKS), _fmt(m["single_exact"], 2),
             _fmt(m["objects"], 2), _fmt(m["fid"], 0), _fmt(m["clip"], 2)]
    return f"| {label} | " + " | ".join(cells) + " |"


def table(rows: list[tuple[str, str]], noise: tuple[str, str] | None = None) -> str:
    lines = [HEADER, "|---" + "|---:" * 11 + "|"]
    lines += [row(label, metrics(path)) for label, path in rows]
    if noise:
        a, b = metrics(noise[0]), metrics(noise[1])
        lines.append(row("noise: two seeds of one exact mode, abs. difference",
                         {k: abs(a[k] - b[k]) for k in a if k != "images"}))
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("rows", nargs="+", metavar="LABEL=FOLDER")
    p.add_argument("--noise", nargs=2, metavar=("FOLDER_SEED0", "FOLDER_SEED1"))
    args = p.parse_args(argv)
    bad = [r for r in args.rows if "=" not in r]
    if bad:
        raise SystemExit(f"shapes_table: rows are LABEL=FOLDER, got {bad}")
    print(table([tuple(r.split("=", 1)) for r in args.rows], tuple(args.noise) if args.noise else None))


if __name__ == "__main__":
    main()
