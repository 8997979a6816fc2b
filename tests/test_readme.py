"""The README's code runs as written: its Python blocks in order, in one namespace (each builds on the ones
before), and its ``mbdl-fast`` command lines parse with today's flags.

The blocks are written small enough to run here in seconds (one 128 x 128 slice, the shipped models, one slice
of fine-tuning; 64 x 64 for the interop and export blocks); an edit that breaks or slows one fails or shows up in
this test. Blocks that need an optional extra (deepinv, fastMRI, ONNX) run on their own, skipped where the extra
is not installed.
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


#: Blocks that import these run alone, where the optional package (its extra) is installed.
OPTIONAL = {"deepinv": "deepinv", "fastmri": "fastmri", "torch.onnx": "onnxscript"}


def needs(block: str) -> list[str]:
    """The optional packages a block uses (by its imports and its torch.onnx calls)."""
    return [package for marker, package in OPTIONAL.items() if re.search(rf"\b{re.escape(marker)}\b", block)]


BLOCKS = python_blocks(README.read_text())
CORE = [(n, b) for n, b in enumerate(BLOCKS, start=1) if not needs(b)]
OPTIONAL_BLOCKS = [(n, b) for n, b in enumerate(BLOCKS, start=1) if needs(b)]


def run_block(number: int, block: str, namespace: dict) -> None:
    try:
        exec(compile(block, f"README.md python block {number}", "exec"), namespace)
    except Exception as err:  # the block's own error, named
        pytest.fail(f"README python block {number} raised {type(err).__name__}: {err}\n{block}")


def test_readme_has_the_blocks_this_test_runs():
    assert len(CORE) >= 3
    assert len(command_lines(README.read_text())) >= 4


def test_python_blocks_run_in_order(tmp_path, monkeypatch, capsys):
    """The blocks that need no optional package, in order, in one namespace (each builds on the ones before)."""
    monkeypatch.chdir(tmp_path)  # anything a block writes stays out of the checkout
    namespace: dict = {"__name__": "__readme__"}
    for number, block in CORE:
        run_block(number, block, namespace)
    assert "tensor(" in capsys.readouterr().out  # the blocks print their results


@pytest.mark.parametrize(("number", "block"), OPTIONAL_BLOCKS, ids=[f"block{n}" for n, _ in OPTIONAL_BLOCKS])
def test_optional_blocks_run(number, block, tmp_path, monkeypatch):
    """A block that needs an optional extra (deepinv, fastMRI, ONNX) runs on its own where the extra is installed."""
    import importlib.util

    from conftest import import_deepinv

    for package in needs(block):
        if package == "deepinv":
            import_deepinv()  # skips where it is missing; makes CPU-only torchvision importable
        elif importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} (an optional extra) is not installed")
    monkeypatch.chdir(tmp_path)
    run_block(number, block, {"__name__": "__readme__"})


@pytest.mark.parametrize("line", command_lines(README.read_text()))
def test_command_lines_parse(line):
    argv = shlex.split(line)[1:]
    if "&&" in argv:
        argv = argv[: argv.index("&&")]
    build_parser().parse_args(argv)
