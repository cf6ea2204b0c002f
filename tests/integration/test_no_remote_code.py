"""A downloaded folder never asks a question and never runs its own code, even in a real terminal.

The published NextStep-1.1 folder names its Python files in config.json's `auto_map`; through `AutoTokenizer`,
transformers then asked "Do you wish to run the custom code? [y/N]" on a terminal and waited 15 s, and `y` ran the
folder's code. Here the folder's files write a marker when imported, the launcher runs on a pseudo-terminal, and
the test answers `y` to any such question, as a hurried user would: the marker must stay unwritten and no question
may appear."""
from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
sys.path.insert(0, str(ROOT / "tests" / "integration"))
from nextstep_official import add_custom_code, write_official  # noqa: E402
from test_generate_official import _tiny_vae  # noqa: E402

PROMPT_TEXT = ("custom code", "[y/N]")


def run_on_pty(argv: list[str], env: dict, timeout: float = 240.0) -> tuple[int, str]:
    """Run `argv` with a pseudo-terminal as stdin/stdout/stderr; answer `y` to a custom-code question."""
    leader, follower = os.openpty()
    proc = subprocess.Popen(argv, stdin=follower, stdout=follower, stderr=follower, env=env, cwd=ROOT,
                            close_fds=True)
    os.close(follower)
    out, answered, deadline = b"", False, time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:  # the child closed the terminal
                    chunk = b""
                if not chunk and proc.poll() is not None:
                    break
                out += chunk
                if not answered and b"[y/N]" in out:
                    os.write(leader, b"y\n")
                    answered = True
            elif proc.poll() is not None:
                break
        else:
            proc.kill()
            pytest.fail(f"{argv[1]} did not finish in {timeout:.0f} s on a terminal; output:\n"
                        f"{out.decode(errors='replace')[-3000:]}")
    finally:
        os.close(leader)
    return proc.wait(), out.decode(errors="replace")


def _env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
               TERM="dumb")
    return env


def _check(rc: int, out: str, marker: Path) -> None:
    asked = [t for t in PROMPT_TEXT if t in out]
    assert not asked, f"a question about running the folder's code appeared ({asked}):\n{out[-3000:]}"
    assert not marker.exists(), f"code from the folder ran (it wrote {marker}: {marker.read_text()!r})"
    assert rc == 0, out[-3000:]


def test_generate_on_a_terminal_runs_no_code_from_the_folder(tmp_path):
    ckpt, marker = write_official(tmp_path / "NextStep-1.1", "1.1"), tmp_path / "folder_code_ran"
    add_custom_code(ckpt, marker)
    vae = _tiny_vae(tmp_path / "vae")
    argv = [sys.executable, str(ROOT / "launcher" / "generate.py"), "--ckpt", str(ckpt), "--prompt", "a red cat",
            "--num-images", "1", "--threads", "1", "--out", str(tmp_path / "out"), f"model.image.vae_path={vae}",
            "inference.num_steps=2"]
    rc, out = run_on_pty(argv, _env(tmp_path))
    _check(rc, out, marker)
    assert len(list((tmp_path / "out").glob("0*.png"))) == 1


def test_tokenizer_with_its_own_auto_map_loads_on_a_terminal_without_its_code(tmp_path):
    """tokenizer_config.json naming a custom tokenizer class (auto_map) as well: the tokenizer loads, the
    folder's class is not imported."""
    ckpt, marker = write_official(tmp_path / "NextStep-1.1", "1.1"), tmp_path / "folder_code_ran"
    add_custom_code(ckpt, marker, tokenizer=True)
    code = ("import sys\nfrom fastardiff_ds.models import load_config, load_text_tokenizer\n"
            "tok = load_text_tokenizer(load_config(sys.argv[1], None, []).model.text)\n"
            "print('ids', tok.prompt_ids('a red cat', 4))\n")
    rc, out = run_on_pty([sys.executable, "-c", code, str(ckpt)], _env(tmp_path))
    _check(rc, out, marker)
    assert "ids [" in out
