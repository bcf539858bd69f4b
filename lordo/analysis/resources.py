"""What the runs cost: optimizer state by kind and memory option, predicted wall-clock time, downstream scores."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import torch

from lordo import wallclock as wc
from lordo.analysis.tables import describe
from lordo.comm import cpu_threads
from lordo.model import GPT, PRESETS, model_config
from lordo.optim import MEMORY_OPTIONS, make_optimizer
from lordo.runs import Run


def matrix_state(preset: str, ladder: pd.DataFrame) -> dict[str, float]:
    """Claim 6 on one preset: optimizer state of the attention and MLP matrices under LoRDO (low-rank moments and
    Q) against AdamW's moments, measured (MB, from the runs' accounting) and predicted r(p+2q) / (2pq)."""
    c = PRESETS[preset]
    shapes = c["n_layers"] * ([(c["d_model"], c["d_model"])] * 4 + [(min(c["d_model"], c["d_ff"]),
                                                                       max(c["d_model"], c["d_ff"]))] * 3)
    lordo, ddp = (ladder[ladder["method"] == m].iloc[0] for m in ("lordo", "ddp"))
    adam = 4 * sum(2 * p * q for p, q in shapes)                     # fp32 moments of the matrices under AdamW
    rest = ddp["state_moments"] - adam                                # AdamW moments of everything else, alike in both
    lowrank = lordo["state_moments"] + lordo["state_projection"] - rest
    r = int(lordo["rank"])
    predicted = sum(r * (p + 2 * q) for p, q in shapes) / sum(2 * p * q for p, q in shapes)
    return {"lowrank": lowrank / 1e6, "adam": adam / 1e6, "ratio": lowrank / adam, "predicted": predicted,
            "total_ratio": lordo["state_total"] / ddp["state_total"]}


def memory_options(presets: list[str], rank: int | float) -> pd.DataFrame:
    """LoRDO's optimizer state by kind on each preset for each memory option (lordo.optim.MEMORY_OPTIONS), with
    AdamW's for scale: bytes from shapes as a GPU would hold them (`memory_stats(accelerator=True)`: `device`
    against `host`). The model is built on the meta device: nothing is allocated."""
    rows = []
    for preset in presets:
        with torch.device("meta"):
            model = GPT(model_config(preset))
        adam = make_optimizer("ddp", model).memory_stats(accelerator=True)["total"]
        for option, hp in MEMORY_OPTIONS.items():
            stats = make_optimizer("lordo", model, rank=rank, **hp).memory_stats(accelerator=True)
            rows.append({"preset": preset, "option": option, "params": model.num_params(), "adamw_total": adam}
                        | {f"state_{k}": v for k, v in stats.items()})
    return pd.DataFrame(rows)


def wallclock(runs: list[Run], latency_us: float, bandwidths: list[float]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Predicted time for each run's own token budget on its own M workers at each bandwidth (lordo.wallclock,
    from the run's measured compute per step and collectives), and the break-even bandwidths of every method
    against ddp and lowrank_ddp per preset and seed (NaN: one of the two is faster at every bandwidth)."""
    times, work = [], {}
    for run in runs:
        s, c = run.summary, run.config
        w = wc.workload(s, sync_every=c.resolved_optimizer()["sync_every"])
        work[(c.preset, c.seed, c.method)] = (w, s["tokens"], s["workers"])
        for g in bandwidths:
            t = wc.train_seconds(w, s["tokens"], s["workers"], g, latency_us * 1e-6)
            times.append(describe(run) | {"gbps": g, "seconds": t, "compute_s_per_step": w.compute_s_per_step,
                                          "payload_bytes": wc.payload_bytes(w, s["tokens"])})
    even = []
    for (preset, seed, method), (w, tokens, m) in work.items():
        for base in ("ddp", "lowrank_ddp"):
            if base != method and (preset, seed, base) in work:
                g = wc.break_even_gbps(w, work[(preset, seed, base)][0], tokens, m, latency_us * 1e-6)
                even.append({"preset": preset, "seed": seed, "method": method, "baseline": base,
                             "break_even_gbps": np.nan if g is None else g})
    return pd.DataFrame(times), pd.DataFrame(even)


def time_saved(times: pd.DataFrame, method: str = "lordo", baseline: str = "lowrank_ddp") -> pd.DataFrame:
    """Per preset and bandwidth, the fraction of `baseline`'s predicted time that `method` saves (mean over seeds;
    negative: it takes longer)."""
    t = times.groupby(["preset", "gbps", "method"])["seconds"].mean().unstack("method")
    return (1 - t[method] / t[baseline]).rename("saved").reset_index()


def downstream(runs: list[Run], tasks: str, limit: int | None) -> pd.DataFrame:
    """lm-eval downstream scores of each run (lordo.evaluate), one row per run and task; a run already evaluated
    with the same tasks and limit is read from its summary.json."""
    from tqdm import tqdm

    from lordo.evaluate import CORE_TASKS, evaluate_run

    rows = []
    for run in tqdm(runs, desc="downstream", unit="run"):
        summary = json.loads((run.dir / "summary.json").read_text())
        done = summary.get("downstream_speed", {})
        wanted = set(CORE_TASKS) if tasks == "core" else {t.strip() for t in tasks.split(",")}
        if done.get("limit") != limit or not wanted <= set(summary.get("downstream", {})):
            with cpu_threads(1):
                evaluate_run(run.dir, tasks=tasks, limit=limit, perplexity_corpora="")
            summary = json.loads((run.dir / "summary.json").read_text())
        speed = summary["downstream_speed"]["requests_per_s"]
        for task, scores in summary["downstream"].items():
            rows.append(describe(run) | {"task": task, "requests_per_s": speed} | scores)
    return pd.DataFrame(rows)
