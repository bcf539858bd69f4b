"""Which parameters are low-rank matrices (the one rule), and how they are laid out in buckets."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lordo.optim.state import Bucket
from lordo.projection import is_transposed

# A module whose name contains one of these is an embedding; one named like these is an output head.
EMBEDDING_MARKS = ("emb", "wte", "wpe", "shared")
HEAD_NAMES = ("lm_head", "score", "classifier", "head", "output", "embed_out", "qa_outputs")
# galore-torch's group keys: `rank` is honoured (see LoRDO); these have no LoRDO counterpart.
GALORE_KEYS = {
    "update_proj_gap": "LoRDO refreshes Q at every synchronization (lowrank_ddp: every proj_every "
                       "steps); drop the key (or pass proj_every=N to the optimizer)",
    "scale": "LoRDO has no update scale; drop the key and fold the factor into the group's lr",
    "proj_type": "LoRDO always projects the smaller side (galore's 'std'); drop the key",
}


def galore_key_error(key: str, value: Any) -> ValueError:
    return ValueError(f"galore-torch key {key}={value!r} is not supported: {GALORE_KEYS[key]}")


def full_rank_reasons(named: Iterable[tuple[str, torch.Tensor]],
                      model: nn.Module | None = None) -> dict[int, str]:
    """Which 2-D parameters are not low-rank matrices, and why: {id(param): reason}.

    The one rule, from a module (its layers and names) or from parameter names alone:
    * embeddings: `nn.Embedding` weights, or names whose module contains "emb", "wte", "wpe",
      "shared";
    * tied weights: one tensor under two names (e.g. an embedding reused as the output layer);
    * output heads: a 2-D weight with the vocabulary (the largest embedding's size) as its output
      dimension, a module named like a head (`lm_head`, `score`, `classifier`, ...), and (given the
      module) its last `nn.Linear` outside its repeated blocks (`nn.ModuleList`), e.g. a 2 x 64
      classification head whatever its name. Weights inside the repeated blocks (given names only:
      a numbered module in the name) are never heads by size (an MLP's 4 x width side may equal
      the vocabulary); transformers' `Conv1D` (GPT-2) stores its weight in x out: its output
      dimension is its second.
    """
    if model is not None:
        named = list(model.named_parameters(remove_duplicate=False))
    else:
        named = list(named)
    module_of = lambda name: name.rsplit(".", 1)[0] if "." in name else ""
    names_of: dict[int, list[str]] = {}
    for name, p in named:
        names_of.setdefault(id(p), []).append(name)
    reasons: dict[int, str] = {}
    if model is not None:
        embeddings = {id(m.weight): m.num_embeddings for m in model.modules()
                      if isinstance(m, nn.Embedding)}
        in_blocks = {id(p) for m in model.modules() if isinstance(m, nn.ModuleList)
                     for p in m.parameters()}
        linears = [m.weight for m in model.modules()
                   if isinstance(m, nn.Linear) and id(m.weight) not in in_blocks]
        last = linears[-1] if linears else None
        in_x_out = {id(m.weight) for m in model.modules() if type(m).__name__ == "Conv1D"}
    else:
        # a numbered module in the name (h.3.mlp.c_proj) is a repeated block's, as nn.ModuleList
        # names them
        in_blocks = {id(p) for name, p in named
                     if any(part.isdigit() for part in name.split("."))}
        in_x_out = set()
        embeddings = {id(p): p.shape[0] for name, p in named if p.ndim == 2
                      and any(mark in module_of(name).rsplit(".", 1)[-1].lower()
                              for mark in EMBEDDING_MARKS)}
        last = None
    vocab = max(embeddings.values(), default=None)
    for name, p in named:
        if p.ndim != 2 or id(p) in reasons:
            continue
        leaf = module_of(name).rsplit(".", 1)[-1]
        if id(p) in embeddings:
            reasons[id(p)] = "embedding"
        elif len(names_of[id(p)]) > 1:
            reasons[id(p)] = f"tied: {' = '.join(names_of[id(p)])}"
        elif (id(p) not in in_blocks and p.shape[id(p) in in_x_out] == vocab
              or leaf in HEAD_NAMES or p is last):
            reasons[id(p)] = "output head"
    return reasons


def split_params(model: nn.Module) -> list[dict[str, Any]]:
    """Param groups: low-rank matrices (2-D weights of the blocks) and the rest (AdamW).

    The rest: everything `full_rank_reasons` names (embeddings, tied weights, output heads),
    norms and biases (anything not 2-D). Frozen parameters are left out.
    """
    excluded = full_rank_reasons((), model)
    matrices: dict[str, nn.Parameter] = {}
    rest: dict[str, nn.Parameter] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            (matrices if p.ndim == 2 and id(p) not in excluded else rest)[name] = p
    return [dict(params=list(ps.values()), param_names=list(ps), lowrank=lowrank)
            for ps, lowrank in ((matrices, True), (rest, False)) if ps]


def resolve_rank(rank: int | float, shape: tuple[int, ...], name: str) -> int:
    """Rank for one p x q matrix: an int as given, or a fraction of min(p, q)."""
    small = min(shape)
    r = max(1, round(rank * small)) if isinstance(rank, float) else rank
    if not 1 <= r <= small:
        raise ValueError(f"rank={rank!r} is invalid for parameter {name!r} of shape "
                         f"{tuple(shape)}: allowed an int in [1, {small}] or a float fraction in "
                         "(0, 1]")
    return r


def param_names(groups: list[dict[str, Any]], model: nn.Module | None
                ) -> tuple[list[str], list[tuple[str, torch.Tensor]]]:
    """Every parameter's name (given, the model's, else `group<i>.param<j>`) and the parameters
    whose names are known, for the rule."""
    model_names: dict[int, str] = {}
    if model is not None:
        for name, p in model.named_parameters():
            model_names.setdefault(id(p), name)
    names: list[str] = []
    named: list[tuple[str, torch.Tensor]] = []
    for gi, g in enumerate(groups):
        given = g.get("param_names")
        for j, p in enumerate(g["params"]):
            name = given[j] if given else model_names.get(id(p))
            names.append(name or f"group{gi}.param{j}")
            if name:
                named.append((name, p))
    for name, p in zip(names, (p for g in groups for p in g["params"])):
        if type(p).__name__ == "DTensor" or type(getattr(p, "data", None)).__name__ == "DTensor":
            raise ValueError(f"lordo: parameter {name!r} is a DTensor shard (FSDP2 fully_shard or "
                             "tensor parallel), but lordo projects and averages whole matrices on "
                             "every worker: pass the unsharded model, or wrapped in "
                             "DistributedDataParallel (README: Distributed checkpoints and "
                             "sharding)")
        if p.is_complex():
            raise ValueError(f"parameter {name!r} is {p.dtype}: allowed real parameters "
                             "(torch.view_as_real makes a complex one real)")
    return names, named


def lowrank_flags(groups: list[dict[str, Any]], names: list[str],
                  named: list[tuple[str, torch.Tensor]], model: nn.Module | None,
                  explicit_rank: list[bool], method_lowrank: bool) -> list[bool]:
    """Whether each parameter is a low-rank matrix: the first rule of LoRDO's docstring that
    applies (a group's `lowrank`; galore style `rank` groups; `full_rank_reasons`)."""
    reasons = full_rank_reasons(named, model)
    galore = any(explicit_rank)
    flags: list[bool] = []
    unnamed: list[str] = []
    for gi, g in enumerate(groups):
        for p in g["params"]:
            if g["lowrank"] is not None:
                low = g["lowrank"]
            elif galore:
                low = explicit_rank[gi]
            else:
                low = id(p) not in reasons
                if low and p.ndim == 2 and model is None and not g.get("param_names"):
                    unnamed.append(f"{names[len(flags)]} {tuple(p.shape)}")
            # a matrix with no elements has nothing to compress: it stays full-rank
            flags.append(bool(low) and method_lowrank and p.ndim == 2 and p.numel() > 0)
    if unnamed and method_lowrank:
        warnings.warn("lordo: parameters were passed without names, so only their shape decided; "
                      f"low-rank: {', '.join(unnamed)}. Pass model.named_parameters(), groups "
                      "with 'param_names', or model=... to keep embeddings and output heads "
                      "full-rank", stacklevel=4)
    return flags


def plan_buckets(groups: list[dict[str, Any]], is_lowrank: list[bool], names: list[str]
                 ) -> tuple[list[int], list[Bucket]]:
    """The AdamW parameters' indices, and buckets of same-shape low-rank matrices: one per
    (group, oriented shape, rank, dtype, device, storage layout)."""
    adamw_indices: list[int] = []
    buckets: list[Bucket] = []
    by_key: dict[tuple, Bucket] = {}
    i = 0
    for gi, g in enumerate(groups):
        for p in g["params"]:
            if is_lowrank[i]:
                transposed = is_transposed(p.shape)
                shape = (min(p.shape), max(p.shape))
                rank = resolve_rank(g["rank"], tuple(p.shape), names[i])
                key = (gi, shape, rank, p.dtype, p.device, transposed)
                if key not in by_key:
                    by_key[key] = Bucket(g, [], [], shape, rank)
                    buckets.append(by_key[key])
                by_key[key].indices.append(i)
                by_key[key].transposed.append(transposed)
            else:
                adamw_indices.append(i)
            i += 1
    return adamw_indices, buckets
