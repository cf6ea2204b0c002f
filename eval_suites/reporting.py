"""Result files every suite writes: JSON with the protocol, JSONL/parquet per item, a bar plot."""
from __future__ import annotations

import datetime
import json
import platform
from pathlib import Path


def environment() -> dict:
    """Versions of the libraries that change the numbers (read from package metadata: importing
    open_clip just to print its version costs seconds)."""
    from importlib import metadata
    env = {"python": platform.python_version()}
    for dist in ("torch", "torchvision", "numpy", "scipy", "open_clip_torch", "pillow", "mmdet"):
        try:
            env[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return env


def write_json(path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {**payload, "environment": environment(),
               "written_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def write_jsonl(path, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fp:
        for row in rows:
            fp.write(json.dumps(row, default=str) + "\n")
    return path


def write_parquet(path, rows: list[dict]) -> Path:
    """Rows of scalars/strings as a parquet table (pyarrow); nested values are JSON-encoded."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    flat = [{k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in r.items()} for r in rows]
    pq.write_table(pa.Table.from_pylist(flat), str(path))
    return Path(path)


def bar_plot(path, values: dict[str, float], title: str, ylabel: str, highlight: str | None = None) -> Path:
    """A labelled bar chart (one bar per key), value printed on each bar; `highlight` is drawn darker."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(values)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(names) + 1.5), 3.5))
    colors = ["#33658a" if n == highlight else "#86bbd8" for n in names]
    bars = ax.bar(names, [values[n] for n in names], color=colors)
    ax.bar_label(bars, fmt="%.3g", fontsize=8)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
