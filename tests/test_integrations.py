"""lordo in other people's training code: real transformers models (tiny configs, no download),
every way of passing parameters, torch.optim's conventions, transformers.Trainer and DDP."""

import io
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from integration_worker import CONFIG, SYNC_EVERY

from lordo import METHODS, LoRDO, make_optimizer, run_simulated
from lordo.integrations import LoRDOTrainer

WORKER = Path(__file__).with_name("integration_worker.py")


def gpt2():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**CONFIG))


def gpt2_wide_vocab():
    """vocab = 4 x width, as in the README's example: the MLP's Conv1D weights (stored in x out) have the
    vocabulary's size on one side, and stay low-rank matrices."""
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**CONFIG | dict(vocab_size=4 * CONFIG["n_embd"])))


def llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False))


def classifier():
    torch.manual_seed(0)
    return transformers.GPT2ForSequenceClassification(transformers.GPT2Config(
        vocab_size=96, n_positions=32, n_embd=64, n_layer=2, n_head=2, num_labels=2, pad_token_id=0))


def block_matrices(model) -> set[str]:
    """The expected low-rank matrices: the 2-D weights inside the repeated blocks, nothing else."""
    return {n for n, p in model.named_parameters() if p.ndim == 2 and any(c.isdigit() for c in n.split("."))}


def hf_groups(model, names: bool):
    """The decay / no-decay groups transformers.Trainer (and most scripts) build."""
    decay = [(n, p) for n, p in model.named_parameters() if p.ndim >= 2]
    rest = [(n, p) for n, p in model.named_parameters() if p.ndim < 2]
    groups = [{"params": [p for _, p in g], "weight_decay": wd} for g, wd in ((decay, 0.1), (rest, 0.0))]
    if names:
        for group, g in zip(groups, (decay, rest)):
            group["param_names"] = [n for n, _ in g]
    return groups


WAYS = {
    "module": lambda m: make_optimizer("lordo", m),
    "named_parameters": lambda m: LoRDO(m.named_parameters()),
    "make_optimizer(named_parameters)": lambda m: make_optimizer("lordo", m.named_parameters()),
    "groups with param_names": lambda m: LoRDO(hf_groups(m, names=True)),
    "groups of named_parameters": lambda m: LoRDO([{"params": [(n, p) for n, p in m.named_parameters()
                                                               if p.ndim >= 2]},
                                                   {"params": [(n, p) for n, p in m.named_parameters()
                                                               if p.ndim < 2], "weight_decay": 0.0}]),
    "groups without names + model": lambda m: LoRDO(hf_groups(m, names=False), model=m),
}


@pytest.mark.parametrize("build", [gpt2, gpt2_wide_vocab, llama, classifier])
@pytest.mark.parametrize("way", WAYS)
def test_one_classification_rule_for_every_way_of_passing_parameters(build, way):
    model = build()
    with warnings.catch_warnings():
        warnings.simplefilter("error")                      # names are available: no warning
        opt = WAYS[way](model)
    assert set(opt.lowrank_names) == block_matrices(model)
    if build is classifier:
        assert model.score.weight.shape == (2, 64)       # the classification head stays full-rank


def test_without_names_one_warning_lists_what_was_made_lowrank():
    model = llama()
    with pytest.warns(UserWarning, match=r"without names.*group0.param0 \(96, 32\)") as caught:
        opt = LoRDO(model.parameters())
    assert len(caught) == 1 and len(opt.lowrank_names) == len(block_matrices(model)) + 2   # + embedding, head


def test_galore_group_keys_are_honoured_or_refused():
    model = llama()
    target = [p for n, p in model.named_parameters() if "layers" in n and p.ndim == 2]
    rest = [p for p in model.parameters() if all(p is not t for t in target)]
    opt = LoRDO([{"params": rest}, {"params": target, "rank": 4, "proj_type": "std"}])   # galore's convention
    assert [b.rank for b in opt.buckets] == [4] * len(opt.buckets)
    assert sum(len(b.indices) for b in opt.buckets) == len(target)
    for key, value in (("update_proj_gap", 200), ("scale", 0.25), ("proj_type", "left")):
        with pytest.raises(ValueError, match=f"galore-torch key {key}={value!r} is not supported: ") as err:
            LoRDO([{"params": rest}, {"params": target, "rank": 4, key: value}])
        assert "\n" not in str(err.value)
        with pytest.raises(ValueError, match=f"galore-torch key {key}="):
            LoRDO(model.named_parameters(), **{key: value})


@pytest.mark.parametrize("method", sorted(METHODS))
def test_parameters_without_gradient_are_untouched(method):
    """A frozen matrix in a stacked bucket, a frozen norm and a matrix whose grad is None on every
    worker stay bit-identical through steps and synchronizations, as with torch's optimizers."""
    models = [llama(), llama()]      # built here: threads share torch's global generator

    def worker(comm):
        model = models[comm.rank]
        model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)   # shares a bucket with k, v, o
        model.model.layers[1].input_layernorm.weight.requires_grad_(False)
        unused = model.model.layers[1].mlp.up_proj.weight
        frozen = [model.model.layers[0].self_attn.q_proj.weight, model.model.layers[1].input_layernorm.weight, unused]
        before = [p.detach().clone() for p in frozen]
        opt = LoRDO(model.named_parameters(), method, comm, lr=1e-2, rank=4, sync_every=2, weight_decay=0.1)
        for step in range(5):
            x = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(10 * comm.rank + step))
            model(input_ids=x, labels=x).loss.backward()
            unused.grad = None
            opt.step()
            opt.zero_grad()
        opt.finish()
        moved = model.model.layers[0].self_attn.k_proj.weight
        return [torch.equal(a, b) for a, b in zip(before, frozen)], moved.detach().clone()

    results = run_simulated(worker, 2)
    for untouched, _ in results:
        assert untouched == [True, True, True]
    assert not torch.equal(results[0][1], llama().model.layers[0].self_attn.k_proj.weight)   # the rest trained


@pytest.mark.parametrize("outer", [dict(), dict(outer_lr=0.7, outer_momentum=0.9)], ids=["plain", "outer optimizer"])
def test_gradient_gone_at_the_synchronization_keeps_its_bits(outer):
    """One process, no communicator: a matrix and a norm with gradients for three steps and none at the fourth,
    the synchronizing step, keep exactly their values after the third step, as torch.optim leaves them."""
    model = llama()
    opt = LoRDO(model.named_parameters(), "lordo", lr=1e-2, rank=4, sync_every=4, **outer)
    gone = [model.model.layers[1].mlp.up_proj.weight, model.model.layers[1].post_attention_layernorm.weight]
    for step in range(4):
        x = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(step))
        model(input_ids=x, labels=x).loss.backward()
        if step == 3:
            before = [p.detach().clone() for p in gone]
            for p in gone:
                p.grad = None
        opt.step()
        opt.zero_grad()
    assert opt.synced and all(torch.equal(a, p) for a, p in zip(before, gone))
    assert opt.comm_stats()["payload_bytes"] == opt.comm_stats()["collectives"] == 0   # nothing was sent


@pytest.mark.parametrize("max_grad_norm, clip", [(0.0, None), (0.5, 0.5), (1.0, 1.0)])
def test_trainer_passes_max_grad_norm_as_the_clip(tmp_path, max_grad_norm, clip):
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_grad_norm=max_grad_norm, use_cpu=True,
                                          report_to="none")
    trainer = LoRDOTrainer(model=gpt2(), args=args, lordo_hparams=dict(rank=4))
    assert trainer.create_optimizer().hparams["clip"] == clip
    assert LoRDOTrainer(model=gpt2(), args=args, lordo_hparams=dict(rank=4, clip=2.0)).create_optimizer()\
        .hparams["clip"] == 2.0                                   # lordo_hparams has the last word


def test_optimizer_protocol():
    model = llama()
    opt = make_optimizer("lordo", model, rank=4)
    q = model.model.layers[0].self_attn.q_proj.weight
    assert len(opt.state) == 0 and opt.state[q] == {}        # no state before the first step, as in torch
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("save_pre"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("save_post"))
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load_pre"))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load_post"))
    x = torch.randint(0, 96, (2, 8))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    saved = opt.state_dict()
    opt.load_state_dict(saved)
    assert calls == ["save_pre", "save_post", "load_pre", "load_post"]
    params = list(model.parameters())
    assert len(opt.state) == len(params) and all(len(opt.state[p]) > 0 for p in params)
    assert opt.state[q]["exp_avg"].shape == (4, 32) and opt.state[q]["Q"].shape == (32, 4)
    with pytest.raises(RuntimeError, match="add_param_group after the optimizer's state exists"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))]})
    late = make_optimizer("lordo", llama(), rank=4)
    extra = torch.nn.Parameter(torch.randn(32, 40))
    late.add_param_group({"params": [extra], "param_names": ["extra"], "rank": 2})   # before the first step: works
    assert "extra" in late.lowrank_names and any(b.rank == 2 for b in late.buckets)
    older = {**saved, "param_groups": [{k: v for k, v in g.items() if k != "lordo"} for g in saved["param_groups"]],
             "lordo": saved["param_groups"][0]["lordo"]}        # checkpoints written before: counters at the top
    again = make_optimizer("lordo", model, rank=4)
    again.load_state_dict(older)
    assert again.steps == 1 and "lordo" not in again.param_groups[0]
    assert all(torch.equal(v, opt.state[q][k]) if torch.is_tensor(v) else v == opt.state[q][k]
               for k, v in again.state[q].items())
    other = make_optimizer("lordo", llama(), rank=8)
    with pytest.raises(ValueError, match="checkpoint has rank 4 for parameter "
                                         "'model.layers.0.self_attn.q_proj.weight', this optimizer rank 8"):
        other.load_state_dict(saved)


@pytest.mark.parametrize("given", ["module", "named_parameters"])
def test_state_dict_round_trip_keeps_the_initial_broadcast(given):
    """accelerate saves and loads the fresh optimizer's state: workers must still start from rank 0's model
    (broadcast before the first forward when the optimizer knows the module, else at the first step)."""
    models = [llama(), llama()]
    with torch.no_grad():
        for p in models[1].parameters():
            p.add_(1.0)                 # rank 1 starts elsewhere

    def worker(comm):
        model = models[comm.rank]
        opt = make_optimizer("lordo", model if given == "module" else model.named_parameters(), comm=comm, rank=4)
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        buf.seek(0)
        opt.load_state_dict(torch.load(buf, weights_only=True))
        x = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(comm.rank))
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.finish()
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), opt.comm_stats()

    (a, stats), (b, _) = run_simulated(worker, 2)
    assert torch.equal(a, b) and stats["by_kind"]["initial_broadcast"]["collectives"] == 1


def test_trainer_single_process(tmp_path):
    """Trains, logs lordo's bytes, and resumes from a checkpoint to the same model."""
    data = [{"input_ids": x, "labels": x} for x in torch.randint(0, 96, (16, 16), generator=torch.Generator()
                                                                  .manual_seed(0))]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=4,
                                          learning_rate=1e-2, use_cpu=True, report_to="none", save_steps=4,
                                          logging_steps=1, disable_tqdm=True)

    def run(resume=None):
        model = gpt2()
        t = LoRDOTrainer(model=model, args=args, train_dataset=data, lordo_hparams=dict(rank=4, sync_every=4))
        t.train(resume_from_checkpoint=resume)
        return t, model

    trainer, model = run()
    resumed, resumed_model = run(resume=str(tmp_path / "checkpoint-4"))
    assert resumed.lordo.steps == 8
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), resumed_model.state_dict().values()))
    opt = trainer.lordo
    assert isinstance(opt, LoRDO) and opt.comm is None and opt.steps == 8
    assert set(opt.lowrank_names) == block_matrices(model)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses[-1] < losses[0]
    logged = [e["lordo_payload_bytes"] for e in trainer.state.log_history if "lordo_payload_bytes" in e]
    assert logged[-1] == opt.comm_stats()["payload_bytes"] == 0   # one process sends nothing


@pytest.mark.integration
def test_under_torchrun_ddp_and_trainer_take_local_steps(tmp_path):
    """2 gloo processes: ranks differ between synchronizations and are equal after (sync_every=3,
    5 steps: equal after step 3 and after finish()); lordo counts its bytes; a model wrapped in
    DDP behind the optimizer's back is refused with a message that says what to do, and a local method
    built without a communicator is warned about."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(WORKER),
           str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
                               "PYTHONPATH": str(WORKER.parent.parent)})
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for run in ("ddp_loop", "trainer"):
        a, b = ranks[0][run], ranks[1][run]
        equal = [torch.equal(x, y) for x, y in zip(a["history"], b["history"])]
        assert equal == [(step + 1) % SYNC_EVERY == 0 for step in range(5)], run
        assert torch.equal(a["final"], b["final"]), run
        kinds = a["comm"]["by_kind"]
        assert kinds["sync"]["collectives"] == 2 and kinds["sync"]["payload_bytes"] == 2 * a["final"].numel() * 4
    for r in ranks:     # DDP with its all-reduce off changes nothing: each worker's own gradients, unscaled
        assert all(torch.equal(a, b) for a, b in zip(r["ddp_loop"]["history"], r["plain_loop"]["history"]))
    assert ranks[0]["trainer"]["wrapped"] == "DistributedDataParallel" and not ranks[0]["trainer"]["broadcast_buffers"]
    logged, sync_bytes = ranks[0]["trainer"]["logged"], ranks[0]["trainer"]["final"].numel() * 4
    assert logged[2] - logged[1] == sync_bytes       # the step-3 synchronization, in Trainer's logs
    for r in ranks:
        assert r["ddp_refused"].startswith("lordo: the first gradients are identical on all 2 workers")
        assert "lordo.integrations.LoRDOTrainer" in r["ddp_refused"] and "\n" not in r["ddp_refused"]
        assert "torch.distributed runs 2 processes but this 'lordo' optimizer has no communicator" in r["no_comm"]


@pytest.mark.integration
def test_distributed_checkpoints_keep_every_workers_state(tmp_path):
    """2 gloo processes (tests/checkpoint_worker.py), saved at step 4 of 8 with sync_every=3, when the workers
    differ: LoRDOTrainer and torch.distributed.checkpoint (WorkerState) resume bit for bit on each worker;
    get/set_optimizer_state_dict round-trip lordo's state; an FSDP2 model is refused in one line."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(WORKER.with_name("checkpoint_worker.py")), str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
                               "PYTHONPATH": str(WORKER.parent.parent)})
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert sorted(p.name for p in (tmp_path / "trainer" / "checkpoint-4").glob("lordo-worker*")) == [
        "lordo-worker0-of-2.pt", "lordo-worker1-of-2.pt"]
    for r in ranks:
        for run in ("trainer", "dcp"):
            full, resumed = r[run]["full"], r[run]["resumed"]
            assert len(resumed) == 4 and all(torch.equal(a, b) for a, b in zip(full[-4:], resumed)), run
        original, loaded = r["round_trips"]["original"], r["round_trips"]["get_set"]
        assert original["param_groups"] == loaded["param_groups"]          # lordo's counters ride in group 0
        assert original["state"].keys() == loaded["state"].keys()
        for i, state in original["state"].items():
            assert state.keys() == loaded["state"][i].keys()
            assert all(torch.equal(v, loaded["state"][i][k]) if torch.is_tensor(v) else v == loaded["state"][i][k]
                       for k, v in state.items())
        assert r["fsdp"].startswith("lordo: parameter 'transformer.h.0.attn.c_attn.weight' is a DTensor shard")
        assert "DistributedDataParallel" in r["fsdp"] and "\n" not in r["fsdp"]
    workers_differ = [torch.equal(a, b) for a, b in zip(ranks[0]["trainer"]["full"], ranks[1]["trainer"]["full"])]
    assert workers_differ[3] is False        # step 4, the checkpoint: each worker's own model was restored
    assert not torch.equal(ranks[0]["round_trips"]["original"]["state"][5]["exp_avg"],
                           ranks[1]["round_trips"]["original"]["state"][5]["exp_avg"])   # and its own moments


@pytest.mark.integration
@pytest.mark.parametrize("framework", ["accelerate", "lightning"])
def test_framework_recipes_take_real_local_steps(tmp_path, framework):
    """2 gloo processes (tests/frameworks_worker.py): the README's accelerate recipe and Lightning's DDP strategy
    with lordo.lightning.LoRDOCallback give each worker, after every step and at the end, the parameters of a
    plain loop without any wrapper, bit for bit: local steps between synchronizations (sync_every=3)."""
    if framework == "lightning":
        pytest.importorskip("lightning")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(WORKER.with_name("frameworks_worker.py")), str(tmp_path), framework]
    path = os.pathsep.join(filter(None, [str(WORKER.parent.parent), os.environ.get("PYTHONPATH")]))
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={
        "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "PYTHONPATH": path})
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for r in ranks:
        assert len(r[framework]) == 6 and all(torch.equal(a, b) for a, b in zip(r["plain"], r[framework]))
    equal = [torch.equal(a, b) for a, b in zip(ranks[0][framework], ranks[1][framework])]
    assert equal == [False, False, True, False, False, True]      # steps 1-5, then after finish()
