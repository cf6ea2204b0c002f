"""Text tokenizers and NextStep-1's prompt layout.

A prompt becomes `text · <|image_area|> h*w · <|begin_of_image|>` (left-padded with [PAD] in a batch); the image
tokens follow. The tiny preset uses a sentencepiece model trained on the synthetic captions
(`assets/tokenizer/shapes_sp.model`, made by `data_pipelines/train_tokenizer.py`); real presets use
`transformers.AutoTokenizer` from a local folder.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..config.schema import TextConfig

PAD, IMAGE_AREA, BOI, EOI, PLACEHOLDER = (
    "[PAD]", "<|image_area|>", "<|begin_of_image|>", "<|end_of_image|>", "<|image_placeholder|>")
SPECIAL_TOKENS = (PAD, IMAGE_AREA, BOI, EOI, PLACEHOLDER)


class PromptTooLong(ValueError):
    pass


class TextTokenizer:
    """Common prompt logic over a backend exposing `encode(str) -> list[int]` and `token_id(str) -> int | None`."""

    def __init__(self, cfg: TextConfig, encode, token_id, vocab_size: int, source: str):
        self.cfg, self._encode, self.vocab_size = cfg, encode, vocab_size
        missing = [t for t in SPECIAL_TOKENS if token_id(t) is None]
        if missing:
            raise ValueError(f"text tokenizer '{source}' lacks NextStep-1's special tokens {missing}: use a tokenizer "
                             "that has them (for sentencepiece, retrain with data_pipelines/train_tokenizer.py; for "
                             "a plain LM tokenizer set model.text.add_special_tokens=true)")
        self.pad_id, self.image_area_id, self.boi_id, self.eoi_id, self.placeholder_id = (
            token_id(t) for t in SPECIAL_TOKENS)

    def encode(self, text: str) -> list[int]:
        return list(self._encode(text))

    def prompt_ids(self, text: str, grid: int, strict: bool = True) -> list[int]:
        """Ids of `text <|image_area|> grid*grid <|begin_of_image|>`; text over `max_length` raises (strict) or is
        truncated (training)."""
        ids = self.encode(text)
        if len(ids) > self.cfg.max_length:
            if strict:
                raise PromptTooLong(f"prompt has {len(ids)} text tokens, over model.text.max_length="
                                    f"{self.cfg.max_length}: shorten the prompt or raise model.text.max_length "
                                    f"(the model was trained with that limit): {text[:80]!r}")
            ids = ids[: self.cfg.max_length]
        return ids + [self.image_area_id] + self.encode(f"{grid}*{grid}") + [self.boi_id]

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
        return TextTokenizer(cfg, lambda s: sp.encode(s), token_id, sp.get_piece_size(), str(path))
    if cfg.tokenizer == "hf":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        if cfg.add_special_tokens:
            tok.add_special_tokens({"additional_special_tokens": [t for t in SPECIAL_TOKENS if t != PAD],
                                    "pad_token": PAD})
        vocab = tok.get_vocab()
        return TextTokenizer(cfg, lambda s: tok.encode(s, add_special_tokens=False), vocab.get, len(tok), str(path))
    raise ValueError(f"model.text.tokenizer='{cfg.tokenizer}' is not one of: sentencepiece, hf")


def resolve_asset(path: str) -> str:
    """Relative asset paths resolve against the repository root when not found from the working directory."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return str(p)
    root = Path(__file__).resolve().parents[2]
    return str(root / p) if (root / p).exists() else str(p)
