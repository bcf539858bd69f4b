"""One figure style for every notebook, the plots they share, and figure saving.

    plots.style()
    fig, ax = plt.subplots()
    plots.lines(ax, curves, x="tokens", y="train_loss", hue="method")        # mean and 95% t-interval over seeds
    plots.save(fig, P, "00_quickstart", "loss_curves", "Training loss against tokens ...")

Figures go to <figures_dir>/<notebook>/<name>.png and .pdf; each caption is kept in that folder's
captions.json, which `lordo.reproduce` turns into the figures' README.
"""

from __future__ import annotations

import json
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.ticker import FuncFormatter

from lordo.analysis.stats import ci95
from lordo.files import write_json
from lordo.optim import METHODS
from lordo.paths import repo_path

_CB = sns.color_palette("colorblind")
COLORS = {"ddp": _CB[7], "lowrank_ddp": _CB[0], "local_adam": _CB[2], "lordo_local": _CB[4], "lordo_global": _CB[1],
          "lordo": _CB[3]}

# projections estimated from one worker's batch (local) and from M workers' average (global)
ESTIMATE_COLORS = {"local": _CB[1], "global": _CB[0]}


def style() -> None:
    """The package's seaborn theme: white grid, colorblind palette, readable sizes."""
    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind", rc={
        "figure.dpi": 100, "savefig.dpi": 200, "savefig.bbox": "tight", "axes.titlesize": 12,
        "axes.labelsize": 11, "legend.fontsize": 9, "legend.title_fontsize": 9, "lines.linewidth": 1.8,
        "figure.constrained_layout.use": True})


def label(method: str) -> str:
    """A method's display name (lordo.optim.METHODS); other names as given."""
    return METHODS[method].label if method in METHODS else method


def order(methods: Any) -> list[str]:
    """Methods present, in lordo.optim.METHODS's order (stable colors and legends across figures)."""
    present = list(dict.fromkeys(methods))
    return [m for m in METHODS if m in present] + [m for m in present if m not in METHODS]


def labelled(df: pd.DataFrame) -> pd.DataFrame:
    """A copy with a `label` column of the methods' display names, for legends."""
    return df.assign(label=df["method"].map(label))


def palette(methods: Any) -> dict[str, Any]:
    return {label(m): COLORS.get(m, "gray") for m in order(methods)}


def variant_name(method: str, omega: float | None) -> str:
    """LoRDO runs named by their omega, other methods by their label."""
    return f"LoRDO (ω = {omega:g})" if method == "lordo" else label(method)


def variants(df: pd.DataFrame) -> pd.Series:
    return pd.Series([variant_name(m, w) for m, w in zip(df["method"], df["omega"])], index=df.index)


def variant_order(df: pd.DataFrame) -> list[str]:
    keyed = df[["method", "omega"]].drop_duplicates()
    keyed = keyed.assign(rank=keyed["method"].map(list(METHODS).index)).sort_values(["rank", "omega"])
    return [variant_name(m, w) for m, w in zip(keyed["method"], keyed["omega"])]


def variant_palette(df: pd.DataFrame) -> dict[str, Any]:
    """Method colors; LoRDO's omega values as shades of LoRDO's color (lighter: smaller omega)."""
    omegas = sorted(df.loc[df["method"] == "lordo", "omega"].unique())
    shades = sns.light_palette(COLORS["lordo"], len(omegas) + 1)[1:]
    out = {label(m): COLORS.get(m, "gray") for m in order(df["method"]) if m != "lordo"}
    return out | {variant_name("lordo", w): c for w, c in zip(omegas, shades)}


def lines(ax: plt.Axes, data: pd.DataFrame, x: str, y: str, hue: str = "method", **kw: Any) -> plt.Axes:
    """Mean of y over seeds against x, one line per hue value, with a 95% Student-t band (DDP dashed)."""
    if hue == "method":
        data = labelled(data)
        names = list(palette(data["method"]))
        kw = {"hue_order": names, "palette": palette(data["method"]), "style": "label", "style_order": names,
              "dashes": {n: (4, 2) if n == label("ddp") else "" for n in names}} | kw
        hue = "label"
    sns.lineplot(data=data, x=x, y=y, hue=hue, errorbar=ci95, ax=ax, **kw)
    return ax


def points(ax: plt.Axes, data: pd.DataFrame, x: str, y: str, hue: str | None = None, **kw: Any) -> plt.Axes:
    """Mean of y per x category with a 95% Student-t interval, individual seeds as dots."""
    dodge = hue is not None and hue != x
    sns.stripplot(data=data, x=x, y=y, hue=hue, dodge=dodge, alpha=0.35, ax=ax, legend=False, **kw)
    sns.pointplot(data=data, x=x, y=y, hue=hue, errorbar=ci95, dodge=0.4 if dodge else False, linestyle="none",
                  capsize=0.15, markers="D", ax=ax, **kw)
    return ax


def band(ax: plt.Axes, values: Any, text: str, color: Any = "black") -> None:
    """A horizontal reference: the mean of values, shaded over its 95% t-interval."""
    values = np.asarray(values, dtype=float)
    lo, hi = ci95(values)
    ax.axhline(values.mean(), color=color, linestyle="--", linewidth=1.2, label=text)
    if hi > lo:
        ax.axhspan(lo, hi, color=color, alpha=0.08, linewidth=0)


def si_bytes(ax: plt.Axes, axis: str = "y") -> None:
    """Tick labels in B, kB, MB, GB, TB."""
    def fmt(v: float, _pos: Any) -> str:
        for unit in ("B", "kB", "MB", "GB", "TB"):
            if abs(v) < 1000:
                return f"{v:.3g} {unit}"
            v /= 1000
        return f"{v:.3g} PB"
    (ax.yaxis if axis == "y" else ax.xaxis).set_major_formatter(FuncFormatter(fmt))


def save(fig: plt.Figure, P: dict[str, Any], notebook: str, name: str, caption: str) -> None:
    """Write the figure as PNG and PDF under <figures_dir>/<notebook>/ and record its caption."""
    out = repo_path(P["figures_dir"]) / notebook
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / f"{name}.png")
    fig.savefig(out / f"{name}.pdf", metadata={"CreationDate": None, "ModDate": None})
    captions_file = out / "captions.json"
    captions = json.loads(captions_file.read_text()) if captions_file.is_file() else {}
    captions[name] = caption
    write_json(captions_file, dict(sorted(captions.items())))
