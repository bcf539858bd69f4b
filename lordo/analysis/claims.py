"""The paper's claims beside this run's measurements: named thresholds, verdicts, the claims table."""

from __future__ import annotations

import json
import re
from typing import Any

import pandas as pd

from lordo.analysis.tables import save_table
from lordo.files import write_atomic
from lordo.paths import REPO, repo_path


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


def headline(measured: str) -> str:
    """The number a claims row rests on, for the short table: the 'this run' text without its asides in
    parentheses, to its first ';', intervals as [lo, hi]. The whole text stays in the details."""
    bare = re.sub(r"\s*\((?:[^()]|\([^()]*\))*\)", "", measured)    # (asides), one level of nesting inside
    return bare.split("; ")[0].split(". ")[0].replace("95% CI ", "").strip()


def short_claims(claims: pd.DataFrame) -> tuple[str, list[str]]:
    """README form of the claims rows (columns notebook, claim, paper, source, this run, verdict): a table of
    claim, the paper's figure, this run's headline and the verdict, numbered; then each row in full."""
    reference = paper_reference()["claims"]
    rows, details = [], []
    for i, r in enumerate(claims.to_dict("records"), 1):
        rows.append({"#": f"[{i}](#claim-{i})", "claim": r["claim"],
                     "paper": reference[r["claim"].split(". ")[0]]["short"], "this run": headline(r["this run"]),
                     "verdict": r["verdict"]})
        details.append(f"{i}. <a id=\"claim-{i}\"></a>**{r['claim']}** ({r['notebook']}). Paper: "
                       f"{r['paper'].removeprefix('paper: ')} [{r['source']}]. This run: {r['this run']}. "
                       f"Verdict: {r['verdict']}.")
    return pd.DataFrame(rows).to_markdown(index=False), details


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
