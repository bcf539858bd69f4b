"""The projection-noise experiment (notebook 01): how far a small batch's rank-r projection is from a reference's."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch

from lordo.analysis.tables import cached_tables, layer_type
from lordo.analysis.training import resolved_rank, run_config
from lordo.comm import cpu_threads
from lordo.model import GPT, model_config
from lordo.optim import make_optimizer
from lordo.projection import compute_projection, is_transposed, oriented, projection_distance
from lordo.runs import Run


def load_run_model(run: Run, vocab_size: int, device: torch.device) -> GPT:
    c = run.config
    model = GPT(model_config(c.preset, vocab_size=vocab_size, max_seq_len=c.seq_len), device=device)
    model.load_state_dict(torch.load(run.dir / "model.pt", map_location=device, weights_only=True))
    return model


def _matrices(model: GPT) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if n.startswith("layers.") and p.ndim == 2}


def _sample(tokens: np.ndarray, n: int, seq_len: int, rng: np.random.Generator, device) -> tuple:
    starts = rng.integers(0, len(tokens) - seq_len - 1, n)
    rows = torch.from_numpy(np.asarray(tokens[starts[:, None] + np.arange(seq_len + 1)], dtype=np.int64)).to(device)
    return rows[:, :-1], rows[:, 1:]


def _gradient(model: GPT, tokens, n: int, seq_len: int, rng, device, chunk: int = 32) -> dict[str, torch.Tensor]:
    """Mean-loss gradient of every matrix on n fresh sequences (in chunks of `chunk`)."""
    model.zero_grad(set_to_none=True)
    for start in range(0, n, chunk):
        x, y = _sample(tokens, min(chunk, n - start), seq_len, rng, device)
        (model(x, y)[1] * len(x) / n).backward()
    return {k: oriented(p.grad.detach().clone(), is_transposed(p.shape)) for k, p in _matrices(model).items()}


def _pseudo_gradient(model: GPT, start: dict[str, torch.Tensor], tokens, batch: int, local_steps: int, lr: float,
                     seq_len: int, rng, device) -> dict[str, torch.Tensor]:
    """One worker's parameter change after local_steps AdamW steps (fresh state) on batches of `batch`."""
    model.load_state_dict(start)
    opt = make_optimizer("ddp", model, lr=lr)
    for _ in range(local_steps):
        x, y = _sample(tokens, batch, seq_len, rng, device)
        model(x, y)[1].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {k: oriented(p.detach() - start[k], is_transposed(p.shape)) for k, p in _matrices(model).items()}


def _projections(matrices: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """Exact rank-r projection of each matrix, batched over same-shape matrices."""
    by_shape: dict[tuple, list[str]] = {}
    for name, X in matrices.items():
        by_shape.setdefault(tuple(X.shape), []).append(name)
    out = {}
    for names in by_shape.values():
        out.update(zip(names, compute_projection(torch.stack([matrices[n] for n in names]).float(), rank, "svd")))
    return out


def _missed_energy(Q: torch.Tensor, X: torch.Tensor, Q_best: torch.Tensor) -> float:
    """Fraction of the energy the best rank-r subspace captures of X that span(Q) misses."""
    best = (Q_best.mT @ X).square().sum()
    return (1 - (Q.mT @ X).square().sum() / best).clamp_min(0).item()


def projection_noise(run: Run, P: dict[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """How far the rank-r projection from a small-batch estimate is from the one from a reference, per matrix.

    gradient: the gradient on B sequences (local: one worker) or M*B (global: M workers' average) against
    the gradient on ref_batch_size sequences. pseudo-gradient: one worker's parameter change after
    local_steps AdamW steps on batches of B (local), or the average of M workers' changes (global), against
    the average of reference_workers other workers' changes.

    Returns (noise, spectrum). noise rows: source, estimate, batch_size, samples, repeat, param, layer,
    distance = ||Q Q^T - Q_ref Q_ref^T||_F / sqrt(2r), and weighted_distance = sqrt(the fraction of the
    reference's best rank-r energy that span(Q) misses), which discounts directions the reference itself
    hardly prefers. spectrum: each reference's singular values over its largest (sigma_i / sigma_1), per
    matrix (the pseudo-gradient reference at the largest B). Cached in runs/analysis/ by run and settings.
    """
    from tqdm import tqdm

    from lordo.data import prepare

    c, M = run.config, P["workers"] or run.config.workers
    rank = resolved_rank(run_config(P, "lordo", preset=c.preset))   # P's rank on the run's model
    settings = {k: P[k] for k in ("batch_sizes", "ref_batch_size", "repeats", "local_steps", "reference_workers")}
    settings["lr"] = P["lr"] or c.lr
    key = {"run": c.hash(), "workers": M, "rank": rank, **settings}

    def spectrum(source: str, reference: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
        return [{"source": source, "param": name, "layer": layer_type(name), "index": i + 1, "sigma": s}
                for name, X in reference.items()
                for i, s in enumerate((lambda v: v / v[0])(torch.linalg.svdvals(X.float())).tolist())]

    def compute() -> dict[str, pd.DataFrame]:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        data = prepare(c.corpus, c.tokenizer, c.vocab_size, max_tokens=c.corpus_tokens)
        model = load_run_model(run, data.vocab_size, device)
        start = {k: v.detach().clone() for k, v in model.state_dict().items()}
        rng = np.random.default_rng(0)
        grad = lambda n: _gradient(model, data.train, n, c.seq_len, rng, device)
        pseudo = lambda b: _pseudo_gradient(model, start, data.train, b, P["local_steps"], settings["lr"], c.seq_len,
                                            rng, device)
        mean = lambda ds: {k: torch.stack([d[k] for d in ds]).mean(0) for k in ds[0]}
        rows, spectra = [], []
        bar = tqdm(total=2 * len(P["batch_sizes"]), desc="projection noise", unit="batch size")
        gradient_reference = grad(P["ref_batch_size"])
        spectra += spectrum("gradient", gradient_reference)
        for source, estimate_fn in (("gradient", grad), ("pseudo-gradient", pseudo)):
            for B in P["batch_sizes"]:
                reference = gradient_reference if source == "gradient" else \
                    mean([pseudo(B) for _ in range(P["reference_workers"])])
                if source == "pseudo-gradient" and B == max(P["batch_sizes"]):
                    spectra += spectrum(source, reference)
                Q_ref = _projections(reference, rank)
                for rep in range(P["repeats"]):
                    workers = [estimate_fn(B) for _ in range(M)]
                    for estimate, X in (("local", workers[0]), ("global", mean(workers))):
                        for name, Q in _projections(X, rank).items():
                            rows.append({
                                "source": source, "estimate": estimate, "batch_size": B,
                                "samples": B if estimate == "local" else M * B, "repeat": rep, "param": name,
                                "layer": layer_type(name), "distance": projection_distance(Q, Q_ref[name]).item(),
                                "weighted_distance": _missed_energy(Q, reference[name], Q_ref[name]) ** 0.5})
                bar.update()
        bar.close()
        model.load_state_dict(start)
        return {"noise": pd.DataFrame(rows), "spectrum": pd.DataFrame(spectra)}

    with cpu_threads(1):   # small models' matmuls and SVDs: several times faster unthreaded on few cores
        tables = cached_tables("projection_noise", key, compute)
    return tables["noise"].assign(rank=rank, workers=M, preset=c.preset), tables["spectrum"].assign(rank=rank)
