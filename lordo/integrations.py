"""LoRDO inside `transformers.Trainer` (and so accelerate), in one process or under torchrun.

    from lordo.integrations import LoRDOTrainer
    trainer = LoRDOTrainer(model=model, args=TrainingArguments(...), train_dataset=ds,
                           lordo_method="lordo", lordo_hparams=dict(rank=0.25, sync_every=16))
    trainer.train()                      # under torchrun: real local steps, averaged every sync_every
    trainer.lordo.comm_stats()           # lordo's bytes (also logged as lordo_payload_bytes)

Under torchrun, Trainer (through accelerate) wraps the model in DistributedDataParallel, which would
average every gradient and leave LoRDO no local steps. LoRDOTrainer builds the optimizer with a
communicator on the process group, turns DDP's gradient all-reduce off
(`lordo.comm.disable_ddp_allreduce`) and, unless `ddp_broadcast_buffers` is set, DDP's per-step buffer
broadcast, and ends training on the averaged model (`LoRDO.finish`). Its checkpoints keep every
worker's state (`lordo-worker<r>-of-<M>.pt` beside Trainer's files), so a resumed run continues bit for
bit; `WorkerState` does the same for `torch.distributed.checkpoint`. transformers is imported here only:
the optimizer does not need it.
"""

from __future__ import annotations

import io
import os
from typing import Any

import torch
import torch.distributed as dist
import transformers
from torch import nn

from lordo.comm import DistComm, disable_ddp_allreduce
from lordo.optim import LoRDO, split_params


def distributed_comm() -> DistComm | None:
    """A communicator on the default process group when it has more than one process, else None."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return DistComm()
    return None


def worker_state(opt: LoRDO) -> dict[str, Any]:
    """What differs between workers: lordo's state (moments, error feedback, anchor) and, between
    synchronizations, the parameters themselves. `load_worker_state` puts it back."""
    return {"optimizer": opt.state_dict(), "params": [p.detach().clone() for p in opt.params]}


@torch.no_grad()
def load_worker_state(opt: LoRDO, state: dict[str, Any]) -> None:
    opt.load_state_dict(state["optimizer"])
    torch._foreach_copy_(opt.params, list(state["params"]))


class WorkerState:
    """Every worker's `worker_state` for `torch.distributed.checkpoint`, under a key of its own
    ("worker<rank>") and as one serialized object:

        dcp.save({"lordo": WorkerState(opt)}, checkpoint_id=path)      # on every worker
        dcp.load({"lordo": WorkerState(opt)}, checkpoint_id=path)      # same number of workers

    A plain `opt.state_dict()` does not round-trip through dcp.save/load: DCP keeps one copy of a tensor
    that every rank saves under the same key (rank 0's moments for everyone), and loads only the keys the
    receiving state dict already has (a fresh optimizer has no projection yet)."""

    def __init__(self, opt: LoRDO):
        self.opt = opt
        self.key = f"worker{opt.comm.rank if opt.comm is not None else 0}"

    def state_dict(self) -> dict[str, Any]:
        blob = io.BytesIO()
        torch.save(worker_state(self.opt), blob)
        blob.seek(0)
        return {self.key: blob}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        blob = state_dict[self.key]     # the BytesIO of state_dict(), refilled by dcp.load
        blob.seek(0)
        load_worker_state(self.opt, torch.load(blob, map_location=self.opt.params[0].device, weights_only=True))


class _Finish(transformers.TrainerCallback):
    def __init__(self, trainer: LoRDOTrainer):
        self.trainer = trainer

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer.lordo.finish()


class LoRDOTrainer(transformers.Trainer):
    """`transformers.Trainer` whose optimizer is `lordo_method` (a name in `lordo.METHODS`).

    The optimizer takes the Trainer's lr, betas, eps, weight decay (on the parameters Trainer
    decays; not on biases and norms) and max_grad_norm (lordo's `clip`), then `lordo_hparams`. Parameters are split by
    `lordo.split_params`; the lr scheduler and gradient accumulation are the Trainer's.
    """

    def __init__(self, *args: Any, lordo_method: str = "lordo", lordo_hparams: dict[str, Any] | None = None,
                 **kwargs: Any):
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if training_args is not None and training_args.ddp_broadcast_buffers is None:
            # DDP would broadcast buffers every forward, bytes lordo does not see; the model's buffers are its own
            training_args.ddp_broadcast_buffers = False
        super().__init__(*args, **kwargs)
        self.lordo_method = lordo_method
        self.lordo_hparams = dict(lordo_hparams or {})
        self.add_callback(_Finish(self))

    @property
    def lordo(self) -> LoRDO:
        """The LoRDO optimizer itself (Trainer's `optimizer` may be accelerate's wrapper of it)."""
        opt = self.optimizer
        return opt if isinstance(opt, LoRDO) else opt.optimizer

    def create_optimizer(self, model: nn.Module | None = None) -> LoRDO:
        if self.optimizer is None:
            model = self.model if model is None else model
            model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
            decay = set(self.get_decay_parameter_names(model))
            groups = []
            for group in split_params(model):
                for decayed in (True, False):
                    keep = [(n, p) for n, p in zip(group["param_names"], group["params"]) if (n in decay) == decayed]
                    if keep:
                        groups.append(dict(params=[p for _, p in keep], param_names=[n for n, _ in keep],
                                           lowrank=group["lowrank"],
                                           weight_decay=self.args.weight_decay if decayed else 0.0))
            args = self.args
            hp = dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                      clip=args.max_grad_norm or None)   # Trainer's 0 or None: no clip
            self.optimizer = LoRDO(groups, self.lordo_method, distributed_comm(), model=model,
                                   **(hp | self.lordo_hparams))
        return self.optimizer

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Any:
        if isinstance(model, nn.parallel.DistributedDataParallel) and self.lordo.comm is not None:
            disable_ddp_allreduce(model)    # before its first backward: lordo synchronizes itself
        return super().training_step(model, inputs, num_items_in_batch)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self.optimizer is not None:
            logs = {**logs, "lordo_payload_bytes": self.lordo.comm_stats()["payload_bytes"]}
        super().log(logs, *args, **kwargs)

    def _worker_file(self, checkpoint: str) -> str:
        return os.path.join(checkpoint, f"lordo-worker{self.args.process_index}-of-{self.args.world_size}.pt")

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)    # optimizer.pt: rank 0's state only
        if self.lordo.comm is not None:
            os.makedirs(output_dir, exist_ok=True)
            torch.save(worker_state(self.lordo), self._worker_file(output_dir))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and self.lordo.comm is not None:
            path = self._worker_file(checkpoint)
            if not os.path.isfile(path):
                raise ValueError(f"checkpoint {checkpoint} has no {os.path.basename(path)}: resume with the number "
                                 "of processes that saved it")
            load_worker_state(self.lordo, torch.load(path, map_location=self.lordo.params[0].device,
                                                     weights_only=True))
