#!/usr/bin/env python
"""Mutation testing: apply each deliberate bug of tests/mutants.toml, one at a time, run the tests named for it, and
report which mutants survived (a surviving mutant is a bug the suite cannot see).

Every mutant runs in a scratch copy of the tree (assets/ linked, not copied), so the working tree is never touched,
even if the run is killed. Before the mutants, the union of their tests runs once unmutated: a red baseline would
make every mutant look killed. A mutant whose `old` text no longer occurs exactly `count` times is stale: the run
stops and names it (fix the entry after a refactor, never delete it silently).

    python scripts/mutants.py                 # every mutant
    python scripts/mutants.py --fast          # the subset CI runs (.ci/run)
    python scripts/mutants.py --only residual-sign --only fallback-dropped
    python scripts/mutants.py --list

Prints one line per mutant and a JSON summary; exit 0 iff every selected mutant was killed.
Grow the list with every bug found: a new entry names the file, the exact old and new text, and the tests that
must fail.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIST = ROOT / "tests" / "mutants.toml"
SKIP = {".git", ".venv", ".venv-ci", "__pycache__", ".pytest_cache", "runs", "outputs", "wandb", "build", "assets"}


@dataclass(frozen=True)
class Edit:
    path: str
    old: str
    new: str
    count: int = 1


@dataclass(frozen=True)
class Mutant:
    name: str
    why: str
    edits: tuple[Edit, ...]
    tests: tuple[str, ...]
    fast: bool = False


def load(path: Path = LIST) -> list[Mutant]:
    """Parse the mutant list; every entry needs name, why, tests and either file/old/new or edits = [...]."""
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise SystemExit(f"mutants: cannot read {path}: {e}")
    out, seen = [], set()
    for i, m in enumerate(raw.get("mutant", [])):
        name = m.get("name", f"#{i}")
        edits = m.get("edits") or [{k: m[k] for k in ("file", "old", "new", "count") if k in m}]
        try:
            es = tuple(Edit(e["file"], e["old"], e["new"], int(e.get("count", 1))) for e in edits)
            mut = Mutant(name, m["why"], es, tuple(m["tests"]), bool(m.get("fast", False)))
        except KeyError as e:
            raise SystemExit(f"mutants: entry {name!r} in {path} lacks {e}: give name, why, tests, file/old/new")
        if name in seen:
            raise SystemExit(f"mutants: two entries are named {name!r} in {path}")
        seen.add(name)
        out.append(mut)
    if not out:
        raise SystemExit(f"mutants: {path} lists no [[mutant]] entries")
    return out


def check_applies(m: Mutant, root: Path = ROOT) -> None:
    for e in m.edits:
        text = (root / e.path).read_text()
        n = text.count(e.old)
        if n != e.count:
            raise SystemExit(f"mutants: {m.name!r} is stale: {e.path} holds its old text {n} times, expected "
                             f"{e.count}. Update the entry in {LIST.relative_to(ROOT)} to the code as it is now.")


def scratch_copy(dst: Path) -> None:
    def ignore(_dir, names):
        return [n for n in names if n in SKIP or n.endswith(".egg-info")]

    shutil.copytree(ROOT, dst, ignore=ignore, symlinks=True)
    if (ROOT / "assets").exists():
        (dst / "assets").symlink_to(ROOT / "assets")


def apply(m: Mutant, root: Path) -> None:
    for e in m.edits:
        p = root / e.path
        p.write_text(p.read_text().replace(e.old, e.new))


def run_tests(root: Path, tests: tuple[str, ...], timeout: float) -> tuple[int, str, float]:
    env = dict(os.environ, PYTHONPATH=str(root), WANDB_MODE="disabled", DS_ACCELERATOR="cpu")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        return r.returncode, (r.stdout + r.stderr)[-2000:], time.perf_counter() - t0
    except subprocess.TimeoutExpired:
        return -1, "timeout", time.perf_counter() - t0


def imports_from(root: Path) -> bool:
    """The scratch copy's package is the one imported (not the editable install of the working tree)."""
    env = dict(os.environ, PYTHONPATH=str(root))
    r = subprocess.run([sys.executable, "-c", "import fastardiff_ds; print(fastardiff_ds.__file__)"], cwd=root,
                       env=env, capture_output=True, text=True)
    return r.returncode == 0 and Path(r.stdout.strip()).resolve().is_relative_to(root.resolve())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fast", action="store_true", help="only the mutants marked fast (what CI runs)")
    ap.add_argument("--only", action="append", default=[], metavar="NAME", help="run this mutant (repeatable)")
    ap.add_argument("--list", action="store_true", help="print the mutants and exit")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per test run (a timeout counts as killed)")
    ap.add_argument("--json", type=Path, help="also write the summary here")
    args = ap.parse_args(argv)
    mutants = load()
    if args.only:
        unknown = set(args.only) - {m.name for m in mutants}
        if unknown:
            raise SystemExit(f"mutants: no mutant named {sorted(unknown)}; --list shows them")
        mutants = [m for m in mutants if m.name in args.only]
    elif args.fast:
        mutants = [m for m in mutants if m.fast]
    if args.list:
        for m in mutants:
            print(f"{m.name:32s} {'fast' if m.fast else '    '}  {m.why}")
        return 0
    for m in mutants:
        check_applies(m)
    results, t_all = [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mutants-") as tmp:
        base = Path(tmp) / "baseline"
        scratch_copy(base)
        if not imports_from(base):
            raise SystemExit("mutants: the scratch copy's fastardiff_ds is not the one imported; run from the "
                             "project's virtual environment (pip install -e '.[test]')")
        union = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
        rc, out, sec = run_tests(base, union, args.timeout)
        print(f"baseline (unmutated, {len(union)} test targets): rc={rc} {sec:.0f}s", flush=True)
        if rc != 0:
            print(out, file=sys.stderr)
            raise SystemExit("mutants: the tests fail without any mutant; fix them first")
        shutil.rmtree(base)
        for m in mutants:
            root = Path(tmp) / m.name
            scratch_copy(root)
            apply(m, root)
            rc, out, sec = run_tests(root, m.tests, args.timeout)
            shutil.rmtree(root)
            if rc == 5:
                raise SystemExit(f"mutants: {m.name!r}: pytest collected no tests from {list(m.tests)}")
            status = "survived" if rc == 0 else ("killed (timeout)" if rc == -1 else "killed")
            print(f"{m.name:32s} {status:18s} {sec:6.1f}s  {m.why}", flush=True)
            if rc == 0:
                print(f"    tests that should have failed: {' '.join(m.tests)}", flush=True)
            results.append({"name": m.name, "status": status, "seconds": round(sec, 1), "tests": list(m.tests)})
    survived = [r["name"] for r in results if r["status"] == "survived"]
    summary = {"mutants": len(results), "killed": len(results) - len(survived), "survived": survived,
               "seconds": round(time.perf_counter() - t_all, 1), "results": results}
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
