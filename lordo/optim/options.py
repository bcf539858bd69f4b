"""The optimizer's options, one row each: default, kind (type and range), help text, and the
release of the config hash from which the option is in the hash's key.

Everything else is derived from `OPTIONS`: `DEFAULTS`, `validate_hparams`, `TrainConfig`'s
optimizer fields with their command-line help (`lordo.config`), and the hash's compatibility
with runs cached before an option existed (`later_options`, `earlier_behaviour`). A new option is
one row here (and the code that reads it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lordo.kinds import Kind, check, choice, flag, integer, number
from lordo.optim.methods import Method
from lordo.projection import PROJ_METHODS

MOMENT_RULES = ("keep", "reset", "rotate")
# What a local method's Q is computed from at a synchronization: the (averaged) pseudo-gradient,
# as the paper, or the (averaged) clipped gradient of the step that ends the interval, as
# lowrank_ddp's refresh; the latter costs one more full-size all-reduce of the matrices per sync
# (global methods) and exists to measure what the pseudo-gradient's projection costs (notebook 05).
PROJ_SOURCES = ("pseudo_gradient", "gradient")
# The size of the full-rank QH term (1 - omega) full: `mean_denom` is the spec's reading of the
# paper, full = G^ / mean(D), an unnormalized gradient step (its size grows with the lr and the
# gradient's share outside span(Q)); `update_rms` gives it the low-rank update's RMS,
# full = G^ ||u_hat / D|| / ||G^||, so the term changes the update's direction, not its size
# (notebook 06 compares them).
QH_SCALES = ("mean_denom", "update_rms")
# Optimizer states averaged over workers at a synchronization (every `average_moments_every`-th),
# as DES-LOC and MT-DAO average them at their own periods: the low-rank moments u, v (r x q per
# matrix, in the shared Q's basis), the full-rank parameters' AdamW moments (twice their size), or
# both. Each costs its bytes (`comm_stats`).
MOMENT_AVERAGING = ("none", "lowrank", "adamw", "all")
# What each worker's error-feedback buffer does at a synchronization: kept (the spec), averaged
# over workers (one more full-size all-reduce of the matrices), reset to zero, or re-projected onto
# the new Q (only the part the new subspace can express is carried into the next step).
EF_ON_SYNC = ("keep", "average", "reset", "reproject")
NONFINITE_RULES = ("raise", "skip", "off")
STATE_DTYPES = {"float32": None, "bfloat16": torch.bfloat16}   # None: the parameters' own dtype
# float64 makes sums of up to a few fp32 values exact, hence independent of the backend's
# reduction order: bit-reproducible across launchers at twice the bytes.
COMM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
               "float64": torch.float64}


def is_rank(v: Any) -> bool:
    """An int rank >= 1, or a float fraction of min(p, q) in (0, 1]."""
    return not isinstance(v, bool) and (isinstance(v, int) and v >= 1
                                        or isinstance(v, float) and 0 < v <= 1)


def read_rank(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


RANK = Kind(read_rank, is_rank, "an int >= 1, or a float fraction of min(p, q) in (0, 1]")
BETAS = Kind(lambda t: [float(b) for b in t.split(",")],
             lambda v: isinstance(v, tuple | list) and len(v) == 2
             and all(isinstance(b, int | float) and 0 <= b < 1 for b in v),
             "two numbers in [0, 1), as 0.9,0.95")

# The releases of the config hash. A run's hash keys its cached results, so an option added
# later must leave every earlier config's hash as it was: such an option is in the key only when
# a config sets it, and its resolved value only when it differs from `earlier`, the behaviour
# every run before it had (if there is one).
FIRST_RELEASE = 1      # the options of the first cached runs
# release 2 (2026-11-29): proj_iters, nonfinite, bucket_mb; release 3 (2026-11-30): qh_scale;
# release 4 (2026-12-08, issue 28): mu, average_moments(_every), ef_on_sync, fullrank_lr_scale
NO_EARLIER = object()


@dataclass(frozen=True)
class Option:
    """One optimizer option. `config_default`: TrainConfig's default (None: the optimizer's
    default), `in_config=False`: the config has a field of its own by that name (lr, seed)."""

    name: str
    default: Any
    kind: Kind
    help: str
    since: int = FIRST_RELEASE      # the config hash's release from which it is in the key
    earlier: Any = NO_EARLIER       # the behaviour of runs before `since`
    config_default: Any = None
    in_config: bool = True
    per_group: bool = False         # may differ per param group


OPTIONS: dict[str, Option] = {o.name: o for o in (   # TrainConfig's (and `--help`'s) order
    Option("lr", 1e-3, number(0), "learning rate", in_config=False, per_group=True),
    Option("seed", 0, integer(0), "seed of the projections' sketches and of stochastic rounding",
           in_config=False),
    Option("rank", 0.25, RANK, "rank r of the low-rank matrices", per_group=True),
    Option("sync_every", 16, integer(1),
           "K_x: local steps between synchronizations (local methods)"),
    Option("omega", None, number(0, 1, none="the method's own: 0.7 for lordo, else 1"),
           "weight of the low-rank momentum in the quasi-hyperbolic step", per_group=True),
    Option("weight_decay", 0.0, number(0), "decoupled weight decay", per_group=True),
    Option("betas", (0.9, 0.95), BETAS, "Adam's beta1,beta2", per_group=True),
    Option("eps", 1e-8, number(0, open_low=True), "Adam's epsilon", per_group=True),
    Option("clip", 1.0, number(0, open_low=True, none="no clipping"),
           "global gradient-norm clip", config_default=1.0),
    Option("error_feedback", True, flag(),
           "keep the low-rank projection's residual and add it back"),
    Option("moments_on_refresh", "keep", choice(MOMENT_RULES),
           "what the moments do when Q changes"),
    Option("proj_method", "power", choice(PROJ_METHODS), "how the projection Q is computed"),
    Option("proj_every", 200, integer(1), "steps between projection refreshes (lowrank_ddp)"),
    Option("proj_iters", 1, integer(1),
           "power iterations of ComputeProjection (proj_method power or randomized)", since=2),
    Option("proj_source", "pseudo_gradient", choice(PROJ_SOURCES),
           "what Q is computed from: pseudo_gradient (the paper) | gradient "
           "(diagnostic: +1 all-reduce per sync)"),
    Option("qh_scale", "mean_denom", choice(QH_SCALES),
           "size of the full-rank QH term: mean_denom (G^ / mean(D), the spec) | update_rms "
           "(the low-rank update's RMS)", since=3, earlier="mean_denom"),
    Option("mu", 1.0, number(0, open_low=True),
           "the paper's scaling factor mu: the full-rank QH term is divided by it", since=4,
           earlier=1.0),
    Option("average_moments", "none", choice(MOMENT_AVERAGING),
           "optimizer moments averaged over workers at synchronizations: none | lowrank (u, v) | "
           "adamw (the full-rank parameters') | all", since=4, earlier="none"),
    Option("average_moments_every", 1, integer(1),
           "average the moments at every n-th synchronization", since=4, earlier=1),
    Option("ef_on_sync", "keep", choice(EF_ON_SYNC),
           "each worker's error feedback at a synchronization: keep | average | reset | "
           "reproject (onto the new Q)", since=4, earlier="keep"),
    # in a low-rank method, the full-rank (AdamW) parameters' lr as a fraction of the matrices'
    # (the spec gives "the rest" plain AdamW and leaves its lr open; GaLore's recipes scale the
    # two apart)
    Option("fullrank_lr_scale", 1.0, number(0, 1000, open_low=True),
           "low-rank methods: the full-rank (AdamW) parameters' lr / lr", since=4, earlier=1.0),
    Option("outer_lr", 1.0, number(0, open_low=True),
           "outer learning rate at synchronizations (local methods)"),
    Option("outer_momentum", 0.0, number(0, 1, open_high=True),
           "outer Nesterov momentum at synchronizations (local methods)"),
    Option("comm_dtype", "float32", choice(tuple(COMM_DTYPES)), "dtype of what is communicated"),
    Option("state_dtype", "float32", choice(tuple(STATE_DTYPES)),
           "storage dtype of the moments and error feedback (README: Memory)"),
    Option("host_anchor", False, flag(),
           "keep the anchor copy in host memory, on the device only at syncs"),
    Option("nonfinite", "raise", choice(NONFINITE_RULES),
           "a non-finite gradient: raise naming the parameter | skip the step (counted) | "
           "off (no check)", since=2),
    Option("bucket_mb", 64.0, number(0, open_low=True),
           "MiB per communication bucket (one collective each)", since=2),
    Option("diagnostics", False, flag(),
           "record subspace diagnostics at synchronizations (sync.jsonl)", config_default=True),
)}

# Documented defaults (README "Decisions"); `omega=None` means the method's own.
DEFAULTS: dict[str, Any] = {name: o.default for name, o in OPTIONS.items()}
GROUP_KEYS = tuple(name for name, o in OPTIONS.items() if o.per_group)
# The memory options alone and together (benchmarks/optimizer_step.py, notebook 04).
MEMORY_OPTIONS: dict[str, dict[str, Any]] = {
    "float32 (default)": {}, "bf16 state": dict(state_dtype="bfloat16"),
    "host anchor": dict(host_anchor=True),
    "bf16 state + host anchor": dict(state_dtype="bfloat16", host_anchor=True),
}


def later_options() -> tuple[str, ...]:
    """Options added after the first cached runs: in a config's hash key only when set."""
    return tuple(name for name, o in OPTIONS.items() if o.since > FIRST_RELEASE)


def earlier_behaviour() -> dict[str, Any]:
    """Later options whose value every earlier run had: at it, out of the resolved key too."""
    return {name: o.earlier for name, o in OPTIONS.items() if o.earlier is not NO_EARLIER}


def check_for_method(hp: dict[str, Any], method: Method) -> None:
    """Raise ValueError naming an option's value that `method` cannot honour."""
    check(method.lowrank or hp["fullrank_lr_scale"] == 1, "fullrank_lr_scale",
          hp["fullrank_lr_scale"],
          f"1 for {method.name} (every parameter is full-rank there: set lr)")
    averaged = hp["average_moments"] != "none" or hp["ef_on_sync"] in ("average", "reproject")
    check(not averaged or hp["state_dtype"] == "float32", "state_dtype", hp["state_dtype"],
          "'float32' with average_moments or ef_on_sync average / reproject (their bfloat16 "
          "storage would round to nearest, not stochastically)")
    check(hp["average_moments"] == "none" or hp["comm_dtype"] != "float16", "comm_dtype",
          hp["comm_dtype"], "'float32', 'bfloat16' or 'float64' with average_moments (second "
          "moments underflow in float16)")
    if method.projection == "local":   # each worker's low-rank state is in its own Q's basis
        check(hp["average_moments"] in ("none", "adamw"), "average_moments", hp["average_moments"],
              "'none' or 'adamw' with lordo_local (its workers' low-rank moments are in different "
              "bases)")
        check(hp["ef_on_sync"] != "average", "ef_on_sync", hp["ef_on_sync"],
              "'keep', 'reset' or 'reproject' with lordo_local (its workers' projections differ)")


def validate_hparams(hp: dict[str, Any]) -> None:
    """Raise ValueError naming the first bad hyper-parameter and what is allowed."""
    unknown = sorted(set(hp) - set(OPTIONS))
    check(not unknown, "hyper-parameter", unknown[0] if unknown else None,
          f"one of {sorted(OPTIONS)}")
    for name, value in hp.items():
        kind = OPTIONS[name].kind
        check(kind.check(value), name, value, kind.describe())
