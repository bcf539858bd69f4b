"""One option is one row of `lordo.optim.OPTIONS`: the optimizer's defaults and validation, the run config's
fields, their help and the config hash's compatibility all come from it; each bucket's step variant is chosen
once, when the state is built."""

import dataclasses
import re

import pytest
import torch

from lordo.config import IMPLICIT_BEFORE, LATER_OPTIMIZER_FIELDS, TrainConfig, field_help
from lordo.optim import DEFAULTS, OPTIONS, make_optimizer, validate_hparams
from lordo.optim.options import FIRST_RELEASE

# a value outside each option's kind
BAD = {"lr": -1.0, "seed": -1, "rank": 0, "sync_every": 0, "omega": 1.5, "weight_decay": -0.1, "betas": (0.9, 1.0),
       "eps": 0.0, "clip": 0.0, "error_feedback": "yes", "moments_on_refresh": "swap", "proj_method": "qr",
       "proj_every": 0, "proj_iters": 0, "proj_source": "loss", "qh_scale": "max", "mu": 0.0,
       "average_moments": "some", "average_moments_every": 0, "ef_on_sync": "drop", "fullrank_lr_scale": 1001.0,
       "outer_lr": 0.0,
       "outer_momentum": 1.0, "comm_dtype": "int8", "state_dtype": "float16", "host_anchor": 1, "nonfinite": "ignore",
       "bucket_mb": 0, "diagnostics": None}


def test_every_option_has_a_default_that_passes_and_a_bad_value_named_in_one_line():
    assert list(DEFAULTS) == list(OPTIONS) == list(BAD)
    validate_hparams(dict(DEFAULTS))
    for name, bad in BAD.items():
        with pytest.raises(ValueError, match=re.escape(f"{name}={bad!r} is invalid: allowed ")) as err:
            validate_hparams(DEFAULTS | {name: bad})
        assert str(err.value).startswith(name) and OPTIONS[name].kind.allowed in str(err.value)
        assert "\n" not in str(err.value)


def test_the_config_fields_and_help_come_from_the_rows():
    by_name = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for name, o in OPTIONS.items():
        if not o.in_config:     # lr and seed: the config's own fields (peak lr; the data's seed too)
            continue
        f = by_name[name]
        assert f.metadata["help"] == o.help and f.metadata["kind"].allowed == o.kind.allowed, name
        assert f.default == o.config_default, name
        shown = ",".join(map(str, o.default)) if isinstance(o.default, tuple) else str(o.default)
        if o.config_default is None and o.default is not None:
            assert f"lordo.optim.DEFAULTS: {shown}" in field_help(f), name
    assert by_name["host_anchor"].type == "bool | None" and by_name["diagnostics"].type == "bool"   # CLI switches
    fields = list(by_name)
    in_config = [n for n, o in OPTIONS.items() if o.in_config]
    assert [n for n in fields if n in in_config] == in_config       # in the table's order


def test_the_hash_compatibility_comes_from_the_rows():
    assert set(LATER_OPTIMIZER_FIELDS) == {"proj_iters", "nonfinite", "bucket_mb", "qh_scale", "mu", "average_moments",
                                           "average_moments_every", "ef_on_sync", "fullrank_lr_scale"}
    assert all(OPTIONS[n].since > FIRST_RELEASE for n in LATER_OPTIMIZER_FIELDS)
    assert IMPLICIT_BEFORE == {"qh_scale": "mean_denom", "mu": 1.0, "average_moments": "none",
                               "average_moments_every": 1, "ef_on_sync": "keep", "fullrank_lr_scale": 1.0}
    unset = TrainConfig(method="lordo", preset="tiny")
    assert unset.hash() == TrainConfig(method="lordo", preset="tiny", qh_scale=None).hash()
    assert unset.hash() != TrainConfig(method="lordo", preset="tiny", qh_scale="mean_denom").hash()   # set: keyed


def variant(**kw) -> str:
    w = torch.nn.Parameter(torch.randn(8, 16))
    opt = make_optimizer("lordo", [{"params": [w], "param_names": ["w"], "lowrank": True}], rank=2, **kw)
    w.grad = torch.randn_like(w)
    opt.step()
    chosen = opt.buckets[0].variant
    w.grad = torch.randn_like(w)
    opt.step()
    assert opt.buckets[0].variant is chosen          # chosen once, with the state
    return chosen.name


def test_each_bucket_takes_one_variant_chosen_with_its_state():
    assert variant(fused=False) == "eager"
    assert variant(state_dtype="bfloat16") == "rounded"
    assert variant(fused=True) == "compiled"
