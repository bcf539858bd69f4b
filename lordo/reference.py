"""A short, plain reference of the six methods, transcribed from the method spec (sections 3-4).

Written for reading, not speed: M workers simulated by plain loops, one tensor at a time, exact SVD
for ComputeProjection, eager error feedback. It works in whatever dtype it is given (tests use
float64) and exists to check the fast optimizer in `lordo.optim` against it.

    final = reference_train("lordo", init_params, grad_fn, workers=4, steps=100, matrices={"w"},
                            lr=1e-3, betas=(0.9, 0.999), eps=1e-8, rank=8, sync_every=10)

`grad_fn(worker, step, params)` returns worker m's gradient (a dict like `params`) at its current
parameters; the result is the list of the M workers' parameters after `steps` steps.

A p x q matrix with p > q is handled as its transpose: every low-rank quantity (Q, E, u, v) is kept
in the orientation where the projected side comes first, so one code path serves both cases.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch
from torch import Tensor

METHODS = ("ddp", "lowrank_ddp", "local_adam", "lordo_local", "lordo_global", "lordo")
LOWRANK_METHODS = ("lowrank_ddp", "lordo_local", "lordo_global", "lordo")
LOCAL_METHODS = ("local_adam", "lordo_local", "lordo_global", "lordo")
Params = dict[str, Tensor]


def compute_projection(x: Tensor, r: int) -> Tensor:
    """Top-r left singular vectors of x, each column flipped so its largest-magnitude entry is positive."""
    q = torch.linalg.svd(x, full_matrices=False).U[:, :r]
    largest = q.gather(0, q.abs().argmax(dim=0, keepdim=True))
    return q * torch.sign(largest)


def resolve_rank(rank: int | float, shape: torch.Size) -> int:
    """An int rank as given, or a float fraction of min(p, q), rounded (at least 1); at most min(p, q)."""
    side = min(shape)
    r = rank if isinstance(rank, int) else max(1, round(rank * side))
    return min(r, side)


def oriented(x: Tensor, transposed: bool) -> Tensor:
    """A p x q matrix in the orientation whose first side is the projected one."""
    return x.T if transposed else x


@dataclass
class AdamState:
    m: Tensor
    v: Tensor
    t: int = 0


@dataclass
class LowRankState:
    q: Tensor  # p x r (oriented)
    u: Tensor  # r x q, first moment of the low-rank gradient
    v: Tensor  # r x q, second moment
    e: Tensor  # p x q, error-feedback buffer
    k: int = 0  # the moments' step count


def adamw_step(w: Tensor, g: Tensor, s: AdamState, lr, betas, eps, weight_decay) -> Tensor:
    """torch.optim.AdamW: decoupled weight decay, bias-corrected moments."""
    b1, b2 = betas
    s.t += 1
    s.m = b1 * s.m + (1 - b1) * g
    s.v = b2 * s.v + (1 - b2) * g * g
    denom = torch.sqrt(s.v / (1 - b2**s.t)) + eps
    update = (s.m / (1 - b1**s.t)) / denom
    return w - lr * (update + weight_decay * w)


def lowrank_step(w: Tensor, g_hat: Tensor, s: LowRankState, lr, betas, eps, weight_decay, omega,
                 error_feedback: bool) -> Tensor:
    """Spec section 3: low-rank Adam with error feedback plus the full-rank QH term (oriented tensors)."""
    b1, b2 = betas
    a = g_hat + s.e if error_feedback else g_hat
    g = s.q.T @ a
    if error_feedback:
        s.e = a - s.q @ g
    s.k += 1
    s.u = b1 * s.u + (1 - b1) * g
    s.v = b2 * s.v + (1 - b2) * g * g
    d = torch.sqrt(s.v / (1 - b2**s.k)) + eps
    low = s.q @ ((s.u / (1 - b1**s.k)) / d)
    full = g_hat / d.mean()
    update = omega * low + (1 - omega) * full
    return w - lr * (update + weight_decay * w)


def new_lowrank_state(q: Tensor, cols: int) -> LowRankState:
    r = q.shape[1]
    return LowRankState(q=q, u=q.new_zeros(r, cols), v=q.new_zeros(r, cols), e=q.new_zeros(q.shape[0], cols))


def refresh_projection(s: LowRankState, q_new: Tensor, moments_on_refresh: str, betas) -> None:
    """Replace Q; E stays as is (it lives in full space); the moments are kept, reset or rotated."""
    b1, b2 = betas
    if moments_on_refresh == "reset":
        s.u, s.v, s.k = torch.zeros_like(s.u), torch.zeros_like(s.v), 0
    elif moments_on_refresh == "rotate":
        c = q_new.T @ s.q
        u_hat = s.u / (1 - b1**s.k)
        var = torch.clamp(s.v / (1 - b2**s.k) - u_hat * u_hat, min=0)
        s.u = c @ s.u
        s.v = (1 - b2**s.k) * ((c * c) @ var + (c @ u_hat) ** 2)
    elif moments_on_refresh != "keep":
        raise ValueError(f"moments_on_refresh must be keep, reset or rotate, got {moments_on_refresh!r}")
    s.q = q_new


def clip_by_global_norm(grad: Params, rho: float | None) -> Params:
    """Global-norm clip over the whole gradient, as torch.nn.utils.clip_grad_norm_: scale by
    min(1, rho / (||G|| + 1e-6))."""
    if rho is None:
        return grad
    norm = torch.sqrt(sum((g * g).sum() for g in grad.values()))
    scale = min(1.0, rho / (norm.item() + 1e-6))
    return {n: g * scale for n, g in grad.items()}


def mean(tensors: list[Tensor]) -> Tensor:
    total = tensors[0].clone()
    for t in tensors[1:]:
        total = total + t
    return total / len(tensors)


def reference_train(method: str, init_params: Params, grad_fn: Callable[[int, int, Params], Params],
                    workers: int, steps: int, *, matrices: Collection[str] = (), lr: float = 1e-3,
                    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                    rank: int | float = 0.25, sync_every: int = 1, omega: float | None = None,
                    clip: float | None = None, error_feedback: bool = True,
                    moments_on_refresh: str = "keep", proj_every: int = 1, outer_lr: float = 1.0,
                    outer_momentum: float = 0.0, proj_source: str = "pseudo_gradient") -> list[Params]:
    """Train M workers for `steps` steps from identical `init_params`; return each worker's parameters.

    `matrices` names the parameters that get the low-rank step (low-rank methods only); every other
    parameter uses AdamW. `omega` defaults to 0.7 for `lordo` and 1 otherwise. `proj_source="gradient"`:
    at a synchronization the infrequent methods compute Q from the clipped gradients of that step (the
    worker's own for lordo_local, their mean otherwise) instead of from the pseudo-gradients.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; one of {METHODS}")
    if omega is None:
        omega = 0.7 if method == "lordo" else 1.0
    lowrank = set(matrices) if method in LOWRANK_METHODS else set()
    transposed = {n: init_params[n].shape[0] > init_params[n].shape[1] for n in lowrank}
    ranks = {n: resolve_rank(rank, init_params[n].shape) for n in lowrank}
    adam_hp = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    params = [{n: t.clone() for n, t in init_params.items()} for _ in range(workers)]
    anchor = {n: t.clone() for n, t in init_params.items()}
    outer_buf = {n: torch.zeros_like(t) for n, t in init_params.items()}
    adam = [{n: AdamState(torch.zeros_like(t), torch.zeros_like(t)) for n, t in init_params.items()
             if n not in lowrank} for _ in range(workers)]
    low: list[dict[str, LowRankState]] = [{} for _ in range(workers)]

    def set_projection(m: int, n: str, source: Tensor) -> None:
        """ComputeProjection of `source` (a p x q matrix) into worker m's state for matrix n."""
        x = oriented(source, transposed[n])
        q = compute_projection(x, ranks[n])
        if n in low[m]:
            refresh_projection(low[m][n], q, moments_on_refresh, betas)
        else:
            low[m][n] = new_lowrank_state(q, x.shape[1])

    for step in range(steps):
        grads = [grad_fn(m, step, params[m]) for m in range(workers)]
        if method in ("ddp", "lowrank_ddp"):
            averaged = clip_by_global_norm({n: mean([g[n] for g in grads]) for n in init_params}, clip)
            grads = [averaged] * workers
        else:
            grads = [clip_by_global_norm(g, clip) for g in grads]

        # Projections that come from gradients: lowrank_ddp's periodic refresh (its grads[m] already is the
        # averaged, clipped gradient), and the first Q of the infrequent methods: for lordo_local from the
        # worker's own clipped gradient, for the global ones from the worker-averaged clipped gradient.
        if method == "lowrank_ddp" and step % proj_every == 0 or method in LOCAL_METHODS and step == 0:
            own = method in ("lowrank_ddp", "lordo_local")
            for n in lowrank:
                shared = mean([g[n] for g in grads])
                for m in range(workers):
                    set_projection(m, n, grads[m][n] if own else shared)

        for m in range(workers):
            for n in init_params:
                w, g = params[m][n], grads[m][n]
                if n in lowrank:
                    t = transposed[n]
                    new = lowrank_step(oriented(w, t), oriented(g, t), low[m][n], omega=omega,
                                       error_feedback=error_feedback, **adam_hp)
                    params[m][n] = oriented(new, t)
                else:
                    params[m][n] = adamw_step(w, g, adam[m][n], **adam_hp)

        if method in LOCAL_METHODS and (step + 1) % sync_every == 0:
            deltas = [{n: params[m][n] - anchor[n] for n in init_params} for m in range(workers)]
            for n in init_params:
                delta = mean([d[n] for d in deltas])
                # Outer Nesterov SGD on the outer gradient -delta; with outer_lr 1 and momentum 0 this is
                # exactly plain averaging, anchor + delta.
                g_out = -delta
                outer_buf[n] = outer_momentum * outer_buf[n] + g_out
                anchor[n] = anchor[n] - outer_lr * (g_out + outer_momentum * outer_buf[n])
                for m in range(workers):
                    params[m][n] = anchor[n].clone()
                if n in lowrank:
                    sources = [d[n] for d in deltas] if proj_source == "pseudo_gradient" else [g[n] for g in grads]
                    for m in range(workers):
                        set_projection(m, n, sources[m] if method == "lordo_local" else mean(sources))
    return params
