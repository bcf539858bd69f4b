"""The memory options: bfloat16 state with stochastic rounding, and the anchor in host memory.

The rounding is held to its definition (unbiased, one of the two neighbours, reproducible); the
optimizer with `state_dtype="bfloat16"` to the float64 reference storing its state the same way
(`lordo.reference`, its own rounding code and random draws, so agreement is to the rounding noise);
resumes and host anchors to bit-identical runs; `memory_stats()` to what is allocated.
"""

import io

import pytest
import torch

from lordo import METHODS, make_optimizer, run_simulated
from lordo.model import GPT
from lordo.optim import stochastic_round_
from lordo.reference import reference_train, stochastic_round

BF16 = torch.bfloat16


def fast_round(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return stochastic_round_(torch.empty(x.shape, dtype=BF16), x, gen).to(x.dtype)


@pytest.mark.parametrize("rounding", [fast_round, stochastic_round], ids=["optim", "reference"])
def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour(rounding):
    gen = torch.Generator().manual_seed(0)
    lower = torch.tensor([1.0, -3.0, 1e-30, 250.0, 0.0], dtype=BF16)
    upper = torch.nextafter(lower, torch.where(lower < 0, -torch.inf, torch.inf).to(BF16))
    upper[-1] = lower[-1]                                    # x = 0 is exact: it stays 0
    fraction = torch.tensor([0.3, 0.8, 0.5, 0.01, 0.0], dtype=torch.float64)
    x = (lower.double() + fraction * (upper.double() - lower.double())).float()
    draws = torch.stack([rounding(x, gen) for _ in range(4000)]).double()
    assert ((draws == lower.double()) | (draws == upper.double())).all()
    up = (draws == upper.double()).double().mean(0)
    assert torch.allclose(up[:-1], fraction[:-1].to(up), atol=4 * (0.25 / 4000) ** 0.5)   # 4 sigma
    assert (draws[:, -1] == 0).all()
    again = torch.Generator().manual_seed(0)
    assert torch.equal(rounding(x, again).double(), draws[0])                      # reproducible


def test_rounded_running_sums_do_not_drift():
    """A bfloat16 buffer gaining increments far below its spacing: rounding to nearest would keep it
    at 1 forever; stochastic rounding tracks the true sum 1 + 1000 * 2^-12 ~ 1.244."""
    gen = torch.Generator().manual_seed(1)
    kept = torch.ones(2000, dtype=BF16)
    for _ in range(1000):
        stochastic_round_(kept, kept.float() + 2.0**-12, gen)
    assert abs(kept.double().mean().item() - (1 + 1000 * 2.0**-12)) < 2e-3
    assert (torch.ones(1, dtype=BF16) + 2.0**-12).item() == 1.0      # what nearest rounding does


@pytest.mark.parametrize("method,case", [
    ("lordo", {}), ("lordo", {"moments_on_refresh": "rotate", "weight_decay": 0.1}), ("lowrank_ddp", {}),
    ("lordo_local", {"moments_on_refresh": "rotate"}), ("local_adam", {"outer_lr": 0.7, "outer_momentum": 0.9}),
    ("ddp", {})])
def test_bfloat16_state_matches_the_reference_to_its_rounding(toy, method, case):
    hp = {**toy.base, **case}
    exact = reference_train(method, toy.init_params(), toy.grad_fn, 2, toy.steps, matrices=toy.matrices, **hp)
    rounded = reference_train(method, toy.init_params(), toy.grad_fn, 2, toy.steps, matrices=toy.matrices,
                              state_dtype="bfloat16", **hp)
    got = toy.fast_train(method, 2, toy.steps, {**hp, "state_dtype": "bfloat16"})
    moved = max((exact[0][n] - p).abs().max().item() for n, p in toy.init_params().items())
    noise = max((rounded[m][n] - exact[m][n]).abs().max().item() for m in range(2) for n in exact[0])
    assert 1e-7 < noise < 1e-2 * moved          # the reference's own rounding: visible and small
    assert max((got[m][n] - exact[m][n]).abs().max().item() for m in range(2) for n in exact[0]) > 1e-7
    for m in range(2):
        for n in exact[m]:
            torch.testing.assert_close(got[m][n], rounded[m][n], rtol=0, atol=4 * noise)


def test_bfloat16_state_is_stored_in_bfloat16_and_counted(gpt):
    model = GPT(gpt.config)
    opt = make_optimizer("lordo", model, state_dtype="bfloat16", **gpt.hp)
    full = make_optimizer("lordo", GPT(gpt.config), **gpt.hp).memory_stats()
    gpt.train_steps(model, opt, 0, 4)
    b = opt.buckets[0]
    assert b.exp_avg.dtype == b.exp_avg_sq.dtype == b.ef.dtype == BF16 and b.Q.dtype == torch.float32
    adamw = [opt.state[opt.params[i]] for i in opt.adamw_indices]
    assert all(s["exp_avg"].dtype == s["exp_avg_sq"].dtype == BF16 for s in adamw)
    stats = opt.memory_stats()
    for kind in ("moments", "error_feedback"):
        assert stats[kind] * 2 == full[kind]
    assert stats["projection"] == full["projection"] and stats["anchor"] == full["anchor"]
    allocated = sum(s[k].numel() * s[k].element_size() for s in adamw for k in ("exp_avg", "exp_avg_sq"))
    allocated += sum(t.numel() * t.element_size() for b in opt.buckets for t in (b.exp_avg, b.exp_avg_sq))
    assert allocated == stats["moments"]
    assert sum(b.ef.numel() * 2 for b in opt.buckets) == stats["error_feedback"]


def test_memory_stats_split_device_and_host(gpt):
    opt = make_optimizer("lordo", GPT(gpt.config), host_anchor=True, outer_momentum=0.5, **gpt.hp)
    cpu = opt.memory_stats()
    assert cpu["device"] == 0 and cpu["host"] == cpu["total"]     # CPU: everything is host memory
    gpu = opt.memory_stats(accelerator=True)
    assert gpu["host"] == gpu["anchor"] + gpu["outer_momentum"] > 0
    assert gpu["device"] == gpu["moments"] + gpu["projection"] + gpu["error_feedback"]
    resident = make_optimizer("lordo", GPT(gpt.config), outer_momentum=0.5, **gpt.hp).memory_stats(accelerator=True)
    assert resident["device"] == resident["total"] == gpu["total"] and resident["host"] == 0


@pytest.mark.parametrize("method", ["lordo", "local_adam"])
def test_host_anchor_changes_nothing_but_placement(gpt, method):
    def run(host_anchor):
        model = GPT(gpt.config, seed=3)
        opt = make_optimizer(method, model, host_anchor=host_anchor, outer_momentum=0.5, **gpt.hp)
        gpt.train_steps(model, opt, 0, 7)
        return model.state_dict()

    a, b = run(False), run(True)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_bfloat16_state_resumes_bit_exactly(gpt, method):
    hp = dict(gpt.hp, proj_method="randomized", moments_on_refresh="rotate", state_dtype="bfloat16", host_anchor=True)

    def worker(comm, split):
        model = GPT(gpt.config, seed=3)
        opt = make_optimizer(method, model, comm=comm, **hp)
        if not split:
            gpt.train_steps(model, opt, comm.rank, 8)
            return model.state_dict()
        gpt.train_steps(model, opt, comm.rank, 4)
        buf = io.BytesIO()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
        buf.seek(0)
        saved = torch.load(buf, weights_only=True)
        model = GPT(gpt.config, seed=99)
        model.load_state_dict(saved["model"])
        opt = make_optimizer(method, model, comm=comm, **hp)
        opt.load_state_dict(saved["opt"])
        gpt.train_steps(model, opt, comm.rank, 4, start=4)
        return model.state_dict()

    straight, resumed = run_simulated(worker, 2, False), run_simulated(worker, 2, True)
    for a, b in zip(straight, resumed):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_memory_options_name_the_value(gpt):
    with pytest.raises(ValueError, match="state_dtype='float16' is invalid: allowed"):
        make_optimizer("lordo", GPT(gpt.config), state_dtype="float16")
    with pytest.raises(ValueError, match="host_anchor='yes' is invalid: allowed"):
        make_optimizer("lordo", GPT(gpt.config), host_anchor="yes")
