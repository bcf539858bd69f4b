"""LoRDO and every method the paper compares, as one drop-in `torch.optim.Optimizer`.

    opt = lordo.make_optimizer("lordo", model, comm=comm, lr=3e-3, rank=8, sync_every=16)
    for x, y in batches:
        model(x, y)[1].backward()
        opt.step()          # local step; every `sync_every` steps also the synchronization
        opt.zero_grad()
    opt.finish()            # end on the averaged model

One worker's view: with `comm=None` it is an ordinary single-process optimizer (M = 1); with a
communicator (`lordo.comm`) it talks to the other M - 1 workers itself, so no DDP wrapper is
needed. The algorithm is `../shared/spec/lordo-method.md`; `lordo/reference.py` is a plain
transcription of it that the tests hold this implementation to.

Methods (`METHODS`): `ddp` and `lowrank_ddp` all-reduce gradients every step; `local_adam`,
`lordo_local`, `lordo_global` and `lordo` take local steps and average parameters every
`sync_every` steps. Low-rank methods give each 2-D weight ("matrix") a low-rank Adam step with
error feedback in a projection Q, plus for `lordo` a full-rank quasi-hyperbolic term; every
other parameter takes AdamW with the same betas.

How the low-rank step stays cheap. Same-shape matrices of a param group share stacked state (no
per-parameter host syncs). Error feedback is kept lazily: while Q is fixed, Q^T E = 0 after every
step, so the low-rank gradient is just Q^T G and the buffer only needs R += G; the true
E = (I - Q Q^T) R is formed when Q changes. That is two rank-r matmuls a step instead of three, with
the same arithmetic as the spec's recurrence. Each matrix's full-size tensors are visited twice a
step, in their stored layouts: Q^T G (on a CPU beside the clip's norm of G: `_project_and_norm`), then one
sweep that adds G to R and -lr Q N (weight decay as the product's beta) and the QH term to W
(`_apply_lowrank_`). On a one-thread CPU a visit goes by blocks of rows that stay in cache between
its operations, so from memory G is read twice and R and W once each read and written: 6 full-size
passes, against 7 for fused AdamW (one pass after another, as before, made 10, 12 with weight decay).
On a CPU in float32 both visits, and the low-rank moments between them, run in compiled kernels
(`lordo.kernels`, built on first use; `fused=False` keeps the eager path, `fused=True` insists on the
kernels): each reads a matrix from memory once and computes its rank-r product in registers on the way,
where the eager path's BLAS products and element-wise passes read it separately (a quarter off the step).
Their sums go in a fixed order, so their results do not depend on the thread count or the instruction set;
they round differently from the eager path in the last bits.

Memory options. `state_dtype="bfloat16"` stores every moment (low-rank and AdamW) and the error
feedback in bfloat16: the arithmetic stays in the parameters' precision (float32 or wider) and only
what is kept between steps is rounded, stochastically (`stochastic_round_`), so the rounding adds
noise but no bias to the error feedback's running sums. The random bits come from (seed, step, and
for local methods the worker's rank), so simulated and torchrun runs and resumed ones stay
bit-identical and gradient-all-reduce replicas identical. The error feedback is
then kept eagerly (E itself, one more rank-r matmul a step): the lazy R grows with every step
between refreshes and its rounding noise with it. `host_anchor=True` keeps the local methods'
anchor copy (and outer momentum) in host memory, pinned on GPUs, and copies it to the device only
inside `sync()`; on CPU it already is host memory. `memory_stats()` says which bytes are where.
"""

from __future__ import annotations

import itertools
import math
import time
import warnings
from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lordo.comm import disable_ddp_allreduce
from lordo.kernels import build_error, calibrated, lowrank_cpu
from lordo.projection import (
    PROJ_METHODS,
    basis_similarity,
    compute_projection,
    energy_outside,
    extend_basis,
    is_transposed,
    oriented,
    visited_rank,
)


@dataclass(frozen=True)
class Method:
    """How a method steps and communicates."""

    name: str
    lowrank: bool       # matrices take the low-rank step (else AdamW everywhere)
    local: bool         # local steps + parameter averaging every sync_every (else gradient all-reduce)
    projection: str     # where Q comes from: "" | "gradient" | "global" | "local"
    omega: float        # default weight of the low-rank momentum (1: no full-rank term)
    summary: str
    label: str          # display name in tables and figures


METHODS: dict[str, Method] = {m.name: m for m in (   # in this order in every table and figure
    Method("ddp", False, False, "", 1.0, "AdamW, all-reduce of gradients every step", "DDP"),
    Method("lowrank_ddp", True, False, "gradient", 1.0,
           "low-rank Adam + EF, Q from the all-reduced gradient every proj_every steps", "low-rank DDP"),
    Method("local_adam", False, True, "", 1.0, "local AdamW, parameters averaged every sync_every (DiLoCo)",
           "Local AdamW (DiLoCo)"),
    Method("lordo_local", True, True, "local", 1.0, "low-rank Adam + EF, each worker's Q from its own update",
           "LoRDO, local Q"),
    Method("lordo_global", True, True, "global", 1.0, "low-rank Adam + EF, shared Q from the averaged update",
           "LoRDO, global Q (ω = 1)"),
    Method("lordo", True, True, "global", 0.7, "lordo_global + full-rank quasi-hyperbolic term (omega < 1)",
           "LoRDO"),
)}
# Documented defaults (README "Decisions"); `omega=None` means the method's own.
DEFAULTS: dict[str, Any] = dict(
    lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, rank=0.25, sync_every=16, omega=None,
    clip=1.0, error_feedback=True, moments_on_refresh="keep", proj_method="power", proj_every=200,
    proj_iters=1, proj_source="pseudo_gradient", qh_scale="mean_denom", mu=1.0, average_moments="none",
    average_moments_every=1, ef_on_sync="keep", fullrank_lr_scale=1.0, outer_lr=1.0, outer_momentum=0.0,
    comm_dtype="float32",
    nonfinite="raise", diagnostics=False, seed=0, bucket_mb=64.0, state_dtype="float32", host_anchor=False,
)
# The memory options alone and together (benchmarks/optimizer_step.py, notebook 04).
MEMORY_OPTIONS: dict[str, dict[str, Any]] = {
    "float32 (default)": {}, "bf16 state": dict(state_dtype="bfloat16"), "host anchor": dict(host_anchor=True),
    "bf16 state + host anchor": dict(state_dtype="bfloat16", host_anchor=True),
}
GROUP_KEYS = ("lr", "betas", "eps", "weight_decay", "rank", "omega")   # may differ per param group
MOMENT_RULES = ("keep", "reset", "rotate")
# What a local method's Q is computed from at a synchronization: the (averaged) pseudo-gradient, as the paper,
# or the (averaged) clipped gradient of the step that ends the interval, as lowrank_ddp's refresh; the latter
# costs one more full-size all-reduce of the matrices per sync (global methods) and exists to measure what
# the pseudo-gradient's projection costs (notebook 05).
PROJ_SOURCES = ("pseudo_gradient", "gradient")
# The size of the full-rank QH term (1 - omega) full: `mean_denom` is the spec's reading of the paper,
# full = G^ / mean(D), an unnormalized gradient step (its size grows with the lr and the gradient's share outside
# span(Q)); `update_rms` gives it the low-rank update's RMS, full = G^ ||u_hat / D|| / ||G^||, so the term
# changes the update's direction, not its size (notebook 06 compares them).
QH_SCALES = ("mean_denom", "update_rms")
# Optimizer states averaged over workers at a synchronization (every `average_moments_every`-th), as DES-LOC and
# MT-DAO average them at their own periods: the low-rank moments u, v (r x q per matrix, in the shared Q's basis),
# the full-rank parameters' AdamW moments (twice their size), or both. Each costs its bytes (`comm_stats`).
MOMENT_AVERAGING = ("none", "lowrank", "adamw", "all")
# What each worker's error-feedback buffer does at a synchronization: kept (the spec), averaged over workers (one
# more full-size all-reduce of the matrices), reset to zero, or re-projected onto the new Q (only the part the
# new subspace can express is carried into the next step).
EF_ON_SYNC = ("keep", "average", "reset", "reproject")
# `fullrank_lr_scale`: in a low-rank method, the full-rank (AdamW) parameters' lr as a fraction of the matrices'
# (the spec gives "the rest" plain AdamW and leaves its lr open; GaLore's recipes scale the two apart).
NONFINITE_RULES = ("raise", "skip", "off")
# Diagnostics at a sync: each matrix's update coherence, whole and inside / outside span(Q) (`_record_coherence`),
# and one record (this `param`) for the full-rank parameters together.
COHERENCE_FIELDS = ("coherence", "coherence_in_span", "coherence_outside")
FULL_RANK_RECORD = "(full-rank parameters)"
STATE_DTYPES = {"float32": None, "bfloat16": torch.bfloat16}   # None: the parameters' own dtype
# float64 makes sums of up to a few fp32 values exact, hence independent of the backend's
# reduction order: bit-reproducible across launchers at twice the bytes.
COMM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
               "float64": torch.float64}


def check(ok: bool, name: str, value: Any, allowed: str) -> None:
    """Raise the one-line ValueError naming a bad value and what is allowed, unless ok."""
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: allowed {allowed}")


def is_rank(v: Any) -> bool:
    """An int rank >= 1, or a float fraction of min(p, q) in (0, 1]."""
    return not isinstance(v, bool) and (isinstance(v, int) and v >= 1 or isinstance(v, float) and 0 < v <= 1)


def validate_hparams(hp: dict[str, Any]) -> None:
    """Raise ValueError naming the first bad hyper-parameter and what is allowed."""
    unknown = sorted(set(hp) - set(DEFAULTS))
    check(not unknown, "hyper-parameter", unknown[0] if unknown else None, f"one of {sorted(DEFAULTS)}")
    lr, betas, rank = hp["lr"], hp["betas"], hp["rank"]
    check(isinstance(lr, int | float) and lr >= 0 and math.isfinite(lr), "lr", lr, "a finite number >= 0")
    check(isinstance(betas, tuple | list) and len(betas) == 2 and all(0 <= b < 1 for b in betas),
           "betas", betas, "two numbers in [0, 1)")
    check(hp["eps"] > 0, "eps", hp["eps"], "> 0")
    check(hp["weight_decay"] >= 0, "weight_decay", hp["weight_decay"], ">= 0")
    check(is_rank(rank), "rank", rank, "an int >= 1, or a float fraction of min(p, q) in (0, 1]")
    check(isinstance(hp["sync_every"], int) and hp["sync_every"] >= 1, "sync_every", hp["sync_every"], "an int >= 1")
    check(hp["omega"] is None or 0 <= hp["omega"] <= 1, "omega", hp["omega"], "a number in [0, 1]")
    check(hp["clip"] is None or hp["clip"] > 0, "clip", hp["clip"], "None (off) or a number > 0")
    check(hp["moments_on_refresh"] in MOMENT_RULES, "moments_on_refresh", hp["moments_on_refresh"], str(MOMENT_RULES))
    check(hp["proj_method"] in PROJ_METHODS, "proj_method", hp["proj_method"], str(PROJ_METHODS))
    check(isinstance(hp["proj_every"], int) and hp["proj_every"] >= 1, "proj_every", hp["proj_every"], "an int >= 1")
    check(isinstance(hp["proj_iters"], int) and hp["proj_iters"] >= 1, "proj_iters", hp["proj_iters"], "an int >= 1")
    check(hp["proj_source"] in PROJ_SOURCES, "proj_source", hp["proj_source"], str(PROJ_SOURCES))
    check(hp["qh_scale"] in QH_SCALES, "qh_scale", hp["qh_scale"], str(QH_SCALES))
    check(isinstance(hp["mu"], int | float) and hp["mu"] > 0 and math.isfinite(hp["mu"]), "mu", hp["mu"],
          "a finite number > 0")
    check(hp["average_moments"] in MOMENT_AVERAGING, "average_moments", hp["average_moments"],
          str(MOMENT_AVERAGING))
    check(isinstance(hp["average_moments_every"], int) and hp["average_moments_every"] >= 1,
          "average_moments_every", hp["average_moments_every"], "an int >= 1")
    check(hp["ef_on_sync"] in EF_ON_SYNC, "ef_on_sync", hp["ef_on_sync"], str(EF_ON_SYNC))
    scale = hp["fullrank_lr_scale"]
    check(isinstance(scale, int | float) and 0 < scale <= 1e3, "fullrank_lr_scale", scale, "a number in (0, 1000]")
    check(hp["outer_lr"] > 0, "outer_lr", hp["outer_lr"], "> 0")
    check(0 <= hp["outer_momentum"] < 1, "outer_momentum", hp["outer_momentum"], "a number in [0, 1)")
    check(hp["comm_dtype"] in COMM_DTYPES, "comm_dtype", hp["comm_dtype"], str(tuple(COMM_DTYPES)))
    check(hp["nonfinite"] in NONFINITE_RULES, "nonfinite", hp["nonfinite"], str(NONFINITE_RULES))
    check(hp["bucket_mb"] > 0, "bucket_mb", hp["bucket_mb"], "> 0")
    check(hp["state_dtype"] in STATE_DTYPES, "state_dtype", hp["state_dtype"], str(tuple(STATE_DTYPES)))
    check(isinstance(hp["host_anchor"], bool), "host_anchor", hp["host_anchor"], "True or False")


def stochastic_round_(out: torch.Tensor, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Store `x` in bfloat16 `out`, rounded up with probability (x - lower) / (upper - lower), so
    E[out] = x: 16 uniform random bits are added below bfloat16's last mantissa bit of float32 x, then
    those bits are cut off (sign-magnitude: the same for negative x)."""
    bits = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, generator=gen, device=x.device)
    bits.add_(x.to(torch.float32).view(torch.int32)).bitwise_and_(-(1 << 16))
    return out.copy_(bits.view(torch.float32))


# The low-rank step's math on one matrix as its weight is stored (q x p when `transposed`: the oriented matrix
# is its .mT). Every full-size tensor is read and written in its own contiguous layout, and each product is
# computed with its operands as stored (MKL is slower on products of two transposed operands). On a CPU with
# one intra-op thread (lordo's workers, a shared machine) the passes over a matrix go block by block of rows
# (`CPU_BLOCK` entries), so that a block of G, W and R read by one operation is still in the core's cache for
# the next. Threaded, each operation costs a fork and join of the threads, which on a loaded machine cost more
# than the blocks save (benchmarks/README.md); there, and on a GPU, each pass is taken whole. (The compiled
# kernels replace these functions on CPU in float32: lordo/csrc/lowrank_cpu.cpp.)
CPU_BLOCK = 1 << 17


def _block_rows(X: torch.Tensor) -> int:
    if X.device.type != "cpu" or torch.get_num_threads() > 1:
        return X.shape[0]
    return max(1, CPU_BLOCK // X.shape[-1])


def _project(out: torch.Tensor, Q: torch.Tensor, X: torch.Tensor, transposed: bool) -> torch.Tensor:
    """out (r, q) = Q^T X for the oriented X (p, q), given X as stored; also batched over a leading dim."""
    if transposed:
        return torch.matmul(X, Q, out=out.mT)    # X stored q x p: (X^T)^T Q = (Q^T X)^T
    return torch.matmul(Q.mT, X, out=out)


def _project_and_norm(out: torch.Tensor, Q: torch.Tensor, G: torch.Tensor, transposed: bool) -> torch.Tensor:
    """`_project` and the norm of G, by blocks of G's rows: the norm reads each block again from cache."""
    rows, norms = _block_rows(G), []
    if transposed:         # a block of G's stored rows gives the same rows of (Q^T G)^T
        for g, o in zip(G.split(rows), out.mT.split(rows)):
            torch.mm(g, Q, out=o)
            norms.append(torch.linalg.vector_norm(g))
    else:                  # a block's share of the sum over Q's rows (beta 0: out's old values ignored)
        for k, (g, q) in enumerate(zip(G.split(rows), Q.split(rows))):
            out.addmm_(q.mT, g, beta=1.0 if k else 0.0)
            norms.append(torch.linalg.vector_norm(g))
    return torch.linalg.vector_norm(torch.stack(norms))


def _back_project_(W: torch.Tensor, Q: torch.Tensor, N: torch.Tensor, transposed: bool, alpha: float,
                   beta: float = 1.0) -> torch.Tensor:
    """W <- beta W + alpha Q N in place, W (oriented p x q) given as stored: one pass over W."""
    if transposed:
        return W.addmm_(N.mT, Q.mT, beta=beta, alpha=alpha)
    return W.addmm_(Q, N, beta=beta, alpha=alpha)


def _apply_lowrank_(W: torch.Tensor, G: torch.Tensor, Q: torch.Tensor, N: torch.Tensor, transposed: bool, *,
                    lr: float, decay: float, qh: torch.Tensor | None, ef: torch.Tensor | None) -> None:
    """The full-size part of one matrix's step, W, G and R as stored: the lazy error feedback R += G, then
    W <- decay W - lr Q N (weight decay folded into the product's beta) + qh G (the full-rank QH term).
    Block by block of rows, so the second reads of G and W come from cache rather than memory."""
    rows = _block_rows(W)
    # the rows of Q N for a block of W's stored rows: Q's rows, or for W stored as (Q N)^T = N^T Q^T, N^T's rows
    factors = ((n, Q.mT) for n in N.mT.split(rows)) if transposed else ((q, N) for q in Q.split(rows))
    efs = ef.split(rows) if ef is not None else itertools.repeat(None)
    for w, g, e, (a, b) in zip(W.split(rows), G.split(rows), efs, factors):
        if e is not None:
            e.add_(g)
        w.addmm_(a, b, beta=decay, alpha=-lr)
        if qh is not None:
            w.addcmul_(g, qh)


# A module whose name contains one of these is an embedding; one named like these is an output head.
EMBEDDING_MARKS = ("emb", "wte", "wpe", "shared")
HEAD_NAMES = ("lm_head", "score", "classifier", "head", "output", "embed_out", "qa_outputs")
# galore-torch's group keys: `rank` is honoured (see LoRDO); these have no LoRDO counterpart.
GALORE_KEYS = {
    "update_proj_gap": "LoRDO refreshes Q at every synchronization (lowrank_ddp: every proj_every steps); "
                       "drop the key (or pass proj_every=N to the optimizer)",
    "scale": "LoRDO has no update scale; drop the key and fold the factor into the group's lr",
    "proj_type": "LoRDO always projects the smaller side (galore's 'std'); drop the key",
}


def _galore_key_error(key: str, value: Any) -> ValueError:
    return ValueError(f"galore-torch key {key}={value!r} is not supported: {GALORE_KEYS[key]}")


def full_rank_reasons(named: Iterable[tuple[str, torch.Tensor]], model: nn.Module | None = None) -> dict[int, str]:
    """Which 2-D parameters are not low-rank matrices, and why: {id(param): reason}.

    The one rule, from a module (its layers and names) or from parameter names alone:
    * embeddings: `nn.Embedding` weights, or names whose module contains "emb", "wte", "wpe", "shared";
    * tied weights: one tensor under two names (e.g. an embedding reused as the output layer);
    * output heads: a 2-D weight with the vocabulary (the largest embedding's size) as its output
      dimension, a module named like a head (`lm_head`, `score`, `classifier`, ...), and (given the
      module) its last `nn.Linear` outside its repeated blocks (`nn.ModuleList`), e.g. a 2 x 64
      classification head whatever its name. Weights inside the repeated blocks (given names only: a
      numbered module in the name) are never heads by size (an MLP's 4 x width side may equal the
      vocabulary); transformers' `Conv1D` (GPT-2) stores its weight in x out: its output dimension is its
      second.
    """
    if model is not None:
        named = list(model.named_parameters(remove_duplicate=False))
    else:
        named = list(named)
    module_of = lambda name: name.rsplit(".", 1)[0] if "." in name else ""
    names_of: dict[int, list[str]] = {}
    for name, p in named:
        names_of.setdefault(id(p), []).append(name)
    reasons: dict[int, str] = {}
    if model is not None:
        embeddings = {id(m.weight): m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)}
        in_blocks = {id(p) for m in model.modules() if isinstance(m, nn.ModuleList) for p in m.parameters()}
        linears = [m.weight for m in model.modules() if isinstance(m, nn.Linear) and id(m.weight) not in in_blocks]
        last = linears[-1] if linears else None
        in_x_out = {id(m.weight) for m in model.modules() if type(m).__name__ == "Conv1D"}
    else:
        # a numbered module in the name (h.3.mlp.c_proj) is a repeated block's, as nn.ModuleList names them
        in_blocks = {id(p) for name, p in named if any(part.isdigit() for part in name.split("."))}
        in_x_out = set()
        embeddings = {id(p): p.shape[0] for name, p in named if p.ndim == 2
                      and any(mark in module_of(name).rsplit(".", 1)[-1].lower() for mark in EMBEDDING_MARKS)}
        last = None
    vocab = max(embeddings.values(), default=None)
    for name, p in named:
        if p.ndim != 2 or id(p) in reasons:
            continue
        leaf = module_of(name).rsplit(".", 1)[-1]
        if id(p) in embeddings:
            reasons[id(p)] = "embedding"
        elif len(names_of[id(p)]) > 1:
            reasons[id(p)] = f"tied: {' = '.join(names_of[id(p)])}"
        elif (id(p) not in in_blocks and p.shape[id(p) in in_x_out] == vocab) or leaf in HEAD_NAMES or p is last:
            reasons[id(p)] = "output head"
    return reasons


def split_params(model: nn.Module) -> list[dict[str, Any]]:
    """Param groups: low-rank matrices (2-D weights of the blocks) and the rest (AdamW).

    The rest: everything `full_rank_reasons` names (embeddings, tied weights, output heads),
    norms and biases (anything not 2-D). Frozen parameters are left out.
    """
    excluded = full_rank_reasons((), model)
    matrices: dict[str, nn.Parameter] = {}
    rest: dict[str, nn.Parameter] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            (matrices if p.ndim == 2 and id(p) not in excluded else rest)[name] = p
    return [dict(params=list(ps.values()), param_names=list(ps), lowrank=lowrank)
            for ps, lowrank in ((matrices, True), (rest, False)) if ps]


def resolve_rank(rank: int | float, shape: tuple[int, ...], name: str) -> int:
    """Rank for one p x q matrix: an int as given, or a fraction of min(p, q)."""
    small = min(shape)
    r = max(1, round(rank * small)) if isinstance(rank, float) else rank
    if not 1 <= r <= small:
        raise ValueError(f"rank={rank!r} is invalid for parameter {name!r} of shape {tuple(shape)}: "
                         f"allowed an int in [1, {small}] or a float fraction in (0, 1]")
    return r


@dataclass
class _Bucket:
    """Same-shape matrices of one param group, oriented so p <= q, with stacked state."""

    group: dict[str, Any]
    indices: list[int]              # positions in LoRDO.params
    transposed: list[bool]          # weight stored q x p: its oriented view is .mT
    shape: tuple[int, int]          # oriented (p, q), p <= q
    rank: int
    Q: torch.Tensor | None = None   # (n, p, r)
    ef: torch.Tensor | None = None  # (n, p, q) lazy error feedback R; the true E is (I - Q Q^T) R
    exp_avg: torch.Tensor | None = None      # (n, r, q)
    exp_avg_sq: torch.Tensor | None = None   # (n, r, q)
    step: int = 0                   # the moments' step count k
    fresh: bool = False             # Q changed since the last step: project R, not only G
    projected: bool = False         # work holds Q^T G of this step's gradients, taken beside their norms
    explored: list[torch.Tensor] | None = field(default=None)  # diagnostics: union basis per matrix
    visits: torch.Tensor | None = None  # diagnostics: (n, p, p) sum of Q Q^T over refreshes
    qh_ratio: list[float] | None = None  # diagnostics: QH term's size / low-rank term's, the step before a sync
    coherence: list[list[float]] | None = None  # diagnostics: per matrix, COHERENCE_FIELDS at the last sync
    work: torch.Tensor | None = None  # (n, r, q) workspace of the step: no (n, p, q) temporaries
    compiled: bool = False          # eligible for the compiled CPU kernels (float32 on CPU, fused not False)
    calibration: dict[str, Any] | None = None   # fused=None: seconds per step of each path, and whether cached


def _time_step_paths(method: str, hparams: dict[str, Any], stored: tuple[int, int], n: int,
                     repeats: int = 3) -> dict[str, float]:
    """Seconds per local step of n random matrices stored with this shape (the bucket's path alone: no other
    parameters), with the compiled kernels and eager: the best of `repeats` each, taking turns, after two
    untimed steps (the first computes the projection)."""
    gen = torch.Generator().manual_seed(0)
    opts = {}
    for path, fused in (("kernels", True), ("eager", False)):
        params = [(torch.randn(stored, generator=gen) * 0.02).requires_grad_() for _ in range(n)]
        for p in params:    # global norm 0.5: under a clip of 1 the gradients stay as they are
            p.grad = torch.randn(stored, generator=gen) * (0.5 / math.sqrt(n * p.numel()))
        with warnings.catch_warnings():   # under torchrun: that this optimizer has no communicator (it needs none)
            warnings.simplefilter("ignore")
            opts[path] = LoRDO([{"params": params, "lowrank": True}], method, fused=fused, **hparams)
        for _ in range(2):
            opts[path].step()
    best = dict.fromkeys(opts, math.inf)
    for _ in range(repeats):
        for path, opt in opts.items():
            t0 = time.perf_counter()
            opt.step()
            best[path] = min(best[path], time.perf_counter() - t0)
    return best


def _zeros_like_weights(p: torch.Tensor, n: int, rows: int, cols: int, transposed: bool,
                        dtype: torch.dtype) -> torch.Tensor:
    """Zeros of oriented shape (n, rows, cols) on p's device, stored (n, cols, rows) and viewed .mT if the
    weights are stored transposed."""
    return p.new_zeros(n, cols, rows, dtype=dtype).mT if transposed else p.new_zeros(n, rows, cols, dtype=dtype)


class _StateView(MutableMapping):
    """`LoRDO.state`: parameter -> its state, AdamW's own dicts and views into the stacked buckets."""

    def __init__(self, opt: LoRDO):
        self._opt = opt

    def __getitem__(self, p: torch.Tensor) -> dict[str, Any]:
        opt = self._opt
        if not opt._initialized:            # no state yet (torch's optimizers: an empty dict)
            return {}
        if p in opt._adamw_state:           # only AdamW parameters are kept here: the step's fast path
            return opt._adamw_state[p]
        i = next((i for i, q in enumerate(opt.params) if q is p), None)
        if i is None:
            raise KeyError(p)
        out: dict[str, Any] = {}
        for b in opt.buckets:
            if i in b.indices:
                j = b.indices.index(i)
                out |= {"step": b.step, "exp_avg": b.exp_avg[j], "exp_avg_sq": b.exp_avg_sq[j]}
                out |= {"Q": b.Q[j]} if b.Q is not None else {}
                out |= {"error_feedback_accum": b.ef[j]} if b.ef is not None else {}
        if opt.method.local:
            out["anchor"] = opt._anchor[i]
        return out

    def __setitem__(self, p: torch.Tensor, value: dict[str, Any]) -> None:
        self._opt._adamw_state[p] = value

    def __delitem__(self, p: torch.Tensor) -> None:
        del self._opt._adamw_state[p]

    def __iter__(self):
        return iter(self._opt.params if self._opt._initialized else ())

    def __len__(self) -> int:
        return len(self._opt.params) if self._opt._initialized else 0


class LoRDO(torch.optim.Optimizer):
    """One worker's optimizer for any method in `METHODS` (see the module docstring).

    `params`: parameters, `model.named_parameters()`, or param groups (with or without
    `param_names`). Per-group hyper-parameters: lr, betas, eps, weight_decay, rank, omega and
    `lowrank`. Which 2-D parameters are low-rank matrices, first rule that applies:
    1. a group's `lowrank` (True/False);
    2. galore-torch style: if some group gives `rank`, the groups that give it (and no others);
    3. `full_rank_reasons`, from `model` if given, else from the parameters' names; parameters
       without names (and no `model`) are low-rank if 2-D, with one warning listing them.
    galore's other group keys are refused (`GALORE_KEYS` says why). Everything else in `DEFAULTS`
    is global. Parameters without a gradient (`grad=None`, frozen ones) are left untouched, as by
    torch's optimizers. Accounting: `comm_stats()`, `memory_stats()`, `projection_seconds`,
    `comm_seconds`; subspace diagnostics with `diagnostics=True`: `pop_diagnostics()`. `lowrank_names`: the
    low-rank matrices. `finish()` ends a distributed run on the averaged model. `model`: the module
    the parameters belong to, for the rule and, distributed, to broadcast rank 0's parameters before
    its first forward (without it: at the first step, after the first gradients).
    `fused`: None (default) runs the low-rank step's full-size work in the compiled CPU kernels
    (`lordo.kernels`) where they apply (float32 on CPU; the same results at any thread count, and the eager
    path's to the last bits) and, per shape, measure faster than the eager path on this CPU (timed at the
    first step, then cached: `lordo.kernels.calibrated`; `step_paths()` says which path each shape takes),
    warning once and running eagerly if they cannot be built; True requires them; False never builds them.

    Distributed, the first step checks that the workers' gradients differ: equal ones mean that
    something (DDP) already averaged them, which is refused. Set `refuse_averaged_gradients = False`
    on the optimizer for runs that feed every worker the same data on purpose.
    """

    refuse_averaged_gradients = True

    def __init__(self, params: Iterable[Any], method: str = "lordo", comm: Any = None, *,
                 model: nn.Module | None = None, fused: bool | None = None, **hparams: Any):
        if method not in METHODS:
            raise ValueError(f"method={method!r} is unknown: allowed {sorted(METHODS)}")
        self.method = METHODS[method]
        for key in GALORE_KEYS:
            if key in hparams:
                raise _galore_key_error(key, hparams[key])
        hp = {**DEFAULTS, **hparams}
        validate_hparams(hp)
        if hp["omega"] is None:
            hp["omega"] = self.method.omega
        hp["betas"] = tuple(hp["betas"])
        check(self.method.lowrank or hp["fullrank_lr_scale"] == 1, "fullrank_lr_scale", hp["fullrank_lr_scale"],
              f"1 for {method} (every parameter is full-rank there: set lr)")
        if self.method.projection == "local":   # each worker's low-rank state is in its own Q's basis
            check(hp["average_moments"] in ("none", "adamw"), "average_moments", hp["average_moments"],
                  "'none' or 'adamw' with lordo_local (its workers' low-rank moments are in different bases)")
            check(hp["ef_on_sync"] != "average", "ef_on_sync", hp["ef_on_sync"],
                  "'keep', 'reset' or 'reproject' with lordo_local (its workers' projections differ)")
        self.hparams = hp
        self.comm = comm
        self.world_size = comm.world_size if comm is not None else 1
        self._model = model
        check(fused is None or isinstance(fused, bool), "fused", fused, "None, True or False")
        self.fused = fused
        self._kernels: Any = None      # lordo.kernels.lowrank_cpu(), for the buckets that can use it
        self._explicit_rank: list[bool] = []       # per group: whether it gave `rank` itself (galore style)
        self._initialized = False
        super().__init__(params, {k: hp[k] for k in GROUP_KEYS} | {"lowrank": None})
        self._layout()
        if self.method.local and comm is None and dist.is_available() and dist.is_initialized() \
                and dist.get_world_size() > 1:
            warnings.warn(f"lordo: torch.distributed runs {dist.get_world_size()} processes but this {method!r} "
                          "optimizer has no communicator, so it never synchronizes (under DDP it steps on averaged "
                          "gradients: no local steps); pass comm=lordo.comm.DistComm()", stacklevel=2)
        self.steps = 0             # optimizer steps taken (skipped ones included)
        self.skipped_steps = 0     # steps skipped for a non-finite gradient (nonfinite="skip")
        self.refreshes = 0         # projection computations (each seeds its randomized sketch)
        self.projection_seconds = 0.0
        self.comm_seconds = 0.0    # time inside collectives (waiting for other workers included)
        self.diagnostics_bytes = 0  # payload of the diagnostics' own all-reduces (not in comm_stats)
        self.synced = False        # whether the last step() ended with a synchronization
        self._comm_log: dict[str, list[int]] = {}   # kind -> [collectives, payload bytes]
        self._diagnostics: list[dict[str, Any]] = []
        self._sync_grads: list[torch.Tensor] | None = None   # proj_source="gradient": the sync step's gradients
        # this step's per-parameter gradient norms before the clip and the clip's factor (qh_scale="update_rms")
        self._clip_norms: tuple[list[torch.Tensor], float | torch.Tensor] | None = None
        self._aligned = False      # every worker holds rank 0's parameters (the initial broadcast is done)
        if model is not None and self.world_size > 1:
            self._align_before_first_forward(model)

    # ------------------------------------------------------------------ layout
    def _layout(self) -> None:
        """Names, which 2-D parameters are low-rank (see the class docstring), and the buckets."""
        hp = self.hparams
        for g in self.param_groups:
            validate_hparams(hp | {k: g[k] for k in GROUP_KEYS})
        self.params: list[torch.Tensor] = [p for g in self.param_groups for p in g["params"]]
        model_names = {}
        if self._model is not None:
            for name, p in self._model.named_parameters():
                model_names.setdefault(id(p), name)
        self.names: list[str] = []
        named: list[tuple[str, torch.Tensor]] = []     # the parameters whose names are known
        for gi, g in enumerate(self.param_groups):
            given = g.get("param_names")
            for j, p in enumerate(g["params"]):
                name = given[j] if given else model_names.get(id(p))
                self.names.append(name or f"group{gi}.param{j}")
                if name:
                    named.append((name, p))
        for name, p in zip(self.names, self.params):
            if type(p).__name__ == "DTensor" or type(getattr(p, "data", None)).__name__ == "DTensor":
                raise ValueError(f"lordo: parameter {name!r} is a DTensor shard (FSDP2 fully_shard or tensor "
                                 "parallel), but lordo projects and averages whole matrices on every worker: pass "
                                 "the unsharded model, or wrapped in DistributedDataParallel (README: Distributed "
                                 "checkpoints and sharding)")
            if p.is_complex():
                raise ValueError(f"parameter {name!r} is {p.dtype}: allowed real parameters (torch.view_as_real "
                                 "makes a complex one real)")
        reasons = full_rank_reasons(named, self._model)
        galore = any(self._explicit_rank)
        self._lowrank: list[bool] = []
        unnamed: list[str] = []
        i = 0
        for gi, g in enumerate(self.param_groups):
            for p in g["params"]:
                if g["lowrank"] is not None:
                    low = g["lowrank"]
                elif galore:
                    low = self._explicit_rank[gi]
                else:
                    low = id(p) not in reasons
                    if low and p.ndim == 2 and self._model is None and not g.get("param_names"):
                        unnamed.append(f"{self.names[i]} {tuple(p.shape)}")
                # a matrix with no elements has nothing to compress: it stays full-rank
                self._lowrank.append(bool(low) and self.method.lowrank and p.ndim == 2 and p.numel() > 0)
                i += 1
        if unnamed and self.method.lowrank:
            warnings.warn("lordo: parameters were passed without names, so only their shape decided; low-rank: "
                          f"{', '.join(unnamed)}. Pass model.named_parameters(), groups with 'param_names', or "
                          "model=... to keep embeddings and output heads full-rank", stacklevel=3)
        self.lowrank_names = [n for n, low in zip(self.names, self._lowrank) if low]
        self._plan()

    def _plan(self) -> None:
        """Sort parameters into AdamW ones and buckets of same-shape low-rank matrices."""
        self.full: list[int] = []
        self.buckets: list[_Bucket] = []
        by_key: dict[tuple, _Bucket] = {}
        i = 0
        for gi, g in enumerate(self.param_groups):
            for p in g["params"]:
                if self._lowrank[i]:
                    transposed = is_transposed(p.shape)
                    shape = (min(p.shape), max(p.shape))
                    rank = resolve_rank(g["rank"], tuple(p.shape), self.names[i])
                    key = (gi, shape, rank, p.dtype, p.device, transposed)   # one storage layout a bucket
                    if key not in by_key:
                        by_key[key] = _Bucket(g, [], [], shape, rank)
                        self.buckets.append(by_key[key])
                    by_key[key].indices.append(i)
                    by_key[key].transposed.append(transposed)
                else:
                    self.full.append(i)
                i += 1
        group_of = [g for g in self.param_groups for _ in g["params"]]
        self._full_by_group = [(g, [i for i in self.full if group_of[i] is g]) for g in self.param_groups]
        self._full_by_group = [(g, idx) for g, idx in self._full_by_group if idx]

    def _init_state(self) -> None:
        """Allocate state on the parameters' devices (lazily, like torch's optimizers)."""
        ef, sd = self.hparams["error_feedback"], STATE_DTYPES[self.hparams["state_dtype"]]
        for i in self.full:
            p = self.params[i]
            self.state[p] = {"exp_avg": torch.zeros_like(p, dtype=sd), "exp_avg_sq": torch.zeros_like(p, dtype=sd)}
        for b in self.buckets:
            p0 = self.params[b.indices[0]]
            n, (rows, cols), dt = len(b.indices), b.shape, sd or p0.dtype
            # oriented (n, r, q) moments and workspace and (n, p, q) error feedback, laid out like the weights:
            # the full-size passes are contiguous and Q^T G is a product of operands as they are stored
            t = b.transposed[0]
            b.exp_avg = _zeros_like_weights(p0, n, b.rank, cols, t, dt)
            b.exp_avg_sq = _zeros_like_weights(p0, n, b.rank, cols, t, dt)
            b.work = _zeros_like_weights(p0, n, b.rank, cols, t, p0.dtype)
            b.ef = _zeros_like_weights(p0, n, rows, cols, t, dt) if ef else None
            b.compiled = self.fused is not False and p0.device.type == "cpu" and dt == p0.dtype == torch.float32
        if self.fused is not False and any(b.compiled for b in self.buckets):
            self._kernels = lowrank_cpu()
            if self._kernels is None and self.fused:
                raise RuntimeError(f"lordo: fused=True, but the CPU kernels could not be built: {build_error()}")
            if self.fused is None:   # the faster path for each shape on this CPU
                for b in self.buckets:
                    if b.compiled and self._kernels is not None:
                        b.calibration = self._calibrate(b)
                        b.compiled = b.calibration["kernels"] <= b.calibration["eager"]
                if self.world_size > 1:   # worker 0's paths everywhere: replicas that step alike stay bit-identical
                    chosen = torch.tensor([float(b.compiled) for b in self.buckets], device=self.params[0].device)
                    self.comm.broadcast_(chosen, src=0)   # once, a few bytes: not in comm_stats
                    for b, kernels in zip(self.buckets, chosen.tolist()):
                        b.compiled = b.calibration is not None and kernels > 0
                if not any(b.compiled for b in self.buckets):
                    self._kernels = None
        elif self.fused and self.buckets:
            raise ValueError("lordo: fused=True needs float32 low-rank matrices on CPU with state_dtype='float32' "
                             "(on a GPU or in other dtypes the step runs its eager path: use fused=None)")
        if self.method.local:
            self._anchor = [self._held(p) for p in self.params]
            self._outer_m = ([self._held(torch.zeros_like(p)) for p in self.params]
                             if self.hparams["outer_momentum"] > 0 else None)
        self._adam_steps = 0
        self._adam_step_t = torch.zeros((), dtype=torch.float32, device=self.params[0].device)
        self._initialized = True

    def _align(self) -> None:
        """Like DDP, every worker starts from rank 0's parameters (one broadcast, counted): before the
        model's first forward when the optimizer knows the model, else at the first step. Not after
        loading a checkpoint of a started run, whose workers may legitimately differ; a state_dict
        round trip before the first step (as accelerate does) does not skip it."""
        if self.world_size > 1:
            self._collective([p.data for p in self.params], "initial_broadcast", self.params[0].dtype,
                             broadcast=True)
            if self.method.local and self._initialized:
                torch._foreach_copy_(self._anchor, self.params)
        self._aligned = True

    def _align_before_first_forward(self, model: nn.Module) -> None:
        """So that the first gradients are computed at rank 0's parameters too, as under DDP."""
        def align(*_: Any) -> None:
            handle.remove()
            if not self._aligned:
                with torch.no_grad():
                    self._align()
        handle = model.register_forward_pre_hook(align)

    def _held(self, t: torch.Tensor) -> torch.Tensor:
        """A copy of `t` for state used only at synchronizations: in host memory (pinned for fast copies
        to a GPU) with host_anchor, else beside `t`."""
        if not self.hparams["host_anchor"]:
            return t.detach().clone()
        return torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda).copy_(t)

    def _rounding(self, stream: int) -> torch.Generator | None:
        """The random bits of stochastic rounding (state_dtype bfloat16), from (seed, worker rank, step,
        stream) alone: the same in simulated and torchrun runs and after a resume; None in float32.
        Methods that all-reduce gradients keep identical replicas, so their workers draw alike."""
        if STATE_DTYPES[self.hparams["state_dtype"]] is None:
            return None
        rank = self.comm.rank if self.comm is not None and self.method.local else 0
        gen = torch.Generator(device=self.params[0].device)
        gen.manual_seed((((self.hparams["seed"] * 1_000_003 + rank) * 1_000_003 + self.steps) * 1009 + stream)
                        % 2**63)
        return gen

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Works until the first step (or state_dict); after it, refused: the state of same-shape
        matrices is stacked and every worker keeps anchors, which new parameters cannot join
        consistently mid-run. Build a new optimizer with every group instead."""
        if self._initialized:
            raise RuntimeError("add_param_group after the optimizer's state exists (first step or state_dict) is "
                               "not supported: same-shape matrices share stacked state; add every group before "
                               "the first step or build a new optimizer")
        for key in GALORE_KEYS:
            if key in param_group and not (key == "proj_type" and param_group[key] == "std"):
                raise _galore_key_error(key, param_group[key])
        param_group = {k: v for k, v in param_group.items() if k != "proj_type"}
        self._explicit_rank.append("rank" in param_group)
        super().add_param_group(param_group)
        if hasattr(self, "params"):    # after construction: lay everything out again
            self._layout()

    @property
    def state(self) -> _StateView:
        """Every parameter's state, as torch's optimizers expose it: AdamW's dicts, and for a
        low-rank matrix views into its bucket (exp_avg, exp_avg_sq, Q, error_feedback_accum)."""
        return _StateView(self)

    @state.setter
    def state(self, value: dict) -> None:
        self._adamw_state = value

    # ------------------------------------------------------------------ communication
    def _all_reduce_mean(self, tensors: list[torch.Tensor], kind: str) -> None:
        """Average `tensors` over workers in place, in `comm_dtype`, in flat buckets; count bytes."""
        self._collective(tensors, kind, COMM_DTYPES[self.hparams["comm_dtype"]], broadcast=False)

    def _collective(self, tensors: list[torch.Tensor], kind: str, dtype: torch.dtype, broadcast: bool) -> None:
        if self.world_size == 1:   # nothing is sent, so nothing is counted
            return
        log = self._comm_log.setdefault(kind, [0, 0])
        log[0] += 1
        log[1] += sum(t.numel() for t in tensors) * dtype.itemsize
        device = tensors[0].device
        if device.type == "cuda":   # collectives are asynchronous there: time them from idle to idle
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        cap = max(1, int(self.hparams["bucket_mb"] * 2**20 / dtype.itemsize))
        start = 0
        while start < len(tensors):
            end, size = start, 0
            while end < len(tensors) and (size == 0 or size + tensors[end].numel() <= cap):
                size += tensors[end].numel()
                end += 1
            chunk = tensors[start:end]
            flat = torch.cat([t.reshape(-1).to(dtype) for t in chunk])
            if broadcast:
                self.comm.broadcast_(flat, src=0)
            else:
                self.comm.all_reduce_(flat)
                flat.div_(self.world_size)
            torch._foreach_copy_(chunk, [v.view_as(t) for v, t in zip(flat.split([t.numel() for t in chunk]), chunk)])
            start = end
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.comm_seconds += time.perf_counter() - t0

    def comm_stats(self) -> dict[str, Any]:
        """Payload bytes this worker sent, by kind and in total, and the ring wire factor 2(M-1)/M."""
        m = self.world_size
        total = sum(b for _, b in self._comm_log.values())
        return {
            "by_kind": {k: {"collectives": c, "payload_bytes": b} for k, (c, b) in self._comm_log.items()},
            "payload_bytes": total,
            "collectives": sum(c for c, _ in self._comm_log.values()),
            "ring_wire_factor": 2 * (m - 1) / m,
            "wire_bytes": total * 2 * (m - 1) / m,
            "per_sync_payload_bytes": self.sync_payload_bytes(),
        }

    def sync_payload_bytes(self) -> int:
        """Payload of one regular collective: a gradient all-reduce (with a has-gradient flag per tensor),
        or one parameter average."""
        flags = 0 if self.method.local else len(self.params)
        return (sum(p.numel() for p in self.params) + flags) * COMM_DTYPES[self.hparams["comm_dtype"]].itemsize

    def memory_stats(self, accelerator: bool | None = None) -> dict[str, int]:
        """Bytes of optimizer state on this worker, by kind (from shapes: valid before the first step),
        with `total` split into `device` (held in an accelerator's memory) and `host` (CPU memory).

        accelerator: whether the parameters live on an accelerator; None: as they are (a CPU run holds
        everything in host memory). True gives the split this optimizer would have on a GPU.
        """
        hp = self.hparams
        state = STATE_DTYPES[hp["state_dtype"]]

        def nbytes(i: int, kept: bool = False) -> int:   # kept: stored in state_dtype
            p = self.params[i]
            return p.numel() * (state.itemsize if kept and state is not None else p.element_size())
        item = lambda b, kept=True: len(b.indices) * (state.itemsize if kept and state is not None
                                                      else self.params[b.indices[0]].element_size())
        every = sum(map(nbytes, range(len(self.params))))
        local = self.method.local
        out = {
            "moments": 2 * sum(nbytes(i, True) for i in self.full)
            + sum(2 * item(b) * b.rank * b.shape[1] for b in self.buckets),
            "projection": sum(item(b, False) * b.shape[0] * b.rank for b in self.buckets),
            "error_feedback": sum(item(b) * b.shape[0] * b.shape[1] for b in self.buckets if hp["error_feedback"]),
            "anchor": every if local else 0,
            "outer_momentum": every if local and hp["outer_momentum"] else 0,
        }
        out["total"] = sum(out.values())
        on_accelerator = self.params[0].device.type != "cpu" if accelerator is None else accelerator
        off_device = out["anchor"] + out["outer_momentum"] if hp["host_anchor"] else 0
        out["device"] = out["total"] - off_device if on_accelerator else 0
        out["host"] = out["total"] - out["device"]
        return out

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._initialized:
            self._init_state()
        if not self._aligned:
            self._align()
        self.synced = False
        # A parameter without a gradient is untouched (torch.optim's rule): it steps with zeros where the
        # state is stacked and is restored afterwards. Every-step methods share who has one (as DDP does).
        present = [p.grad is not None for p in self.params]
        for name, p in zip(self.names, self.params):
            if p.grad is not None and p.grad.layout != torch.strided:
                raise ValueError(f"parameter {name!r} has a sparse gradient ({p.grad.layout}): allowed dense "
                                 "gradients (nn.Embedding(sparse=False), the default)")
        grads = [p.grad if has else torch.zeros_like(p) for p, has in zip(self.params, present)]
        if self.world_size > 1 and self.steps == 0 and self.refuse_averaged_gradients:
            self._check_not_averaged(grads)
        if not self.method.local:
            flags = torch.tensor(present, dtype=torch.float32, device=self.params[0].device)
            self._all_reduce_mean(grads + [flags], "gradients")
            present = (flags > 0).tolist()
        finite = self._finite_and_clipped(grads)
        self._refresh_before_step(grads, finite)
        if finite:
            self._adamw_step(grads, present)
            for b in self.buckets:
                missing = [j for j, i in enumerate(b.indices) if not present[i]]
                if len(missing) == len(b.indices):
                    continue
                kept = [t.clone() for t in self._bucket_rows(b, missing)]
                self._lowrank_step(b, [grads[i] for i in b.indices])
                if missing:
                    torch._foreach_copy_(self._bucket_rows(b, missing), kept)
        self.steps += 1
        if self.method.local and self.steps % self.hparams["sync_every"] == 0:
            if self.buckets and self.hparams["proj_source"] == "gradient":
                # a worker that skipped the step still joins the projection's all-reduce, with zeros
                self._sync_grads = grads if finite else [torch.zeros_like(g) for g in grads]
            # torch.optim's rule through the synchronization too: in one process nothing is averaged, so a
            # parameter without a gradient keeps its bits (anchor + (p - anchor) may differ from p in the last bit)
            alone = self.world_size == 1
            kept = {i: self.params[i].clone() for i, has in enumerate(present) if alone and not has}
            self.sync()
            for i, p in kept.items():
                self.params[i].copy_(p)
                self._anchor[i].copy_(p)
        return loss

    def _bucket_rows(self, b: _Bucket, rows: list[int]) -> list[torch.Tensor]:
        """The weights and state of some matrices of a bucket (views; clone to keep them)."""
        out = []
        for j in rows:
            out += [self.params[b.indices[j]], b.exp_avg[j], b.exp_avg_sq[j]] + ([b.ef[j]] if b.ef is not None else [])
        return out

    def _check_not_averaged(self, grads: list[torch.Tensor]) -> None:
        """Refuse gradients that someone else (DDP, accelerate, transformers.Trainer) already averaged:
        they are equal on every worker, so there would be no local steps. One 16-byte collective.
        The fingerprint is signed (not a norm, which clipping makes equal)."""
        sums = torch.stack([g.sum(dtype=torch.float64) for g in grads])
        fingerprint = torch.dot(sums, torch.arange(1, len(grads) + 1, dtype=torch.float64, device=sums.device))
        moments = torch.stack([fingerprint, fingerprint * fingerprint])
        self._collective([moments], "gradient_check", torch.float64, broadcast=False)
        mean, mean_sq = moments.tolist()
        if mean_sq > 0 and mean_sq - mean * mean <= 1e-12 * mean_sq:
            raise RuntimeError(
                f"lordo: the first gradients are identical on all {self.world_size} workers: something already "
                "averages them (DistributedDataParallel; accelerate or transformers.Trainer under torchrun), so "
                f"{self.method.name!r} would take no local steps and gradients would cross the network twice. Do not "
                "wrap the model, pass the DDP-wrapped model to make_optimizer, call "
                "lordo.comm.disable_ddp_allreduce(ddp_model), or use lordo.integrations.LoRDOTrainer")

    def _finite_and_clipped(self, grads: list[torch.Tensor]) -> bool:
        """Clip by the global norm in place; False if the step is to be skipped (non-finite)."""
        clip, rule = self.hparams["clip"], self.hparams["nonfinite"]
        for b in self.buckets:
            b.projected = False
        self._clip_norms = None
        if clip is None and rule == "off":
            return True
        norms = self._grad_norms(grads)
        total = torch.linalg.vector_norm(torch.stack(norms))
        self._clip_norms = (norms, 1.0)
        if rule == "off":   # no host sync: scale by a tensor factor (1 when the clip does not bite)
            self._clip_norms = (norms, (clip / (total + 1e-6)).clamp(max=1.0))
            self._scale_grads(grads, self._clip_norms[1])
            return True
        # The step's one host sync. Knowing the norm on the host also spares a step under the clip a
        # read and write of every gradient to multiply it by 1.
        total = total.item()
        if not math.isfinite(total):
            bad = next((repr(n) for n, g in zip(self.names, grads) if not torch.isfinite(g).all()),
                       "(every gradient is finite, their global norm overflowed)")
            if rule == "raise":
                raise FloatingPointError(f"non-finite gradient in parameter {bad} at step {self.steps}; "
                                         "nothing was updated (use nonfinite='skip' to skip such steps)")
            self.skipped_steps += 1
            return False
        if clip is not None and clip / (total + 1e-6) < 1.0:
            self._scale_grads(grads, clip / (total + 1e-6))
            self._clip_norms = (norms, clip / (total + 1e-6))
        return True

    def _grad_norms(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each gradient's norm. On a CPU, where the step will need Q^T G (Q unchanged since the last step,
        error feedback kept lazily or not at all), the product is taken in the same visit to G: it reads G
        from memory at the pace of its arithmetic, and the norm then reads it again from cache. The other
        gradients' norms: the kernels' where they run, else one multi-tensor norm (as on a GPU, which gains
        nothing from the above)."""
        norms: list[torch.Tensor | None] = [None] * len(grads)
        lazy = STATE_DTYPES[self.hparams["state_dtype"]] is None
        for b in self.buckets:
            if b.Q is None or b.fresh or b.work.device.type != "cpu" or not lazy and b.ef is not None:
                continue
            bucket_grads = [grads[i] for i in b.indices]
            if self._compiled(b, bucket_grads):
                for i, n in zip(b.indices, self._kernels.project_and_norm(b.work, b.Q, bucket_grads,
                                                                          b.transposed[0]).unbind(0)):
                    norms[i] = n
            else:
                for j, i in enumerate(b.indices):
                    norms[i] = _project_and_norm(b.work[j], b.Q[j], grads[i], b.transposed[j])
            b.projected = True
        rest = [i for i, n in enumerate(norms) if n is None]
        if rest:   # empty when every parameter is a low-rank matrix already projected (foreach refuses [])
            tensors = [grads[i] for i in rest]
            compiled = self._kernels is not None and all(
                t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors)
            # the kernels' run on every thread (torch's takes one a tensor: 16 ms for 125m's embedding)
            for i, n in zip(rest, self._kernels.norms(tensors).unbind(0) if compiled else torch._foreach_norm(tensors)):
                norms[i] = n
        return norms

    def _scale_grads(self, grads: list[torch.Tensor], factor: float | torch.Tensor) -> None:
        """The clip, in place: the gradients and the products already taken of them."""
        torch._foreach_mul_(grads, factor)
        for b in self.buckets:
            if b.projected:
                b.work.mul_(factor)

    def _adamw_step(self, grads: list[torch.Tensor], present: list[bool]) -> None:
        if not self.full:
            return
        self._adam_steps += 1
        k = self._adam_steps
        self._adam_step_t.fill_(k)
        gen = self._rounding(0)
        for g, idx in self._full_by_group:
            idx = [i for i in idx if present[i]]
            if not idx:
                continue
            params = [self.params[i] for i in idx]
            states = [self.state[p] for p in params]
            kept_m, kept_v = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
            m, v = kept_m, kept_v
            if gen is not None:      # low-precision state: the step on copies in the parameters' dtype
                m, v = [t.to(p.dtype) for t, p in zip(m, params)], [t.to(p.dtype) for t, p in zip(v, params)]
            (b1, b2), lr = g["betas"], g["lr"] * (self.hparams["fullrank_lr_scale"] if self.method.lowrank else 1)
            gs = [grads[i] for i in idx]
            if len({(p.device, p.dtype) for p in params}) == 1:    # torch's fused kernel: no temporaries
                torch._fused_adamw_(params, gs, m, v, [], [self._adam_step_t] * len(params), lr=lr, beta1=b1,
                                    beta2=b2, weight_decay=g["weight_decay"], eps=g["eps"], amsgrad=False,
                                    maximize=False)
            else:
                torch._foreach_lerp_(m, gs, 1 - b1)
                torch._foreach_mul_(v, b2)
                torch._foreach_addcmul_(v, gs, gs, value=1 - b2)
                denom = torch._foreach_sqrt(v)
                torch._foreach_div_(denom, math.sqrt(1 - b2**k))
                torch._foreach_add_(denom, g["eps"])
                if g["weight_decay"]:
                    torch._foreach_mul_(params, 1 - lr * g["weight_decay"])
                torch._foreach_addcdiv_(params, m, denom, value=-lr / (1 - b1**k))
            if gen is not None:
                for out, x in zip(kept_m + kept_v, m + v):
                    stochastic_round_(out, x, gen)

    def _lowrank_step(self, b: _Bucket, grads: list[torch.Tensor]) -> None:
        """Q^T G per matrix (usually taken already, beside the clip's norm: `_grad_norms`), the Adam step on
        the stacked r x q moments, then per matrix one sweep over G, R and W (`_apply_lowrank_`)."""
        g = b.group
        (b1, b2), lr, eps, omega = g["betas"], g["lr"], g["eps"], g["omega"]
        low = b.work
        gen = self._rounding(1 + self.buckets.index(b))
        stored = None if b.ef is None else b.ef.mT if b.transposed[0] else b.ef    # R (or E) as the weights
        ef = None if stored is None else list(stored.unbind(0))
        pending = ef is not None and gen is None     # lazy R += G, still to do (in the sweep below)
        if pending and b.fresh:      # Q^T R is 0 unless Q just changed: project R + G, not only G
            torch._foreach_add_(ef, grads)
            _project(low, b.Q, stored, b.transposed[0])
            pending = False
        elif ef is not None and gen is not None:     # low precision: E kept eagerly, rounded
            for j, x in enumerate(grads):
                A = ef[j].to(low.dtype).add_(x)                            # G + E
                _project(low[j], b.Q[j], A, b.transposed[j])
                _back_project_(A, b.Q[j], low[j], b.transposed[j], alpha=-1.0)   # E = A - Q Q^T A
                stochastic_round_(ef[j], A, gen)
        elif not b.projected or b.fresh:          # (a refresh since the clip's norms changed Q)
            for j, x in enumerate(grads):
                _project(low[j], b.Q[j], x, b.transposed[j])
        b.fresh = b.projected = False
        b.step += 1
        bc1, bc2 = 1 - b1**b.step, 1 - b2**b.step
        # the QH term's factor per matrix: -lr (1 - omega) / mean(D), or (update_rms) -lr (1 - omega) ||N|| / ||G^||
        # with N = u_hat / D (||Q N|| = ||N||: Q's columns are orthonormal); the low-rank part is omega N
        by_rms = omega < 1 and self.hparams["qh_scale"] == "update_rms"
        # the step before a synchronization records the QH term's size over the low-rank term's (diagnostics)
        record = omega < 1 and self.hparams["diagnostics"] and (self.steps + 1) % self.hparams["sync_every"] == 0
        compiled = self._compiled(b, grads)
        if compiled:   # the moments, sum(D) and ||u / D|| in one pass, leaving (omega / bc1) u / D in the workspace
            sums = self._kernels.adam_moments(b.exp_avg, b.exp_avg_sq, low, b1, b2, bc2, eps, omega / bc1)
            denom_mean, n_norm = sums[:, 0] / (low.shape[1] * low.shape[2]), sums[:, 1].sqrt()
        else:
            u, v = (b.exp_avg, b.exp_avg_sq) if gen is None else (b.exp_avg.to(low.dtype), b.exp_avg_sq.to(low.dtype))
            u.lerp_(low, 1 - b1)
            v.mul_(b2).addcmul_(low, low, value=1 - b2)
            if gen is not None:
                stochastic_round_(b.exp_avg, u, gen)
                stochastic_round_(b.exp_avg_sq, v, gen)
            denom = torch.div(v, bc2, out=low).sqrt_().add_(eps)    # D, in the workspace
            denom_mean = denom.mean(dim=(1, 2)) if omega < 1 and not by_rms else None
            torch.div(u, denom, out=low)                                      # u / D
            n_norm = torch.linalg.vector_norm(low, dim=(1, 2)) if by_rms or record else None
            low.mul_(omega / bc1)
        N = low     # (omega / bc1) u / D: omega N of the comment above
        grad_norms = self._clipped_norms(b, grads) if by_rms or record else None
        qh = None
        if by_rms:   # ||u_hat / D|| / ||G^||
            qh = n_norm / (bc1 * grad_norms.clamp(min=torch.finfo(N.dtype).tiny))
        elif omega < 1:
            qh = denom_mean.reciprocal()
        if qh is not None:
            qh.mul_(-lr * (1 - omega) / self.hparams["mu"])
        if record:   # |qh| ||G^|| / (lr ||omega N||)
            b.qh_ratio = (qh.abs() * grad_norms / (lr * n_norm * (omega / bc1))).tolist()
        decay = 1 - lr * g["weight_decay"]
        if compiled:
            self._kernels.apply_lowrank([self.params[i] for i in b.indices], grads, ef if pending else [], b.Q, N,
                                        b.transposed[0], lr, decay, [] if qh is None else qh.tolist())
            return
        for j, i in enumerate(b.indices):
            _apply_lowrank_(self.params[i], grads[j], b.Q[j], N[j], b.transposed[j], lr=lr, decay=decay,
                            qh=None if qh is None else qh[j], ef=ef[j] if pending else None)

    def _calibrate(self, b: _Bucket) -> dict[str, Any]:
        """Seconds per step of bucket b's shape with the kernels and eager on this CPU: measured on up to 4
        synthetic matrices of its shape at the first use (at the thread count then), then cached per CPU model,
        instruction set and shape, not per thread count: a run takes the same path, and so gets the same bits,
        with any number of threads."""
        stored = b.shape[::-1] if b.transposed[0] else b.shape
        n = min(len(b.indices), 4)
        hp = {**self.hparams, **{k: b.group[k] for k in GROUP_KEYS}, "rank": b.rank, "sync_every": 10**9,
              "diagnostics": False}
        case = (f"{self.method.name}: {n} x {stored[0]}x{stored[1]} rank {b.rank}, "
                + ", ".join(f"{k}={hp[k]}" for k in ("error_feedback", "omega", "qh_scale", "clip")))
        seconds, cached = calibrated(case, lambda: _time_step_paths(self.method.name, hp, stored, n))
        return {**seconds, "cached": cached}

    def step_paths(self) -> list[dict[str, Any]]:
        """Per bucket of same-shape low-rank matrices: the path its step runs ("kernels <instruction set>" or
        "eager"; None before the first step, which decides it) and why. With fused=None on a CPU in float32
        the faster of the two on this machine and shape (distributed: on worker 0's, for every worker), by
        `_calibrate`'s seconds per step (`kernels_ms`, `eager_ms`: this worker's; `cached`)."""
        out = []
        for b in self.buckets:
            row: dict[str, Any] = {"matrices": len(b.indices), "stored_shape": b.shape[::-1] if b.transposed[0]
                                   else b.shape, "rank": b.rank, "path": None, "why": "decided at the first step"}
            if self._initialized:
                kernels = b.compiled and self._kernels is not None
                row["path"] = f"kernels {self._kernels.set_isa()}" if kernels else "eager"
                if b.calibration is not None:
                    c = b.calibration
                    where = "on worker 0" if self.world_size > 1 else "here"
                    row |= {"why": f"fused=None: the faster {where}" + (" (cached)" if c["cached"] else ""),
                            "kernels_ms": 1e3 * c["kernels"], "eager_ms": 1e3 * c["eager"], "cached": c["cached"]}
                elif self.fused is not None:
                    row["why"] = f"fused={self.fused}"
                elif not b.compiled:
                    row["why"] = "the kernels take float32 matrices and state on CPU"
                else:
                    row["why"] = f"the kernels could not be built: {build_error()}"
            out.append(row)
        return out

    def _compiled(self, b: _Bucket, grads: list[torch.Tensor]) -> bool:
        """Whether this step of bucket b runs the compiled CPU kernels (lordo/csrc/lowrank_cpu.cpp)."""
        return (b.compiled and self._kernels is not None and all(g.is_contiguous() for g in grads)
                and all(self.params[i].is_contiguous() for i in b.indices))

    def _clipped_norms(self, b: _Bucket, grads: list[torch.Tensor]) -> torch.Tensor:
        """||G^|| of the bucket's matrices: the clip's norms times its factor when it took them, else one more
        read of each gradient."""
        if self._clip_norms is None:
            return torch.stack(torch._foreach_norm(grads))
        norms, factor = self._clip_norms
        return torch.stack([norms[i] for i in b.indices]).mul_(factor)

    # ------------------------------------------------------------------ projections
    def _refresh_before_step(self, grads: list[torch.Tensor], finite: bool) -> None:
        """First Q (every low-rank method) and lowrank_ddp's periodic refresh, from gradients."""
        if not self.buckets:
            return
        source, first = self.method.projection, self.buckets[0].Q is None
        if source == "global" and first:
            # Before the first sync there is no pseudo-gradient: one full-size all-reduce of the
            # matrices' gradients gives every worker the same first Q. A worker skipping a non-finite
            # step still takes part (with zeros), so the collective stays matched across workers.
            grads = [g.clone() if finite else torch.zeros_like(g) for g in grads]
            self._all_reduce_mean([grads[i] for b in self.buckets for i in b.indices], "first_projection")
        elif not finite or not (first or source == "gradient" and self.steps % self.hparams["proj_every"] == 0):
            return
        self._refresh(self._stacked(grads))

    def _stacked(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each bucket's matrices of `tensors` (indexed like self.params), oriented and stacked."""
        return [torch.stack([oriented(tensors[i], t) for i, t in zip(b.indices, b.transposed)])
                for b in self.buckets]

    def _refresh(self, sources: list[torch.Tensor], own: list[torch.Tensor] | None = None) -> None:
        """Set each bucket's Q to the top-r subspace of its stacked source; carry EF and moments.
        `own`: this worker's own pseudo-gradients before averaging (diagnostics only)."""
        hp = self.hparams
        for bi, (b, X) in enumerate(zip(self.buckets, sources)):
            if X.is_cuda:
                torch.cuda.synchronize(X.device)
            t0 = time.perf_counter()
            Q = compute_projection(X, b.rank, hp["proj_method"], prev=b.Q, iters=hp["proj_iters"],
                                   seed=(hp["seed"] * 1_000_003 + self.refreshes) * 1009 + bi)
            if X.is_cuda:
                torch.cuda.synchronize(X.device)
            self.projection_seconds += time.perf_counter() - t0
            if b.Q is not None and b.ef is not None and STATE_DTYPES[hp["state_dtype"]] is None:
                b.ef.baddbmm_(b.Q, b.Q.mT @ b.ef, alpha=-1)   # lazy R: materialize E = (I - Q_old Q_old^T) R
            if hp["diagnostics"]:
                self._record(b, Q, X, own[bi] if own is not None else None)
            if b.Q is not None:
                self._carry_moments(b, Q)
            b.Q = Q.contiguous()     # (the compiled kernels read it as stored)
            b.fresh = True
        self.refreshes += 1

    def _carry_moments(self, b: _Bucket, Q_new: torch.Tensor) -> None:
        rule = self.hparams["moments_on_refresh"]
        if rule == "reset":
            b.exp_avg.zero_()
            b.exp_avg_sq.zero_()
            b.step = 0
        elif rule == "rotate" and b.step > 0:
            # Transport u by C = Q_new^T Q_old; v through its variance (LDAdam's projection-aware
            # update): v' = bc2 * ((C*C) var + (C u_hat)^2), var = v_hat - u_hat^2.
            (b1, b2) = b.group["betas"]
            bc1, bc2 = 1 - b1**b.step, 1 - b2**b.step
            C = Q_new.mT @ b.Q
            u, v = b.exp_avg.to(C.dtype), b.exp_avg_sq.to(C.dtype)
            var = (v / bc2 - (u / bc1).square()).clamp_min(0)
            u = C @ u
            v = bc2 * (C.square() @ var + (u / bc1).square())
            gen = self._rounding(1 + len(self.buckets) + self.buckets.index(b))
            if gen is None:
                b.exp_avg.copy_(u)
                b.exp_avg_sq.copy_(v)
            else:
                stochastic_round_(b.exp_avg, u, gen)
                stochastic_round_(b.exp_avg_sq, v, gen)

    def _record(self, b: _Bucket, Q_new: torch.Tensor, X: torch.Tensor, own: torch.Tensor | None) -> None:
        """One record per matrix: how far Q moved, how much of the source it misses, what was visited, and
        the sizes that explain them (source, error feedback, this worker's own update outside span(Q_old))."""
        old = b.Q is not None
        none = [None] * len(b.indices)
        sim = basis_similarity(Q_new, b.Q).tolist() if old else none
        out = energy_outside(b.Q, X).tolist() if old else none
        own_out = energy_outside(b.Q, own).tolist() if old and own is not None else none
        ef_norm = torch.linalg.matrix_norm(b.ef).tolist() if b.ef is not None else none
        if b.explored is None:
            b.explored = [None] * len(b.indices)
            # float32, like the explored basis: p x p per matrix is the diagnostics' largest state on a GPU
            b.visits = torch.zeros(len(b.indices), b.shape[0], b.shape[0], dtype=torch.float32, device=Q_new.device)
        b.visits.baddbmm_(Q_new.float(), Q_new.float().mT)
        ranks = visited_rank(b.visits).tolist()
        source_norm = torch.linalg.matrix_norm(X).tolist()
        coherence = lambda j: {} if b.coherence is None else dict(zip(COHERENCE_FIELDS, b.coherence[j]))
        for j, i in enumerate(b.indices):
            b.explored[j] = extend_basis(b.explored[j], Q_new[j])
            self._diagnostics.append({"step": self.steps, "param": self.names[i], "basis_similarity": sim[j],
                                      "energy_outside": out[j], "explored_dim": b.explored[j].shape[-1],
                                      "explored_rank": ranks[j], "source_norm": source_norm[j],
                                      "own_energy_outside": own_out[j], "ef_norm": ef_norm[j],
                                      "qh_to_lowrank": b.qh_ratio[j] if b.qh_ratio is not None else None,
                                      **coherence(j)})

    def pop_diagnostics(self) -> list[dict[str, Any]]:
        """Subspace records since the last call, one per matrix and projection refresh."""
        out, self._diagnostics = self._diagnostics, []
        return out

    # ------------------------------------------------------------------ synchronization
    @torch.no_grad()
    def sync(self) -> None:
        """Average parameters (local methods); refresh Q from the pseudo-gradient. Idempotent per step."""
        if not self.method.local or self.synced:
            return
        if not self._initialized:
            self._init_state()
        if not self._aligned:
            self._align()
        hp = self.hparams
        # host_anchor: the anchor (and outer momentum) visit the parameters' device for this sync only
        # (on CPU .to() is the tensor itself: nothing is copied)
        visit = lambda held: [t.to(p.device, non_blocking=True) for t, p in zip(held, self.params)]
        anchor = visit(self._anchor) if hp["host_anchor"] else self._anchor
        outer = visit(self._outer_m) if hp["host_anchor"] and self._outer_m is not None else self._outer_m
        # The matrices' deltas go straight into one stacked buffer per bucket (the projection's input),
        # the rest into plain tensors: one full-size copy instead of two.
        deltas: list[torch.Tensor] = [None] * len(self.params)   # type: ignore[list-item]
        stacks = []
        for b in self.buckets:
            p0 = self.params[b.indices[0]]
            X = p0.new_empty(len(b.indices), *p0.shape)           # the weights' own layout
            for j, i in enumerate(b.indices):
                deltas[i] = torch.sub(self.params[i], anchor[i], out=X[j])
            stacks.append(X.mT if b.transposed[0] else X)
        if self.full:   # foreach refuses []: a model of low-rank matrices only
            for i, d in zip(self.full, torch._foreach_sub([self.params[i] for i in self.full],
                                                          [anchor[i] for i in self.full])):
                deltas[i] = d
        own = [X.clone() for X in stacks] if self.method.projection == "local" or hp["diagnostics"] else None
        own_norms = self._update_norms(stacks, deltas) if hp["diagnostics"] else None
        self._all_reduce_mean(deltas, "sync")
        if own_norms is not None:
            self._record_coherence(own_norms, self._update_norms(stacks, deltas))
        if outer is not None:   # Nesterov SGD on the outer gradient -Delta
            torch._foreach_mul_(outer, hp["outer_momentum"])
            torch._foreach_sub_(outer, deltas)
            torch._foreach_add_(anchor, outer, alpha=-hp["outer_lr"] * hp["outer_momentum"])
        torch._foreach_add_(anchor, deltas, alpha=hp["outer_lr"])
        torch._foreach_copy_(self.params, anchor)
        if hp["host_anchor"]:   # back to host memory (no-op pairs on CPU are skipped)
            pairs = [(h, v) for held, visited in ((self._anchor, anchor), (self._outer_m or [], outer or []))
                     for h, v in zip(held, visited) if h is not v]
            if pairs:
                torch._foreach_copy_([h for h, _ in pairs], [v for _, v in pairs])
        self._sync_states()
        if self.buckets:
            sources = own if self.method.projection == "local" else stacks
            if self._sync_grads is not None:
                grads, self._sync_grads = self._sync_grads, None
                if self.method.projection == "global":
                    grads = [g.clone() for g in grads]
                    self._all_reduce_mean([grads[i] for b in self.buckets for i in b.indices], "projection_gradient")
                sources = self._stacked(grads)
            self._refresh(sources, own)
            if hp["ef_on_sync"] == "reproject":   # E = Q Q^T E with the new Q (E is materialized by the refresh)
                for b in self.buckets:
                    if b.ef is not None:
                        b.ef.copy_(torch.bmm(b.Q, b.Q.mT @ b.ef.to(b.Q.dtype)))
        self.synced = True

    def _sync_states(self) -> None:
        """At a synchronization, before the refresh (while every worker's low-rank state is in the shared Q's
        basis): average the moments `average_moments` names (at every `average_moments_every`-th sync), and
        average or reset the error feedback (`ef_on_sync`). Bytes counted by kind."""
        hp = self.hparams
        which = hp["average_moments"]
        if which != "none" and math.ceil(self.steps / hp["sync_every"]) % hp["average_moments_every"] == 0:
            if which in ("adamw", "all") and self.full:
                states = [self.state[self.params[i]] for i in self.full]
                self._all_reduce_mean([s[k] for s in states for k in ("exp_avg", "exp_avg_sq")], "adamw_moments")
            if which in ("lowrank", "all") and self.buckets:
                self._all_reduce_mean([t for b in self.buckets for t in (b.exp_avg, b.exp_avg_sq)],
                                      "lowrank_moments")
        efs = [b.ef for b in self.buckets if b.ef is not None]
        if hp["ef_on_sync"] == "average" and efs:
            self._all_reduce_mean(efs, "error_feedback")   # lazy R averages to the mean E: Q is shared
        elif hp["ef_on_sync"] == "reset" and efs:
            torch._foreach_zero_(efs)

    def _update_norms(self, stacks: list[torch.Tensor], deltas: list[torch.Tensor]) -> torch.Tensor:
        """Diagnostics: per low-rank matrix ||Delta||, ||Q^T Delta|| and ||(I - Q Q^T) Delta|| (Q before this
        sync's refresh), then ||Delta|| of all full-rank parameters together, as one vector."""
        norms = []
        for b, X in zip(self.buckets, stacks):
            total = torch.linalg.vector_norm(X, dim=(1, 2), dtype=torch.float32)
            inside = (torch.linalg.vector_norm(b.Q.mT @ X, dim=(1, 2), dtype=torch.float32) if b.Q is not None
                      else torch.zeros_like(total))
            outside = (total.square() - inside.square()).clamp_min(0).sqrt()
            norms.append(torch.stack([total, inside, outside], dim=1).reshape(-1))
        full = [deltas[i] for i in self.full]
        full_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(full))) if full else torch.zeros(())
        norms.append(full_norm.float().reshape(1).to(self.params[0].device))
        return torch.cat(norms)

    def _record_coherence(self, own: torch.Tensor, averaged: torch.Tensor) -> None:
        """Update coherence at this sync: the norm of the workers' averaged update over the mean of their own
        norms (1: all workers moved alike; 1/sqrt(M): orthogonal moves), per matrix (whole, inside and outside
        span(Q)) and for the full-rank parameters together. Its small all-reduce is a diagnostic, counted in
        `diagnostics_bytes`, not in `comm_stats()`."""
        if self.world_size > 1:
            self.comm.all_reduce_(own)
            own.div_(self.world_size)
            self.diagnostics_bytes += own.numel() * own.element_size()
        ratio = (averaged / own.clamp_min(torch.finfo(own.dtype).tiny)).tolist()
        j = 0
        for b in self.buckets:
            b.coherence = [ratio[j + 3 * k: j + 3 * k + 3] for k in range(len(b.indices))]
            j += 3 * len(b.indices)
        if self.full:
            self._diagnostics.append({"step": self.steps, "param": FULL_RANK_RECORD, "coherence": ratio[-1]})

    def finish(self) -> None:
        """End a run on the averaged model: synchronize now unless the last step did (local methods;
        nothing to do for ddp and lowrank_ddp). Call it on every worker after the last step."""
        if self.method.local and self.steps > 0:
            self.sync()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything as tensors and plain values: loads with `torch.load(weights_only=True)`.
        torch's state_dict hooks (`register_state_dict_pre_hook`, ...) run as in torch."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state_dict = self._state_dict()
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            state_dict = state_dict if result is None else result
        return state_dict

    def _state_dict(self) -> dict[str, Any]:
        if not self._initialized:
            self._init_state()
        state: dict[int, dict[str, Any]] = {i: {} for i in range(len(self.params))}
        for i in self.full:
            state[i].update({k: v.clone() for k, v in self.state[self.params[i]].items()})
        for b in self.buckets:
            for j, i in enumerate(b.indices):
                s = state[i]
                s.update(exp_avg=b.exp_avg[j].clone(), exp_avg_sq=b.exp_avg_sq[j].clone(), step=b.step,
                         fresh=b.fresh)
                if b.Q is not None:
                    s["Q"] = b.Q[j].clone()
                if b.ef is not None:
                    s["error_feedback_accum"] = b.ef[j].clone()
                if b.explored is not None and b.explored[j] is not None:
                    s["explored_basis"] = b.explored[j].clone()
                    s["visits"] = b.visits[j].clone()
        if self.method.local:
            for i in range(len(self.params)):
                state[i]["anchor"] = self._anchor[i].clone()
                if self._outer_m is not None:
                    state[i]["outer_momentum"] = self._outer_m[i].clone()
        groups = [{k: (list(v) if k == "betas" else v) for k, v in g.items() if k not in ("params", "param_names")}
                  for g in self.param_groups]
        offsets = [0]
        for g in self.param_groups:
            offsets.append(offsets[-1] + len(g["params"]))
        for g, a, z in zip(groups, offsets, offsets[1:]):
            g["params"] = list(range(a, z))
        # lordo's own counters ride in the first param group: torch.distributed.checkpoint's
        # get_optimizer_state_dict keeps only "state" and "param_groups"
        groups[0]["lordo"] = {
            "method": self.method.name, "hparams": {k: (list(v) if isinstance(v, tuple) else v)
                                                     for k, v in self.hparams.items()},
            "steps": self.steps, "skipped_steps": self.skipped_steps, "adam_steps": self._adam_steps,
            "refreshes": self.refreshes, "projection_seconds": self.projection_seconds,
            "comm_seconds": self.comm_seconds,
            "comm_log": {k: list(v) for k, v in self._comm_log.items()}, "names": list(self.names)}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a `state_dict()`; every tensor's shape is checked before anything changes."""
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            state_dict = state_dict if result is None else result
        self._load_state_dict(state_dict)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _check_shapes(self, state: dict[int, dict[str, Any]]) -> None:
        """Raise ValueError naming the first parameter whose saved state does not fit this optimizer."""
        shapes = [{k: tuple(p.shape) for k in ("anchor", "outer_momentum", "exp_avg", "exp_avg_sq")}
                  for p in self.params]
        for b in self.buckets:
            (rows, cols), r = b.shape, b.rank
            for i in b.indices:
                saved = state[i].get("exp_avg")
                if saved is not None and saved.ndim == 2 and saved.shape[1] == cols and saved.shape[0] != r:
                    raise ValueError(f"checkpoint has rank {saved.shape[0]} for parameter {self.names[i]!r}, this "
                                     f"optimizer rank {r}: build it with the checkpoint's rank")
                shapes[i] |= {"exp_avg": (r, cols), "exp_avg_sq": (r, cols), "Q": (rows, r),
                              "error_feedback_accum": (rows, cols)}
        for i in range(len(self.params)):
            for k, shape in shapes[i].items():
                t = state[i].get(k)
                if isinstance(t, torch.Tensor) and tuple(t.shape) != shape:
                    raise ValueError(f"checkpoint tensor {k!r} of parameter {self.names[i]!r} has shape "
                                     f"{tuple(t.shape)}, this optimizer expects {shape}")

    def _load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # in the first param group; checkpoints written before that hold it at the top
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        meta = (state_dict["lordo"] if "lordo" in state_dict else groups[0].get("lordo")) \
            if isinstance(state_dict, dict) and ("lordo" in state_dict or groups) else None
        if meta is None:
            keys = sorted(state_dict)[:4] if isinstance(state_dict, dict) else type(state_dict).__name__
            raise ValueError(f"state_dict is not a lordo optimizer's (no 'lordo' entry; it holds {keys}): load "
                             "what LoRDO.state_dict() saved (another optimizer's state does not carry over)")
        if meta["method"] != self.method.name:
            raise ValueError(f"checkpoint is for method {meta['method']!r}, this optimizer is {self.method.name!r}")
        if len(meta["names"]) != len(self.params):
            raise ValueError(f"checkpoint has {len(meta['names'])} parameters, this optimizer {len(self.params)}")
        # by position in the groups, as torch.optim: the keys may be indices or names (get_optimizer_state_dict)
        keys = [k for g in state_dict["param_groups"] for k in g["params"]]
        state = {i: state_dict["state"].get(k, state_dict["state"].get(str(k), {})) for i, k in enumerate(keys)}
        self._check_shapes(state)
        self._init_state()
        self._aligned = meta["steps"] > 0
        for g, saved in zip(self.param_groups, state_dict["param_groups"]):
            g.update({k: (tuple(v) if k == "betas" else v) for k, v in saved.items() if k not in ("params", "lordo")})
        for i in self.full:
            p = self.params[i]
            for k, t in self.state[p].items():
                t.copy_(state[i][k])
        for b in self.buckets:
            first = state[b.indices[0]]
            b.step, b.fresh = int(first["step"]), bool(first["fresh"])
            b.exp_avg.copy_(torch.stack([state[i]["exp_avg"] for i in b.indices]))
            b.exp_avg_sq.copy_(torch.stack([state[i]["exp_avg_sq"] for i in b.indices]))
            if "Q" in first:
                b.Q = torch.stack([state[i]["Q"] for i in b.indices]).to(b.work)
            if b.ef is not None:
                b.ef.copy_(torch.stack([state[i]["error_feedback_accum"] for i in b.indices]))
            if "explored_basis" in first:
                b.explored = [state[i]["explored_basis"].to(b.work) for i in b.indices]
                b.visits = torch.stack([state[i]["visits"] for i in b.indices]).to(b.work.device, torch.float32)
        if self.method.local:
            for i in range(len(self.params)):
                self._anchor[i].copy_(state[i]["anchor"])
                if self._outer_m is not None:
                    self._outer_m[i].copy_(state[i]["outer_momentum"])
        self.steps, self.skipped_steps = meta["steps"], meta["skipped_steps"]
        self._adam_steps, self.refreshes = meta["adam_steps"], meta["refreshes"]
        self.projection_seconds = meta["projection_seconds"]
        self.comm_seconds = meta.get("comm_seconds", 0.0)      # absent from older checkpoints
        self._comm_log = {k: list(v) for k, v in meta["comm_log"].items()}


def make_optimizer(method: str, model_or_param_groups: nn.Module | Iterable[Any], comm: Any = None,
                   **hparams: Any) -> LoRDO:
    """The optimizer for `method` (a name in `METHODS`) with hyper-parameters overriding `DEFAULTS`.

    Given a module, its parameters are split by `split_params` (the rule of `full_rank_reasons`:
    embeddings, tied weights and output heads stay full-rank). Given parameters or param groups, the
    rules of `LoRDO` apply. Given a `DistributedDataParallel` model and a communicator, DDP's gradient
    all-reduce is turned off (`lordo.comm.disable_ddp_allreduce`): lordo synchronizes itself.
    """
    model = model_or_param_groups
    if isinstance(model, nn.parallel.DistributedDataParallel):
        if comm is not None:
            disable_ddp_allreduce(model)
        model = model.module
    if isinstance(model, nn.Module):
        return LoRDO(split_params(model), method, comm, model=model, **hparams)
    return LoRDO(model, method, comm, **hparams)
