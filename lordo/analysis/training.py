"""The notebooks' runs: one TrainConfig per run from the notebook's parameters, trained (or loaded) in groups."""

from __future__ import annotations

from typing import Any

from lordo.config import (
    TrainConfig,
    for_method,
    make_config,
    read_config_file,
    unused_fields,
)
from lordo.model import PRESETS, preset_params
from lordo.optim import DEFAULTS, METHODS, resolve_rank
from lordo.paths import repo_path
from lordo.runs import Run

# Notebook parameters that are TrainConfig fields shared by every run of a notebook (None: the config
# file's value under config_dir, else the package default).
TRAIN_FIELDS = ("preset", "workers", "steps", "batch_size", "seq_len", "lr", "sync_every", "proj_every", "rank",
                "eval_every", "eval_batches", "launcher")
# Single changes to LoRDO at the shared point, by name (notebook 05, lordo.diagnosis.ablation): each isolates
# one mechanism LoRDO's gap to low-rank DDP could come from. Here, not in lordo.diagnosis, because the notebook
# parameters are checked against it and diagnosis builds on this package.
ABLATIONS: dict[str, dict[str, Any]] = {
    "Q from gradient": {"proj_source": "gradient"},     # lowrank_ddp's projection source, one more all-reduce
    "no QH term": {"omega": 1.0},                       # omega = 1: lordo_global
    "omega 0.9": {"omega": 0.9},
    "no error feedback": {"error_feedback": False},
    "moments reset": {"moments_on_refresh": "reset"},
    "no clipping": {"clip": None},
    "QH term at the update's RMS": {"qh_scale": "update_rms"},   # the full-rank term sized like the low-rank one
    # the local-update penalty (lordo.penalty): optimizer states at synchronizations, the QH term's factor mu, the
    # full-rank parameters' lr
    "moments averaged": {"average_moments": "all"},
    "AdamW moments averaged": {"average_moments": "adamw"},
    "low-rank moments averaged": {"average_moments": "lowrank"},
    "AdamW moments averaged every 4th sync": {"average_moments": "adamw", "average_moments_every": 4},
    "error feedback averaged": {"ef_on_sync": "average"},
    "error feedback reset": {"ef_on_sync": "reset"},
    "error feedback re-projected": {"ef_on_sync": "reproject"},
    "mu 4": {"mu": 4.0},
    "mu 16": {"mu": 16.0},
    "full-rank lr x0.3": {"fullrank_lr_scale": 0.3},
}


def variant_options(variant: str) -> tuple[str, dict[str, Any]]:
    """A variant's method and options: '<method>', or '<method>, <ablation>, ...' with ablations of ABLATIONS
    applied in order ('lordo, QH term at the update's RMS, Q from gradient')."""
    method, *ablations = variant.split(", ")
    options: dict[str, Any] = {}
    for ablation in ablations:
        options |= ABLATIONS[ablation]
    return method, options


def min_side(preset: str) -> int:
    """min(p, q) over the preset's low-rank matrices (attention and MLP weights)."""
    c = PRESETS[preset]
    return min(c["d_model"], c["d_ff"])


def run_config(P: dict[str, Any], method: str, **overrides: Any) -> TrainConfig:
    """One run: the notebook's TRAIN_FIELDS, under P["config_dir"] the file <preset>.yaml (as `method` reads it:
    lordo.config.for_method), then overrides.

    Fields the method ignores are dropped, ranks become ints and optimizer fields at their defaults are left
    unset, so that the same run asked for by two notebooks has one config hash and is trained once.
    """
    fields = {k: P[k] for k in TRAIN_FIELDS if P.get(k) is not None}
    fields |= {k: v for k, v in overrides.items() if v is not None}
    base: dict[str, Any] = {}
    if P.get("config_dir"):
        base = for_method(read_config_file(repo_path(P["config_dir"]) / f"{fields.get('preset', 'tiny')}.yaml"),
                          method)
    m = METHODS[method]
    preset = fields.get("preset", base.get("preset", "tiny"))
    if "rank" in fields and isinstance(fields["rank"], float):
        fields["rank"] = matrix_rank(fields["rank"], preset)
    for k in ("rank", "omega", "moments_on_refresh", "sync_every", "proj_every"):
        if k in unused_fields(method) or fields.get(k) == (m.omega if k == "omega" else DEFAULTS.get(k)):
            fields.pop(k, None)
    return make_config({**base, **fields, "method": method, "progress": False})


def ladder_config(P: dict[str, Any], preset: str, method: str, seed: int) -> TrainConfig:
    """A rung of notebook 04's ladder: `method` on `preset` with the preset's `ladder_overrides`. Under
    `equal_tokens_per_param` the rung trains as many tokens per parameter as P["preset"] does at its steps: its
    steps and its warmup scaled alike (rounded), so every rung has the same schedule shape and a larger model is
    not compared undertrained; P["preset"]'s own rung is then the shared point's run (unless overridden)."""
    overrides = (P.get("ladder_overrides") or {}).get(preset, {})
    rung = run_config(P | {"preset": preset}, method, seed=seed, **overrides)
    if not P.get("equal_tokens_per_param"):
        return rung
    if "steps" in overrides or "warmup" in overrides:
        raise ValueError(f"parameter ladder_overrides={P['ladder_overrides']!r} sets the steps or warmup of "
                         f"{preset} while equal_tokens_per_param=True sets every rung's: allowed ladder_overrides "
                         "without them, or equal_tokens_per_param=False")
    shared = run_config(P, method, seed=seed)
    scale = (shared.steps * shared.tokens_per_step / _params(shared)) * _params(rung) / rung.tokens_per_step
    steps = max(1, round(scale))
    return rung.replace(steps=steps, warmup=round(shared.warmup * steps / shared.steps))


def _params(c: TrainConfig) -> int:
    """The run's parameter count, known before its data are prepared: the model's vocabulary is the BPE's."""
    if c.tokenizer != "bpe":
        raise ValueError(f"parameter equal_tokens_per_param=True is invalid with tokenizer={c.tokenizer!r}: allowed "
                         "with the 'bpe' tokenizer only (its vocab_size sets the model's parameter count before the "
                         "data are prepared)")
    return preset_params(c.preset, c.vocab_size)


def train_all(configs: list[TrainConfig], desc: str = "runs") -> list[Run]:
    """Train (or load from the cache) every config, with one progress bar over the runs."""
    from tqdm import tqdm

    from lordo.launch import train  # training loads the data pipeline; tables, statistics and claims do not

    runs = []
    with tqdm(configs, desc=desc, unit="run") as bar:
        for cfg in bar:
            bar.set_postfix_str(f"{cfg.method} {cfg.preset} seed={cfg.seed}")
            runs.append(train(cfg))
    return runs


def train_groups(groups: dict[str, list[TrainConfig]], desc: str = "runs") -> dict[str, list[Run]]:
    """train_all over named groups of configs (one progress bar); the runs by the same names."""
    runs = iter(train_all([cfg for configs in groups.values() for cfg in configs], desc))
    return {name: [next(runs) for _ in configs] for name, configs in groups.items()}


def matrix_rank(rank: int | float, preset: str) -> int:
    """The int rank the preset's smallest matrices get for `rank` (lordo.optim.resolve_rank)."""
    side = min_side(preset)
    return resolve_rank(rank, (side, side), f"the smallest matrices of preset {preset}")


def resolved_rank(c: TrainConfig) -> int:
    """The int rank a config's matrices get (fractions resolved against the preset's matrices)."""
    return matrix_rank(c.resolved_optimizer()["rank"], c.preset)
