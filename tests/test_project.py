"""Promises about the repository itself: pinned environments agree, the package imports cleanly."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


def pins(lines: list[str]) -> list[str]:
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


def test_environment_yml_has_the_same_pins_as_requirements_txt():
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert "python=3.11" in env["dependencies"]
    assert pip == pins((REPO / "requirements.txt").read_text().splitlines())


def test_requirements_are_all_pinned_and_torch_comes_first():
    for path in ("requirements.txt", "requirements-nodeps.txt"):
        reqs = pins((REPO / path).read_text().splitlines())
        assert reqs and all("==" in r for r in reqs), path
    assert pins((REPO / "requirements.txt").read_text().splitlines())[0] == "torch==2.13.0"


def test_installed_versions_match_the_pins():
    from importlib.metadata import version
    for req in pins((REPO / "requirements.txt").read_text().splitlines()):
        name, pinned = req.split("==")
        assert version(name).split("+")[0] == pinned, name


@pytest.mark.integration
def test_command_line_help_works():
    done = subprocess.run([sys.executable, "-m", "lordo.cli", "train", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--sync-every" in done.stdout and "--launcher" in done.stdout


def test_pyproject_declares_torch_and_the_reproduction_extra():
    import tomllib
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["dependencies"] == ["torch>=2.6", "ninja"]
    declared = {r.split(">")[0].split("=")[0] for r in project["optional-dependencies"]["repro"]}
    pinned = {r.split("==")[0] for r in pins((REPO / "requirements.txt").read_text().splitlines())}
    assert pinned - declared == {"torch", "ninja", "pytest", "ruff", "nbmake"}   # the rest: test and lint tools


@pytest.mark.integration
def test_optimizer_needs_only_torch():
    """`pip install lordo` gives torch alone: the optimizer must import and step without the rest."""
    reproduction = ["yaml", "numpy", "pandas", "scipy", "transformers", "datasets", "tokenizers", "matplotlib"]
    code = (f"import sys\nfor m in {reproduction!r}: sys.modules[m] = None\n"
            "import torch, lordo\nm = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))\n"
            "opt = lordo.make_optimizer('lordo', m, rank=2)\nm(torch.randn(4, 8)).sum().backward()\nopt.step()\n"
            "print(opt.lowrank_names)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "['0.weight']"       # the last Linear is the output layer: full-rank


@pytest.mark.integration
def test_make_lab_allows_root_only_as_root_and_runs_headless():
    import os

    def lab(*settings: str) -> str:
        done = subprocess.run(["make", "-n", "lab", *settings], capture_output=True, text=True, cwd=REPO,
                              env={k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")})
        lines = [line for line in done.stdout.splitlines() if "jupyter lab" in line]
        assert len(lines) == 1
        return lines[0]

    assert lab().endswith("--allow-root") == (os.geteuid() == 0)
    assert "--port=8888 --no-browser" in lab()                      # no display: no browser to open
    assert "--port=9999" in lab("PORT=9999", "NO_BROWSER=0") and "--no-browser" not in lab("NO_BROWSER=0")
    assert "--no-browser" not in lab("DISPLAY=:0") and "--no-browser" in lab("DISPLAY=:0", "NO_BROWSER=1")
