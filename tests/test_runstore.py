"""The results store against what strands or mixes runs, one test per class of fault (issue 26): a run's identity
is its whole config; every writer holds the run's lock; a torn log, a bad index or a damaged checkpoint never
restarts a run nor resumes it from data that did not verify; folders a user names keep what is theirs; bad
input is one line with exit status 2, an interrupt 130."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import pytest
import torch

import lordo
from lordo import cli
from lordo.config import EXECUTION_FIELDS, LATER_OPTIMIZER_FIELDS, TrainConfig, make_config
from lordo.files import read_jsonl

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
NANO = dict(preset="nano", workers=2, batch_size=2, seq_len=32, rank=4, sync_every=3, eval_batches=1,
            eval_every=5, log_every=3, progress=False)
SMOKE = ["--method", "lordo", "--preset", "nano", "--workers", "2", "--batch-size", "2", "--seq-len", "32",
         "--rank", "4", "--sync-every", "3", "--eval-batches", "1", "--eval-every", "5", "--log-every", "3",
         "--no-progress"]
CUT = make_config(NANO, steps=16, checkpoint_every=4)   # stopped at 12: checkpoints 8 and 12 on disk
TIMING = ("wall_s", "tokens_per_s")

pytestmark = pytest.mark.usefixtures("shakespeare")


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as done:
        cli.main(argv)
    return done.value.code, capsys.readouterr().err


def same_result(a: Path, b: Path) -> None:
    ma, mb = (torch.load(d / "model.pt", weights_only=True) for d in (a, b))
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
    rows = [[{k: v for k, v in r.items() if k not in TIMING} for r in read_jsonl(d / "metrics.jsonl")] for d in (a, b)]
    assert rows[0] == rows[1]
    assert read_jsonl(a / "sync.jsonl") == read_jsonl(b / "sync.jsonl")


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    return lordo.train(CUT, out=str(tmp_path_factory.mktemp("straight") / "run")).dir


def cut(tmp_path: Path) -> Path:
    return lordo.train(CUT, out=str(tmp_path / "cut"), stop_at=12).dir


# ---------------------------------------------------------------------- identity
def test_identity_is_every_field_that_is_not_execution():
    assert set(TrainConfig().identity()) == {f.name for f in fields(TrainConfig)} - set(EXECUTION_FIELDS)


@pytest.mark.parametrize("state", ["stopped", "finished"])
def test_a_run_directory_refuses_any_other_config_set_or_not(state, tmp_path, capsys):
    """Every field counts, those left out of the hash at None (LATER_OPTIMIZER_FIELDS) included: a run stopped
    or finished in --out is never resumed nor replaced by another config without --force."""
    out = tmp_path / "run"
    lordo.train(NANO, steps=4, out=str(out), **({"stop_at": 2} if state == "stopped" else {}))
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lordo-run.lock"}
    changes = {"nonfinite": "skip", "proj_iters": "3", "bucket_mb": "1", "qh_scale": "update_rms", "mu": "4",
               "average_moments": "all", "average_moments_every": "2", "ef_on_sync": "reset",
               "fullrank_lr_scale": "3", "seed": "1"}
    assert set(LATER_OPTIMIZER_FIELDS) < set(changes)
    for field, value in changes.items():
        code, err = run_cli(["train", *SMOKE, "--steps", "4", f"--{field.replace('_', '-')}", value,
                             "--out", str(out)], capsys)
        assert code == 2 and err.count("\n") == 1 and f"different config ({field}: " in err, err
    after = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lordo-run.lock"}
    assert after == before
    forced = lordo.train(NANO, steps=4, nonfinite="skip", out=str(out), force=True)
    assert forced.summary["config_hash"] == make_config(NANO, steps=4, nonfinite="skip").hash()


def test_the_default_store_never_replaces_a_run_another_process_finished(tmp_path, monkeypatch):
    """Two identical commands: the second checks the cache, then prepares its data while the first finishes;
    under the lock it finds the finished run and loads it, never deleting and retraining it."""
    import lordo.launch
    cfg = make_config(NANO, steps=2, runs_dir=str(tmp_path))
    real_prepare = lordo.launch.prepare

    def slow_prepare(*args, **kwargs):   # the first command finishes meanwhile, in its own process
        done = subprocess.run([sys.executable, "-m", "lordo.cli", "train", *SMOKE, "--steps", "2", "--runs-dir",
                               str(tmp_path)], capture_output=True, text=True, env={**os.environ,
                                                                                     "PYTHONPATH": str(REPO)})
        assert done.returncode == 0, done.stderr
        return real_prepare(*args, **kwargs)

    monkeypatch.setattr(lordo.launch, "prepare", slow_prepare)
    run = lordo.train(cfg)
    stamp = (run.dir / "summary.json").stat().st_mtime_ns
    assert run.summary["config_hash"] == cfg.hash()
    monkeypatch.setattr(lordo.launch, "prepare", real_prepare)
    assert lordo.train(cfg).summary == run.summary and (run.dir / "summary.json").stat().st_mtime_ns == stamp


# ---------------------------------------------------------------------- torn logs, bad indexes, damaged checkpoints
def test_torn_last_lines_of_the_logs_are_dropped_on_resume_and_said(straight, tmp_path, capfd):
    out = cut(tmp_path)
    for name in ("metrics.jsonl", "sync.jsonl"):   # a full disk during an append: half a record, no newline
        with open(out / name, "a") as f:
            f.write('{"step": 13, "train_loss": 4.1')
    done = subprocess.run([sys.executable, "-m", "lordo.cli", "train", *SMOKE, "--steps", "16", "--checkpoint-every",
                           "4", "--out", str(out)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    for name in ("metrics.jsonl", "sync.jsonl"):
        assert f"lordo: {out / name}: dropped its torn last line" in done.stderr
    same_result(straight, out)
    (out / "metrics.jsonl").write_text('{"step": 0}\nnot json\n{"step": 4}\n')   # damage inside: named, not guessed
    with pytest.raises(ValueError, match=rf"{out / 'metrics.jsonl'}: line 2 is not a JSON record"):
        read_jsonl(out / "metrics.jsonl")


@pytest.mark.parametrize("index", [b"[]", b"{\"step\": \"twelve\"}", b"\x00\x00\x00", b"{\"step\": 12, \"prev"])
def test_a_bad_index_falls_back_to_the_checkpoint_folders(index, straight, tmp_path, capfd):
    out = cut(tmp_path)
    latest = out / "checkpoints" / "latest.json"
    latest.write_bytes(index)
    resumed = lordo.train(CUT, out=str(out))   # resume=None: a checkpoint is found, never a restart from 0
    assert f"lordo: {latest} is not a checkpoint index; using the checkpoint folders instead (12, 8)" \
        in capfd.readouterr().err
    assert json.loads(latest.read_text())["step"] == 16
    same_result(straight, resumed.dir)


@pytest.mark.parametrize("damage", ["a flipped tensor byte", "a damaged pickle", "no checksum"])
def test_a_checkpoint_that_does_not_verify_falls_back_to_the_one_before(damage, straight, tmp_path, capfd):
    out = cut(tmp_path)
    bad = out / "checkpoints" / "step_0000012" / "rank1.pt"
    data = bytearray(bad.read_bytes())
    if damage == "a flipped tensor byte":    # still a zip, still loads: only the checksum tells
        data[len(data) // 2] ^= 0x01
        bad.write_bytes(data)
        torch.load(bad, weights_only=True)
    elif damage == "a damaged pickle":
        at = data.index(b"data.pkl") + 200
        data[at:at + 16] = b"\xff" * 16
        bad.write_bytes(data)
    else:
        bad.with_name("rank1.pt.sha256").unlink()
    resumed = lordo.train(CUT, out=str(out), resume=True)
    err = capfd.readouterr().err
    assert f"lordo: checkpoint {bad} is " in err and "trying the previous checkpoint" in err, err
    same_result(straight, resumed.dir)


def test_no_checkpoint_that_verifies_is_one_line_and_deletes_nothing(tmp_path, capsys):
    out = cut(tmp_path)
    for step in (8, 12):
        path = out / "checkpoints" / f"step_{step:07d}" / "rank0.pt"
        data = bytearray(path.read_bytes())
        data[len(data) // 3] ^= 0x10
        path.write_bytes(data)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    code, err = run_cli(["train", *SMOKE, "--steps", "16", "--checkpoint-every", "4", "--out", str(out)], capsys)
    assert code == 2 and err.splitlines()[-1].startswith(f"lordo train: error: no intact checkpoint in {out}")
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


# ---------------------------------------------------------------------- writers under the lock
def hold_lock(run_dir: Path) -> subprocess.Popen:
    """Another process holding the run's lock, as a training run extending it does."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from lordo.runs import RunLock\nwith RunLock(Path(sys.argv[1])):\n"
                               "    print('held', flush=True); time.sleep(600)", str(run_dir)],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert holder.stdout.readline() == "held\n"
    return holder


def test_eval_export_and_train_wait_their_turn_at_a_run(tmp_path, capsys):
    run = lordo.train(NANO, steps=2, out=str(tmp_path / "run"))
    summary = (run.dir / "summary.json").read_bytes()
    holder = hold_lock(run.dir)
    try:
        for argv in (["eval", str(run.dir), "--limit", "1"], ["export", str(run.dir), "--to", str(run.dir / "hf")],
                     ["train", *SMOKE, "--steps", "4", "--resume", "--out", str(run.dir)]):
            code, err = run_cli(argv, capsys)
            assert code == 2 and err.count("\n") == 1 and f"is in use by pid {holder.pid} on " in err, (argv, err)
    finally:
        holder.kill()
        holder.wait()
    assert (run.dir / "summary.json").read_bytes() == summary and not (run.dir / "hf").exists()


def test_a_lock_whose_holder_exited_names_the_processes_it_left():
    from lordo.runs import _describe
    exited = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                                text=True).stdout)
    holder = f"pid {exited} on {socket.gethostname()} since 2026-01-01 00:00:00"
    assert _describe(holder) == f"processes that {holder} started and that outlive it (its torchrun ranks?)"
    alive = f"pid {os.getpid()} on {socket.gethostname()} since 2026-01-01 00:00:00"
    assert _describe(alive) == alive and _describe("") == "another process"


def test_an_export_is_fresh_by_its_models_content_not_file_times(tmp_path):
    from safetensors.torch import load_file

    from lordo.evaluate import ensure_export
    run = lordo.train(NANO, steps=2, out=str(tmp_path / "run"))
    other = lordo.train(NANO, steps=2, seed=1, out=str(tmp_path / "other"))
    exported = ensure_export(run.dir)
    old = load_file(exported / "model.safetensors")
    (run.dir / "model.pt").write_bytes((other.dir / "model.pt").read_bytes())
    os.utime(run.dir / "model.pt", (1e9, 1e9))   # a clock that moved: the new model looks older than its export
    new = load_file(ensure_export(run.dir) / "model.safetensors")
    theirs = {f"model.{k}": v for k, v in torch.load(other.dir / "model.pt", weights_only=True).items()}
    shared = new.keys() & theirs.keys()
    assert len(shared) > 4 and all(torch.equal(new[k], theirs[k]) for k in shared)
    assert not all(torch.equal(new[k], old[k]) for k in shared)


def test_a_files_corpus_edited_in_place_is_prepared_again(tmp_path):
    """The cache key holds each file's size and mtime; an edit that keeps both (a clock that moved, a copy
    with -p) is found by the sha256 the cache recorded of each file."""
    from lordo.data import prepare
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "b.txt").write_text("a second document " * 40)
    doc = corpus / "a.txt"
    doc.write_text("the first text! " * 40)
    stamp = doc.stat().st_mtime_ns
    first = prepare(f"files:{corpus}/*.txt", "bpe", 300, cache_dir=tmp_path / "cache", val_fraction=0.5)
    doc.write_text("another texture " * 40)    # as many bytes
    os.utime(doc, ns=(stamp, stamp))
    again = prepare(f"files:{corpus}/*.txt", "bpe", 300, cache_dir=tmp_path / "cache", val_fraction=0.5)
    text = again.decode(again.train) + again.decode(again.val)
    assert again.dir == first.dir and "another texture" in text and "the first text!" not in text


# ---------------------------------------------------------------------- folders a user names
def test_reproduce_never_replaces_a_users_readme_or_timings(tmp_path):
    preset = tmp_path / "my.yaml"
    preset.write_text(f"results_dir: {tmp_path / 'results'}\nfigures_dir: {tmp_path / 'figures'}\n")
    (tmp_path / "figures").mkdir()
    for name, text in [("README.md", "# My figures\n"), ("timings.json", "[1, 2]")]:
        (tmp_path / "figures" / name).write_text(text)
        done = subprocess.run([sys.executable, "-m", "lordo.reproduce", "--preset", str(preset), "--readme-only"],
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and name in done.stderr, done.stderr
        assert (tmp_path / "figures" / name).read_text() == text
        (tmp_path / "figures" / name).unlink()
    done = subprocess.run([sys.executable, "-m", "lordo.reproduce", "--preset", str(preset), "--readme-only"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "figures" / "README.md").read_text().startswith("# Figures: the `my` preset")


# ---------------------------------------------------------------------- bad input, interrupts
@pytest.mark.parametrize("content, message", [
    (b"- a\n- b\n", "must hold a mapping of parameter: value"),
    (b"preset: [tiny\n", "is not valid YAML (line 2, column 1)"),
    (b"\x89PNG\r\n\x1a\n\x00\xff\xfe", "is not text (YAML or JSON)"),
])
def test_sweep_presets_that_are_not_a_mapping_are_one_line(content, message, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(content)
    for module in ("lordo.sweep", "lordo.reproduce"):
        done = subprocess.run([sys.executable, "-m", module, "--preset", str(bad)], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and message in done.stderr, done.stderr


def test_inputs_that_cannot_run_are_one_line(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("plain text\n" * 50)
    (corpus / "b.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\x00")
    code, err = run_cli(["train", *SMOKE, "--steps", "1", "--corpus", f"files:{corpus}/*.txt", "--vocab-size",
                         "300", "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and err.count("\n") == 1 and f"{corpus / 'b.txt'}, which is not UTF-8 text" in err, err
    if not torch.cuda.is_available():
        run = lordo.train(NANO, steps=2, out=str(tmp_path / "ok"))
        code, err = run_cli(["eval", str(run.dir), "--device", "cuda"], capsys)
        assert code == 2 and err == "lordo eval: error: device='cuda' is invalid: allowed cpu (no CUDA device on " \
            "this machine)\n", err
    with pytest.raises(RuntimeError) as oom:     # what the allocator raises for a batch that does not fit
        torch.empty(1 << 50)
    assert cli.user_error(oom.value).startswith("out of memory: DefaultCPUAllocator: can't allocate memory: you "
                                                "tried to allocate 4503599627370496 bytes")


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
def test_optimizer_inputs_it_cannot_take_are_one_line():
    from torch import nn

    from lordo.optim import make_optimizer
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8, bias=False), nn.Linear(8, 0, bias=False))
    opt = make_optimizer("lordo", model, lr=1e-3, rank=4)     # a zero-size matrix stays full-rank
    model(torch.tensor([1, 2])).sum().backward()
    opt.step()
    assert opt.lowrank_names == ["1.weight"]
    adamw = torch.optim.AdamW(model.parameters())
    adamw.step()
    with pytest.raises(ValueError, match=r"state_dict is not a lordo optimizer's \(no 'lordo' entry; it holds "
                                         r"\['param_groups', 'state'\]\)"):
        opt.load_state_dict(adamw.state_dict())
    sparse = nn.Sequential(nn.Embedding(10, 8, sparse=True), nn.Linear(8, 8, bias=False))
    opt = make_optimizer("lordo", sparse, lr=1e-3, rank=4)
    sparse(torch.tensor([1])).sum().backward()
    with pytest.raises(ValueError, match=r"parameter '0.weight' has a sparse gradient \(torch.sparse_coo\): allowed "
                                         "dense gradients"):
        opt.step()
    complex_model = nn.Module()
    complex_model.z = nn.Parameter(torch.zeros(3, 3, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"parameter 'z' is torch.complex64: allowed real parameters"):
        make_optimizer("lordo", complex_model, lr=1e-3)


@pytest.mark.integration
def test_sigterm_during_start_up_is_130_in_one_line(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "lordo.cli", "train", *SMOKE, "--steps", "2", "--out",
                             str(tmp_path / "run")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    time.sleep(1.5)   # importing torch and reading the config: no run directory yet
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err == "lordo train: interrupted\n", err


@pytest.mark.integration
def test_torchrun_ranks_end_with_a_launcher_killed_by_kill_9(tmp_path):
    """The launcher gone unasked: torchrun is told (SIGTERM), its ranks stop and release the lock; the rerun
    resumes from the last checkpoint."""
    out = tmp_path / "run"
    args = [*SMOKE, "--launcher", "torchrun", "--eval-every", "100000", "--checkpoint-every", "2", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "lordo.cli", "train", *args, "--steps", "100000"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,   # torchrun would hold pipes
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.time() + 300
        while not (out / "checkpoints" / "latest.json").is_file():
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.2)
        proc.kill()
        proc.wait()
        deadline = time.time() + 90
        while _processes_in(out):
            assert time.time() < deadline, "torchrun's ranks outlived their launcher"
            time.sleep(0.5)
    finally:
        for pid in _processes_in(out):
            os.kill(pid, signal.SIGKILL)
    step = json.loads((out / "checkpoints" / "latest.json").read_text())["step"]
    again = subprocess.run([sys.executable, "-m", "lordo.cli", "train", *args, "--steps", str(step + 2), "--resume"],
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["extended_from"] == [100000]


def _processes_in(out: Path) -> list[int]:
    """The processes whose command line names `out` (the launcher, torchrun, its ranks)."""
    pids = []
    for proc_dir in Path("/proc").iterdir():
        try:
            if proc_dir.name.isdigit() and str(out).encode() in (proc_dir / "cmdline").read_bytes():
                pids.append(int(proc_dir.name))
        except OSError:
            pass
    return pids
