"""lordo in other people's distributed code, as one torchrun rank (gloo):

    torchrun --standalone --nproc-per-node 2 tests/integration_worker.py OUT_DIR

1. a hand-written loop with a DistributedDataParallel model passed to make_optimizer (DDP's
   all-reduce turned off), and the same loop without DDP, 2. a model wrapped in DDP after the
   optimizer was built (refused), 3. transformers.Trainer with LoRDOTrainer, 4. a local method
   built without a communicator (warned).
Saves OUT_DIR/rank{r}.pt: each rank's parameters after every step, lordo's byte counts, the messages.
"""

import sys
import warnings

import torch
import transformers
from torch.nn.parallel import DistributedDataParallel

from lordo import init_distributed, make_optimizer
from lordo.integrations import LoRDOTrainer

SYNC_EVERY, STEPS = 3, 5     # 5 is not a multiple of 3: the run ends with finish()
CONFIG = dict(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=2,
              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)   # no dropout: runs compare bit for bit


def tiny_gpt2(seed: int) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**CONFIG))


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def tokens(rank: int, step: int, n: int = 4) -> torch.Tensor:
    return torch.randint(0, CONFIG["vocab_size"], (n, 16), generator=torch.Generator().manual_seed(100 * rank + step))


def ddp_loop(comm, wrap: bool = True) -> dict:
    model = tiny_gpt2(comm.rank)
    model = DistributedDataParallel(model) if wrap else model
    opt = make_optimizer("lordo", model, comm=comm, lr=1e-2, rank=4, sync_every=SYNC_EVERY)
    history = []
    for step in range(STEPS):
        x = tokens(comm.rank, step)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        history.append(flat(getattr(model, "module", model)))
    opt.finish()
    return {"history": history, "final": flat(getattr(model, "module", model)), "comm": opt.comm_stats()}


def no_communicator_warning() -> str:
    """A local method built without a communicator under torchrun would never synchronize: warned."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_optimizer("lordo", tiny_gpt2(0))
    return " ".join(str(w.message) for w in caught)


def ddp_refused(comm) -> str:
    model = tiny_gpt2(comm.rank)
    opt = make_optimizer("lordo", model, comm=comm, lr=1e-2, rank=4, sync_every=SYNC_EVERY)
    model = DistributedDataParallel(model)     # wrapped after the optimizer was built: DDP averages
    x = tokens(comm.rank, 0)
    model(input_ids=x, labels=x).loss.backward()
    try:
        opt.step()
    except RuntimeError as e:
        return str(e)
    return ""


class Record(transformers.TrainerCallback):
    def __init__(self):
        self.history = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.history.append(flat(model))


def trainer_run(rank: int, out: str) -> dict:
    model = tiny_gpt2(0)
    data = [{"input_ids": x, "labels": x} for x in tokens(0, 99, n=64)]   # DistributedSampler shards it
    record = Record()
    args = transformers.TrainingArguments(output_dir=f"{out}/trainer", max_steps=STEPS, per_device_train_batch_size=2,
                                          learning_rate=1e-2, use_cpu=True, report_to="none", save_strategy="no",
                                          logging_steps=1, disable_tqdm=True, seed=rank)
    trainer = LoRDOTrainer(model=model, args=args, train_dataset=data, callbacks=[record],
                           lordo_hparams=dict(rank=4, sync_every=SYNC_EVERY))
    trainer.train()
    logged = [e["lordo_payload_bytes"] for e in trainer.state.log_history if "lordo_payload_bytes" in e]
    return {"history": record.history, "final": flat(model), "comm": trainer.lordo.comm_stats(), "logged": logged,
            "wrapped": type(trainer.model_wrapped).__name__,
            "broadcast_buffers": trainer.model_wrapped.broadcast_buffers}


if __name__ == "__main__":
    comm, _ = init_distributed("cpu")   # gloo, also on a GPU machine (use_cpu below)
    out = sys.argv[1]
    result = {"ddp_loop": ddp_loop(comm), "plain_loop": ddp_loop(comm, wrap=False), "ddp_refused": ddp_refused(comm),
              "trainer": trainer_run(comm.rank, out), "no_comm": no_communicator_warning()}
    torch.save(result, f"{out}/rank{comm.rank}.pt")
    torch.distributed.destroy_process_group()
