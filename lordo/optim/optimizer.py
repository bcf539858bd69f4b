"""`LoRDO`, the torch.optim surface: construction, `step` (which dispatches to the modules beside
this one), `sync`, checkpoints and accounting."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lordo.comm import disable_ddp_allreduce
from lordo.kinds import check
from lordo.optim import kernel_paths
from lordo.optim import state as state_io
from lordo.optim.adamw import adamw_step
from lordo.optim.clip import clipped_norms, finite_and_clipped
from lordo.optim.lowrank import StepInputs, choose_variant
from lordo.optim.methods import METHODS
from lordo.optim.options import (
    COMM_DTYPES,
    DEFAULTS,
    GROUP_KEYS,
    STATE_DTYPES,
    check_for_method,
    validate_hparams,
)
from lordo.optim.params import (
    GALORE_KEYS,
    galore_key_error,
    lowrank_flags,
    param_names,
    plan_buckets,
    split_params,
)
from lordo.optim.refresh import refresh, refresh_before_step
from lordo.optim.state import Bucket, StateView, rounding_generator, zeros_like_weights
from lordo.optim.sync import Collectives, check_not_averaged, synchronize
from lordo.projection import oriented


class LoRDO(torch.optim.Optimizer):
    """One worker's optimizer for any method in `METHODS` (see `lordo.optim`'s docstring).

    `params`: parameters, `model.named_parameters()`, or param groups (with or without
    `param_names`). Per-group hyper-parameters: lr, betas, eps, weight_decay, rank, omega and
    `lowrank`. Which 2-D parameters are low-rank matrices, first rule that applies:
    1. a group's `lowrank` (True/False);
    2. galore-torch style: if some group gives `rank`, the groups that give it (and no others);
    3. `full_rank_reasons`, from `model` if given, else from the parameters' names; parameters
       without names (and no `model`) are low-rank if 2-D, with one warning listing them.
    galore's other group keys are refused (`GALORE_KEYS` says why). Everything else in
    `DEFAULTS` is global. Parameters without a gradient (`grad=None`, frozen ones) are left
    untouched, as by torch's optimizers. Accounting: `comm_stats()`, `memory_stats()`,
    `projection_seconds`, `comm_seconds`; subspace diagnostics with `diagnostics=True`:
    `pop_diagnostics()`. `lowrank_names`: the low-rank matrices. `finish()` ends a distributed run
    on the averaged model. `model`: the module the parameters belong to, for the rule and,
    distributed, to broadcast rank 0's parameters before its first forward (without it: at the
    first step, after the first gradients).
    `fused`: None (default) runs the low-rank step's full-size work in the compiled CPU kernels
    (`lordo.kernels`) where they apply (float32 on CPU; the same results at any thread count, and
    the eager path's to the last bits) and, per shape, measure faster than the eager path on this
    CPU (timed at the first step, then cached: `lordo.kernels.calibrated`; `step_paths()` says
    which path each shape takes), warning once and running eagerly if they cannot be built; True
    requires them; False never builds them.

    Distributed, the first step checks that the workers' gradients differ: equal ones mean that
    something (DDP) already averaged them, which is refused. Set `refuse_averaged_gradients =
    False` on the optimizer for runs that feed every worker the same data on purpose.
    """

    refuse_averaged_gradients = True

    def __init__(self, params: Iterable[Any], method: str = "lordo", comm: Any = None, *,
                 model: nn.Module | None = None, fused: bool | None = None, **hparams: Any):
        if method not in METHODS:
            raise ValueError(f"method={method!r} is unknown: allowed {sorted(METHODS)}")
        self.method = METHODS[method]
        for key in GALORE_KEYS:
            if key in hparams:
                raise galore_key_error(key, hparams[key])
        hp = {**DEFAULTS, **hparams}
        validate_hparams(hp)
        if hp["omega"] is None:
            hp["omega"] = self.method.omega
        hp["betas"] = tuple(hp["betas"])
        check_for_method(hp, self.method)
        self.hparams = hp
        self.comm = comm
        self.collectives = Collectives(comm, hp)
        self.world_size = self.collectives.world_size
        self.model = model
        check(fused is None or isinstance(fused, bool), "fused", fused, "None, True or False")
        self.fused = fused
        self.kernels: Any = None     # lordo.kernels.lowrank_cpu(), when a bucket can use it
        self._explicit_rank: list[bool] = []   # per group: whether it gave `rank` (galore style)
        self.initialized = False
        super().__init__(params, {k: hp[k] for k in GROUP_KEYS} | {"lowrank": None})
        self._layout()
        if self.method.local and comm is None and dist.is_available() and dist.is_initialized() \
                and dist.get_world_size() > 1:
            warnings.warn(f"lordo: torch.distributed runs {dist.get_world_size()} processes but "
                          f"this {method!r} optimizer has no communicator, so it never "
                          "synchronizes (under DDP it steps on averaged gradients: no local "
                          "steps); pass comm=lordo.comm.DistComm()", stacklevel=2)
        self.steps = 0             # optimizer steps taken (skipped ones included)
        self.skipped_steps = 0     # steps skipped for a non-finite gradient (nonfinite="skip")
        self.refreshes = 0         # projection computations (each seeds its randomized sketch)
        self.projection_seconds = 0.0
        self.diagnostics_bytes = 0  # payload of the diagnostics' own all-reduces (not comm_stats)
        self.synced = False        # whether the last step() ended with a synchronization
        self.diagnostics: list[dict[str, Any]] = []   # subspace records since pop_diagnostics
        # proj_source="gradient": the sync step's gradients
        self.sync_grads: list[torch.Tensor] | None = None
        # this step's per-parameter gradient norms before the clip and the clip's factor
        self.clip_norms: tuple[list[torch.Tensor], float | torch.Tensor] | None = None
        self.aligned = False       # every worker holds rank 0's parameters (initial broadcast)
        if model is not None and self.world_size > 1:
            self._align_before_first_forward(model)

    # ------------------------------------------------------------------ layout
    def _layout(self) -> None:
        """Names, which 2-D parameters are low-rank (see the class docstring), and the buckets."""
        for g in self.param_groups:
            validate_hparams(self.hparams | {k: g[k] for k in GROUP_KEYS})
        self.params: list[torch.Tensor] = [p for g in self.param_groups for p in g["params"]]
        self.names, named = param_names(self.param_groups, self.model)
        self.is_lowrank = lowrank_flags(self.param_groups, self.names, named, self.model,
                                        self._explicit_rank, self.method.lowrank)
        self.lowrank_names = [n for n, low in zip(self.names, self.is_lowrank) if low]
        self.adamw_indices, self.buckets = plan_buckets(self.param_groups, self.is_lowrank,
                                                        self.names)
        group_of = [g for g in self.param_groups for _ in g["params"]]
        by_group = [(g, [i for i in self.adamw_indices if group_of[i] is g])
                    for g in self.param_groups]
        self.adamw_groups = [(g, idx) for g, idx in by_group if idx]

    def init_state(self) -> None:
        """Allocate state on the parameters' devices (lazily, like torch's optimizers) and choose
        each bucket's step variant."""
        hp = self.hparams
        stored = STATE_DTYPES[hp["state_dtype"]]
        for i in self.adamw_indices:
            p = self.params[i]
            self.state[p] = {"exp_avg": torch.zeros_like(p, dtype=stored),
                             "exp_avg_sq": torch.zeros_like(p, dtype=stored)}
        for b in self.buckets:
            p0 = self.params[b.indices[0]]
            n, (rows, cols), dt, t = len(b.indices), b.shape, stored or p0.dtype, b.transposed[0]
            # oriented (n, r, q) moments and workspace and (n, p, q) error feedback, laid out like
            # the weights: the full-size passes are contiguous and Q^T G is a product of
            # operands as they are stored
            b.exp_avg = zeros_like_weights(p0, n, b.rank, cols, t, dt)
            b.exp_avg_sq = zeros_like_weights(p0, n, b.rank, cols, t, dt)
            b.workspace = zeros_like_weights(p0, n, b.rank, cols, t, p0.dtype)
            b.ef = zeros_like_weights(p0, n, rows, cols, t, dt) if hp["error_feedback"] else None
        self.kernels = kernel_paths.build_kernels(self, stored)
        use_kernels = kernel_paths.choose_paths(self, stored)
        for b, kernels in zip(self.buckets, use_kernels):
            b.variant = choose_variant(b, self.params[b.indices[0]], stored is not None,
                                       self.kernels if kernels else None)
        if self.method.local:
            self.anchor = [self._held(p) for p in self.params]
            self.outer_velocity = ([self._held(torch.zeros_like(p)) for p in self.params]
                                   if hp["outer_momentum"] > 0 else None)
        self.adam_steps = 0
        self.adam_step_tensor = torch.zeros((), dtype=torch.float32, device=self.params[0].device)
        self.initialized = True

    def step_paths(self) -> list[dict[str, Any]]:
        """Per bucket of same-shape low-rank matrices: the path its step runs ("kernels
        <instruction set>" or "eager"; None before the first step, which decides it) and why. With
        fused=None on a CPU in float32 the faster of the two on this machine and shape
        (distributed: on worker 0's, for every worker), by `kernel_paths.calibrate`'s seconds per
        step (`kernels_ms`, `eager_ms`: this worker's; `cached`)."""
        return kernel_paths.step_paths(self)

    def align(self) -> None:
        """Like DDP, every worker starts from rank 0's parameters (one broadcast, counted):
        before the model's first forward when the optimizer knows the model, else at the first
        step. Not after loading a checkpoint of a started run, whose workers may legitimately
        differ; a state_dict round trip before the first step (as accelerate does) does not
        skip it."""
        if self.world_size > 1:
            self.collectives.run([p.data for p in self.params], "initial_broadcast",
                                 self.params[0].dtype, broadcast=True)
            if self.method.local and self.initialized:
                torch._foreach_copy_(self.anchor, self.params)
        self.aligned = True

    def _align_before_first_forward(self, model: nn.Module) -> None:
        """So that the first gradients are computed at rank 0's parameters too, as under DDP."""
        def align(*_: Any) -> None:
            handle.remove()
            if not self.aligned:
                with torch.no_grad():
                    self.align()
        handle = model.register_forward_pre_hook(align)

    def _held(self, t: torch.Tensor) -> torch.Tensor:
        """A copy of `t` for state used only at synchronizations: in host memory (pinned for
        fast copies to a GPU) with host_anchor, else beside `t`."""
        if not self.hparams["host_anchor"]:
            return t.detach().clone()
        return torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda).copy_(t)

    def rounding(self, stream: int) -> torch.Generator | None:
        """The random bits of stochastic rounding for `stream` at this step (None in float32).
        Methods that all-reduce gradients keep identical replicas, so their workers draw alike."""
        rank = self.comm.rank if self.comm is not None and self.method.local else 0
        return rounding_generator(self.hparams, rank, self.steps, stream, self.params[0].device)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Works until the first step (or state_dict); after it, refused: the state of same-shape
        matrices is stacked and every worker keeps anchors, which new parameters cannot join
        consistently mid-run. Build a new optimizer with every group instead."""
        if self.initialized:
            raise RuntimeError("add_param_group after the optimizer's state exists (first step or "
                               "state_dict) is not supported: same-shape matrices share stacked "
                               "state; add every group before the first step or build a new "
                               "optimizer")
        for key in GALORE_KEYS:
            if key in param_group and not (key == "proj_type" and param_group[key] == "std"):
                raise galore_key_error(key, param_group[key])
        param_group = {k: v for k, v in param_group.items() if k != "proj_type"}
        self._explicit_rank.append("rank" in param_group)
        super().add_param_group(param_group)
        if hasattr(self, "params"):    # after construction: lay everything out again
            self._layout()

    @property
    def state(self) -> StateView:
        """Every parameter's state, as torch's optimizers expose it: AdamW's dicts, and for a
        low-rank matrix views into its bucket (exp_avg, exp_avg_sq, Q, error_feedback_accum)."""
        return StateView(self)

    @state.setter
    def state(self, value: dict) -> None:
        self.adamw_state = value

    # ------------------------------------------------------------------ accounting
    @property
    def comm_seconds(self) -> float:
        """Time inside collectives (waiting for other workers included)."""
        return self.collectives.seconds

    def comm_stats(self) -> dict[str, Any]:
        """Payload bytes this worker sent, by kind and in total, and the ring wire factor
        2(M-1)/M."""
        m, log = self.world_size, self.collectives.log
        total = sum(b for _, b in log.values())
        return {
            "by_kind": {k: {"collectives": c, "payload_bytes": b} for k, (c, b) in log.items()},
            "payload_bytes": total,
            "collectives": sum(c for c, _ in log.values()),
            "ring_wire_factor": 2 * (m - 1) / m,
            "wire_bytes": total * 2 * (m - 1) / m,
            "per_sync_payload_bytes": self.sync_payload_bytes(),
        }

    def sync_payload_bytes(self) -> int:
        """Payload of one regular collective: a gradient all-reduce (with a has-gradient flag per
        tensor), or one parameter average."""
        flags = 0 if self.method.local else len(self.params)
        itemsize = COMM_DTYPES[self.hparams["comm_dtype"]].itemsize
        return (sum(p.numel() for p in self.params) + flags) * itemsize

    def memory_stats(self, accelerator: bool | None = None) -> dict[str, int]:
        """Bytes of optimizer state on this worker, by kind (from shapes: valid before the first
        step), with `total` split into `device` (held in an accelerator's memory) and `host` (CPU
        memory).

        accelerator: whether the parameters live on an accelerator; None: as they are (a CPU run
        holds everything in host memory). True gives the split this optimizer would have on a
        GPU.
        """
        return state_io.memory_stats(self, accelerator)

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.initialized:
            self.init_state()
        if not self.aligned:
            self.align()
        self.synced = False
        # A parameter without a gradient is untouched (torch.optim's rule): it steps with zeros
        # where the state is stacked and is restored afterwards. Every-step methods share who has
        # one (as DDP does).
        present = [p.grad is not None for p in self.params]
        for name, p in zip(self.names, self.params):
            if p.grad is not None and p.grad.layout != torch.strided:
                raise ValueError(f"parameter {name!r} has a sparse gradient ({p.grad.layout}): "
                                 "allowed dense gradients (nn.Embedding(sparse=False), the "
                                 "default)")
        grads = [p.grad if has else torch.zeros_like(p) for p, has in zip(self.params, present)]
        if self.world_size > 1 and self.steps == 0 and self.refuse_averaged_gradients:
            check_not_averaged(self, grads)
        if not self.method.local:
            flags = torch.tensor(present, dtype=torch.float32, device=self.params[0].device)
            self.collectives.all_reduce_mean(grads + [flags], "gradients")
            present = (flags > 0).tolist()
        finite = finite_and_clipped(self, grads)
        refresh_before_step(self, grads, finite)
        if finite:
            self._adamw_steps(grads, present)
            self._lowrank_steps(grads, present)
        self.steps += 1
        if self.method.local and self.steps % self.hparams["sync_every"] == 0:
            if self.buckets and self.hparams["proj_source"] == "gradient":
                # a worker that skipped the step still joins the projection's all-reduce, with
                # zeros
                self.sync_grads = grads if finite else [torch.zeros_like(g) for g in grads]
            # torch.optim's rule through the synchronization too: in one process nothing is
            # averaged, so a parameter without a gradient keeps its bits (anchor + (p - anchor)
            # may differ from p in the last bit)
            alone = self.world_size == 1
            kept = {i: self.params[i].clone() for i, has in enumerate(present)
                    if alone and not has}
            self.sync()
            for i, p in kept.items():
                self.params[i].copy_(p)
                self.anchor[i].copy_(p)
        return loss

    def _adamw_steps(self, grads: list[torch.Tensor], present: list[bool]) -> None:
        if not self.adamw_indices:
            return
        self.adam_steps += 1
        self.adam_step_tensor.fill_(self.adam_steps)
        rounding = self.rounding(0)
        scale = self.hparams["fullrank_lr_scale"] if self.method.lowrank else 1
        for group, indices in self.adamw_groups:
            indices = [i for i in indices if present[i]]
            if indices:
                params = [self.params[i] for i in indices]
                adamw_step(params, [grads[i] for i in indices], [self.state[p] for p in params],
                           group, group["lr"] * scale, self.adam_steps, self.adam_step_tensor,
                           rounding)

    def _lowrank_steps(self, grads: list[torch.Tensor], present: list[bool]) -> None:
        hp = self.hparams
        # the step before a synchronization records the QH term's size (diagnostics)
        record_step = hp["diagnostics"] and (self.steps + 1) % hp["sync_every"] == 0
        for bi, b in enumerate(self.buckets):
            missing = [j for j, i in enumerate(b.indices) if not present[i]]
            if len(missing) == len(b.indices):
                continue
            kept = [t.clone() for t in self._bucket_rows(b, missing)]
            bucket_grads = [grads[i] for i in b.indices]
            b.variant.step(b, StepInputs(
                weights=[self.params[i] for i in b.indices], grads=bucket_grads,
                qh_scale=hp["qh_scale"], record_step=record_step,
                grad_norms=functools.partial(clipped_norms, self, b, bucket_grads), mu=hp["mu"],
                rounding=self.rounding(1 + bi)))
            if missing:
                torch._foreach_copy_(self._bucket_rows(b, missing), kept)

    def _bucket_rows(self, b: Bucket, rows: list[int]) -> list[torch.Tensor]:
        """The weights and state of some matrices of a bucket (views; clone to keep them)."""
        out = []
        for j in rows:
            out += [self.params[b.indices[j]], b.exp_avg[j], b.exp_avg_sq[j]]
            out += [b.ef[j]] if b.ef is not None else []
        return out

    # ------------------------------------------------------------------ projections
    def stacked(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each bucket's matrices of `tensors` (indexed like self.params), oriented and stacked."""
        return [torch.stack([oriented(tensors[i], t) for i, t in zip(b.indices, b.transposed)])
                for b in self.buckets]

    def refresh(self, sources: list[torch.Tensor], own: list[torch.Tensor] | None = None) -> None:
        """Set each bucket's Q from its stacked source (`lordo.optim.refresh.refresh`)."""
        refresh(self, sources, own)

    def pop_diagnostics(self) -> list[dict[str, Any]]:
        """Subspace records since the last call, one per matrix and projection refresh."""
        out, self.diagnostics = self.diagnostics, []
        return out

    # ------------------------------------------------------------------ synchronization
    @torch.no_grad()
    def sync(self) -> None:
        """Average parameters (local methods); refresh Q from the pseudo-gradient. Idempotent per
        step."""
        if not self.method.local or self.synced:
            return
        if not self.initialized:
            self.init_state()
        if not self.aligned:
            self.align()
        synchronize(self)
        self.synced = True

    def finish(self) -> None:
        """End a run on the averaged model: synchronize now unless the last step did (local
        methods; nothing to do for ddp and lowrank_ddp). Call it on every worker after the last
        step."""
        if self.method.local and self.steps > 0:
            self.sync()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything as tensors and plain values: loads with `torch.load(weights_only=True)`.
        torch's state_dict hooks (`register_state_dict_pre_hook`, ...) run as in torch."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        if not self.initialized:
            self.init_state()
        saved = state_io.state_dict(self)
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, saved)
            saved = saved if result is None else result
        return saved

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a `state_dict()`; every tensor's shape is checked before anything changes."""
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            state_dict = state_dict if result is None else result
        state_io.load_state_dict(self, state_dict)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)


def make_optimizer(method: str, model_or_param_groups: nn.Module | Iterable[Any],
                   comm: Any = None, **hparams: Any) -> LoRDO:
    """The optimizer for `method` (a name in `METHODS`) with hyper-parameters overriding
    `DEFAULTS`.

    Given a module, its parameters are split by `split_params` (the rule of `full_rank_reasons`:
    embeddings, tied weights and output heads stay full-rank). Given parameters or param groups,
    the rules of `LoRDO` apply. Given a `DistributedDataParallel` model and a communicator, DDP's
    gradient all-reduce is turned off (`lordo.comm.disable_ddp_allreduce`): lordo synchronizes
    itself.
    """
    model = model_or_param_groups
    if isinstance(model, nn.parallel.DistributedDataParallel):
        if comm is not None:
            disable_ddp_allreduce(model)
        model = model.module
    if isinstance(model, nn.Module):
        return LoRDO(split_params(model), method, comm, model=model, **hparams)
    return LoRDO(model, method, comm, **hparams)
