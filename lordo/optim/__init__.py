"""LoRDO and every method the paper compares, as one drop-in `torch.optim.Optimizer`.

    opt = lordo.make_optimizer("lordo", model, comm=comm, lr=3e-3, rank=8, sync_every=16)
    for x, y in batches:
        model(x, y)[1].backward()
        opt.step()          # local step; every `sync_every` steps also the synchronization
        opt.zero_grad()
    opt.finish()            # end on the averaged model

One worker's view: with `comm=None` it is an ordinary single-process optimizer (M = 1); with a
communicator (`lordo.comm`) it talks to the other M - 1 workers itself, so no DDP wrapper is
needed. The algorithm is `../shared/spec/lordo-method.md`; `lordo/reference.py` is a plain
transcription of it that the tests hold this implementation to.

Methods (`METHODS`): `ddp` and `lowrank_ddp` all-reduce gradients every step; `local_adam`,
`lordo_local`, `lordo_global` and `lordo` take local steps and average parameters every
`sync_every` steps. Low-rank methods give each 2-D weight ("matrix") a low-rank Adam step with
error feedback in a projection Q, plus for `lordo` a full-rank quasi-hyperbolic term; every
other parameter takes AdamW with the same betas.

The package, by concern:
    methods.py       the methods (`Method`, `METHODS`)
    options.py       the options, one row each (`OPTIONS`, `DEFAULTS`, `validate_hparams`)
    params.py        which parameters are low-rank (`full_rank_reasons`), their buckets
    state.py         the state's layout, stochastic rounding, `state_dict`, memory accounting
    lowrank.py       one bucket's low-rank step: one function per variant (eager, compiled, bf16)
    kernel_paths.py  whether a bucket steps in the compiled kernels or eager: the faster here
    adamw.py         the AdamW step of the other parameters
    clip.py          the gradients' clip and non-finite rule (norms beside Q^T G)
    refresh.py       the projection Q's refresh and its subspace diagnostics
    sync.py          collectives and the local methods' outer synchronization
    optimizer.py     `LoRDO` (the torch.optim surface, bookkeeping) and `make_optimizer`

How the low-rank step stays cheap. Same-shape matrices of a param group share stacked state (no
per-parameter host syncs). Error feedback is kept lazily: while Q is fixed, Q^T E = 0 after every
step, so the low-rank gradient is just Q^T G and the buffer only needs R += G; the true
E = (I - Q Q^T) R is formed when Q changes. That is two rank-r matmuls a step instead of three,
with the same arithmetic as the spec's recurrence. Each matrix's full-size tensors are visited
twice a step, in their stored layouts: Q^T G (on a CPU beside the clip's norm of G:
`lowrank.project_and_norm`), then one sweep that adds G to R and -lr Q N (weight decay as the
product's beta) and the QH term to W (`lowrank.apply_lowrank_`). On a one-thread CPU a visit goes
by blocks of rows that stay in cache between its operations, so from memory G is read twice and
R and W once each read and written: 6 full-size passes, against 7 for fused AdamW (one pass after
another, as before, made 10, 12 with weight decay). On a CPU in float32 both visits, and the
low-rank moments between them, run in compiled kernels (`lordo.kernels`, built on first use;
`fused=False` keeps the eager path, `fused=True` insists on the kernels): each reads a matrix
from memory once and computes its rank-r product in registers on the way, where the eager path's
BLAS products and element-wise passes read it separately (a quarter off the step). Their sums go
in a fixed order, so their results do not depend on the thread count or the instruction set;
they round differently from the eager path in the last bits.

Memory options. `state_dtype="bfloat16"` stores every moment (low-rank and AdamW) and the error
feedback in bfloat16: the arithmetic stays in the parameters' precision (float32 or wider) and
only what is kept between steps is rounded, stochastically (`stochastic_round_`), so the rounding
adds noise but no bias to the error feedback's running sums. The random bits come from (seed,
step, and for local methods the worker's rank), so simulated and torchrun runs and resumed ones
stay bit-identical and gradient-all-reduce replicas identical. The error feedback is then kept
eagerly (E itself, one more rank-r matmul a step): the lazy R grows with every step between
refreshes and its rounding noise with it. `host_anchor=True` keeps the local methods' anchor copy
(and outer momentum) in host memory, pinned on GPUs, and copies it to the device only inside
`sync()`; on CPU it already is host memory. `memory_stats()` says which bytes are where.
"""

from lordo.kinds import check
from lordo.optim.methods import METHODS, Method
from lordo.optim.optimizer import LoRDO, make_optimizer
from lordo.optim.options import (
    COMM_DTYPES,
    DEFAULTS,
    EF_ON_SYNC,
    GROUP_KEYS,
    MEMORY_OPTIONS,
    MOMENT_AVERAGING,
    MOMENT_RULES,
    NONFINITE_RULES,
    OPTIONS,
    PROJ_SOURCES,
    QH_SCALES,
    STATE_DTYPES,
    Option,
    is_rank,
    validate_hparams,
)
from lordo.optim.params import full_rank_reasons, resolve_rank, split_params
from lordo.optim.state import stochastic_round_
from lordo.optim.sync import COHERENCE_FIELDS, FULL_RANK_RECORD

__all__ = [
    "COHERENCE_FIELDS", "COMM_DTYPES", "DEFAULTS", "EF_ON_SYNC", "FULL_RANK_RECORD", "GROUP_KEYS",
    "MEMORY_OPTIONS", "METHODS", "MOMENT_AVERAGING", "MOMENT_RULES",
    "NONFINITE_RULES", "OPTIONS", "PROJ_SOURCES", "QH_SCALES", "STATE_DTYPES", "LoRDO", "Method",
    "Option", "check", "full_rank_reasons", "is_rank", "make_optimizer", "resolve_rank",
    "split_params", "stochastic_round_", "validate_hparams",
]
