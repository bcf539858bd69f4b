"""Starting a run's workers: `train`, the entry point of every run (`lordo.train`, `lordo train`).

    run = train(method="lordo", preset="tiny", workers=4, steps=300)   # cached by config
    run.summary["val_ppl"], run.metrics, run.syncs

`train` prepares the data and the run directory (lordo.runs: ownership, lock, checkpoints), then starts the
workers, each running `lordo.trainer.worker`: as threads of this process (`launcher="sim"`) or as real
processes with torchrun (`launcher="torchrun"`, `torch.distributed.run`), which runs this module as every
rank: each joins the process group (NCCL on GPUs, gloo on CPU with one thread per rank). Asking again for a
finished config loads it; an interrupted one resumes from its last checkpoint; Ctrl-C stops every worker,
leaving the last checkpoint intact.
"""

from __future__ import annotations

import argparse
import codecs
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from lordo.comm import cpu_threads, init_distributed, run_simulated
from lordo.config import TrainConfig, make_config
from lordo.data.cache import Prepared, prepare
from lordo.files import copy_file
from lordo.model import model_config
from lordo.runs import (
    Run,
    RunLock,
    check_claimable,
    finished_run,
    latest_checkpoint,
    prepare_run_dir,
    read_saved_config,
    run_dir_for,
)
from lordo.trainer import Interrupted, resolve_device, worker

__all__ = ["LaunchError", "launch_torchrun", "main_worker", "torchrun_command", "train"]

STOP_GRACE_S = 60   # after Ctrl-C, how long the ranks get to stop before they are killed


def torchrun_command(cfg: TrainConfig, run_dir: Path, start: int | None, stop_at: int | None) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={cfg.ranks_per_node}",
           f"--nnodes={cfg.nnodes}"]
    if cfg.nnodes > 1 or cfg.rdzv_endpoint:
        cmd += [f"--node-rank={cfg.node_rank}", "--rdzv-backend=c10d", f"--rdzv-endpoint={cfg.rdzv_endpoint}",
                f"--rdzv-id=lordo-{cfg.hash()}"]
    else:
        cmd += ["--standalone"]
    cmd += ["-m", "lordo.launch", "--run-dir", str(run_dir)]
    if start is not None:
        cmd += ["--resume-from", str(start)]
    if stop_at is not None:
        cmd += ["--stop-at", str(stop_at)]
    return cmd


def _tee(source, sink, tail: list[str], quiet: threading.Event) -> None:
    """Pass a stream through as it comes (progress bars included; Jupyter too) and keep its last 64 KiB;
    once `quiet` is set (Ctrl-C), only keep it: torchrun's shutdown report is not the user's news."""
    decode = codecs.getincrementaldecoder("utf-8")(errors="replace").decode
    while chunk := os.read(source.fileno(), 4096):
        text = decode(chunk)
        if not quiet.is_set():
            sink.write(text)
            sink.flush()
        tail.append(text)
        while sum(map(len, tail)) > 65536:
            tail.pop(0)


def launch_torchrun(cfg: TrainConfig, run_dir: Path, start: int | None, stop_at: int | None,
                    lock_fd: int | None = None) -> None:
    """Run every local rank to completion; on failure, raise naming the failed rank(s). torchrun inherits
    the run's lock (`lock_fd`), so the directory stays locked while any of it lives. It runs in its own
    session, so Ctrl-C reaches it once, from here: passed on (torchrun passes it to the ranks, which stop),
    waited for, then re-raised. Should this process die unasked (kill -9), torchrun gets SIGTERM and stops
    its ranks, which would otherwise run on unseen, holding the lock."""
    shutil.rmtree(run_dir / "errors", ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.Popen(torchrun_command(cfg, run_dir, start, stop_at), env=env, stderr=subprocess.PIPE,
                            pass_fds=() if lock_fd is None else (lock_fd,), start_new_session=True,
                            preexec_fn=_end_with_parent if sys.platform == "linux" else None)
    tail: list[str] = []
    quiet = threading.Event()
    reader = threading.Thread(target=_tee, args=(proc.stderr, sys.stderr, tail, quiet))
    reader.start()
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        quiet.set()
        _stop(proc)
        reader.join()
        raise
    reader.join()
    if code != 0:
        step = latest_checkpoint(run_dir)
        kept = f"last checkpoint: step {step}, intact" if step is not None else "no checkpoint was written yet"
        raise LaunchError(f"torchrun exited with status {code}: {_first_failure(''.join(tail), run_dir)} "
                          f"({kept}, in {run_dir})")


def _end_with_parent() -> None:
    """In the child, before it runs torchrun: SIGTERM when the launching process dies (Linux prctl)."""
    import ctypes
    pr_set_pdeathsig = 1
    ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _stop(proc: subprocess.Popen) -> None:
    """Pass SIGINT on to torchrun and wait for it to end."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + STOP_GRACE_S
    while proc.poll() is None:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
        except KeyboardInterrupt:
            continue   # a second Ctrl-C: still waiting, so that the lock is released only when all stopped


class LaunchError(RuntimeError):
    """A torchrun launch failed; the message names the rank that failed first."""


def _first_failure(report: str, run_dir: Path) -> str:
    """The root cause: torchrun's report names it even for a rank killed by a signal (which writes
    nothing); a rank that raised left its error in errors/rank<r>.txt. Other ranks fail after it."""
    root = re.search(r"Root Cause.*?\brank\s*: (\d+) \(local_rank.*?exitcode\s*: ([^\n]*)", report, re.S)
    if root is None:
        errors = sorted((run_dir / "errors").glob("rank*.txt"))
        return errors[0].read_text().strip() if errors else "see torchrun's report above"
    rank, exitcode = root.group(1), " ".join(root.group(2).split())
    error = run_dir / "errors" / f"rank{rank}.txt"
    return error.read_text().strip() if error.is_file() else f"rank {rank} failed (exit code {exitcode})"


# ---------------------------------------------------------------------- the entry point
def _run_threads(cfg: TrainConfig, data: Prepared, run_dir: Path, start: int | None, stop_at: int | None) -> None:
    """The simulated workers, waited for so that Ctrl-C reaches them: it sets the stop flag every worker
    checks each step, and returns once all have stopped."""
    device = resolve_device(cfg)
    stop = threading.Event()
    failure: list[BaseException] = []

    def workers() -> None:
        # workers share the cores; oversubscription slows every one of them
        share = cpu_threads(max(1, (os.cpu_count() or 1) // cfg.workers)) if device.type == "cpu" else nullcontext()
        try:
            with share:
                run_simulated(worker, cfg.workers, cfg, data, run_dir, device, start, stop_at, stop)
        except BaseException as e:  # re-raised in the caller's thread
            failure.append(e)

    runner = threading.Thread(target=workers, name="lordo-workers")
    runner.start()
    while runner.is_alive():
        try:
            runner.join(0.1)
        except KeyboardInterrupt:
            stop.set()
    if stop.is_set():
        raise Interrupted
    if failure:
        raise failure[0]


@contextmanager
def sigterm_as_ctrl_c() -> Iterator[None]:
    """SIGTERM (`kill`, a scheduler preempting the job) stops a run as Ctrl-C does: every worker stops at a step,
    with its checkpoint, and the run resumes. Only the main thread can take signals; elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def check_ranks_fit(cfg: TrainConfig, device: torch.device) -> None:
    """torchrun's ranks on this node each need a device of their own kind: one GPU per rank (NCCL refuses two
    ranks on one GPU), or the CPU (gloo)."""
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"config field device={cfg.device!r} is invalid with launcher='torchrun': allowed cuda "
                         "or cpu (--launcher sim runs workers on any device)")
    if device.type == "cuda" and cfg.ranks_per_node > (gpus := torch.cuda.device_count()):
        field, value = ("nproc_per_node", cfg.nproc_per_node) if cfg.nproc_per_node else ("workers", cfg.workers)
        raise ValueError(f"config field {field}={value} is invalid here: torchrun would start {cfg.ranks_per_node} "
                         f"ranks on this node, one per GPU, and it has {gpus}; allowed at most {gpus} per node "
                         "(--launcher sim runs the workers as threads on one device)")


def train(config: TrainConfig | dict[str, Any] | None = None, *, force: bool = False, resume: bool | None = None,
          stop_at: int | None = None, **fields: Any) -> Run:
    """Train (or load the cached result of) one configuration; returns the finished Run.

    resume: None resumes an interrupted run if it has a checkpoint; True requires one; False
    starts over unless the run is finished (then it is loaded; force=True retrains).
    stop_at: stop after this step with a checkpoint, as if interrupted (for resume tests).
    Ctrl-C or SIGTERM stops every worker and raises Interrupted; the last checkpoint stays intact.
    """
    if isinstance(config, TrainConfig):
        cfg = config.replace(**fields) if fields else config
    else:
        cfg = make_config(config, **fields)
    if stop_at is not None and not (isinstance(stop_at, int) and not isinstance(stop_at, bool) and stop_at >= 1):
        raise ValueError(f"stop_at={stop_at!r} is invalid: allowed an int >= 1")
    run_dir = run_dir_for(cfg)
    if not force and not resume and finished_run(cfg, run_dir):
        return Run.load(run_dir)
    check_claimable(run_dir)
    device = resolve_device(cfg)
    if cfg.launcher == "torchrun":
        check_ranks_fit(cfg, device)
    data = prepare(cfg.corpus, cfg.tokenizer, cfg.vocab_size, max_tokens=cfg.corpus_tokens)
    model = asdict(model_config(cfg.preset, data.vocab_size, cfg.seq_len))
    with RunLock(run_dir) as lock, sigterm_as_ctrl_c():
        if not force and not resume and finished_run(cfg, run_dir):   # another process finished it meanwhile
            return Run.load(run_dir)
        start = prepare_run_dir(cfg, run_dir, resume, force, model, stop_at)
        copy_file(Path(data.tokenizer_path), run_dir / "tokenizer.json")
        try:
            if cfg.launcher == "torchrun":
                launch_torchrun(cfg, run_dir, start, stop_at, lock.fd)
            else:
                _run_threads(cfg, data, run_dir, start, stop_at)
        except KeyboardInterrupt:
            step = latest_checkpoint(run_dir)
            raise Interrupted(
                f"interrupted; the last checkpoint (step {step}) is intact: continue with --resume --out {run_dir}"
                if step is not None else
                f"interrupted before the first checkpoint, nothing to resume in {run_dir} (--checkpoint-every "
                "N keeps one every N steps)") from None
    if stop_at is not None and stop_at < cfg.steps:
        return Run(run_dir, cfg, {"stopped_at": stop_at})
    return Run.load(run_dir)


def main_worker(run_dir: str, start: int | None, stop_at: int | None) -> None:
    """Entry point of one torchrun rank (see lordo.launch). Ctrl-C (SIGINT) or torchrun's SIGTERM stops the
    rank quietly with status 130: the launcher reports the interruption once."""
    run_dir_path = Path(run_dir)
    interrupted = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        interrupted.set()
        raise Interrupted

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    _, cfg = read_saved_config(run_dir_path)
    comm, device = init_distributed(resolve_device(cfg))
    try:
        # the launching process prepared and verified the cache; ranks check sizes, not 30 GB of hashes
        data = prepare(cfg.corpus, cfg.tokenizer, cfg.vocab_size, max_tokens=cfg.corpus_tokens, verify=False)
        worker(comm, cfg, data, run_dir_path, device, start, stop_at, interrupted)
    except BaseException as e:
        if interrupted.is_set():   # also a collective that failed because a peer stopped first
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            os._exit(130)
        message = f"rank {comm.rank} failed: {type(e).__name__}: {e}"
        print(f"lordo: {message}", file=sys.stderr, flush=True)
        (run_dir_path / "errors").mkdir(exist_ok=True)
        (run_dir_path / "errors" / f"rank{comm.rank}.txt").write_text(message + "\n")
        raise
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="one torchrun rank of a lordo run (started by lordo.launch)")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--resume-from", type=int, default=None, help="the checkpoint step to resume from")
    parser.add_argument("--stop-at", type=int, default=None)
    args = parser.parse_args()
    main_worker(args.run_dir, args.resume_from, args.stop_at)
