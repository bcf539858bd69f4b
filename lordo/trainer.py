"""The trainer: one per-worker loop for every method, and `train`, its entry point.

    run = lordo.train(method="lordo", preset="tiny", workers=4, steps=300)   # cached by config
    run.summary["val_ppl"], run.metrics, run.syncs

    lordo train --method lordo --preset tiny --workers 4 --steps 300 --out runs/x

Each run writes `runs/<name>/` (lordo.runs, the results store: ownership, lock, checkpoints). Asking
again for a finished config loads it; an interrupted one resumes from its last checkpoint; Ctrl-C stops
every worker, leaving the last checkpoint intact.
"""

from __future__ import annotations

import math
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from lordo.comm import Communicator, run_simulated
from lordo.config import TrainConfig, make_config
from lordo.data import Batches, Prepared, prepare, val_windows
from lordo.files import JsonlLog, copy_file, read_jsonl, save_torch, write_json
from lordo.model import GPT, model_config
from lordo.optim import make_optimizer
from lordo.runs import (
    REPO,
    Run,
    RunLock,
    check_claimable,
    latest_checkpoint,
    load_checkpoint,
    prepare_run_dir,
    read_saved_config,
    result_hash,
    run_dir_for,
    runs_root,
    save_checkpoint,
)

__all__ = ["REPO", "Interrupted", "Run", "cpu_threads", "evaluate", "latest_checkpoint", "lr_multiplier",
           "main_worker", "run_dir_for", "runs_root", "train", "worker"]


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped a run: every worker stopped, the last checkpoint is intact, no summary."""


# ---------------------------------------------------------------------- schedule
def lr_multiplier(cfg: TrainConfig, step: int) -> float:
    """Peak-relative learning rate at `step` (0-based): linear warmup, then the schedule."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    low = cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    decay_start = cfg.steps - max(1, round(cfg.decay_fraction * cfg.steps))
    if step < decay_start:
        return 1.0
    return 1 - (1 - low) * (step - decay_start + 1) / (cfg.steps - decay_start)


# ---------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: GPT, tokens: Any, cfg: TrainConfig, comm: Communicator, device: torch.device,
             stop: threading.Event | None = None) -> float:
    """Mean token cross-entropy over the validation windows, split across workers."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.bf16 else nullcontext()
    for x, y in val_windows(tokens, cfg.seq_len, cfg.batch_size, comm.rank, comm.world_size, cfg.eval_batches):
        if stop is not None and stop.is_set():
            raise Interrupted
        x, y = x.to(device), y.to(device)
        with autocast:
            _, loss = model(x, y)
        total += torch.stack([loss.double() * y.numel(), torch.tensor(float(y.numel()), device=device)])
    comm.all_reduce_(total)
    model.train()
    return (total[0] / total[1]).item()


# ---------------------------------------------------------------------- the worker
def worker(comm: Communicator, cfg: TrainConfig, data: Prepared, run_dir: Path, device: torch.device,
           start: int | None, stop_at: int | None, stop: threading.Event | None = None) -> None:
    """One worker's training loop; identical under simulated threads and torchrun ranks.

    start: the checkpoint step to resume from (None: from scratch). stop: set on Ctrl-C; the worker then
    raises Interrupted at its next step, writing nothing more."""
    torch.set_flush_denormal(True)
    rank, lead = comm.rank, comm.rank == 0
    model = GPT(model_config(cfg.preset, data.vocab_size, cfg.seq_len), seed=cfg.seed)
    model.to(device)
    opt = make_optimizer(cfg.method, model, comm=comm, **cfg.optimizer_hparams())
    batches = Batches(data.train, cfg.seq_len, cfg.batch_size, rank, comm.world_size, cfg.seed)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.bf16 else nullcontext()
    elapsed = 0.0
    # the train loss since the last metrics row (saved with checkpoints: a resumed run logs the same rows)
    loss_sum = torch.zeros((), device=device)
    loss_count = 0
    if start is not None:
        state = load_checkpoint(run_dir, start, rank, device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        batches.load_state_dict(state["batches"])
        torch.set_rng_state(state["rng"])
        elapsed = state["elapsed"]
        loss_sum += state.get("loss_sum", 0.0)
        loss_count = state.get("loss_count", 0)
    start = start or 0
    metrics_log = sync_log = None
    if lead:
        metrics_log, sync_log = JsonlLog(run_dir / "metrics.jsonl"), JsonlLog(run_dir / "sync.jsonl")
    local = opt.method.local
    sync_every = opt.hparams["sync_every"]
    eval_every = -(-cfg.eval_every // sync_every) * sync_every if local else cfg.eval_every
    end = min(cfg.steps, stop_at) if stop_at else cfg.steps
    bar = None
    if lead and cfg.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.steps, initial=start, desc=f"{cfg.method} {cfg.preset} M={comm.world_size}",
                   unit="step", dynamic_ncols=True)
    if start == 0:   # the curves start at the initial model
        val_loss = evaluate(model, data.val, cfg, comm, device, stop)
        if lead:
            metrics_log.append({"step": 0, "tokens": 0, "train_loss": None, "val_loss": val_loss,
                                "val_ppl": math.exp(val_loss), "lr": 0.0, "comm_bytes": 0, "wall_s": 0.0,
                                "tokens_per_s": None})
    t_last = time.perf_counter()
    try:
        for step in range(start, end):
            if stop is not None and stop.is_set():
                raise Interrupted
            for g in opt.param_groups:
                g["lr"] = cfg.lr * lr_multiplier(cfg, step)
            for _ in range(cfg.grad_accum):
                x, y = next(batches)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with autocast:
                    _, loss = model(x, y)
                (loss / cfg.grad_accum).backward()
                loss_sum += loss.detach().float()
                loss_count += 1
            opt.step()
            opt.zero_grad(set_to_none=True)
            done = step + 1
            if done == cfg.steps:
                opt.sync()     # local methods end on the averaged model (counted like any sync)
            records = opt.pop_diagnostics()
            if lead and records:
                sync_log.append(*({"step": done, **{k: v for k, v in rec.items() if k != "step"}}
                                  for rec in records))
            evaluate_now = done == cfg.steps or done % eval_every == 0
            if evaluate_now or done % cfg.log_every == 0:
                now = time.perf_counter()
                elapsed += now - t_last
                stats = torch.stack([loss_sum, torch.tensor(float(loss_count), device=device)])
                comm.all_reduce_(stats)
                val_loss = evaluate(model, data.val, cfg, comm, device, stop) if evaluate_now else None
                t_last = time.perf_counter()   # evaluation time is not training time
                record = {
                    "step": done, "tokens": done * cfg.tokens_per_step,
                    "train_loss": (stats[0] / stats[1]).item(), "val_loss": val_loss,
                    "val_ppl": math.exp(val_loss) if val_loss is not None else None,
                    "lr": opt.param_groups[0]["lr"], "comm_bytes": opt.comm_stats()["payload_bytes"],
                    "wall_s": elapsed, "tokens_per_s": done * cfg.tokens_per_step / elapsed,
                }
                loss_sum.zero_()
                loss_count = 0
                if lead:
                    metrics_log.append(record)
                    if bar is not None:
                        bar.set_postfix(loss=f"{record['train_loss']:.3f}",
                                        val=f"{val_loss:.3f}" if val_loss is not None else "-")
            if bar is not None:
                bar.update(1)
            if cfg.checkpoint_every and (done % cfg.checkpoint_every == 0 or done == cfg.steps) \
                    or done == end < cfg.steps:
                elapsed += time.perf_counter() - t_last
                t_last = time.perf_counter()
                save_checkpoint(run_dir, comm, done, {
                    "model": model.state_dict(), "optimizer": opt.state_dict(), "batches": batches.state_dict(),
                    "rng": torch.get_rng_state(), "elapsed": elapsed, "step": done,
                    "loss_sum": loss_sum.item(), "loss_count": loss_count})
    finally:
        if bar is not None:
            bar.close()
        if lead:
            metrics_log.close()
            sync_log.close()
    if end < cfg.steps or not lead:
        return
    save_torch(run_dir / "model.pt", model.state_dict())
    last = read_jsonl(run_dir / "metrics.jsonl")[-1]
    extended = read_saved_config(run_dir)[0].get("extended_from", [])
    n_params = model.num_params()
    write_json(run_dir / "summary.json", {
        "method": cfg.method, "preset": cfg.preset, "workers": comm.world_size, "steps": cfg.steps,
        "tokens": cfg.steps * cfg.tokens_per_step, "params": n_params,
        "val_loss": last["val_loss"], "val_ppl": last["val_ppl"], "train_loss": last["train_loss"],
        "comm_bytes": opt.comm_stats()["payload_bytes"], "comm": opt.comm_stats(),
        "optimizer_state_bytes": opt.memory_stats(), "projection_seconds": opt.projection_seconds,
        "skipped_steps": opt.skipped_steps, "wall_s": last["wall_s"], "tokens_per_s": last["tokens_per_s"],
        "comm_seconds": opt.comm_seconds, "compute_s_per_step": (last["wall_s"] - opt.comm_seconds) / cfg.steps,
        "config_hash": result_hash(cfg, extended), **({"extended_from": extended} if extended else {}),
        "versions": _versions(), "device": str(device),
    })


def _versions() -> dict[str, str]:
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    from importlib.metadata import version
    return {"python": platform.python_version(), "torch": torch.__version__, "lordo": version("lordo"),
            "git_commit": commit}


# ---------------------------------------------------------------------- entry points
def resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"config field device={cfg.device!r} is invalid here: CUDA is not available on this "
                         "machine (allowed auto or cpu)")
    if cfg.device == "mps" and not torch.backends.mps.is_available():
        raise ValueError("config field device='mps' is invalid here: MPS is not available on this machine")
    return torch.device(cfg.device)


@contextmanager
def cpu_threads(n: int):
    """Run the enclosed work on n intra-op CPU threads, then restore the previous count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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


def train(config: TrainConfig | dict[str, Any] | None = None, *, force: bool = False, resume: bool | None = None,
          stop_at: int | None = None, **fields: Any) -> Run:
    """Train (or load the cached result of) one configuration; returns the finished Run.

    resume: None resumes an interrupted run if it has a checkpoint; True requires one; False
    starts over unless the run is finished (then it is loaded; force=True retrains).
    stop_at: stop after this step with a checkpoint, as if interrupted (for resume tests).
    Ctrl-C stops every worker and raises Interrupted; the last checkpoint stays intact.
    """
    if isinstance(config, TrainConfig):
        cfg = config.replace(**fields) if fields else config
    else:
        cfg = make_config(config, **fields)
    if stop_at is not None and not (isinstance(stop_at, int) and not isinstance(stop_at, bool) and stop_at >= 1):
        raise ValueError(f"stop_at={stop_at!r} is invalid: allowed an int >= 1")
    run_dir = run_dir_for(cfg)
    if not force and not resume and (run_dir / "summary.json").is_file():
        cached = Run.load(run_dir)
        if cached.summary.get("config_hash") == cfg.hash():
            return cached
    check_claimable(run_dir)
    resolve_device(cfg)
    data = prepare(cfg.corpus, cfg.tokenizer, cfg.vocab_size, max_tokens=cfg.corpus_tokens)
    model = asdict(model_config(cfg.preset, data.vocab_size, cfg.seq_len))
    with RunLock(run_dir) as lock:
        start = prepare_run_dir(cfg, run_dir, resume, force, model, stop_at)
        copy_file(Path(data.tokenizer_path), run_dir / "tokenizer.json")
        try:
            if cfg.launcher == "torchrun":
                from lordo.launch import launch_torchrun
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
    from lordo.comm import init_distributed
    run_dir_path = Path(run_dir)
    interrupted = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        interrupted.set()
        raise Interrupted

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    _, cfg = read_saved_config(run_dir_path)
    comm, device = init_distributed()
    if cfg.device != "auto":
        device = torch.device(cfg.device) if device.type == "cpu" else device
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
