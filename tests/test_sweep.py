"""Each method at its own lr (lordo.sweep): selection on validation, report on held-out windows, the cache."""

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from lordo import sweep
from lordo.analysis import check_params
from lordo.data import prepare
from lordo.evaluate import load_model
from lordo.runs import Run

REGIME = {"preset": "nano", "batch_size": 2, "steps": 4, "eval_every": 2, "eval_batches": 1}
RMS = "lordo, QH term at the update's RMS"


def params(tmp_path, **changes):
    return check_params(**{
        "preset": "tiny", "workers": 2, "steps": 8, "batch_size": 1, "seq_len": 32, "lr": 3e-3, "sync_every": 2,
        "proj_every": 2, "rank": 4, "eval_every": 4, "eval_batches": 2, "launcher": "sim", "config_dir": None,
        "seeds": [0, 1], "sweep_seeds": [0], "regime": REGIME, "lrs": [1e-3, 1e-2],
        "sweep_methods": ["lowrank_ddp", "lordo", RMS], "sweep_dir": str(tmp_path / "sweeps"),
        "one_worker_variants": ["lordo", RMS], "horizon_steps": 6,
        "horizon_variants": ["lowrank_ddp", RMS]} | changes)


def grid_table(losses: dict[tuple[str, float], list[float]]) -> pd.DataFrame:
    return pd.DataFrame([{"method": m, "variant": m, "lr": lr, "seed": s, "val_loss": x, "val_ppl": np.exp(x),
                          "heldout_ppl": np.exp(x), "stage": "grid"}
                         for (m, lr), xs in losses.items() for s, x in enumerate(xs)])


def test_select_lr_takes_the_lowest_mean_validation_loss_and_the_smaller_lr_on_ties():
    t = grid_table({("a", 1e-3): [5.0, 5.0], ("a", 1e-2): [4.0, 6.2], ("b", 1e-3): [4.0, 4.0], ("b", 3e-3): [4.0, 4.0],
                    ("b", 1e-2): [4.5, 4.5]})
    assert sweep.select_lr(t) == {"a": 1e-3, "b": 1e-3}
    profile = sweep.lr_profile(t).set_index(["variant", "lr"])
    assert profile["chosen"].sum() == 2 and profile.loc[("a", 1e-3), "at_edge"]
    inside = grid_table({("a", 1e-3): [5.0], ("a", 3e-3): [4.0], ("a", 1e-2): [4.5], ("b", 3e-2): [4.0],
                         ("b", 1e-2): [4.1]})
    assert sweep.lr_profile(inside).set_index("variant")["at_edge"].groupby("variant").any().to_dict() == \
        {"a": False, "b": True}   # edges per variant: b tried 1e-2 and 3e-2 only


def test_next_lr_continues_the_spacing_beyond_the_edge_of_the_best():
    assert sweep.next_lr([1e-3, 3e-3, 1e-2], 1e-2) == 0.03
    assert sweep.next_lr([1e-3, 3e-3, 1e-2], 1e-3) == 0.0003
    assert sweep.next_lr([1e-3, 3e-3, 1e-2, 3e-2], 3e-2) == 0.09
    assert sweep.next_lr([1e-3, 3e-3, 1e-2], 3e-3) is None and sweep.next_lr([1e-3], 1e-3) is None


def test_one_worker_control_trains_lordo_on_all_sequences_of_the_regimes_step(tmp_path):
    P = params(tmp_path)
    lordo, one = sweep.variant_config(P, "lordo", 1e-3, 1), sweep.variant_config(P, sweep.ONE_WORKER, 1e-3, 1)
    assert (lordo.preset, lordo.workers, lordo.batch_size, lordo.lr, lordo.seed) == ("nano", 2, 2, 1e-3, 1)
    assert (one.method, one.workers, one.batch_size) == ("lordo", 1, 4)
    assert one.tokens_per_step == lordo.tokens_per_step and one.steps == lordo.steps
    assert one.replace(workers=2, batch_size=2).hash() == lordo.hash()
    assert sweep.grid(P)[0].hash() == sweep.regime_config(P, "lowrank_ddp", lr=1e-3, seed=0).hash()


def test_a_variant_is_its_method_with_an_ablations_options(tmp_path):
    P = params(tmp_path)
    rms, lordo = sweep.regime_config(P, RMS, lr=1e-3, seed=0), sweep.regime_config(P, "lordo", lr=1e-3, seed=0)
    assert (rms.method, rms.qh_scale, lordo.qh_scale) == ("lordo", "update_rms", None)
    assert rms.replace(qh_scale=None).hash() == lordo.hash() != rms.hash()
    assert sweep.grid_variants(P) == [m for m in P["sweep_methods"] for _ in P["lrs"]]
    one = sweep.variant_config(P, RMS + sweep.ONE_WORKER_MARK, 1e-3, 0)
    assert (one.workers, one.batch_size, one.qh_scale) == (1, rms.workers * rms.batch_size, "update_rms")
    with pytest.raises(ValueError, match=r"^parameter one_worker_variants=\['lowrank_ddp'\] is invalid"):
        params(tmp_path, one_worker_variants=["lowrank_ddp"])
    both = sweep.regime_config(P, RMS + ", Q from gradient", lr=1e-3, seed=0)
    assert (both.qh_scale, both.proj_source) == ("update_rms", "gradient")
    with pytest.raises(ValueError, match=r"^parameter horizon_variants=\['ddp'\] is invalid"):
        params(tmp_path, horizon_variants=["ddp"])
    with pytest.raises(ValueError, match=r"^parameter sweep_methods=\['lordo, no such thing'\] is invalid"):
        params(tmp_path, sweep_methods=["lordo, no such thing"])


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORDO_RUNS_DIR", str(tmp / "runs"))
        P = params(tmp)
        yield P, sweep.lr_sweep(P), tmp


def test_heldout_windows_follow_the_selection_windows_and_match_a_direct_computation(swept):
    P, tables, tmp = swept
    runs = tables["runs"]
    assert set(runs["variant"]) == {"lowrank_ddp", "lordo", RMS, sweep.ONE_WORKER, RMS + sweep.ONE_WORKER_MARK}
    grid_rows = runs[runs["stage"] == "grid"]
    chosen = sweep.select_lr(grid_rows, by="variant")
    for m, g in grid_rows.groupby("variant"):   # the grid, then one lr beyond its edge while the best lies there
        tried = g["lr"].tolist()   # in the order trained
        assert tried[:2] == [1e-3, 1e-2] and len(tried) <= 2 + sweep.MAX_EXTENSIONS
        for k in range(2, len(tried)):
            assert tried[k] == sweep.next_lr(tried[:k], sweep.select_lr(g[g["lr"].isin(tried[:k])], by="variant")[m])
        if len(tried) < 2 + sweep.MAX_EXTENSIONS:
            assert sweep.next_lr(tried, chosen[m]) is None
    control = runs[runs["stage"] == "control"]
    for v in ("lordo", RMS):   # each LoRDO variant on one worker at its lr and low-rank DDP's
        tried = control.loc[control["variant"] == v + sweep.ONE_WORKER_MARK, "lr"]
        assert sorted(tried) == sorted({chosen[v], chosen["lowrank_ddp"]})
    assert set(control["seed"]) == {0} and set(control["workers"]) == {1}
    chosen |= sweep.select_lr(control, by="variant")
    selected = runs[runs["selected"]]
    assert (selected["lr"] == selected["variant"].map(chosen)).all()
    assert selected.groupby("variant")["seed"].apply(sorted).to_dict() == {v: [0, 1] for v in chosen}
    longer = runs[runs["stage"] == "horizon"]    # the horizon variants again at their lrs, for horizon_steps
    assert longer["variant"].tolist() == [v for v in P["horizon_variants"] for _ in P["seeds"]]
    assert longer["seed"].tolist() == P["seeds"] * len(P["horizon_variants"]) and not longer["selected"].any()
    assert (longer["lr"] == longer["variant"].map(chosen)).all() and set(longer["steps"]) == {P["horizon_steps"]}
    assert set(tables["curves"].loc[tables["curves"]["stage"] == "horizon", "run"]) == set(longer["run"])
    assert len(runs) == len(grid_rows) + len(control) + 5 + len(longer)   # + seed 1 of each variant at its lr
    row = runs.iloc[0]
    run = Run.load(tmp / "runs" / row["run"])
    c = run.config
    skip = sweep.selection_windows(c)
    assert skip == c.eval_batches * c.batch_size * c.workers
    data = prepare(c.corpus, c.tokenizer, c.vocab_size)
    model = load_model(run.dir).eval()
    n = min(sweep.HELDOUT_FACTOR * skip, (len(data.val) - 1) // c.seq_len - skip)
    starts = (skip + np.arange(n)) * c.seq_len
    x = torch.from_numpy(np.stack([data.val[s:s + c.seq_len] for s in starts]).astype(np.int64))
    y = torch.from_numpy(np.stack([data.val[s + 1:s + c.seq_len + 1] for s in starts]).astype(np.int64))
    with torch.no_grad():
        logits, _ = model(x)
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), y.reshape(-1)).item()
    assert row["heldout_tokens"] == n * c.seq_len
    assert row["heldout_loss"] == pytest.approx(expected, rel=1e-5)


def test_the_cache_is_read_for_the_same_grid_and_recomputed_for_another(swept, monkeypatch):
    P, tables, tmp = swept
    monkeypatch.setenv("LORDO_RUNS_DIR", str(tmp / "runs"))
    monkeypatch.setattr(sweep, "compute", lambda P: pytest.fail("the cached tables were not read"))
    again = sweep.lr_sweep(P)
    pd.testing.assert_frame_equal(again["runs"], tables["runs"], check_dtype=False)
    calls = []
    monkeypatch.setattr(sweep, "compute", lambda P: calls.append(P) or tables)
    sweep.lr_sweep(params(tmp, lrs=[1e-3, 3e-3]))
    sweep.lr_sweep(P, recompute=True)
    assert len(calls) == 2


def test_cli_rejects_a_bad_parameter_in_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("preset: tiny\nlrs: [0]\nsweep_methods: [lordo]\nsweep_dir: x\nseeds: [0]\nsweep_seeds: [0]\n")
    out = subprocess.run([sys.executable, "-m", "lordo.sweep", "--preset", str(bad)], capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == ["lordo.sweep: parameter lrs=[0] is invalid: allowed a non-empty list "
                                               "of learning rates, each a number > 0"]
