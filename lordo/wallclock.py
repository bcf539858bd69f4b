"""Wall-clock time to train a token budget at a given interconnect bandwidth, per method.

    w = workload(run.summary, sync_every=16)             # compute and bytes as one run measured them
    train_seconds(w, tokens=2e9, workers=8, gbps=10, latency_s=20e-6)

The model. A ring all-reduce (what NCCL and gloo use for large payloads) of `nbytes` per worker
over M workers runs 2(M-1) steps (reduce-scatter, then all-gather); in each a worker sends 1/M
of the payload and pays the link latency once:

    t_allreduce = 2(M-1)/M * nbytes / bandwidth + 2(M-1) * latency

A run of S = ceil(tokens / tokens per step) optimizer steps that all-reduces its `sync_bytes`
every K steps (K = 1: the gradient all-reduce of `ddp`, `lowrank_ddp`; K = sync_every: the
parameter average of the local methods, which also average once at the end) takes

    T = S * compute_per_step + ceil(S / K) * sum t_allreduce(each collective of a sync)
        + sum of one-off collectives

(the one-offs: the initial broadcast, a global method's first projection and the first step's check
that gradients were not averaged already, costed like all-reduces). Bandwidth
is each worker's link in Gb/s (1e9 bit/s). Computation and communication are assumed not to
overlap: DDP overlaps its gradient buckets with the backward pass, so for the gradient all-reduce
methods T is an upper bound, and LoRDO's advantage at low bandwidth an upper bound with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

BITS_PER_GBIT = 1e9


@dataclass(frozen=True)
class Workload:
    """What one method's run costs per step and per collective (one worker's view)."""

    method: str
    compute_s_per_step: float        # forward, backward and optimizer step, without communication
    tokens_per_step: int             # over all workers
    sync_bytes: int                  # payload of one regular collective
    steps_per_sync: int              # 1: every step (gradient all-reduce); K: local methods
    once_bytes: tuple[int, ...] = ()  # one-off collectives (initial broadcast, first projection)
    extra_sync_bytes: tuple[int, ...] = ()  # further collectives at every sync (proj_source="gradient")


def allreduce_seconds(nbytes: float, workers: int, gbps: float, latency_s: float) -> float:
    """Ring all-reduce of `nbytes` per worker: 2(M-1)/M * bytes / bandwidth + 2(M-1) * latency."""
    if workers == 1:
        return 0.0
    m = workers
    return 2 * (m - 1) / m * nbytes * 8 / (gbps * BITS_PER_GBIT) + 2 * (m - 1) * latency_s


def steps_for(w: Workload, tokens: float) -> int:
    return math.ceil(tokens / w.tokens_per_step)


def train_seconds(w: Workload, tokens: float, workers: int, gbps: float, latency_s: float) -> float:
    """Time to train `tokens` tokens: computation plus every collective, not overlapped."""
    steps = steps_for(w, tokens)
    syncs = math.ceil(steps / w.steps_per_sync)
    comm = syncs * sum(allreduce_seconds(b, workers, gbps, latency_s) for b in (w.sync_bytes, *w.extra_sync_bytes))
    comm += sum(allreduce_seconds(b, workers, gbps, latency_s) for b in w.once_bytes)
    return steps * w.compute_s_per_step + comm


def payload_bytes(w: Workload, tokens: float) -> int:
    """Bytes each worker sends over the run (payload, before the ring's 2(M-1)/M): the byte input of
    `train_seconds`, comparable to a run's measured `comm_bytes`."""
    syncs = math.ceil(steps_for(w, tokens) / w.steps_per_sync)
    return syncs * (w.sync_bytes + sum(w.extra_sync_bytes)) + sum(w.once_bytes)


def break_even_gbps(a: Workload, b: Workload, tokens: float, workers: int, latency_s: float) -> float | None:
    """The bandwidth at which `a` and `b` take equal time, or None if one is faster at every bandwidth.

    T(bandwidth) = fixed + per_bandwidth / bandwidth for each, so equal times have one solution."""
    def parts(w: Workload) -> tuple[float, float]:
        fixed = train_seconds(w, tokens, workers, math.inf, latency_s)
        return fixed, train_seconds(w, tokens, workers, 1.0, latency_s) - fixed
    (fa, va), (fb, vb) = parts(a), parts(b)
    if fa == fb or va == vb:
        return None
    gbps = (vb - va) / (fa - fb)
    return gbps if gbps > 0 else None


ONCE_KINDS = ("initial_broadcast", "first_projection", "gradient_check")   # lordo.optim's one-off collectives


def workload(summary: dict[str, Any], sync_every: int) -> Workload:
    """A Workload from a run's summary.json: its compute time per step and its collectives by kind (the
    regular one: `gradients` every step or `sync` every sync_every steps; other kinds either one-offs
    (`ONCE_KINDS`) or one more collective at every sync)."""
    kinds = summary["comm"]["by_kind"]
    regular = "gradients" if "gradients" in kinds else "sync"
    each = lambda k: kinds[k]["payload_bytes"] // kinds[k]["collectives"]
    once = tuple(each(k) for k in ONCE_KINDS if k in kinds for _ in range(kinds[k]["collectives"]))
    extra = tuple(each(k) for k in kinds if k not in ONCE_KINDS and k != regular)
    # summaries written before compute_s_per_step was recorded: wall time per step, communication included
    compute = summary.get("compute_s_per_step", summary["wall_s"] / summary["steps"])
    return Workload(method=summary["method"], compute_s_per_step=compute,
                    tokens_per_step=summary["tokens"] // summary["steps"],
                    sync_bytes=each(regular), steps_per_sync=1 if regular == "gradients" else sync_every,
                    once_bytes=once, extra_sync_bytes=extra)
