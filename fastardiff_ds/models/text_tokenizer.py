"""Text tokenizers and NextStep-1's prompt layout, built as the official pipelines build it.

Official steps (stepfun-ai/NextStep-1 `pipeline_nextstep.py`: `_build_captions`, `generate_image`, `_add_prefix_ids`):
1. caption = f"{prompt} {positive_prompt}" when a positive prompt is given; the unconditional CFG rows are the
   negative prompt ("" by default), appended after the B conditional rows;
2. caption ids = tokenizer(caption, add_special_tokens=True) -- the BOS the tokenizer itself adds, if any. The
   NextStep-1.1 pipelines (the repo's `inference/gen_pipeline.py`, vLLM-Omni `pipeline_nextstep_1_1.py`) first
   prepend the `bos_token` text to the caption (`model.text.prompt_style=nextstep-1.1`);
3. prefix ids = tokenizer("<|image_area|>" + f"{h}*{w}", add_special_tokens=True), minus its first token whenever
   the tokenizer has a `bos_token` (the official code drops it unconditionally), then `<|begin_of_image|>`;
4. rows are left-padded with [PAD] (mask 0) to the longest, and the image tokens follow.
So a Llama-style tokenizer (adds BOS) gives `<bos> text <|image_area|> h*w <|begin_of_image|>`; one without BOS
gives `text <|image_area|> h*w <|begin_of_image|>`. The tiny preset uses a sentencepiece model trained on the
synthetic captions (`assets/tokenizer/shapes_sp.model`, made by `data_pipelines/train_tokenizer.py`; no BOS); real
presets use a transformers tokenizer from a local folder.

Why not `AutoTokenizer`: it first resolves the folder's `config.json`, and a published NextStep-1.1 folder names its
own Python files there (`auto_map`), so in a terminal transformers asks "Do you wish to run the custom code? [y/N]"
and, on `y`, imports code from the download. We never run code from a folder: the class comes from
`tokenizer_config.json`'s `tokenizer_class`, must be one of transformers' own tokenizers (`hf_tokenizer_class`), is
built directly with `trust_remote_code=False`, and `auto_map` is ignored.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from ..config.schema import TextConfig

PAD, IMAGE_AREA, BOI, EOI, PLACEHOLDER = (
    "[PAD]", "<|image_area|>", "<|begin_of_image|>", "<|end_of_image|>", "<|image_placeholder|>")
SPECIAL_TOKENS = (PAD, IMAGE_AREA, BOI, EOI, PLACEHOLDER)
PROMPT_STYLES = ("nextstep-1", "nextstep-1.1")
log = logging.getLogger(__name__)


def cfg_captions(prompts: list[str], cfg_rows: bool, positive_prompt: str = "", negative_prompt: str = "") -> list[str]:
    """The caption of every AR row: B conditional rows, then (two-pass CFG) B unconditional rows.

    As NextStep-1 `_build_captions`: a non-empty positive prompt is appended after a space; the unconditional
    rows are the negative prompt ("" = plain unconditional).
    """
    captions = [f"{p} {positive_prompt}" if positive_prompt else p for p in prompts]
    return captions + ([negative_prompt] * len(captions) if cfg_rows else [])


class PromptTooLong(ValueError):
    pass


class TextTokenizer:
    """Common prompt logic over a backend exposing `encode(str) -> list[int]` and `token_id(str) -> int | None`."""

    def __init__(self, cfg: TextConfig, encode, token_id, vocab_size: int, source: str, call=None,
                 bos_token: str | None = None):
        """encode: text -> ids of the plain text; call: text -> ids as the official `tokenizer(text,
        add_special_tokens=True).input_ids` (special-token strings map to their ids, the tokenizer's own BOS is
        added); default: `encode` between special tokens. bos_token: the tokenizer's BOS text, None if it has none."""
        if cfg.prompt_style not in PROMPT_STYLES:
            raise ValueError(f"model.text.prompt_style={cfg.prompt_style!r}: choose one of {PROMPT_STYLES}")
        self.cfg, self._encode, self.vocab_size = cfg, encode, vocab_size
        self._call = call or self._split_specials
        self.bos_token, self.bos_id = bos_token, (token_id(bos_token) if bos_token is not None else None)
        self._warned = False
        missing = [t for t in SPECIAL_TOKENS if token_id(t) is None]
        if missing:
            raise ValueError(f"text tokenizer '{source}' lacks NextStep-1's special tokens {missing}: use a tokenizer "
                             "that has them (for sentencepiece, retrain with data_pipelines/train_tokenizer.py; for "
                             "a plain LM tokenizer set model.text.add_special_tokens=true)")
        self.pad_id, self.image_area_id, self.boi_id, self.eoi_id, self.placeholder_id = (
            token_id(t) for t in SPECIAL_TOKENS)

    def encode(self, text: str) -> list[int]:
        return list(self._encode(text))

    def _split_specials(self, text: str) -> list[int]:
        parts = re.split("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")", text)
        ids = {t: i for t, i in zip(SPECIAL_TOKENS, (self.pad_id, self.image_area_id, self.boi_id, self.eoi_id,
                                                     self.placeholder_id))}
        return [i for p in parts if p for i in ([ids[p]] if p in ids else self.encode(p))]

    def prefix_ids(self, grid: int) -> list[int]:
        """`<|image_area|> h*w <|begin_of_image|>` as the official `_add_prefix_ids` builds it."""
        ids = self._call(f"{IMAGE_AREA}{grid}*{grid}")
        if self.bos_token is not None:  # official: drop the first token whenever the tokenizer has a bos_token
            if ids[0] != self.bos_id and not self._warned:
                self._warned = True
                log.warning("text tokenizer has bos_token %r but does not add it: the official NextStep pipeline "
                            "drops the first prefix token (%d) anyway, and so do we to match its prompts",
                            self.bos_token, ids[0])
            ids = ids[1:]
        return ids + [self.boi_id]

    def caption_ids(self, text: str, strict: bool = True) -> list[int]:
        """The caption's ids (with the tokenizer's BOS); text over `max_length` raises (strict) or is truncated."""
        bos_text = self.cfg.prompt_style == "nextstep-1.1" and self.bos_token is not None
        ids = self._call((self.bos_token if bos_text else "") + text)
        lead = 0
        while self.bos_id is not None and lead < len(ids) and ids[lead] == self.bos_id:
            lead += 1  # BOS tokens do not count against the text limit
        if len(ids) - lead > self.cfg.max_length:
            if strict:
                raise PromptTooLong(f"prompt has {len(ids) - lead} text tokens, over model.text.max_length="
                                    f"{self.cfg.max_length}: shorten the prompt or raise model.text.max_length "
                                    f"(the model was trained with that limit): {text[:80]!r}")
            ids = ids[: lead + self.cfg.max_length]
        return ids

    def prompt_ids(self, text: str, grid: int, strict: bool = True) -> list[int]:
        """Ids of `[<bos>] text <|image_area|> grid*grid <|begin_of_image|>` (module docstring: official steps)."""
        return self.caption_ids(text, strict) + self.prefix_ids(grid)

    def batch(self, texts: list[str], grid: int, strict: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded (ids (B,T), attention_mask (B,T)) for a list of prompts."""
        seqs = [self.prompt_ids(t, grid, strict) for t in texts]
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, T - len(s):] = torch.tensor(s)
            mask[i, T - len(s):] = 1
        return ids, mask


def load_text_tokenizer(cfg: TextConfig) -> TextTokenizer:
    path = Path(cfg.path)
    if not path.exists():
        raise FileNotFoundError(f"text tokenizer not found at '{path}': set model.text.path to a local "
                                f"{'sentencepiece .model file' if cfg.tokenizer == 'sentencepiece' else 'tokenizer folder'}")
    if cfg.tokenizer == "sentencepiece":
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(path))
        unk = sp.unk_id()
        token_id = lambda t: (lambda i: None if i == unk else i)(sp.piece_to_id(t))  # noqa: E731
        return TextTokenizer(cfg, lambda s: sp.encode(s), token_id, sp.get_piece_size(), str(path))  # no BOS
    if cfg.tokenizer == "hf":
        tok = load_hf_tokenizer(path)
        if cfg.add_special_tokens:
            tok.add_special_tokens({"additional_special_tokens": [t for t in SPECIAL_TOKENS if t != PAD],
                                    "pad_token": PAD})
        vocab = tok.get_vocab()
        return TextTokenizer(cfg, lambda s: tok.encode(s, add_special_tokens=False), vocab.get, len(tok), str(path),
                             call=lambda s: _hf_call(tok, s), bos_token=tok.bos_token)
    raise ValueError(f"model.text.tokenizer='{cfg.tokenizer}' is not one of: sentencepiece, hf")


# tokenizer_class values that are not in transformers' per-model registry but are its own generic classes
GENERIC_HF_TOKENIZERS = ("PreTrainedTokenizerFast", "TokenizersBackend", "PreTrainedTokenizer", "PythonBackend")


def hf_tokenizer_class(name: str, source: Path):
    """transformers' own tokenizer class called `name` (a `tokenizer_class` value), else a ValueError naming the
    file: only classes transformers ships (its tokenizer registry and generic classes), never one from a folder."""
    import transformers
    from transformers import PreTrainedTokenizerBase
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES

    known = set(GENERIC_HF_TOKENIZERS)
    for v in TOKENIZER_MAPPING_NAMES.values():  # transformers 4.x: (slow, fast) pairs; 5.x: one name
        known.update(x for x in (v if isinstance(v, (tuple, list)) else (v,)) if x)
    base = name.removesuffix("Fast") if isinstance(name, str) else name
    cls = None
    if isinstance(name, str) and (name in known or base in known):
        cls = getattr(transformers, name, None) or getattr(transformers, base, None)
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedTokenizerBase)
            and cls.__module__.startswith("transformers.")):
        raise ValueError(f"{source}: tokenizer_class={name!r} is not a tokenizer transformers ships (custom "
                         "tokenizer code in a folder is never run): set tokenizer_class to the transformers class "
                         "the tokenizer files fit, e.g. Qwen2Tokenizer, LlamaTokenizerFast or "
                         "PreTrainedTokenizerFast (any tokenizer.json)")
    return cls


def _byte_level_llama(cls, path: Path):
    """As AutoTokenizer (transformers 5): a `LlamaTokenizer` whose tokenizer.json is byte-level (Llama 3 style) is
    loaded as the generic class, since LlamaTokenizer rebuilds a Metaspace tokenizer."""
    import transformers

    generic = getattr(transformers, "TokenizersBackend", None)
    if generic is None or cls.__name__ != "LlamaTokenizer" or not (path / "tokenizer.json").is_file():
        return cls
    return generic if generic._tokenizer_json_has_byte_level(str(path), local_files_only=True) else cls


def load_hf_tokenizer(path: Path):
    """The folder's tokenizer, its class from tokenizer_config.json (`hf_tokenizer_class`); runs no folder code."""
    cfg_file = path / "tokenizer_config.json"
    try:
        tok_cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    except (OSError, ValueError) as e:
        raise ValueError(f"{cfg_file} is unreadable ({type(e).__name__}: {e}): restore the file from the "
                         "download") from None
    name = tok_cfg.get("tokenizer_class") if isinstance(tok_cfg, dict) else None
    if name is None:
        if not (path / "tokenizer.json").is_file():
            raise ValueError(f"{path}: no tokenizer_class in {cfg_file.name} and no tokenizer.json: point "
                             "model.text.path at a tokenizer folder (tokenizer_config.json + tokenizer files)")
        name = "PreTrainedTokenizerFast"
    cls = _byte_level_llama(hf_tokenizer_class(name, cfg_file), path)
    return cls.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)


def _hf_call(tok, text: str) -> list[int]:
    """`tok(text, add_special_tokens=True).input_ids` without a trailing EOS (the official pipelines set
    `add_eos_token = False`; we drop the EOS instead, since transformers 5 rebuilds the BOS template on that set)."""
    ids = tok(text, add_special_tokens=True).input_ids
    eos = tok.eos_token_id
    if eos is not None and len(ids) > 0 and ids[-1] == eos and not text.endswith(str(tok.eos_token)):
        ids = ids[:-1]
    return ids


def resolve_asset(path: str) -> str:
    """Relative asset paths resolve against the repository root when not found from the working directory."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return str(p)
    root = Path(__file__).resolve().parents[2]
    return str(root / p) if (root / p).exists() else str(p)
