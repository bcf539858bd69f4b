"""The optimizer's state: its layout (stacked buckets of same-shape matrices), stochastic rounding
of low-precision state, the `state` view torch's API exposes, and checkpoints (`state_dict`)."""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any

import torch

from lordo.optim.options import STATE_DTYPES


@dataclass
class Bucket:
    """Same-shape matrices of one param group, oriented so p <= q, with stacked state."""

    group: dict[str, Any]
    indices: list[int]              # positions in LoRDO.params
    transposed: list[bool]          # weight stored q x p: its oriented view is .mT
    shape: tuple[int, int]          # oriented (p, q), p <= q
    rank: int
    Q: torch.Tensor | None = None   # (n, p, r)
    ef: torch.Tensor | None = None  # (n, p, q) error feedback: lazy R (E = (I - Q Q^T) R), or E
    exp_avg: torch.Tensor | None = None      # (n, r, q)
    exp_avg_sq: torch.Tensor | None = None   # (n, r, q)
    step: int = 0                   # the moments' step count k
    q_changed: bool = False         # Q changed since the last step: project R, not only G
    grad_projected: bool = False    # workspace holds Q^T G of this step, taken beside the norms
    explored: list[torch.Tensor] | None = field(default=None)  # diagnostics: union basis per matrix
    visits: torch.Tensor | None = None  # diagnostics: (n, p, p) sum of Q Q^T over refreshes
    qh_ratio: list[float] | None = None  # diagnostics: QH term's size / low-rank term's
    coherence: list[list[float]] | None = None  # diagnostics: per matrix, at the last sync
    workspace: torch.Tensor | None = None  # (n, r, q) of the step: no (n, p, q) temporaries
    variant: Any = None             # lordo.optim.lowrank.Variant, chosen when the state is built
    calibration: dict[str, Any] | None = None   # fused=None: seconds per step of each path, cached?


def zeros_like_weights(p: torch.Tensor, n: int, rows: int, cols: int, transposed: bool,
                       dtype: torch.dtype) -> torch.Tensor:
    """Zeros of oriented shape (n, rows, cols) on p's device, stored (n, cols, rows) and viewed
    .mT if the weights are stored transposed."""
    if transposed:
        return p.new_zeros(n, cols, rows, dtype=dtype).mT
    return p.new_zeros(n, rows, cols, dtype=dtype)


def stochastic_round_(out: torch.Tensor, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Store `x` in bfloat16 `out`, rounded up with probability (x - lower) / (upper - lower), so
    E[out] = x: 16 uniform random bits are added below bfloat16's last mantissa bit of float32 x,
    then those bits are cut off (sign-magnitude: the same for negative x)."""
    bits = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, generator=gen, device=x.device)
    bits.add_(x.to(torch.float32).view(torch.int32)).bitwise_and_(-(1 << 16))
    return out.copy_(bits.view(torch.float32))


def rounding_generator(hp: dict[str, Any], rank: int, step: int, stream: int,
                       device: torch.device) -> torch.Generator | None:
    """The random bits of stochastic rounding (state_dtype bfloat16), from (seed, worker rank,
    step, stream) alone: the same in simulated and torchrun runs and after a resume; None in
    float32."""
    if STATE_DTYPES[hp["state_dtype"]] is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed((((hp["seed"] * 1_000_003 + rank) * 1_000_003 + step) * 1009 + stream)
                    % 2**63)
    return gen


class StateView(MutableMapping):
    """`LoRDO.state`: parameter -> its state, AdamW's own dicts and views into the buckets."""

    def __init__(self, opt: Any):
        self._opt = opt

    def __getitem__(self, p: torch.Tensor) -> dict[str, Any]:
        opt = self._opt
        if not opt.initialized:            # no state yet (torch's optimizers: an empty dict)
            return {}
        if p in opt.adamw_state:           # only AdamW parameters are kept here: the fast path
            return opt.adamw_state[p]
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
            out["anchor"] = opt.anchor[i]
        return out

    def __setitem__(self, p: torch.Tensor, value: dict[str, Any]) -> None:
        self._opt.adamw_state[p] = value

    def __delitem__(self, p: torch.Tensor) -> None:
        del self._opt.adamw_state[p]

    def __iter__(self):
        return iter(self._opt.params if self._opt.initialized else ())

    def __len__(self) -> int:
        return len(self._opt.params) if self._opt.initialized else 0


def memory_stats(opt: Any, accelerator: bool | None = None) -> dict[str, int]:
    """See LoRDO.memory_stats."""
    hp = opt.hparams
    state = STATE_DTYPES[hp["state_dtype"]]

    def nbytes(i: int, kept: bool = False) -> int:   # kept: stored in state_dtype
        p = opt.params[i]
        return p.numel() * (state.itemsize if kept and state is not None else p.element_size())

    def per_entry(b: Bucket, kept: bool = True) -> int:   # bytes of one entry, all matrices
        size = state.itemsize if kept and state is not None else \
            opt.params[b.indices[0]].element_size()
        return len(b.indices) * size

    every = sum(map(nbytes, range(len(opt.params))))
    local = opt.method.local
    out = {
        "moments": 2 * sum(nbytes(i, True) for i in opt.adamw_indices)
        + sum(2 * per_entry(b) * b.rank * b.shape[1] for b in opt.buckets),
        "projection": sum(per_entry(b, False) * b.shape[0] * b.rank for b in opt.buckets),
        "error_feedback": sum(per_entry(b) * b.shape[0] * b.shape[1] for b in opt.buckets
                              if hp["error_feedback"]),
        "anchor": every if local else 0,
        "outer_momentum": every if local and hp["outer_momentum"] else 0,
    }
    out["total"] = sum(out.values())
    on_accelerator = opt.params[0].device.type != "cpu" if accelerator is None else accelerator
    off_device = out["anchor"] + out["outer_momentum"] if hp["host_anchor"] else 0
    out["device"] = out["total"] - off_device if on_accelerator else 0
    out["host"] = out["total"] - out["device"]
    return out


def state_dict(opt: Any) -> dict[str, Any]:
    """Everything as tensors and plain values (LoRDO.state_dict without torch's hooks)."""
    state: dict[int, dict[str, Any]] = {i: {} for i in range(len(opt.params))}
    for i in opt.adamw_indices:
        state[i].update({k: v.clone() for k, v in opt.state[opt.params[i]].items()})
    for b in opt.buckets:
        for j, i in enumerate(b.indices):
            s = state[i]
            s.update(exp_avg=b.exp_avg[j].clone(), exp_avg_sq=b.exp_avg_sq[j].clone(),
                     step=b.step, fresh=b.q_changed)
            if b.Q is not None:
                s["Q"] = b.Q[j].clone()
            if b.ef is not None:
                s["error_feedback_accum"] = b.ef[j].clone()
            if b.explored is not None and b.explored[j] is not None:
                s["explored_basis"] = b.explored[j].clone()
                s["visits"] = b.visits[j].clone()
    if opt.method.local:
        for i in range(len(opt.params)):
            state[i]["anchor"] = opt.anchor[i].clone()
            if opt.outer_velocity is not None:
                state[i]["outer_momentum"] = opt.outer_velocity[i].clone()
    groups = [{k: (list(v) if k == "betas" else v) for k, v in g.items()
               if k not in ("params", "param_names")} for g in opt.param_groups]
    offsets = [0]
    for g in opt.param_groups:
        offsets.append(offsets[-1] + len(g["params"]))
    for g, a, z in zip(groups, offsets, offsets[1:]):
        g["params"] = list(range(a, z))
    # lordo's own counters ride in the first param group: torch.distributed.checkpoint's
    # get_optimizer_state_dict keeps only "state" and "param_groups"
    groups[0]["lordo"] = {
        "method": opt.method.name,
        "hparams": {k: (list(v) if isinstance(v, tuple) else v) for k, v in opt.hparams.items()},
        "steps": opt.steps, "skipped_steps": opt.skipped_steps, "adam_steps": opt.adam_steps,
        "refreshes": opt.refreshes, "projection_seconds": opt.projection_seconds,
        "comm_seconds": opt.collectives.seconds,
        "comm_log": {k: list(v) for k, v in opt.collectives.log.items()},
        "names": list(opt.names)}
    return {"state": state, "param_groups": groups}


def check_shapes(opt: Any, state: dict[int, dict[str, Any]]) -> None:
    """Raise ValueError naming the first parameter whose saved state does not fit `opt`."""
    shapes = [{k: tuple(p.shape) for k in ("anchor", "outer_momentum", "exp_avg", "exp_avg_sq")}
              for p in opt.params]
    for b in opt.buckets:
        (rows, cols), r = b.shape, b.rank
        for i in b.indices:
            saved = state[i].get("exp_avg")
            if saved is not None and saved.ndim == 2 and saved.shape[1] == cols \
                    and saved.shape[0] != r:
                raise ValueError(f"checkpoint has rank {saved.shape[0]} for parameter "
                                 f"{opt.names[i]!r}, this optimizer rank {r}: build it with the "
                                 "checkpoint's rank")
            shapes[i] |= {"exp_avg": (r, cols), "exp_avg_sq": (r, cols), "Q": (rows, r),
                          "error_feedback_accum": (rows, cols)}
    for i in range(len(opt.params)):
        for k, shape in shapes[i].items():
            t = state[i].get(k)
            if isinstance(t, torch.Tensor) and tuple(t.shape) != shape:
                raise ValueError(f"checkpoint tensor {k!r} of parameter {opt.names[i]!r} has "
                                 f"shape {tuple(t.shape)}, this optimizer expects {shape}")


def load_state_dict(opt: Any, saved: dict[str, Any]) -> None:
    """Load a `state_dict()` into `opt` (LoRDO.load_state_dict without torch's hooks); every
    tensor's shape is checked before anything changes."""
    # in the first param group; checkpoints written before that hold it at the top
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    meta = (saved["lordo"] if "lordo" in saved else groups[0].get("lordo")) \
        if isinstance(saved, dict) and ("lordo" in saved or groups) else None
    if meta is None:
        keys = sorted(saved)[:4] if isinstance(saved, dict) else type(saved).__name__
        raise ValueError(f"state_dict is not a lordo optimizer's (no 'lordo' entry; it holds "
                         f"{keys}): load what LoRDO.state_dict() saved (another optimizer's state "
                         "does not carry over)")
    if meta["method"] != opt.method.name:
        raise ValueError(f"checkpoint is for method {meta['method']!r}, this optimizer is "
                         f"{opt.method.name!r}")
    if len(meta["names"]) != len(opt.params):
        raise ValueError(f"checkpoint has {len(meta['names'])} parameters, this optimizer "
                         f"{len(opt.params)}")
    # by position in the groups, as torch.optim: the keys may be indices or names
    # (get_optimizer_state_dict)
    keys = [k for g in saved["param_groups"] for k in g["params"]]
    state = {i: saved["state"].get(k, saved["state"].get(str(k), {})) for i, k in enumerate(keys)}
    check_shapes(opt, state)
    opt.init_state()
    opt.aligned = meta["steps"] > 0
    for g, saved_group in zip(opt.param_groups, saved["param_groups"]):
        g.update({k: (tuple(v) if k == "betas" else v) for k, v in saved_group.items()
                  if k not in ("params", "lordo")})
    for i in opt.adamw_indices:
        for k, t in opt.state[opt.params[i]].items():
            t.copy_(state[i][k])
    for b in opt.buckets:
        first = state[b.indices[0]]
        b.step, b.q_changed = int(first["step"]), bool(first["fresh"])
        b.exp_avg.copy_(torch.stack([state[i]["exp_avg"] for i in b.indices]))
        b.exp_avg_sq.copy_(torch.stack([state[i]["exp_avg_sq"] for i in b.indices]))
        if "Q" in first:
            b.Q = torch.stack([state[i]["Q"] for i in b.indices]).to(b.workspace)
        if b.ef is not None:
            b.ef.copy_(torch.stack([state[i]["error_feedback_accum"] for i in b.indices]))
        if "explored_basis" in first:
            b.explored = [state[i]["explored_basis"].to(b.workspace) for i in b.indices]
            b.visits = torch.stack([state[i]["visits"] for i in b.indices]).to(
                b.workspace.device, torch.float32)
    if opt.method.local:
        for i in range(len(opt.params)):
            opt.anchor[i].copy_(state[i]["anchor"])
            if opt.outer_velocity is not None:
                opt.outer_velocity[i].copy_(state[i]["outer_momentum"])
    opt.steps, opt.skipped_steps = meta["steps"], meta["skipped_steps"]
    opt.adam_steps, opt.refreshes = meta["adam_steps"], meta["refreshes"]
    opt.projection_seconds = meta["projection_seconds"]
    opt.collectives.seconds = meta.get("comm_seconds", 0.0)   # absent from older checkpoints
    opt.collectives.log = {k: list(v) for k, v in meta["comm_log"].items()}
