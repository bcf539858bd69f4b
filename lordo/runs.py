"""The results store: one directory per run, owned, locked and checkpointed.

    runs/<method>-<preset>-<hash>/    (or --out)
        .lordo-run            marker: lordo made this directory; only such directories are replaced or cleaned
        .lordo-run.lock       an OS lock held by the one command writing the run: train, eval, an export into it
        config.json metrics.jsonl sync.jsonl summary.json (written last) model.pt tokenizer.json
        checkpoints/latest.json, checkpoints/step_<n>/rank<r>.pt{,.sha256}   (the last two checkpoints)

A run directory's identity is its config's every field (`TrainConfig.identity`), compared whenever one is
reused; the hash keys results and keeps earlier runs' keys. Nothing read back is trusted unchecked: a torn
last log line is dropped on resume, a bad index is rebuilt from the checkpoint folders, and a checkpoint
loads only when its sha256 verifies (else the one before it does).

A run resumed up to a different `steps` is not the run a fresh config gives (the lr schedule depends
on `steps`): config.json records the earlier `steps` as `extended_from`, and its result gets its own
hash (`result_hash`), so the cache never serves it for the fresh config.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lordo.config import TrainConfig, make_config
from lordo.files import read_jsonl, save_torch, sha256_file, write_atomic, write_json, write_jsonl
from lordo.paths import REPO, in_checkout

MARKER = ".lordo-run"
LOCK = ".lordo-run.lock"
# everything lordo writes in a run directory; --force removes these, and never anything else
RUN_FILES = ("config.json", "metrics.jsonl", "sync.jsonl", "summary.json", "model.pt", "tokenizer.json",
             "checkpoints", "errors", "hf", "downstream.csv")


def runs_root(cfg: TrainConfig | None = None) -> Path:
    if cfg is not None and cfg.runs_dir:
        return Path(cfg.runs_dir)
    if os.environ.get("LORDO_RUNS_DIR"):
        return Path(os.environ["LORDO_RUNS_DIR"])
    return REPO / "runs" if in_checkout() else Path.cwd() / "runs"


def run_dir_for(cfg: TrainConfig) -> Path:
    return Path(cfg.out) if cfg.out else runs_root(cfg) / f"{cfg.method}-{cfg.preset}-{cfg.hash()}"


def result_hash(cfg: TrainConfig, extended_from: list[int]) -> str:
    """The key of a run's result: the config's hash, or for a run extended from other `steps`, its own."""
    if not extended_from:
        return cfg.hash()
    return hashlib.sha256(json.dumps([cfg.hash(), extended_from]).encode()).hexdigest()[:12]


def read_saved_config(run_dir: Path) -> tuple[dict[str, Any], TrainConfig]:
    """config.json as saved, and its TrainConfig; one line naming the file when it is not a run's."""
    path = run_dir / "config.json"
    try:
        saved = json.loads(path.read_text())
        return saved, make_config(saved["train"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a lordo run's config.json ({type(e).__name__}: {e})") from None


@dataclass
class Run:
    """A finished run on disk."""

    dir: Path
    config: TrainConfig
    summary: dict[str, Any]

    @classmethod
    def load(cls, run_dir: str | Path) -> Run:
        run_dir = Path(run_dir)
        if not (run_dir / "summary.json").is_file():
            raise FileNotFoundError(f"{run_dir} holds no finished run (summary.json is missing)")
        _, config = read_saved_config(run_dir)
        return cls(run_dir, config, json.loads((run_dir / "summary.json").read_text()))

    @property
    def metrics(self):
        import pandas as pd
        return pd.DataFrame(read_jsonl(self.dir / "metrics.jsonl"))

    @property
    def syncs(self):
        import pandas as pd
        return pd.DataFrame(read_jsonl(self.dir / "sync.jsonl"))


# ---------------------------------------------------------------------- ownership and the lock
def owned(run_dir: Path) -> bool:
    """Whether lordo made this directory: its marker, or (runs from before the marker) only lordo's files."""
    if (run_dir / MARKER).is_file():
        return True
    names = {p.name for p in run_dir.iterdir()}
    return "config.json" in names and all(n in RUN_FILES or n == LOCK or n.endswith(".tmp") for n in names)


def check_claimable(run_dir: Path) -> None:
    """A run may write only into a new or empty directory, or one lordo made."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"out={str(run_dir)!r} is a file, not a directory: choose another --out")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not owned(run_dir):
        raise ValueError(f"{run_dir} is not a lordo run directory (no {MARKER}, and files lordo did not write): "
                         "lordo writes and deletes nothing there; choose another --out")


class RunInUse(RuntimeError):
    """Another process writes this run directory."""


_HELD: dict[Path, int] = {}   # run directories this process holds the lock of -> the holding thread's id


class RunLock:
    """Exclusive ownership of a run directory (flock: released on exit and on crash), taken by every command
    that writes into one: train (which creates the directory and its marker), eval and export (`create=False`:
    an existing run). Re-entered by the thread that holds it (eval exports, then scores, under one lock)."""

    def __init__(self, run_dir: Path, create: bool = True):
        self.run_dir = run_dir
        self.create = create
        self.fd: int | None = None
        self.key = Path(os.path.abspath(run_dir))

    def __enter__(self) -> RunLock:
        if _HELD.get(self.key) == threading.get_ident():
            return self
        if self.create:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise RunInUse(f"{self.run_dir} is in use by {_describe(holder)}: one command writes a run directory at "
                           "a time; wait for it, or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                  .encode(), 0)
        self.fd = fd
        _HELD[self.key] = threading.get_ident()
        if self.create:
            marker = self.run_dir / MARKER
            if not marker.is_file():
                marker.write_text("lordo made this run directory; `lordo train --force` replaces only lordo's "
                                  "files\n")
            for tmp in self.run_dir.rglob(".*.tmp"):   # left by writes that were interrupted
                tmp.unlink(missing_ok=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            del _HELD[self.key]
            os.ftruncate(self.fd, 0)
            os.close(self.fd)   # releases the lock
            self.fd = None


def _describe(holder: str) -> str:
    """The lock's holder as its file names it; a holder on this machine that has exited left the lock to the
    processes it started (torchrun and its ranks), which still run."""
    found = re.fullmatch(r"pid (\d+) on (\S+) since .*", holder)
    if not found:
        return holder or "another process"
    pid, host = int(found.group(1)), found.group(2)
    if host == socket.gethostname():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return f"processes that {holder} started and that outlive it (its torchrun ranks?)"
        except PermissionError:
            pass
    return holder


# ---------------------------------------------------------------------- checkpoints
def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:07d}"


def _checksum_file(checkpoint: Path) -> Path:
    return checkpoint.with_name(checkpoint.name + ".sha256")


def _saved_steps(run_dir: Path) -> list[int]:
    """The steps of every checkpoint folder, latest first (complete or not)."""
    steps = [int(p.name.removeprefix("step_")) for p in (run_dir / "checkpoints").glob("step_*")
             if p.name.removeprefix("step_").isdigit()]
    return sorted(steps, reverse=True)


def _index(run_dir: Path) -> dict[str, Any] | None:
    """checkpoints/latest.json: {"step": int, "previous": int or None, ...}; None when there is none. An index
    that is not one (a torn or foreign file, `[]`) is named on stderr and rebuilt from the checkpoint folders,
    so that a bad byte there never restarts a run from step 0."""
    path = run_dir / "checkpoints" / "latest.json"
    if not path.is_file():
        return None
    is_step = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0
    try:
        index = json.loads(path.read_text())
        ok = isinstance(index, dict) and is_step(index.get("step")) and \
            (index.get("previous") is None or is_step(index["previous"]))
    except (ValueError, UnicodeDecodeError):
        ok = False
    if ok:
        return index
    steps = _saved_steps(run_dir)
    print(f"lordo: {path} is not a checkpoint index; using the checkpoint folders instead "
          f"({', '.join(map(str, steps)) or 'none'})", file=sys.stderr)
    return {"step": steps[0], "previous": None, "scanned": steps} if steps else None


def latest_checkpoint(run_dir: Path) -> int | None:
    index = _index(run_dir)
    return index["step"] if index else None


def save_checkpoint(run_dir: Path, comm: Any, step: int, payload: dict[str, Any]) -> None:
    """Every worker saves its state and its sha256 (checked on load); rank 0 then points `latest.json` at the
    complete step and keeps the one before it (the fallback when the latest turns out damaged)."""
    target = step_dir(run_dir, step)
    target.mkdir(parents=True, exist_ok=True)
    path = target / f"rank{comm.rank}.pt"
    save_torch(path, payload)
    write_atomic(_checksum_file(path), lambda f: f.write(sha256_file(path) + "\n"))
    comm.barrier()
    if comm.rank == 0:
        index = _index(run_dir) or {}
        previous = index.get("step") if index.get("step") != step else index.get("previous")
        write_json(run_dir / "checkpoints" / "latest.json",
                   {"step": step, "previous": previous, "world_size": comm.world_size})
        keep = {target, step_dir(run_dir, previous)} if previous is not None else {target}
        for old in (run_dir / "checkpoints").glob("step_*"):
            if old not in keep:
                shutil.rmtree(old, ignore_errors=True)
    comm.barrier()


def _damage(path: Path) -> str | None:
    """Why a checkpoint file must not be loaded (missing, no checksum, its bytes not the ones saved), or None."""
    if not path.is_file():
        return "missing"
    try:
        expected = _checksum_file(path).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return f"without its checksum ({_checksum_file(path).name})"
    if sha256_file(path) != expected:
        return "damaged (its sha256 is not the one saved with it)"
    return None


def usable_checkpoint(run_dir: Path, world_size: int, index: dict[str, Any] | None = None) -> int | None:
    """The step to resume from: the latest checkpoint whose every rank's file verifies, else the one before
    (all the checkpoint folders, latest first, when the index was rebuilt); names each bad file on stderr."""
    index = index or _index(run_dir)
    if index is None:
        return None
    for step in index.get("scanned") or (index["step"], index.get("previous")):
        if step is None:
            continue
        bad = [(p, why) for p in (step_dir(run_dir, step) / f"rank{r}.pt" for r in range(world_size))
               if (why := _damage(p))]
        if not bad:
            return step
        for path, why in bad:
            print(f"lordo: checkpoint {path} is {why}; trying the previous checkpoint", file=sys.stderr)
    raise ValueError(f"no intact checkpoint in {run_dir / 'checkpoints'} to resume from (see above); "
                     "start over with --force")


def load_checkpoint(run_dir: Path, step: int, rank: int, device: torch.device) -> dict[str, Any]:
    """One rank's state, verified against its checksum before it is read."""
    path = step_dir(run_dir, step) / f"rank{rank}.pt"
    if why := _damage(path):
        raise ValueError(f"checkpoint {path} is {why}")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:   # noqa: BLE001 - verified bytes that torch cannot read: a writer's bug, named
        raise ValueError(f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0]})") \
            from None


# ---------------------------------------------------------------------- starting a run
def _truncate_jsonl(path: Path, step: int) -> None:
    """Keep the records up to `step` (a resumed run rewrites what came after its checkpoint)."""
    write_jsonl(path, [r for r in read_jsonl(path, drop_torn_tail=True) if r.get("step", 0) <= step])


def _remove_run_files(run_dir: Path, names: tuple[str, ...] = RUN_FILES) -> None:
    for name in names:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def finished_run(cfg: TrainConfig, run_dir: Path) -> bool:
    """Whether run_dir holds this config's finished result (its summary keyed by the config's hash)."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(summary, dict) and summary.get("config_hash") == cfg.hash()


def prepare_run_dir(cfg: TrainConfig, run_dir: Path, resume: bool | None, force: bool, model: dict[str, Any],
                    stop_at: int | None = None) -> int | None:
    """Decide between resumed and fresh (the caller holds the RunLock); returns the step to resume from,
    or None for a fresh start. Every check comes before the first change; nothing is deleted without `force`
    but what a run that never checkpointed left, and checkpoints that did not verify. Writes config.json."""
    extended: list[int] = []
    start = None
    has_run = (run_dir / "config.json").is_file()
    if has_run and not force:
        saved, old = read_saved_config(run_dir)
        extended = list(saved.get("extended_from", []))
        index = _index(run_dir)
        checkpoint = index["step"] if index else None
        finished = (run_dir / "summary.json").is_file()
        # the whole config, every field set or not; and the hash its fields resolve to (the optimizer's
        # defaults of the lordo that wrote it)
        diff = {k: (v, now) for k, v in old.identity().items()
                if (now := getattr(cfg, k)) != v and not (k == "steps" and resume)}
        if not diff and saved.get("hash", old.hash()) != old.hash():
            diff = {"hash (the optimizer defaults it resolves to)": (saved["hash"], old.hash())}
        if not diff and (now := cfg.replace(steps=old.steps).hash()) != old.hash():   # as 4 against 4.0
            diff = {"hash": (old.hash(), now)}
        if diff and (checkpoint is not None or finished):
            k, (was, now) = next(iter(diff.items()))
            raise ValueError(f"{run_dir} holds a run with a different config ({k}: {was!r} there, {now!r} now); "
                             "choose another out directory, or force=True / --force to replace it")
        if diff:      # a start that failed before its first checkpoint: nothing to keep
            extended, checkpoint, index = [], None, None
        if resume is None:
            resume = checkpoint is not None and not finished
        if resume and checkpoint is None:
            raise FileNotFoundError(f"nothing to resume in {run_dir}: no checkpoint (checkpoints/latest.json)")
        if not resume and extended:
            raise ValueError(f"{run_dir} holds a run resumed from steps={extended[-1]} to {old.steps}, which a "
                             "fresh run does not reproduce (the lr schedule depends on steps); choose another "
                             "out directory, or force=True / --force to replace it")
        if not resume and finished:
            raise ValueError(f"{run_dir} holds a finished run that is not this config's cached result "
                             f"(summary.json's config_hash is not {cfg.hash()}); choose another out directory, "
                             "or force=True / --force to replace it")
        if resume:
            start = usable_checkpoint(run_dir, old.workers, index)
            if start > cfg.steps:
                raise ValueError(f"config field steps={cfg.steps} is invalid: allowed an int >= the checkpoint's "
                                 f"step {start}")
            if stop_at is not None and stop_at <= start:
                raise ValueError(f"stop_at={stop_at} is invalid: allowed an int above the step the run resumes "
                                 f"from ({start})")
            if cfg.steps != old.steps:
                extended.append(old.steps)
            if start != checkpoint or "scanned" in index:   # the fallback, or a rebuilt index, becomes the index
                write_json(run_dir / "checkpoints" / "latest.json",
                           {"step": start, "previous": None, "world_size": old.workers})
            for name in ("metrics.jsonl", "sync.jsonl"):
                _truncate_jsonl(run_dir / name, start)
            for later in _saved_steps(run_dir):   # damaged or never completed
                if later > start:
                    shutil.rmtree(step_dir(run_dir, later))
            (run_dir / "summary.json").unlink(missing_ok=True)
    elif resume:
        raise FileNotFoundError(f"nothing to resume in {run_dir}: no run there")
    if start is None:
        _remove_run_files(run_dir)
        extended = []
    write_json(run_dir / "config.json", {
        "train": cfg.to_dict(), "hash": cfg.hash(), "model": model, **({"extended_from": extended} if extended else {}),
        "data": {"corpus": cfg.corpus, "tokenizer": cfg.tokenizer, "vocab_size": cfg.vocab_size,
                 "corpus_tokens": cfg.corpus_tokens, "tokenizer_path": str(run_dir / "tokenizer.json")}})
    return start
