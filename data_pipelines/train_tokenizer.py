"""Train the shapes-domain sentencepiece tokenizer (tiny preset) on captions from `caption_for`.

    python data_pipelines/train_tokenizer.py --out assets/tokenizer/shapes_sp --num-captions 20000

BPE; special symbols (NextStep-1's names) are user-defined pieces: [PAD], <|image_area|>,
<|begin_of_image|>, <|end_of_image|>, <|image_placeholder|>. Digits are split (so "32*32" ->
3 2 * 3 2) and byte fallback keeps every string encodable. Deterministic: fixed caption seed,
one thread, no input sampling.
"""
from __future__ import annotations

import argparse
import io
import os

import numpy as np
import sentencepiece as spm

from fastardiff_ds.data.shapes import TASKS, sample_scene

SPECIAL = ["[PAD]", "<|image_area|>", "<|begin_of_image|>", "<|end_of_image|>", "<|image_placeholder|>"]


def corpus(num_captions: int, seed: int) -> list[str]:
    """Captions of every task type (round-robin) plus image-area strings so digits and '*' get pieces."""
    rng = np.random.default_rng(seed)
    lines = [sample_scene(rng, 32, TASKS[i % len(TASKS)])["prompt"] for i in range(num_captions)]
    lines += [f"<|image_area|>{h}*{w}" for h in range(1, 65) for w in (h, 2 * h)]
    return lines


def train(out_prefix: str, num_captions: int = 20000, vocab_size: int = 512, seed: int = 0) -> str:
    os.makedirs(os.path.dirname(out_prefix) or ".", exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus(num_captions, seed)), model_writer=model, model_type="bpe",
        vocab_size=vocab_size, user_defined_symbols=SPECIAL, split_digits=True, byte_fallback=True,
        character_coverage=1.0, num_threads=1, shuffle_input_sentence=False, input_sentence_size=0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, minloglevel=2,
        normalization_rule_name="identity")
    with open(out_prefix + ".model", "wb") as f:
        f.write(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    with open(out_prefix + ".vocab", "w", encoding="utf-8") as f:
        f.writelines(f"{sp.id_to_piece(i)}\t{sp.get_score(i)}\n" for i in range(sp.get_piece_size()))
    return out_prefix + ".model"


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="assets/tokenizer/shapes_sp", help="output prefix (.model / .vocab)")
    p.add_argument("--num-captions", type=int, default=20000)
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    path = train(a.out, a.num_captions, a.vocab_size, a.seed)
    print(path)
    return path


if __name__ == "__main__":
    main()
