"""Results and checkpoints on disk: every write is atomic (temp file + rename), so a reader, or a
run resumed after a crash, sees the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch


def write_atomic(path: Path, write: Callable[[IO[str]], Any]) -> None:
    """Call `write(f)` on a temporary text file beside `path`, then rename it over `path`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as f:
        write(f)
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, lambda f: json.dump(obj, f, indent=2, default=str))


def update_json(path: Path, **entries: Any) -> None:
    """Merge entries into a JSON object file, keeping every key already there."""
    old = json.loads(path.read_text()) if path.is_file() else {}
    write_json(path, {**old, **entries})


def save_torch(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    write_atomic(path, lambda f: f.writelines(json.dumps(r) + "\n" for r in records))
