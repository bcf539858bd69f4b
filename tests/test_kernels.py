"""The compiled CPU kernels (lordo/csrc/lowrank_cpu.cpp) give the one-thread eager step's results bit for bit,
whatever the number of intra-op threads (each thread takes whole matrices through the one-thread code).

The eager path is checked against the float64 reference (test_optim_reference.py); the kernels take float32
CPU matrices only, so here they are checked against the eager path on the same float32 runs: every
parameter and every piece of state equal, the kernels with one and two intra-op threads against the eager
path with one, whole matrices and several blocks of rows, and with the branches of the step the kernels
touch (lazy error feedback, the QH term and its update_rms scale, weight decay, the clip biting) or leave to
the eager path (a fresh projection, bf16 state). The whole-step runs use small matrices, on which the step's
other operations (the low-rank moments, the projection's QR) round alike at one and two threads; the kernels
alone are checked at two threads on shapes where a threaded product would round differently.
"""

import pytest
import torch

import lordo.kernels
import lordo.optim
from lordo.comm import cpu_threads
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
    monkeypatch.setattr(lordo.optim, "lowrank_cpu", lambda: spy)
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
         ("lordo", {"clip": 0.05, "nonfinite": "off"}), ("lordo_local", {}), ("lowrank_ddp", {})]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("block", [None, 64], ids=["whole", "blocks"])
@pytest.mark.parametrize("method,hp", CASES, ids=[f"{m}-{hp}" for m, hp in CASES])
def test_compiled_step_is_the_one_thread_eager_step_bit_for_bit(method, hp, block, threads, monkeypatch):
    if lordo.kernels.lowrank_cpu() is None:
        pytest.fail(f"the CPU kernels did not build: {lordo.kernels.build_error()}")
    if block is not None:
        monkeypatch.setattr(lordo.optim, "CPU_BLOCK", block)   # 64 entries: rows of 1 to 2 per block
    with cpu_threads(threads):
        compiled, compiled_state, calls = train(method, hp, None, monkeypatch)
    with cpu_threads(1):
        eager, eager_state, eager_calls = train(method, hp, False, monkeypatch)
    assert calls >= STEPS and eager_calls == 0
    assert (compiled["w_in"] - init_params()["w_in"]).abs().max() > 1e-2   # the run really trains
    for name in SHAPES:
        assert torch.equal(compiled[name], eager[name]), name
    a, b = flat(compiled_state), flat(eager_state)
    assert len(a) == len(b) > 0
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_low_precision_state_and_float64_stay_eager(monkeypatch):
    """bf16 state keeps its error feedback eagerly (rounded), float64 has no kernel: neither calls them."""
    assert train("lordo", {"state_dtype": "bfloat16"}, None, monkeypatch)[2] == 0
    params = {n: p.detach().double().requires_grad_() for n, p in init_params().items()}
    opt = make_optimizer("lordo", [{"params": list(params.values()), "param_names": list(params)}], lr=0.02, rank=4)
    loss({n: p.float() for n, p in params.items()}, 0).backward()
    opt.step()
    assert opt._kernels is None


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
    assert opt._kernels is None and lordo.kernels.build_error().endswith("Ninja is required to load C++ extensions")
    strict = make_optimizer("lordo", [{"params": list(params.values()), "param_names": list(params)}], fused=True)
    with pytest.raises(RuntimeError, match="fused=True, but the CPU kernels could not be built: RuntimeError: Ninja"):
        strict.step()


@pytest.mark.parametrize("matrices", [1, 3])
@pytest.mark.parametrize("transposed", [False, True], ids=["p<q", "stored-transposed"])
def test_kernels_give_the_one_thread_bits_at_two_threads(matrices, transposed):
    """Shapes where a threaded BLAS product rounds differently from a one-thread one (85-row blocks of 1536
    columns): each matrix still goes through one-thread products, alone in its bucket or beside others."""
    ext = lordo.kernels.lowrank_cpu()
    rows, cols, rank = 512, 1536, 32                      # as stored
    side, other = (cols, rows) if transposed else (rows, cols)   # the oriented matrix's p and q

    def run(threads):
        g = torch.Generator().manual_seed(1)
        W, G, R = ([torch.randn(rows, cols, generator=g) for _ in range(matrices)] for _ in range(3))
        Q, N = torch.randn(matrices, side, rank, generator=g), torch.randn(matrices, rank, other, generator=g)
        out = torch.empty(matrices, rank, other)
        block = lordo.optim._cpu_block_rows(W[0])
        with cpu_threads(threads):
            norms = ext.project_and_norm(out, Q, G, transposed, block)
            ext.apply_lowrank(W, G, R, Q, N, transposed, 1e-3, 0.999, [0.1] * matrices, block,
                              lordo.kernels.FUSED_MULTIPLY_ADD)
        return [out, norms, *W, *R]

    one, two = run(1), run(2)
    assert all(torch.equal(a, b) for a, b in zip(one, two))
