"""The trainer: one per-worker loop for every method, the same under simulated threads and torchrun ranks.

    worker(comm, cfg, data, run_dir, device, start=None, stop_at=None)   # one worker's whole run

`lordo.launch.train` is the entry point (`lordo.train`, `lordo train`): it prepares the data and the run
directory (lordo.runs, the results store) and starts the workers, as threads or torchrun ranks, each of which
runs `worker`.
"""

from __future__ import annotations

import math
import platform
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from lordo.comm import Communicator
from lordo.config import TrainConfig
from lordo.data.batches import Batches, val_windows
from lordo.data.cache import Prepared
from lordo.files import JsonlLog, read_jsonl, save_torch, write_json
from lordo.model import GPT, model_config
from lordo.optim import make_optimizer
from lordo.paths import git_commit
from lordo.runs import load_checkpoint, read_saved_config, result_hash, save_checkpoint

__all__ = ["Interrupted", "evaluate", "lr_multiplier", "resolve_device", "worker"]


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


def _versions() -> dict[str, str | None]:
    from importlib.metadata import version
    return {"python": platform.python_version(), "torch": torch.__version__, "lordo": version("lordo"),
            "git_commit": git_commit()}


def resolve_device(cfg: TrainConfig) -> torch.device:
    """The device a config asks for; one line naming it when this machine has none such."""
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"config field device={cfg.device!r} is invalid here: CUDA is not available on this "
                         "machine (allowed auto or cpu)")
    if cfg.device == "mps" and not torch.backends.mps.is_available():
        raise ValueError("config field device='mps' is invalid here: MPS is not available on this machine")
    return torch.device(cfg.device)
