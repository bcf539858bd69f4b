"""Where LoRDO's gap to low-rank DDP comes from (notebook 05): the runs that take low-rank DDP to LoRDO one
change at a time, the gap over training and across settings, and the verdict for claim 4.

    rungs = diagnosis.ladder(P, "lowrank")                  # [(label, config), ...] for one seed
    table = diagnosis.labelled(train_all(configs), labels)  # summaries with a `variant` column
    steps = diagnosis.decomposition(table, [label for label, _ in rungs])

The ladder separates three things that all differ between low-rank DDP and LoRDO: the optimizer's own
choices (projection from the pseudo-gradient, the full-rank QH term), seen with one worker on the whole
batch; the per-worker nonlinearity of small batches (clip, Adam moments, error feedback computed on each
worker's B sequences instead of on the average of M*B), seen with M workers that average every step
(K = 1); and the local steps themselves (K > 1). The full-rank ladder (DDP, local AdamW at K = 1 and K)
measures the same penalties without the low-rank step.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from lordo.analysis import ABLATIONS, ci95, paired_gap, run_config, summaries
from lordo.config import TrainConfig

GAP_THRESHOLD_PCT = 1.0      # claim 4: "near-parity", a perplexity gap under about 1% (public summaries)
TREND_TOLERANCE_PCT = 1.0    # a gap that moves less than this over the second half of training has settled


def ladder(P: dict[str, Any], kind: str, seed: int) -> list[tuple[str, TrainConfig]]:
    """The rungs from the DDP method to its infrequent counterpart, each one change from the last.

    kind "lowrank": low-rank DDP -> LoRDO with one worker on M*B sequences -> M workers averaging every
    step (K = 1) -> LoRDO (K local steps). kind "fullrank": DDP -> local AdamW at K = 1 -> local AdamW.
    """
    shared = run_config(P, "lordo", seed=seed)     # the values config files give under the paper preset
    m, b, k = shared.workers, shared.batch_size, shared.resolved_optimizer()["sync_every"]
    if kind == "lowrank":
        return [("low-rank DDP", run_config(P, "lowrank_ddp", seed=seed)),
                (f"LoRDO, M = 1, B = {m * b}", run_config(P, "lordo", seed=seed, workers=1, batch_size=m * b)),
                (f"LoRDO, M = {m}, K = 1", run_config(P, "lordo", seed=seed, sync_every=1)),
                (f"LoRDO, M = {m}, K = {k}", run_config(P, "lordo", seed=seed))]
    if kind == "fullrank":
        return [("DDP", run_config(P, "ddp", seed=seed)),
                (f"local AdamW, M = {m}, K = 1", run_config(P, "local_adam", seed=seed, sync_every=1)),
                (f"local AdamW, M = {m}, K = {k}", run_config(P, "local_adam", seed=seed))]
    raise ValueError(f"kind={kind!r} is invalid: allowed 'lowrank' or 'fullrank'")


def equal_tokens(P: dict[str, Any], batch_size: int) -> dict[str, int]:
    """Overrides that train at per-worker batch `batch_size` on the shared point's tokens and validation windows."""
    shared = run_config(P, "lordo")
    b, steps = shared.batch_size, shared.steps
    if (steps * b) % batch_size:
        raise ValueError(f"batch size {batch_size} does not divide the shared point's {steps} x {b} sequences")
    return {"batch_size": batch_size, "steps": steps * b // batch_size,
            "eval_every": max(1, shared.eval_every * b // batch_size),
            "eval_batches": max(1, (shared.eval_batches or 1) * b // batch_size)}


def labelled(runs: list, labels: list[str], **columns: list[Any]) -> pd.DataFrame:
    """`analysis.summaries` with a `variant` column (and any other per-run columns given as lists)."""
    return summaries(runs).assign(variant=labels, **columns)


def decomposition(table: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    """For each rung after the first: its perplexity gap to the previous rung and to the first, paired by seed."""
    rows = []
    for prev, cur in zip(order, order[1:]):
        step = paired_gap(table, {"variant": cur}, {"variant": prev})
        total = paired_gap(table, {"variant": cur}, {"variant": order[0]})
        rows.append({"variant": cur, "from": prev, "step_pct": step["mean"], "step_lo": step["lo"],
                     "step_hi": step["hi"], "total_pct": total["mean"], "total_lo": total["lo"],
                     "total_hi": total["hi"], "seeds": step["n"]})
    return pd.DataFrame(rows)


def gap_curve(curves: pd.DataFrame, a: dict[str, Any], b: dict[str, Any], name: str) -> pd.DataFrame:
    """Relative validation-perplexity gap 100 (a / b - 1) at every evaluation both share, per seed."""
    pick = lambda sel: curves.loc[np.logical_and.reduce([curves[k] == v for k, v in sel.items()])
                                  & curves["val_ppl"].notna()].set_index(["seed", "tokens"])["val_ppl"]
    gap = (100 * (pick(a) / pick(b) - 1)).dropna().rename("gap_pct").reset_index()
    return gap[gap["tokens"] > 0].assign(pair=name)


def gap_trend(gaps: pd.DataFrame) -> dict[str, Any]:
    """The gap at the last evaluation and its change since the evaluation nearest the middle of training,
    paired by seed, each with a 95% t-interval."""
    tokens = np.sort(gaps["tokens"].unique())
    last, mid = tokens[-1], tokens[np.abs(tokens - tokens[-1] / 2).argmin()]
    at = lambda t: gaps[gaps["tokens"] == t].set_index("seed")["gap_pct"]
    final, change = at(last), (at(last) - at(mid)).dropna()
    (f_lo, f_hi), (c_lo, c_hi) = ci95(final), ci95(change)
    return {"final": final.mean(), "final_lo": f_lo, "final_hi": f_hi, "change": change.mean(), "change_lo": c_lo,
            "change_hi": c_hi, "seeds": len(final), "mid_tokens": int(mid), "last_tokens": int(last)}


def trend_word(t: dict[str, Any], tolerance: float = TREND_TOLERANCE_PCT) -> str:
    """'growing' / 'shrinking' when the change's interval clears the tolerance, 'settled' when it lies inside
    it, else 'unsettled'."""
    if t["seeds"] < 2:
        return "unsettled (one seed)"
    if t["change_lo"] > tolerance:
        return "growing"
    if t["change_hi"] < -tolerance:
        return "shrinking"
    if -tolerance <= t["change_lo"] and t["change_hi"] <= tolerance:
        return "settled"
    return "unsettled"


def with_heldout_final(trend: dict[str, Any], heldout: dict[str, Any]) -> dict[str, Any]:
    """A gap trend (measured on the validation windows that selected the lrs) whose final gap is the held-out
    one (`analysis.paired_gap` of held-out perplexities), so the verdict reports numbers the selection never saw."""
    return trend | {"final": heldout["mean"], "final_lo": heldout["lo"], "final_hi": heldout["hi"],
                    "seeds": min(trend["seeds"], heldout["n"])}


def ranking(curves: pd.DataFrame, by: str = "variant") -> pd.DataFrame:
    """At every evaluation all groups share: the groups ordered by mean validation perplexity (best first),
    and whether that order still holds at every later evaluation (`final`)."""
    c = curves[curves["val_ppl"].notna() & (curves["tokens"] > 0)]
    mean = c.groupby(["tokens", by])["val_ppl"].mean().unstack().dropna()
    orders = [" < ".join(row.sort_values().index) for _, row in mean.iterrows()]
    final = [all(o == later for later in orders[i:]) for i, o in enumerate(orders)]
    return pd.DataFrame({"tokens": mean.index.to_numpy(), "order": orders, "final": final})


def settled_since(ranks: pd.DataFrame) -> int:
    """Tokens from which the ranking of `ranking` no longer changed."""
    return int(ranks.loc[ranks["final"], "tokens"].min())


def claim4_verdict(t: dict[str, Any], threshold: float = GAP_THRESHOLD_PCT) -> str:
    """Near-parity (claim 4) from the gap at the end and its trend: 'supported' when the final gap's interval
    lies below the threshold and it is not growing; 'not supported' when it lies above it and the gap is not
    shrinking (a shrinking gap could still close with longer training); else 'inconclusive'."""
    trend = trend_word(t)
    if t["seeds"] < 2:
        return "inconclusive (one seed)"
    if t["final_hi"] < threshold and trend != "growing":
        return "supported"
    if t["final_lo"] > threshold and trend != "shrinking":
        return f"not supported (gap {trend})"
    return f"inconclusive (gap {trend})"


def fmt_trend(t: dict[str, Any]) -> str:
    band = lambda m, lo, hi: f"{m:+.1f}%" + (f" [{lo:+.1f}, {hi:+.1f}]" if t["seeds"] > 1 else "")
    return (f"{band(t['final'], t['final_lo'], t['final_hi'])} at {t['last_tokens']:,} tokens; "
            f"{band(t['change'], t['change_lo'], t['change_hi'])} since {t['mid_tokens']:,} ({trend_word(t)}, "
            f"{t['seeds']} seeds)")


def ablation(P: dict[str, Any], name: str, seed: int) -> TrainConfig:
    """LoRDO at the shared point with one ablation of `ABLATIONS` (None values, like clip=None, switch off)."""
    changes = ABLATIONS[name]
    cfg = run_config(P, "lordo", seed=seed, **{k: v for k, v in changes.items() if v is not None})
    off = {k: v for k, v in changes.items() if v is None}
    return cfg.replace(**off) if off else cfg
