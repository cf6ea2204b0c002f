"""GenEval's folder contract: generation writes a folder, scoring reads it.

Layout (djghosh13/geneval, `generation/diffusers_generate.py`)::

    <out>/<idx:05d>/metadata.jsonl     one JSON object: the prompt's metadata
    <out>/<idx:05d>/samples/0000.png   n images per prompt

Scoring code only ever reads this layout, so it never imports model code.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

_SAMPLE_RE = re.compile(r"^\d+\.png$")


@dataclass
class PromptFolder:
    """One prompt's entry in a generation folder."""

    index: int
    metadata: dict
    image_paths: list[Path]


def read_metadata_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a GenEval-style metadata file (one JSON object per line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metadata file {path} does not exist; pass an existing --metadata path")
    with open(path) as fp:
        return [json.loads(line) for line in fp if line.strip()]


def write_prompt_entry(out_dir: str | os.PathLike, index: int, metadata: dict, images) -> Path:
    """Write one prompt's `metadata.jsonl` and `samples/NNNN.png`; returns the prompt folder."""
    folder = Path(out_dir) / f"{index:05d}"
    (folder / "samples").mkdir(parents=True, exist_ok=True)
    with open(folder / "metadata.jsonl", "w") as fp:
        json.dump(metadata, fp)
    for j, image in enumerate(images):
        image.save(folder / "samples" / f"{j:04d}.png")
    return folder


def read_generation_folder(root: str | os.PathLike) -> list[PromptFolder]:
    """List the prompt folders under `root`, sorted by index, with their sample images.

    Raises a clear error if `root` holds no `<idx>/metadata.jsonl` at all (wrong folder).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist; pass the folder written by `generate`")
    entries = []
    for sub in sorted(root.iterdir()):
        if not (sub.is_dir() and sub.name.isdigit() and (sub / "metadata.jsonl").is_file()):
            continue
        with open(sub / "metadata.jsonl") as fp:
            metadata = json.load(fp)
        samples = sub / "samples"
        paths = sorted(p for p in samples.iterdir() if _SAMPLE_RE.match(p.name)) if samples.is_dir() else []
        entries.append(PromptFolder(int(sub.name), metadata, paths))
    if not entries:
        raise FileNotFoundError(
            f"{root} holds no '<idx:05d>/metadata.jsonl' folders; is it the output of a `generate` run?")
    return entries
