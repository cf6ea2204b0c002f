"""Prompt ids as the official NextStep pipelines build them, on HF tokenizer folders written like NextStep's.

Fixture generator: a word-level `tokenizers` model wrapped as a `PreTrainedTokenizerFast`, given NextStep's
`special_tokens_dict` with `add_special_tokens` and written with `save_pretrained` (as NextStep's tokenizer folders
are): "llama" adds `<s>` itself (a TemplateProcessing post-processor, bos_token set); "qwen" has no BOS at all.
The reference below follows stepfun-ai/NextStep-1 `pipeline_nextstep.py` step by step (`_build_captions`,
`tokenizer(..., padding="longest", padding_side="left")`, `_add_prefix_ids`), and the 1.1 pipelines' BOS text.
"""
from __future__ import annotations

import json

import pytest
import torch

from fastardiff_ds.config import get_preset
from fastardiff_ds.models import load_text_tokenizer
from fastardiff_ds.models.text_tokenizer import cfg_captions

NEXTSTEP_ADDITIONAL = ["<|image_area|>", "<|begin_of_image|>", "<|end_of_image|>", "<|image_placeholder|>",
                       "<|begin_of_prompt_refinement|>", "<|end_of_prompt_refinement|>", "<|begin_of_thinking|>",
                       "<|end_of_thinking|>"]
WORDS = "a red blue circle square photo of dog cat big small lowres bad quality masterpiece best , . 8 16 *".split()


def write_tokenizer(folder, style: str) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>"] + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    kw = {}
    if style == "llama":
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                          special_tokens=[("<s>", 1)])
        kw = dict(bos_token="<s>", eos_token="</s>")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", **kw)
    tok.add_special_tokens(dict(pad_token="[PAD]", additional_special_tokens=NEXTSTEP_ADDITIONAL))
    tok.save_pretrained(str(folder))
    if style == "llama":  # as Llama-family tokenizer_config.json files state it (transformers reads these flags)
        cfg_file = folder / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text())
        cfg.update(add_bos_token=True, add_eos_token=False)
        cfg_file.write_text(json.dumps(cfg))
    return str(folder)


def official_prompt_batch(path, prompts, grid, positive, negative, cfg_rows, bos_text: bool):
    """NextStep's own steps, written from the official code (the reference for our TextTokenizer)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True, model_max_length=512, padding_side="left",
                                        use_fast=True)
    # The official code then sets `tok.add_eos_token = False`: a no-op for these tokenizers (no EOS template) under
    # NextStep's pinned transformers 4.55, but transformers 5 rebuilds the whole BOS/EOS template on that setter,
    # so the reference leaves it out (our loader never touches it either).
    assert tok("a").input_ids[-1] != tok.eos_token_id
    captions = list(prompts)
    if positive:
        captions = [f"{c} {positive}" for c in captions]
    if cfg_rows:
        captions = captions + [negative or ""] * len(captions)
    if bos_text and tok.bos_token is not None:  # NextStep-1.1 gen_pipeline / vLLM-Omni
        captions = [tok.bos_token + c for c in captions]
    out = tok(captions, padding="longest", truncation=False, add_special_tokens=True, return_tensors="pt")
    prefix = tok("<|image_area|>" + f"{grid}*{grid}", truncation=False, add_special_tokens=True, return_tensors="pt")
    p_ids, p_mask = prefix.input_ids, prefix.attention_mask
    if tok.bos_token is not None:
        p_ids, p_mask = p_ids[:, 1:], p_mask[:, 1:]
    boi = tok.convert_tokens_to_ids("<|begin_of_image|>")
    p_ids = torch.cat([p_ids, p_ids.new_tensor([[boi]])], 1)
    p_mask = torch.cat([p_mask, p_mask.new_ones((1, 1))], 1)
    n = out.input_ids.shape[0]
    ids = torch.cat([out.input_ids, p_ids.expand(n, -1)], 1)
    mask = torch.cat([out.attention_mask, p_mask.expand(n, -1)], 1)
    return ids, mask


def ours(path, style="nextstep-1"):
    cfg = get_preset("tiny").model.text
    cfg.tokenizer, cfg.path, cfg.max_length, cfg.prompt_style = "hf", path, 64, style
    return load_text_tokenizer(cfg)


@pytest.mark.parametrize("kind", ["llama", "qwen"])
@pytest.mark.parametrize("style", ["nextstep-1", "nextstep-1.1"])
def test_prompt_ids_match_the_official_pipeline(tmp_path, kind, style):
    path = write_tokenizer(tmp_path / kind, kind)
    prompts = ["a red circle", "a photo of a big blue dog , best quality"]
    positive, negative = "masterpiece , best quality .", "lowres , bad quality ."
    tok = ours(path, style)
    for pos, neg, rows in [(positive, negative, True), ("", "", True), ("", negative, False)]:
        want_ids, want_mask = official_prompt_batch(path, prompts, 8, pos, neg, rows, style == "nextstep-1.1")
        ids, mask = tok.batch(cfg_captions(prompts, rows, pos, neg), 8)
        assert torch.equal(ids, want_ids) and torch.equal(mask, want_mask), (ids, want_ids)


def test_layout_bos_prefix_and_negative_rows(tmp_path):
    tok = ours(write_tokenizer(tmp_path / "llama", "llama"))
    area, boi, bos = tok.image_area_id, tok.boi_id, tok.bos_id
    ids = tok.prompt_ids("a red circle", grid=16)
    assert ids[0] == bos and ids.count(bos) == 1  # one BOS, the tokenizer's own; none inside the prefix
    assert ids[-1] == boi and ids[ids.index(area) + 1:-1] == tok.encode("16 * 16")
    caps = cfg_captions(["a dog"], True, "best quality", "lowres")
    assert caps == ["a dog best quality", "lowres"]
    assert cfg_captions(["a dog"], False, "", "lowres") == ["a dog"]
    ids11 = ours(str(tmp_path / "llama"), "nextstep-1.1").prompt_ids("a red circle", grid=16)
    assert ids11[:2] == [bos, bos] and ids11[2:] == ids[1:]  # 1.1 pipelines: BOS text + the tokenizer's BOS
    qwen = ours(write_tokenizer(tmp_path / "qwen", "qwen"))
    assert qwen.bos_id is None and qwen.prompt_ids("a", grid=8)[1] == qwen.image_area_id


def test_bos_does_not_count_against_max_length(tmp_path):
    tok = ours(write_tokenizer(tmp_path / "llama", "llama"))
    tok.cfg.max_length = 3
    assert len(tok.caption_ids("a red circle")) == 4
    truncated = tok.caption_ids("a red circle square", strict=False)
    assert truncated[0] == tok.bos_id and len(truncated) == 4


def test_sentencepiece_layout_is_unchanged():
    """The tiny sentencepiece tokenizer has no BOS: text, <|image_area|>, "g*g" encoded alone, <|begin_of_image|>."""
    from fastardiff_ds.models import resolve_asset

    cfg = get_preset("tiny").model.text
    cfg.path = resolve_asset(cfg.path)
    tok = load_text_tokenizer(cfg)
    assert tok.bos_token is None
    want = tok.encode("a red square") + [tok.image_area_id] + tok.encode("8*8") + [tok.boi_id]
    assert tok.prompt_ids("a red square", grid=8) == want
    assert tok.prompt_ids("", grid=8) == want[len(tok.encode("a red square")):]
