"""Result tables: runs as rows (identity, quality, communication, state, speed), saved under results_dir."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from lordo.analysis.training import min_side, resolved_rank
from lordo.files import write_atomic, write_json
from lordo.optim import FULL_RANK_RECORD, METHODS
from lordo.paths import repo_path
from lordo.runs import Run, runs_root

LAYER_TYPES = ("q", "k", "v", "o", "gate", "up", "down")


def describe(run: Run) -> dict[str, Any]:
    """A run's identity: the settings the notebooks vary, resolved to the values the optimizer used."""
    c, m = run.config, METHODS[run.config.method]
    hp = c.resolved_optimizer()
    rank = resolved_rank(c)
    return {"run": run.dir.name, "method": c.method, "preset": c.preset, "seed": c.seed, "workers": c.workers,
            "batch_size": c.batch_size, "seq_len": c.seq_len, "steps": c.steps,
            "rank": rank if m.lowrank else None,
            "omega": hp["omega"] if m.lowrank else None,
            "moments": hp["moments_on_refresh"] if m.lowrank else None,
            "sync_every": hp["sync_every"] if m.local else 1}


def summaries(runs: list[Run]) -> pd.DataFrame:
    """One row per run: identity, final quality, communication, optimizer state, speed."""
    rows = []
    for run in runs:
        s = run.summary
        state = {f"state_{k}": v for k, v in s["optimizer_state_bytes"].items()}
        rows.append(describe(run) | {
            "params": s["params"], "tokens": s["tokens"], "val_loss": s["val_loss"], "val_ppl": s["val_ppl"],
            "train_loss": s["train_loss"], "comm_bytes": s["comm_bytes"], "wire_bytes": s["comm"]["wire_bytes"],
            "collectives": s["comm"]["collectives"], "per_sync_bytes": s["comm"]["per_sync_payload_bytes"],
            **state, "wall_s": s["wall_s"], "tokens_per_s": s["tokens_per_s"]})
    return pd.DataFrame(rows)


def curves(runs: list[Run]) -> pd.DataFrame:
    """Every logged metric of every run (train loss every log_every steps, validation at evaluations)."""
    return pd.concat([run.metrics.assign(**describe(run)) for run in runs], ignore_index=True)


def layer_type(name: str) -> str:
    """'layers.0.self_attn.q_proj.weight' -> 'q'."""
    return name.split(".")[-2].removesuffix("_proj")


def sync_records(runs: list[Run]) -> pd.DataFrame:
    """The subspace diagnostics of every projection refresh, with each matrix's layer type and side p."""
    frames = [run.syncs.assign(**describe(run)) for run in runs if len(run.syncs)]
    df = pd.concat(frames, ignore_index=True)
    df = df[df["param"] != FULL_RANK_RECORD].reset_index(drop=True)
    df["layer"] = df["param"].map(layer_type)
    df["side"] = df["preset"].map(min_side)
    return df


def coherence_records(runs: list[Run]) -> pd.DataFrame:
    """Update coherence at every synchronization (diagnostics): one row per run, sync and part, `part` being
    'low-rank' (the matrices' whole update), 'low-rank, in span(Q)', 'low-rank, outside span(Q)' or 'full-rank'
    (the AdamW parameters together); the matrices' rows are their mean over matrices."""
    parts = {"coherence": "low-rank", "coherence_in_span": "low-rank, in span(Q)",
             "coherence_outside": "low-rank, outside span(Q)"}
    rows = []
    for run in runs:
        syncs = run.syncs
        if "coherence" not in syncs:
            continue
        full = syncs["param"] == FULL_RANK_RECORD
        for step, group in syncs[~full].dropna(subset=["coherence"]).groupby("step"):
            rows += [describe(run) | {"step": step, "part": part, "coherence": group[col].mean()}
                     for col, part in parts.items()]
        rows += [describe(run) | {"step": r.step, "part": "full-rank", "coherence": r.coherence}
                 for r in syncs[full].itertuples()]
    return pd.DataFrame(rows)


def table_path(P: dict[str, Any], notebook: str, name: str) -> Path:
    return repo_path(P["results_dir"]) / notebook / f"{name}.csv"


def save_table(df: pd.DataFrame, P: dict[str, Any], notebook: str, name: str) -> None:
    path = table_path(P, notebook, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: df.to_csv(f, index=False))


def load_table(P: dict[str, Any], notebook: str, name: str) -> pd.DataFrame:
    return pd.read_csv(table_path(P, notebook, name))


def cached_tables(name: str, key: dict[str, Any], compute: Callable[[], dict[str, pd.DataFrame]],
                  folder: Path | None = None, recompute: bool = False) -> dict[str, pd.DataFrame]:
    """Tables that are expensive to compute, cached in <folder>/<name>-<hash of key>/ (folder: runs/analysis/,
    kept by `make clean`) and read back while `key`, everything they depend on, is the same; compute() returns
    {part: table}. Written atomically, the key file last, so a partial folder is recomputed."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    out = (folder or runs_root() / "analysis") / f"{name}-{digest}"
    if not recompute and (out / "done").is_file():
        return {p.stem: pd.read_csv(p) for p in out.glob("*.csv")}
    tables = compute()
    out.mkdir(parents=True, exist_ok=True)
    for part, df in tables.items():
        write_atomic(out / f"{part}.csv", lambda f, df=df: df.to_csv(f, index=False))
    write_json(out / "done", key)
    return tables
