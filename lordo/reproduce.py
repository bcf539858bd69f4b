"""Reproduce the paper's sections: run every notebook on a preset, regenerate every figure and their README.

    python -m lordo.reproduce                          # the cpu preset (`make reproduce`): ~40 min on 2 cores
    python -m lordo.reproduce --preset smoke           # every notebook at smoke size, in minutes
    python -m lordo.reproduce --only 01 --only 03      # some notebooks (by number or name)
    python -m lordo.reproduce --preset paper           # the GPU-cluster runs (configs/paper/, torchrun; CUDA)

A preset is notebooks/params/<preset>.yaml (or a path to such a file), passed to papermill as the
parameters of every notebook. Executed notebooks go to <results_dir>/<notebook>/<notebook>.ipynb beside
their tables; figures to <figures_dir>/<notebook>/; <figures_dir>/README.md lists every figure with its
caption, the claims table of every notebook, and how long each notebook took.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd

from lordo.analysis.claims import short_claims
from lordo.files import write_atomic, write_json
from lordo.paths import REPO, git_commit, repo_path

NOTEBOOKS = REPO / "notebooks"


def notebooks(only: list[str] | None = None) -> list[Path]:
    """The notebooks in order; `only` selects by name or number prefix ('01', '01_projection_noise')."""
    found = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if not only:
        return found
    chosen = [p for p in found if any(p.stem == o or p.stem.startswith(f"{o}_") for o in only)]
    missing = [o for o in only if not any(p.stem == o or p.stem.startswith(f"{o}_") for p in found)]
    if missing:
        usage_error("lordo.reproduce", f"no notebook {missing[0]!r}: choose from {[p.stem for p in found]}")
    return chosen


def usage_error(prog: str, message: str) -> None:
    """Bad input: one line naming it, exit status 2."""
    print(f"{prog}: {message}", file=sys.stderr)
    raise SystemExit(2)


def load_preset(preset: str, prog: str = "lordo.reproduce") -> dict[str, Any]:
    """notebooks/params/<preset>.yaml, or a .yaml path: a mapping of parameters (else one line, exit 2)."""
    from lordo.config import read_config_file

    path = Path(preset) if preset.endswith((".yaml", ".yml")) else NOTEBOOKS / "params" / f"{preset}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in (NOTEBOOKS / "params").glob("*.yaml"))
        usage_error(prog, f"no preset {preset!r}: choose from {names} or give a .yaml path")
    try:
        return read_config_file(path)
    except ValueError as e:
        usage_error(prog, str(e).replace("config file", "preset file").replace("field: value", "parameter: value"))


def title(notebook: Path) -> tuple[str, str]:
    """The notebook's heading and its claim paragraph, from its first (markdown) cell."""
    source = json.loads(notebook.read_text())["cells"][0]["source"]
    lines = ("".join(source) if isinstance(source, list) else source).splitlines()
    heading = lines[0].lstrip("# ").strip()
    paragraph = []
    for line in lines[1:]:
        if line.strip() or not paragraph:
            paragraph.append(line.strip())
        else:
            break
    return heading, " ".join(p for p in paragraph if p)


README_HEADING = "# Figures: the `"   # the first line of every README write_readme wrote


def check_figures_dir(figures: Path) -> dict[str, dict[str, Any]]:
    """A figures_dir's README.md and timings.json are replaced only when lordo.reproduce wrote them (told by
    their content); one line, exit 2, before any notebook runs, for a user's file there. Returns the timings."""
    readme, timings_file = figures / "README.md", figures / "timings.json"
    if readme.is_file() and not readme.read_text(errors="replace").startswith(README_HEADING):
        usage_error("lordo.reproduce", f"{readme} is not a README lordo.reproduce wrote (it does not begin "
                    f"{README_HEADING}<preset>` preset'); lordo replaces nothing of yours: move it, or choose "
                    "another figures_dir")
    if not timings_file.is_file():
        return {}
    try:
        timings = json.loads(timings_file.read_text())
        if isinstance(timings, dict) and all(isinstance(v, dict) and "seconds" in v for v in timings.values()):
            return timings
    except (ValueError, UnicodeDecodeError):
        pass
    usage_error("lordo.reproduce", f"{timings_file} is not the notebook timings lordo.reproduce wrote; lordo "
                "replaces nothing of yours: move it, or choose another figures_dir")


def write_readme(params: dict[str, Any], preset: str, timings: dict[str, dict[str, Any]]) -> Path:
    """<figures_dir>/README.md: every figure with its caption, the claims, the runtimes. Reads only what the
    notebooks left beside their figures (captions.json, claims.csv) and `timings`, so a notebook run alone
    (--only) keeps every other notebook's part."""
    figures = repo_path(params["figures_dir"])
    import torch

    out = [f"{README_HEADING}{preset}` preset", "",
           f"Generated by `python -m lordo.reproduce --preset {preset}` (torch {torch.__version__}, "
           f"{os.cpu_count()} CPU cores, {platform.machine()}). Every figure is drawn from the tables in "
           f"`{params['results_dir']}/`, which the notebooks computed from runs in `runs/`. Paper figures are "
           "labelled as the paper's.", ""]
    claims = [pd.read_csv(p).assign(notebook=p.parent.name) for nb in notebooks()
              if (p := figures / nb.stem / "claims.csv").is_file()]
    if claims:
        table, details = short_claims(pd.concat(claims, ignore_index=True))
        out += ["## Claims: this run beside the paper", "", "This run's headline number (95% interval in brackets, "
                "over seeds) beside the paper's; each row's setting, seeds and further numbers are in "
                "[the details](#claim-details).", "", table, "", "### Claim details", "", *details, ""]
    if timings:
        out += ["## Runtime", "", "Wall-clock minutes of each notebook's latest execution and the commit it ran at; "
                "runs already in `runs/` are loaded, not retrained, so a notebook that reuses another's runs is fast "
                "after it.", "", "| notebook | minutes | commit |", "|---|---|---|"]
        out += [f"| {k} | {v['seconds'] / 60:.1f} | {v['commit']} |" for k, v in sorted(timings.items())]
        out += [f"| total | {sum(v['seconds'] for v in timings.values()) / 60:.1f} | |", ""]
    for nb in notebooks():
        captions_file = figures / nb.stem / "captions.json"
        if not captions_file.is_file():
            continue
        heading, claim = title(nb)
        out += [f"## {heading}", "", claim, ""]
        for name, caption in json.loads(captions_file.read_text()).items():
            out += [f"### {name}", "", f"![{name}]({nb.stem}/{name}.png)", "", caption,
                    f"([PDF]({nb.stem}/{name}.pdf); executed notebook: "
                    f"`{params['results_dir']}/{nb.stem}/{nb.stem}.ipynb`)", ""]
    figures.mkdir(parents=True, exist_ok=True)
    write_atomic(figures / "README.md", lambda f: f.write("\n".join(out)))
    return figures / "README.md"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lordo.reproduce", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="cpu", help="smoke | cpu | paper, or a parameters .yaml (default cpu)")
    parser.add_argument("--only", action="append", help="run only this notebook (name or number); repeatable")
    parser.add_argument("--readme-only", action="store_true", help="rewrite the figures' README from existing results")
    args = parser.parse_args(argv)
    import papermill
    from tqdm import tqdm

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)   # papermill streams cells
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    params = load_preset(args.preset)
    preset = Path(args.preset).stem
    if params.get("launcher") == "torchrun" and not args.readme_only:
        import torch
        if not torch.cuda.is_available():
            usage_error("lordo.reproduce", f"the {preset} preset trains 125M-720M models with torchrun on GPUs "
                        "(configs/paper/); no CUDA device here. Use --preset cpu on a CPU.")
    for key in ("results_dir", "figures_dir"):
        if not isinstance(params.get(key), str):
            usage_error("lordo.reproduce", f"preset {args.preset!r} parameter {key}={params.get(key)!r} is invalid: "
                        "allowed a directory path")
    results = repo_path(params["results_dir"])
    timings_file = repo_path(params["figures_dir"]) / "timings.json"
    timings = check_figures_dir(timings_file.parent)
    chosen = [] if args.readme_only else notebooks(args.only)
    start = time.perf_counter()
    for nb in tqdm(chosen, desc=f"notebooks ({preset})", unit="notebook", file=sys.stdout, disable=not chosen):
        out = results / nb.stem / f"{nb.stem}.ipynb"
        out.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        print(f"\n== {nb.stem}: papermill -f notebooks/params/{preset}.yaml -> {out.relative_to(REPO)}", flush=True)
        declared = papermill.inspect_notebook(nb)   # a preset names every notebook's parameters; pass its own
        papermill.execute_notebook(nb, out, parameters={k: v for k, v in params.items() if k in declared},
                                   kernel_name="python3", cwd=str(NOTEBOOKS), progress_bar=False, log_output=True)
        timings[nb.stem] = {"seconds": round(time.perf_counter() - t0, 1),
                            "commit": git_commit(short=True) or "unknown"}
        write_json(timings_file, timings)
        print(f"== {nb.stem}: {timings[nb.stem]['seconds'] / 60:.1f} min", flush=True)
    readme = write_readme(params, preset, timings)
    if chosen:
        print(f"\n{len(chosen)} notebook(s) in {(time.perf_counter() - start) / 60:.1f} min; figures and "
              f"README in {readme.parent.relative_to(REPO)}/")


if __name__ == "__main__":
    main()
