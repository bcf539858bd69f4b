"""Which path each bucket's low-rank step runs: the compiled CPU kernels (`lordo.kernels`) or the
eager PyTorch one. With `fused=None` both are timed on the bucket's shape at the first step
(cached by `lordo.kernels.calibrated`) and the faster is taken; `step_paths` says what was chosen
and why."""

from __future__ import annotations

import math
import time
import warnings
from typing import Any

import torch

from lordo.kernels import build_error, calibrated, lowrank_cpu
from lordo.optim.options import GROUP_KEYS
from lordo.optim.state import Bucket


def build_kernels(opt: Any, stored: torch.dtype | None) -> Any:
    """The compiled CPU kernels if some bucket of `opt` can use them (float32 on CPU, float32
    state) and `opt.fused` allows; None otherwise."""
    fits = [b for b in opt.buckets if opt.params[b.indices[0]].device.type == "cpu"
            and stored is None and opt.params[b.indices[0]].dtype == torch.float32]
    if opt.fused is not False and fits:
        kernels = lowrank_cpu()
        if kernels is None and opt.fused:
            raise RuntimeError("lordo: fused=True, but the CPU kernels could not be built: "
                               f"{build_error()}")
        return kernels
    if opt.fused and opt.buckets:
        raise ValueError("lordo: fused=True needs float32 low-rank matrices on CPU with "
                         "state_dtype='float32' (on a GPU or in other dtypes the step runs "
                         "its eager path: use fused=None)")
    return None


def choose_paths(opt: Any, stored: torch.dtype | None) -> list[bool]:
    """Per bucket, whether its step runs `opt.kernels`: where they apply (float32 matrices and
    state on CPU) and, with fused=None, measure faster on this CPU and shape (distributed:
    worker 0's choice for every worker, so replicas that step alike stay bit-identical). Sets
    `opt.kernels` to None when no bucket takes them."""
    fits = [opt.kernels is not None and stored is None
            and opt.params[b.indices[0]].device.type == "cpu"
            and opt.params[b.indices[0]].dtype == torch.float32 for b in opt.buckets]
    if opt.fused is not None or opt.kernels is None:
        return fits
    for b, fit in zip(opt.buckets, fits):
        if fit:
            b.calibration = calibrate(opt, b)
    use = [b.calibration is not None and b.calibration["kernels"] <= b.calibration["eager"]
           for b in opt.buckets]
    if opt.world_size > 1:
        chosen = torch.tensor([float(u) for u in use], device=opt.params[0].device)
        opt.comm.broadcast_(chosen, src=0)   # once, a few bytes: not in comm_stats
        use = [b.calibration is not None and k > 0
               for b, k in zip(opt.buckets, chosen.tolist())]
    if not any(use):
        opt.kernels = None
    return use


def calibrate(opt: Any, b: Bucket) -> dict[str, Any]:
    """Seconds per step of bucket b's shape with the kernels and eager on this CPU: measured on
    up to 4 synthetic matrices of its shape at the first use (at the thread count then), then
    cached per CPU model, instruction set and shape, not per thread count: a run takes the same
    path, and so gets the same bits, with any number of threads."""
    stored = b.shape[::-1] if b.transposed[0] else b.shape
    n = min(len(b.indices), 4)
    hp = {**opt.hparams, **{k: b.group[k] for k in GROUP_KEYS}, "rank": b.rank,
          "sync_every": 10**9, "diagnostics": False}
    case = (f"{opt.method.name}: {n} x {stored[0]}x{stored[1]} rank {b.rank}, "
            + ", ".join(f"{k}={hp[k]}" for k in ("error_feedback", "omega", "qh_scale", "clip")))
    seconds, cached = calibrated(
        case, lambda: time_step_paths(type(opt), opt.method.name, hp, stored, n))
    return {**seconds, "cached": cached}


def step_paths(opt: Any) -> list[dict[str, Any]]:
    """`LoRDO.step_paths`: per bucket, the path its step runs and why (see there)."""
    out = []
    for b in opt.buckets:
        row: dict[str, Any] = {
            "matrices": len(b.indices), "rank": b.rank, "path": None,
            "stored_shape": b.shape[::-1] if b.transposed[0] else b.shape,
            "why": "decided at the first step"}
        if opt.initialized:
            kernels = b.variant.name == "compiled"
            row["path"] = f"kernels {opt.kernels.set_isa()}" if kernels else "eager"
            eligible = (opt.hparams["state_dtype"] == "float32"
                        and opt.params[b.indices[0]].device.type == "cpu"
                        and opt.params[b.indices[0]].dtype == torch.float32)
            if b.calibration is not None:
                c = b.calibration
                where = "on worker 0" if opt.world_size > 1 else "here"
                row |= {"why": f"fused=None: the faster {where}"
                        + (" (cached)" if c["cached"] else ""),
                        "kernels_ms": 1e3 * c["kernels"], "eager_ms": 1e3 * c["eager"],
                        "cached": c["cached"]}
            elif opt.fused is not None:
                row["why"] = f"fused={opt.fused}"
            elif not eligible:
                row["why"] = "the kernels take float32 matrices and state on CPU"
            else:
                row["why"] = f"the kernels could not be built: {build_error()}"
        out.append(row)
    return out


def time_step_paths(optimizer: type, method: str, hparams: dict[str, Any],
                    stored: tuple[int, int], n: int, repeats: int = 3) -> dict[str, float]:
    """Seconds per local step of n random matrices stored with this shape (the bucket's path
    alone: no other parameters), with the compiled kernels and eager: the best of `repeats` each,
    taking turns, after two untimed steps (the first computes the projection). `optimizer`: the
    class to time (`LoRDO`, or the subclass being calibrated)."""
    gen = torch.Generator().manual_seed(0)
    opts = {}
    for path, fused in (("kernels", True), ("eager", False)):
        params = [(torch.randn(stored, generator=gen) * 0.02).requires_grad_() for _ in range(n)]
        for p in params:    # global norm 0.5: under a clip of 1 the gradients stay as they are
            p.grad = torch.randn(stored, generator=gen) * (0.5 / math.sqrt(n * p.numel()))
        # under torchrun, the warning that it has no communicator (it needs none) is dropped
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opts[path] = optimizer([{"params": params, "lowrank": True}], method, fused=fused,
                                   **hparams)
        for _ in range(2):
            opts[path].step()
    best = dict.fromkeys(opts, math.inf)
    for _ in range(repeats):
        for path, opt in opts.items():
            t0 = time.perf_counter()
            opt.step()
            best[path] = min(best[path], time.perf_counter() - t0)
    return best
