"""The step's gradients before any update: the global-norm clip and the rule for non-finite
gradients (`nonfinite`), with each gradient's norm taken, where it can be, in the same visit to G
as the low-rank step's Q^T G."""

from __future__ import annotations

import math
from typing import Any

import torch

from lordo.optim.state import Bucket


def finite_and_clipped(opt: Any, grads: list[torch.Tensor]) -> bool:
    """Clip by the global norm in place; False if the step is to be skipped (non-finite)."""
    clip, rule = opt.hparams["clip"], opt.hparams["nonfinite"]
    for b in opt.buckets:
        b.grad_projected = False
    opt.clip_norms = None
    if clip is None and rule == "off":
        return True
    norms = grad_norms(opt, grads)
    total = torch.linalg.vector_norm(torch.stack(norms))
    opt.clip_norms = (norms, 1.0)
    if rule == "off":   # no host sync: scale by a tensor factor (1 when the clip does not bite)
        opt.clip_norms = (norms, (clip / (total + 1e-6)).clamp(max=1.0))
        scale_grads(opt, grads, opt.clip_norms[1])
        return True
    # The step's one host sync. Knowing the norm on the host also spares a step under the
    # clip a read and write of every gradient to multiply it by 1.
    total = total.item()
    if not math.isfinite(total):
        bad = next((repr(n) for n, g in zip(opt.names, grads) if not torch.isfinite(g).all()),
                   "(every gradient is finite, their global norm overflowed)")
        if rule == "raise":
            raise FloatingPointError(f"non-finite gradient in parameter {bad} at step "
                                     f"{opt.steps}; nothing was updated (use "
                                     "nonfinite='skip' to skip such steps)")
        opt.skipped_steps += 1
        return False
    if clip is not None and clip / (total + 1e-6) < 1.0:
        scale_grads(opt, grads, clip / (total + 1e-6))
        opt.clip_norms = (norms, clip / (total + 1e-6))
    return True


def grad_norms(opt: Any, grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each gradient's norm. Where the step will need Q^T G (Q unchanged since the last step)
    and its variant takes it beside the norm (on a CPU: `Variant.project_and_norm`), the
    product is taken in the same visit to G: it reads G from memory at the pace of its
    arithmetic, and the norm then reads it again from cache. The other gradients' norms: the
    kernels' where they run, else one multi-tensor norm."""
    norms: list[torch.Tensor | None] = [None] * len(grads)
    for b in opt.buckets:
        take = b.variant.project_and_norm
        if take is None or b.Q is None or b.q_changed:
            continue
        weights = [opt.params[i] for i in b.indices]
        for i, n in zip(b.indices, take(b, weights, [grads[i] for i in b.indices])):
            norms[i] = n
        b.grad_projected = True
    rest = [i for i, n in enumerate(norms) if n is None]
    if rest:   # empty when every parameter is a matrix already projected (foreach refuses [])
        tensors = [grads[i] for i in rest]
        compiled = opt.kernels is not None and all(
            t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()
            for t in tensors)
        # the kernels' run on every thread (torch's takes one a tensor: 16 ms for 125m's
        # embedding)
        rest_norms = opt.kernels.norms(tensors).unbind(0) if compiled else \
            torch._foreach_norm(tensors)
        for i, n in zip(rest, rest_norms):
            norms[i] = n
    return norms


def scale_grads(opt: Any, grads: list[torch.Tensor], factor: float | torch.Tensor) -> None:
    """The clip, in place: the gradients and the products already taken of them."""
    torch._foreach_mul_(grads, factor)
    for b in opt.buckets:
        if b.grad_projected:
            b.workspace.mul_(factor)


def clipped_norms(opt: Any, b: Bucket, grads: list[torch.Tensor]) -> torch.Tensor:
    """||G^|| of the bucket's matrices: the clip's norms times its factor when it took them,
    else one more read of each gradient."""
    if opt.clip_norms is None:
        return torch.stack(torch._foreach_norm(grads))
    norms, factor = opt.clip_norms
    return torch.stack([norms[i] for i in b.indices]).mul_(factor)
