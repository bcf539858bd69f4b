"""A short, plain reference of the six methods, transcribed from the method spec (sections 3-4).

Written for reading, not speed: M workers simulated by plain loops, one tensor at a time, exact SVD
for ComputeProjection, eager error feedback. It works in whatever dtype it is given (tests use
float64) and exists to check the fast optimizer in `lordo.optim` against it.

    final = reference_train("lordo", init_params, grad_fn, workers=4, steps=100, matrices={"w"},
                            lr=1e-3, betas=(0.9, 0.999), eps=1e-8, rank=8, sync_every=10)

`grad_fn(worker, step, params)` returns worker m's gradient (a dict like `params`) at its current
parameters; the result is the list of the M workers' parameters after `steps` steps.

With `state_dtype="bfloat16"` every moment and error-feedback buffer is stored as a bfloat16 value
(`stochastic_round`: the arithmetic stays in the reference's dtype, only what is kept between steps
is rounded, without bias).

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


def stochastic_round(x: Tensor, gen: torch.Generator) -> Tensor:
    """x as one of its two neighbouring bfloat16 values (in x's dtype), the upper one with probability
    (x - lower) / (upper - lower): E[result] = x, so rounded sums do not drift."""
    near = x.to(torch.bfloat16)
    other = torch.nextafter(near, torch.where(x > near.to(x.dtype), torch.inf, -torch.inf).to(torch.bfloat16))
    near64, other64 = near.to(x.dtype), other.to(x.dtype)
    gap = other64 - near64
    p_other = torch.where(gap != 0, (x - near64) / torch.where(gap != 0, gap, 1), 0)
    return torch.where(torch.rand(x.shape, generator=gen, dtype=x.dtype) < p_other, other64, near64)


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


def keep(x: Tensor) -> Tensor:
    """State stored at full precision: as computed."""
    return x


def adamw_step(w: Tensor, g: Tensor, s: AdamState, lr, betas, eps, weight_decay, store=keep) -> Tensor:
    """torch.optim.AdamW: decoupled weight decay, bias-corrected moments (kept through `store`)."""
    b1, b2 = betas
    s.t += 1
    m = b1 * s.m + (1 - b1) * g
    v = b2 * s.v + (1 - b2) * g * g
    s.m, s.v = store(m), store(v)         # this step uses m and v as computed, the next what is kept
    denom = torch.sqrt(v / (1 - b2**s.t)) + eps
    update = (m / (1 - b1**s.t)) / denom
    return w - lr * (update + weight_decay * w)


def lowrank_step(w: Tensor, g_hat: Tensor, s: LowRankState, lr, betas, eps, weight_decay, omega,
                 error_feedback: bool, qh_scale: str = "mean_denom", mu: float = 1.0, store=keep) -> Tensor:
    """Spec section 3: low-rank Adam with error feedback plus the full-rank QH term (oriented tensors);
    E, u and v are kept through `store`. `qh_scale="update_rms"`: the full-rank term has the RMS of the
    low-rank update `low` instead of the spec's scale 1 / mean(D); either is divided by the scaling factor mu."""
    b1, b2 = betas
    a = g_hat + s.e if error_feedback else g_hat
    g = s.q.T @ a
    if error_feedback:
        s.e = store(a - s.q @ g)
    s.k += 1
    u = b1 * s.u + (1 - b1) * g
    v = b2 * s.v + (1 - b2) * g * g
    s.u, s.v = store(u), store(v)
    d = torch.sqrt(v / (1 - b2**s.k)) + eps
    low = s.q @ ((u / (1 - b1**s.k)) / d)
    if qh_scale == "mean_denom":
        full = g_hat / d.mean()
    elif qh_scale == "update_rms":
        g_norm = torch.linalg.norm(g_hat)
        full = g_hat * (torch.linalg.norm(low) / g_norm) if g_norm > 0 else torch.zeros_like(g_hat)
    else:
        raise ValueError(f"qh_scale must be mean_denom or update_rms, got {qh_scale!r}")
    update = omega * low + (1 - omega) * full / mu
    return w - lr * (update + weight_decay * w)


def new_lowrank_state(q: Tensor, cols: int) -> LowRankState:
    r = q.shape[1]
    return LowRankState(q=q, u=q.new_zeros(r, cols), v=q.new_zeros(r, cols), e=q.new_zeros(q.shape[0], cols))


def refresh_projection(s: LowRankState, q_new: Tensor, moments_on_refresh: str, betas, store=keep) -> None:
    """Replace Q; E stays as is (it lives in full space); the moments are kept, reset or rotated."""
    b1, b2 = betas
    if moments_on_refresh == "reset":
        s.u, s.v, s.k = torch.zeros_like(s.u), torch.zeros_like(s.v), 0
    elif moments_on_refresh == "rotate":
        c = q_new.T @ s.q
        u_hat = s.u / (1 - b1**s.k)
        var = torch.clamp(s.v / (1 - b2**s.k) - u_hat * u_hat, min=0)
        s.u = store(c @ s.u)
        s.v = store((1 - b2**s.k) * ((c * c) @ var + (c @ u_hat) ** 2))
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
                    outer_momentum: float = 0.0, proj_source: str = "pseudo_gradient", qh_scale: str = "mean_denom",
                    mu: float = 1.0, average_moments: str = "none", average_moments_every: int = 1,
                    ef_on_sync: str = "keep", fullrank_lr_scale: float = 1.0, state_dtype: str = "float32",
                    seed: int = 0) -> list[Params]:
    """Train M workers for `steps` steps from identical `init_params`; return each worker's parameters.

    `matrices` names the parameters that get the low-rank step (low-rank methods only); every other
    parameter uses AdamW. `omega` defaults to 0.7 for `lordo` and 1 otherwise. `proj_source="gradient"`:
    at a synchronization the infrequent methods compute Q from the clipped gradients of that step (the
    worker's own for lordo_local, their mean otherwise) instead of from the pseudo-gradients. `qh_scale`: see
    `lowrank_step`. `state_dtype`
    "bfloat16" stores moments and error feedback rounded stochastically (random draws from `seed`).
    At the s-th synchronization, before Q is refreshed: if s is a multiple of `average_moments_every`, the
    workers' moments named by `average_moments` ("lowrank": u, v; "adamw": the AdamW parameters' m, v; "all";
    "none") are replaced by their mean; `ef_on_sync` "average" replaces each E by the workers' mean, "reset" by
    zeros, and "reproject" (after the refresh) by Q_new Q_new^T E; "keep" leaves it. In the low-rank methods
    the AdamW parameters step with lr * `fullrank_lr_scale`.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; one of {METHODS}")
    if omega is None:
        omega = 0.7 if method == "lordo" else 1.0
    if method not in LOWRANK_METHODS:
        fullrank_lr_scale = 1.0
    lowrank = set(matrices) if method in LOWRANK_METHODS else set()
    transposed = {n: init_params[n].shape[0] > init_params[n].shape[1] for n in lowrank}
    ranks = {n: resolve_rank(rank, init_params[n].shape) for n in lowrank}
    if state_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"state_dtype must be float32 or bfloat16, got {state_dtype!r}")
    gen = torch.Generator().manual_seed(seed)
    store = (lambda x: stochastic_round(x, gen)) if state_dtype == "bfloat16" else keep
    adam_hp = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, store=store)

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
            refresh_projection(low[m][n], q, moments_on_refresh, betas, store)
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
                                       error_feedback=error_feedback, qh_scale=qh_scale, mu=mu, **adam_hp)
                    params[m][n] = oriented(new, t)
                else:
                    params[m][n] = adamw_step(w, g, adam[m][n], **adam_hp | dict(lr=lr * fullrank_lr_scale))

        if method in LOCAL_METHODS and (step + 1) % sync_every == 0:
            deltas = [{n: params[m][n] - anchor[n] for n in init_params} for m in range(workers)]
            if ((step + 1) // sync_every) % average_moments_every == 0:
                for n in init_params:
                    if n in lowrank and average_moments in ("lowrank", "all"):
                        u, v = mean([low[m][n].u for m in range(workers)]), mean([low[m][n].v for m in range(workers)])
                        for m in range(workers):
                            low[m][n].u, low[m][n].v = u.clone(), v.clone()
                    if n not in lowrank and average_moments in ("adamw", "all"):
                        m1 = mean([adam[m][n].m for m in range(workers)])
                        m2 = mean([adam[m][n].v for m in range(workers)])
                        for m in range(workers):
                            adam[m][n].m, adam[m][n].v = m1.clone(), m2.clone()
            for n in lowrank:
                if ef_on_sync == "average":
                    e = mean([low[m][n].e for m in range(workers)])
                    for m in range(workers):
                        low[m][n].e = e.clone()
                elif ef_on_sync == "reset":
                    for m in range(workers):
                        low[m][n].e = torch.zeros_like(low[m][n].e)
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
                        if ef_on_sync == "reproject":
                            s = low[m][n]
                            s.e = s.q @ (s.q.T @ s.e)
    return params
