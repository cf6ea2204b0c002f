"""Argument handling shared by the launchers: preset -> config file -> dotted overrides, --print-config."""
from __future__ import annotations

import argparse
import json
import sys

from .config import Config, ConfigError, dotted_keys, resolve_config, to_dict


def add_config_args(parser: argparse.ArgumentParser, default_preset: str = "tiny") -> None:
    parser.add_argument("--preset", default=default_preset, help="named preset: tiny | tiny-bench | small | "
                        "nextstep-1-large | nextstep-1.1")
    parser.add_argument("--config", default=None, help="JSON/YAML file merged over the preset")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config (and valid keys), exit")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. pretrain.steps=100 model.ar.num_layers=6")


VAE_HELP = ("VAE folder, same as the override model.image.vae_path=DIR: the official NextStep-1-f8ch16-Tokenizer "
            "(config.json + checkpoint.pt; converted to diffusers on first use and cached beside it, or under "
            "~/.cache/fastardiff_ds/vae when read-only) or a diffusers AutoencoderKL folder. Latent scale/shift come "
            "from its config unless model.image.scaling_factor / shift_factor are set")


def add_vae_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vae", default=None, metavar="DIR", help=VAE_HELP)


def vae_overrides(vae: str | None) -> list[str]:
    """`--vae DIR` as a dotted override (empty when not given)."""
    return [f"model.image.vae_path={vae}"] if vae else []


def config_from_args(args: argparse.Namespace, adopt_teacher: bool = False) -> Config:
    """adopt_teacher: the model section comes from the `train.teacher` folder's config.json (our export or an
    official NextStep-1.x download), CLI overrides re-applied on top. A bad key or value exits with the
    ConfigError's message (naming the key and the valid values) before anything is built or read."""
    try:
        cfg = resolve_config(args.preset, args.config, args.overrides)
        if adopt_teacher:
            from .models import adopt_teacher_model

            adopt_teacher_model(cfg, args.overrides)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None
    return _maybe_print(cfg, args)


def _maybe_print(cfg, args: argparse.Namespace):
    """--print-config: the resolved tree and its valid keys on stdout, then exit; else the config."""
    if args.print_config:
        print(json.dumps(to_dict(cfg), indent=2))
        print("\nvalid keys:\n  " + "\n  ".join(dotted_keys(cfg)))
        sys.exit(0)
    return cfg


def add_c2i_args(parser: argparse.ArgumentParser, section: str, example: str) -> None:
    """The class-conditional launchers' arguments: preset, config file, overrides, DeepSpeed config (`section`
    .ds_config by default), resume, threads."""
    parser.add_argument("--preset", default="mar-tiny", help="mar-tiny | mar-base | mar-large | mar-huge")
    parser.add_argument("--config", default=None, help="JSON/YAML file merged over the preset")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config (and valid keys), exit")
    parser.add_argument("overrides", nargs="*", help=f"dotted overrides, e.g. {example}")
    parser.add_argument("--ds_config", default=None, help=f"DeepSpeed engine knobs (default: {section}.ds_config)")
    parser.add_argument("--resume", default="auto", help="auto (latest if any) | none | a checkpoint tag or path")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher


def c2i_config_from_args(args: argparse.Namespace):
    """The class-conditional (MAR) config of a launcher's --preset / --config / overrides (config/c2i.py); a bad
    key or value exits with the error naming it; --print-config prints it and exits."""
    from .config.c2i import resolve_c2i_config

    try:
        cfg = resolve_c2i_config(args.preset, args.config, args.overrides)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None
    return _maybe_print(cfg, args)


def text_and_image_tokenizers(cfg: Config, device="cpu"):
    """Load both tokenizers for a config (asset paths resolve against the repository root)."""
    from .models import build_image_tokenizer, check_special_token_ids, load_text_tokenizer, resolve_asset

    cfg.model.text.path = resolve_asset(cfg.model.text.path)
    text = load_text_tokenizer(cfg.model.text)
    check_special_token_ids(cfg.model.text, text)
    if text.vocab_size > cfg.model.ar.vocab_size:
        raise ValueError(f"text tokenizer has {text.vocab_size} ids but model.ar.vocab_size="
                         f"{cfg.model.ar.vocab_size}: raise model.ar.vocab_size")
    return text, build_image_tokenizer(cfg.model.image, device)
