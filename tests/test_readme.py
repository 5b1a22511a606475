"""The README's shell examples paste into a shell as they are: valid bash, and every ``python -m engine``
command in them parses with today's options (a renamed or removed option fails here, not for a reader)."""

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from engine.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"


def _bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)


def _commands(block: str) -> list[list[str]]:
    """Each ``python -m engine ...`` line of a block (continuation lines joined), as argv after ``-m engine``."""
    joined = re.sub(r"\\\n", " ", block)
    out = []
    for line in joined.splitlines():
        line = line.split(" #")[0].strip()
        if line.startswith("python -m engine "):
            out.append(shlex.split(line)[3:])
    return out


def test_readme_has_engine_commands():
    assert sum(len(_commands(b)) for b in _bash_blocks()) >= 4


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_readme_blocks_are_valid_bash():
    for block in _bash_blocks():
        proc = subprocess.run(["bash", "-n"], input=block, capture_output=True, text=True)
        assert proc.returncode == 0, (block, proc.stderr)


@pytest.mark.parametrize("argv", [c for b in _bash_blocks() for c in _commands(b)], ids=lambda a: " ".join(a[:3]))
def test_readme_commands_parse(argv):
    args = build_parser().parse_args(argv)  # SystemExit (an unknown or renamed option) fails the test
    assert callable(args.func)
