"""The experiments behind the notebooks: parameters, run configs, result tables, projection noise, fits, claims.

    P = check_params(preset="tiny", methods=["ddp", "lordo"], seeds=[0, 1, 2], ...)   # one-line ValueError
    runs = train_all([run_config(P, m, seed=s) for m in P["methods"] for s in P["seeds"]])
    save_table(summaries(runs), P, "00_quickstart", "runs")       # <results_dir>/00_quickstart/runs.csv

Notebooks compute through this module and the training API, write tables under `results_dir`, and
draw figures from those tables only (`lordo.plots`). Runs are cached by config hash in runs/; the
projection-noise measurements, which are not runs, are cached beside them in runs/analysis/.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import stats

from lordo import wallclock as wc
from lordo.comm import cpu_threads
from lordo.config import (
    LAUNCHERS,
    TrainConfig,
    for_method,
    is_int,
    is_number,
    make_config,
    read_config_file,
    unused_fields,
)
from lordo.files import write_atomic, write_json
from lordo.model import GPT, PRESETS, model_config
from lordo.optim import DEFAULTS, MEMORY_OPTIONS, METHODS, MOMENT_RULES, is_rank, make_optimizer, resolve_rank
from lordo.paths import REPO, repo_path
from lordo.projection import compute_projection, is_transposed, oriented, projection_distance
from lordo.runs import Run, runs_root

LAYER_TYPES = ("q", "k", "v", "o", "gate", "up", "down")
# The parameters every notebook 00-04 has (notebook_params): the shared TRAIN_FIELDS, seeds, where things go.
SHARED_PARAMS = ("preset", "workers", "steps", "batch_size", "seq_len", "lr", "sync_every", "proj_every", "rank",
                 "eval_every", "eval_batches", "seeds", "launcher", "config_dir", "results_dir", "figures_dir")
# Notebook parameters that are TrainConfig fields shared by every run of a notebook (None: the config
# file's value under config_dir, else the package default).
TRAIN_FIELDS = ("preset", "workers", "steps", "batch_size", "seq_len", "lr", "sync_every", "proj_every", "rank",
                "eval_every", "eval_batches", "launcher")


# Single changes to LoRDO at the shared point, by name (notebook 05, lordo.diagnosis.ablation): each isolates
# one mechanism LoRDO's gap to low-rank DDP could come from. Here, not in lordo.diagnosis, because the notebook
# parameters are checked against it and diagnosis builds on this module.
ABLATIONS: dict[str, dict[str, Any]] = {
    "Q from gradient": {"proj_source": "gradient"},     # lowrank_ddp's projection source, one more all-reduce
    "no QH term": {"omega": 1.0},                       # omega = 1: lordo_global
    "omega 0.9": {"omega": 0.9},
    "no error feedback": {"error_feedback": False},
    "moments reset": {"moments_on_refresh": "reset"},
    "no clipping": {"clip": None},
}


# ---------------------------------------------------------------------- parameters
def _int(lo: int):
    return lambda v: is_int(v) and v >= lo


def _list(ok):
    return lambda v: isinstance(v, list | tuple) and len(v) > 0 and all(ok(x) for x in v)


_TRAIN_CONFIG_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
_RANK = "an int >= 1 or a float fraction of min(p, q) in (0, 1]"
CHECKS: dict[str, tuple[Any, str]] = {
    "preset": (lambda v: v in PRESETS, f"one of {list(PRESETS)}"),
    "presets": (_list(lambda v: v in PRESETS), f"a non-empty list of {list(PRESETS)}"),
    "methods": (_list(lambda v: v in METHODS), f"a non-empty list of {list(METHODS)}"),
    "seq_len": (_int(2), "an int >= 2"),
    "lr": (lambda v: is_number(v) and 0 < v < math.inf, "a number > 0"),
    "rank": (is_rank, _RANK),
    "low_memory_rank": (is_rank, _RANK),
    "ranks": (_list(is_rank), f"a non-empty list of ranks, each {_RANK}"),
    "omegas": (_list(lambda v: isinstance(v, int | float) and 0 <= v < 1), "a non-empty list of numbers in [0, 1)"),
    "seeds": (_list(_int(0)), "a non-empty list of ints >= 0"),
    "sweep_seeds": (_list(_int(0)), "a non-empty list of ints >= 0"),
    "batch_sizes": (_list(_int(1)), "a non-empty list of ints >= 1"),
    "moments": (_list(lambda v: v in MOMENT_RULES), f"a non-empty list of {list(MOMENT_RULES)}"),
    "gap_steps": (lambda v: v is None or _int(1)(v), "None (the config files' steps) or an int >= 1"),
    "gap_batch_sizes": (_list(_int(1)), "a non-empty list of ints >= 1 that divide steps x batch_size"),
    "gap_sync_everys": (_list(_int(1)), "a non-empty list of ints >= 1"),
    "regime": (lambda v: v is None or isinstance(v, dict) and set(v) <= _TRAIN_CONFIG_FIELDS,
               "None or {TrainConfig field: value} (the claim-4 regime's changes to the shared point)"),
    "lrs": (_list(lambda v: is_number(v) and 0 < v < math.inf),
            "a non-empty list of learning rates, each a number > 0"),
    "sweep_methods": (_list(lambda v: v in METHODS), f"a non-empty list of {list(METHODS)}"),
    "sweep_dir": (lambda v: isinstance(v, str) and v != "", "a directory path"),
    "ablations": (lambda v: isinstance(v, list | tuple) and all(a in ABLATIONS for a in v),
                  f"a list of names in lordo.diagnosis.ABLATIONS: {list(ABLATIONS)}"),
    "downstream_tasks": (lambda v: v is None or isinstance(v, str) and v.strip() != "",
                         "None (no downstream evaluation), 'core' or comma-separated lm-eval task names"),
    "downstream_limit": (lambda v: v is None or _int(1)(v), "None (every document) or an int >= 1"),
    "launcher": (lambda v: v in LAUNCHERS, f"one of {list(LAUNCHERS)}"),
    "config_dir": (lambda v: v is None or isinstance(v, str) and (repo_path(v)).is_dir(),
                   "None, or a directory of <preset>.yaml files (as configs/paper)"),
    "ladder_overrides": (lambda v: v is None or isinstance(v, dict) and all(
        k in PRESETS and isinstance(o, dict) for k, o in v.items()), "None or {preset: {config field: value}}"),
    "results_dir": (lambda v: isinstance(v, str) and v != "", "a directory path"),
    "bandwidths_gbps": (_list(lambda v: is_number(v) and v > 0),
                        "a non-empty list of bandwidths in Gb/s, each > 0"),
    "latency_us": (lambda v: is_number(v) and v >= 0, "a number >= 0"),
    "figures_dir": (lambda v: isinstance(v, str) and v != "", "a directory path"),
} | {name: (_int(1), "an int >= 1") for name in (
    "workers", "steps", "batch_size", "sync_every", "proj_every", "eval_every", "eval_batches", "repeats",
    "local_steps", "reference_workers", "ref_batch_size", "low_memory_batch_size")}


def notebook_params(namespace: dict[str, Any], *own: str) -> dict[str, Any]:
    """A notebook's parameters, read from its globals (the parameters cell, as papermill set them) and checked:
    the ones every notebook has (SHARED_PARAMS) and the notebook's `own`.

        P = analysis.notebook_params(globals(), "methods", "ranks")     # the cell after the parameters cell

    The notebook then reads only P. One-line ValueError as check_params."""
    return _checked({name: namespace[name] for name in (*SHARED_PARAMS, *own)}, namespace)


def check_params(**params: Any) -> dict[str, Any]:
    """Validate a notebook's parameters; return them as a dict. Raises a one-line ValueError naming the first
    bad one. TRAIN_FIELDS may be None (taken from config_dir's files or the package defaults). Called from a
    notebook that papermill ran, a name papermill injected that the notebook does not pass here (a misspelt
    `-p` name) is an error too: the notebook would otherwise run silently on its default."""
    return _checked(params, sys._getframe(1).f_globals)


def _checked(params: dict[str, Any], namespace: dict[str, Any]) -> dict[str, Any]:
    for name in sorted(_papermill_names(namespace) - set(params)):
        raise ValueError(f"unknown notebook parameter {name!r} (given to papermill): allowed {sorted(params)}")
    for name, value in params.items():
        if name not in CHECKS:
            raise ValueError(f"unknown parameter {name!r}: allowed {sorted(CHECKS)}")
        ok, allowed = CHECKS[name]
        if not (value is None and name in TRAIN_FIELDS or ok(value)):
            raise ValueError(f"parameter {name}={value!r} is invalid: allowed {allowed}")
    presets = list(dict.fromkeys(p for p in [params.get("preset"), *(params.get("presets") or [])] if p))
    for name in ("rank", "ranks", "low_memory_rank"):
        values = params.get(name) if name == "ranks" else [params.get(name)]
        for r in values or []:
            for preset in presets:
                if isinstance(r, int) and r > min_side(preset):
                    raise ValueError(f"parameter {name}={params[name]!r} is invalid for preset {preset}: allowed ints "
                                     f"in [1, {min_side(preset)}] (its smallest matrix side) or fractions in (0, 1]")
    overrides = params.get("ladder_overrides") or {}
    if params.get("regime"):
        for method in params.get("sweep_methods") or ["lordo"]:
            try:
                run_config(params, method, **params["regime"])
            except (ValueError, FileNotFoundError) as e:
                raise ValueError(f"parameter regime={params['regime']!r} gives no valid {method} run: {e}") from None
    for preset in presets:   # the shared fields must make a valid run of every method (config_dir files exist)
        for method in params.get("methods") or ["lordo"]:
            try:
                run_config(params | {"preset": preset}, method, **overrides.get(preset, {}))
            except (ValueError, FileNotFoundError) as e:
                raise ValueError(f"the parameters give no valid {method} run on {preset}: {e}") from None
    return params


def _papermill_names(namespace: dict[str, Any]) -> set[str]:
    """The names assigned in papermill's injected cell (its source starts with "# Parameters"), found in the
    IPython kernel's input history `In`; empty outside a papermill run."""
    for source in reversed(namespace.get("In") or []):
        if isinstance(source, str) and source.startswith("# Parameters"):
            return {t.id for node in ast.parse(source).body if isinstance(node, ast.Assign)
                    for t in node.targets if isinstance(t, ast.Name)}
    return set()


def min_side(preset: str) -> int:
    """min(p, q) over the preset's low-rank matrices (attention and MLP weights)."""
    c = PRESETS[preset]
    return min(c["d_model"], c["d_ff"])


# ---------------------------------------------------------------------- run configs
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


# ---------------------------------------------------------------------- tables
def matrix_rank(rank: int | float, preset: str) -> int:
    """The int rank the preset's smallest matrices get for `rank` (lordo.optim.resolve_rank)."""
    side = min_side(preset)
    return resolve_rank(rank, (side, side), f"the smallest matrices of preset {preset}")


def resolved_rank(c: TrainConfig) -> int:
    """The int rank a config's matrices get (fractions resolved against the preset's matrices)."""
    return matrix_rank(c.resolved_optimizer()["rank"], c.preset)


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
    df["layer"] = df["param"].map(layer_type)
    df["side"] = df["preset"].map(min_side)
    return df


def table_path(P: dict[str, Any], notebook: str, name: str) -> Path:
    return repo_path(P["results_dir"]) / notebook / f"{name}.csv"


def save_table(df: pd.DataFrame, P: dict[str, Any], notebook: str, name: str) -> None:
    path = table_path(P, notebook, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: df.to_csv(f, index=False))


def load_table(P: dict[str, Any], notebook: str, name: str) -> pd.DataFrame:
    return pd.read_csv(table_path(P, notebook, name))


# ---------------------------------------------------------------------- statistics
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


# ---------------------------------------------------------------------- projection noise
def _cached(name: str, key: dict[str, Any], compute) -> dict[str, pd.DataFrame]:
    """Tables cached in runs/analysis/ under the hash of everything they depend on (kept by `make clean`);
    compute() returns {part: table}."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    folder = runs_root() / "analysis" / f"{name}-{digest}"
    if (folder / "done").is_file():
        return {p.stem: pd.read_csv(p) for p in folder.glob("*.csv")}
    tables = compute()
    folder.mkdir(parents=True, exist_ok=True)
    for part, df in tables.items():
        write_atomic(folder / f"{part}.csv", lambda f, df=df: df.to_csv(f, index=False))
    write_json(folder / "done", key)   # last: a folder without it is recomputed
    return tables


def load_run_model(run: Run, vocab_size: int, device: torch.device) -> GPT:
    c = run.config
    model = GPT(model_config(c.preset, vocab_size=vocab_size, max_seq_len=c.seq_len), device=device)
    model.load_state_dict(torch.load(run.dir / "model.pt", map_location=device, weights_only=True))
    return model


def _matrices(model: GPT) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if n.startswith("layers.") and p.ndim == 2}


def _sample(tokens: np.ndarray, n: int, seq_len: int, rng: np.random.Generator, device) -> tuple:
    starts = rng.integers(0, len(tokens) - seq_len - 1, n)
    rows = torch.from_numpy(np.asarray(tokens[starts[:, None] + np.arange(seq_len + 1)], dtype=np.int64)).to(device)
    return rows[:, :-1], rows[:, 1:]


def _gradient(model: GPT, tokens, n: int, seq_len: int, rng, device, chunk: int = 32) -> dict[str, torch.Tensor]:
    """Mean-loss gradient of every matrix on n fresh sequences (in chunks of `chunk`)."""
    model.zero_grad(set_to_none=True)
    for start in range(0, n, chunk):
        x, y = _sample(tokens, min(chunk, n - start), seq_len, rng, device)
        (model(x, y)[1] * len(x) / n).backward()
    return {k: oriented(p.grad.detach().clone(), is_transposed(p.shape)) for k, p in _matrices(model).items()}


def _pseudo_gradient(model: GPT, start: dict[str, torch.Tensor], tokens, batch: int, local_steps: int, lr: float,
                     seq_len: int, rng, device) -> dict[str, torch.Tensor]:
    """One worker's parameter change after local_steps AdamW steps (fresh state) on batches of `batch`."""
    model.load_state_dict(start)
    opt = make_optimizer("ddp", model, lr=lr)
    for _ in range(local_steps):
        x, y = _sample(tokens, batch, seq_len, rng, device)
        model(x, y)[1].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {k: oriented(p.detach() - start[k], is_transposed(p.shape)) for k, p in _matrices(model).items()}


def _projections(matrices: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """Exact rank-r projection of each matrix, batched over same-shape matrices."""
    by_shape: dict[tuple, list[str]] = {}
    for name, X in matrices.items():
        by_shape.setdefault(tuple(X.shape), []).append(name)
    out = {}
    for names in by_shape.values():
        out.update(zip(names, compute_projection(torch.stack([matrices[n] for n in names]).float(), rank, "svd")))
    return out


def _missed_energy(Q: torch.Tensor, X: torch.Tensor, Q_best: torch.Tensor) -> float:
    """Fraction of the energy the best rank-r subspace captures of X that span(Q) misses."""
    best = (Q_best.mT @ X).square().sum()
    return (1 - (Q.mT @ X).square().sum() / best).clamp_min(0).item()


def projection_noise(run: Run, P: dict[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """How far the rank-r projection from a small-batch estimate is from the one from a reference, per matrix.

    gradient: the gradient on B sequences (local: one worker) or M*B (global: M workers' average) against
    the gradient on ref_batch_size sequences. pseudo-gradient: one worker's parameter change after
    local_steps AdamW steps on batches of B (local), or the average of M workers' changes (global), against
    the average of reference_workers other workers' changes.

    Returns (noise, spectrum). noise rows: source, estimate, batch_size, samples, repeat, param, layer,
    distance = ||Q Q^T - Q_ref Q_ref^T||_F / sqrt(2r), and weighted_distance = sqrt(the fraction of the
    reference's best rank-r energy that span(Q) misses), which discounts directions the reference itself
    hardly prefers. spectrum: each reference's singular values over its largest (sigma_i / sigma_1), per
    matrix (the pseudo-gradient reference at the largest B). Cached in runs/analysis/ by run and settings.
    """
    from tqdm import tqdm

    from lordo.data import prepare

    c, M = run.config, P["workers"] or run.config.workers
    rank = resolved_rank(run_config(P, "lordo"))
    settings = {k: P[k] for k in ("batch_sizes", "ref_batch_size", "repeats", "local_steps", "reference_workers")}
    settings["lr"] = P["lr"] or c.lr
    key = {"run": c.hash(), "workers": M, "rank": rank, **settings}

    def spectrum(source: str, reference: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
        return [{"source": source, "param": name, "layer": layer_type(name), "index": i + 1, "sigma": s}
                for name, X in reference.items()
                for i, s in enumerate((lambda v: v / v[0])(torch.linalg.svdvals(X.float())).tolist())]

    def compute() -> dict[str, pd.DataFrame]:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        data = prepare(c.corpus, c.tokenizer, c.vocab_size, max_tokens=c.corpus_tokens)
        model = load_run_model(run, data.vocab_size, device)
        start = {k: v.detach().clone() for k, v in model.state_dict().items()}
        rng = np.random.default_rng(0)
        grad = lambda n: _gradient(model, data.train, n, c.seq_len, rng, device)
        pseudo = lambda b: _pseudo_gradient(model, start, data.train, b, P["local_steps"], settings["lr"], c.seq_len,
                                            rng, device)
        mean = lambda ds: {k: torch.stack([d[k] for d in ds]).mean(0) for k in ds[0]}
        rows, spectra = [], []
        bar = tqdm(total=2 * len(P["batch_sizes"]), desc="projection noise", unit="batch size")
        gradient_reference = grad(P["ref_batch_size"])
        spectra += spectrum("gradient", gradient_reference)
        for source, estimate_fn in (("gradient", grad), ("pseudo-gradient", pseudo)):
            for B in P["batch_sizes"]:
                reference = gradient_reference if source == "gradient" else \
                    mean([pseudo(B) for _ in range(P["reference_workers"])])
                if source == "pseudo-gradient" and B == max(P["batch_sizes"]):
                    spectra += spectrum(source, reference)
                Q_ref = _projections(reference, rank)
                for rep in range(P["repeats"]):
                    workers = [estimate_fn(B) for _ in range(M)]
                    for estimate, X in (("local", workers[0]), ("global", mean(workers))):
                        for name, Q in _projections(X, rank).items():
                            rows.append({
                                "source": source, "estimate": estimate, "batch_size": B,
                                "samples": B if estimate == "local" else M * B, "repeat": rep, "param": name,
                                "layer": layer_type(name), "distance": projection_distance(Q, Q_ref[name]).item(),
                                "weighted_distance": _missed_energy(Q, reference[name], Q_ref[name]) ** 0.5})
                bar.update()
        bar.close()
        model.load_state_dict(start)
        return {"noise": pd.DataFrame(rows), "spectrum": pd.DataFrame(spectra)}

    with cpu_threads(1):   # small models' matmuls and SVDs: several times faster unthreaded on few cores
        tables = _cached("projection_noise", key, compute)
    return tables["noise"].assign(rank=rank, workers=M, preset=c.preset), tables["spectrum"].assign(rank=rank)


# ---------------------------------------------------------------------- memory and downstream
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


def time_saved_verdict(saved: pd.DataFrame, reduction: float, claimed: float) -> str:
    """Claim 4's ~10x communication cut as time: 'supported' when the bytes fall by at least COMM_REDUCTION_SHARE
    of the claimed factor and that saves time at the slowest bandwidth of `saved` (one preset's rows of
    time_saved); 'not supported' otherwise, saying which part fails."""
    slow, fast = saved.loc[saved["gbps"].idxmin()], saved.loc[saved["gbps"].idxmax()]
    if comm_reduction_verdict(reduction, claimed) != "supported":
        return f"not supported (bytes fall {reduction:.1f}x, the paper ~{claimed:g}x)"
    if slow["saved"] <= 0:
        return f"not supported (no time saved even at {slow['gbps']:g} Gb/s)"
    return (f"supported ({slow['saved']:.0%} of the time saved at {slow['gbps']:g} Gb/s, "
            f"{fast['saved']:.0%} at {fast['gbps']:g} Gb/s)")


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


# ---------------------------------------------------------------------- claims
# When a measurement counts as agreeing with a claim the paper states in words (notebooks 00-04).
COMM_REDUCTION_SHARE = 0.8     # claim 4: the bytes fall by at least this share of the paper's factor (~10x)
STAGNANT_SIMILARITY = 0.99     # claim 2: consecutive projections at least this similar have not moved...
STAGNANT_EXPLORED = 1.05       # ... and the subspaces visited span at most this many times r
EXPLORING_EXPLORED = 1.5       # claim 3: the subspaces visited span more than this many times r
SQRT_B_SLOPE = -0.5            # claim 1: the slope of log noise against log B of a 1/sqrt(B) fall
STATE_RATIO_TOLERANCE = 0.01   # claim 6: measured low-rank state / AdamW's within this of r(p+2q)/(2pq)


def comm_reduction_verdict(reduction: float, claimed: float) -> str:
    """Claim 4's communication cut: `reduction` (x fewer bytes than the baseline) against the paper's factor."""
    return "supported" if reduction >= COMM_REDUCTION_SHARE * claimed else "not supported"


def local_noisier(noise: pd.DataFrame, source: str) -> bool:
    """Whether one worker's projection (local) is farther from the reference than M workers' (global) at every
    batch size, in the mean over matrices and repeats of projection_noise's table."""
    mean = noise[noise["source"] == source].groupby(["batch_size", "estimate"])["distance"].mean().unstack()
    return bool((mean["local"] > mean["global"]).all())


def noise_verdict(fits: pd.DataFrame, local_worse: bool) -> str:
    """Claim 1 from the slopes of log noise against log B (rows of slope_fits, one per measure, with lo and hi):
    supported when noise falls (every interval below 0), local estimates are noisier and some measure is
    consistent with 1/sqrt(B); 'partly' when it falls more slowly; not supported when some measure rises."""
    falls = bool((fits["hi"] < 0).all())
    consistent = bool(((fits["lo"] <= SQRT_B_SLOPE) & (SQRT_B_SLOPE <= fits["hi"])).any())
    if falls and local_worse:
        return "supported" if consistent else "partly: noise falls with B, more slowly than 1/sqrt(B)"
    return "not supported" if bool((fits["lo"] > 0).any()) else "inconclusive"


def stagnation_verdict(similarity: float, explored: float, rank: int) -> str:
    """Claim 2: with omega = 1 the projection stays in one rank-r subspace (mean basis similarity of consecutive
    projections, dimension of all subspaces visited)."""
    stuck = similarity > STAGNANT_SIMILARITY and explored <= STAGNANT_EXPLORED * rank
    return "supported" if stuck else "not supported"


def exploration_verdict(explored: float, rank: int, similarity: float, similarity_without: float) -> str:
    """Claim 3: the full-rank QH term (omega < 1) explores beyond r dimensions and moves the projection more than
    the run without it (`similarity_without`: lordo_global's)."""
    return "supported" if explored > EXPLORING_EXPLORED * rank and similarity < similarity_without \
        else "not supported"


def moments_verdict(best: str, gaps: dict[str, dict[str, Any]]) -> str:
    """The moments_on_refresh decision: the best option, and whether every other one is worse beyond the 95%
    interval of its paired gap to it (`gaps`: option -> paired_gap against `best`)."""
    clear = all(g["lo"] > 0 and g["n"] > 1 for g in gaps.values())
    return f"{best} best" + (", ahead of every other option beyond the 95% interval" if clear else
                             ", not separated from every option at 95%")


def state_verdict(ratio: float, predicted: float) -> str:
    """Claim 6: the measured low-rank state against AdamW's is what the shapes predict (matrix_state)."""
    return "supported" if abs(ratio - predicted) < STATE_RATIO_TOLERANCE else "not supported"


def paper_reference() -> dict[str, Any]:
    return json.loads((REPO / "data" / "paper_reference.json").read_text())


def claim(number: int | str, measured: str, verdict: str) -> dict[str, str]:
    """A row of the claims table: the claim and the paper's figure (labelled, with its source) beside this run's."""
    ref = paper_reference()["claims"][str(number)]
    return {"claim": f"{number}. {ref['claim']}", "paper": f"paper: {ref['paper']}", "source": ref["source"],
            "this run": measured, "verdict": verdict}


def verdict(gap: dict[str, Any], threshold: float, want: str = "above") -> str:
    """'supported' when the 95% interval of a paired_gap lies on the claimed side of threshold, 'not supported'
    when it lies on the other side, else 'inconclusive' (always, from one seed: no interval)."""
    if gap["n"] < 2:
        agrees = gap["mean"] > threshold if want == "above" else gap["mean"] < threshold
        return f"inconclusive (one seed; its point estimate {'agrees' if agrees else 'disagrees'})"
    above, below = gap["lo"] > threshold, gap["hi"] < threshold
    if want == "below":
        above, below = below, above
    return "supported" if above else "not supported" if below else "inconclusive"


def claims_table(rows: list[dict[str, str]], P: dict[str, Any], notebook: str) -> pd.DataFrame:
    """Save the notebook's claims (claims.csv, read by lordo.reproduce for the README) and print them."""
    df = pd.DataFrame(rows, columns=["claim", "paper", "source", "this run", "verdict"])
    save_table(df, P, notebook, "claims")
    beside_figures = repo_path(P["figures_dir"]) / notebook / "claims.csv"   # the figures README reads this copy
    beside_figures.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(beside_figures, lambda f: df.to_csv(f, index=False))
    for r in rows:
        print(f"{r['claim']}\n    {r['paper']}  [{r['source']}]\n    this run: {r['this run']}\n"
              f"    verdict: {r['verdict']}\n")
    return df
