"""The README's code runs as written: its Python blocks in order, in one namespace (each builds on the ones
before), and its ``mbdl-fast`` command lines parse with today's flags.

The blocks are written small enough to run here in seconds (one 128 x 128 slice, the shipped models, two
slices of fine-tuning); an edit that breaks or slows one fails or shows up in this test.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from mbdl_fast.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def command_lines(text: str) -> list[str]:
    """``mbdl-fast ...`` commands in indented or fenced shell blocks (the README's prose excluded)."""
    lines = [line.strip() for line in text.splitlines() if re.match(r"^(    |)mbdl-fast ", line)]
    return [line.split("   #")[0].strip() for line in lines]


def test_readme_has_the_blocks_this_test_runs():
    text = README.read_text()
    assert len(python_blocks(text)) >= 3
    assert len(command_lines(text)) >= 4


def test_python_blocks_run_in_order(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # anything a block writes stays out of the checkout
    namespace: dict = {"__name__": "__readme__"}
    for number, block in enumerate(python_blocks(README.read_text()), start=1):
        try:
            exec(compile(block, f"README.md python block {number}", "exec"), namespace)
        except Exception as err:  # the block's own error, named
            pytest.fail(f"README python block {number} raised {type(err).__name__}: {err}\n{block}")
    out = capsys.readouterr().out
    assert "tensor(" in out  # the blocks print their results


@pytest.mark.parametrize("line", command_lines(README.read_text()))
def test_command_lines_parse(line):
    argv = shlex.split(line)[1:]
    if "&&" in argv:
        argv = argv[: argv.index("&&")]
    build_parser().parse_args(argv)
