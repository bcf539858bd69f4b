"""A training run's configuration: plain data, checked when it is made, hashed to key results.

    cfg = TrainConfig(method="lordo", preset="tiny", workers=4, steps=300)
    cfg = load_config("configs/paper/720m.yaml", method="lordo", steps=1000)   # a file plus overrides

Fields split in two: what determines the result (hashed: two configs with the same hash give
the same run) and how it is executed (`EXECUTION_FIELDS`: launcher, device, output place...).
Each field carries its help text and its `Kind` (how text is read, what is allowed): the one
source of `lordo train --help`, of parsing command-line and config-file values, and of validation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from lordo.model import PRESETS
from lordo.optim import (
    COMM_DTYPES,
    DEFAULTS,
    EF_ON_SYNC,
    METHODS,
    MOMENT_AVERAGING,
    MOMENT_RULES,
    NONFINITE_RULES,
    PROJ_SOURCES,
    QH_SCALES,
    STATE_DTYPES,
    check,
    is_rank,
    validate_hparams,
)
from lordo.projection import PROJ_METHODS

SCHEDULES = ("cosine", "wsd", "constant")
LAUNCHERS = ("sim", "torchrun")
EXECUTION_FIELDS = ("launcher", "nproc_per_node", "nnodes", "node_rank", "rdzv_endpoint", "device", "out",
                    "runs_dir", "checkpoint_every", "progress")
# Optimizer options added after runs were cached under the config hash: in the hash key only when set (their
# resolved values are in it anyway, under resolved_optimizer), so every earlier config keeps its hash.
LATER_OPTIMIZER_FIELDS = ("proj_iters", "nonfinite", "bucket_mb", "qh_scale", "mu", "average_moments",
                          "average_moments_every", "ef_on_sync", "fullrank_lr_scale")
# Optimizer options added after runs were cached, with the behaviour every earlier run had: at that value they
# stay out of the resolved key too (a later change of the default still changes the hash).
IMPLICIT_BEFORE = {"qh_scale": "mean_denom", "mu": 1.0, "average_moments": "none", "average_moments_every": 1,
                   "ef_on_sync": "keep", "fullrank_lr_scale": 1.0}
MAX_LOCAL_WORKERS = 256   # threads (sim) or processes (torchrun) on one machine
NONE_WORDS = ("none", "null", "~")


# ---------------------------------------------------------------------- value kinds
def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _read_int(text: str) -> int:
    """'8', '1_000', '1e3' (an integral float as people write it)."""
    try:
        return int(text)
    except ValueError:
        value = float(text)
        if not value.is_integer():
            raise
        return int(value)


def _read_bool(text: str) -> bool:
    words = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}
    return words[text.lower()]


@dataclass(frozen=True)
class Kind:
    """A field's values: `read` turns text as typed into a value, `ok` accepts a value, `allowed` says which."""

    read: Callable[[str], Any]
    ok: Callable[[Any], bool]
    allowed: str
    none: str | None = None      # what None means, when None is allowed

    def parse(self, value: Any) -> Any:
        """Text (command line; a YAML scalar such as '3e-3' that YAML 1.1 leaves a string) read as this kind;
        other values as given. Text that does not read stays text, for `check` to name it."""
        if not isinstance(value, str):
            return value
        if self.none and value.strip().lower() in NONE_WORDS:
            return None
        if self.read is str:
            return value
        try:
            return self.read(value.strip())
        except (ValueError, KeyError, OverflowError):
            return value

    def check(self, value: Any) -> bool:
        return value is None if value is None else self.ok(value)

    def describe(self) -> str:
        return f"{self.allowed}, or None ({self.none})" if self.none else self.allowed


def integer(low: int, high: int | None = None, none: str | None = None) -> Kind:
    return Kind(_read_int, lambda v: is_int(v) and v >= low and (high is None or v <= high),
                f"an int >= {low}" if high is None else f"an int in [{low}, {high}]", none)


def number(low: float, high: float | None = None, *, open_low: bool = False, open_high: bool = False,
           none: str | None = None) -> Kind:
    def ok(v: Any) -> bool:
        return is_number(v) and math.isfinite(v) and (v > low if open_low else v >= low) and \
            (high is None or (v < high if open_high else v <= high))
    if high is None:
        allowed = f"a number {'>' if open_low else '>='} {low:g}"
    else:
        allowed = f"a number in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
    return Kind(float, ok, allowed, none)


def choice(options: tuple[str, ...] | list[str], none: str | None = None) -> Kind:
    return Kind(str, lambda v: v in options, f"one of {list(options)}", none)


def text(allowed: str, pattern: str = r".+", none: str | None = None) -> Kind:
    return Kind(str, lambda v: isinstance(v, str) and re.fullmatch(pattern, v) is not None, allowed, none)


def flag(none: str | None = None) -> Kind:
    return Kind(_read_bool, lambda v: isinstance(v, bool), "true or false", none)


def _read_rank(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


RANK = Kind(_read_rank, is_rank,
            "an int >= 1, or a fraction of min(p, q) in (0, 1]", f"lordo.optim.DEFAULTS: {DEFAULTS['rank']}")
BETAS = Kind(lambda t: [float(b) for b in t.split(",")],
             lambda v: isinstance(v, tuple | list) and len(v) == 2 and
             all(is_number(b) and 0 <= b < 1 for b in v), "two numbers in [0, 1), as 0.9,0.95",
             f"lordo.optim.DEFAULTS: {','.join(map(str, DEFAULTS['betas']))}")


def option(default: Any, kind: Kind, help: str) -> Any:
    """A TrainConfig field with its kind and help text."""
    return field(default=default, metadata={"kind": kind, "help": help})


def _optimizer_default(name: str) -> str:
    return f"lordo.optim.DEFAULTS: {DEFAULTS[name]}"


# ---------------------------------------------------------------------- the config
@dataclass
class TrainConfig:
    """Everything a run needs. Optimizer fields left at None take the optimizer's defaults."""

    # what is trained, on what
    method: str = option("lordo", choice(sorted(METHODS)), "optimization method (README: Methods)")
    preset: str = option("tiny", choice(sorted(PRESETS)), "model size (README: Training runs)")
    corpus: str = option("shakespeare", text("shakespeare, brown, ptb, hf:<name>[:<config>] or files:<glob>"),
                         "training corpus (data/README.md)")
    tokenizer: str = option("bpe", text("bpe (trained on the corpus), byte, gpt2 or a Hugging Face name"),
                            "tokenizer")
    vocab_size: int = option(8192, integer(256), "vocabulary of the trained BPE (other tokenizers bring their own)")
    corpus_tokens: int | None = option(None, integer(1, none="all of a local corpus"),
                                       "prepare at most this many training tokens (required for hf: corpora)")
    seed: int = option(0, integer(0, 2**32 - 1), "seed of the initialization, the data order and the projections")
    # batch and length
    workers: int = option(4, integer(1), "M: simulated threads or torchrun ranks")
    steps: int = option(300, integer(1), "optimizer steps")
    batch_size: int = option(8, integer(1), "sequences per worker per micro-step")
    grad_accum: int = option(1, integer(1), "micro-steps per optimizer step")
    seq_len: int = option(128, integer(2), "tokens per sequence (at most the preset's max_seq_len)")
    bf16: bool = option(False, flag(), "bf16 autocast (CPU and CUDA)")
    # schedule
    lr: float = option(3e-3, number(0, open_low=True), "peak learning rate")
    schedule: str = option("cosine", choice(SCHEDULES), "warmup then cosine | warmup-stable-decay | constant")
    warmup: int = option(20, integer(0), "linear warmup steps")
    min_lr_ratio: float = option(0.1, number(0, 1), "final lr / peak lr (cosine and wsd)")
    decay_fraction: float = option(0.2, number(0, 1, open_low=True), "wsd: last fraction of steps that decays")
    # optimizer (lordo.optim.DEFAULTS when None)
    rank: int | float | None = option(None, RANK, "rank r of the low-rank matrices")
    sync_every: int | None = option(None, integer(1, none=_optimizer_default("sync_every")),
                                    "K_x: local steps between synchronizations (local methods)")
    omega: float | None = option(None, number(0, 1, none="the method's own: 0.7 for lordo, else 1"),
                                 "weight of the low-rank momentum in the quasi-hyperbolic step")
    weight_decay: float | None = option(None, number(0, none=_optimizer_default("weight_decay")),
                                        "decoupled weight decay")
    betas: tuple[float, float] | None = option(None, BETAS, "Adam's beta1,beta2")
    eps: float | None = option(None, number(0, open_low=True, none=_optimizer_default("eps")), "Adam's epsilon")
    clip: float | None = option(1.0, number(0, open_low=True, none="no clipping"), "global gradient-norm clip")
    error_feedback: bool | None = option(None, flag(none=_optimizer_default("error_feedback")),
                                         "keep the low-rank projection's residual and add it back")
    moments_on_refresh: str | None = option(None, choice(MOMENT_RULES, none=_optimizer_default("moments_on_refresh")),
                                            "what the moments do when Q changes")
    proj_method: str | None = option(None, choice(PROJ_METHODS, none=_optimizer_default("proj_method")),
                                     "how the projection Q is computed")
    proj_every: int | None = option(None, integer(1, none=_optimizer_default("proj_every")),
                                    "steps between projection refreshes (lowrank_ddp)")
    proj_iters: int | None = option(None, integer(1, none=_optimizer_default("proj_iters")),
                                    "power iterations of ComputeProjection (proj_method power or randomized)")
    proj_source: str | None = option(None, choice(PROJ_SOURCES, none=_optimizer_default("proj_source")),
                                     "what Q is computed from: pseudo_gradient (the paper) | gradient "
                                     "(diagnostic: +1 all-reduce per sync)")
    qh_scale: str | None = option(None, choice(QH_SCALES, none=_optimizer_default("qh_scale")),
                                  "size of the full-rank QH term: mean_denom (G^ / mean(D), the spec) | update_rms "
                                  "(the low-rank update's RMS)")
    mu: float | None = option(None, number(0, open_low=True, none=_optimizer_default("mu")),
                              "the paper's scaling factor mu: the full-rank QH term is divided by it")
    average_moments: str | None = option(None, choice(MOMENT_AVERAGING, none=_optimizer_default("average_moments")),
                                         "optimizer moments averaged over workers at synchronizations: none | "
                                         "lowrank (u, v) | adamw (the full-rank parameters') | all")
    average_moments_every: int | None = option(None, integer(1, none=_optimizer_default("average_moments_every")),
                                               "average the moments at every n-th synchronization")
    ef_on_sync: str | None = option(None, choice(EF_ON_SYNC, none=_optimizer_default("ef_on_sync")),
                                    "each worker's error feedback at a synchronization: keep | average | reset | "
                                    "reproject (onto the new Q)")
    fullrank_lr_scale: float | None = option(None, number(0, 1000, open_low=True,
                                                          none=_optimizer_default("fullrank_lr_scale")),
                                             "low-rank methods: the full-rank (AdamW) parameters' lr / lr")
    outer_lr: float | None = option(None, number(0, open_low=True, none=_optimizer_default("outer_lr")),
                                    "outer learning rate at synchronizations (local methods)")
    outer_momentum: float | None = option(None, number(0, 1, open_high=True,
                                                       none=_optimizer_default("outer_momentum")),
                                          "outer Nesterov momentum at synchronizations (local methods)")
    comm_dtype: str | None = option(None, choice(tuple(COMM_DTYPES), none=_optimizer_default("comm_dtype")),
                                    "dtype of what is communicated")
    state_dtype: str | None = option(None, choice(tuple(STATE_DTYPES), none=_optimizer_default("state_dtype")),
                                     "storage dtype of the moments and error feedback (README: Memory)")
    host_anchor: bool | None = option(None, flag(none=_optimizer_default("host_anchor")),
                                      "keep the anchor copy in host memory, on the device only at syncs")
    nonfinite: str | None = option(None, choice(NONFINITE_RULES, none=_optimizer_default("nonfinite")),
                                   "a non-finite gradient: raise naming the parameter | skip the step (counted) | "
                                   "off (no check)")
    bucket_mb: float | None = option(None, number(0, open_low=True, none=_optimizer_default("bucket_mb")),
                                     "MiB per communication bucket (one collective each)")
    diagnostics: bool = option(True, flag(), "record subspace diagnostics at synchronizations (sync.jsonl)")
    # evaluation and logging
    eval_every: int = option(50, integer(1), "steps between evaluations (local methods: at the next synchronization)")
    eval_batches: int | None = option(16, integer(1, none="the whole split"),
                                      "validation batches per worker per evaluation")
    log_every: int = option(10, integer(1), "steps between metrics rows")
    # execution (not hashed)
    launcher: str = option("sim", choice(LAUNCHERS), "sim: workers as threads of one process; torchrun: processes")
    nproc_per_node: int | None = option(None, integer(1, none="workers / nnodes"), "torchrun ranks on this node")
    nnodes: int = option(1, integer(1), "torchrun nodes")
    node_rank: int = option(0, integer(0), "this node's rank among nnodes (torchrun)")
    rdzv_endpoint: str | None = option(None, text("host:port", r"[^\s:]+:\d{1,5}", none="single node"),
                                       "rendezvous of node 0 (torchrun, nnodes > 1)")
    device: str = option("auto", text("auto, cpu, cuda, cuda:<index> or mps", r"auto|cpu|mps|cuda(:\d+)?"),
                         "auto: cuda if available, else cpu")
    out: str | None = option(None, text("a directory path", none="<runs_dir>/<method>-<preset>-<hash>"),
                             "run directory")
    runs_dir: str | None = option(None, text("a directory path", none="$LORDO_RUNS_DIR or <repo>/runs"),
                                  "where runs without --out go")
    checkpoint_every: int = option(0, integer(0), "steps between checkpoints (0: only at a stop and at the end)")
    progress: bool = option(True, flag(), "show a progress bar")

    def __post_init__(self) -> None:
        for f in fields(self):
            setattr(self, f.name, f.metadata["kind"].parse(getattr(self, f.name)))
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
        return {k: v for k, v in self.to_dict().items() if k not in EXECUTION_FIELDS
                and not (k in LATER_OPTIMIZER_FIELDS and v is None)}

    def identity(self) -> dict[str, Any]:
        """Every field that determines the result, set or not: what a run directory's saved config is compared
        with (result_dict, the hash key, leaves LATER_OPTIMIZER_FIELDS out at None to keep earlier hashes)."""
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
        resolved = {k: v for k, v in self.resolved_optimizer().items()
                    if k not in IMPLICIT_BEFORE or v != IMPLICIT_BEFORE[k]}
        key = {**self.result_dict(), "resolved_optimizer": resolved, "model": PRESETS[self.preset]}
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=list).encode()).hexdigest()[:12]

    def replace(self, **changes: Any) -> TrainConfig:
        return make_config(self.to_dict(), **changes)

    @property
    def ranks_per_node(self) -> int:
        """torchrun's local ranks on each node."""
        return self.nproc_per_node or self.workers // self.nnodes

    @property
    def tokens_per_step(self) -> int:
        return self.workers * self.batch_size * self.grad_accum * self.seq_len


def field_help(f: dataclasses.Field) -> str:
    """A field's help line: what it is, its default and what is allowed."""
    kind: Kind = f.metadata["kind"]
    if f.default is None:
        return f"{f.metadata['help']} (default: none, meaning {kind.none}; allowed: {kind.allowed}, or none)"
    return f"{f.metadata['help']} (default: {f.default}; allowed: {kind.describe()})"


def make_config(base: dict[str, Any] | None = None, **overrides: Any) -> TrainConfig:
    """A TrainConfig from a dict plus keyword overrides; unknown fields are named in the error."""
    data = {**(base or {}), **overrides}
    known = {f.name for f in fields(TrainConfig)}
    for key in data:
        if key not in known:
            raise ValueError(f"unknown config field {key!r}: allowed {sorted(known)}")
    return TrainConfig(**data)


def unused_fields(method: str) -> tuple[str, ...]:
    """The optimizer fields `method` never reads: rank, omega and moments of a full-rank method, sync_every of a
    method that all-reduces every step, proj_every of all but lowrank_ddp."""
    m = METHODS[method]
    unused = {"rank": not m.lowrank, "omega": not m.lowrank, "moments_on_refresh": not m.lowrank,
              "sync_every": not m.local, "proj_every": m.projection != "gradient"}
    return tuple(k for k, drop in unused.items() if drop)


def for_method(data: dict[str, Any], method: str) -> dict[str, Any]:
    """A config file without `method:` (one file for every method, as configs/paper/<size>.yaml) as `method`
    reads it: the fields that method does not use left out, so each method's run is what its own file gave."""
    return {k: v for k, v in data.items() if k not in unused_fields(method)} | {"method": method}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON file's mapping of fields; one line naming the file when it is missing or not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or "not valid YAML"
        raise ValueError(f"config file {str(path)!r} is not valid YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise ValueError(f"config file {str(path)!r} is not text (YAML or JSON)") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of field: value")
    return data


def load_config(path: str | Path, **overrides: Any) -> TrainConfig:
    """A TrainConfig from a YAML or JSON file, plus overrides. A file without `method:` serves every method
    (`for_method`): the method comes from the overrides, else the default."""
    data = read_config_file(path)
    try:
        if "method" not in data:
            method = overrides.get("method") or TrainConfig.method
            if method not in METHODS:
                raise ValueError(f"config field method={method!r} is invalid: allowed one of {sorted(METHODS)}")
            data = for_method(data, method)
        return make_config(data, **overrides)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def validate_config(c: TrainConfig) -> None:
    """Raise ValueError naming the first bad field and what is allowed: each field's kind, then what
    depends on several fields."""
    try:
        _validate(c)
    except ValueError as e:
        raise ValueError(f"config field {e}") from None


def _validate(c: TrainConfig) -> None:
    for f in fields(c):
        kind: Kind = f.metadata["kind"]
        check(kind.check(getattr(c, f.name)), f.name, getattr(c, f.name), kind.describe())
    longest = PRESETS[c.preset]["max_seq_len"]
    check(c.seq_len <= longest, "seq_len", c.seq_len, f"an int in [2, {longest}] for preset {c.preset}")
    check(c.launcher != "sim" or c.workers <= MAX_LOCAL_WORKERS, "workers", c.workers,
          f"an int in [1, {MAX_LOCAL_WORKERS}] with the sim launcher (threads of one process); "
          "more with --launcher torchrun over several nodes")
    check(c.node_rank < c.nnodes, "node_rank", c.node_rank, f"an int in [0, nnodes - 1 = {c.nnodes - 1}]")
    if c.launcher == "torchrun":
        nproc = c.ranks_per_node
        check(nproc * c.nnodes == c.workers, "nproc_per_node", c.nproc_per_node,
              f"nproc_per_node * nnodes == workers ({c.workers})")
        check(nproc <= MAX_LOCAL_WORKERS, "workers" if c.nproc_per_node is None else "nproc_per_node", nproc,
              f"at most {MAX_LOCAL_WORKERS} ranks per node (--nnodes spreads them)")
        check(c.nnodes == 1 or c.rdzv_endpoint is not None, "rdzv_endpoint", c.rdzv_endpoint,
              "host:port of node 0 when nnodes > 1")
    validate_hparams(c.resolved_optimizer())
