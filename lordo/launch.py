"""Start a run's workers as real processes with torchrun (`torch.distributed.run`).

`lordo train --launcher torchrun --nproc-per-node N [--nnodes K --node-rank i --rdzv-endpoint host:port]`
prepares the data once, then runs this module as every rank: each joins the process group
(NCCL on GPUs, gloo on CPU with one thread per rank) and runs `lordo.trainer.worker`, the same
loop the simulated launcher runs in threads.
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
from pathlib import Path

from lordo.config import TrainConfig
from lordo.runs import latest_checkpoint

STOP_GRACE_S = 60   # after Ctrl-C, how long the ranks get to stop before they are killed


def torchrun_command(cfg: TrainConfig, run_dir: Path, start: int | None, stop_at: int | None) -> list[str]:
    nproc = cfg.nproc_per_node or cfg.workers // cfg.nnodes
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--nnodes={cfg.nnodes}"]
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
    waited for, then re-raised."""
    shutil.rmtree(run_dir / "errors", ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.Popen(torchrun_command(cfg, run_dir, start, stop_at), env=env, stderr=subprocess.PIPE,
                            pass_fds=() if lock_fd is None else (lock_fd,), start_new_session=True)
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

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="one torchrun rank of a lordo run (started by lordo.launch)")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--resume-from", type=int, default=None, help="the checkpoint step to resume from")
    parser.add_argument("--stop-at", type=int, default=None)
    args = parser.parse_args()
    from lordo.trainer import main_worker
    main_worker(args.run_dir, args.resume_from, args.stop_at)
