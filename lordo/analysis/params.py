"""The notebooks' parameters: papermill globals -> one checked dict, with one-line errors."""

from __future__ import annotations

import ast
import dataclasses
import math
import sys
from typing import Any

from lordo.analysis.training import ABLATIONS, TRAIN_FIELDS, ladder_config, min_side, run_config, variant_options
from lordo.config import LAUNCHERS, TrainConfig
from lordo.kinds import is_int, is_number
from lordo.model import PRESETS
from lordo.optim import METHODS, MOMENT_RULES, OPTIONS, is_rank
from lordo.paths import repo_path

NOISE_MODELS = ("shared point", "regime")   # notebook 01: the DDP runs whose models the projections are measured on

# The parameters every notebook 00-04 has (notebook_params): the shared TRAIN_FIELDS, seeds, where things go.
SHARED_PARAMS = ("preset", "workers", "steps", "batch_size", "seq_len", "lr", "sync_every", "proj_every", "rank",
                 "eval_every", "eval_batches", "seeds", "launcher", "config_dir", "results_dir", "figures_dir")


def _int(lo: int):
    return lambda v: is_int(v) and v >= lo


def _list(ok):
    return lambda v: isinstance(v, list | tuple) and len(v) > 0 and all(ok(x) for x in v)


_TRAIN_CONFIG_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


def _is_variant(v: Any) -> bool:
    """A method, or '<method>, <ablation>, ...' with ablations of ABLATIONS."""
    return isinstance(v, str) and (m := v.split(", "))[0] in METHODS and all(a in ABLATIONS for a in m[1:])


_RANK = OPTIONS["rank"].kind.allowed
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
    "noise_models": (_list(lambda v: v in NOISE_MODELS), f"a non-empty list of {list(NOISE_MODELS)}"),
    "moments": (_list(lambda v: v in MOMENT_RULES), f"a non-empty list of {list(MOMENT_RULES)}"),
    "gap_steps": (lambda v: v is None or _int(1)(v), "None (the config files' steps) or an int >= 1"),
    "gap_batch_sizes": (_list(_int(1)), "a non-empty list of ints >= 1 that divide steps x batch_size"),
    "gap_sync_everys": (_list(_int(1)), "a non-empty list of ints >= 1"),
    "regime": (lambda v: v is None or isinstance(v, dict) and set(v) <= _TRAIN_CONFIG_FIELDS,
               "None or {TrainConfig field: value} (the claim-4 regime's changes to the shared point)"),
    "lrs": (_list(lambda v: is_number(v) and 0 < v < math.inf),
            "a non-empty list of learning rates, each a number > 0"),
    "sweep_methods": (_list(_is_variant),
                      f"a non-empty list of methods {list(METHODS)}, each alone or as '<method>, <ablation>, ...' "
                      f"with ablations of lordo.analysis.ABLATIONS: {list(ABLATIONS)}"),
    "sweep_dir": (lambda v: isinstance(v, str) and v != "", "a directory path"),
    "penalty_setup": (lambda v: v is None or isinstance(v, dict) and set(v) <= _TRAIN_CONFIG_FIELDS,
                      "None or {TrainConfig field: value} (the small-batch setup of lordo.penalty)"),
    "penalty_variants": (lambda v: v is None or isinstance(v, dict) and len(v) > 0 and all(
        _is_variant(k) and _list(lambda x: is_number(x) and 0 < x < math.inf)(lrs) for k, lrs in v.items()),
        "None (not run) or {variant: [lr, ...]}, each variant a method or '<method>, <ablation>, ...' with "
        f"ablations of lordo.analysis.ABLATIONS: {list(ABLATIONS)}"),
    "penalty_seeds": (_list(_int(0)), "a non-empty list of ints >= 0"),
    "one_worker_variants": (lambda v: isinstance(v, list | tuple) and all(isinstance(x, str) for x in v),
                            "a list of LoRDO variants of sweep_methods"),
    "horizon_steps": (lambda v: v is None or _int(1)(v), "None (no longer runs) or an int >= 1"),
    "horizon_variants": (lambda v: isinstance(v, list | tuple) and all(isinstance(x, str) for x in v),
                         "a list of variants of sweep_methods"),
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
    "equal_tokens_per_param": (lambda v: isinstance(v, bool), "True (each rung trains preset's tokens per "
                               "parameter) or False (each rung trains steps, or its ladder_overrides)"),
    "results_dir": (lambda v: isinstance(v, str) and v != "", "a directory path"),
    "bandwidths_gbps": (_list(lambda v: is_number(v) and v > 0),
                        "a non-empty list of bandwidths in Gb/s, each > 0"),
    "latency_us": (lambda v: is_number(v) and v >= 0, "a number >= 0"),
    "figures_dir": (lambda v: isinstance(v, str) and v != "", "a directory path"),
} | {name: (OPTIONS[name].kind.ok, OPTIONS[name].kind.allowed) for name in ("sync_every", "proj_every")} | {
    name: (_int(1), "an int >= 1") for name in (
        "workers", "steps", "batch_size", "eval_every", "eval_batches", "repeats", "local_steps",
        "reference_workers", "ref_batch_size", "low_memory_batch_size")}


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
    `-p` name) is an error too: the notebook would otherwise run silently on its default. Names another
    notebook owns (CHECKS) pass: one preset file (`papermill -f params/cpu.yaml`) serves every notebook."""
    return _checked(params, sys._getframe(1).f_globals)


def _checked(params: dict[str, Any], namespace: dict[str, Any]) -> dict[str, Any]:
    for name in sorted(_papermill_names(namespace) - set(params) - set(CHECKS)):
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
    if "regime" in (params.get("noise_models") or ()) and not params.get("regime"):
        raise ValueError("parameter noise_models names 'regime' but regime is None: give regime, or allowed "
                         "noise_models ['shared point']")
    swept = params.get("sweep_methods") or ()
    unswept = [v for v in params.get("horizon_variants") or () if v not in swept]
    if params.get("horizon_steps") and unswept:
        raise ValueError(f"parameter horizon_variants={unswept!r} is invalid: allowed variants of sweep_methods "
                         f"{list(swept)}")
    alone = [v for v in params.get("one_worker_variants") or () if v not in swept or not v.startswith("lordo")]
    if alone:
        raise ValueError(f"parameter one_worker_variants={alone!r} is invalid: allowed LoRDO variants of "
                         f"sweep_methods {list(swept)}")
    if params.get("regime"):
        for method in params.get("sweep_methods") or ["lordo"]:
            name, options = variant_options(method)
            try:
                run_config(params, name, **{**params["regime"], **options})
            except (ValueError, FileNotFoundError) as e:
                raise ValueError(f"parameter regime={params['regime']!r} gives no valid {method} run: {e}") from None
    for preset in presets:   # the shared fields must make a valid run of every method (config_dir files exist)
        for method in params.get("methods") or ["lordo"]:
            try:
                ladder_config(params, preset, method, seed=0)
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
