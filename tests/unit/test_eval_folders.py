"""GenEval's folder contract (generation apart from scoring) and the suites' command lines."""
import json
import sys

import pytest
from PIL import Image

from eval_suites.folders import read_generation_folder
from eval_suites.generation import prompt_seed, write_generation_folder


def colour_generator(calls):
    def gen(prompt, n, seed):
        calls.append((prompt, n, seed))
        return [Image.new("RGB", (8, 8), (seed % 256, j, 0)) for j in range(n)]
    return gen


def test_layout_metadata_and_seeds(tmp_path):
    meta = [{"tag": "single_object", "prompt": "a photo of a cat"}, {"tag": "colors", "prompt": "a red dog"}]
    calls = []
    write_generation_folder(meta, tmp_path, colour_generator(calls), n_per_prompt=3, seed=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000", "00001"]
    assert json.loads((tmp_path / "00001" / "metadata.jsonl").read_text()) == meta[1]
    assert sorted(p.name for p in (tmp_path / "00000" / "samples").iterdir()) == ["0000.png", "0001.png", "0002.png"]
    assert calls == [("a photo of a cat", 3, prompt_seed(5, 0)), ("a red dog", 3, prompt_seed(5, 1))]
    entries = read_generation_folder(tmp_path)
    assert [e.index for e in entries] == [0, 1] and entries[1].metadata == meta[1]
    assert Image.open(entries[0].image_paths[2]).getpixel((0, 0)) == (prompt_seed(5, 0) % 256, 2, 0)


def test_complete_prompts_are_skipped_on_resume(tmp_path):
    meta = [{"prompt": f"p{i}"} for i in range(3)]
    write_generation_folder(meta, tmp_path, colour_generator([]), n_per_prompt=2)
    (tmp_path / "00001" / "samples" / "0001.png").unlink()  # an interrupted prompt
    calls = []
    write_generation_folder(meta, tmp_path, colour_generator(calls), n_per_prompt=2)
    assert [c[0] for c in calls] == ["p1"]


def test_bad_generator_and_bad_folder_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="returned 1 images"):
        write_generation_folder([{"prompt": "x"}], tmp_path / "a", lambda p, n, s: [Image.new("RGB", (4, 4))], 2)
    with pytest.raises(KeyError, match="no 'prompt'"):
        write_generation_folder([{"text": "x"}], tmp_path / "b", colour_generator([]), 1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="metadata.jsonl"):
        read_generation_folder(tmp_path / "empty")


@pytest.mark.parametrize("module,flags", [
    ("geneval", ["--images", "--detector", "--detector-config", "--detector-ckpt", "--clip-ckpt", "--out"]),
    ("mjhq_fid", ["--images", "--mjhq-root", "--inception-weights", "--shapes-weights", "--resolution", "--out"]),
    ("clip_score", ["--images", "--clip-model", "--clip-ckpt", "--out"]),
])
def test_help_names_the_inputs(module, flags, capsys):
    import importlib
    mod = importlib.import_module(f"eval_suites.{module}")
    with pytest.raises(SystemExit):
        mod.main(["score", "--help"])
    text = capsys.readouterr().out
    assert all(f in text for f in flags), [f for f in flags if f not in text]
    with pytest.raises(SystemExit):
        mod.main(["generate", "--help"])
    gen_text = capsys.readouterr().out
    assert all(f in gen_text for f in ("--ckpt", "--mode", "--preset", "--outdir"))


def test_scoring_never_imports_model_code(tmp_path):
    import subprocess
    code = ("import sys, eval_suites.geneval, eval_suites.mjhq_fid, eval_suites.clip_score; "
            "bad = [m for m in sys.modules if m.startswith('fastardiff_ds.') and "
            "m.split('.')[1] in ('models', 'sampling', 'inference', 'engines', 'training')]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr
