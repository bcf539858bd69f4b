"""Statistics of the tables: t-intervals, gaps paired by seed, bootstrapped slopes."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats


def ci95(values: Any) -> tuple[float, float]:
    """Mean +- the 95% Student-t half-width (a point when there is one value); a seaborn errorbar callable."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    mean = x.mean() if len(x) else math.nan
    if len(x) < 2:
        return mean, mean
    half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return mean - half, mean + half


def paired_gap(df: pd.DataFrame, a: dict[str, Any], b: dict[str, Any], value: str = "val_ppl") -> dict[str, Any]:
    """Relative gap 100 (a / b - 1) % of `value` between two groups of runs (rows matching the dicts), paired by
    seed: mean, 95% t-interval and the number of seeds."""
    pick = lambda sel: df.loc[np.logical_and.reduce([df[k] == v for k, v in sel.items()])].set_index("seed")[value]
    x, y = pick(a), pick(b)
    gaps = 100 * (x / y - 1).dropna()
    lo, hi = ci95(gaps)
    return {"mean": gaps.mean(), "lo": lo, "hi": hi, "n": len(gaps)}


def fmt_gap(g: dict[str, Any]) -> str:
    if g["n"] < 2:
        return f"{g['mean']:+.2f}% (1 seed)"
    return f"{g['mean']:+.2f}% [95% CI {g['lo']:+.2f}, {g['hi']:+.2f}] ({g['n']} seeds)"


def slope_fits(df: pd.DataFrame, by: list[str], x: str = "batch_size", y: str = "distance", n_boot: int = 2000,
               seed: int = 0) -> pd.DataFrame:
    """Least-squares slope of log mean(y) against log x per group, with a 95% bootstrap interval.

    Within a group, y is averaged over its matrices for each (x, repeat); the bootstrap resamples the
    independent repeats at every x and refits.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for key, g in df.groupby(by):
        table = g.groupby([x, "repeat"])[y].mean().unstack().sort_index()   # x values by repeats
        lx, vals = np.log(table.index.to_numpy(float)), table.to_numpy()
        slope = np.polyfit(lx, np.log(np.nanmean(vals, axis=1)), 1)[0]
        idx = rng.integers(0, vals.shape[1], (n_boot, vals.shape[1]))
        boot = np.polyfit(lx, np.log(np.nanmean(vals[:, idx], axis=2)), 1)[0]
        lo, hi = np.percentile(boot, [2.5, 97.5])
        rows.append(dict(zip(by, key if isinstance(key, tuple) else (key,))) | {
            "slope": slope, "lo": lo, "hi": hi, "points": len(lx), "repeats": vals.shape[1]})
    return pd.DataFrame(rows)
