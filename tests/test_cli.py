"""The command line and the results store as a user meets them: bad values, Ctrl-C, kill -9, two runs at
once, --force on a user's folder, a full disk, a corrupt checkpoint, and every command the README shows."""

import argparse
import importlib.metadata
import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import pytest
import torch

import lordo
from lordo import cli
from lordo.config import TrainConfig, load_config, make_config
from lordo.files import read_jsonl

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
SMOKE = ["--method", "lordo", "--preset", "nano", "--workers", "2", "--batch-size", "2", "--seq-len", "32",
         "--rank", "4", "--sync-every", "3", "--eval-batches", "1", "--eval-every", "5", "--log-every", "3",
         "--no-progress"]
NANO = dict(preset="nano", workers=2, batch_size=2, seq_len=32, rank=4, sync_every=3, eval_batches=1,
            eval_every=5, log_every=3, progress=False)
TIMING = ("wall_s", "tokens_per_s")


pytestmark = pytest.mark.usefixtures("shakespeare")   # prepared first: its progress is not an error line


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """`lordo ARGV` in this process: its exit status and stderr."""
    with pytest.raises(SystemExit) as done:
        cli.main(argv)
    return done.value.code, capsys.readouterr().err


def default_sigint() -> None:
    """In the child: SIGINT as in a terminal's foreground job. A test runner started in the background by a
    non-interactive shell has it ignored, and the child would inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(*args: str, cwd: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lordo.cli", *args], preexec_fn=default_sigint,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=cwd,
                            env={**os.environ, "PYTHONPATH": str(REPO)})


def finish(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    proc = start(*args, cwd=cwd)
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def wait_for_checkpoint(proc: subprocess.Popen, out: Path, step: int) -> None:
    deadline = time.time() + 300
    latest = out / "checkpoints" / "latest.json"
    while not (latest.is_file() and json.loads(latest.read_text())["step"] >= step):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)


def same_result(a: Path, b: Path) -> None:
    """Bit-equal models, and the same metrics and sync rows (timings aside)."""
    ma, mb = (torch.load(d / "model.pt", weights_only=True) for d in (a, b))
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
    rows = [[{k: v for k, v in r.items() if k not in TIMING} for r in read_jsonl(d / "metrics.jsonl")]
            for d in (a, b)]
    assert rows[0] == rows[1]
    assert read_jsonl(a / "sync.jsonl") == read_jsonl(b / "sync.jsonl")


# ---------------------------------------------------------------------- bad values
def bad_values(f, rng: random.Random, a_file: Path) -> list[str]:
    """Values a user might type that the field does not allow, from the field's declared type."""
    word = "".join(rng.choice("qxzjvw") for _ in range(rng.randint(3, 9)))
    if f.name in ("out", "runs_dir"):
        return [str(a_file / "run") if f.name == "runs_dir" else str(a_file)]   # under / at a file
    if f.name == "rank":
        return ["0", str(-rng.randint(1, 10**6)), f"{rng.uniform(1.01, 99):.3f}", word]
    if f.name == "betas":
        return ["0.9", f"{rng.uniform(1, 9):.2f},0.9", f"{word},0.9", "0.9,0.95,0.99"]
    if f.type.startswith("bool"):
        return [word]
    if f.type.startswith("int"):
        return [word, f"{rng.uniform(0.01, 0.99) + rng.randint(1, 9):.2f}", "nan", str(-rng.randint(1, 10**9)),
                "1e400"]
    if f.type.startswith("float"):
        return [word, "nan", "inf", f"{-rng.uniform(1e-9, 1e6):.3g}"]
    return [word]      # every text field is a name from a list, a path or a pattern


def test_every_field_rejects_bad_values_in_one_line(tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory\n")
    rng = random.Random(9)
    checked = set()
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        for value in bad_values(f, rng, a_file):
            argv = [*SMOKE, "--steps", "2", f"{flag}={value}"]
            argv += [] if f.name in ("out", "runs_dir") else ["--out", str(tmp_path / "run")]
            code, err = run_cli(["train", *argv], capsys)
            assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, (f.name, value, err)
            assert f.name in err or flag in err or value in err, (f.name, value, err)
            checked.add(f.name)
    assert checked == {f.name for f in fields(TrainConfig)}
    assert not (tmp_path / "run").exists()        # no bad value left anything behind


def test_numbers_are_read_as_people_write_them(tmp_path):
    cfg = make_config(lr="3e-3", eps="1E-8", omega=".5", weight_decay="1e-1", betas="0.9,0.95", clip="none",
                      steps="1e3", rank="0.25", eval_batches="null")
    assert (cfg.lr, cfg.eps, cfg.omega, cfg.weight_decay, cfg.betas) == (3e-3, 1e-8, 0.5, 0.1, (0.9, 0.95))
    assert (cfg.clip, cfg.steps, cfg.rank, cfg.eval_batches) == (None, 1000, 0.25, None)
    path = tmp_path / "c.yaml"
    path.write_text("lr: 3e-3\neps: 1E-8\nomega: .5\n")    # YAML 1.1 leaves 3e-3 and 1E-8 strings
    assert load_config(path) == TrainConfig(lr=3e-3, eps=1e-8, omega=0.5)
    path.write_text("lr: [3e-3\n")
    with pytest.raises(ValueError, match=r"c.yaml' is not valid YAML \(line 2, column 1\)"):
        load_config(path)


def test_help_says_every_default_and_what_is_allowed(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    sections = {head.split(":")[0]: body for head, body in
                (part.split("\n", 1) for part in re.split(r"\n\n(?=[a-z][a-z ]*:\n)", text)[1:])}
    assert list(sections) == ["options", *cli.TRAIN_GROUPS]
    entries = {e.split()[0].rstrip(","): (section, " ".join(e.split())) for section, body in sections.items()
               for e in re.split(r"\n  (?=--)", "\n" + body)[1:]}
    for f in fields(TrainConfig):
        section, entry = entries["--" + f.name.replace("_", "-")]
        assert re.search(r"\(default: [^;]+; allowed: [^)]+", entry), (f.name, entry)
        assert f.name in cli.TRAIN_GROUPS[section] or section == "optimizer" and not any(
            f.name in names for names in cli.TRAIN_GROUPS.values()), (f.name, section)
        switch = f.type in ("bool", "bool | None")      # one style for every switch: --x / --no-x
        assert (f", --no-{f.name.replace('_', '-')} " in entry) == switch, entry
    assert {"--config", "--force", "--resume", "--stop-at"} <= {k for k, (s, _) in entries.items() if s == "run store"}


@pytest.mark.parametrize("command", ["train", "prepare", "export", "eval"])
def test_every_subcommand_has_a_description_and_help_for_every_option(command, capsys):
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    assert sub.description and all(a.help for a in sub._actions), [a.dest for a in sub._actions if not a.help]
    with pytest.raises(SystemExit) as done:
        cli.main([command, "--help"])
    assert done.value.code == 0 and sub.description.split()[0] in capsys.readouterr().out


def test_version_and_description(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == f"lordo {importlib.metadata.version('lordo')}\n"
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    assert "train, evaluate and export LoRDO runs" in text and "lordo eval runs/x --tasks core" in text


# ---------------------------------------------------------------------- the store
def test_force_never_deletes_what_lordo_did_not_write(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work\n")
    code, err = run_cli(["train", *SMOKE, "--steps", "2", "--force", "--out", str(mine)], capsys)
    assert code == 2 and "not a lordo run directory" in err and err.count("\n") == 1
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]
    code, err = run_cli(["train", *SMOKE, "--steps", "2", "--force", "--out", str(tmp_path)], capsys)   # the root
    assert code == 2 and (mine / "thesis.tex").is_file()
    run = lordo.train(NANO, steps=2, out=str(tmp_path / "run"))
    (run.dir / "notes.txt").write_text("what I saw\n")     # a user's file in a run directory
    lordo.train(NANO, steps=2, out=str(run.dir), force=True)
    assert (run.dir / "notes.txt").read_text() == "what I saw\n" and (run.dir / "summary.json").is_file()


@pytest.mark.integration
def test_a_second_writer_is_refused_naming_the_first(tmp_path, capsys):
    out = tmp_path / "run"
    first = start("train", *SMOKE, "--steps", "100000", "--eval-every", "100000", "--out", str(out))
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").is_file():
        assert first.poll() is None and time.time() < deadline, first.communicate()
        time.sleep(0.05)
    code, err = run_cli(["train", *SMOKE, "--steps", "100000", "--eval-every", "100000", "--out", str(out)], capsys)
    assert code == 2 and err.count("\n") == 1 and f"is in use by pid {first.pid} on " in err, err
    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=60)
    assert first.returncode == 130 and err.strip().splitlines() == [
        f"lordo train: interrupted before the first checkpoint, nothing to resume in {out} "
        "(--checkpoint-every N keeps one every N steps)"], err
    assert not (out / "summary.json").exists()


SIM = [*SMOKE, "--steps", "100", "--checkpoint-every", "4"]


def uninterrupted(tmp_path_factory, name: str, args: list[str]) -> Path:
    """The run the interrupted ones must end equal to."""
    out = tmp_path_factory.mktemp(name) / "straight"
    done = finish("train", *args, "--out", str(out))
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module")
def sim_straight(tmp_path_factory) -> Path:
    return uninterrupted(tmp_path_factory, "sim", SIM)


@pytest.mark.integration
@pytest.mark.parametrize("how", ["sigint", "sigterm", "kill -9"])
def test_interrupted_runs_resume_to_the_uninterrupted_result(how, sim_straight, tmp_path):
    args = SIM
    out = tmp_path / "cut"
    proc = start("train", *args, "--out", str(out))
    wait_for_checkpoint(proc, out, random.Random(how).choice([4, 8, 12, 16]))
    if how in ("sigint", "sigterm"):   # SIGTERM: `kill`, or a scheduler preempting the job
        proc.send_signal(signal.SIGINT if how == "sigint" else signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130 and len(err.strip().splitlines()) == 1, err
        assert re.fullmatch(r"lordo train: interrupted; the last checkpoint \(step \d+\) is intact: continue "
                            rf"with --resume --out {out}\n", err), err
        again = finish("train", *args, "--resume", "--out", str(out))
    else:
        proc.kill()
        proc.wait()
        (out / ".metrics.jsonl.99999.tmp").write_text("{")     # what a write killed midway leaves
        again = finish("train", *args, "--out", str(out))      # an interrupted run resumes by itself
        assert not list(out.rglob("*.tmp"))
    assert not (out / "summary.json").exists() or again.returncode == 0
    assert again.returncode == 0, again.stderr
    same_result(sim_straight, out)


TORCHRUN = [*SMOKE, "--launcher", "torchrun", "--steps", "120", "--checkpoint-every", "4"]


@pytest.fixture(scope="module")
def torchrun_straight(tmp_path_factory) -> Path:
    return uninterrupted(tmp_path_factory, "torchrun", TORCHRUN)


@pytest.mark.integration
@pytest.mark.parametrize("how", ["sigint", "kill -9 a rank"])
def test_torchrun_runs_stop_whole_and_resume_to_the_uninterrupted_result(how, torchrun_straight, tmp_path):
    out = tmp_path / "cut"
    proc = start("train", *TORCHRUN, "--out", str(out))
    wait_for_checkpoint(proc, out, random.Random(how).choice([4, 8, 12]))
    if how == "sigint":
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=90)
        assert proc.returncode == 130 and len(err.strip().splitlines()) == 1 and "is intact" in err, err
        assert not (out / "errors").exists()
    else:
        victim = next(p for p in Path("/proc").iterdir() if p.name.isdigit() and _is_rank(p, 1, out))
        os.kill(int(victim.name), signal.SIGKILL)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2 and "rank 1 failed" in err and "intact" in err, err[-3000:]
    assert not (out / "summary.json").exists()
    assert [p for p in Path("/proc").iterdir() if p.name.isdigit() and _runs_in(p, out)] == []   # none outlives it
    again = finish("train", *TORCHRUN, "--resume", "--out", str(out))
    assert again.returncode == 0, again.stderr
    same_result(torchrun_straight, out)


def _is_rank(proc_dir: Path, rank: int, out: Path) -> bool:
    try:
        environ = (proc_dir / "environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return _runs_in(proc_dir, out) and f"LOCAL_RANK={rank}".encode() in environ


def _runs_in(proc_dir: Path, out: Path) -> bool:
    try:
        return str(out).encode() in (proc_dir / "cmdline").read_bytes()
    except OSError:
        return False


def test_a_corrupt_latest_checkpoint_falls_back_to_the_one_before(tmp_path, capfd):
    cfg = make_config(NANO, steps=16, checkpoint_every=4)
    straight = lordo.train(cfg, out=str(tmp_path / "straight"))
    lordo.train(cfg, out=str(tmp_path / "cut"), stop_at=12)
    bad = tmp_path / "cut" / "checkpoints" / "step_0000012" / "rank1.pt"
    bad.write_bytes(bad.read_bytes()[:1000])                    # truncated
    resumed = lordo.train(cfg, out=str(tmp_path / "cut"), resume=True)
    assert f"checkpoint {bad} is damaged" in capfd.readouterr().err
    same_result(straight.dir, resumed.dir)


def test_a_run_resumed_to_more_steps_is_never_served_as_a_fresh_one(tmp_path):
    cfg = make_config(NANO, steps=8, checkpoint_every=4)
    lordo.train(cfg, out=str(tmp_path / "x"))
    longer = cfg.replace(steps=16)
    extended = lordo.train(longer, out=str(tmp_path / "x"), resume=True)
    assert extended.summary["extended_from"] == [8] and extended.summary["config_hash"] != longer.hash()
    with pytest.raises(ValueError, match="resumed from steps=8 to 16, which a fresh run does not reproduce"):
        lordo.train(longer, out=str(tmp_path / "x"))
    fresh = lordo.train(longer, out=str(tmp_path / "x"), force=True)
    assert fresh.summary["config_hash"] == longer.hash() and "extended_from" not in fresh.summary


def test_a_failed_start_does_not_block_the_corrected_rerun(tmp_path, capsys):
    out = str(tmp_path / "run")
    code, err = run_cli(["train", *SMOKE, "--steps", "2", "--batch-size", "10000000", "--out", out], capsys)
    assert code == 2 and "fewer than one global batch" in err and err.count("\n") == 1
    code, _ = run_cli(["train", *SMOKE, "--steps", "2", "--stop-at", "0", "--out", out], capsys)
    assert code == 2
    lordo.train(NANO, steps=2, out=out)
    assert (tmp_path / "run" / "summary.json").is_file()


def test_torchrun_ranks_beyond_the_gpus_are_one_line(tmp_path, capsys, monkeypatch):
    """NCCL refuses two ranks on one GPU: more ranks per node than GPUs (here a machine shown one GPU) is named
    before anything starts, as is a device torchrun cannot use."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    out = str(tmp_path / "run")
    for flags, names in [(["--workers", "2"], "workers=2"), (["--workers", "4", "--nproc-per-node", "4"],
                                                            "nproc_per_node=4")]:
        code, err = run_cli(["train", *SMOKE, "--steps", "2", "--launcher", "torchrun", "--device", "cuda", *flags,
                             "--out", out], capsys)
        assert code == 2 and err.count("\n") == 1 and names in err and "has 1" in err, err
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    code, err = run_cli(["train", *SMOKE, "--steps", "2", "--launcher", "torchrun", "--device", "mps", "--out", out],
                        capsys)
    assert code == 2 and err.count("\n") == 1 and "device='mps'" in err and "allowed cuda or cpu" in err, err
    assert not (tmp_path / "run").exists()


def test_what_is_not_a_run_or_an_export_is_one_line(tmp_path, capsys):
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / ".lordo-run").write_text("")
    (fake / "config.json").write_text('{"colour": "red"}')
    code, err = run_cli(["train", *SMOKE, "--steps", "2", "--out", str(fake)], capsys)
    assert code == 2 and err == f"lordo train: error: {fake / 'config.json'} is not a lordo run's config.json " \
        "(KeyError: 'train')\n"
    run = lordo.train(NANO, steps=2, out=str(tmp_path / "run"), stop_at=1)
    code, err = run_cli(["train", *SMOKE, "--steps", "2", "--resume", "--stop-at", "1", "--out", str(run.dir)],
                        capsys)
    assert code == 2 and "stop_at=1 is invalid: allowed an int above the step the run resumes from (1)" in err
    lordo.train(NANO, steps=2, out=str(run.dir))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "paper.pdf").write_bytes(b"%PDF")
    for target, message in [(tmp_path / "mine", "holds files that are not a lordo export (paper.pdf)"),
                            (tmp_path / "mine" / "paper.pdf", "is a file, not a directory")]:
        code, err = run_cli(["export", str(run.dir), "--to", str(target)], capsys)
        assert code == 2 and message in err and err.count("\n") == 1, err
    assert (tmp_path / "mine" / "paper.pdf").read_bytes() == b"%PDF"
    code, err = run_cli(["eval", str(run.dir), "--batch-size", "0"], capsys)
    assert code == 2 and "batch_size=0 is invalid: allowed an int >= 1" in err
    assert "downstream" not in json.loads((run.dir / "summary.json").read_text())


@pytest.mark.integration
def test_a_full_disk_is_one_line_naming_the_file(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        done = finish("train", *SMOKE, "--steps", "4", "--checkpoint-every", "2", "--out", str(disk / "run"))
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert re.fullmatch(rf"lordo train: error: {disk}/run/\S+: .*\n", done.stderr), done.stderr
        assert not list(disk.rglob("*.tmp"))
    finally:
        subprocess.run(["umount", str(disk)], check=True)


# ---------------------------------------------------------------------- the README
def readme_commands() -> list[list[str]]:
    """Every `lordo ...` line of the README's bash blocks, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    lines = [line.strip() for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    return [shlex.split(line.replace("$NODE", "0"), comments=True) for line in lines if line.startswith("lordo ")]


def test_every_readme_command_works_as_written(tmp_path, monkeypatch, capsys):
    """Each train command must parse to a valid config as written; those a CPU can run, run (train at smoke
    size: the README's options, then --steps 3; eval, export as written but --limit 2)."""
    commands = readme_commands()
    assert [c[1] for c in commands] == ["train", "train", "train", "eval", "export"]
    (tmp_path / "configs").symlink_to(REPO / "configs")
    monkeypatch.chdir(tmp_path)
    for command in commands:
        if command[1] == "train":
            args = cli.build_parser().parse_args(command[1:])
            given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name) is not None}
            cfg = load_config(args.config, **given) if args.config else make_config(given)
            if cfg.preset not in ("nano", "tiny", "small"):
                continue                               # 720M on GPUs: checked as a config, not run here
            command = [*command, "--steps", "3", "--eval-batches", "1", "--no-progress"]
        elif command[1] == "eval":
            command = [*command, "--limit", "2"]
        try:
            cli.main(command[1:])
        except SystemExit as e:
            pytest.fail(f"{shlex.join(command)} exited {e.code}: {capsys.readouterr().err}")
    assert (tmp_path / "runs" / "x" / "summary.json").is_file()
    assert (tmp_path / "exported" / "x" / "model.safetensors").is_file()
