"""The gap diagnosis (lordo.diagnosis): ladders and sweeps as configs, and verdicts as functions of small tables."""

import math

import pandas as pd
import pytest

from lordo import diagnosis
from lordo.analysis import check_params

P = check_params(preset="tiny", workers=4, steps=64, batch_size=4, seq_len=32, lr=3e-3, sync_every=8, proj_every=8,
                 rank=4, eval_every=16, eval_batches=2, seeds=[0, 1], sweep_seeds=[0], launcher="sim",
                 config_dir=None, results_dir="results/test", figures_dir="results/test/figures")


def test_lowrank_ladder_changes_one_thing_per_rung():
    (_, ddp), (_, one), (_, every), (_, lordo) = diagnosis.ladder(P, "lowrank", seed=3)
    assert ddp.method == "lowrank_ddp" and {one.method, every.method, lordo.method} == {"lordo"}
    assert (one.workers, one.batch_size) == (1, 16) and one.tokens_per_step == lordo.tokens_per_step
    assert every.replace(sync_every=8).hash() == lordo.hash() and every.sync_every == 1
    assert {c.seed for c in (ddp, one, every, lordo)} == {3}
    methods = [c.method for _, c in diagnosis.ladder(P, "fullrank", seed=0)]
    assert methods == ["ddp", "local_adam", "local_adam"]
    with pytest.raises(ValueError, match="kind='bogus'"):
        diagnosis.ladder(P, "bogus", seed=0)


def test_equal_tokens_keeps_tokens_and_validation_windows():
    o = diagnosis.equal_tokens(P, 16)
    assert o["batch_size"] * o["steps"] == P["batch_size"] * P["steps"]
    assert o["eval_batches"] * o["batch_size"] >= P["eval_batches"] * P["batch_size"] // 2
    with pytest.raises(ValueError, match="batch size 3"):
        diagnosis.equal_tokens(P, 3)


def test_ablation_switches_off_with_none():
    assert diagnosis.ablation(P, "no clipping", 0).clip is None
    assert diagnosis.ablation(P, "Q from gradient", 0).proj_source == "gradient"
    assert diagnosis.ablation(P, "no QH term", 0).omega == 1.0
    with pytest.raises(ValueError, match="ablations"):
        check_params(ablations=["no such change"])


def table(values: dict[str, list[float]]) -> pd.DataFrame:
    return pd.DataFrame([{"variant": v, "seed": s, "val_ppl": x} for v, xs in values.items() for s, x in enumerate(xs)])


def test_decomposition_pairs_by_seed_and_chains():
    t = table({"a": [100, 200], "b": [110, 220], "c": [121, 242]})
    d = diagnosis.decomposition(t, ["a", "b", "c"]).set_index("variant")
    assert d.loc["b", "step_pct"] == pytest.approx(10) and d.loc["c", "step_pct"] == pytest.approx(10)
    assert d.loc["c", "total_pct"] == pytest.approx(21) and d.loc["c", "step_lo"] == pytest.approx(10)
    assert list(d["seeds"]) == [2, 2]


def curves(gaps_by_seed: dict[int, list[float]], tokens=(0, 100, 200, 300, 400)) -> pd.DataFrame:
    rows = []
    for seed, gaps in gaps_by_seed.items():
        for t, g in zip(tokens, [0.0, *gaps]):
            rows.append({"method": "ref", "seed": seed, "tokens": t, "val_ppl": 100.0})
            rows.append({"method": "new", "seed": seed, "tokens": t, "val_ppl": 100.0 * (1 + g / 100)})
    return pd.DataFrame(rows)


def test_gap_curve_and_trend():
    gaps = diagnosis.gap_curve(curves({0: [5, 10, 15, 20], 1: [6, 11, 16, 21]}), {"method": "new"},
                               {"method": "ref"}, "pair")
    assert set(gaps["tokens"]) == {100, 200, 300, 400} and set(gaps["pair"]) == {"pair"}
    t = diagnosis.gap_trend(gaps)
    assert t["final"] == pytest.approx(20.5) and t["change"] == pytest.approx(10)
    assert (t["mid_tokens"], t["last_tokens"], t["seeds"]) == (200, 400, 2)
    assert diagnosis.trend_word(t) == "growing"
    assert diagnosis.claim4_verdict(t) == "not supported (gap growing)"


@pytest.mark.parametrize("final,change,word,verdict", [
    ([0.2, 0.4, 0.3], [0.1, -0.1, 0.0], "settled", "supported"),
    ([5.0, 5.2, 4.8], [0.1, -0.1, 0.0], "settled", "not supported (gap settled)"),
    ([5.0, 5.2, 4.8], [-8.0, -9.0, -8.5], "shrinking", "inconclusive (gap shrinking)"),
    ([0.5, 3.0, -2.0], [0.1, -0.1, 0.0], "settled", "inconclusive (gap settled)"),
    ([0.2, 0.4, 0.3], [5.0, -6.0, 2.0], "unsettled", "supported"),
])
def test_claim4_verdict_follows_the_final_gap_and_its_trend(final, change, word, verdict):
    t = {"final": sum(final) / 3, "change": sum(change) / 3, "seeds": 3}
    from lordo.analysis import ci95
    (t["final_lo"], t["final_hi"]), (t["change_lo"], t["change_hi"]) = ci95(final), ci95(change)
    assert diagnosis.trend_word(t) == word
    assert diagnosis.claim4_verdict(t) == verdict


def test_one_seed_is_never_a_verdict():
    gaps = diagnosis.gap_curve(curves({0: [1, 1, 1, 1]}), {"method": "new"}, {"method": "ref"}, "pair")
    t = diagnosis.gap_trend(gaps)
    assert t["seeds"] == 1 and not math.isnan(t["final"])
    assert diagnosis.claim4_verdict(t) == "inconclusive (one seed)"


def ranked_curves(ppl: dict[str, list[float]], tokens=(0, 100, 200, 300)) -> pd.DataFrame:
    return pd.DataFrame([{"variant": v, "seed": 0, "tokens": t, "val_ppl": x}
                         for v, xs in ppl.items() for t, x in zip(tokens, [900.0, *xs])])


def test_ranking_finds_when_the_order_stopped_changing():
    r = diagnosis.ranking(ranked_curves({"a": [300, 200, 150], "b": [250, 210, 160], "c": [400, 300, 250]}))
    assert list(r["order"]) == ["b < a < c", "a < b < c", "a < b < c"]   # step 0 (all equal) is left out
    assert list(r["final"]) == [False, True, True] and diagnosis.settled_since(r) == 200
    flips_last = diagnosis.ranking(ranked_curves({"a": [300, 200, 170], "b": [250, 210, 160]}))
    assert diagnosis.settled_since(flips_last) == 300


def test_heldout_final_replaces_the_trends_final_gap():
    trend = {"final": 5.0, "final_lo": 4.0, "final_hi": 6.0, "change": 0.1, "change_lo": -0.5, "change_hi": 0.6,
             "seeds": 3, "mid_tokens": 100, "last_tokens": 200}
    held = diagnosis.with_heldout_final(trend, {"mean": 0.4, "lo": 0.1, "hi": 0.7, "n": 3})
    assert (held["final"], held["final_lo"], held["final_hi"], held["change"]) == (0.4, 0.1, 0.7, 0.1)
    assert diagnosis.claim4_verdict(held) == "supported" and diagnosis.claim4_verdict(trend).startswith("not")
