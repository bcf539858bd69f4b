"""Why low-rank local steps lose more than full-rank local steps at small per-worker batches (notebook 06, its
second part): single changes to LoRDO and local AdamW at one small-batch setup, each run's held-out perplexity,
its bytes and its update coherence at every synchronization.

The setup (`penalty_setup`, TrainConfig fields; on the cpu preset the `tiny` model, M = 4, 4 x 128 tokens per
worker per step, K = 16, rank 1/8, 512 steps) is trained as `lordo train` would with those fields, so its runs
are the ones a user typing that command gets. `penalty_variants` maps each variant ('<method>, <ablation>, ...',
ablations of analysis.ABLATIONS) to the lrs it trains at, every one on `penalty_seeds`. Held-out perplexity is
measured on validation windows the runs' own evaluations never read (lordo.sweep.heldout_loss).

    python -m lordo.penalty                   # the cpu preset's table, trained where missing (`make sweep`)
    python -m lordo.penalty --preset smoke    # the smoke sizes, in a minute

The tables are cached in `sweep_dir` (committed for the cpu preset) under the config hashes of the grid.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from lordo.analysis import (
    cached_tables,
    coherence_records,
    fmt_gap,
    paired_gap,
    run_config,
    train_all,
    variant_options,
)
from lordo.config import TrainConfig
from lordo.optim import METHODS
from lordo.paths import repo_path
from lordo.sweep import preset_command, run_table

PARAMS = ("launcher", "penalty_setup", "penalty_variants", "penalty_seeds", "sweep_dir")


def penalty_config(P: dict[str, Any], variant: str, lr: float, seed: int) -> TrainConfig:
    """One run of the grid: the setup's fields, the variant's method and options, this lr and seed."""
    method, options = variant_options(variant)
    setup = {"launcher": P["launcher"], **P["penalty_setup"]}
    return run_config(setup, method, **options, lr=lr, seed=seed)


def grid(P: dict[str, Any]) -> list[tuple[str, TrainConfig]]:
    return [(v, penalty_config(P, v, lr, s)) for v, lrs in P["penalty_variants"].items() for lr in lrs
            for s in P["penalty_seeds"]]


def compute(P: dict[str, Any]) -> dict[str, pd.DataFrame]:
    pairs = grid(P)
    runs = train_all([c for _, c in pairs], desc="local-update penalty")
    variants = [v for v, _ in pairs]
    table = run_table(runs, variants, "penalty")
    variant = dict(zip(table["run"], table["variant"]))
    coherence = coherence_records(runs)
    return {"runs": table, "coherence": coherence.assign(variant=coherence["run"].map(variant))}


def cache_key(P: dict[str, Any]) -> dict[str, Any]:
    return {"grid": [c.hash() for _, c in grid(P)]}


def penalty_tables(P: dict[str, Any], recompute: bool = False) -> dict[str, pd.DataFrame]:
    """{"runs": every run with its held-out perplexity, "coherence": every sync's coherence by part}, cached in
    P["sweep_dir"] under the grid's config hashes; empty tables when the preset runs no variants."""
    if not P["penalty_variants"]:
        return {"runs": pd.DataFrame(), "coherence": pd.DataFrame()}
    if not P["penalty_setup"]:
        raise ValueError("parameter penalty_setup=None is invalid when penalty_variants are given: allowed "
                         "{TrainConfig field: value}")
    return cached_tables("penalty", cache_key(P), lambda: compute(P), repo_path(P["sweep_dir"]), recompute)


def best_runs(table: pd.DataFrame) -> pd.DataFrame:
    """Each variant at its lr: the one with the lowest mean validation loss over seeds (ties: the smaller lr)."""
    mean = table.groupby(["variant", "lr"], as_index=False)["val_loss"].mean().sort_values(["variant", "val_loss",
                                                                                            "lr"])
    chosen = mean.groupby("variant")["lr"].first()
    return table[table["lr"] == table["variant"].map(chosen)].reset_index(drop=True)


def reference_of(variant: str) -> str:
    """The every-step baseline a variant's local penalty is measured against: low-rank DDP for the low-rank
    methods, DDP for the full-rank ones."""
    return "lowrank_ddp" if METHODS[variant_options(variant)[0]].lowrank else "ddp"


def best_reference(best: pd.DataFrame, reference: str) -> str:
    """The reference method's variant in the table with the lowest mean validation loss (the yardstick at its best
    setting, not only at its best lr)."""
    runs = best[best["variant"].map(lambda v: variant_options(v)[0]) == reference]
    return str(runs.groupby("variant")["val_loss"].mean().idxmin())


def gaps(best: pd.DataFrame) -> pd.DataFrame:
    """Each local variant's held-out gap (each at its lr, paired by seed) to its reference method as specified
    (`gap`) and to the reference's best variant in the table (`gap_to_best`, against `best_reference`), with its
    bytes per worker."""
    rows = []
    for variant, runs in best.groupby("variant", sort=False):
        if not METHODS[variant_options(variant)[0]].local:
            continue
        ref = reference_of(variant)
        g = paired_gap(best, {"variant": variant}, {"variant": ref}, value="heldout_ppl")
        strongest = best_reference(best, ref)
        to_best = paired_gap(best, {"variant": variant}, {"variant": strongest}, value="heldout_ppl")
        rows.append({"variant": variant, "reference": ref, "lr": runs["lr"].iloc[0],
                     "heldout_ppl": runs["heldout_ppl"].mean(), "gap_pct": g["mean"], "gap_lo": g["lo"],
                     "gap_hi": g["hi"], "seeds": g["n"], "gap": fmt_gap(g), "best_reference": strongest,
                     "gap_to_best": fmt_gap(to_best), "comm_bytes": runs["comm_bytes"].mean()})
    return pd.DataFrame(rows)


def late_coherence(coherence: pd.DataFrame) -> pd.DataFrame:
    """Mean update coherence per variant and part over the syncs of the second half of training."""
    if coherence.empty:
        return coherence
    half = coherence["step"] > coherence.groupby("run")["step"].transform("max") / 2
    return coherence[half].groupby(["variant", "part"], as_index=False)["coherence"].mean()


def main(argv: list[str] | None = None) -> None:
    P, recompute = preset_command("lordo.penalty", __doc__, PARAMS, argv)
    tables = penalty_tables(P, recompute=recompute)
    cols = ["variant", "lr", "seed", "val_ppl", "heldout_ppl", "comm_bytes"]
    print(tables["runs"][cols].to_string(index=False))
    cols = ["variant", "reference", "lr", "heldout_ppl", "gap", "best_reference", "gap_to_best"]
    print(gaps(best_runs(tables["runs"]))[cols].to_string(index=False))
    print(f"tables in {repo_path(P['sweep_dir'])}")


if __name__ == "__main__":
    main()
