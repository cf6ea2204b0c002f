"""Copy an inference checkpoint folder with its floating weights stored in half precision (for assets/).

    python scripts/pack_checkpoint.py runs/teacher/checkpoint assets/tiny_teacher [--dtype float16] \
        [--meta '{"trained_with": "python launcher/pretrain_t2i.py ..."}']

Every `*.safetensors` file is re-saved with floating tensors cast to `--dtype` (half the bytes); other files
(config.json, meta.json, samples.png, ...) are copied. Loading is unchanged: the loaders cast each tensor to
`model.dtype` (float32 for the tiny presets), so a packed checkpoint runs exactly like its source with weights
rounded to `--dtype`. meta.json records `stored_dtype` and any `--meta` keys (e.g. how it was trained).
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def pack(src: str | Path, dst: str | Path, dtype: str = "float16", meta: dict | None = None,
         overwrite: bool = False) -> dict:
    """Write the packed copy of `src` to `dst` (a new or empty folder; `overwrite` empties an existing one first, so
    no file of an older checkpoint stays behind). Returns bytes before/after."""
    src, dst = Path(src), Path(dst)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"'{src}' is not an inference checkpoint folder (no config.json); pass an export "
                                "such as runs/NAME/checkpoint or runs/NAME/export")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    if dst.is_dir() and any(dst.iterdir()):
        if not overwrite:
            raise FileExistsError(f"'{dst}' is not empty: pass --overwrite to replace the checkpoint in it")
        shutil.rmtree(dst)
    dst.mkdir(parents=True, exist_ok=True)
    before, after, extra = 0, 0, {"stored_dtype": dtype, **(meta or {})}
    for f in sorted(src.iterdir()):
        if not f.is_file():
            continue
        before += f.stat().st_size
        if f.suffix == ".safetensors":
            state = {k: (v.to(DTYPES[dtype]) if v.is_floating_point() else v).contiguous()
                     for k, v in load_file(str(f)).items()}
            save_file(state, str(dst / f.name), metadata={"format": "pt"})
        elif f.name == "meta.json":
            (dst / f.name).write_text(json.dumps({**json.loads(f.read_text()), **extra}, indent=2))
        else:
            shutil.copyfile(f, dst / f.name)
        after += (dst / f.name).stat().st_size
    if not (src / "meta.json").is_file():
        (dst / "meta.json").write_text(json.dumps(extra, indent=2))
    return {"bytes_before": before, "bytes_after": after}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
    p.add_argument("--meta", default="{}", help="JSON object merged into meta.json")
    p.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty DST")
    args = p.parse_args(argv)
    try:
        print(json.dumps(pack(args.src, args.dst, args.dtype, json.loads(args.meta), args.overwrite)))
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        raise SystemExit(f"pack_checkpoint: {e}") from None


if __name__ == "__main__":
    main()
