"""The trainer: one per-worker loop for every method, the results store, checkpoints.

    run = lordo.train(method="lordo", preset="tiny", workers=4, steps=300)   # cached by config
    run.summary["val_ppl"], run.metrics, run.syncs

    lordo train --method lordo --preset tiny --workers 4 --steps 300 --out runs/x

Each run writes `runs/<name>/`: config.json, metrics.jsonl, sync.jsonl, summary.json (written
last: its presence marks a finished run), model.pt, tokenizer.json and checkpoints/. Asking
again for a finished config loads it; an interrupted one resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lordo.comm import Communicator, run_simulated
from lordo.config import TrainConfig, make_config
from lordo.data import Batches, Prepared, prepare, val_windows
from lordo.files import read_jsonl, save_torch, write_json, write_jsonl
from lordo.model import GPT, ModelConfig, model_config
from lordo.optim import make_optimizer

REPO = Path(__file__).resolve().parent.parent


def runs_root(cfg: TrainConfig | None = None) -> Path:
    if cfg is not None and cfg.runs_dir:
        return Path(cfg.runs_dir)
    if os.environ.get("LORDO_RUNS_DIR"):
        return Path(os.environ["LORDO_RUNS_DIR"])
    return REPO / "runs" if (REPO / "pyproject.toml").is_file() else Path.cwd() / "runs"


def run_dir_for(cfg: TrainConfig) -> Path:
    return Path(cfg.out) if cfg.out else runs_root(cfg) / f"{cfg.method}-{cfg.preset}-{cfg.hash()}"


def _truncate_jsonl(path: Path, step: int) -> None:
    """Keep the records up to `step` (a resumed run rewrites what came after its checkpoint)."""
    write_jsonl(path, [r for r in read_jsonl(path) if r["step"] <= step])


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
        config = make_config(json.loads((run_dir / "config.json").read_text())["train"])
        return cls(run_dir, config, json.loads((run_dir / "summary.json").read_text()))

    @property
    def metrics(self):
        import pandas as pd
        return pd.DataFrame(read_jsonl(self.dir / "metrics.jsonl"))

    @property
    def syncs(self):
        import pandas as pd
        return pd.DataFrame(read_jsonl(self.dir / "sync.jsonl"))


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
def evaluate(model: GPT, tokens: Any, cfg: TrainConfig, comm: Communicator, device: torch.device) -> float:
    """Mean token cross-entropy over the validation windows, split across workers."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.bf16 else nullcontext()
    for x, y in val_windows(tokens, cfg.seq_len, cfg.batch_size, comm.rank, comm.world_size, cfg.eval_batches):
        x, y = x.to(device), y.to(device)
        with autocast:
            _, loss = model(x, y)
        total += torch.stack([loss.double() * y.numel(), torch.tensor(float(y.numel()), device=device)])
    comm.all_reduce_(total)
    model.train()
    return (total[0] / total[1]).item()


# ---------------------------------------------------------------------- the worker
def _checkpoint(run_dir: Path, comm: Communicator, step: int, payload: dict[str, Any]) -> None:
    """Every worker saves its state; rank 0 then points `latest.json` at the complete step."""
    step_dir = run_dir / "checkpoints" / f"step_{step:07d}"
    step_dir.mkdir(parents=True, exist_ok=True)
    save_torch(step_dir / f"rank{comm.rank}.pt", payload)
    comm.barrier()
    if comm.rank == 0:
        write_json(run_dir / "checkpoints" / "latest.json", {"step": step, "world_size": comm.world_size})
        for old in (run_dir / "checkpoints").glob("step_*"):
            if old != step_dir:
                shutil.rmtree(old, ignore_errors=True)
    comm.barrier()


def latest_checkpoint(run_dir: Path) -> int | None:
    latest = run_dir / "checkpoints" / "latest.json"
    return json.loads(latest.read_text())["step"] if latest.is_file() else None


def worker(comm: Communicator, cfg: TrainConfig, data: Prepared, run_dir: Path, device: torch.device,
           resume: bool, stop_at: int | None) -> None:
    """One worker's training loop; identical under simulated threads and torchrun ranks."""
    torch.set_flush_denormal(True)
    rank, lead = comm.rank, comm.rank == 0
    model = GPT(model_config(cfg.preset, data.vocab_size, cfg.seq_len), seed=cfg.seed)
    model.to(device)
    opt = make_optimizer(cfg.method, model, comm=comm, **cfg.optimizer_hparams())
    batches = Batches(data.train, cfg.seq_len, cfg.batch_size, rank, comm.world_size, cfg.seed)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.bf16 else nullcontext()
    start, elapsed = 0, 0.0
    if resume:
        start = latest_checkpoint(run_dir)
        state = torch.load(run_dir / "checkpoints" / f"step_{start:07d}" / f"rank{rank}.pt",
                           map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        batches.load_state_dict(state["batches"])
        torch.set_rng_state(state["rng"])
        elapsed = state["elapsed"]
    metrics_file = sync_file = None
    if lead:
        metrics_file = open(run_dir / "metrics.jsonl", "a")   # noqa: SIM115 - closed below
        sync_file = open(run_dir / "sync.jsonl", "a")          # noqa: SIM115
    local = opt.method.local
    sync_every = opt.hparams["sync_every"]
    eval_every = -(-cfg.eval_every // sync_every) * sync_every if local else cfg.eval_every
    end = min(cfg.steps, stop_at) if stop_at else cfg.steps
    bar = None
    if lead and cfg.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.steps, initial=start, desc=f"{cfg.method} {cfg.preset} M={comm.world_size}",
                   unit="step", dynamic_ncols=True)
    loss_sum = torch.zeros((), device=device)
    loss_count = 0
    if start == 0:   # the curves start at the initial model
        val_loss = evaluate(model, data.val, cfg, comm, device)
        if lead:
            metrics_file.write(json.dumps({"step": 0, "tokens": 0, "train_loss": None, "val_loss": val_loss,
                                           "val_ppl": math.exp(val_loss), "lr": 0.0, "comm_bytes": 0,
                                           "wall_s": 0.0, "tokens_per_s": None}) + "\n")
    t_last = time.perf_counter()
    try:
        for step in range(start, end):
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
                for rec in records:
                    sync_file.write(json.dumps({"step": done, **{k: v for k, v in rec.items() if k != "step"}})
                                    + "\n")
                sync_file.flush()
            evaluate_now = done == cfg.steps or done % eval_every == 0
            if evaluate_now or done % cfg.log_every == 0:
                now = time.perf_counter()
                elapsed += now - t_last
                stats = torch.stack([loss_sum, torch.tensor(float(loss_count), device=device)])
                comm.all_reduce_(stats)
                val_loss = evaluate(model, data.val, cfg, comm, device) if evaluate_now else None
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
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                    if bar is not None:
                        bar.set_postfix(loss=f"{record['train_loss']:.3f}",
                                        val=f"{val_loss:.3f}" if val_loss is not None else "-")
            if bar is not None:
                bar.update(1)
            if cfg.checkpoint_every and (done % cfg.checkpoint_every == 0 or done == cfg.steps) \
                    or done == end < cfg.steps:
                elapsed += time.perf_counter() - t_last
                t_last = time.perf_counter()
                _checkpoint(run_dir, comm, done, {
                    "model": model.state_dict(), "optimizer": opt.state_dict(), "batches": batches.state_dict(),
                    "rng": torch.get_rng_state(), "elapsed": elapsed, "step": done})
    finally:
        if bar is not None:
            bar.close()
        if lead:
            metrics_file.close()
            sync_file.close()
    if end < cfg.steps or not lead:
        return
    save_torch(run_dir / "model.pt", model.state_dict())
    last = read_jsonl(run_dir / "metrics.jsonl")[-1]
    n_params = model.num_params()
    write_json(run_dir / "summary.json", {
        "method": cfg.method, "preset": cfg.preset, "workers": comm.world_size, "steps": cfg.steps,
        "tokens": cfg.steps * cfg.tokens_per_step, "params": n_params,
        "val_loss": last["val_loss"], "val_ppl": last["val_ppl"], "train_loss": last["train_loss"],
        "comm_bytes": opt.comm_stats()["payload_bytes"], "comm": opt.comm_stats(),
        "optimizer_state_bytes": opt.memory_stats(), "projection_seconds": opt.projection_seconds,
        "skipped_steps": opt.skipped_steps, "wall_s": last["wall_s"], "tokens_per_s": last["tokens_per_s"],
        "comm_seconds": opt.comm_seconds, "compute_s_per_step": (last["wall_s"] - opt.comm_seconds) / cfg.steps,
        "config_hash": cfg.hash(), "versions": _versions(), "device": str(device),
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
    return torch.device(cfg.device)


def _prepare_run_dir(cfg: TrainConfig, run_dir: Path, resume: bool | None, force: bool, model: ModelConfig) -> bool:
    """Decide between cached, resumed and fresh; returns whether to resume. Writes config.json."""
    config_path = run_dir / "config.json"
    if run_dir.exists() and config_path.is_file() and not force:
        old = make_config(json.loads(config_path.read_text())["train"])
        diff = {k: (v, getattr(cfg, k)) for k, v in old.result_dict().items()
                if getattr(cfg, k) != v and not (k == "steps" and resume)}
        if diff:
            k, (was, now) = next(iter(diff.items()))
            raise ValueError(f"{run_dir} holds a run with a different config ({k}: {was!r} there, {now!r} now); "
                             "choose another out directory, or force=True / --force to replace it")
        checkpoint = latest_checkpoint(run_dir)
        if resume is None:
            resume = checkpoint is not None and not (run_dir / "summary.json").is_file()
        if resume and checkpoint is None:
            raise FileNotFoundError(f"nothing to resume in {run_dir}: no checkpoint (checkpoints/latest.json)")
        if resume:
            if checkpoint > cfg.steps:
                raise ValueError(f"steps={cfg.steps} is below the checkpoint's step {checkpoint}")
            for name in ("metrics.jsonl", "sync.jsonl"):
                _truncate_jsonl(run_dir / name, checkpoint)
            (run_dir / "summary.json").unlink(missing_ok=True)
    else:
        if resume:
            raise FileNotFoundError(f"nothing to resume in {run_dir}: no run there")
        if force and run_dir.exists():
            shutil.rmtree(run_dir)
        resume = False
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        for name in ("metrics.jsonl", "sync.jsonl", "summary.json"):
            (run_dir / name).unlink(missing_ok=True)
    write_json(config_path, {"train": cfg.to_dict(), "hash": cfg.hash(), "model": asdict(model),
                             "data": {"corpus": cfg.corpus, "tokenizer": cfg.tokenizer, "vocab_size": cfg.vocab_size,
                                      "corpus_tokens": cfg.corpus_tokens,
                                      "tokenizer_path": str(run_dir / "tokenizer.json")}})
    return bool(resume)



@contextmanager
def cpu_threads(n: int):
    """Run the enclosed work on n intra-op CPU threads, then restore the previous count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)

def train(config: TrainConfig | dict[str, Any] | None = None, *, force: bool = False, resume: bool | None = None,
          stop_at: int | None = None, **fields: Any) -> Run:
    """Train (or load the cached result of) one configuration; returns the finished Run.

    resume: None resumes an interrupted run if it has a checkpoint; True requires one; False
    starts over unless the run is finished (then it is loaded; force=True retrains).
    stop_at: stop after this step with a checkpoint, as if interrupted (for resume tests).
    """
    if isinstance(config, TrainConfig):
        cfg = config.replace(**fields) if fields else config
    else:
        cfg = make_config(config, **fields)
    run_dir = run_dir_for(cfg)
    if not force and not resume and (run_dir / "summary.json").is_file():
        cached = Run.load(run_dir)
        if cached.config.hash() == cfg.hash():
            return cached
    data = prepare(cfg.corpus, cfg.tokenizer, cfg.vocab_size, max_tokens=cfg.corpus_tokens)
    resume = _prepare_run_dir(cfg, run_dir, resume, force, model_config(cfg.preset, data.vocab_size, cfg.seq_len))
    shutil.copyfile(data.tokenizer_path, run_dir / "tokenizer.json")
    if cfg.launcher == "torchrun":
        from lordo.launch import launch_torchrun
        launch_torchrun(cfg, run_dir, resume, stop_at)
    else:
        device = resolve_device(cfg)
        # workers share the cores; oversubscription slows every one of them
        share = cpu_threads(max(1, (os.cpu_count() or 1) // cfg.workers)) if device.type == "cpu" else nullcontext()
        with share:
            run_simulated(worker, cfg.workers, cfg, data, run_dir, device, resume, stop_at)
    if stop_at is not None and stop_at < cfg.steps:
        return Run(run_dir, cfg, {"stopped_at": stop_at})
    return Run.load(run_dir)


def main_worker(run_dir: str, resume: bool, stop_at: int | None) -> None:
    """Entry point of one torchrun rank (see lordo.launch)."""
    from lordo.comm import init_distributed
    run_dir_path = Path(run_dir)
    cfg = make_config(json.loads((run_dir_path / "config.json").read_text())["train"])
    comm, device = init_distributed()
    if cfg.device != "auto":
        device = torch.device(cfg.device) if device.type == "cpu" else device
    try:
        # the launching process prepared and verified the cache; ranks check sizes, not 30 GB of hashes
        data = prepare(cfg.corpus, cfg.tokenizer, cfg.vocab_size, max_tokens=cfg.corpus_tokens, verify=False)
        worker(comm, cfg, data, run_dir_path, device, resume, stop_at)
    except BaseException as e:
        message = f"rank {comm.rank} failed: {type(e).__name__}: {e}"
        print(f"lordo: {message}", file=sys.stderr, flush=True)
        (run_dir_path / "errors").mkdir(exist_ok=True)
        (run_dir_path / "errors" / f"rank{comm.rank}.txt").write_text(message + "\n")
        raise
    finally:
        torch.distributed.destroy_process_group()
