"""The optimizer as users drive it: parameter split, bad input, checkpoints, accounting."""

import io

import pytest
import torch
from torch import nn

from lordo import METHODS, make_optimizer, projection, run_simulated, split_params
from lordo.model import GPT
from lordo.projection import PROJ_METHODS, canonical_signs, compute_projection


def test_split_params_follows_the_rule(gpt):
    model = GPT(gpt.config)
    matrices, rest = split_params(model)
    assert matrices["lowrank"] and not rest["lowrank"]
    assert all(p.ndim == 2 for p in matrices["params"])
    assert "embed_tokens.weight" in rest["param_names"]       # embedding, tied to the head
    assert not any("lm_head" in n for n in rest["param_names"] + matrices["param_names"])  # tied: listed once
    assert all(n.endswith("norm.weight") for n in rest["param_names"] if n != "embed_tokens.weight")
    assert len(matrices["params"]) == gpt.config.n_layers * 7


def test_untied_head_is_not_a_matrix():
    model = nn.ModuleDict({"body": nn.Linear(8, 8), "lm_head": nn.Linear(8, 20, bias=False)})
    matrices, rest = split_params(model)
    assert matrices["param_names"] == ["body.weight"]
    assert set(rest["param_names"]) == {"body.bias", "lm_head.weight"}


@pytest.mark.parametrize("hp, message", [
    (dict(rank=0), "rank=0"), (dict(rank=-3), "rank=-3"), (dict(rank=1.5), "rank=1.5"), (dict(rank=33), "rank=33"),
    (dict(omega=1.2), "omega=1.2"), (dict(omega=-0.1), "omega=-0.1"), (dict(sync_every=0), "sync_every=0"),
    (dict(lr=-1e-3), "lr=-0.001"), (dict(betas=(0.9, 1.0)), "betas=(0.9, 1.0)"), (dict(proj_method="qr"), "'qr'"),
    (dict(moments_on_refresh="swap"), "'swap'"), (dict(clip=0), "clip=0"), (dict(nonsense=1), "'nonsense'"),
])
def test_bad_hyperparameters_name_the_value(gpt, hp, message):
    with pytest.raises(ValueError, match="allowed") as err:
        make_optimizer("lordo", GPT(gpt.config), **hp)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_method_lists_the_methods(gpt):
    with pytest.raises(ValueError, match="method='sgd' is unknown: allowed .*lordo_global"):
        make_optimizer("sgd", GPT(gpt.config))


def test_rank_above_a_matrix_names_the_parameter(gpt):
    with pytest.raises(ValueError, match=r"rank=33 is invalid for parameter 'layers.0.self_attn.q_proj.weight' "
                                         r"of shape \(32, 32\): allowed an int in \[1, 32\]"):
        make_optimizer("lordo", GPT(gpt.config), rank=33)


@pytest.mark.parametrize("rule", ["raise", "skip"])
def test_nonfinite_gradient_changes_nothing(gpt, rule):
    model = GPT(gpt.config)
    opt = make_optimizer("lordo", model, nonfinite=rule, **(gpt.hp | {"sync_every": 10}))
    gpt.train_steps(model, opt, 0, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state_before = opt.state_dict()
    model(*gpt.batch(0, 5))[1].backward()
    model.layers[1].mlp.up_proj.weight.grad[0, 0] = float("nan")
    if rule == "raise":
        with pytest.raises(FloatingPointError, match="'layers.1.mlp.up_proj.weight' at step 2"):
            opt.step()
    else:
        opt.step()
        assert opt.skipped_steps == 1 and opt.steps == 3
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    after = opt.state_dict()["state"]
    for i, s in state_before["state"].items():
        for k, v in s.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(after[i][k])), k


@pytest.mark.parametrize("method", sorted(METHODS))
def test_state_dict_loads_weights_only_and_resumes_bit_exactly(gpt, method):
    """N straight steps == N/2 steps, save, load into a fresh model and optimizer, N/2 more."""
    hp = dict(gpt.hp, proj_method="randomized", moments_on_refresh="rotate", outer_momentum=0.5, diagnostics=True)

    def worker(comm, split):
        model = GPT(gpt.config, seed=3)
        opt = make_optimizer(method, model, comm=comm, **hp)
        if not split:
            gpt.train_steps(model, opt, comm.rank, 8)
            return model.state_dict(), opt.comm_stats()
        gpt.train_steps(model, opt, comm.rank, 4)
        buf = io.BytesIO()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
        buf.seek(0)
        saved = torch.load(buf, weights_only=True)
        model, opt = GPT(gpt.config, seed=99), None
        model.load_state_dict(saved["model"])
        opt = make_optimizer(method, model, comm=comm, **hp)
        opt.load_state_dict(saved["opt"])
        gpt.train_steps(model, opt, comm.rank, 4, start=4)
        return model.state_dict(), opt.comm_stats()

    straight = run_simulated(worker, 2, False)
    resumed = run_simulated(worker, 2, True)
    for (a, stats_a), (b, stats_b) in zip(straight, resumed):
        assert stats_a == stats_b
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_drop_in_single_process_with_a_torch_scheduler(gpt):
    model = GPT(gpt.config)
    opt = make_optimizer("lordo", model, **gpt.hp)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s))
    losses = []
    for step in range(12):
        x, y = gpt.batch(0, step % 2)
        loss = model(x, y)[1]
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert opt.param_groups[0]["lr"] == pytest.approx(gpt.hp["lr"] / 13)
    assert losses[-1] < losses[0] - 0.1


def test_communication_accounting(gpt):
    """ddp sends every parameter every step; lordo every parameter every K steps, plus its first Q."""
    def worker(comm, method):
        model = GPT(gpt.config)
        opt = make_optimizer(method, model, comm=comm, **gpt.hp)
        gpt.train_steps(model, opt, comm.rank, 6)
        return opt.comm_stats(), model.num_params(), sum(p.numel() for p in split_params(model)[0]["params"])

    (ddp, n_params, n_matrix), _ = run_simulated(worker, 2, "ddp")
    (lordo, _, _), _ = run_simulated(worker, 2, "lordo")
    init, n_tensors, check = n_params * 4, len(list(GPT(gpt.config).parameters())), 16
    # with the gradients, one flag per tensor: who has a gradient (grad=None ones stay untouched)
    assert ddp["by_kind"]["gradients"] == {"collectives": 6, "payload_bytes": 6 * (n_params + n_tensors) * 4}
    assert lordo["by_kind"]["sync"] == {"collectives": 2, "payload_bytes": 2 * n_params * 4}
    assert lordo["by_kind"]["first_projection"]["payload_bytes"] == n_matrix * 4
    assert ddp["by_kind"]["initial_broadcast"]["payload_bytes"] == init
    assert lordo["by_kind"]["gradient_check"] == ddp["by_kind"]["gradient_check"] == {"collectives": 1,
                                                                                     "payload_bytes": check}
    assert lordo["payload_bytes"] == init + 2 * n_params * 4 + n_matrix * 4 + check
    assert ddp["ring_wire_factor"] == 1.0 and ddp["wire_bytes"] == ddp["payload_bytes"]


def test_memory_accounting_matches_allocated_state(gpt):
    model = GPT(gpt.config)
    opt = make_optimizer("lordo", model, outer_momentum=0.9, **gpt.hp)
    stats = opt.memory_stats()
    gpt.train_steps(model, opt, 0, 1)
    assert opt.memory_stats() == stats
    n = sum(p.numel() for p in model.parameters()) * 4
    assert stats["anchor"] == stats["outer_momentum"] == n
    matrices = split_params(model)[0]["params"]
    assert stats["error_feedback"] == sum(p.numel() for p in matrices) * 4
    assert stats["projection"] == sum(min(p.shape) * 4 for p in matrices) * 4
    rest = n - stats["error_feedback"]
    assert stats["moments"] == 2 * rest + sum(2 * 4 * max(p.shape) * 4 for p in matrices)
    assert stats["total"] == sum(v for k, v in stats.items() if k not in ("total", "device", "host"))
    assert stats["host"] == stats["total"] and stats["device"] == 0     # a CPU run: all in host memory
    adam = make_optimizer("ddp", GPT(gpt.config)).memory_stats()
    assert adam == {"moments": 2 * n, "projection": 0, "error_feedback": 0, "anchor": 0, "outer_momentum": 0,
                    "total": 2 * n, "device": 0, "host": 2 * n}


@pytest.mark.parametrize("method", PROJ_METHODS)
def test_projection_methods_find_the_top_subspace(method):
    gen = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(3, 40, 40, generator=gen))[0]
    V = torch.linalg.qr(torch.randn(3, 60, 40, generator=gen))[0]
    S = torch.cat([torch.tensor([10.0, 8, 6, 5]), torch.full((36,), 0.1)])
    X = U @ torch.diag(S) @ V.mT
    Q = compute_projection(X, 4, method, seed=1, iters=2, prev=torch.linalg.qr(torch.randn(3, 40, 4, generator=gen))[0])
    exact = compute_projection(X, 4, "svd")
    assert torch.allclose(Q, exact, atol=1e-4)          # the sign convention makes them comparable entrywise
    assert torch.allclose(Q.mT @ Q, torch.eye(4).expand(3, 4, 4), atol=1e-5)
    prev = torch.linalg.qr(torch.randn(3, 40, 4, generator=torch.Generator().manual_seed(5)))[0]
    assert torch.equal(compute_projection(X, 4, method, seed=1, prev=prev),
                       compute_projection(X.clone(), 4, method, seed=1, prev=prev.clone()))   # deterministic
    idx = Q.abs().argmax(dim=1, keepdim=True)
    assert (torch.gather(Q, 1, idx) > 0).all()


def test_the_cpu_factorization_of_a_sketch_matches_float64_and_falls_back_where_rank_deficient():
    """On a CPU a float32 sketch's top singular vectors come from W^T W's eigenvectors in float64: they span the
    float64 SVD's subspace (closer than QR + SVD in float32 do) with orthonormal columns; a zero matrix or one of
    rank below `rank` is refused (None), and the refresh then uses QR + SVD."""
    gen = torch.Generator().manual_seed(0)
    n, p, width, r = 5, 96, 24, 16
    W = torch.randn(n, p, width, generator=gen) * torch.logspace(0, -3, width)      # a spread spectrum, like a sketch
    exact = torch.linalg.svd(W.double(), full_matrices=False)[0][..., :r]
    missed = lambda U: (1 - (U.double().mT @ W.double()).square().sum((-2, -1))
                        / (exact.mT @ W.double()).square().sum((-2, -1))).abs().max()
    fast = projection._gram_eigh(W, r)
    assert torch.equal(projection._top_left_singular(W, r), fast)     # what the refresh runs on a CPU
    plain = projection._qr_svd(W, r)
    assert missed(fast) < 1e-6 and missed(fast) <= missed(plain)
    torch.testing.assert_close(fast.mT @ fast, torch.eye(r).expand(n, r, r), atol=1e-6, rtol=0)
    torch.testing.assert_close(canonical_signs(fast), canonical_signs(exact).float(), atol=1e-4, rtol=0)
    some_zero = W.clone()
    some_zero[2] = 0
    low_rank = torch.randn(n, p, 4, generator=gen) @ torch.randn(n, 4, width, generator=gen)
    for degenerate in (torch.zeros(n, p, width), some_zero, low_rank):
        assert projection._gram_eigh(degenerate, r) is None
        Q = projection._top_left_singular(degenerate, r)
        torch.testing.assert_close(Q.mT @ Q, torch.eye(r).expand(n, r, r), atol=1e-5, rtol=0)
