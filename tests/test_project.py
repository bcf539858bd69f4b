"""Promises about the repository itself: pinned environments agree, the package imports cleanly."""

import subprocess
import sys
from pathlib import Path

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


def test_command_line_help_works():
    done = subprocess.run([sys.executable, "-m", "lordo.cli", "train", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--sync-every" in done.stdout and "--launcher" in done.stdout
