"""LoRDO and every method the paper compares, as one drop-in `torch.optim.Optimizer`.

    opt = lordo.make_optimizer("lordo", model, comm=comm, lr=3e-3, rank=8, sync_every=16)
    for x, y in batches:
        model(x, y)[1].backward()
        opt.step()          # local step; every `sync_every` steps also the synchronization
        opt.zero_grad()

One worker's view: with `comm=None` it is an ordinary single-process optimizer (M = 1); with a
communicator (`lordo.comm`) it talks to the other M - 1 workers itself, so no DDP wrapper is
needed. The algorithm is `../shared/spec/lordo-method.md`; `lordo/reference.py` is a plain
transcription of it that the tests hold this implementation to.

Methods (`METHODS`): `ddp` and `lowrank_ddp` all-reduce gradients every step; `local_adam`,
`lordo_local`, `lordo_global` and `lordo` take local steps and average parameters every
`sync_every` steps. Low-rank methods give each 2-D weight ("matrix") a low-rank Adam step with
error feedback in a projection Q, plus for `lordo` a full-rank quasi-hyperbolic term; every
other parameter takes AdamW with the same betas.

How the low-rank step stays cheap. Same-shape matrices of a param group are stacked and stepped
together (batched matmuls, foreach ops, no per-parameter host syncs). Error feedback is kept
lazily: while Q is fixed, Q^T E = 0 after every step, so the low-rank gradient is just Q^T G and
the buffer only needs R += G; the true E = (I - Q Q^T) R is formed when Q changes. That is two
rank-r matmuls a step instead of three, with the same arithmetic as the spec's recurrence.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lordo.projection import (
    PROJ_METHODS,
    basis_similarity,
    compute_projection,
    energy_outside,
    extend_basis,
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


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("ddp", False, False, "", 1.0, "AdamW, all-reduce of gradients every step"),
    Method("lowrank_ddp", True, False, "gradient", 1.0,
           "low-rank Adam + EF, Q from the all-reduced gradient every proj_every steps"),
    Method("local_adam", False, True, "", 1.0, "local AdamW, parameters averaged every sync_every (DiLoCo)"),
    Method("lordo_local", True, True, "local", 1.0, "low-rank Adam + EF, each worker's Q from its own update"),
    Method("lordo_global", True, True, "global", 1.0, "low-rank Adam + EF, shared Q from the averaged update"),
    Method("lordo", True, True, "global", 0.7, "lordo_global + full-rank quasi-hyperbolic term (omega < 1)"),
)}

# Documented defaults (README "Decisions"); `omega=None` means the method's own.
DEFAULTS: dict[str, Any] = dict(
    lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, rank=0.25, sync_every=16, omega=None,
    clip=1.0, error_feedback=True, moments_on_refresh="keep", proj_method="power", proj_every=200,
    proj_iters=1, proj_source="pseudo_gradient", outer_lr=1.0, outer_momentum=0.0, comm_dtype="float32",
    nonfinite="raise", diagnostics=False, seed=0, bucket_mb=64.0,
)
GROUP_KEYS = ("lr", "betas", "eps", "weight_decay", "rank", "omega")   # may differ per param group
MOMENT_RULES = ("keep", "reset", "rotate")
# What a local method's Q is computed from at a synchronization: the (averaged) pseudo-gradient, as the paper,
# or the (averaged) clipped gradient of the step that ends the interval, as lowrank_ddp's refresh; the latter
# costs one more full-size all-reduce of the matrices per sync (global methods) and exists to measure what
# the pseudo-gradient's projection costs (notebook 05).
PROJ_SOURCES = ("pseudo_gradient", "gradient")
NONFINITE_RULES = ("raise", "skip", "off")
# float64 makes sums of up to a few fp32 values exact, hence independent of the backend's
# reduction order: bit-reproducible across launchers at twice the bytes.
COMM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
               "float64": torch.float64}


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: allowed {allowed}")


def validate_hparams(hp: dict[str, Any]) -> None:
    """Raise ValueError naming the first bad hyper-parameter and what is allowed."""
    unknown = sorted(set(hp) - set(DEFAULTS))
    _check(not unknown, "hyper-parameter", unknown[0] if unknown else None, f"one of {sorted(DEFAULTS)}")
    lr, betas, rank = hp["lr"], hp["betas"], hp["rank"]
    _check(isinstance(lr, int | float) and lr >= 0 and math.isfinite(lr), "lr", lr, "a finite number >= 0")
    _check(isinstance(betas, tuple | list) and len(betas) == 2 and all(0 <= b < 1 for b in betas),
           "betas", betas, "two numbers in [0, 1)")
    _check(hp["eps"] > 0, "eps", hp["eps"], "> 0")
    _check(hp["weight_decay"] >= 0, "weight_decay", hp["weight_decay"], ">= 0")
    _check(not isinstance(rank, bool) and (isinstance(rank, int) and rank > 0 or isinstance(rank, float)
                                            and 0 < rank <= 1),
           "rank", rank, "an int >= 1, or a float fraction of min(p, q) in (0, 1]")
    _check(isinstance(hp["sync_every"], int) and hp["sync_every"] >= 1, "sync_every", hp["sync_every"], "an int >= 1")
    _check(hp["omega"] is None or 0 <= hp["omega"] <= 1, "omega", hp["omega"], "a number in [0, 1]")
    _check(hp["clip"] is None or hp["clip"] > 0, "clip", hp["clip"], "None (off) or a number > 0")
    _check(hp["moments_on_refresh"] in MOMENT_RULES, "moments_on_refresh", hp["moments_on_refresh"], str(MOMENT_RULES))
    _check(hp["proj_method"] in PROJ_METHODS, "proj_method", hp["proj_method"], str(PROJ_METHODS))
    _check(isinstance(hp["proj_every"], int) and hp["proj_every"] >= 1, "proj_every", hp["proj_every"], "an int >= 1")
    _check(isinstance(hp["proj_iters"], int) and hp["proj_iters"] >= 1, "proj_iters", hp["proj_iters"], "an int >= 1")
    _check(hp["proj_source"] in PROJ_SOURCES, "proj_source", hp["proj_source"], str(PROJ_SOURCES))
    _check(hp["outer_lr"] > 0, "outer_lr", hp["outer_lr"], "> 0")
    _check(0 <= hp["outer_momentum"] < 1, "outer_momentum", hp["outer_momentum"], "a number in [0, 1)")
    _check(hp["comm_dtype"] in COMM_DTYPES, "comm_dtype", hp["comm_dtype"], str(tuple(COMM_DTYPES)))
    _check(hp["nonfinite"] in NONFINITE_RULES, "nonfinite", hp["nonfinite"], str(NONFINITE_RULES))
    _check(hp["bucket_mb"] > 0, "bucket_mb", hp["bucket_mb"], "> 0")


def split_params(model: nn.Module) -> list[dict[str, Any]]:
    """Param groups: low-rank matrices (2-D weights of the blocks) and the rest (AdamW).

    The rest: `nn.Embedding` weights and anything tied to them, parameters named `lm_head`,
    norms and biases (anything not 2-D). Frozen parameters are left out.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    matrices: dict[str, nn.Parameter] = {}
    rest: dict[str, nn.Parameter] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_head = "lm_head" in name.split(".")
        (matrices if p.ndim == 2 and id(p) not in embeddings and not is_head else rest)[name] = p
    groups = [dict(params=list(ps.values()), param_names=list(ps), lowrank=lowrank)
              for ps, lowrank in ((matrices, True), (rest, False)) if ps]
    return groups


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
    explored: list[torch.Tensor] | None = field(default=None)  # diagnostics: union basis per matrix
    visits: torch.Tensor | None = None  # diagnostics: (n, p, p) sum of Q Q^T over refreshes
    work: torch.Tensor | None = None  # (n, r, q) workspace of the step: no (n, p, q) temporaries


def _oriented(t: torch.Tensor, transposed: bool) -> torch.Tensor:
    return t.mT if transposed else t


class LoRDO(torch.optim.Optimizer):
    """One worker's optimizer for any method in `METHODS` (see the module docstring).

    Per-group hyper-parameters: lr, betas, eps, weight_decay, rank, omega and `lowrank` (bool:
    whether the group's 2-D parameters are low-rank matrices; default: all 2-D parameters are).
    Everything else in `DEFAULTS` is global. Accounting: `comm_stats()`, `memory_stats()`,
    `projection_seconds`; subspace diagnostics with `diagnostics=True`: `pop_diagnostics()`.
    """

    def __init__(self, params: Iterable[Any], method: str = "lordo", comm: Any = None, **hparams: Any):
        if method not in METHODS:
            raise ValueError(f"method={method!r} is unknown: allowed {sorted(METHODS)}")
        self.method = METHODS[method]
        hp = {**DEFAULTS, **hparams}
        validate_hparams(hp)
        if hp["omega"] is None:
            hp["omega"] = self.method.omega
        hp["betas"] = tuple(hp["betas"])
        self.hparams = hp
        self.comm = comm
        self.world_size = comm.world_size if comm is not None else 1
        super().__init__(params, {k: hp[k] for k in GROUP_KEYS} | {"lowrank": None})
        for g in self.param_groups:
            validate_hparams(hp | {k: g[k] for k in GROUP_KEYS})
        self.params: list[torch.Tensor] = [p for g in self.param_groups for p in g["params"]]
        self.names: list[str] = [n for gi, g in enumerate(self.param_groups)
                                 for n in g.get("param_names") or [f"group{gi}.param{i}" for i in
                                                                  range(len(g["params"]))]]
        self._plan()
        self.steps = 0             # optimizer steps taken (skipped ones included)
        self.skipped_steps = 0     # steps skipped for a non-finite gradient (nonfinite="skip")
        self.refreshes = 0         # projection computations (each seeds its randomized sketch)
        self.projection_seconds = 0.0
        self.synced = False        # whether the last step() ended with a synchronization
        self._comm_log: dict[str, list[int]] = {}   # kind -> [collectives, payload bytes]
        self._diagnostics: list[dict[str, Any]] = []
        self._sync_grads: list[torch.Tensor] | None = None   # proj_source="gradient": the sync step's gradients
        self._initialized = False

    # ------------------------------------------------------------------ layout
    def _plan(self) -> None:
        """Sort parameters into AdamW ones and buckets of same-shape low-rank matrices."""
        self.full: list[int] = []
        self.buckets: list[_Bucket] = []
        by_key: dict[tuple, _Bucket] = {}
        i = 0
        for gi, g in enumerate(self.param_groups):
            lowrank = g["lowrank"] if g["lowrank"] is not None else True
            for p in g["params"]:
                if self.method.lowrank and lowrank and p.ndim == 2:
                    transposed = p.shape[0] > p.shape[1]
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

    def _init_state(self, broadcast: bool = True) -> None:
        """Allocate state on the parameters' devices (lazily, like torch's optimizers).

        Like DDP, every worker starts from rank 0's parameters (one broadcast, counted); not when
        loading a checkpoint, whose workers may legitimately differ between synchronizations.
        """
        if broadcast and self.world_size > 1:
            self._collective([p.data for p in self.params], "initial_broadcast", self.params[0].dtype,
                             broadcast=True)
        ef = self.hparams["error_feedback"]
        for i in self.full:
            p = self.params[i]
            self.state[p] = {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        for b in self.buckets:
            p0 = self.params[b.indices[0]]
            n, (rows, cols) = len(b.indices), b.shape
            b.exp_avg = p0.new_zeros(n, b.rank, cols)
            b.exp_avg_sq = p0.new_zeros(n, b.rank, cols)
            # the error feedback is stored like the weights (q x p when transposed) and viewed oriented,
            # so that adding the gradients to it is a contiguous pass
            b.ef = (p0.new_zeros(n, cols, rows).mT if b.transposed[0] else p0.new_zeros(n, rows, cols)) if ef \
                else None
            b.work = p0.new_empty(n, b.rank, cols)
        if self.method.local:
            self._anchor = [p.detach().clone() for p in self.params]
            self._outer_m = ([torch.zeros_like(p) for p in self.params]
                             if self.hparams["outer_momentum"] > 0 else None)
        self._adam_steps = 0
        self._adam_step_t = torch.zeros((), dtype=torch.float32, device=self.params[0].device)
        self._initialized = True

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if hasattr(self, "buckets"):
            raise RuntimeError("LoRDO lays out its state at construction: build a new optimizer with every "
                               "param group instead of calling add_param_group")
        super().add_param_group(param_group)

    # ------------------------------------------------------------------ communication
    def _all_reduce_mean(self, tensors: list[torch.Tensor], kind: str) -> None:
        """Average `tensors` over workers in place, in `comm_dtype`, in flat buckets; count bytes."""
        self._collective(tensors, kind, COMM_DTYPES[self.hparams["comm_dtype"]], broadcast=False)

    def _collective(self, tensors: list[torch.Tensor], kind: str, dtype: torch.dtype, broadcast: bool) -> None:
        numel = sum(t.numel() for t in tensors)
        log = self._comm_log.setdefault(kind, [0, 0])
        log[0] += 1
        log[1] += numel * dtype.itemsize
        if self.world_size == 1:
            return
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
        """Payload of one regular collective: a gradient all-reduce, or one parameter average."""
        return sum(p.numel() for p in self.params) * COMM_DTYPES[self.hparams["comm_dtype"]].itemsize

    def memory_stats(self) -> dict[str, int]:
        """Bytes of optimizer state on this worker, by kind (from shapes: valid before the first step)."""
        def nbytes(i: int) -> int:
            return self.params[i].numel() * self.params[i].element_size()
        item = lambda b: len(b.indices) * self.params[b.indices[0]].element_size()
        every = sum(map(nbytes, range(len(self.params))))
        local, hp = self.method.local, self.hparams
        out = {
            "moments": 2 * sum(nbytes(i) for i in self.full)
            + sum(2 * item(b) * b.rank * b.shape[1] for b in self.buckets),
            "projection": sum(item(b) * b.shape[0] * b.rank for b in self.buckets),
            "error_feedback": sum(item(b) * b.shape[0] * b.shape[1] for b in self.buckets if hp["error_feedback"]),
            "anchor": every if local else 0,
            "outer_momentum": every if local and hp["outer_momentum"] else 0,
        }
        out["total"] = sum(out.values())
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
        self.synced = False
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        if not self.method.local:
            self._all_reduce_mean(grads, "gradients")
        finite = self._finite_and_clipped(grads)
        self._refresh_before_step(grads, finite)
        if finite:
            self._adamw_step(grads)
            for b in self.buckets:
                self._lowrank_step(b, [grads[i] for i in b.indices])
        self.steps += 1
        if self.method.local and self.steps % self.hparams["sync_every"] == 0:
            if self.buckets and self.hparams["proj_source"] == "gradient":
                # a worker that skipped the step still joins the projection's all-reduce, with zeros
                self._sync_grads = grads if finite else [torch.zeros_like(g) for g in grads]
            self.sync()
        return loss

    def _finite_and_clipped(self, grads: list[torch.Tensor]) -> bool:
        """Clip by the global norm in place; False if the step is to be skipped (non-finite)."""
        clip, rule = self.hparams["clip"], self.hparams["nonfinite"]
        if clip is None and rule == "off":
            return True
        total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        if rule == "off":   # no host sync: scale by a tensor factor (1 when the clip does not bite)
            torch._foreach_mul_(grads, (clip / (total + 1e-6)).clamp(max=1.0))
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
            torch._foreach_mul_(grads, clip / (total + 1e-6))
        return True

    def _adamw_step(self, grads: list[torch.Tensor]) -> None:
        if not self.full:
            return
        self._adam_steps += 1
        k = self._adam_steps
        self._adam_step_t.fill_(k)
        for g, idx in self._full_by_group:
            params = [self.params[i] for i in idx]
            states = [self.state[p] for p in params]
            m, v = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
            (b1, b2), lr = g["betas"], g["lr"]
            gs = [grads[i] for i in idx]
            if len({(p.device, p.dtype) for p in params}) == 1:    # torch's fused kernel: no temporaries
                torch._fused_adamw_(params, gs, m, v, [], [self._adam_step_t] * len(params), lr=lr, beta1=b1,
                                    beta2=b2, weight_decay=g["weight_decay"], eps=g["eps"], amsgrad=False,
                                    maximize=False)
                continue
            torch._foreach_lerp_(m, gs, 1 - b1)
            torch._foreach_mul_(v, b2)
            torch._foreach_addcmul_(v, gs, gs, value=1 - b2)
            denom = torch._foreach_sqrt(v)
            torch._foreach_div_(denom, math.sqrt(1 - b2**k))
            torch._foreach_add_(denom, g["eps"])
            if g["weight_decay"]:
                torch._foreach_mul_(params, 1 - lr * g["weight_decay"])
            torch._foreach_addcdiv_(params, m, denom, value=-lr / (1 - b1**k))

    def _lowrank_step(self, b: _Bucket, grads: list[torch.Tensor]) -> None:
        """One matrix at a time on views (no stacked copies): per matrix two rank-r matmuls, the second
        accumulated straight into the weight, and contiguous passes over G, E and W."""
        g = b.group
        (b1, b2), lr, eps, omega = g["betas"], g["lr"], g["eps"], g["omega"]
        G = [_oriented(x, t) for x, t in zip(grads, b.transposed)]                   # clipped, (p, q) views
        low = b.work
        if b.ef is not None:
            torch._foreach_add_(list(b.ef.unbind(0)), G)
        if b.ef is not None and b.fresh:
            torch.bmm(b.Q.mT, b.ef, out=low)              # = Q^T (G + E): Q^T E is 0 unless Q just changed
        else:
            for j, x in enumerate(G):
                torch.mm(b.Q[j].mT, x, out=low[j])
        b.fresh = False
        b.step += 1
        b.exp_avg.lerp_(low, 1 - b1)
        b.exp_avg_sq.mul_(b2).addcmul_(low, low, value=1 - b2)
        denom = torch.div(b.exp_avg_sq, 1 - b2**b.step, out=low).sqrt_().add_(eps)    # D, in the workspace
        qh = denom.mean(dim=(1, 2)).reciprocal_().mul_(-lr * (1 - omega)) if omega < 1 else None
        N = torch.div(b.exp_avg, denom, out=low).mul_(omega / (1 - b1**b.step))
        params = [self.params[i] for i in b.indices]            # as stored: every write below is contiguous
        if g["weight_decay"]:
            torch._foreach_mul_(params, 1 - lr * g["weight_decay"])
        for j, (w, t) in enumerate(zip(params, b.transposed)):  # W -= lr omega Q (u_hat / D)
            if t:
                w.addmm_(N[j].mT, b.Q[j].mT, alpha=-lr)         # stored q x p: W^T -= lr N^T Q^T
            else:
                w.addmm_(b.Q[j], N[j], alpha=-lr)
        if qh is not None:                                      # the full-rank quasi-hyperbolic term G / mean(D)
            torch._foreach_addcmul_(params, grads, list(qh.unbind(0)))

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
        return [torch.stack([_oriented(tensors[i], t) for i, t in zip(b.indices, b.transposed)])
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
            if b.Q is not None and b.ef is not None:   # materialize E = (I - Q_old Q_old^T) R before Q changes
                b.ef.baddbmm_(b.Q, b.Q.mT @ b.ef, alpha=-1)
            if hp["diagnostics"]:
                self._record(b, Q, X, own[bi] if own is not None else None)
            if b.Q is not None:
                self._carry_moments(b, Q)
            b.Q = Q
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
            var = (b.exp_avg_sq / bc2 - (b.exp_avg / bc1).square()).clamp_min(0)
            b.exp_avg = C @ b.exp_avg
            b.exp_avg_sq = bc2 * (C.square() @ var + (b.exp_avg / bc1).square())

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
            b.visits = torch.zeros(len(b.indices), b.shape[0], b.shape[0], dtype=torch.float64, device=Q_new.device)
        b.visits.baddbmm_(Q_new.double(), Q_new.double().mT)
        ranks = visited_rank(b.visits).tolist()
        source_norm = torch.linalg.matrix_norm(X).tolist()
        for j, i in enumerate(b.indices):
            b.explored[j] = extend_basis(b.explored[j], Q_new[j])
            self._diagnostics.append({"step": self.steps, "param": self.names[i], "basis_similarity": sim[j],
                                      "energy_outside": out[j], "explored_dim": b.explored[j].shape[-1],
                                      "explored_rank": ranks[j], "source_norm": source_norm[j],
                                      "own_energy_outside": own_out[j], "ef_norm": ef_norm[j]})

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
        hp = self.hparams
        # The matrices' deltas go straight into one stacked buffer per bucket (the projection's input),
        # the rest into plain tensors: one full-size copy instead of two.
        deltas: list[torch.Tensor] = [None] * len(self.params)   # type: ignore[list-item]
        stacks = []
        for b in self.buckets:
            p0 = self.params[b.indices[0]]
            X = p0.new_empty(len(b.indices), *p0.shape)           # the weights' own layout
            for j, i in enumerate(b.indices):
                deltas[i] = torch.sub(self.params[i], self._anchor[i], out=X[j])
            stacks.append(X.mT if b.transposed[0] else X)
        for i, d in zip(self.full, torch._foreach_sub([self.params[i] for i in self.full],
                                                      [self._anchor[i] for i in self.full])):
            deltas[i] = d
        own = [X.clone() for X in stacks] if self.method.projection == "local" or hp["diagnostics"] else None
        self._all_reduce_mean(deltas, "sync")
        if self._outer_m is not None:   # Nesterov SGD on the outer gradient -Delta
            torch._foreach_mul_(self._outer_m, hp["outer_momentum"])
            torch._foreach_sub_(self._outer_m, deltas)
            torch._foreach_add_(self._anchor, self._outer_m, alpha=-hp["outer_lr"] * hp["outer_momentum"])
        torch._foreach_add_(self._anchor, deltas, alpha=hp["outer_lr"])
        torch._foreach_copy_(self.params, self._anchor)
        if self.buckets:
            sources = own if self.method.projection == "local" else stacks
            if self._sync_grads is not None:
                grads, self._sync_grads = self._sync_grads, None
                if self.method.projection == "global":
                    grads = [g.clone() for g in grads]
                    self._all_reduce_mean([grads[i] for b in self.buckets for i in b.indices], "projection_gradient")
                sources = self._stacked(grads)
            self._refresh(sources, own)
        self.synced = True

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything as tensors and plain values: loads with `torch.load(weights_only=True)`."""
        if not self._initialized:
            self._init_state(broadcast=False)
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
        return {"state": state, "param_groups": groups, "lordo": {
            "method": self.method.name, "hparams": {k: (list(v) if isinstance(v, tuple) else v)
                                                     for k, v in self.hparams.items()},
            "steps": self.steps, "skipped_steps": self.skipped_steps, "adam_steps": self._adam_steps,
            "refreshes": self.refreshes, "projection_seconds": self.projection_seconds,
            "comm_log": {k: list(v) for k, v in self._comm_log.items()}, "names": list(self.names)}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        meta = state_dict["lordo"]
        if meta["method"] != self.method.name:
            raise ValueError(f"checkpoint is for method {meta['method']!r}, this optimizer is {self.method.name!r}")
        if len(meta["names"]) != len(self.params):
            raise ValueError(f"checkpoint has {len(meta['names'])} parameters, this optimizer {len(self.params)}")
        self._init_state(broadcast=False)
        for g, saved in zip(self.param_groups, state_dict["param_groups"]):
            g.update({k: (tuple(v) if k == "betas" else v) for k, v in saved.items() if k != "params"})
        state = state_dict["state"]
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
                b.Q = torch.stack([state[i]["Q"] for i in b.indices]).to(b.exp_avg)
            if b.ef is not None:
                b.ef.copy_(torch.stack([state[i]["error_feedback_accum"] for i in b.indices]))
            if "explored_basis" in first:
                b.explored = [state[i]["explored_basis"].to(b.exp_avg) for i in b.indices]
                b.visits = torch.stack([state[i]["visits"] for i in b.indices]).to(b.exp_avg.device, torch.float64)
        if self.method.local:
            for i in range(len(self.params)):
                self._anchor[i].copy_(state[i]["anchor"])
                if self._outer_m is not None:
                    self._outer_m[i].copy_(state[i]["outer_momentum"])
        self.steps, self.skipped_steps = meta["steps"], meta["skipped_steps"]
        self._adam_steps, self.refreshes = meta["adam_steps"], meta["refreshes"]
        self.projection_seconds = meta["projection_seconds"]
        self._comm_log = {k: list(v) for k, v in meta["comm_log"].items()}


def make_optimizer(method: str, model_or_param_groups: nn.Module | Iterable[Any], comm: Any = None,
                   **hparams: Any) -> LoRDO:
    """The optimizer for `method` (a name in `METHODS`) with hyper-parameters overriding `DEFAULTS`.

    Given a module, its parameters are split by `split_params`: every 2-D parameter is a low-rank
    matrix unless it is an `nn.Embedding` weight (or tied to one) or named `lm_head`. Given
    parameters or param groups, 2-D parameters are matrices unless their group says `lowrank=False`.
    """
    params = split_params(model_or_param_groups) if isinstance(model_or_param_groups, nn.Module) \
        else model_or_param_groups
    return LoRDO(params, method, comm, **hparams)
