"""A training run's configuration: plain data, checked when it is made, hashed to key results.

    cfg = TrainConfig(method="lordo", preset="tiny", workers=4, steps=300)
    cfg = load_config("configs/paper/720m.yaml", method="lordo", steps=1000)   # file + overrides

Fields split in two: what determines the result (hashed: two configs with the same hash give
the same run) and how it is executed (`EXECUTION_FIELDS`: launcher, device, output place...).
Each field carries its help text and its `Kind` (how text is read, what is allowed): the one
source of `lordo train --help`, of parsing command-line and config-file values, and of
validation. The optimizer's fields come from its option table (`lordo.optim.OPTIONS`), one field
per row.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import field, fields
from pathlib import Path
from typing import Any

import yaml

from lordo.kinds import Kind, check, choice, flag, integer, number, read_bool, text
from lordo.model import PRESETS
from lordo.optim import DEFAULTS, METHODS, OPTIONS, validate_hparams
from lordo.optim.options import Option, earlier_behaviour, later_options

SCHEDULES = ("cosine", "wsd", "constant")
LAUNCHERS = ("sim", "torchrun")
EXECUTION_FIELDS = ("launcher", "nproc_per_node", "nnodes", "node_rank", "rdzv_endpoint", "device",
                    "out", "runs_dir", "checkpoint_every", "progress")
# Optimizer options added after runs were cached under the config hash: in the hash key only when
# set (their resolved values are in it anyway, under resolved_optimizer), so every earlier config
# keeps its hash.
LATER_OPTIMIZER_FIELDS = later_options()
# Optimizer options added after runs were cached, with the behaviour every earlier run had: at
# that value they stay out of the resolved key too (a later change of the default still changes
# the hash).
IMPLICIT_BEFORE = earlier_behaviour()
MAX_LOCAL_WORKERS = 256   # threads (sim) or processes (torchrun) on one machine


def option(name: str, type_: str, default: Any, kind: Kind, help: str
           ) -> tuple[str, str, dataclasses.Field]:
    """A TrainConfig field with its kind and help text."""
    return name, type_, field(default=default, metadata={"kind": kind, "help": help})


def optimizer_field(o: Option) -> tuple[str, str, dataclasses.Field]:
    """The TrainConfig field of an optimizer option: None (the default) takes the optimizer's
    default, unless the field has a default of its own."""
    # the type as written (`lordo train` makes a bool field a --x / --no-x switch)
    type_ = "bool" if o.kind.read is read_bool else {
        "rank": "int | float", "omega": "float", "betas": "tuple[float, float]"}.get(
        o.name, type(o.default).__name__)
    if o.config_default is not None:
        return option(o.name, type_ + " | None" * bool(o.kind.none), o.config_default, o.kind,
                      o.help)
    shown = ",".join(map(str, o.default)) if isinstance(o.default, tuple) else o.default
    none = o.kind.none or f"lordo.optim.DEFAULTS: {shown}"
    return option(o.name, type_ + " | None", None, dataclasses.replace(o.kind, none=none), o.help)


# ---------------------------------------------------------------------- the config
class _TrainConfigMethods:
    def __post_init__(self) -> None:
        for f in fields(self):
            setattr(self, f.name, f.metadata["kind"].parse(getattr(self, f.name)))
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)
        validate_config(self)

    def optimizer_hparams(self) -> dict[str, Any]:
        """The optimizer hyper-parameters this config sets (the rest keep lordo.optim.DEFAULTS)."""
        hp = {k: getattr(self, k) for k in DEFAULTS
              if hasattr(self, k) and getattr(self, k) is not None}
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
        """Every field that determines the result, set or not: what a run directory's saved config
        is compared with (result_dict, the hash key, leaves LATER_OPTIMIZER_FIELDS out at None to
        keep earlier hashes)."""
        return {k: v for k, v in self.to_dict().items() if k not in EXECUTION_FIELDS}

    def resolved_optimizer(self) -> dict[str, Any]:
        """Every optimizer hyper-parameter this run uses: its own, else the package defaults."""
        hp = {**DEFAULTS, **self.optimizer_hparams()}
        if hp["omega"] is None:
            hp["omega"] = METHODS[self.method].omega
        return hp

    def hash(self) -> str:
        """Key of the result: the fields plus what they resolve to (optimizer defaults, the
        model's shape), so a changed package default is a new run, not a stale cached one."""
        resolved = {k: v for k, v in self.resolved_optimizer().items()
                    if k not in IMPLICIT_BEFORE or v != IMPLICIT_BEFORE[k]}
        key = {**self.result_dict(), "resolved_optimizer": resolved, "model": PRESETS[self.preset]}
        text = json.dumps(key, sort_keys=True, default=list)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def replace(self, **changes: Any) -> TrainConfig:
        return make_config(self.to_dict(), **changes)

    @property
    def ranks_per_node(self) -> int:
        """torchrun's local ranks on each node."""
        return self.nproc_per_node or self.workers // self.nnodes

    @property
    def tokens_per_step(self) -> int:
        return self.workers * self.batch_size * self.grad_accum * self.seq_len


TrainConfig = dataclasses.make_dataclass("TrainConfig", [
    # what is trained, on what
    option("method", "str", "lordo", choice(sorted(METHODS)),
           "optimization method (README: Methods)"),
    option("preset", "str", "tiny", choice(sorted(PRESETS)), "model size (README: Training runs)"),
    option("corpus", "str", "shakespeare",
           text("shakespeare, brown, ptb, hf:<name>[:<config>] or files:<glob>"),
           "training corpus (data/README.md)"),
    option("tokenizer", "str", "bpe",
           text("bpe (trained on the corpus), byte, gpt2 or a Hugging Face name"), "tokenizer"),
    option("vocab_size", "int", 8192, integer(256),
           "vocabulary of the trained BPE (other tokenizers bring their own)"),
    option("corpus_tokens", "int | None", None, integer(1, none="all of a local corpus"),
           "prepare at most this many training tokens (required for hf: corpora)"),
    option("seed", "int", 0, integer(0, 2**32 - 1),
           "seed of the initialization, the data order and the projections"),
    # batch and length
    option("workers", "int", 4, integer(1), "M: simulated threads or torchrun ranks"),
    option("steps", "int", 300, integer(1), "optimizer steps"),
    option("batch_size", "int", 8, integer(1), "sequences per worker per micro-step"),
    option("grad_accum", "int", 1, integer(1), "micro-steps per optimizer step"),
    option("seq_len", "int", 128, integer(2),
           "tokens per sequence (at most the preset's max_seq_len)"),
    option("bf16", "bool", False, flag(), "bf16 autocast (CPU and CUDA)"),
    # schedule
    option("lr", "float", 3e-3, number(0, open_low=True), "peak learning rate"),
    option("schedule", "str", "cosine", choice(SCHEDULES),
           "warmup then cosine | warmup-stable-decay | constant"),
    option("warmup", "int", 20, integer(0), "linear warmup steps"),
    option("min_lr_ratio", "float", 0.1, number(0, 1), "final lr / peak lr (cosine and wsd)"),
    option("decay_fraction", "float", 0.2, number(0, 1, open_low=True),
           "wsd: last fraction of steps that decays"),
    # the optimizer: one field per option of lordo.optim.OPTIONS (the rows of lr and seed are the
    # config's own fields above)
    *(optimizer_field(o) for o in OPTIONS.values() if o.in_config),
    # evaluation and logging
    option("eval_every", "int", 50, integer(1),
           "steps between evaluations (local methods: at the next synchronization)"),
    option("eval_batches", "int | None", 16, integer(1, none="the whole split"),
           "validation batches per worker per evaluation"),
    option("log_every", "int", 10, integer(1), "steps between metrics rows"),
    # execution (not hashed)
    option("launcher", "str", "sim", choice(LAUNCHERS),
           "sim: workers as threads of one process; torchrun: processes"),
    option("nproc_per_node", "int | None", None, integer(1, none="workers / nnodes"),
           "torchrun ranks on this node"),
    option("nnodes", "int", 1, integer(1), "torchrun nodes"),
    option("node_rank", "int", 0, integer(0), "this node's rank among nnodes (torchrun)"),
    option("rdzv_endpoint", "str | None", None,
           text("host:port", r"[^\s:]+:\d{1,5}", none="single node"),
           "rendezvous of node 0 (torchrun, nnodes > 1)"),
    option("device", "str", "auto",
           text("auto, cpu, cuda, cuda:<index> or mps", r"auto|cpu|mps|cuda(:\d+)?"),
           "auto: cuda if available, else cpu"),
    option("out", "str | None", None,
           text("a directory path", none="<runs_dir>/<method>-<preset>-<hash>"), "run directory"),
    option("runs_dir", "str | None", None,
           text("a directory path", none="$LORDO_RUNS_DIR or <repo>/runs"),
           "where runs without --out go"),
    option("checkpoint_every", "int", 0, integer(0),
           "steps between checkpoints (0: only at a stop and at the end)"),
    option("progress", "bool", True, flag(), "show a progress bar"),
], bases=(_TrainConfigMethods,), namespace={
    "__module__": __name__,
    "__doc__": "Everything a run needs. Optimizer fields left at None take the optimizer's "
               "defaults."})


def field_help(f: dataclasses.Field) -> str:
    """A field's help line: what it is, its default and what is allowed."""
    kind: Kind = f.metadata["kind"]
    if f.default is None:
        return (f"{f.metadata['help']} (default: none, meaning {kind.none}; allowed: "
                f"{kind.allowed}, or none)")
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
    """The optimizer fields `method` never reads: rank, omega and moments of a full-rank method,
    sync_every of a method that all-reduces every step, proj_every of all but lowrank_ddp."""
    m = METHODS[method]
    unused = {"rank": not m.lowrank, "omega": not m.lowrank, "moments_on_refresh": not m.lowrank,
              "sync_every": not m.local, "proj_every": m.projection != "gradient"}
    return tuple(k for k, drop in unused.items() if drop)


def for_method(data: dict[str, Any], method: str) -> dict[str, Any]:
    """A config file without `method:` (one file for every method, as configs/paper/<size>.yaml)
    as `method` reads it: the fields that method does not use left out, so each method's run is
    what its own file gave."""
    return {k: v for k, v in data.items() if k not in unused_fields(method)} | {"method": method}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON file's mapping of fields; one line naming the file when it is missing or not
    one."""
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
    """A TrainConfig from a YAML or JSON file, plus overrides. A file without `method:` serves
    every method (`for_method`): the method comes from the overrides, else the default."""
    data = read_config_file(path)
    try:
        if "method" not in data:
            method = overrides.get("method") or TrainConfig.method
            if method not in METHODS:
                raise ValueError(f"config field method={method!r} is invalid: allowed one of "
                                 f"{sorted(METHODS)}")
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
    check(c.seq_len <= longest, "seq_len", c.seq_len,
          f"an int in [2, {longest}] for preset {c.preset}")
    check(c.launcher != "sim" or c.workers <= MAX_LOCAL_WORKERS, "workers", c.workers,
          f"an int in [1, {MAX_LOCAL_WORKERS}] with the sim launcher (threads of one process); "
          "more with --launcher torchrun over several nodes")
    check(c.node_rank < c.nnodes, "node_rank", c.node_rank,
          f"an int in [0, nnodes - 1 = {c.nnodes - 1}]")
    if c.launcher == "torchrun":
        nproc = c.ranks_per_node
        check(nproc * c.nnodes == c.workers, "nproc_per_node", c.nproc_per_node,
              f"nproc_per_node * nnodes == workers ({c.workers})")
        check(nproc <= MAX_LOCAL_WORKERS,
              "workers" if c.nproc_per_node is None else "nproc_per_node", nproc,
              f"at most {MAX_LOCAL_WORKERS} ranks per node (--nnodes spreads them)")
        check(c.nnodes == 1 or c.rdzv_endpoint is not None, "rdzv_endpoint", c.rdzv_endpoint,
              "host:port of node 0 when nnodes > 1")
    validate_hparams(c.resolved_optimizer())
