"""The wall-clock model (lordo.wallclock) on hand-computed cases, and its inputs against real runs."""

import math

import pytest

import lordo
from lordo.wallclock import Workload, allreduce_seconds, break_even_gbps, payload_bytes, train_seconds, workload

DDP = Workload("ddp", compute_s_per_step=0.1, tokens_per_step=1000, sync_bytes=10**6, steps_per_sync=1,
               once_bytes=(10**6,))
LORDO = Workload("lordo", compute_s_per_step=0.12, tokens_per_step=1000, sync_bytes=10**6, steps_per_sync=4,
                 once_bytes=(10**6, 5 * 10**5))


def test_ring_allreduce():
    # 2(M-1)/M = 1.5 of 1 GB at 10 Gb/s = 1.25 GB/s: 1.2 s, plus 2(M-1) = 6 latencies of 10 us
    assert allreduce_seconds(1e9, 4, 10, 1e-5) == pytest.approx(1.2 + 6e-5)
    assert allreduce_seconds(1e9, 1, 10, 1e-5) == 0       # one worker sends nothing
    assert allreduce_seconds(1e9, 2, 8, 0) == pytest.approx(1.0)   # 1 GB/s, factor 1


def test_train_seconds_counts_steps_syncs_and_one_offs():
    # 10 steps; 2 workers at 8 Gb/s = 1e9 B/s and factor 1: 1 MB costs 1 ms (+ 2 latencies)
    assert train_seconds(DDP, 10_000, 2, 8, 0) == pytest.approx(10 * 0.1 + 10 * 1e-3 + 1e-3)
    assert train_seconds(LORDO, 10_000, 2, 8, 0) == pytest.approx(10 * 0.12 + 3 * 1e-3 + 1.5e-3)   # ceil(10/4)
    assert train_seconds(LORDO, 10_000, 2, 8, 1e-3) == pytest.approx(1.2045 + (3 + 2) * 2e-3)
    assert train_seconds(DDP, 9_500, 1, 8, 1.0) == pytest.approx(1.0)     # 10 steps, nothing sent
    assert payload_bytes(DDP, 10_000) == 11 * 10**6 and payload_bytes(LORDO, 10_000) == 4_500_000
    twice = Workload("lordo", 0.12, 1000, 10**6, 4, once_bytes=(), extra_sync_bytes=(10**6,))  # 2 collectives a sync
    assert train_seconds(twice, 10_000, 2, 8, 1e-3) == pytest.approx(1.2 + 3 * 2 * (1e-3 + 2e-3))
    assert payload_bytes(twice, 10_000) == 6 * 10**6


def test_break_even_bandwidth():
    # T_lordo = 1.2 + 0.036 / g, T_ddp = 1.0 + 0.088 / g (g in Gb/s): equal at g = 0.052 / 0.2 = 0.26
    g = break_even_gbps(LORDO, DDP, 10_000, 2, 0)
    assert g == pytest.approx(0.26)
    assert train_seconds(LORDO, 10_000, 2, g, 0) == pytest.approx(train_seconds(DDP, 10_000, 2, g, 0))
    assert train_seconds(LORDO, 10_000, 2, g / 2, 0) < train_seconds(DDP, 10_000, 2, g / 2, 0)
    faster = Workload("lordo", 0.1, 1000, 10**6, 4)                  # never slower: no crossing
    assert break_even_gbps(faster, DDP, 10_000, 2, 0) is None
    assert break_even_gbps(LORDO, DDP, 10_000, 1, 0) is None          # one worker: no communication


NANO = dict(preset="nano", workers=2, steps=8, batch_size=2, seq_len=32, rank=4, sync_every=3, lr=3e-3,
            warmup=2, eval_every=4, eval_batches=2, log_every=2, progress=False)


@pytest.mark.parametrize("method", ["ddp", "lordo"])
def test_inputs_match_a_measured_run(method, tmp_path):
    """Bytes: the model's payload over the run is the run's measured comm_bytes. Compute: the run's
    time per step without its collectives, which with infinite bandwidth is the whole prediction."""
    run = lordo.train(method=method, runs_dir=str(tmp_path), **NANO)
    s = run.summary
    w = workload(s, sync_every=NANO["sync_every"])
    assert payload_bytes(w, s["tokens"]) == s["comm_bytes"]
    assert 0 < s["comm_seconds"] < s["wall_s"]
    assert 0 < w.compute_s_per_step < s["wall_s"] / s["steps"]
    assert train_seconds(w, s["tokens"], 2, math.inf, 0) == pytest.approx(s["wall_s"] - s["comm_seconds"])


def test_time_saved_and_its_verdict_on_a_small_table():
    import pandas as pd

    from lordo import analysis

    times = pd.DataFrame([  # two seeds of lowrank_ddp, one of lordo; 1 and 100 Gb/s
        {"preset": "tiny", "method": m, "seed": s, "gbps": g, "seconds": t} for m, s, g, t in [
            ("lowrank_ddp", 0, 1, 10.0), ("lowrank_ddp", 1, 1, 12.0), ("lowrank_ddp", 0, 100, 2.0),
            ("lowrank_ddp", 1, 100, 2.0), ("lordo", 0, 1, 5.5), ("lordo", 0, 100, 2.2)]])
    saved = analysis.time_saved(times)
    assert saved["gbps"].tolist() == [1, 100]
    assert saved["saved"].tolist() == pytest.approx([0.5, -0.1])          # 1 - 5.5/11, 1 - 2.2/2
    assert analysis.time_saved_verdict(saved, reduction=9.0, claimed=10).startswith(
        "supported (50% of the time saved at 1 Gb/s, -10% at 100 Gb/s")
    assert analysis.time_saved_verdict(saved, reduction=5.0, claimed=10).startswith("not supported (bytes fall 5.0x")
    slower = saved.assign(saved=[-0.2, -0.3])
    assert analysis.time_saved_verdict(slower, 9.0, 10) == "not supported (no time saved even at 1 Gb/s)"


def test_memory_options_table_meets_the_targets_at_125m():
    from lordo import analysis

    df = analysis.memory_options(["125m"], 0.125).set_index("option")
    both = df.loc["bf16 state + host anchor"]
    assert both["state_device"] <= 0.5 * both["adamw_total"] and both["state_total"] <= both["adamw_total"]
    default = df.loc["float32 (default)"]
    assert default["state_host"] == 0 and default["state_total"] > default["adamw_total"]
    assert df.loc["host anchor", "state_host"] == default["state_anchor"] == 4 * df.loc["host anchor", "params"]
