"""The compiled CPU kernels (lordo/csrc/lowrank_cpu.cpp): their math against float64, their results the same
at any thread count and with every instruction set the CPU has, and the optimizer's step with them against its
eager path.

The kernels fix the order of every sum (not the tiling, not the threads), so their results are compared bit for
bit across thread counts and instruction sets, on shapes that exercise every tile and tail (columns not a
multiple of 16, ranks above one pass of registers, fewer rows than a tile, buckets of one and three matrices,
both orientations). Against the eager path (BLAS products, which round differently) and against float64 they
agree to float32 rounding. The whole-step runs cover the branches of the step the kernels touch (lazy error
feedback, the QH term and its update_rms scale, weight decay, the clip biting) or leave to the eager path (a
fresh projection, bf16 state).
"""

import json
import threading

import pytest
import torch

import lordo.kernels
import lordo.optim.kernel_paths
from lordo.comm import cpu_threads, run_simulated
from lordo.optim import make_optimizer

SHAPES = {"emb": (16, 48), "w_in": (48, 24), "w_out": (24, 72), "bias": (72,)}   # w_in: p > q, stored transposed
STEPS = 7


def init_params() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {n: (0.3 * torch.randn(s, generator=g)).requires_grad_() for n, s in SHAPES.items()}


def loss(params: dict[str, torch.Tensor], step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(8, 16, generator=g), torch.randn(8, 72, generator=g)
    h = torch.tanh(x @ params["emb"] @ params["w_in"])
    return ((h @ params["w_out"] + params["bias"] - y) ** 2).mean()


class Spy:
    """The kernels module, counting the calls that reach it."""

    def __init__(self, ext):
        self.ext, self.calls = ext, 0

    def __getattr__(self, name):
        def call(*args):
            self.calls += 1
            return getattr(self.ext, name)(*args)
        return call


def train(method: str, hp: dict, fused: bool | None, monkeypatch) -> tuple[dict, dict, int]:
    """Parameters, optimizer state and kernel calls after STEPS steps."""
    spy = Spy(lordo.kernels.lowrank_cpu())
    monkeypatch.setattr(lordo.optim.kernel_paths, "lowrank_cpu", lambda: spy)
    params = init_params()
    groups = [{"params": [params["w_in"], params["w_out"], params["bias"]], "lowrank": True,
               "param_names": ["w_in", "w_out", "bias"]},
              {"params": [params["emb"]], "lowrank": False, "param_names": ["emb"]}]
    opt = make_optimizer(method, groups, fused=fused, lr=0.02, rank=4, sync_every=3, proj_every=2, **hp)
    for step in range(STEPS):
        loss(params, step).backward()
        opt.step()
        opt.zero_grad()
    return {n: p.detach() for n, p in params.items()}, opt.state_dict()["state"], spy.calls


def flat(state) -> list[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for k in sorted(state, key=str) for t in flat(state[k])]
    if isinstance(state, list | tuple):
        return [t for s in state for t in flat(s)]
    return []


CASES = [("lordo", {}), ("lordo", {"omega": 1.0}), ("lordo", {"error_feedback": False, "weight_decay": 0.1}),
         ("lordo", {"clip": 0.05}), ("lordo", {"qh_scale": "update_rms", "clip": 0.05, "weight_decay": 0.1}),
         ("lordo", {"clip": 0.05, "nonfinite": "off"}), ("lordo", {"diagnostics": True}), ("lordo_local", {}),
         ("lowrank_ddp", {})]


@pytest.mark.parametrize("method,hp", CASES, ids=[f"{m}-{hp}" for m, hp in CASES])
def test_compiled_step_matches_the_eager_step(method, hp, monkeypatch):
    """7 steps with two synchronizations: every parameter and piece of state as the eager path computes it, to
    float32 rounding, and the same bits with one and two intra-op threads."""
    if lordo.kernels.lowrank_cpu() is None:
        pytest.fail(f"the CPU kernels did not build: {lordo.kernels.build_error()}")
    runs = {}
    for threads in (1, 2):
        with cpu_threads(threads):
            runs[threads] = train(method, hp, True, monkeypatch)
    with cpu_threads(1):
        eager, eager_state, eager_calls = train(method, hp, False, monkeypatch)
    (compiled, compiled_state, calls), (two, two_state, _) = runs[1], runs[2]
    assert calls >= STEPS and eager_calls == 0
    assert (compiled["w_in"] - init_params()["w_in"]).abs().max() > 1e-2   # the run really trains
    for name in SHAPES:
        assert torch.equal(compiled[name], two[name]), name
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-5, atol=1e-6, msg=name)
    a, b, c = flat(compiled_state), flat(eager_state), flat(two_state)
    assert len(a) == len(b) == len(c) > 0
    assert all(torch.equal(x, y) for x, y in zip(a, c))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


def step_twice(fused: bool | None) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The parameters after two steps on fixed random gradients, and the optimizer's `step_paths()`. No clip and
    gradients that do not depend on the parameters: each matrix's result depends on its own path alone."""
    params = init_params()
    groups = [{"params": [params["w_in"], params["w_out"], params["bias"]], "lowrank": True},
              {"params": [params["emb"]], "lowrank": False}]
    opt = make_optimizer("lordo", groups, fused=fused, lr=0.02, rank=4, clip=None)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        for p in params.values():
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return {n: p.detach() for n, p in params.items()}, opt.step_paths()


def test_fused_none_takes_the_path_measured_faster_for_each_shape_and_caches_the_timings(tmp_path, monkeypatch):
    """fused=None times each bucket's shape once per CPU, instruction set and shape (here a stand-in that makes
    the kernels faster for w_in, stored 48 x 24, and slower for w_out), keeps the timings in the calibration file,
    and steps each bucket on the faster path: w_in's bits are fused=True's, w_out's fused=False's. A second
    optimizer reads the file; fused=True and False do not consult it."""
    monkeypatch.setattr(lordo.kernels, "calibration_file", lambda: tmp_path / "calibration.json")
    measured = []

    def stand_in(optimizer, method, hp, stored, n):
        measured.append((method, stored, n, hp["rank"]))
        return {"kernels": 0.001, "eager": 0.002} if stored == (48, 24) else {"kernels": 0.004, "eager": 0.003}

    monkeypatch.setattr(lordo.optim.kernel_paths, "time_step_paths", stand_in)
    isa = lordo.kernels.lowrank_cpu().set_isa()
    chosen, paths = step_twice(None)
    assert sorted(measured) == [("lordo", (24, 72), 1, 4), ("lordo", (48, 24), 1, 4)]
    by_shape = {row["stored_shape"]: row for row in paths}
    assert by_shape[(48, 24)] == {"matrices": 1, "stored_shape": (48, 24), "rank": 4, "path": f"kernels {isa}",
                                  "why": "fused=None: the faster here", "kernels_ms": 1.0, "eager_ms": 2.0,
                                  "cached": False}
    assert by_shape[(24, 72)]["path"] == "eager" and by_shape[(24, 72)]["why"] == "fused=None: the faster here"
    kernels, kernel_paths = step_twice(True)
    eager, eager_paths = step_twice(False)
    assert torch.equal(chosen["w_in"], kernels["w_in"]) and not torch.equal(chosen["w_in"], eager["w_in"])
    assert torch.equal(chosen["w_out"], eager["w_out"]) and not torch.equal(chosen["w_out"], kernels["w_out"])
    assert [r["path"] for r in kernel_paths] == [f"kernels {isa}"] * 2 and kernel_paths[0]["why"] == "fused=True"
    assert [r["path"] for r in eager_paths] == ["eager"] * 2 and eager_paths[0]["why"] == "fused=False"
    again = step_twice(None)[1]
    assert len(measured) == 2 and all(row["cached"] for row in again)
    assert [r["path"] for r in again] == [r["path"] for r in paths]


def test_the_calibration_times_both_paths_for_real(tmp_path, monkeypatch):
    """Without a stand-in: both paths timed on this machine, the faster one taken."""
    monkeypatch.setattr(lordo.kernels, "calibration_file", lambda: tmp_path / "calibration.json")
    for row in step_twice(None)[1]:
        assert 0 < row["kernels_ms"] < 1e4 and 0 < row["eager_ms"] < 1e4 and not row["cached"]
        assert row["path"].startswith("kernels") == (row["kernels_ms"] <= row["eager_ms"])
    assert len(json.loads((tmp_path / "calibration.json").read_text())) == 2


def test_every_worker_takes_worker_0s_paths(monkeypatch):
    """Distributed (simulated workers), each shape steps on worker 0's choice on every worker, here against worker
    1's own timings, so the replicas of lowrank_ddp, which step alike on averaged gradients, stay bit-identical."""
    def timings(case, measure):   # worker 0 measures the kernels faster, worker 1 the eager path
        kernels_first = threading.current_thread().name == "lordo-worker-0"
        return {"kernels": 0.001, "eager": 0.002} if kernels_first else {"kernels": 0.002, "eager": 0.001}, False

    monkeypatch.setattr(lordo.optim.kernel_paths, "calibrated", timings)
    isa = lordo.kernels.lowrank_cpu().set_isa()

    def worker(comm):
        params = init_params()
        groups = [{"params": [params["w_in"], params["w_out"], params["bias"]], "lowrank": True},
                  {"params": [params["emb"]], "lowrank": False}]
        opt = make_optimizer("lowrank_ddp", groups, comm=comm, lr=0.02, rank=4)
        for step in range(3):
            loss(params, 2 * step + comm.rank).backward()
            opt.step()
            opt.zero_grad()
        return params, opt.step_paths()

    (params0, paths0), (params1, paths1) = run_simulated(worker, 2)
    for paths in (paths0, paths1):
        assert [(r["path"], r["why"]) for r in paths] == [(f"kernels {isa}", "fused=None: the faster on worker 0")] * 2
    assert paths1[0]["kernels_ms"] == 2.0 and paths1[0]["eager_ms"] == 1.0   # its own timings, said as such
    assert all(torch.equal(params0[n], params1[n]) for n in SHAPES)


def test_low_precision_state_and_float64_stay_eager(monkeypatch):
    """bf16 state keeps its error feedback eagerly (rounded), float64 has no kernel: neither calls them."""
    assert train("lordo", {"state_dtype": "bfloat16"}, None, monkeypatch)[2] == 0
    params = {n: p.detach().double().requires_grad_() for n, p in init_params().items()}
    opt = make_optimizer("lordo", [{"params": list(params.values()), "param_names": list(params)}], lr=0.02, rank=4)
    loss({n: p.float() for n, p in params.items()}, 0).backward()
    opt.step()
    assert opt.kernels is None


def test_fused_true_refuses_what_the_kernels_do_not_cover():
    params = {n: p.detach().double().requires_grad_() for n, p in init_params().items()}
    opt = make_optimizer("lordo", [{"params": list(params.values()), "param_names": list(params)}], fused=True)
    loss({n: p.float() for n, p in params.items()}, 0).backward()
    with pytest.raises(ValueError, match="fused=True needs float32 low-rank matrices on CPU"):
        opt.step()
    with pytest.raises(ValueError, match="fused=1 is invalid: allowed None, True or False"):
        make_optimizer("lordo", list(params.values()), fused=1)


def test_a_failed_build_falls_back_to_the_eager_step(monkeypatch):
    """No compiler (or no ninja): one warning, then the eager path; fused=True says why it cannot run."""
    import torch.utils.cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    monkeypatch.setattr(lordo.kernels, "_built", {})
    monkeypatch.setattr(lordo.kernels, "_error", [])
    params = init_params()
    opt = make_optimizer("lordo", [{"params": list(params.values()), "param_names": list(params)}], lr=0.02, rank=4)
    loss(params, 0).backward()
    with pytest.warns(UserWarning, match="CPU kernels could not be built .*Ninja is required.*eager PyTorch path"):
        opt.step()
    assert opt.kernels is None and lordo.kernels.build_error().endswith("Ninja is required to load C++ extensions")
    strict = make_optimizer("lordo", [{"params": list(params.values()), "param_names": list(params)}], fused=True)
    with pytest.raises(RuntimeError, match="fused=True, but the CPU kernels could not be built: RuntimeError: Ninja"):
        strict.step()


# (matrices, rows, cols, rank, transposed) as stored: tails of columns (not a multiple of 16), ranks of one vector
# or less, between vectors, above one pass of registers (> 96), fewer rows than a tile, one and three matrices
KERNEL_SHAPES = [(3, 40, 70, 5, False), (3, 70, 40, 5, True), (1, 100, 333, 13, False), (1, 333, 100, 13, True),
                 (2, 96, 200, 90, False), (2, 200, 96, 90, True), (1, 130, 400, 112, False),
                 (1, 400, 130, 112, True), (3, 7, 9, 7, True), (1, 512, 1536, 32, False), (3, 1536, 512, 48, True)]


def kernel_case(shape):
    """Weights, gradients, buffers, Q (orthonormal columns) and N for one bucket, laid out as the optimizer
    lays them out (N and the projection's output stored like the weights)."""
    n, rows, cols, rank, transposed = shape
    side, other = (cols, rows) if transposed else (rows, cols)     # the oriented matrix's p and q
    g = torch.Generator().manual_seed(sum(shape[:4]))
    W, G, R = ([torch.randn(rows, cols, generator=g) for _ in range(n)] for _ in range(3))
    Q = torch.linalg.qr(torch.randn(n, side, rank, generator=g, dtype=torch.float64))[0].float().contiguous()
    N = torch.randn(n, other, rank, generator=g).mT if transposed else torch.randn(n, rank, other, generator=g)
    out = torch.empty(n, other, rank).mT if transposed else torch.empty(n, rank, other)
    return W, G, R, Q, N, out, transposed


def moments_case(out):
    """Adam moments laid out like the projection's output (exp_avg_sq >= 0)."""
    g = torch.Generator().manual_seed(out.numel())
    stored = out.shape if out.is_contiguous() else out.mT.shape
    u, v = torch.randn(stored, generator=g), torch.rand(stored, generator=g)
    return (u, v) if out.is_contiguous() else (u.mT, v.mT)


BETAS, MOMENT_ARGS = (0.9, 0.95), dict(bc2=1 - 0.95**3, eps=1e-8, scale=0.7 / (1 - 0.9**3))


def run_kernels(shape, isa, threads, qh=(0.1, -0.2, 0.3)):
    """The projection with its norms, the moments on it, then the update, on the shape's bucket with one
    instruction set."""
    ext = lordo.kernels.lowrank_cpu()
    W, G, R, Q, N, out, transposed = kernel_case(shape)
    u, v = moments_case(out)
    before = ext.set_isa(isa)
    try:
        with cpu_threads(threads):
            norms = ext.project_and_norm(out, Q, G, transposed)
            projected = out.clone()
            sums = ext.adam_moments(u, v, out, *BETAS, *MOMENT_ARGS.values())
            ext.apply_lowrank(W, G, R, Q, N, transposed, 0.01, 0.99, list(qh[:len(W)]))
    finally:
        ext.set_isa(before)
    return projected, norms, W, R, u, v, out, sums


@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=str)
def test_kernels_give_the_same_bits_at_any_thread_count_and_instruction_set(shape):
    ext = lordo.kernels.lowrank_cpu()
    isas = ext.isas()
    assert isas[-1] == "generic" and ext.set_isa() == isas[0]      # the widest by default
    first = run_kernels(shape, "generic", 1)
    for isa in isas:
        for threads in (1, 2):
            got = run_kernels(shape, isa, threads)
            for a, b in zip(first, got):
                a, b = (a, b) if isinstance(a, torch.Tensor) else (torch.stack(a), torch.stack(b))
                assert torch.equal(a, b), (isa, threads)


@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=str)
def test_kernels_compute_the_step_in_float64_up_to_float32_rounding(shape):
    out, norms, W_new, R_new, u_new, v_new, low, sums = run_kernels(shape, lordo.kernels.lowrank_cpu().isas()[0], 2)
    W, G, R, Q, N, _, transposed = kernel_case(shape)
    u, v = (x.double() for x in moments_case(out))
    (b1, b2), a = BETAS, MOMENT_ARGS
    u_exp = b1 * u + (1 - b1) * out.double()
    v_exp = b2 * v + (1 - b2) * out.double() ** 2
    D = (v_exp / a["bc2"]).sqrt() + a["eps"]
    for got, expected in [(u_new, u_exp), (v_new, v_exp), (low, a["scale"] * u_exp / D)]:
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6 * expected.abs().max())
    torch.testing.assert_close(sums.double(), torch.stack([D.sum(dim=(1, 2)), (u_exp / D).square().sum(dim=(1, 2))], 1),
                               rtol=1e-5, atol=0)
    for j in range(len(W)):
        Gd, Wd, Qd, Nd = (x.double() for x in (G[j], W[j], Q[j], N[j]))
        oriented = Gd.mT if transposed else Gd
        QN = Qd @ Nd
        expected_W = 0.99 * Wd - 0.01 * (QN.mT if transposed else QN) + (0.1, -0.2, 0.3)[j] * Gd
        torch.testing.assert_close(out[j].double(), Qd.mT @ oriented, rtol=0, atol=2e-6 * oriented.abs().max())
        torch.testing.assert_close(norms[j].double(), Gd.norm(), rtol=1e-5, atol=0)
        torch.testing.assert_close(W_new[j].double(), expected_W, rtol=0, atol=1e-6 * expected_W.abs().max())
        assert torch.equal(R_new[j], R[j] + G[j])      # exact: one float32 add per entry


def test_kernels_refuse_what_they_do_not_take():
    ext = lordo.kernels.lowrank_cpu()
    W, G, R, Q, N, out, transposed = kernel_case((2, 40, 70, 5, False))
    with pytest.raises(RuntimeError, match="shapes do not match"):
        ext.project_and_norm(torch.empty(2, 4, 70), Q, G, transposed)
    with pytest.raises(RuntimeError, match="must be a contiguous float32 CPU tensor"):
        ext.apply_lowrank([w.double() for w in W], G, R, Q, N, transposed, 0.01, 1.0, [])
    with pytest.raises(RuntimeError, match="instruction set avx9 is not available"):
        ext.set_isa("avx9")


def test_kernel_norms_are_float64_norms_to_rounding_and_the_same_at_any_thread_count():
    """The other gradients' norms (embeddings, norms, biases: any shape), in fixed chunks of 2^16 entries."""
    ext = lordo.kernels.lowrank_cpu()
    g = torch.Generator().manual_seed(3)
    tensors = [torch.randn(*s, generator=g) for s in [(300, 1000), (7,), (0,), (65536,), (65537,), (2, 3, 5)]]
    expected = torch.stack([t.double().norm() for t in tensors])
    results = []
    for isa in ext.isas():
        for threads in (1, 2):
            ext_isa = ext.set_isa(isa)
            with cpu_threads(threads):
                results.append(ext.norms(tensors))
            ext.set_isa(ext_isa)
    assert all(torch.equal(results[0], r) for r in results[1:])
    torch.testing.assert_close(results[0].double(), expected, rtol=1e-6, atol=0)
    assert not torch.isfinite(ext.norms([torch.tensor([1.0, float("inf")]), tensors[1]])[0])
