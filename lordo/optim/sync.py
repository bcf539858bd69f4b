"""Communication: the bucketed collectives with their accounting, and the local methods' outer
synchronization (parameter averaging, outer Nesterov momentum, the refresh of Q)."""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from lordo.optim.options import COMM_DTYPES

# Diagnostics at a sync: each matrix's update coherence, whole and inside / outside span(Q)
# (`record_coherence`), and one record (this `param`) for the full-rank parameters together.
COHERENCE_FIELDS = ("coherence", "coherence_in_span", "coherence_outside")
FULL_RANK_RECORD = "(full-rank parameters)"


class Collectives:
    """One worker's collectives over `comm` (None: a single worker, nothing is sent but the
    payload is still counted), in flat buckets of at most `bucket_mb` MiB each. Counts
    collectives and payload bytes by kind (`log`) and the time spent inside them (`seconds`)."""

    def __init__(self, comm: Any, hp: dict[str, Any]):
        self.comm = comm
        self.world_size = comm.world_size if comm is not None else 1
        self.hparams = hp
        self.log: dict[str, list[int]] = {}   # kind -> [collectives, payload bytes]
        self.seconds = 0.0                    # waiting for other workers included

    def all_reduce_mean(self, tensors: list[torch.Tensor], kind: str) -> None:
        """Average `tensors` over workers in place, in `comm_dtype`."""
        self.run(tensors, kind, COMM_DTYPES[self.hparams["comm_dtype"]], broadcast=False)

    def run(self, tensors: list[torch.Tensor], kind: str, dtype: torch.dtype,
            broadcast: bool) -> None:
        """All-reduce mean (or broadcast from rank 0) of `tensors` in place, sent in `dtype`."""
        if self.world_size == 1:   # nothing is sent, so nothing is counted
            return
        log = self.log.setdefault(kind, [0, 0])
        log[0] += 1
        log[1] += sum(t.numel() for t in tensors) * dtype.itemsize
        device = tensors[0].device
        if device.type == "cuda":   # collectives are asynchronous there: time from idle to idle
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
            parts = flat.split([t.numel() for t in chunk])
            torch._foreach_copy_(chunk, [v.view_as(t) for v, t in zip(parts, chunk)])
            start = end
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.seconds += time.perf_counter() - t0


def check_not_averaged(opt: Any, grads: list[torch.Tensor]) -> None:
    """Refuse gradients that someone else (DDP, accelerate, transformers.Trainer) already
    averaged: they are equal on every worker, so there would be no local steps. One 16-byte
    collective. The fingerprint is signed (not a norm, which clipping makes equal)."""
    sums = torch.stack([g.sum(dtype=torch.float64) for g in grads])
    weights = torch.arange(1, len(grads) + 1, dtype=torch.float64, device=sums.device)
    fingerprint = torch.dot(sums, weights)
    moments = torch.stack([fingerprint, fingerprint * fingerprint])
    opt.collectives.run([moments], "gradient_check", torch.float64, broadcast=False)
    mean, mean_sq = moments.tolist()
    if mean_sq > 0 and mean_sq - mean * mean <= 1e-12 * mean_sq:
        raise RuntimeError(
            f"lordo: the first gradients are identical on all {opt.world_size} workers: "
            "something already averages them (DistributedDataParallel; accelerate or "
            f"transformers.Trainer under torchrun), so {opt.method.name!r} would take no local "
            "steps and gradients would cross the network twice. Do not wrap the model, pass the "
            "DDP-wrapped model to make_optimizer, call "
            "lordo.comm.disable_ddp_allreduce(ddp_model), or use lordo.integrations.LoRDOTrainer")


def synchronize(opt: Any) -> None:
    """The outer step of a local method: average the updates since the anchor (the
    pseudo-gradients), step the anchor (outer lr, Nesterov momentum), set every parameter to it,
    and refresh each bucket's Q from the (averaged) pseudo-gradient or the sync step's gradient."""
    hp, params = opt.hparams, opt.params
    # host_anchor: the anchor (and outer momentum) visit the parameters' device for this sync
    # only (on CPU .to() is the tensor itself: nothing is copied)
    visit = lambda held: [t.to(p.device, non_blocking=True) for t, p in zip(held, params)]
    anchor = visit(opt.anchor) if hp["host_anchor"] else opt.anchor
    velocity = opt.outer_velocity
    if hp["host_anchor"] and velocity is not None:
        velocity = visit(velocity)
    # The matrices' deltas go straight into one stacked buffer per bucket (the projection's
    # input), the rest into plain tensors: one full-size copy instead of two.
    deltas: list[torch.Tensor] = [None] * len(params)   # type: ignore[list-item]
    stacks = []
    for b in opt.buckets:
        p0 = params[b.indices[0]]
        X = p0.new_empty(len(b.indices), *p0.shape)           # the weights' own layout
        for j, i in enumerate(b.indices):
            deltas[i] = torch.sub(params[i], anchor[i], out=X[j])
        stacks.append(X.mT if b.transposed[0] else X)
    adamw = opt.adamw_indices
    if adamw:   # foreach refuses []: a model of low-rank matrices only
        adamw_deltas = torch._foreach_sub([params[i] for i in adamw], [anchor[i] for i in adamw])
        for i, d in zip(adamw, adamw_deltas):
            deltas[i] = d
    keep_own = opt.method.projection == "local" or hp["diagnostics"]
    own = [X.clone() for X in stacks] if keep_own else None
    own_norms = update_norms(opt, stacks, deltas) if hp["diagnostics"] else None
    opt.collectives.all_reduce_mean(deltas, "sync")
    if own_norms is not None:
        record_coherence(opt, own_norms, update_norms(opt, stacks, deltas))
    if velocity is not None:   # Nesterov SGD on the outer gradient -Delta
        torch._foreach_mul_(velocity, hp["outer_momentum"])
        torch._foreach_sub_(velocity, deltas)
        torch._foreach_add_(anchor, velocity, alpha=-hp["outer_lr"] * hp["outer_momentum"])
    torch._foreach_add_(anchor, deltas, alpha=hp["outer_lr"])
    torch._foreach_copy_(params, anchor)
    if hp["host_anchor"]:   # back to host memory (no-op pairs on CPU are skipped)
        pairs = [(h, v) for held, visited in ((opt.anchor, anchor),
                                              (opt.outer_velocity or [], velocity or []))
                 for h, v in zip(held, visited) if h is not v]
        if pairs:
            torch._foreach_copy_([h for h, _ in pairs], [v for _, v in pairs])
    sync_states(opt)
    if opt.buckets:
        sources = own if opt.method.projection == "local" else stacks
        if opt.sync_grads is not None:
            grads, opt.sync_grads = opt.sync_grads, None
            if opt.method.projection == "global":
                grads = [g.clone() for g in grads]
                opt.collectives.all_reduce_mean([grads[i] for b in opt.buckets for i in b.indices],
                                                "projection_gradient")
            sources = opt.stacked(grads)
        opt.refresh(sources, own)
        if hp["ef_on_sync"] == "reproject":   # E = Q Q^T E with the new Q (the refresh formed E)
            for b in opt.buckets:
                if b.ef is not None:
                    b.ef.copy_(torch.bmm(b.Q, b.Q.mT @ b.ef.to(b.Q.dtype)))


def sync_states(opt: Any) -> None:
    """At a synchronization, before the refresh (while every worker's low-rank state is in the
    shared Q's basis): average the moments `average_moments` names (at every
    `average_moments_every`-th sync), and average or reset the error feedback (`ef_on_sync`).
    Bytes counted by kind."""
    hp, collectives = opt.hparams, opt.collectives
    which = hp["average_moments"]
    nth_sync = math.ceil(opt.steps / hp["sync_every"])
    if which != "none" and nth_sync % hp["average_moments_every"] == 0:
        if which in ("adamw", "all") and opt.adamw_indices:
            states = [opt.state[opt.params[i]] for i in opt.adamw_indices]
            collectives.all_reduce_mean([s[k] for s in states for k in ("exp_avg", "exp_avg_sq")],
                                        "adamw_moments")
        if which in ("lowrank", "all") and opt.buckets:
            collectives.all_reduce_mean([t for b in opt.buckets for t in (b.exp_avg, b.exp_avg_sq)],
                                        "lowrank_moments")
    efs = [b.ef for b in opt.buckets if b.ef is not None]
    if hp["ef_on_sync"] == "average" and efs:
        collectives.all_reduce_mean(efs, "error_feedback")   # lazy R averages to the mean E
    elif hp["ef_on_sync"] == "reset" and efs:
        torch._foreach_zero_(efs)


def update_norms(opt: Any, stacks: list[torch.Tensor], deltas: list[torch.Tensor]
                 ) -> torch.Tensor:
    """Diagnostics: per low-rank matrix ||Delta||, ||Q^T Delta|| and ||(I - Q Q^T) Delta|| (Q
    before this sync's refresh), then ||Delta|| of all full-rank parameters together, as one
    vector."""
    norms = []
    for b, X in zip(opt.buckets, stacks):
        total = torch.linalg.vector_norm(X, dim=(1, 2), dtype=torch.float32)
        inside = (torch.linalg.vector_norm(b.Q.mT @ X, dim=(1, 2), dtype=torch.float32)
                  if b.Q is not None else torch.zeros_like(total))
        outside = (total.square() - inside.square()).clamp_min(0).sqrt()
        norms.append(torch.stack([total, inside, outside], dim=1).reshape(-1))
    full = [deltas[i] for i in opt.adamw_indices]
    full_norm = (torch.linalg.vector_norm(torch.stack(torch._foreach_norm(full))) if full
                 else torch.zeros(()))
    norms.append(full_norm.float().reshape(1).to(opt.params[0].device))
    return torch.cat(norms)


def record_coherence(opt: Any, own: torch.Tensor, averaged: torch.Tensor) -> None:
    """Update coherence at this sync: the norm of the workers' averaged update over the mean of
    their own norms (1: all workers moved alike; 1/sqrt(M): orthogonal moves), per matrix (whole,
    inside and outside span(Q)) and for the full-rank parameters together. Its small all-reduce
    is a diagnostic, counted in `diagnostics_bytes`, not in `comm_stats()`."""
    if opt.world_size > 1:   # in float64: sums of a few float32 values are exact, so every launcher agrees
        own = own.double()
        opt.comm.all_reduce_(own)
        own.div_(opt.world_size)
        opt.diagnostics_bytes += own.numel() * own.element_size()
    ratio = (averaged / own.clamp_min(torch.finfo(own.dtype).tiny)).tolist()
    j = 0
    for b in opt.buckets:
        b.coherence = [ratio[j + 3 * k: j + 3 * k + 3] for k in range(len(b.indices))]
        j += 3 * len(b.indices)
    if opt.adamw_indices:
        opt.diagnostics.append({"step": opt.steps, "param": FULL_RANK_RECORD,
                                "coherence": ratio[-1]})
