"""The optimizer and the trainer on a CUDA device: skipped on a machine without one.

    pytest tests/test_cuda.py        # on a GPU machine

The float64 toy of tests/conftest.py on the GPU against the CPU reference (cuBLAS and cuSOLVER instead
of the CPU libraries), the memory options' GPU paths (the anchor in pinned host memory, bf16 state drawn
from a CUDA generator), and a real NCCL process group started by `lordo train --launcher torchrun`.
"""

import pytest
import torch
from conftest import SMALL_GPT, Toy
from test_optim_reference import CASES, case_id

from lordo import make_optimizer, projection
from lordo.model import GPT
from lordo.projection import canonical_signs, compute_projection, projection_distance
from lordo.reference import reference_train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")


class CudaToy(Toy):
    """Toy's parameters and data on the GPU; the same numbers (drawn on the CPU, then moved)."""

    def init_params(self) -> dict[str, torch.Tensor]:
        return {n: t.to(CUDA) for n, t in super().init_params().items()}


CUDA_CASES = [pytest.param(method, workers, case, id=case_id(method, workers, case))
              for method in ("ddp", "lowrank_ddp", "lordo_local", "lordo") for case in CASES[method][:3]
              for workers in (1, 2)]


@pytest.mark.parametrize("method,workers,case", CUDA_CASES)
def test_cuda_matches_the_cpu_reference(method, workers, case):
    cpu, gpu = Toy(), CudaToy()
    hp = {**cpu.base, **case}
    expected = reference_train(method, cpu.init_params(), cpu.grad_fn, workers, cpu.steps, matrices=cpu.matrices, **hp)
    got = gpu.fast_train(method, workers, gpu.steps, hp)
    for m in range(workers):
        for name, want in expected[m].items():
            assert got[m][name].is_cuda
            # float64 throughout; the GPU's libraries order their sums differently from the CPU's
            torch.testing.assert_close(got[m][name].cpu(), want, rtol=1e-8, atol=1e-11,
                                       msg=lambda s, m=m, name=name: f"worker {m}, {name}: {s}")


@pytest.mark.parametrize("method", ["power", "randomized"])
def test_the_cuda_refresh_finds_the_cpu_subspace(method):
    """On CUDA the refresh factors its sketch with cuSOLVER's batched SVD (gesvda), on the CPU from W^T W's
    eigenvectors: the same subspace, orthonormal, for stacks of both orientations' shapes whose top r
    directions stand out."""
    g = torch.Generator().manual_seed(0)
    for n, p, q, r in [(6, 96, 96, 12), (4, 64, 160, 8)]:
        U = torch.linalg.qr(torch.randn(n, p, p, generator=g))[0]
        V = torch.linalg.qr(torch.randn(n, q, p, generator=g))[0]
        sigma = 1 / torch.arange(1, p + 1)
        sigma[r:] *= 0.01
        X = (U * sigma) @ V.mT
        prev = canonical_signs(torch.linalg.svd(X + 1e-3 * torch.randn(n, p, q, generator=g))[0][..., :r])
        on_cpu = compute_projection(X, r, method, prev=prev, seed=1)
        on_gpu = compute_projection(X.to(CUDA), r, method, prev=prev.to(CUDA), seed=1)
        assert on_gpu.is_cuda and on_gpu.shape == (n, p, r)
        torch.testing.assert_close(on_gpu.mT @ on_gpu, torch.eye(r, device=CUDA).expand(n, r, r), atol=2e-4, rtol=0)
        # the CUDA and CPU sketches draw different Gaussian columns: the same subspace, not the same bits
        assert projection_distance(on_gpu.cpu(), on_cpu).max() < 1e-2
        assert projection_distance(on_gpu.cpu(), U[..., :r]).max() < 1e-2


def test_the_cuda_refresh_of_rank_deficient_stacks_is_orthonormal():
    """gesvda fails on a zero matrix and returns non-orthonormal columns below full rank: the refresh then
    falls back to QR + SVD, and every Q it returns has orthonormal columns."""
    g = torch.Generator().manual_seed(0)
    n, p, q, r = 4, 64, 128, 8
    sketch = torch.randn(n, p, r + 8, generator=g).to(CUDA)
    assert projection._gesvda(sketch, r) is not None                  # the fast path runs where it can
    assert projection._gesvda(torch.zeros_like(sketch), r) is None
    some_zero = torch.randn(n, p, q, generator=g)
    some_zero[1] = 0
    low_rank = [torch.randn(n, p, k, generator=g) @ torch.randn(n, k, q, generator=g) for k in (1, 4, 12)]
    for X in [torch.zeros(n, p, q), some_zero, 1e-15 * torch.randn(n, p, q, generator=g), *low_rank]:
        for method in ("power", "randomized"):
            Q = compute_projection(X.to(CUDA), r, method, prev=torch.linalg.qr(torch.randn(n, p, r))[0].to(CUDA))
            torch.testing.assert_close(Q.mT @ Q, torch.eye(r, device=CUDA).expand(n, r, r), atol=2e-4, rtol=0)


def train_small_gpt(steps: int = 7, **options) -> tuple[GPT, object]:
    torch.manual_seed(0)
    model = GPT(SMALL_GPT).to(CUDA)
    opt = make_optimizer("lordo", model, lr=3e-3, rank=4, sync_every=3, proj_every=3, **options)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randint(0, SMALL_GPT.vocab_size, (4, 9), generator=gen).to(CUDA)
        model(x[:, :-1], x[:, 1:])[1].backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_host_anchor_keeps_the_anchor_in_pinned_host_memory_and_changes_nothing():
    plain, _ = train_small_gpt()
    held, opt = train_small_gpt(host_anchor=True)
    assert all(a.device.type == "cpu" and a.is_pinned() for a in opt.anchor)
    stats = opt.memory_stats()
    assert stats["host"] == stats["anchor"] > 0
    for (name, a), b in zip(plain.state_dict().items(), held.state_dict().values()):
        # the same arithmetic; only CUDA's atomics (the embedding's backward) may reorder a sum
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


def test_bf16_state_on_cuda_stays_near_float32():
    ref, _ = train_small_gpt(steps=12)
    bf16, opt = train_small_gpt(steps=12, state_dtype="bfloat16")
    assert opt.buckets[0].exp_avg.dtype == torch.bfloat16
    start = GPT(SMALL_GPT).state_dict()
    for name, a in ref.state_dict().items():
        moved = (a.cpu() - start[name]).norm()
        assert (bf16.state_dict()[name] - a).norm().cpu() <= 0.1 * moved + 1e-6, name


@pytest.mark.integration
def test_nccl_torchrun_equals_simulated(tmp_path):
    """Two ranks where the machine has two GPUs, else one: NCCL refuses two ranks on one GPU. The launcher is
    not part of a run's identity, so each launcher gets its own runs directory."""
    from lordo import train
    common = dict(method="lordo", preset="tiny", workers=min(2, torch.cuda.device_count()), steps=24, sync_every=8,
                  eval_every=24, eval_batches=2, device="cuda", progress=False)
    real = train(launcher="torchrun", runs_dir=str(tmp_path / "torchrun"), **common)
    sim = train(launcher="sim", runs_dir=str(tmp_path / "sim"), **common)
    assert real.summary["device"].startswith("cuda") and sim.summary["device"].startswith("cuda")
    assert real.summary["val_loss"] < real.metrics["val_loss"].iloc[0] - 0.5    # it trains
    # GPU kernels (the embedding's backward adds with atomics) need not be bitwise repeatable
    assert real.summary["val_loss"] == pytest.approx(sim.summary["val_loss"], rel=1e-3)
