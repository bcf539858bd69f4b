"""The local-update penalty study (lordo.penalty): its runs are `lordo train`'s, its tables cached by the grid's
hashes, its gaps paired by seed against each method's every-step reference, its command-line errors one line."""

import subprocess
import sys

import pandas as pd
import pytest

from lordo import penalty
from lordo.analysis import check_params
from lordo.cli import main as lordo_main

SETUP = {"preset": "nano", "workers": 2, "batch_size": 1, "seq_len": 32, "steps": 4, "sync_every": 2, "rank": 4,
         "eval_every": 2, "eval_batches": 1}
AVERAGED = "lordo, QH term at the update's RMS, AdamW moments averaged"


def params(tmp_path, **changes):
    return check_params(**{"launcher": "sim", "penalty_setup": SETUP, "penalty_seeds": [0, 1],
                           "penalty_variants": {"lowrank_ddp": [1e-2], "ddp": [3e-3], "local_adam": [3e-3],
                                                "lordo": [3e-3, 1e-2], AVERAGED: [1e-2]},
                           "sweep_dir": str(tmp_path / "sweeps")} | changes)


def test_a_variant_is_the_run_lordo_train_makes_with_the_setups_fields(tmp_path, monkeypatch):
    """The same config hash as the command a user types for it (so the study's runs are that command's)."""
    cfg = penalty.penalty_config(params(tmp_path), AVERAGED, 1e-2, 1)
    seen = {}

    def train(cfg, **_):
        seen["cfg"] = cfg
        raise SystemExit(0)     # stop before training: only the command's config is compared

    monkeypatch.setattr("lordo.launch.train", train)
    argv = ["train", "--method", "lordo", "--preset", "nano", "--workers", "2", "--batch-size", "1", "--seq-len", "32",
            "--steps", "4", "--sync-every", "2", "--rank", "4", "--eval-every", "2", "--eval-batches", "1",
            "--lr", "0.01", "--seed", "1", "--qh-scale", "update_rms", "--average-moments", "adamw", "--no-progress"]
    with pytest.raises(SystemExit):
        lordo_main(argv)
    assert seen["cfg"].hash() == cfg.hash()


def test_gaps_pair_each_local_variant_with_its_reference_by_seed():
    rows = [("lowrank_ddp", 0, 100.0), ("lowrank_ddp", 1, 110.0), ("ddp", 0, 200.0), ("ddp", 1, 200.0),
            ("lordo", 0, 150.0), ("lordo", 1, 154.0), ("local_adam", 0, 220.0), ("local_adam", 1, 240.0)]
    t = pd.DataFrame([{"variant": v, "seed": s, "heldout_ppl": x, "val_loss": x, "lr": 1e-2, "comm_bytes": 1}
                      for v, s, x in rows])
    g = penalty.gaps(t).set_index("variant")
    assert set(g.index) == {"lordo", "local_adam"}                    # every-step methods have no local penalty
    assert g.loc["lordo", "reference"] == "lowrank_ddp" and g.loc["local_adam", "reference"] == "ddp"
    assert g.loc["lordo", "gap_pct"] == pytest.approx((50 + 40) / 2)   # (150/100 - 1), (154/110 - 1) in %
    assert g.loc["local_adam", "gap_pct"] == pytest.approx(15) and g.loc["lordo", "seeds"] == 2


def test_best_runs_take_each_variants_lowest_mean_validation_loss():
    t = pd.DataFrame([{"variant": "a", "lr": lr, "seed": s, "val_loss": x}
                      for lr, xs in ((1e-3, [5.0, 5.2]), (1e-2, [4.0, 6.4])) for s, x in enumerate(xs)])
    assert set(penalty.best_runs(t)["lr"]) == {1e-3}


@pytest.mark.slow
def test_tables_train_the_grid_once_and_read_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORDO_RUNS_DIR", str(tmp_path / "runs"))
    P = params(tmp_path, penalty_seeds=[0], penalty_variants={"lowrank_ddp": [1e-2], AVERAGED: [1e-2]})
    tables = penalty.penalty_tables(P)
    runs, coherence = tables["runs"], tables["coherence"]
    assert list(runs["variant"]) == ["lowrank_ddp", AVERAGED] and runs["heldout_ppl"].notna().all()
    assert runs.set_index("variant").loc[AVERAGED, "comm_bytes"] > 0
    assert set(coherence["part"]) == {"low-rank", "low-rank, in span(Q)", "low-rank, outside span(Q)", "full-rank"}
    assert set(coherence["variant"]) == {AVERAGED} and coherence["coherence"].between(0, 1 + 1e-6).all()
    monkeypatch.setattr("lordo.penalty.train_all", lambda *a, **k: pytest.fail("trained again"))
    pd.testing.assert_frame_equal(penalty.penalty_tables(P)["runs"], runs, check_dtype=False)


def test_a_bad_preset_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("launcher: sim\npenalty_setup: {preset: nano}\npenalty_variants: {lordo, typo: [0.01]}\n"
                   "penalty_seeds: [0]\nsweep_dir: x\n")
    out = subprocess.run([sys.executable, "-m", "lordo.penalty", "--preset", str(bad)], capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().startswith("lordo.penalty: parameter penalty_variants=") and \
        len(out.stderr.strip().splitlines()) == 1
