"""The projection Q: when it is refreshed, from what, how the error feedback and the moments follow
it, and the subspace diagnostics recorded at each refresh."""

from __future__ import annotations

import time
from typing import Any

import torch

from lordo.optim.options import STATE_DTYPES
from lordo.optim.state import Bucket, stochastic_round_
from lordo.optim.sync import COHERENCE_FIELDS
from lordo.projection import (
    basis_similarity,
    compute_projection,
    energy_outside,
    extend_basis,
    visited_rank,
)


def refresh_before_step(opt: Any, grads: list[torch.Tensor], finite: bool) -> None:
    """First Q (every low-rank method) and lowrank_ddp's periodic refresh, from gradients."""
    if not opt.buckets:
        return
    source, first = opt.method.projection, opt.buckets[0].Q is None
    if source == "global" and first:
        # Before the first sync there is no pseudo-gradient: one full-size all-reduce of the
        # matrices' gradients gives every worker the same first Q. A worker skipping a
        # non-finite step still takes part (with zeros), so the collective stays matched.
        grads = [g.clone() if finite else torch.zeros_like(g) for g in grads]
        opt.collectives.all_reduce_mean([grads[i] for b in opt.buckets for i in b.indices],
                                        "first_projection")
    elif not finite or not (first or source == "gradient"
                            and opt.steps % opt.hparams["proj_every"] == 0):
        return
    refresh(opt, opt.stacked(grads))


def refresh(opt: Any, sources: list[torch.Tensor], own: list[torch.Tensor] | None = None
            ) -> None:
    """Set each bucket's Q to the top-r subspace of its stacked source; carry EF and moments.
    `own`: this worker's own pseudo-gradients before averaging (diagnostics only)."""
    hp = opt.hparams
    for bi, (b, X) in enumerate(zip(opt.buckets, sources)):
        if X.is_cuda:
            torch.cuda.synchronize(X.device)
        t0 = time.perf_counter()
        Q = compute_projection(X, b.rank, hp["proj_method"], prev=b.Q, iters=hp["proj_iters"],
                               seed=(hp["seed"] * 1_000_003 + opt.refreshes) * 1009 + bi)
        if X.is_cuda:
            torch.cuda.synchronize(X.device)
        opt.projection_seconds += time.perf_counter() - t0
        if b.Q is not None and b.ef is not None and STATE_DTYPES[hp["state_dtype"]] is None:
            b.ef.baddbmm_(b.Q, b.Q.mT @ b.ef, alpha=-1)   # lazy R: E = (I - Q_old Q_old^T) R
        if hp["diagnostics"]:
            record(opt, b, Q, X, own[bi] if own is not None else None)
        if b.Q is not None:
            carry_moments(opt, b, Q)
        b.Q = Q.contiguous()     # (the compiled kernels read it as stored)
        b.q_changed = True
    opt.refreshes += 1


def carry_moments(opt: Any, b: Bucket, Q_new: torch.Tensor) -> None:
    """The moments under the new Q, by `moments_on_refresh`: kept, reset, or rotated."""
    rule = opt.hparams["moments_on_refresh"]
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
        gen = opt.rounding(1 + len(opt.buckets) + opt.buckets.index(b))
        if gen is None:
            b.exp_avg.copy_(u)
            b.exp_avg_sq.copy_(v)
        else:
            stochastic_round_(b.exp_avg, u, gen)
            stochastic_round_(b.exp_avg_sq, v, gen)


def record(opt: Any, b: Bucket, Q_new: torch.Tensor, X: torch.Tensor,
           own: torch.Tensor | None) -> None:
    """One record per matrix: how far Q moved, how much of the source it misses, what was
    visited, and the sizes that explain them (source, error feedback, this worker's own update
    outside span(Q_old))."""
    old = b.Q is not None
    none = [None] * len(b.indices)
    sim = basis_similarity(Q_new, b.Q).tolist() if old else none
    out = energy_outside(b.Q, X).tolist() if old else none
    own_out = energy_outside(b.Q, own).tolist() if old and own is not None else none
    ef_norm = torch.linalg.matrix_norm(b.ef).tolist() if b.ef is not None else none
    if b.explored is None:
        b.explored = [None] * len(b.indices)
        # float32, like the explored basis: p x p per matrix is the diagnostics' largest state
        # on a GPU
        b.visits = torch.zeros(len(b.indices), b.shape[0], b.shape[0], dtype=torch.float32,
                               device=Q_new.device)
    b.visits.baddbmm_(Q_new.float(), Q_new.float().mT)
    ranks = visited_rank(b.visits).tolist()
    source_norm = torch.linalg.matrix_norm(X).tolist()
    coherence = lambda j: {} if b.coherence is None else dict(zip(COHERENCE_FIELDS, b.coherence[j]))
    for j, i in enumerate(b.indices):
        b.explored[j] = extend_basis(b.explored[j], Q_new[j])
        opt.diagnostics.append({
            "step": opt.steps, "param": opt.names[i], "basis_similarity": sim[j],
            "energy_outside": out[j], "explored_dim": b.explored[j].shape[-1],
            "explored_rank": ranks[j], "source_norm": source_norm[j],
            "own_energy_outside": own_out[j], "ef_norm": ef_norm[j],
            "qh_to_lowrank": b.qh_ratio[j] if b.qh_ratio is not None else None,
            **coherence(j)})
