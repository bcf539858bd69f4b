"""The fast optimizer (`lordo.optim`) against the plain reference (`lordo.reference`), in float64.

A small two-layer network with per-worker, per-step data, so gradients depend on the parameters and
differ between workers. Its parameters cover both orientations of a low-rank matrix (p < q and p > q),
a 2-D parameter kept out of the low-rank path (`lowrank: False`, like an embedding) and a 1-D bias.
7 steps with sync_every 3 give two synchronizations and a tail of local steps after the last one.
"""

import pytest
import torch

import lordo.optim
from lordo.comm import run_simulated
from lordo.optim import make_optimizer
from lordo.reference import reference_train
from lordo.trainer import cpu_threads

DTYPE = torch.float64
STEPS = 7
MATRICES = ("w_in", "w_out")  # 6 x 4 (p > q, handled transposed) and 4 x 7 (p < q)
BASE = dict(lr=0.02, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0, rank=2, sync_every=3, clip=None,
            error_feedback=True, moments_on_refresh="keep", proj_every=2, outer_lr=1.0, outer_momentum=0.0)


def init_params() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = {"emb": (6, 6), "w_in": (6, 4), "w_out": (4, 7), "bias": (7,)}
    return {n: 0.5 * torch.randn(s, generator=g, dtype=DTYPE) for n, s in shapes.items()}


def loss(params, worker, step):
    g = torch.Generator().manual_seed(1000 * worker + step)
    x = torch.randn(8, 6, generator=g, dtype=DTYPE)
    y = torch.randn(8, 7, generator=g, dtype=DTYPE)
    h = torch.tanh(x @ params["emb"] @ params["w_in"])
    return ((h @ params["w_out"] + params["bias"] - y) ** 2).mean()


def grad_fn(worker, step, params):
    leaves = {n: t.detach().requires_grad_() for n, t in params.items()}
    grads = torch.autograd.grad(loss(leaves, worker, step), list(leaves.values()))
    return dict(zip(leaves, grads))


def fast_train(method, workers, steps, hp, comm_dtype="float64"):
    def worker(comm):
        params = {n: t.clone().requires_grad_() for n, t in init_params().items()}
        groups = [{"params": [params["w_in"], params["w_out"], params["bias"]], "lowrank": True},
                  {"params": [params["emb"]], "lowrank": False}]
        opt = make_optimizer(method, groups, comm=comm if workers > 1 else None, proj_method="svd",
                             comm_dtype=comm_dtype, **hp)
        for step in range(steps):
            loss(params, comm.rank, step).backward()
            opt.step()
            opt.zero_grad()
        return {n: p.detach().clone() for n, p in params.items()}

    return run_simulated(worker, workers)


CASES = {
    "ddp": [{}, {"weight_decay": 0.1, "clip": 0.05}],
    "lowrank_ddp": [{}, {"error_feedback": False, "weight_decay": 0.1, "clip": 0.05},
                    {"moments_on_refresh": "reset"}, {"moments_on_refresh": "rotate", "rank": 0.5}],
    "local_adam": [{}, {"weight_decay": 0.1, "clip": 0.05}, {"outer_lr": 0.7, "outer_momentum": 0.9}],
    "lordo_local": [{}, {"moments_on_refresh": "reset", "clip": 0.05}, {"moments_on_refresh": "rotate"},
                    {"error_feedback": False, "weight_decay": 0.1}, {"proj_source": "gradient"}],
    # With omega = 1 and no weight decay every update stays in span(Q), so error feedback changes nothing
    # (subspace stagnation): it is switched off only beside weight decay.
    "lordo_global": [{}, {"moments_on_refresh": "reset"}, {"moments_on_refresh": "rotate", "clip": 0.05},
                     {"error_feedback": False, "weight_decay": 0.1},
                     {"outer_lr": 0.7, "outer_momentum": 0.9}, {"proj_source": "gradient", "clip": 0.05}],
    "lordo": [{}, {"omega": 1.0}, {"moments_on_refresh": "rotate", "weight_decay": 0.1, "clip": 0.05},
              {"moments_on_refresh": "reset", "error_feedback": False},
              {"omega": 0.5, "outer_lr": 0.7, "outer_momentum": 0.9}, {"proj_source": "gradient"}],
}


def case_id(method, workers, case):
    return "-".join([method, f"M{workers}"] + [f"{k}={v}" for k, v in case.items()])


PARAMS = [pytest.param(method, workers, case, id=case_id(method, workers, case))
          for method, cases in CASES.items() for case in cases for workers in (1, 2)]


@pytest.mark.parametrize("method,workers,case", PARAMS)
def test_fast_matches_reference(method, workers, case):
    check_against_reference(method, workers, case)


@pytest.mark.parametrize("method,case,fast_only", [
    ("lordo", {"weight_decay": 0.1, "clip": 0.05}, {}),
    ("lordo", {"clip": 0.05}, {"nonfinite": "off"}),     # the clip by a tensor factor, without a host sync
    ("lowrank_ddp", {"weight_decay": 0.1, "moments_on_refresh": "rotate"}, {}),
    ("lordo_global", {"error_feedback": False, "weight_decay": 0.1}, {})])
def test_row_blocks_match_reference(method, case, fast_only, monkeypatch):
    """On a CPU with one thread the step's full-size passes go by blocks of rows (`CPU_BLOCK` entries); blocks
    of one or two rows here (the matrices above are whole blocks at the default) do the same math."""
    monkeypatch.setattr(lordo.optim, "CPU_BLOCK", 8)
    with cpu_threads(1):
        assert lordo.optim._block_rows(torch.zeros(4, 7)) == 1
        check_against_reference(method, 2, case, fast_only)


def check_against_reference(method, workers, case, fast_only=None):
    hp = {**BASE, **case}
    expected = reference_train(method, init_params(), grad_fn, workers, STEPS, matrices=MATRICES, **hp)
    got = fast_train(method, workers, STEPS, hp | (fast_only or {}))
    moved = max((expected[0][n] - p).abs().max().item() for n, p in init_params().items())
    assert moved > 1e-2  # the run really trains
    for m in range(workers):
        for name in expected[m]:
            torch.testing.assert_close(got[m][name], expected[m][name], rtol=1e-9, atol=1e-12,
                                       msg=lambda s, m=m, name=name: f"worker {m}, {name}: {s}")


def test_clip_bites():
    """The clip threshold used above is well below the gradient norms it meets."""
    grads = [grad_fn(m, step, init_params()) for m in range(2) for step in range(STEPS)]
    norms = [torch.sqrt(sum((g * g).sum() for g in grad.values())).item() for grad in grads]
    assert min(norms) > 4 * 0.05


def test_float32_communication_stays_close():
    """The default comm_dtype (float32) rounds only the averages: float64 runs still agree closely."""
    expected = reference_train("lordo", init_params(), grad_fn, 2, STEPS, matrices=MATRICES, **BASE)
    got = fast_train("lordo", 2, STEPS, BASE, comm_dtype="float32")
    for m in range(2):
        for name in expected[m]:
            torch.testing.assert_close(got[m][name], expected[m][name], rtol=1e-5, atol=1e-7)
