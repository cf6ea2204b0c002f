"""Check README.md and docs/ against the repository: what they name must exist.

    python scripts/check_docs.py        # one line per problem; exit 1 if there is any

It fails when
- the README's "Two commands" block no longer holds the install and test commands that .ci/run runs (the main job's
  launcher and DeepSpeed config must exist too);
- a markdown link or image points to a file (or a heading anchor of a .md file) that does not exist;
- a repository path (`fastardiff_ds/...`, `launcher/...`, `scripts/...`, `tests/...`, `eval_suites/...`,
  `data_pipelines/...`, `ds_configs/...`, `sweeps/...`, `assets/...`, `docs/...`; `sampling/x.py` and the like
  under fastardiff_ds/; `test_file.py::test_name`) or a dotted module (`fastardiff_ds.data.metadata`,
  `python -m eval_suites.geneval`) does not exist;
- a config key written as `section.key=...` or `` `section.key` `` is not in the schema;
- docs/config.md is not what scripts/gen_config_docs.py writes.
docs/config.md itself is generated from the config dataclasses' comments: it is checked for links and for being
current only. Run by tests/unit/test_check_docs.py, so `pytest tests` (CI) runs it.
"""
from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

TOP_DIRS = ("fastardiff_ds", "launcher", "scripts", "tests", "eval_suites", "data_pipelines", "ds_configs", "sweeps",
            "assets", "docs")
PKG_DIRS = ("config", "data", "engines", "losses", "models", "sampling", "schedules", "training", "analysis",
            "scalebench")
SECTIONS = ("model", "data", "pretrain", "wandb", "inference", "train", "distill", "sampling", "image")
FILE_SUFFIXES = ("safetensors", "json", "jsonl", "py", "pt", "pth", "png", "yaml", "txt", "tar", "md", "parquet")

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
PATH = re.compile(rf"(?<![\w./-])((?:{'|'.join(TOP_DIRS)})/[\w./-]*)(::\w+)?")
SHORT_PATH = re.compile(rf"(?<![\w./-])((?:{'|'.join(PKG_DIRS)})/\w+\.py)\b")
MODULE = re.compile(r"(?<![\w./-])((?:fastardiff_ds|eval_suites|data_pipelines)(?:\.\w+)+)")
KEY_ASSIGN = re.compile(rf"(?<![\w./$-])((?:{'|'.join(SECTIONS)})\.[a-z_][\w.]*)=")
KEY_QUOTED = re.compile(rf"`((?:{'|'.join(SECTIONS)})\.[a-z_][\w.]*)`")


def doc_files(root: Path) -> list[Path]:
    return [root / "README.md"] + sorted((root / "docs").rglob("*.md"))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
    out = set()
    for line in strip_code(text).splitlines():
        m = re.match(r"^#{1,6}\s+(.*)$", line)
        if m:
            out.add(slug(m.group(1)))
    return out


def strip_code(text: str) -> str:
    """The text without fenced code blocks (headings and links inside them do not count)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def check_two_commands(root: Path, readme: str) -> list[str]:
    """The README's "Two commands" block must hold .ci/run's install and test commands (flags for quiet CI
    output aside) and the main job, whose launcher and --ds_config file exist."""
    ci = (root / ".ci" / "run").read_text()
    install = next((ln.strip() for ln in ci.splitlines() if ln.strip().startswith("pip install") and ".[" in ln), "")
    test = next((ln.strip() for ln in ci.splitlines() if ln.strip().startswith("pytest")), "")
    install = re.sub(r"\s+-q\b", "", install)
    test = re.sub(r"\s+-p\s+\S+", "", test).replace(" rc=$?", "")
    if not install or not test:
        return [".ci/run: no `pip install ... .[...]` or `pytest` line found to compare the README with"]
    m = re.search(r"^## Two commands\s*\n(.*?)^```(?:bash)?\n(.*?)^```", readme, flags=re.S | re.M)
    if not m:
        return ["README.md: no '## Two commands' section with a code block"]
    cmds = [ln for ln in m.group(2).splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    problems = []
    if len(cmds) != 2:
        problems.append(f"README.md: 'Two commands' holds {len(cmds)} commands, not 2")
    if not any(install in c and "deepspeed " in c for c in cmds):
        problems.append(f"README.md: 'Two commands' lost command 1 ({install!r} then deepspeed ...)")
    if not any(install in c and c.rstrip().endswith(test) for c in cmds):
        problems.append(f"README.md: 'Two commands' lost command 2 ({install!r} then {test!r}, as .ci/run runs)")
    for c in cmds:
        words = shlex.split(c.replace("&&", " "))
        for i, w in enumerate(words):
            if w.endswith(".py") and "/" in w and not (root / w).exists():
                problems.append(f"README.md: 'Two commands' runs {w}, which does not exist")
            if w == "--ds_config" and i + 1 < len(words) and not (root / words[i + 1]).exists():
                problems.append(f"README.md: 'Two commands' uses {words[i + 1]}, which does not exist")
    return problems


def check_links(root: Path, path: Path, text: str) -> list[str]:
    rel = path.relative_to(root)
    problems = []
    for target in LINK.findall(strip_code(text)):
        if re.match(r"^[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            problems.append(f"{rel}: link to {target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
            problems.append(f"{rel}: link to {target}: no heading '#{anchor}' in {dest.relative_to(root)}")
    return problems


def module_exists(root: Path, dotted: str) -> bool:
    """`a.b.c` is a module or package, or a module followed by one name defined in it."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        base = root.joinpath(*parts[:n])
        src = base.with_suffix(".py") if base.with_suffix(".py").exists() else base / "__init__.py"
        if src.exists():
            rest = parts[n:]
            return not rest or (len(rest) == 1 and re.search(rf"\b{rest[0]}\b", src.read_text()) is not None)
    return False


def check_paths(root: Path, path: Path, text: str) -> list[str]:
    rel = path.relative_to(root)
    problems = []
    for name, test in PATH.findall(text):
        name = name.rstrip(".")
        if not (root / name).exists():
            problems.append(f"{rel}: names {name}, which does not exist")
        elif test and re.search(rf"def {test[2:]}\b", (root / name).read_text()) is None:
            problems.append(f"{rel}: names {name}{test}, which is not a test in that file")
    for name in SHORT_PATH.findall(text):
        if not (root / "fastardiff_ds" / name).exists():
            problems.append(f"{rel}: names {name} (fastardiff_ds/{name}), which does not exist")
    for dotted in MODULE.findall(text):
        dotted = dotted.rstrip(".")
        if dotted.split(".")[-1] in FILE_SUFFIXES:
            continue
        if not module_exists(root, dotted):
            problems.append(f"{rel}: names the module {dotted}, which does not exist")
    return problems


def schema_keys() -> set[str]:
    """Every leaf key of the config trees (text-to-image `Config`, class-conditional `C2IConfig`) and every
    section above one."""
    sys.path.insert(0, str(ROOT))
    from fastardiff_ds.config import Config, dotted_keys
    from fastardiff_ds.config.c2i import C2IConfig

    keys = set(dotted_keys(Config())) | set(dotted_keys(C2IConfig()))
    return keys | {k.rsplit(".", i)[0] for k in keys for i in range(1, k.count(".") + 1)}


def check_keys(root: Path, path: Path, text: str, keys: set[str]) -> list[str]:
    rel = path.relative_to(root)
    found = KEY_ASSIGN.findall(text) + KEY_QUOTED.findall(text)
    return [f"{rel}: config key {k} is not in the schema (python launcher/train_t2i.py --print-config or launcher/train_c2i.py --print-config lists them)"
            for k in dict.fromkeys(found) if k.split(".")[-1] not in FILE_SUFFIXES and k not in keys]


def check_config_doc() -> list[str]:
    import gen_config_docs

    current = gen_config_docs.OUT.read_text() if gen_config_docs.OUT.exists() else ""
    if current != gen_config_docs.render():
        return ["docs/config.md is stale: run python scripts/gen_config_docs.py"]
    return []


def check(root: Path = ROOT, config_doc: bool = True) -> list[str]:
    """Every problem found under `root`, one line each (empty: all is well)."""
    keys = schema_keys()
    readme = (root / "README.md").read_text()
    problems = check_two_commands(root, readme)
    for path in doc_files(root):
        text = path.read_text()
        problems += check_links(root, path, text)
        if path != root / "docs" / "config.md":
            problems += check_paths(root, path, text) + check_keys(root, path, text, keys)
    return problems + (check_config_doc() if config_doc else [])


def main() -> int:
    problems = check()
    for p in problems:
        print(p)
    if problems:
        print(f"{len(problems)} problem(s) in README.md / docs/", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
