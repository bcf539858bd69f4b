"""A training run's configuration: plain data, checked when it is made, hashed to key results.

    cfg = TrainConfig(method="lordo", preset="tiny", workers=4, steps=300)
    cfg = load_config("configs/paper/720m_lordo.yaml", steps=1000)   # a file plus overrides

Fields split in two: what determines the result (hashed: two configs with the same hash give
the same run) and how it is executed (`EXECUTION_FIELDS`: launcher, device, output place...).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from lordo.optim import DEFAULTS, METHODS, validate_hparams

SCHEDULES = ("cosine", "wsd", "constant")
LAUNCHERS = ("sim", "torchrun")
EXECUTION_FIELDS = ("launcher", "nproc_per_node", "nnodes", "node_rank", "rdzv_endpoint", "device", "out",
                    "runs_dir", "checkpoint_every", "progress")


@dataclass
class TrainConfig:
    """Everything a run needs. Optimizer fields left at None take the optimizer's defaults."""

    # what is trained, on what
    method: str = "lordo"
    preset: str = "tiny"
    corpus: str = "shakespeare"
    tokenizer: str = "bpe"
    vocab_size: int = 8192          # for the trained BPE; other tokenizers bring their own
    corpus_tokens: int | None = None  # prepare at most this many training tokens (required for hf: corpora)
    seed: int = 0
    # batch and length
    workers: int = 4                # M: simulated threads or torchrun ranks
    steps: int = 300
    batch_size: int = 8             # sequences per worker per micro-step
    grad_accum: int = 1             # micro-steps per optimizer step
    seq_len: int = 128
    bf16: bool = False              # bf16 autocast (CPU and CUDA)
    # schedule
    lr: float = 3e-3
    schedule: str = "cosine"        # warmup then cosine | warmup-stable-decay | constant
    warmup: int = 20                # steps
    min_lr_ratio: float = 0.1       # final lr / peak lr (cosine and wsd)
    decay_fraction: float = 0.2     # wsd: last fraction of steps that decays
    # optimizer (lordo.optim.DEFAULTS when None)
    rank: int | float | None = None
    sync_every: int | None = None
    omega: float | None = None
    weight_decay: float | None = None
    betas: tuple[float, float] | None = None
    eps: float | None = None
    clip: float | None = 1.0
    error_feedback: bool | None = None
    moments_on_refresh: str | None = None
    proj_method: str | None = None
    proj_every: int | None = None
    proj_source: str | None = None  # pseudo_gradient (the paper) | gradient (diagnostic: +1 all-reduce per sync)
    outer_lr: float | None = None
    outer_momentum: float | None = None
    comm_dtype: str | None = None
    state_dtype: str | None = None  # "bfloat16": moments and error feedback stored in bf16 (README "Memory")
    host_anchor: bool | None = None  # the anchor copy in host memory, on the device only at syncs
    diagnostics: bool = True
    # evaluation and logging
    eval_every: int = 50            # local methods evaluate at the next synchronization
    eval_batches: int | None = 16   # validation batches per worker per evaluation (None: the whole split)
    log_every: int = 10
    # execution (not hashed)
    launcher: str = "sim"
    nproc_per_node: int | None = None
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None
    device: str = "auto"            # auto: cuda if available, else cpu
    out: str | None = None          # run directory; default <runs_dir>/<method>-<preset>-<hash>
    runs_dir: str | None = None     # default: $LORDO_RUNS_DIR or <repo>/runs
    checkpoint_every: int = 0       # 0: only the final state
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)
        validate_config(self)

    def optimizer_hparams(self) -> dict[str, Any]:
        """The optimizer hyper-parameters this config sets (the rest keep lordo.optim.DEFAULTS)."""
        hp = {k: getattr(self, k) for k in DEFAULTS if hasattr(self, k) and getattr(self, k) is not None}
        hp["clip"] = self.clip
        hp["lr"] = self.lr
        return hp

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def result_dict(self) -> dict[str, Any]:
        """The fields that determine the result."""
        return {k: v for k, v in self.to_dict().items() if k not in EXECUTION_FIELDS}

    def resolved_optimizer(self) -> dict[str, Any]:
        """Every optimizer hyper-parameter this run uses: its own, else the package defaults."""
        hp = {**DEFAULTS, **self.optimizer_hparams()}
        if hp["omega"] is None:
            hp["omega"] = METHODS[self.method].omega
        return hp

    def hash(self) -> str:
        """Key of the result: the fields plus what they resolve to (optimizer defaults, the model's
        shape), so a changed package default is a new run, not a stale cached one."""
        from lordo.model import PRESETS
        key = {**self.result_dict(), "resolved_optimizer": self.resolved_optimizer(), "model": PRESETS[self.preset]}
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=list).encode()).hexdigest()[:12]

    def replace(self, **changes: Any) -> TrainConfig:
        return make_config(self.to_dict(), **changes)

    @property
    def tokens_per_step(self) -> int:
        return self.workers * self.batch_size * self.grad_accum * self.seq_len


def _field_types() -> dict[str, Any]:
    return {f.name: f.default for f in fields(TrainConfig)}


def make_config(base: dict[str, Any] | None = None, **overrides: Any) -> TrainConfig:
    """A TrainConfig from a dict plus keyword overrides; unknown fields are named in the error."""
    data = {**(base or {}), **overrides}
    known = _field_types()
    for key in data:
        if key not in known:
            raise ValueError(f"unknown config field {key!r}: allowed {sorted(known)}")
    return TrainConfig(**data)


def load_config(path: str | Path, **overrides: Any) -> TrainConfig:
    """A TrainConfig from a YAML or JSON file, plus overrides."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of field: value")
    try:
        return make_config(data, **overrides)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def _need(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"config field {name}={value!r} is invalid: allowed {allowed}")


def validate_config(c: TrainConfig) -> None:
    """Raise ValueError naming the first bad field and what is allowed."""
    from lordo.model import PRESETS  # the model module imports nothing of ours; kept local for import time

    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
    _need(c.method in METHODS, "method", c.method, f"one of {sorted(METHODS)}")
    _need(c.preset in PRESETS, "preset", c.preset, f"one of {sorted(PRESETS)}")
    for name in ("workers", "steps", "batch_size", "grad_accum", "eval_every", "log_every"):
        _need(is_int(getattr(c, name)) and getattr(c, name) >= 1, name, getattr(c, name), "an int >= 1")
    _need(is_int(c.seq_len) and c.seq_len >= 2, "seq_len", c.seq_len, "an int >= 2")
    _need(is_int(c.vocab_size) and c.vocab_size >= 256, "vocab_size", c.vocab_size, "an int >= 256")
    _need(is_int(c.warmup) and c.warmup >= 0, "warmup", c.warmup, "an int >= 0")
    _need(c.corpus_tokens is None or is_int(c.corpus_tokens) and c.corpus_tokens >= 1, "corpus_tokens",
          c.corpus_tokens, "None (all of a local corpus) or an int >= 1")
    _need(isinstance(c.lr, int | float) and c.lr > 0, "lr", c.lr, "a number > 0")
    _need(c.schedule in SCHEDULES, "schedule", c.schedule, f"one of {SCHEDULES}")
    _need(0 <= c.min_lr_ratio <= 1, "min_lr_ratio", c.min_lr_ratio, "a number in [0, 1]")
    _need(0 < c.decay_fraction <= 1, "decay_fraction", c.decay_fraction, "a number in (0, 1]")
    _need(c.eval_batches is None or is_int(c.eval_batches) and c.eval_batches >= 1, "eval_batches",
          c.eval_batches, "None (whole split) or an int >= 1")
    _need(c.launcher in LAUNCHERS, "launcher", c.launcher, f"one of {LAUNCHERS}")
    _need(is_int(c.checkpoint_every) and c.checkpoint_every >= 0, "checkpoint_every", c.checkpoint_every,
          "an int >= 0 (0: no intermediate checkpoints)")
    _need(is_int(c.nnodes) and c.nnodes >= 1, "nnodes", c.nnodes, "an int >= 1")
    if c.launcher == "torchrun":
        nproc = c.nproc_per_node or c.workers // c.nnodes
        _need(nproc * c.nnodes == c.workers, "nproc_per_node", c.nproc_per_node,
              f"nproc_per_node * nnodes == workers ({c.workers})")
    try:
        validate_hparams(c.resolved_optimizer())
    except ValueError as e:
        raise ValueError(f"config field {e}") from None
