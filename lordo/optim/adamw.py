"""The AdamW step of the parameters that are not low-rank matrices (and of every parameter of
`ddp` and `local_adam`)."""

from __future__ import annotations

import math
from typing import Any

import torch

from lordo.optim.state import stochastic_round_


def adamw_step(params: list[torch.Tensor], grads: list[torch.Tensor],
               states: list[dict[str, torch.Tensor]], group: dict[str, Any], lr: float, k: int,
               step_tensor: torch.Tensor, rounding: torch.Generator | None) -> None:
    """Step k of one param group's parameters in place, at `lr` (the group's, scaled by
    fullrank_lr_scale in low-rank methods). `step_tensor` holds k (torch's fused kernel reads it
    from there); `rounding`: bfloat16 state, the step runs on copies in the parameters' dtype and
    stores them rounded stochastically."""
    kept_m, kept_v = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
    m, v = kept_m, kept_v
    if rounding is not None:
        m = [t.to(p.dtype) for t, p in zip(m, params)]
        v = [t.to(p.dtype) for t, p in zip(v, params)]
    b1, b2 = group["betas"]
    if len({(p.device, p.dtype) for p in params}) == 1:    # torch's fused kernel: no temporaries
        torch._fused_adamw_(params, grads, m, v, [], [step_tensor] * len(params), lr=lr,
                            beta1=b1, beta2=b2, weight_decay=group["weight_decay"],
                            eps=group["eps"], amsgrad=False, maximize=False)
    else:
        torch._foreach_lerp_(m, grads, 1 - b1)
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - b2)
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, math.sqrt(1 - b2**k))
        torch._foreach_add_(denom, group["eps"])
        if group["weight_decay"]:
            torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
        torch._foreach_addcdiv_(params, m, denom, value=-lr / (1 - b1**k))
    if rounding is not None:
        for out, x in zip(kept_m + kept_v, m + v):
            stochastic_round_(out, x, rounding)
