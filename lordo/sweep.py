"""Each method at its own learning rate, in the regime where claim 4 can hold (notebook 06).

The regime is the notebook's shared point with `regime`'s fields in place of its own (on the cpu preset: the
block-heavy `blocks` model, 16 sequences per worker, 256 steps). Every method of `sweep_methods` trains at each
of the log-spaced `lrs` (`sweep_seeds`), and while a method's best lr lies at the edge of those it tried, one more
beyond that edge (at most MAX_EXTENSIONS); each method's lr is the one with the lowest mean validation loss,
measured on the validation windows the runs evaluate during training; that lr then trains every seed of
`seeds`, and every run is reported on held-out validation windows that neither training nor the selection read
(the ones after them). Each LoRDO variant of `one_worker_variants` on one worker with all M*B sequences separates
the optimizer's own share of the gap from the local-update penalty; it runs at its own chosen lr and low-rank
DDP's and takes the better one as its own. `sweep_methods` may name variants, '<method>, <ablation>, ...' (ablations of
analysis.ABLATIONS), swept like methods; `horizon_variants` train again, at their lrs and on every seed, for
`horizon_steps`.

    python -m lordo.sweep                    # recompute the cpu preset's tables (`make sweep`)
    python -m lordo.sweep --preset smoke     # the notebooks' smoke sizes, in a minute

On the cpu preset its 55 runs take about four hours on two CPU cores, so the tables are cached in `sweep_dir`
(committed for the cpu preset, so `make reproduce` reads them) under the config hashes of the grid; a changed grid, or
`--recompute`, trains what is missing (runs stay cached in runs/) and rewrites them.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

import pandas as pd
import torch

from lordo import analysis
from lordo.analysis import (
    cached_tables,
    check_params,
    curves,
    load_run_model,
    run_config,
    summaries,
    train_all,
    variant_options,
)
from lordo.comm import run_simulated
from lordo.config import TrainConfig
from lordo.data import prepare
from lordo.paths import repo_path
from lordo.runs import Run
from lordo.trainer import evaluate

MAX_EXTENSIONS = 2      # lrs tried beyond the grid's edge per method, one at a time, while the best lies at the edge
HELDOUT_FACTOR = 4      # held-out windows: up to 4x the windows the selection reads, as the split allows
ONE_WORKER_MARK = ", M = 1"   # a control run's `variant`: its LoRDO variant's, marked
ONE_WORKER = "lordo" + ONE_WORKER_MARK


def regime_config(P: dict[str, Any], variant: str, **overrides: Any) -> TrainConfig:
    """A run at the regime: the shared point, then P["regime"]'s fields, the variant's, then `overrides`. A
    variant is a method, or '<method>, <ablation>, ...' with ablations of analysis.ABLATIONS ('lordo, no QH term')."""
    method, options = variant_options(variant)
    return run_config(P, method, **{**(P.get("regime") or {}), **options, **overrides})


def grid(P: dict[str, Any]) -> list[TrainConfig]:
    return [regime_config(P, m, lr=lr, seed=s) for m in P["sweep_methods"] for lr in P["lrs"]
            for s in P["sweep_seeds"]]


def grid_variants(P: dict[str, Any]) -> list[str]:
    """The `variant` of each run of `grid(P)`, in its order."""
    return [m for m in P["sweep_methods"] for _ in P["lrs"] for _ in P["sweep_seeds"]]


def select_lr(table: pd.DataFrame, by: str = "method") -> dict[str, float]:
    """Each method's (or variant's) lr with the lowest mean validation loss over its seeds (ties: the smaller lr)."""
    mean = table.groupby([by, "lr"])["val_loss"].mean().reset_index().sort_values([by, "val_loss", "lr"])
    return {m: float(g["lr"].iloc[0]) for m, g in mean.groupby(by)}


def next_lr(tried: list[float], best: float) -> float | None:
    """The lr one step beyond the edge where `best` lies (the spacing of the two nearest tried lrs, rounded to one
    significant digit: 1e-3, 3e-3, 1e-2 continue with 3e-2 and 3e-4), or None when `best` lies inside."""
    tried = sorted(set(tried))
    if len(tried) < 2 or tried[0] < best < tried[-1]:
        return None
    near, next_near = (tried[-1], tried[-2]) if best == tried[-1] else (tried[0], tried[1])
    return float(f"{near * near / next_near:.1g}")


def one_worker(P: dict[str, Any], lr: float, seed: int, variant: str = "lordo") -> TrainConfig:
    """A LoRDO variant on one worker with all M*B sequences of the regime's step: no other worker to average with."""
    base = regime_config(P, variant)
    return regime_config(P, variant, lr=lr, seed=seed, workers=1, batch_size=base.workers * base.batch_size)


def variant_config(P: dict[str, Any], variant: str, lr: float, seed: int) -> TrainConfig:
    if variant.endswith(ONE_WORKER_MARK):
        return one_worker(P, lr, seed, variant.removesuffix(ONE_WORKER_MARK))
    return regime_config(P, variant, lr=lr, seed=seed)


def selection_windows(c: TrainConfig) -> int:
    """How many validation windows (the first ones) a run's evaluations read during training."""
    if c.eval_batches is None:
        raise ValueError(f"eval_batches=None evaluates on the whole validation split, leaving no held-out windows "
                         f"for run {c.hash()}: allowed an int >= 1")
    return c.eval_batches * c.batch_size * c.workers


def heldout_loss(run: Run, device: torch.device | None = None) -> tuple[float, int]:
    """Mean token loss of the run's final model on the held-out windows, and their number of tokens."""
    c = run.config
    data = prepare(c.corpus, c.tokenizer, c.vocab_size, max_tokens=c.corpus_tokens)
    skip = selection_windows(c)
    tokens = data.val[skip * c.seq_len:(skip + HELDOUT_FACTOR * skip) * c.seq_len + 1]
    if (len(tokens) - 1) // c.seq_len < 1:
        raise ValueError(f"the validation split ({len(data.val):,} tokens) has no windows after the {skip} that "
                         f"run {run.dir.name} evaluates on: use a smaller eval_batches")
    device = device or torch.device("cpu")
    model = load_run_model(run, data.vocab_size, device)
    loss = run_simulated(lambda comm: evaluate(model, tokens, c.replace(eval_batches=None), comm, device), 1)[0]
    return loss, (len(tokens) - 1) // c.seq_len * c.seq_len


def run_table(runs: list[Run], variants: list[str], stage: str) -> pd.DataFrame:
    """summaries() of `runs` with their variant, stage, lr, config hash and held-out loss and perplexity."""
    rows = summaries(runs).assign(variant=variants, stage=stage, lr=[r.config.lr for r in runs],
                                  config_hash=[r.config.hash() for r in runs])
    held = [heldout_loss(r) for r in runs]
    return rows.assign(heldout_loss=[h for h, _ in held], heldout_ppl=[math.exp(h) for h, _ in held],
                       heldout_tokens=[n for _, n in held])


def compute(P: dict[str, Any]) -> dict[str, pd.DataFrame]:
    """Train the grid (and beyond its edges), select each method's lr; LoRDO on one worker at each chosen lr, its own
    the better one; every variant at its lr for every seed. Every run with its held-out loss."""
    trained: dict[str, Run] = {}

    def run(pairs: list[tuple[str, TrainConfig]], stage: str, desc: str) -> pd.DataFrame:
        runs = train_all([c for _, c in pairs], desc=desc)
        trained.update((r.config.hash(), r) for r in runs)
        return run_table(runs, [v for v, _ in pairs], stage)

    table = run(list(zip(grid_variants(P), grid(P))), "grid", "lr sweep")
    for _ in range(MAX_EXTENSIONS):
        chosen = select_lr(table, by="variant")
        beyond = [(m, x) for m in P["sweep_methods"]
                  if (x := next_lr(table.loc[table["variant"] == m, "lr"].tolist(), chosen[m])) is not None]
        if not beyond:
            break
        more = [(m, regime_config(P, m, lr=x, seed=s)) for m, x in beyond for s in P["sweep_seeds"]]
        table = pd.concat([table, run(more, "grid", "lr sweep, beyond the edge")], ignore_index=True)
    chosen = select_lr(table, by="variant")
    # each LoRDO variant on one worker, at its lr and low-rank DDP's (the two it separates), keeping the better
    controls = {v + ONE_WORKER_MARK: sorted({chosen[v], chosen.get("lowrank_ddp", chosen[v])})
                for v in P["one_worker_variants"]}
    if controls:
        control = [(c, variant_config(P, c, lr, s)) for c, lrs in controls.items() for lr in lrs
                   for s in P["sweep_seeds"]]
        table = pd.concat([table, run(control, "control", "one-worker controls")], ignore_index=True)
        chosen |= select_lr(table[table["variant"].isin(controls)], by="variant")
    seeds = [(v, c) for v, lr in chosen.items() for s in P["seeds"]
             if (c := variant_config(P, v, lr, s)).hash() not in set(table["config_hash"])]
    table = pd.concat([table, run(seeds, "seeds", "chosen lr, every seed")], ignore_index=True)
    longer = horizon_configs(P, chosen)
    if longer:
        table = pd.concat([table, run(longer, "horizon", f"{P['horizon_steps']} steps")], ignore_index=True)
    table["selected"] = (table["lr"] == table["variant"].map(chosen)) & (table["stage"] != "horizon")
    shown = [trained[h] for h in table.loc[table["selected"] | (table["stage"] == "horizon"), "config_hash"]]
    variant, stage = dict(zip(table["run"], table["variant"])), dict(zip(table["run"], table["stage"]))
    label = lambda t: t.assign(variant=t["run"].map(variant), stage=t["run"].map(stage))
    return {"runs": table, "curves": label(curves(shown)), "syncs": label(analysis.sync_records(shown))}


def horizon_configs(P: dict[str, Any], chosen: dict[str, float]) -> list[tuple[str, TrainConfig]]:
    """The `horizon_variants` at their chosen lrs, trained for `horizon_steps` (its schedule stretched to them) on
    every seed of `seeds`: whether the ranking and the gap hold with more training, with an interval."""
    if not P.get("horizon_steps"):
        return []
    return [(v, variant_config(P, v, chosen[v], s).replace(steps=P["horizon_steps"]))
            for v in P["horizon_variants"] for s in P["seeds"]]


def cache_key(P: dict[str, Any]) -> dict[str, Any]:
    return {"grid": [c.hash() for c in grid(P)], "seeds": list(P["seeds"]), "heldout_factor": HELDOUT_FACTOR,
            "max_extensions": MAX_EXTENSIONS, "one_worker": list(P["one_worker_variants"]),
            "horizon": [P.get("horizon_steps"), list(P.get("horizon_variants") or []), list(P["seeds"])]}


def lr_sweep(P: dict[str, Any], recompute: bool = False) -> dict[str, pd.DataFrame]:
    """The sweep's tables ({"runs", "curves", "syncs"}: every run; the metrics and the subspace diagnostics of the
    runs at the chosen lrs and of the longer ones, by `stage`), cached in P["sweep_dir"] under the grid's key."""
    return cached_tables("lr_sweep", cache_key(P), lambda: compute(P), repo_path(P["sweep_dir"]), recompute)


def lr_profile(table: pd.DataFrame) -> pd.DataFrame:
    """Validation and held-out perplexity against lr per variant (mean over the grid's seeds), the chosen lr
    marked, and whether it still lies at the edge of the lrs its variant tried (then the sweep should go further)."""
    grid_rows = table[table["stage"] == "grid"]
    out = grid_rows.groupby(["variant", "lr"], as_index=False)[["val_ppl", "heldout_ppl"]].mean()
    out["chosen"] = out["lr"] == out["variant"].map(select_lr(grid_rows, by="variant"))
    edges = out.groupby("variant")["lr"].agg(["min", "max"])
    out["at_edge"] = out["chosen"] & ((out["lr"] == out["variant"].map(edges["min"]))
                                      | (out["lr"] == out["variant"].map(edges["max"])))
    return out


PARAMS = ("preset", "workers", "steps", "batch_size", "seq_len", "lr", "sync_every", "proj_every", "rank",
          "eval_every", "eval_batches", "launcher", "config_dir", "seeds", "sweep_seeds", "regime", "lrs",
          "sweep_methods", "sweep_dir", "one_worker_variants", "horizon_steps", "horizon_variants")


def preset_command(prog: str, doc: str, names: tuple[str, ...], argv: list[str] | None,
                   **renamed: str) -> tuple[dict[str, Any], bool]:
    """The command line of a cached-table module (`python -m <prog> --preset P [--recompute]`): the preset's
    parameters `names` (a name in `renamed` read from the preset's other name), checked, one line and exit 2 when
    bad; and whether to recompute."""
    from lordo.reproduce import load_preset

    parser = argparse.ArgumentParser(prog=f"python -m {prog}", description=doc.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu", help="notebooks/params/<preset>.yaml or a .yaml path (default cpu)")
    parser.add_argument("--recompute", action="store_true", help="recompute even when the cached tables match")
    args = parser.parse_args(argv)
    values = load_preset(args.preset, prog)
    values |= {name: values.get(source) for name, source in renamed.items()}
    try:
        return check_params(**{k: values.get(k) for k in names}), args.recompute
    except ValueError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> None:
    P, recompute = preset_command("lordo.sweep", __doc__, PARAMS, argv, steps="gap_steps")
    tables = lr_sweep(P, recompute=recompute)
    print(lr_profile(tables["runs"]).to_string(index=False))
    print(f"tables in {repo_path(P['sweep_dir'])}")


if __name__ == "__main__":
    main()
