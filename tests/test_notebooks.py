"""The notebooks: committed clean and parameterized, presets consistent with them, one papermill run with
non-default parameters, and a bad parameter stopping at the first cell after the parameters."""

import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pandas as pd
import papermill
import pytest
import yaml
from papermill.iorw import load_notebook_node
from papermill.parameterize import parameterize_notebook

from lordo import analysis, reproduce
from lordo.model import preset_params

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("[0-9][0-9]_*.ipynb"))
PRESETS = {p.stem: yaml.safe_load(p.read_text()) for p in (NOTEBOOKS[0].parent / "params").glob("*.yaml")}
# differ by notebook, so no preset sets them
PER_NOTEBOOK = {"methods"}


def parameters(path: Path) -> dict:
    return papermill.inspect_notebook(str(path))


def test_seven_notebooks_and_three_presets():
    assert [p.stem.split("_")[0] for p in NOTEBOOKS] == ["00", "01", "02", "03", "04", "05", "06"]
    assert set(PRESETS) == {"smoke", "cpu", "paper"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_clean(path):
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata.kernelspec.name == "python3"
    assert nb.cells[0].cell_type == "markdown" and "Claim" in nb.cells[0].source
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert tagged == [1], "one parameters cell, right after the claim"
    assert "notebook_params(globals()" in nb.cells[2].source or "check_params(" in nb.cells[2].source, \
        "parameters are validated in the next cell"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, "commit notebooks without outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_presets_match_notebook_parameters(path):
    names = parameters(path)
    known = set().union(*(parameters(p) for p in NOTEBOOKS))
    for preset, values in PRESETS.items():
        assert set(values) <= known - PER_NOTEBOOK, f"{preset}.yaml sets names no notebook uses"
        assert set(names) - PER_NOTEBOOK <= set(values), f"{preset}.yaml leaves {path.stem} parameters unset"
    for name, spec in names.items():   # the notebook's own defaults are the smoke preset
        if name not in PER_NOTEBOOK:
            assert eval(spec["default"]) == PRESETS["smoke"][name], name


@pytest.mark.parametrize("preset", ["smoke", "cpu", "paper"])
def test_presets_are_valid(preset):
    values = PRESETS[preset]
    analysis.check_params(**values, methods=list(analysis.METHODS))


@pytest.mark.parametrize("bad, message", [
    (dict(methods=["ddp", "adamw"]), "parameter methods=.*allowed a non-empty list of"),
    (dict(rank=-1), "parameter rank=-1 is invalid"),
    (dict(rank=200), "rank=200 is invalid for preset tiny: allowed ints in \\[1, 96\\]"),
    (dict(rank=80), "rank=80 is invalid for preset nano: allowed ints in \\[1, 64\\]"),
    (dict(omegas=[1.5]), "parameter omegas"),
    (dict(colour="red"), "unknown parameter 'colour'"),
])
def test_check_params_one_line_errors(bad, message):
    with pytest.raises(ValueError, match=message) as e:
        analysis.check_params(**(PRESETS["smoke"] | {"methods": ["ddp", "lordo"]} | bad))
    assert "\n" not in str(e.value)


def test_notebook_params_reads_the_shared_and_own_names_from_the_globals():
    namespace = dict(PRESETS["smoke"], methods=["ddp", "lordo"], unrelated=1)
    P = analysis.notebook_params(namespace, "methods")
    assert set(P) == set(analysis.SHARED_PARAMS) | {"methods"} and P["methods"] == ["ddp", "lordo"]
    assert all(P[k] == PRESETS["smoke"][k] for k in analysis.SHARED_PARAMS)
    injected = "# Parameters\nsteps = 4\nstepz = 5\n"          # what papermill's injected cell holds
    with pytest.raises(ValueError, match="unknown notebook parameter 'stepz' \\(given to papermill\\)"):
        analysis.notebook_params(namespace | {"In": ["import x", injected]}, "methods")
    with pytest.raises(ValueError, match="parameter seeds=\\[-1\\] is invalid"):
        analysis.notebook_params(namespace | {"seeds": [-1]}, "methods")


def test_shared_runs_have_one_config():
    P = analysis.check_params(**PRESETS["cpu"])
    # what a notebook leaves at a default or a method ignores does not change the run
    assert analysis.run_config(P, "ddp", omega=0.5, rank=4).hash() == analysis.run_config(P, "ddp").hash()
    assert analysis.run_config(P, "lordo", omega=0.7).hash() == analysis.run_config(P, "lordo").hash()
    assert analysis.run_config(P, "lordo", rank=12).hash() == analysis.run_config(P, "lordo").hash()  # 0.125 x 96
    assert analysis.run_config(P, "lordo", moments_on_refresh="keep").hash() == analysis.run_config(P, "lordo").hash()
    assert analysis.run_config(P, "lordo", moments_on_refresh="reset").hash() != analysis.run_config(P, "lordo").hash()


def test_ladder_rungs_train_equal_tokens_per_parameter():
    P = analysis.check_params(**PRESETS["cpu"])
    rungs = {p: analysis.ladder_config(P, p, "lordo", 0) for p in ("nano", "tiny", "mini", "small")}
    per_param = {p: c.steps * c.tokens_per_step / preset_params(p) for p, c in rungs.items()}
    shared = P["steps"] * analysis.run_config(P, "lordo").tokens_per_step / preset_params(P["preset"])
    for p, c in rungs.items():   # within half a step of the shared point's tokens per parameter
        assert abs(per_param[p] - shared) <= 0.5 * c.tokens_per_step / preset_params(p), p
    assert rungs["nano"].steps < P["steps"] < rungs["mini"].steps < rungs["small"].steps
    assert rungs[P["preset"]].hash() == analysis.run_config(P, "lordo", seed=0).hash()   # the shared point's own run
    doubled = analysis.ladder_config(P | {"ladder_overrides": {"mini": {"batch_size": 8}}}, "mini", "lordo", 0)
    assert abs(doubled.steps - rungs["mini"].steps / 2) <= 0.5   # twice the batch, half the steps: the same tokens
    unequal = analysis.ladder_config(P | {"equal_tokens_per_param": False}, "mini", "lordo", 0)
    assert unequal.steps == P["steps"]
    for rung in rungs.values():   # the same schedule shape: warmup the same share of the steps
        assert abs(rung.warmup - rungs[P["preset"]].warmup * rung.steps / P["steps"]) <= 0.5
    with pytest.raises(ValueError, match=r"ladder_overrides=\{'mini': \{'steps': 10\}\} sets the steps or warmup "
                                         r"of mini while equal_tokens_per_param=True sets every rung's: allowed"):
        analysis.check_params(**PRESETS["cpu"] | {"ladder_overrides": {"mini": {"steps": 10}}})
    with pytest.raises(ValueError, match=r"equal_tokens_per_param=True is invalid with tokenizer='gpt2'"):
        analysis.ladder_config(P | {"ladder_overrides": {"mini": {"tokenizer": "gpt2"}}}, "mini", "lordo", 0)


def through_the_check(path: Path, parameters: dict) -> Path:
    """The notebook as papermill parameterizes it, cut after the cell that checks the parameters."""
    nb = parameterize_notebook(load_notebook_node(str(path)), parameters, kernel_name="python3")
    injected = next(i for i, c in enumerate(nb.cells) if "injected-parameters" in c.metadata.get("tags", []))
    nb.cells = nb.cells[:injected + 2]
    return nb


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_preset_file_passes_every_notebooks_check(path, preset, monkeypatch):
    """`papermill -f params/<preset>.yaml` injects every notebook's names: the check passes another notebook's,
    and a misspelt one is still one line. Run here in-process up to the check cell, as the kernel would."""
    monkeypatch.chdir(path.parent)
    for extra in ({}, {"stepz": 5}):
        nb = through_the_check(path, PRESETS[preset] | extra)
        namespace = {"In": []}
        code = [c.source for c in nb.cells if c.cell_type == "code"]
        for i, source in enumerate(code):
            namespace["In"].append(source)
            if extra and i == len(code) - 1:
                with pytest.raises(ValueError, match="^unknown notebook parameter 'stepz' \\(given to papermill\\): "
                                                     "allowed \\[[^\n]*'steps'[^\n]*\\]$"):
                    exec(source, namespace)
            else:
                exec(source, namespace)
        if not extra:
            assert namespace["P"]["results_dir"] == PRESETS[preset]["results_dir"]


@pytest.mark.integration
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_documented_papermill_command(path, tmp_path):
    """The command each notebook's first cell documents, typed in notebooks/: `papermill -f params/cpu.yaml
    <notebook> out.ipynb`, on the notebook cut after its parameter check (the full runs take minutes)."""
    first = nbformat.read(path, as_version=4).cells[0].source
    assert f"papermill -f params/cpu.yaml {path.name} out.ipynb" in " ".join(first.split())
    cut = tmp_path / path.name
    nb = nbformat.read(path, as_version=4)
    nb.cells = nb.cells[:3]
    nbformat.write(nb, cut)
    papermill_cli = lambda *args: subprocess.run([sys.executable, "-m", "papermill", "-f", "params/cpu.yaml", *args,
                                                  str(cut), str(tmp_path / "out.ipynb"), "-k", "python3",
                                                  "--no-progress-bar"], cwd=path.parent, capture_output=True,
                                                 text=True, timeout=300)
    out = papermill_cli()
    assert out.returncode == 0, out.stderr[-2000:]
    if path == NOTEBOOKS[0]:   # (each run starts a kernel: the misspelt name once)
        misspelt = papermill_cli("-p", "stepz", "5")
        assert misspelt.returncode != 0 and "ValueError: unknown notebook parameter 'stepz'" in misspelt.stderr


@pytest.mark.integration
@pytest.mark.parametrize("bad", [dict(methods=["nope"]), dict(rank=-1), dict(stepz=5)],
                         ids=["method", "rank", "misspelt"])
def test_bad_parameter_stops_at_first_cell(tmp_path, bad):
    path = NOTEBOOKS[0]
    with pytest.raises(papermill.PapermillExecutionError) as e:
        papermill.execute_notebook(str(path), str(tmp_path / "out.ipynb"), parameters=bad, kernel_name="python3",
                                   cwd=str(path.parent), progress_bar=False)
    assert e.value.ename == "ValueError" and "\n" not in e.value.evalue and "parameter" in e.value.evalue
    if "stepz" in bad:
        assert "unknown notebook parameter 'stepz'" in e.value.evalue and "'steps'" in e.value.evalue
    cells = [c for c in nbformat.read(tmp_path / "out.ipynb", as_version=4).cells if c.cell_type == "code"]
    injected = next(i for i, c in enumerate(cells) if "injected-parameters" in c.metadata.get("tags", []))
    assert "notebook_params(" in e.value.source and cells[injected + 1].source == e.value.source
    assert [c.execution_count is not None for c in cells] == [i <= injected + 1 for i in range(len(cells))]


@pytest.mark.integration
def test_papermill_with_other_parameters(tmp_path, monkeypatch):
    monkeypatch.setenv("LORDO_RUNS_DIR", str(tmp_path / "runs"))
    path = NOTEBOOKS[0]
    params = dict(preset="nano", methods=["lowrank_ddp", "lordo"], workers=2, steps=4, batch_size=1, seq_len=32, rank=2,
                  sync_every=2, eval_every=2, eval_batches=1, results_dir=str(tmp_path / "results"),
                  figures_dir=str(tmp_path / "figures"))
    papermill.execute_notebook(str(path), str(tmp_path / "out.ipynb"), parameters=params, kernel_name="python3",
                               cwd=str(path.parent), progress_bar=False)
    runs = pd.read_csv(tmp_path / "results" / path.stem / "runs.csv")
    assert sorted(runs["method"]) == ["lordo", "lowrank_ddp"] and set(runs["preset"]) == {"nano"}
    assert (runs["steps"] == 4).all() and (runs["workers"] == 2).all()
    assert (tmp_path / "figures" / path.stem / "overview.png").is_file()
    assert (tmp_path / "figures" / path.stem / "overview.pdf").is_file()
    assert len(pd.read_csv(tmp_path / "results" / path.stem / "claims.csv")) == 2
    assert len(list((tmp_path / "runs").glob("*-nano-*"))) == 2


def test_reproduce_selects_notebooks(capsys):
    assert [p.stem for p in reproduce.notebooks(["01", "03_rank_ablation"])] == ["01_projection_noise",
                                                                                "03_rank_ablation"]
    with pytest.raises(SystemExit) as done:
        reproduce.notebooks(["07"])
    assert done.value.code == 2 and "lordo.reproduce: no notebook '07'" in capsys.readouterr().err
