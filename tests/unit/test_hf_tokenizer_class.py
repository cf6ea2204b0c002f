"""An hf tokenizer is built from transformers' own classes only: tokenizer_config.json's `tokenizer_class` is
checked against them, a custom class is a clear error naming the file and the key, `auto_map` is ignored."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from fastardiff_ds.config.schema import TextConfig
from fastardiff_ds.models.text_tokenizer import hf_tokenizer_class, load_hf_tokenizer, load_text_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
from nextstep_official import write_tokenizer  # noqa: E402


def _set_class(folder: Path, name) -> Path:
    cfg_file = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["tokenizer_class"] = name
    cfg_file.write_text(json.dumps(cfg))
    return cfg_file


@pytest.mark.parametrize("name", ["NextStepTokenizer", "os.system", 7])
def test_a_tokenizer_class_transformers_does_not_ship_is_refused_naming_file_and_key(tmp_path, name):
    write_tokenizer(tmp_path)
    cfg_file = _set_class(tmp_path, name)
    cfg = TextConfig(tokenizer="hf", path=str(tmp_path), max_length=16)
    with pytest.raises(ValueError, match=rf"{cfg_file}: tokenizer_class={name!r} is not a tokenizer transformers"):
        load_text_tokenizer(cfg)


@pytest.mark.parametrize("name", ["Qwen2Tokenizer", "Qwen2TokenizerFast", "PreTrainedTokenizerFast",
                                  "LlamaTokenizerFast", "GPT2Tokenizer"])
def test_transformers_own_classes_resolve_to_transformers(name):
    cls = hf_tokenizer_class(name, Path("tokenizer_config.json"))
    assert cls.__module__.startswith("transformers.")


def test_the_class_is_the_one_named_and_auto_map_is_ignored(tmp_path):
    ids = write_tokenizer(tmp_path)
    _set_class(tmp_path, "PreTrainedTokenizerFast")
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": [None, "tokenization_nextstep.NextStepTokenizer"]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_hf_tokenizer(tmp_path)
    assert tok.convert_tokens_to_ids("<|image_area|>") == ids["<|image_area|>"]
    assert not tok.__class__.__module__.startswith("transformers_modules")
