"""The fast optimizer (`lordo.optim`) against the plain reference (`lordo.reference`), in float64.

A small two-layer network with per-worker, per-step data, so gradients depend on the parameters and
differ between workers. Its parameters cover both orientations of a low-rank matrix (p < q and p > q),
a 2-D parameter kept out of the low-rank path (`lowrank: False`, like an embedding) and a 1-D bias.
7 steps with sync_every 3 give two synchronizations and a tail of local steps after the last one.
"""

import pytest
import torch

import lordo.optim.lowrank
from lordo.comm import cpu_threads
from lordo.reference import reference_train

CASES = {
    "ddp": [{}, {"weight_decay": 0.1, "clip": 0.05}],
    "lowrank_ddp": [{}, {"error_feedback": False, "weight_decay": 0.1, "clip": 0.05}, {"fullrank_lr_scale": 0.3},
                    {"moments_on_refresh": "reset"}, {"moments_on_refresh": "rotate", "rank": 0.5}],
    "local_adam": [{}, {"weight_decay": 0.1, "clip": 0.05}, {"outer_lr": 0.7, "outer_momentum": 0.9},
                   {"average_moments": "adamw"}],
    "lordo_local": [{}, {"moments_on_refresh": "reset", "clip": 0.05}, {"moments_on_refresh": "rotate"},
                    {"error_feedback": False, "weight_decay": 0.1}, {"proj_source": "gradient"},
                    {"average_moments": "adamw", "ef_on_sync": "reproject"}, {"ef_on_sync": "reset"}],
    # With omega = 1 and no weight decay every update stays in span(Q), so error feedback changes nothing
    # (subspace stagnation): it is switched off only beside weight decay.
    "lordo_global": [{}, {"moments_on_refresh": "reset"}, {"moments_on_refresh": "rotate", "clip": 0.05},
                     {"error_feedback": False, "weight_decay": 0.1},
                     {"outer_lr": 0.7, "outer_momentum": 0.9}, {"proj_source": "gradient", "clip": 0.05},
                     {"average_moments": "all", "ef_on_sync": "average", "weight_decay": 0.1}],
    "lordo": [{}, {"omega": 1.0}, {"moments_on_refresh": "rotate", "weight_decay": 0.1, "clip": 0.05},
              {"moments_on_refresh": "reset", "error_feedback": False},
              {"omega": 0.5, "outer_lr": 0.7, "outer_momentum": 0.9}, {"proj_source": "gradient"},
              {"qh_scale": "update_rms"}, {"qh_scale": "update_rms", "omega": 0.5, "clip": 0.05, "weight_decay": 0.1},
              {"qh_scale": "update_rms", "clip": None},
              # the paper's scaling factor mu; optimizer states at synchronizations (issue 28)
              {"mu": 4.0}, {"qh_scale": "update_rms", "mu": 0.5, "clip": 0.05},
              {"average_moments": "all"}, {"average_moments": "lowrank", "average_moments_every": 2},
              {"average_moments": "adamw", "ef_on_sync": "average", "moments_on_refresh": "rotate"},
              {"ef_on_sync": "reset"}, {"ef_on_sync": "reproject", "moments_on_refresh": "rotate"},
              {"fullrank_lr_scale": 0.3, "weight_decay": 0.1}],
}


def case_id(method, workers, case):
    return "-".join([method, f"M{workers}"] + [f"{k}={v}" for k, v in case.items()])


PARAMS = [pytest.param(method, workers, case, id=case_id(method, workers, case))
          for method, cases in CASES.items() for case in cases for workers in (1, 2)]


@pytest.mark.parametrize("method,workers,case", PARAMS)
def test_fast_matches_reference(toy, method, workers, case):
    check_against_reference(toy, method, workers, case)


@pytest.mark.parametrize("method,case,fast_only", [
    ("lordo", {"weight_decay": 0.1, "clip": 0.05}, {}),
    ("lordo", {"clip": 0.05}, {"nonfinite": "off"}),     # the clip by a tensor factor, without a host sync
    ("lordo", {"clip": 0.05, "qh_scale": "update_rms"}, {"nonfinite": "off"}),   # ||G^||: the clip's norms, factor
    ("lowrank_ddp", {"weight_decay": 0.1, "moments_on_refresh": "rotate"}, {}),
    ("lordo_global", {"error_feedback": False, "weight_decay": 0.1}, {})])
def test_row_blocks_match_reference(toy, method, case, fast_only, monkeypatch):
    """On a CPU with one thread the step's full-size passes go by blocks of rows (`CPU_BLOCK` entries); blocks
    of one or two rows here (the matrices above are whole blocks at the default) do the same math."""
    monkeypatch.setattr(lordo.optim.lowrank, "CPU_BLOCK", 8)
    with cpu_threads(1):
        assert lordo.optim.lowrank.block_rows(torch.zeros(4, 7)) == 1
        check_against_reference(toy, method, 2, case, fast_only)


MATRICES_ONLY = [("lowrank_ddp", {}), ("lowrank_ddp", {"clip": 0.05}), ("lordo_local", {}), ("lordo_global", {}),
                 ("lordo", {}), ("lordo", {"clip": 0.05}), ("lordo", {"qh_scale": "update_rms", "clip": 0.05}),
                 ("lordo", {"outer_lr": 0.7, "outer_momentum": 0.9})]


@pytest.mark.parametrize("method,workers,case", [
    pytest.param(method, workers, case, id=case_id(method, workers, case))
    for method, case in MATRICES_ONLY for workers in (1, 2)])
def test_a_model_of_lowrank_matrices_only_matches_reference(matrices_only_toy, method, workers, case):
    """No embedding, norm or bias: the step's norms and the synchronization have no AdamW parameter to visit."""
    check_against_reference(matrices_only_toy, method, workers, case)


def check_against_reference(toy, method, workers, case, fast_only=None):
    hp = {**toy.base, **case}
    expected = reference_train(method, toy.init_params(), toy.grad_fn, workers, toy.steps, matrices=toy.matrices, **hp)
    got = toy.fast_train(method, workers, toy.steps, hp | (fast_only or {}))
    moved = max((expected[0][n] - p).abs().max().item() for n, p in toy.init_params().items())
    assert moved > 1e-2  # the run really trains
    for m in range(workers):
        for name in expected[m]:
            torch.testing.assert_close(got[m][name], expected[m][name], rtol=1e-9, atol=1e-12,
                                       msg=lambda s, m=m, name=name: f"worker {m}, {name}: {s}")


def test_clip_bites(toy):
    """The clip threshold used above is well below the gradient norms it meets."""
    grads = [toy.grad_fn(m, step, toy.init_params()) for m in range(2) for step in range(toy.steps)]
    norms = [torch.sqrt(sum((g * g).sum() for g in grad.values())).item() for grad in grads]
    assert min(norms) > 4 * 0.05


def test_float32_communication_stays_close(toy):
    """The default comm_dtype (float32) rounds only the averages: float64 runs still agree closely."""
    expected = reference_train("lordo", toy.init_params(), toy.grad_fn, 2, toy.steps, matrices=toy.matrices, **toy.base)
    got = toy.fast_train("lordo", 2, toy.steps, toy.base, comm_dtype="float32")
    for m in range(2):
        for name in expected[m]:
            torch.testing.assert_close(got[m][name], expected[m][name], rtol=1e-5, atol=1e-7)
