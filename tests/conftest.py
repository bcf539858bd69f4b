"""What the tests share: the small GPT and the float64 toy problem the optimizer is checked on, the prepared
corpus, and the `integration` marker.

    pytest -m "not integration" tests     # the fast unit tests only (`make test` runs every test)

Integration tests start real processes or tools (torchrun ranks, the `lordo` command in a subprocess,
papermill, pip): a module marks itself with `pytestmark = pytest.mark.integration`, a single test with
`@pytest.mark.integration`.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub, which reads it once
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from lordo.comm import run_simulated  # noqa: E402
from lordo.model import GPT, ModelConfig  # noqa: E402
from lordo.optim import make_optimizer  # noqa: E402

# Two layers of every kind of matrix, small enough that a few steps of every method take milliseconds; also
# the model of tests/distributed_worker.py, which torchrun runs as a script.
SMALL_GPT = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=16)


class SmallGPT:
    """SMALL_GPT with per-worker, per-step token batches and hyper-parameters that exercise every part."""

    config = SMALL_GPT
    hp = dict(lr=3e-3, rank=4, sync_every=3, proj_every=2, proj_method="svd")

    def batch(self, rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(1000 * rank + step)
        x = torch.randint(0, self.config.vocab_size, (4, 9), generator=gen)
        return x[:, :-1], x[:, 1:]

    def train_steps(self, model: GPT, opt, rank: int, steps: int, start: int = 0) -> None:
        for step in range(start, start + steps):
            model(*self.batch(rank, step))[1].backward()
            opt.step()
            opt.zero_grad()


class Toy:
    """A two-layer float64 network with per-worker, per-step data, so gradients depend on the parameters and
    differ between workers. Its parameters cover both orientations of a low-rank matrix (p < q and p > q),
    a 2-D parameter kept out of the low-rank path (`lowrank: False`, like an embedding) and a 1-D bias.
    `steps` = 7 with sync_every 3 give two synchronizations and a tail of local steps after the last one."""

    dtype = torch.float64
    steps = 7
    matrices = ("w_in", "w_out")  # 6 x 4 (p > q, handled transposed) and 4 x 7 (p < q)
    base = dict(lr=0.02, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0, rank=2, sync_every=3, clip=None,
                error_feedback=True, moments_on_refresh="keep", proj_every=2, outer_lr=1.0, outer_momentum=0.0)

    def init_params(self) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        shapes = {"emb": (6, 6), "w_in": (6, 4), "w_out": (4, 7), "bias": (7,)}
        return {n: 0.5 * torch.randn(s, generator=g, dtype=self.dtype) for n, s in shapes.items()}

    def loss(self, params: dict[str, torch.Tensor], worker: int, step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(1000 * worker + step)    # drawn on the CPU, used where the params are
        x = torch.randn(8, 6, generator=g, dtype=self.dtype).to(params["emb"].device)
        y = torch.randn(8, 7, generator=g, dtype=self.dtype).to(params["emb"].device)
        h = torch.tanh(x @ params["emb"] @ params["w_in"])
        return ((h @ params["w_out"] + params["bias"] - y) ** 2).mean()

    def grad_fn(self, worker: int, step: int, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The reference's gradient oracle (lordo.reference.reference_train)."""
        leaves = {n: t.detach().requires_grad_() for n, t in params.items()}
        grads = torch.autograd.grad(self.loss(leaves, worker, step), list(leaves.values()))
        return dict(zip(leaves, grads))

    def fast_train(self, method: str, workers: int, steps: int, hp: dict, comm_dtype: str = "float64") -> list:
        """lordo.optim on M simulated workers; each worker's final parameters."""
        def worker(comm):
            params = {n: t.clone().requires_grad_() for n, t in self.init_params().items()}
            groups = [{"params": [p for n, p in params.items() if n != "emb"], "lowrank": True},
                      {"params": [params["emb"]] if "emb" in params else [], "lowrank": False}]
            opt = make_optimizer(method, groups, comm=comm if workers > 1 else None, proj_method="svd",
                                 comm_dtype=comm_dtype, **hp)
            for step in range(steps):
                self.loss(params, comm.rank, step).backward()
                opt.step()
                opt.zero_grad()
            return {n: p.detach().clone() for n, p in params.items()}

        return run_simulated(worker, workers)


@pytest.fixture(scope="session")
def gpt() -> SmallGPT:
    return SmallGPT()


class MatricesOnlyToy(Toy):
    """The toy without its embedding and bias: every parameter is a low-rank matrix, so the optimizer has no
    AdamW parameter at all (a model of bias-free linear layers)."""

    def init_params(self) -> dict[str, torch.Tensor]:
        return {n: t for n, t in super().init_params().items() if n in self.matrices}

    def loss(self, params: dict[str, torch.Tensor], worker: int, step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(1000 * worker + step)
        x = torch.randn(8, 6, generator=g, dtype=self.dtype)
        y = torch.randn(8, 7, generator=g, dtype=self.dtype)
        return ((torch.tanh(x @ params["w_in"]) @ params["w_out"] - y) ** 2).mean()


@pytest.fixture(scope="session")
def toy() -> Toy:
    return Toy()


@pytest.fixture(scope="session")
def matrices_only_toy() -> MatricesOnlyToy:
    return MatricesOnlyToy()


@pytest.fixture(scope="session")
def shakespeare():
    """The default corpus and tokenizer, prepared once (on a fresh clone the first preparation prints its
    progress, which is not what tests of one-line errors read)."""
    from lordo.config import TrainConfig
    from lordo.data import prepare
    return prepare("shakespeare", "bpe", TrainConfig().vocab_size)
