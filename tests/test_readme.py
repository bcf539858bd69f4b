"""The README's Python code blocks, executed as written: each in a fresh process, in an empty directory,
with the command its first line names (`# file.py: run with `cmd``), else `python`."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration   # torchrun / subprocess: tests/conftest.py

REPO = Path(__file__).resolve().parent.parent
BLOCKS = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)


def command(block: str) -> tuple[str, list[str]]:
    named = re.match(r"# (\S+\.py): run with `([^`]+)`", block)
    if named is None:
        return "block.py", [sys.executable, "block.py"]
    words = shlex.split(named.group(2))
    launcher = {"python": [sys.executable], "torchrun": [sys.executable, "-m", "torch.distributed.run"]}
    return named.group(1), launcher[words[0]] + words[1:]


def test_the_readme_has_its_examples():
    assert len(BLOCKS) >= 3 and any("torchrun" in b for b in BLOCKS) and any("LoRDOTrainer" in b for b in BLOCKS)


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: command(b)[0] + ":" + b.splitlines()[0][:30])
def test_readme_python_block_runs(block, tmp_path):
    name, cmd = command(block)
    (tmp_path / name).write_text(block)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
