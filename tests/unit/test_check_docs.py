"""scripts/check_docs.py: README.md and docs/ name only what exists, and the check fails when they do not."""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_scripts_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_docs = _load("check_docs")
gen_config_docs = _load("gen_config_docs")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A repository with this README, .ci/run, the main job's files and one docs page to break."""
    for rel in ("README.md", ".ci/run"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp_path / rel)
    for rel in ("launcher/train_t2i.py", "ds_configs/zero3.json", "fastardiff_ds/engines/dist.py",
                "tests/unit/test_ok.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("def test_there():\n    pass\n")
    (tmp_path / "README.md").write_text("## Two commands\n\n```bash\n" + _two_commands() + "```\n")
    (tmp_path / "docs").mkdir()
    return tmp_path


def _two_commands() -> str:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Two commands", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return block


def test_readme_and_docs_pass_the_check():
    assert check_docs.check() == []


def test_a_clean_page_passes(tree: Path):
    (tree / "docs" / "page.md").write_text(
        "# A page\n\n## Some section\n\nSee [the README](../README.md) and [here](#some-section).\n"
        "`train.steps=100` and `inference.gamma`, in `launcher/train_t2i.py` and `engines/dist.py`;\n"
        "`tests/unit/test_ok.py::test_there`; the module `fastardiff_ds.engines.dist`; `model.safetensors`.\n")
    assert check_docs.check(tree, config_doc=False) == []


@pytest.mark.parametrize("line, problem", [
    ("[gone](missing.md)", "link to missing.md: no such file"),
    ("![fig](../docs/nope.png)", "link to ../docs/nope.png: no such file"),
    ("[anchor](#no-such-heading)", "no heading '#no-such-heading'"),
    ("run it with train.no_such_key=3", "config key train.no_such_key is not in the schema"),
    ("the knob `inference.gammma`", "config key inference.gammma is not in the schema"),
    ("see `fastardiff_ds/sampling/gone.py`", "names fastardiff_ds/sampling/gone.py, which does not exist"),
    ("see `sampling/gone.py`", "names sampling/gone.py (fastardiff_ds/sampling/gone.py), which does not exist"),
    ("`tests/unit/test_ok.py::test_missing`", "test_ok.py::test_missing, which is not a test in that file"),
    ("`python -m fastardiff_ds.nowhere`", "names the module fastardiff_ds.nowhere, which does not exist"),
])
def test_a_broken_page_fails(tree: Path, line: str, problem: str):
    (tree / "docs" / "page.md").write_text(f"# A page\n\n{line}\n")
    problems = check_docs.check(tree, config_doc=False)
    assert len(problems) == 1 and problem in problems[0], problems


def test_the_readme_losing_a_command_fails(tree: Path):
    readme = (tree / "README.md").read_text()
    (tree / "README.md").write_text(readme.replace(' && pytest -q tests', ''))
    problems = check_docs.check(tree, config_doc=False)
    assert any("lost command 2" in p for p in problems), problems
    (tree / "README.md").write_text(readme.replace("launcher/train_t2i.py", "launcher/train.py"))
    problems = check_docs.check(tree, config_doc=False)
    assert any("runs launcher/train.py, which does not exist" in p for p in problems), problems
    (tree / "README.md").write_text("# no such section\n")
    assert check_docs.check(tree, config_doc=False) == ["README.md: no '## Two commands' section with a code block"]


def test_a_stale_config_reference_fails(tmp_path: Path, monkeypatch):
    stale = tmp_path / "config.md"
    stale.write_text(gen_config_docs.render().replace("`train.steps`", "`train.stepz`"))
    import gen_config_docs as imported  # the module check_docs imports (scripts/ is on its sys.path)

    monkeypatch.setattr(imported, "OUT", stale)
    assert check_docs.check_config_doc() == ["docs/config.md is stale: run python scripts/gen_config_docs.py"]
    stale.write_text(imported.render())
    assert check_docs.check_config_doc() == []


def test_the_config_reference_lists_every_key():
    from fastardiff_ds.config import Config, dotted_keys

    text = gen_config_docs.render()
    missing = [k for k in dotted_keys(Config()) if f"| `{k}` |" not in text]
    assert missing == []
