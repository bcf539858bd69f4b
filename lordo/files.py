"""Results and checkpoints on disk: every write is atomic (temp file + rename), so a reader, or a
run resumed after a crash, sees the old file or the new one, never half of one. A write that fails
(a full disk) removes its temporary file; one killed leaves `.<name>.<pid>.tmp`, which the next run
in that directory removes (lordo.runs.RunLock)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch


def _replace_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.filename is None:   # a failed write names no file; this is the one
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, write: Callable[[IO[str]], Any]) -> None:
    """Call `write(f)` on a temporary text file beside `path`, then rename it over `path`."""
    def write_text(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            write(f)
    _replace_atomic(path, write_text)


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, lambda f: json.dump(obj, f, indent=2, default=str))


def update_json(path: Path, **entries: Any) -> None:
    """Merge entries into a JSON object file, keeping every key already there."""
    old = json.loads(path.read_text()) if path.is_file() else {}
    write_json(path, {**old, **entries})


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def copy_file(source: Path, path: Path) -> None:
    _replace_atomic(path, lambda tmp: shutil.copyfile(source, tmp))


def save_torch(path: Path, obj: Any) -> None:
    def save(tmp: Path) -> None:
        try:
            torch.save(obj, tmp)
        except RuntimeError as e:   # torch's writer reports a failed write (a full disk) as RuntimeError
            raise OSError(errno.EIO, f"write failed ({str(e).splitlines()[0]})", str(path)) from e
    _replace_atomic(path, save)


class JsonlLog:
    """A JSONL file records are appended to, each flushed as it comes (a crash keeps what was logged);
    a failed write (a full disk) names the file."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "a")   # noqa: SIM115 - closed by close()

    def append(self, *records: dict[str, Any]) -> None:
        try:
            self.file.writelines(json.dumps(r) + "\n" for r in records)
            self.file.flush()
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(self.path)) from e

    def close(self) -> None:
        try:
            self.file.close()
        except OSError:
            pass   # what failed to reach the disk was reported by append; a resumed run rewrites it


def read_jsonl(path: Path, *, drop_torn_tail: bool = False) -> list[dict[str, Any]]:
    """The records of an append-only JSONL log; a line that is not a JSON object raises naming the file and
    the line. An append cut short (a full disk, a kill) leaves a last line without its newline that does not
    parse: with `drop_torn_tail` it is dropped, and said so on stderr, else it raises like any bad line."""
    if not path.is_file():
        return []
    lines = path.read_bytes().split(b"\n")   # the last item is b"" when the file ends with a whole line
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError(f"a {type(record).__name__}, not an object")
        except ValueError as e:
            if drop_torn_tail and number == len(lines):
                print(f"lordo: {path}: dropped its torn last line ({len(line)} bytes, an append cut short by a "
                      "crash or a full disk)", file=sys.stderr)
                break
            raise ValueError(f"{path}: line {number} is not a JSON record ({str(e).splitlines()[0]})") from None
        records.append(record)
    return records


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    write_atomic(path, lambda f: f.writelines(json.dumps(r) + "\n" for r in records))
