"""One bucket's low-rank step, as module-level functions: one straight-line function per variant,
chosen once when the state is built (`choose_variant`), not re-decided inside each step.

* `eager_step`: float32 state (the parameters' dtype), any device: BLAS products and element-wise
  passes; the error feedback is kept lazily (R += G while Q is fixed: Q^T E = 0 after every
  step, so the low-rank gradient is Q^T G; E = (I - Q Q^T) R is formed when Q changes).
* `compiled_step`: the same math in the compiled CPU kernels (`lordo.kernels`, float32 on CPU):
  each reads a matrix from memory once and computes its rank-r product on the way.
* `rounded_step`: state stored in bfloat16 (`state_dtype="bfloat16"`), rounded stochastically;
  the error feedback is kept eagerly (E itself: the lazy R's rounding noise would grow with
  every step between refreshes).

Each variant comes with the way it takes Q^T G beside the clip's norm of G
(`Variant.project_and_norm`), or None where the step cannot use it (a GPU gains nothing; eager E).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lordo.optim.state import Bucket, stochastic_round_

# The low-rank step's math on one matrix as its weight is stored (q x p when `transposed`: the
# oriented matrix is its .mT). Every full-size tensor is read and written in its own contiguous
# layout, and each product is computed with its operands as stored (MKL is slower on products of
# two transposed operands). On a CPU with one intra-op thread (lordo's workers, a shared machine)
# the passes over a matrix go block by block of rows (`CPU_BLOCK` entries), so that a block of
# G, W and R read by one operation is still in the core's cache for the next. Threaded, each
# operation costs a fork and join of the threads, which on a loaded machine cost more than the
# blocks save (benchmarks/README.md); there, and on a GPU, each pass is taken whole. (The
# compiled kernels replace these functions on CPU in float32: lordo/csrc/lowrank_cpu.cpp.)
CPU_BLOCK = 1 << 17


def block_rows(X: torch.Tensor) -> int:
    if X.device.type != "cpu" or torch.get_num_threads() > 1:
        return X.shape[0]
    return max(1, CPU_BLOCK // X.shape[-1])


def project(out: torch.Tensor, Q: torch.Tensor, X: torch.Tensor, transposed: bool
            ) -> torch.Tensor:
    """out (r, q) = Q^T X for the oriented X (p, q), given X as stored; also batched."""
    if transposed:
        return torch.matmul(X, Q, out=out.mT)    # X stored q x p: (X^T)^T Q = (Q^T X)^T
    return torch.matmul(Q.mT, X, out=out)


def project_and_norm(out: torch.Tensor, Q: torch.Tensor, G: torch.Tensor, transposed: bool
                     ) -> torch.Tensor:
    """`project` and the norm of G, by blocks of G's rows: the norm reads each block again from
    cache."""
    rows, norms = block_rows(G), []
    if transposed:         # a block of G's stored rows gives the same rows of (Q^T G)^T
        for g, o in zip(G.split(rows), out.mT.split(rows)):
            torch.mm(g, Q, out=o)
            norms.append(torch.linalg.vector_norm(g))
    else:                  # a block's share of the sum over Q's rows (beta 0: out's old values)
        for k, (g, q) in enumerate(zip(G.split(rows), Q.split(rows))):
            out.addmm_(q.mT, g, beta=1.0 if k else 0.0)
            norms.append(torch.linalg.vector_norm(g))
    return torch.linalg.vector_norm(torch.stack(norms))


def back_project_(W: torch.Tensor, Q: torch.Tensor, N: torch.Tensor, transposed: bool,
                  alpha: float, beta: float = 1.0) -> torch.Tensor:
    """W <- beta W + alpha Q N in place, W (oriented p x q) given as stored: one pass over W."""
    if transposed:
        return W.addmm_(N.mT, Q.mT, beta=beta, alpha=alpha)
    return W.addmm_(Q, N, beta=beta, alpha=alpha)


def apply_lowrank_(W: torch.Tensor, G: torch.Tensor, Q: torch.Tensor, N: torch.Tensor,
                   transposed: bool, *, lr: float, decay: float, qh: torch.Tensor | None,
                   ef: torch.Tensor | None) -> None:
    """The full-size part of one matrix's step, W, G and R as stored: the lazy error feedback
    R += G, then W <- decay W - lr Q N (weight decay folded into the product's beta) + qh G (the
    full-rank QH term). Block by block of rows, so the second reads of G and W come from cache
    rather than memory."""
    rows = block_rows(W)
    # the rows of Q N for a block of W's stored rows: Q's rows, or for W stored as
    # (Q N)^T = N^T Q^T, N^T's rows
    factors = (((n, Q.mT) for n in N.mT.split(rows)) if transposed
               else ((q, N) for q in Q.split(rows)))
    efs = ef.split(rows) if ef is not None else itertools.repeat(None)
    for w, g, e, (a, b) in zip(W.split(rows), G.split(rows), efs, factors):
        if e is not None:
            e.add_(g)
        w.addmm_(a, b, beta=decay, alpha=-lr)
        if qh is not None:
            w.addcmul_(g, qh)


@dataclass
class StepInputs:
    """What one bucket's step needs beside its state."""

    weights: list[torch.Tensor]
    grads: list[torch.Tensor]        # clipped
    qh_scale: str
    record_step: bool                # diagnostics: record the QH term's size (a sync is next)
    grad_norms: Callable[[], torch.Tensor]    # ||G^|| of the matrices (the clip's when taken)
    mu: float                        # the paper's scaling factor: the QH term is divided by it
    rounding: torch.Generator | None = None   # rounded_step: the stochastic rounding's bits


def error_feedback_rows(b: Bucket) -> tuple[torch.Tensor | None, list[torch.Tensor] | None]:
    """The error feedback as the weights are stored: the stack, and one view per matrix."""
    if b.ef is None:
        return None, None
    stored = b.ef.mT if b.transposed[0] else b.ef
    return stored, list(stored.unbind(0))


def project_lazily(b: Bucket, grads: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """Q^T G into the workspace (unless taken beside the norms), with lazy error feedback R:
    Q^T R is 0 unless Q just changed, then R + G is projected. Returns the R to add G to in the
    full-size sweep (None: none, or already added)."""
    stored, ef = error_feedback_rows(b)
    if ef is not None and b.q_changed:
        torch._foreach_add_(ef, grads)
        project(b.workspace, b.Q, stored, b.transposed[0])
        ef = None
    elif not b.grad_projected or b.q_changed:
        for j, x in enumerate(grads):
            project(b.workspace[j], b.Q[j], x, b.transposed[j])
    b.q_changed = b.grad_projected = False
    b.step += 1
    return ef


def adam_moments(b: Bucket, u: torch.Tensor, v: torch.Tensor, s: StepInputs
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The Adam step on the r x q moments u, v (updated in place) from the workspace's Q^T G,
    leaving (omega / bc1) u / D in the workspace. Returns mean(D) per matrix where the QH term
    needs it, and ||u / D|| where update_rms or the diagnostics need it."""
    g, low = b.group, b.workspace
    (b1, b2), eps, omega = g["betas"], g["eps"], g["omega"]
    by_rms = omega < 1 and s.qh_scale == "update_rms"
    u.lerp_(low, 1 - b1)
    v.mul_(b2).addcmul_(low, low, value=1 - b2)
    denom = torch.div(v, 1 - b2**b.step, out=low).sqrt_().add_(eps)    # D, in the workspace
    denom_mean = denom.mean(dim=(1, 2)) if omega < 1 and not by_rms else None
    torch.div(u, denom, out=low)                                       # u / D
    record = omega < 1 and s.record_step
    update_norm = torch.linalg.vector_norm(low, dim=(1, 2)) if by_rms or record else None
    low.mul_(omega / (1 - b1**b.step))
    return denom_mean, update_norm


def qh_factors(b: Bucket, s: StepInputs, denom_mean: torch.Tensor | None,
               update_norm: torch.Tensor | None) -> torch.Tensor | None:
    """The full-rank QH term's factor per matrix: -lr (1 - omega) / (mu mean(D)), or (update_rms)
    -lr (1 - omega) ||u_hat / D|| / (mu ||G^||) (||Q N|| = ||N||: Q's columns are orthonormal); None
    at omega = 1. Before a synchronization the diagnostics record the QH term's size over the
    low-rank term's."""
    g = b.group
    omega, lr, bc1 = g["omega"], g["lr"], 1 - g["betas"][0] ** b.step
    if omega >= 1:
        return None
    by_rms = s.qh_scale == "update_rms"
    grad_norms = s.grad_norms() if by_rms or s.record_step else None
    if by_rms:   # ||u_hat / D|| / ||G^||
        tiny = torch.finfo(b.workspace.dtype).tiny
        qh = update_norm / (bc1 * grad_norms.clamp(min=tiny))
    else:
        qh = denom_mean.reciprocal()
    qh.mul_(-lr * (1 - omega) / s.mu)
    if s.record_step:   # |qh| ||G^|| / (lr ||omega N||)
        b.qh_ratio = (qh.abs() * grad_norms / (lr * update_norm * (omega / bc1))).tolist()
    return qh


def apply_eagerly(b: Bucket, s: StepInputs, qh: torch.Tensor | None,
                  ef: list[torch.Tensor] | None) -> None:
    lr = b.group["lr"]
    decay = 1 - lr * b.group["weight_decay"]
    for j in range(len(b.indices)):
        apply_lowrank_(s.weights[j], s.grads[j], b.Q[j], b.workspace[j], b.transposed[j], lr=lr,
                       decay=decay, qh=None if qh is None else qh[j],
                       ef=None if ef is None else ef[j])


def eager_step(b: Bucket, s: StepInputs) -> None:
    """float32 state, any device: Q^T G (usually taken beside the clip's norms), the Adam step on
    the stacked r x q moments, then per matrix one sweep over G, R and W (`apply_lowrank_`)."""
    ef = project_lazily(b, s.grads)
    denom_mean, update_norm = adam_moments(b, b.exp_avg, b.exp_avg_sq, s)
    apply_eagerly(b, s, qh_factors(b, s, denom_mean, update_norm), ef)


def kernels_fit(b: Bucket, weights: list[torch.Tensor], grads: list[torch.Tensor]) -> bool:
    """The kernels read their operands as stored: contiguous ones (a non-contiguous gradient,
    rare, takes the eager way)."""
    return all(t.is_contiguous() for t in itertools.chain(weights, grads))


def compiled_step(b: Bucket, s: StepInputs, *, kernels: Any) -> None:
    """`eager_step`'s math in the compiled CPU kernels (lordo/csrc/lowrank_cpu.cpp): the moments,
    sum(D) and ||u / D|| in one pass, then one sweep per matrix over G, R and W."""
    if not kernels_fit(b, s.weights, s.grads):
        return eager_step(b, s)
    ef = project_lazily(b, s.grads)
    g, low = b.group, b.workspace
    (b1, b2), lr = g["betas"], g["lr"]
    sums = kernels.adam_moments(b.exp_avg, b.exp_avg_sq, low, b1, b2, 1 - b2**b.step, g["eps"],
                                g["omega"] / (1 - b1**b.step))
    denom_mean, update_norm = sums[:, 0] / (low.shape[1] * low.shape[2]), sums[:, 1].sqrt()
    qh = qh_factors(b, s, denom_mean, update_norm)
    kernels.apply_lowrank(s.weights, s.grads, ef or [], b.Q, low, b.transposed[0], lr,
                          1 - lr * g["weight_decay"], [] if qh is None else qh.tolist())


def rounded_step(b: Bucket, s: StepInputs) -> None:
    """bfloat16 state: the arithmetic in the parameters' dtype on copies, what is kept rounded
    stochastically; the error feedback E kept eagerly (one more rank-r product a step)."""
    low, gen = b.workspace, s.rounding
    _, ef = error_feedback_rows(b)
    if ef is not None:
        for j, x in enumerate(s.grads):
            A = ef[j].to(low.dtype).add_(x)                                   # G + E
            project(low[j], b.Q[j], A, b.transposed[j])
            back_project_(A, b.Q[j], low[j], b.transposed[j], alpha=-1.0)     # E = A - Q Q^T A
            stochastic_round_(ef[j], A, gen)
    elif not b.grad_projected or b.q_changed:
        for j, x in enumerate(s.grads):
            project(low[j], b.Q[j], x, b.transposed[j])
    b.q_changed = b.grad_projected = False
    b.step += 1
    u, v = b.exp_avg.to(low.dtype), b.exp_avg_sq.to(low.dtype)
    denom_mean, update_norm = adam_moments(b, u, v, s)
    stochastic_round_(b.exp_avg, u, gen)
    stochastic_round_(b.exp_avg_sq, v, gen)
    apply_eagerly(b, s, qh_factors(b, s, denom_mean, update_norm), None)


def eager_project_and_norm(b: Bucket, weights: list[torch.Tensor], grads: list[torch.Tensor]
                           ) -> list[torch.Tensor]:
    """Q^T G into the workspace and each gradient's norm, one visit to each G."""
    return [project_and_norm(b.workspace[j], b.Q[j], g, b.transposed[j])
            for j, g in enumerate(grads)]


def compiled_project_and_norm(b: Bucket, weights: list[torch.Tensor], grads: list[torch.Tensor],
                              *, kernels: Any) -> list[torch.Tensor]:
    if not kernels_fit(b, weights, grads):
        return eager_project_and_norm(b, weights, grads)
    return list(kernels.project_and_norm(b.workspace, b.Q, grads, b.transposed[0]).unbind(0))


@dataclass(frozen=True)
class Variant:
    name: str
    step: Callable[[Bucket, StepInputs], None]
    # Q^T G beside the clip's norms, when Q is unchanged since the last step; None: norms alone
    project_and_norm: Callable[..., list[torch.Tensor]] | None


def choose_variant(b: Bucket, weight: torch.Tensor, rounded: bool, kernels: Any) -> Variant:
    """The bucket's step variant: `rounded` (state_dtype bfloat16), else compiled where the
    kernels are built (None: not built or not wanted) and apply, else eager. On a GPU the norms
    come alone: it gains nothing from the shared visit to G."""
    on_cpu = weight.device.type == "cpu"
    if rounded:
        eager_e = b.ef is not None
        return Variant("rounded", rounded_step,
                       None if eager_e or not on_cpu else eager_project_and_norm)
    if kernels is not None and on_cpu and weight.dtype == torch.float32:
        return Variant("compiled", functools.partial(compiled_step, kernels=kernels),
                       functools.partial(compiled_project_and_norm, kernels=kernels))
    return Variant("eager", eager_step, eager_project_and_norm if on_cpu else None)
