"""The claims' verdicts (notebooks 00-04) on small tables: each threshold on both sides, and the run groups."""

import pandas as pd
import pytest

from lordo import analysis
from lordo.config import make_config


@pytest.mark.parametrize("reduction,verdict", [(8.0, "supported"), (7.99, "not supported"), (14.0, "supported")])
def test_comm_reduction_needs_most_of_the_papers_factor(reduction, verdict):
    assert analysis.COMM_REDUCTION_SHARE == 0.8
    assert analysis.comm_reduction_verdict(reduction, claimed=10.0) == verdict


def noise_table(local: list[float], global_: list[float], source: str = "gradient") -> pd.DataFrame:
    rows = []
    for b, lo, gl in zip((1, 2, 4), local, global_):
        for repeat in range(2):   # two matrices' worth of rows per point: the mean is what counts
            rows += [{"source": source, "estimate": "local", "batch_size": b, "repeat": repeat, "distance": lo},
                     {"source": source, "estimate": "global", "batch_size": b, "repeat": repeat, "distance": gl}]
    return pd.DataFrame(rows)


def test_local_noisier_at_every_batch_size():
    assert analysis.local_noisier(noise_table([0.9, 0.7, 0.5], [0.6, 0.5, 0.4]), "gradient")
    assert not analysis.local_noisier(noise_table([0.9, 0.7, 0.3], [0.6, 0.5, 0.4]), "gradient")
    both = pd.concat([noise_table([0.9, 0.7, 0.5], [0.6, 0.5, 0.4]),
                      noise_table([0.1, 0.1, 0.1], [0.6, 0.5, 0.4], source="pseudo-gradient")])
    assert analysis.local_noisier(both, "gradient") and not analysis.local_noisier(both, "pseudo-gradient")


def fits(*intervals: tuple[float, float]) -> pd.DataFrame:
    return pd.DataFrame([{"slope": (lo + hi) / 2, "lo": lo, "hi": hi} for lo, hi in intervals])


@pytest.mark.parametrize("intervals,local_worse,verdict", [
    ([(-0.6, -0.4), (-0.3, -0.1)], True, "supported"),                        # one measure consistent with -0.5
    ([(-0.3, -0.1), (-0.2, -0.05)], True, "partly: noise falls with B, more slowly than 1/sqrt(B)"),
    ([(-0.6, -0.4), (-0.3, -0.1)], False, "inconclusive"),
    ([(-0.6, 0.1), (-0.3, -0.1)], True, "inconclusive"),                      # not every measure falls
    ([(0.05, 0.2), (-0.3, -0.1)], True, "not supported"),                     # one rises
])
def test_noise_verdict(intervals, local_worse, verdict):
    assert analysis.noise_verdict(fits(*intervals), local_worse) == verdict


@pytest.mark.parametrize("similarity,explored,verdict", [
    (0.9999, 8.0, "supported"), (0.99, 8.0, "not supported"), (0.9999, 8.4, "supported"),
    (0.9999, 8.41, "not supported")])
def test_stagnation_verdict(similarity, explored, verdict):
    assert analysis.stagnation_verdict(similarity, explored, rank=8) == verdict


@pytest.mark.parametrize("explored,similarity,verdict", [
    (12.1, 0.8, "supported"), (12.0, 0.8, "not supported"), (30.0, 0.9999, "not supported")])
def test_exploration_verdict(explored, similarity, verdict):
    assert analysis.exploration_verdict(explored, 8, similarity, similarity_without=0.9999) == verdict


def test_moments_verdict():
    clear = {"reset": {"lo": 0.5, "n": 3}, "rotate": {"lo": 0.1, "n": 3}}
    assert analysis.moments_verdict("keep", clear) == "keep best, ahead of every other option beyond the 95% interval"
    for unclear in ({"reset": {"lo": -0.5, "n": 3}, "rotate": {"lo": 0.1, "n": 3}},
                    {"reset": {"lo": 0.5, "n": 1}}):                       # one seed: no interval
        assert analysis.moments_verdict("keep", unclear) == "keep best, not separated from every option at 95%"


@pytest.mark.parametrize("ratio,verdict", [(0.4099, "supported"), (0.42, "not supported"), (0.391, "supported")])
def test_state_verdict(ratio, verdict):
    assert analysis.state_verdict(ratio, predicted=0.40) == verdict


def test_time_saved_verdict_shares_the_reduction_threshold():
    saved = pd.DataFrame({"gbps": [1.0, 100.0], "saved": [0.5, 0.01]})
    assert analysis.time_saved_verdict(saved, 7.9, 10.0).startswith("not supported (bytes fall 7.9x")
    assert analysis.time_saved_verdict(saved, 8.0, 10.0).startswith("supported (50% of the time saved at 1 Gb/s")


def test_train_groups_returns_runs_by_group(tmp_path, shakespeare):
    base = dict(method="ddp", preset="nano", workers=1, steps=2, batch_size=1, seq_len=16, eval_batches=1,
                progress=False, runs_dir=str(tmp_path))
    groups = {"a": [make_config(base, seed=s) for s in (1, 2)], "empty": [], "b": [make_config(base, seed=3)]}
    runs = analysis.train_groups(groups, desc="x")
    seeds = {name: [r.config.seed for r in group] for name, group in runs.items()}
    assert seeds == {"a": [1, 2], "empty": [], "b": [3]}
    assert all(r.config == cfg for name in groups for r, cfg in zip(runs[name], groups[name]))


@pytest.mark.parametrize("measured, headline", [
    ("tiny, M = 4: LoRDO's perplexity gap to low-rank DDP +25.32% [95% CI +23.87, +26.76] (3 seeds) (negative: "
     "LoRDO better)", "tiny, M = 4: LoRDO's perplexity gap to low-rank DDP +25.32% [+23.87, +26.76]"),
    ("nano: moments take 0.135 MB vs AdamW's 0.852 MB (0.16x; r(p+2q)/(2pq) predicts 0.16x); with error feedback 1.4x",
     "nano: moments take 0.135 MB vs AdamW's 0.852 MB"),
    ("tiny: gap +46.0% [+42.1, +49.9] at 524,288 tokens (growing, 3 seeds). Decomposition: +7.0%",
     "tiny: gap +46.0% [+42.1, +49.9] at 524,288 tokens"),
])
def test_claims_headline_keeps_the_number_and_its_interval(measured, headline):
    assert analysis.claims.headline(measured) == headline


def test_short_claims_table_numbers_rows_and_keeps_every_word_in_the_details():
    ref = analysis.paper_reference()["claims"]["4"]
    row = {"notebook": "00_quickstart", "claim": f"4. {ref['claim']}", "paper": f"paper: {ref['paper']}",
           "source": ref["source"], "this run": "tiny: gap +25.3% [95% CI +23.9, +26.8] (3 seeds); 14x fewer bytes",
           "verdict": "not supported"}
    table, details = analysis.claims.short_claims(pd.DataFrame([row, row]))
    lines = table.splitlines()
    assert [c.strip() for c in lines[0].strip("|").split("|")] == ["#", "claim", "paper", "this run", "verdict"]
    assert len(lines) == 4 and "| [2](#claim-2) |" in lines[3].replace("  ", " ")
    assert f"| {ref['short']} |" in lines[2] and "tiny: gap +25.3% [+23.9, +26.8] |" in lines[2]
    assert len(details) == 2 and details[1].startswith('2. <a id="claim-2"></a>**4. ')
    assert all(text in details[0] for text in (ref["paper"], ref["source"], row["this run"], "(00_quickstart)"))
