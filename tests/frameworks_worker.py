"""lordo with accelerate and Lightning, as one torchrun rank (gloo):

    torchrun --standalone --nproc-per-node 2 tests/frameworks_worker.py OUT_DIR {accelerate,lightning}

Each framework trains the tiny GPT-2 of integration_worker on the same per-rank batches as a plain loop
without any wrapper (`plain`): 1. `Accelerator().prepare` (DDP) and `disable_ddp_allreduce`, the README's
recipe; 2. Lightning's DDP strategy on 2 CPU processes with `lordo.lightning.LoRDOCallback`.
Saves OUT_DIR/rank{r}.pt: each rank's parameters after every step, per framework.
"""

import sys

import torch
from integration_worker import SYNC_EVERY, flat, tiny_gpt2, tokens

from lordo import init_distributed, make_optimizer
from lordo.comm import disable_ddp_allreduce
from lordo.integrations import distributed_comm

STEPS = 5
HP = dict(lr=1e-2, rank=4, sync_every=SYNC_EVERY)


def plain(comm) -> list[torch.Tensor]:
    model = tiny_gpt2(0)
    opt = make_optimizer("lordo", model, comm=comm, **HP)
    history = []
    for step in range(STEPS):
        x = tokens(comm.rank, step)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        history.append(flat(model))
    opt.finish()
    return history + [flat(model)]


def with_accelerate(rank: int) -> list[torch.Tensor]:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = tiny_gpt2(0)
    opt = make_optimizer("lordo", model, comm=distributed_comm(), **HP)
    ddp_model, opt = accelerator.prepare(model, opt)
    disable_ddp_allreduce(ddp_model)                 # lordo synchronizes itself
    history = []
    for step in range(STEPS):
        x = tokens(rank, step)
        accelerator.backward(ddp_model(input_ids=x, labels=x).loss)
        opt.step()
        opt.zero_grad()
        history.append(flat(model))
    opt.optimizer.finish()
    return history + [flat(model)]


def with_lightning(rank: int, out: str) -> list[torch.Tensor]:
    import lightning as L

    from lordo.lightning import LoRDOCallback

    class Model(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.gpt = tiny_gpt2(0)
            self.history = []

        def training_step(self, batch, batch_idx):
            x = tokens(rank, batch_idx)                 # the plain loop's batches, whatever the sampler gives
            return self.gpt(input_ids=x, labels=x).loss

        def on_train_batch_end(self, outputs, batch, batch_idx):
            self.history.append(flat(self.gpt))

        def configure_optimizers(self):
            return make_optimizer("lordo", self, comm=distributed_comm(), **HP)

    module = Model()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=STEPS, callbacks=[LoRDOCallback()],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=out)
    trainer.fit(module, torch.utils.data.DataLoader(torch.arange(4 * STEPS), batch_size=1))
    return module.history + [flat(module.gpt)]


if __name__ == "__main__":
    comm, _ = init_distributed("cpu")
    out = sys.argv[1]
    framework = sys.argv[2]
    ran = with_accelerate(comm.rank) if framework == "accelerate" else with_lightning(comm.rank, out)
    result = {"plain": plain(comm), framework: ran}
    torch.save(result, f"{out}/rank{comm.rank}.pt")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
