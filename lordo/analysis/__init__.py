"""The experiments behind the notebooks, one module per part; every name is here, as `analysis.<name>`.

    P = analysis.notebook_params(globals(), "methods")                  # params: papermill globals -> checked dict
    runs = analysis.train_all([analysis.run_config(P, m, seed=s) for m in P["methods"] for s in P["seeds"]])
    analysis.save_table(analysis.summaries(runs), P, "00_quickstart", "runs")   # <results_dir>/00_quickstart/runs.csv

    params            the notebooks' parameters, checked (one-line errors)
    training          run configs from the parameters; runs trained or loaded, in named groups
    tables            runs as result tables, saved under results_dir
    stats             t-intervals, gaps paired by seed, bootstrapped slopes
    projection_noise  notebook 01's measurement (not runs)
    resources         optimizer state, memory options, predicted wall-clock time, downstream scores
    claims            named thresholds, verdicts, the claims table

Notebooks compute through this package and the training API, write tables under `results_dir`, and
draw figures from those tables only (`lordo.plots`). Runs are cached by config hash in runs/; the
projection-noise measurements, which are not runs, are cached beside them in runs/analysis/.
"""

from __future__ import annotations

from lordo.analysis.claims import (
    COMM_REDUCTION_SHARE,
    EXPLORING_EXPLORED,
    SQRT_B_SLOPE,
    STAGNANT_EXPLORED,
    STAGNANT_SIMILARITY,
    STATE_RATIO_TOLERANCE,
    claim,
    claims_table,
    comm_reduction_verdict,
    exploration_verdict,
    local_noisier,
    moments_verdict,
    noise_verdict,
    paper_reference,
    stagnation_verdict,
    state_verdict,
    time_saved_verdict,
    verdict,
)
from lordo.analysis.params import CHECKS, SHARED_PARAMS, check_params, notebook_params
from lordo.analysis.projection_noise import load_run_model, projection_noise
from lordo.analysis.resources import downstream, matrix_state, memory_options, time_saved, wallclock
from lordo.analysis.stats import ci95, fmt_gap, paired_gap, slope_fits
from lordo.analysis.tables import (
    LAYER_TYPES,
    cached_tables,
    coherence_records,
    curves,
    describe,
    layer_type,
    load_table,
    save_table,
    summaries,
    sync_records,
    table_path,
)
from lordo.analysis.training import (
    ABLATIONS,
    TRAIN_FIELDS,
    ladder_config,
    matrix_rank,
    min_side,
    resolved_rank,
    run_config,
    train_all,
    train_groups,
    variant_options,
)
from lordo.optim import DEFAULTS, METHODS  # what the notebooks read beside the runs

__all__ = ["ABLATIONS", "CHECKS", "COMM_REDUCTION_SHARE", "DEFAULTS", "EXPLORING_EXPLORED", "LAYER_TYPES", "METHODS",
           "SHARED_PARAMS", "SQRT_B_SLOPE", "STAGNANT_EXPLORED", "STAGNANT_SIMILARITY", "STATE_RATIO_TOLERANCE",
           "TRAIN_FIELDS", "cached_tables", "coherence_records", "check_params", "ci95", "claim", "claims_table",
           "comm_reduction_verdict", "curves",
           "describe", "downstream", "exploration_verdict", "fmt_gap", "ladder_config", "layer_type", "load_run_model",
           "load_table",
           "local_noisier", "matrix_rank", "matrix_state", "memory_options", "min_side", "moments_verdict",
           "noise_verdict", "notebook_params", "paired_gap", "paper_reference", "projection_noise", "resolved_rank",
           "run_config", "save_table", "slope_fits", "stagnation_verdict", "state_verdict", "summaries",
           "sync_records", "table_path", "time_saved", "time_saved_verdict", "train_all", "train_groups",
           "variant_options", "verdict", "wallclock"]
