"""The trainer end to end on the nano preset: launchers agree, runs resume and are cached."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import lordo
from lordo import METHODS
from lordo.config import LATER_OPTIMIZER_FIELDS, TrainConfig, load_config, make_config
from lordo.files import read_jsonl

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
NANO = dict(preset="nano", workers=2, steps=8, batch_size=2, seq_len=32, rank=4, sync_every=3, lr=3e-3,
            warmup=2, eval_every=4, eval_batches=2, log_every=2, progress=False)
TIMING = ("wall_s", "tokens_per_s", "projection_seconds", "comm_seconds", "compute_s_per_step")


def metrics(run) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_jsonl(run.dir / "metrics.jsonl")]


def close(a: list[dict], b: list[dict], rel: float) -> bool:
    for ra, rb in zip(a, b, strict=True):
        for k, va in ra.items():
            vb = rb[k]
            if isinstance(va, float):
                if abs(va - vb) > rel * max(abs(va), 1e-12):
                    return False
            elif va != vb:
                return False
    return True


@pytest.mark.integration
@pytest.mark.parametrize("method", sorted(METHODS))
def test_simulated_and_torchrun_give_equal_metrics(method, tmp_path):
    sim = lordo.train(method=method, runs_dir=str(tmp_path / "sim"), **NANO)
    real = lordo.train(method=method, runs_dir=str(tmp_path / "real"), launcher="torchrun", **NANO)
    assert close(metrics(sim), metrics(real), 1e-6)
    assert sim.summary["comm"] == real.summary["comm"]
    assert sim.summary["optimizer_state_bytes"] == real.summary["optimizer_state_bytes"]
    assert (real.dir / "model.pt").is_file() and (real.dir / "tokenizer.json").is_file()
    a = torch.load(sim.dir / "model.pt", weights_only=True)
    b = torch.load(real.dir / "model.pt", weights_only=True)
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)


def test_validation_loss_falls_on_shakespeare(tmp_path):
    run = lordo.train(method="lordo", runs_dir=str(tmp_path), **(NANO | dict(steps=60, eval_every=30, lr=1e-2)))
    val = run.metrics["val_loss"].dropna().tolist()
    assert len(val) == 3 and val[0] > val[1] > val[2]
    assert val[0] - val[2] > 1.0          # from ~ln(8192) = 9.0 toward unigram statistics
    syncs = run.syncs
    assert set(syncs["param"]) and syncs["explored_dim"].max() > NANO["rank"]


def test_resume_is_bit_exact(tmp_path):
    cfg = make_config(NANO, method="lordo", steps=40, eval_every=10, checkpoint_every=10)
    straight = lordo.train(cfg, out=str(tmp_path / "straight"))
    stopped = lordo.train(cfg, out=str(tmp_path / "split"), stop_at=20)
    assert stopped.summary == {"stopped_at": 20}
    latest = json.loads((tmp_path / "split" / "checkpoints" / "latest.json").read_text())
    assert latest == {"step": 20, "previous": 10, "world_size": 2}   # the last two are kept
    assert sorted(p.name for p in (tmp_path / "split" / "checkpoints").glob("step_*")) == \
        ["step_0000010", "step_0000020"]
    resumed = lordo.train(cfg, out=str(tmp_path / "split"), resume=True)
    a = torch.load(straight.dir / "model.pt", weights_only=True)
    b = torch.load(resumed.dir / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert metrics(straight) == metrics(resumed)
    assert straight.syncs.equals(resumed.syncs)
    assert {k: v for k, v in straight.summary.items() if k not in TIMING + ("versions",)} == \
        {k: v for k, v in resumed.summary.items() if k not in TIMING + ("versions",)}


def test_resume_extends_steps_and_interrupted_runs_resume_by_themselves(tmp_path):
    # ddp with a constant schedule: a finished run's end (local methods: a last sync) changes nothing
    base = make_config(NANO, method="ddp", schedule="constant", checkpoint_every=4, eval_every=4)
    straight = lordo.train(base.replace(steps=16), out=str(tmp_path / "a"))
    lordo.train(base.replace(steps=8), out=str(tmp_path / "b"))
    extended = lordo.train(base.replace(steps=16), out=str(tmp_path / "b"), resume=True)
    assert metrics(straight) == metrics(extended)
    lordo.train(base.replace(steps=16), out=str(tmp_path / "c"), stop_at=8)
    again = lordo.train(base.replace(steps=16), out=str(tmp_path / "c"))   # resume=None: picks up step 8
    assert metrics(straight) == metrics(again)


def test_finished_runs_are_loaded_not_retrained(tmp_path):
    first = lordo.train(method="ddp", runs_dir=str(tmp_path), **NANO)
    stamp = (first.dir / "summary.json").stat().st_mtime_ns
    second = lordo.train(method="ddp", runs_dir=str(tmp_path), **NANO)
    assert second.dir == first.dir and (second.dir / "summary.json").stat().st_mtime_ns == stamp
    assert second.summary == first.summary
    forced = lordo.train(method="ddp", runs_dir=str(tmp_path), force=True, **NANO)
    assert (forced.dir / "summary.json").stat().st_mtime_ns != stamp


def test_a_different_config_in_the_same_directory_is_refused(tmp_path):
    lordo.train(method="ddp", out=str(tmp_path / "x"), **NANO)
    with pytest.raises(ValueError, match=r"different config \(method: 'ddp' there, 'lordo' now\)"):
        lordo.train(method="lordo", out=str(tmp_path / "x"), **NANO)
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        lordo.train(method="ddp", out=str(tmp_path / "y"), resume=True, **NANO)


def test_half_written_checkpoint_is_never_read(tmp_path):
    cfg = make_config(NANO, method="lordo", steps=12, checkpoint_every=4)
    lordo.train(cfg, out=str(tmp_path), stop_at=8)
    # a crash while writing step 12: files exist but latest.json was never pointed at them
    partial = tmp_path / "checkpoints" / "step_0000012"
    partial.mkdir()
    (partial / "rank0.pt").write_bytes(b"truncated")
    assert json.loads((tmp_path / "checkpoints" / "latest.json").read_text())["step"] == 8
    run = lordo.train(cfg, out=str(tmp_path), resume=True)
    straight = lordo.train(cfg, out=str(tmp_path / "straight"))
    assert metrics(run) == metrics(straight)


@pytest.mark.parametrize("fields, message", [
    (dict(method="sgd"), "method='sgd' is invalid: allowed one of ['ddp', 'local_adam', 'lordo'"),
    (dict(preset="huge"), "preset='huge' is invalid: allowed one of ['125m', '350m', '720m', 'blocks', 'mini', 'nano'"),
    (dict(rank=-2), "rank=-2 is invalid"), (dict(steps=0), "steps=0 is invalid: allowed an int >= 1"),
    (dict(schedule="linear"), "schedule='linear' is invalid"), (dict(colour="red"), "unknown config field 'colour'"),
    (dict(launcher="torchrun", workers=3, nproc_per_node=2), "nproc_per_node=2 is invalid"),
])
def test_bad_config_names_the_field(fields, message):
    with pytest.raises(ValueError) as err:
        make_config(NANO, **fields)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_config_file_errors_name_the_file_and_field(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: lordo\nrank: 8\nsync_evry: 16\n")
    with pytest.raises(ValueError, match=r"c.yaml: unknown config field 'sync_evry'"):
        load_config(path)
    path.write_text("method: lordo\nrank: 8\nsync_every: 16\n")
    assert load_config(path, steps=5) == TrainConfig(method="lordo", rank=8, sync_every=16, steps=5)


GOLDEN = json.loads((REPO / "tests" / "golden" / "paper_configs.json").read_text())


@pytest.mark.parametrize("size", ["125m", "350m", "720m"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_paper_configs_give_the_runs_the_method_files_gave(size, method):
    """configs/paper/<size>.yaml with --method gives each (size, method) the TrainConfig, and so the config hash
    and cached run, that its own file configs/paper/<size>_<method>.yaml gave before the 18 files became 3.
    tests/golden/paper_configs.json was written from those files at the commit before (2a604be^) by

        files = {p.stem: load_config(p) for p in sorted(Path("configs/paper").glob("*.yaml"))}
        P = yaml.safe_load(Path("notebooks/params/paper.yaml").read_text())
        runs = {f"{preset}_{m}": analysis.run_config(P | {"preset": preset}, m, seed=1).hash()
                for preset in ("125m", "350m", "720m") for m in METHODS}
        json.dumps({"config_hashes": {k: c.hash() for k, c in files.items()},
                    "configs": {k: c.to_dict() for k, c in files.items()}, "notebook_runs": runs})

    run from the checkout root; the paper notebooks' runs (config_dir: configs/paper) keep their hashes too."""
    from lordo import analysis
    name = f"{size}_{method}"
    cfg = load_config(REPO / "configs" / "paper" / f"{size}.yaml", method=method)
    assert cfg.hash() == GOLDEN["config_hashes"][name]
    new_fields = {k: None for k in LATER_OPTIMIZER_FIELDS}   # TrainConfig fields added since
    assert cfg.to_dict() == GOLDEN["configs"][name] | new_fields
    assert cfg.launcher == "torchrun" and cfg.bf16
    P = yaml.safe_load((REPO / "notebooks" / "params" / "paper.yaml").read_text())
    assert analysis.run_config(P | {"preset": size}, method, seed=1).hash() == GOLDEN["notebook_runs"][name]


def test_a_config_file_for_every_method_defaults_to_lordo_and_names_a_bad_method(tmp_path):
    path = REPO / "configs" / "paper" / "125m.yaml"
    assert load_config(path).method == "lordo" and load_config(path).rank == 0.25
    assert load_config(path, method="ddp").rank is None and load_config(path, method="ddp").sync_every is None
    assert load_config(path, method="ddp", rank=8).rank == 8        # what the command line says is kept
    with pytest.raises(ValueError, match=r"125m.yaml: config field method='sgd' is invalid: allowed one of"):
        load_config(path, method="sgd")


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lordo.cli", *args], capture_output=True, text=True, timeout=600,
                          **kw)


@pytest.mark.parametrize("args, message", [
    (["train", "--method", "sgd"], "lordo train: error: config field method='sgd' is invalid: allowed one of"),
    (["train", "--preset", "huge"], "config field preset='huge' is invalid"),
    (["train", "--corpus", "gutenberg", "--steps", "1"], "gutenberg"),
    (["train", "--config", "missing.yaml"], "config file 'missing.yaml' does not exist"),
    (["train", "--resume", "--out", "/nonexistent/run"], "nothing to resume in /nonexistent/run"),
])
@pytest.mark.integration
def test_cli_errors_are_one_line(args, message):
    done = cli(*args)
    assert done.returncode == 2
    assert message in done.stderr and done.stderr.count("\n") == 1, done.stderr


@pytest.mark.integration
def test_cli_trains_and_reports(tmp_path):
    done = cli("train", "--method", "lordo", "--preset", "nano", "--workers", "2", "--steps", "4",
               "--batch-size", "2", "--seq-len", "32", "--rank", "4", "--sync-every", "2", "--eval-batches", "1",
               "--betas", "0.9,0.99", "--no-progress", "--out", str(tmp_path / "x"))
    assert done.returncode == 0, done.stderr
    assert "val_ppl" in done.stdout and "MiB/worker" in done.stdout
    cfg = json.loads((tmp_path / "x" / "config.json").read_text())["train"]
    assert cfg["betas"] == [0.9, 0.99] and cfg["rank"] == 4 and cfg["progress"] is False


@pytest.mark.integration
def test_a_killed_rank_fails_the_run_by_name_and_keeps_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lordo.cli", "train", "--method", "lordo", "--preset", "nano", "--workers", "2",
         "--launcher", "torchrun", "--steps", "100000", "--batch-size", "2", "--seq-len", "32", "--rank", "4",
         "--eval-batches", "1", "--eval-every", "100000", "--checkpoint-every", "2", "--no-progress",
         "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "latest.json").is_file():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.5)
    victim = next(int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _is_rank(p, 1, out))
    os.kill(victim, signal.SIGKILL)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "rank 1 failed" in stderr and "intact" in stderr, stderr[-4000:]
    step = json.loads((out / "checkpoints" / "latest.json").read_text())["step"]
    for rank in range(2):
        state = torch.load(out / "checkpoints" / f"step_{step:07d}" / f"rank{rank}.pt", weights_only=True)
        assert state["step"] == step


def _is_rank(proc_dir: Path, rank: int, out: Path) -> bool:
    try:
        cmdline = (proc_dir / "cmdline").read_bytes().split(b"\0")
        environ = (proc_dir / "environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"lordo.launch" in cmdline and str(out).encode() in cmdline and f"LOCAL_RANK={rank}".encode() in environ


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_lr_schedules(schedule):
    from lordo.trainer import lr_multiplier

    cfg = make_config(dict(schedule=schedule, steps=100, warmup=10, min_lr_ratio=0.1, decay_fraction=0.2))
    lr = [lr_multiplier(cfg, s) for s in range(100)]
    assert lr[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])          # linear warmup to the peak
    assert max(lr) == pytest.approx(1.0) and min(lr[10:]) >= 0.1 - 1e-12
    if schedule == "constant":
        assert lr[10:] == [1.0] * 90
    elif schedule == "cosine":                                                  # halfway down at mid-decay
        assert lr[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
        assert all(a >= b for a, b in zip(lr[10:], lr[11:]))
    else:                                                                       # stable, then the last 20% decay
        assert lr[10:80] == [1.0] * 70 and lr[99] == pytest.approx(0.1)
        assert all(a > b for a, b in zip(lr[79:], lr[80:]))
