"""One home per fact: the method table, the optimizer's options in TrainConfig, rank resolution, the revision."""

import subprocess
from dataclasses import fields

import pytest

from lordo import analysis, plots, reference
from lordo.config import TrainConfig, make_config
from lordo.model import GPT, model_config
from lordo.optim import DEFAULTS, METHODS, make_optimizer
from lordo.paths import REPO, git_commit


def test_the_reference_lists_the_optimizers_methods():
    """The float64 reference is written independently of lordo.optim; its method lists must still agree."""
    assert reference.METHODS == tuple(METHODS)
    assert reference.LOWRANK_METHODS == tuple(m for m, spec in METHODS.items() if spec.lowrank)
    assert reference.LOCAL_METHODS == tuple(m for m, spec in METHODS.items() if spec.local)


def test_plots_read_the_method_table():
    assert plots.order(["lordo", "other", "ddp", "lowrank_ddp"]) == ["ddp", "lowrank_ddp", "lordo", "other"]
    assert [plots.label(m) for m in METHODS] == [spec.label for spec in METHODS.values()]
    assert set(plots.COLORS) == set(METHODS)
    assert len({plots.label(m) for m in METHODS}) == len(METHODS)


def test_every_optimizer_option_is_a_config_field():
    names = {f.name for f in fields(TrainConfig)}
    assert set(DEFAULTS) <= names, f"optimizer options missing from TrainConfig: {sorted(set(DEFAULTS) - names)}"


@pytest.mark.parametrize("name,value", [("proj_iters", 3), ("nonfinite", "skip"), ("bucket_mb", 0.5),
                                        ("qh_scale", "update_rms"), ("mu", 4.0), ("average_moments", "all"),
                                        ("average_moments_every", 2), ("ef_on_sync", "reproject"),
                                        ("fullrank_lr_scale", 0.3)])
def test_optimizer_options_reach_the_optimizer(name, value):
    cfg = make_config(method="lordo", preset="nano", **{name: str(value)})     # as typed on the command line
    assert cfg.optimizer_hparams()[name] == value
    opt = make_optimizer(cfg.method, GPT(model_config("nano")), **cfg.optimizer_hparams())
    assert opt.hparams[name] == value
    assert cfg.hash() != make_config(method="lordo", preset="nano").hash()


def test_options_added_later_keep_earlier_hashes():
    """A config that leaves the later options unset hashes as before they existed: the key without them."""
    import hashlib
    import json

    from lordo.config import EXECUTION_FIELDS, IMPLICIT_BEFORE, LATER_OPTIMIZER_FIELDS
    from lordo.model import PRESETS
    cfg = make_config(method="lordo", preset="tiny", rank=4)
    before = {k: v for k, v in cfg.to_dict().items() if k not in EXECUTION_FIELDS + LATER_OPTIMIZER_FIELDS}
    resolved = {k: v for k, v in cfg.resolved_optimizer().items() if k not in IMPLICIT_BEFORE}   # their old behaviour
    key = {**before, "resolved_optimizer": resolved, "model": PRESETS["tiny"]}
    assert cfg.hash() == hashlib.sha256(json.dumps(key, sort_keys=True, default=list).encode()).hexdigest()[:12]


@pytest.mark.parametrize("rank", [0.25, 0.3, 1.0, 4])
def test_analysis_resolves_ranks_as_the_optimizer_does(rank):
    opt = make_optimizer("lordo", GPT(model_config("tiny")), rank=rank)
    cfg = make_config(method="lordo", preset="tiny", rank=rank)
    assert analysis.resolved_rank(cfg) == min(b.rank for b in opt.buckets)


def test_one_git_revision():
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert git_commit() == head and head.startswith(git_commit(short=True))
