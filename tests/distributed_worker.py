"""Every method on a small GPT, as one worker of a group: the same code in threads and processes.

    torchrun --standalone --nproc-per-node 2 tests/distributed_worker.py OUT_DIR COMM_DTYPE STATE_DTYPE

saves each rank's results to OUT_DIR/rank{r}.pt; `run_methods` is what `run_simulated` runs.
"""

import sys

import torch
from conftest import SMALL_GPT

from lordo import METHODS, init_distributed, make_optimizer
from lordo.model import GPT

CFG = SMALL_GPT   # tests/conftest.py
HP = dict(lr=3e-3, rank=4, sync_every=3, proj_every=3, proj_method="randomized", diagnostics=True)
STEPS = 7


def run_methods(comm, comm_dtype: str, state_dtype: str) -> dict[str, dict]:
    """Train each method STEPS steps on this worker's own random tokens; return what to compare."""
    torch.set_num_threads(1)
    out = {}
    for method in METHODS:
        model = GPT(CFG, seed=comm.rank)     # different seeds: the optimizer's broadcast must align them
        opt = make_optimizer(method, model, comm=comm, comm_dtype=comm_dtype, state_dtype=state_dtype, **HP)
        gen = torch.Generator().manual_seed(comm.rank)
        for _ in range(STEPS):
            x = torch.randint(0, CFG.vocab_size, (4, 9), generator=gen)
            model(x[:, :-1], x[:, 1:])[1].backward()
            opt.step()
            opt.zero_grad()
        opt.sync()
        out[method] = {"params": {k: v.clone() for k, v in model.state_dict().items()},
                       "Q": [b.Q.clone() for b in opt.buckets], "comm": opt.comm_stats(),
                       "diagnostics": opt.pop_diagnostics()}
    return out


if __name__ == "__main__":
    comm, _ = init_distributed("cpu")   # gloo, also on a GPU machine
    torch.save(run_methods(comm, sys.argv[2], sys.argv[3]), f"{sys.argv[1]}/rank{comm.rank}.pt")
    torch.distributed.destroy_process_group()
