"""Where lordo's files live: the checkout it runs from (REPO), paths relative to it, and its git revision.

Standard library only, so that anything may import it (the CLI's --help included).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def in_checkout() -> bool:
    """Whether lordo runs from a source checkout (then runs/ and data/cache/ live in it), not an installed copy."""
    return (REPO / "pyproject.toml").is_file()


def repo_path(path: str | Path) -> Path:
    """A path as given if absolute, else relative to the checkout."""
    path = Path(path)
    return path if path.is_absolute() else REPO / path


def git_commit(short: bool = False) -> str | None:
    """The checkout's HEAD commit (abbreviated if `short`); None outside a git checkout or without git."""
    command = ["git", "-C", str(REPO), "rev-parse", *(["--short"] if short else []), "HEAD"]
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
