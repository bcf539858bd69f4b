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
broadcast, and ends training on the averaged model (`LoRDO.finish`). transformers is imported here only:
the optimizer does not need it.
"""

from __future__ import annotations

from typing import Any

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
