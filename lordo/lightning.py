"""LoRDO in a Lightning (`lightning` 2.x) run with its DDP strategy: one callback.

    class Model(L.LightningModule):
        def configure_optimizers(self):
            return make_optimizer("lordo", self, comm=distributed_comm(), rank=0.25, sync_every=16)

    L.Trainer(accelerator="cpu", devices=2, strategy="ddp", callbacks=[LoRDOCallback()]).fit(Model(), data)

Lightning wraps the module in DistributedDataParallel, which would average every gradient: the callback
turns that all-reduce off before the first batch (`lordo.comm.disable_ddp_allreduce`), so lordo takes real
local steps and synchronizes itself, and ends training on the averaged model (`LoRDO.finish`). Needs the
optional extra: `pip install "lordo[lightning]"`.
"""

from __future__ import annotations

import lightning as L
from torch import nn

from lordo.comm import disable_ddp_allreduce
from lordo.optim import LoRDO


def _lordo_optimizers(trainer: L.Trainer) -> list[LoRDO]:
    return [getattr(o, "optimizer", o) for o in trainer.optimizers if isinstance(getattr(o, "optimizer", o), LoRDO)]


class LoRDOCallback(L.Callback):
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        wrapped = trainer.strategy.model
        if isinstance(wrapped, nn.parallel.DistributedDataParallel) and any(
                o.comm is not None for o in _lordo_optimizers(trainer)):
            disable_ddp_allreduce(wrapped)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for opt in _lordo_optimizers(trainer):
            opt.finish()
