"""Checkpoints that keep every worker's state, as one torchrun rank (gloo):

    torchrun --standalone --nproc-per-node 2 tests/checkpoint_worker.py OUT_DIR

1. LoRDOTrainer saving at step 4 (sync_every=3: between synchronizations, when the workers differ) and
   resuming to step 8, against the uninterrupted run; 2. the same with a hand-written loop and
   torch.distributed.checkpoint (`WorkerState`); 3. get/set_optimizer_state_dict; 4. an FSDP2
   (`fully_shard`) model, refused.
Saves OUT_DIR/rank{r}.pt.
"""

import sys

import torch
import torch.distributed.checkpoint as dcp
import transformers
from integration_worker import Record, flat, tiny_gpt2, tokens
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from lordo import init_distributed, make_optimizer
from lordo.integrations import LoRDOTrainer, WorkerState

SYNC_EVERY, SAVE_AT, STEPS = 3, 4, 8


def trainer_resume(out: str) -> dict:
    def run(resume=None):
        model, record = tiny_gpt2(0), Record()
        data = [{"input_ids": x, "labels": x} for x in tokens(0, 99, n=64)]
        args = transformers.TrainingArguments(output_dir=f"{out}/trainer", max_steps=STEPS, save_steps=SAVE_AT,
                                              per_device_train_batch_size=2, learning_rate=1e-2, use_cpu=True,
                                              report_to="none", disable_tqdm=True, seed=0)
        trainer = LoRDOTrainer(model=model, args=args, train_dataset=data, callbacks=[record],
                               lordo_hparams=dict(rank=4, sync_every=SYNC_EVERY))
        trainer.train(resume_from_checkpoint=resume)
        return record.history

    full = run()
    return {"full": full, "resumed": run(f"{out}/trainer/checkpoint-{SAVE_AT}")}


def loop(comm, opt, model, start: int, stop: int) -> list[torch.Tensor]:
    history = []
    for step in range(start, stop):
        x = tokens(comm.rank, step)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        history.append(flat(model))
    return history


def build():
    model = tiny_gpt2(0)
    return model, make_optimizer("lordo", model, comm=comm, lr=1e-2, rank=4, sync_every=SYNC_EVERY)


def dcp_resume(comm, out: str) -> dict:
    model, opt = build()
    loop(comm, opt, model, 0, SAVE_AT)
    dcp.save({"lordo": WorkerState(opt)}, checkpoint_id=f"{out}/dcp")
    full = loop(comm, opt, model, SAVE_AT, STEPS)
    model, opt = build()
    dcp.load({"lordo": WorkerState(opt)}, checkpoint_id=f"{out}/dcp")
    return {"full": full, "resumed": loop(comm, opt, model, SAVE_AT, STEPS)}


def state_round_trips(comm, out: str) -> dict:
    model, opt = build()
    loop(comm, opt, model, 0, SAVE_AT)
    model2, opt2 = build()
    set_optimizer_state_dict(model2, opt2, get_optimizer_state_dict(model, opt))
    return {"original": opt.state_dict(), "get_set": opt2.state_dict()}


def fsdp_refused() -> str:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = tiny_gpt2(0)
    fully_shard(model, mesh=init_device_mesh("cpu", (2,)))
    try:
        make_optimizer("lordo", model, comm=comm)
    except ValueError as e:
        return str(e)
    return ""


if __name__ == "__main__":
    comm, _ = init_distributed("cpu")
    out = sys.argv[1]
    result = {"trainer": trainer_resume(out), "dcp": dcp_resume(comm, out), "round_trips": state_round_trips(comm, out),
              "fsdp": fsdp_refused()}
    torch.save(result, f"{out}/rank{comm.rank}.pt")
    torch.distributed.destroy_process_group()
