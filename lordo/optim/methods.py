"""The methods the paper compares: how each steps and communicates."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    """How a method steps and communicates."""

    name: str
    lowrank: bool       # matrices take the low-rank step (else AdamW everywhere)
    local: bool         # local steps + parameter averaging every sync_every (else all-reduce)
    projection: str     # where Q comes from: "" | "gradient" | "global" | "local"
    omega: float        # default weight of the low-rank momentum (1: no full-rank term)
    summary: str
    label: str          # display name in tables and figures


METHODS: dict[str, Method] = {m.name: m for m in (   # in this order in every table and figure
    Method("ddp", False, False, "", 1.0, "AdamW, all-reduce of gradients every step", "DDP"),
    Method("lowrank_ddp", True, False, "gradient", 1.0,
           "low-rank Adam + EF, Q from the all-reduced gradient every proj_every steps",
           "low-rank DDP"),
    Method("local_adam", False, True, "", 1.0,
           "local AdamW, parameters averaged every sync_every (DiLoCo)", "Local AdamW (DiLoCo)"),
    Method("lordo_local", True, True, "local", 1.0,
           "low-rank Adam + EF, each worker's Q from its own update", "LoRDO, local Q"),
    Method("lordo_global", True, True, "global", 1.0,
           "low-rank Adam + EF, shared Q from the averaged update", "LoRDO, global Q (ω = 1)"),
    Method("lordo", True, True, "global", 0.7,
           "lordo_global + full-rank quasi-hyperbolic term (omega < 1)", "LoRDO"),
)}
