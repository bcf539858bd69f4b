"""Compiled CPU kernels for the low-rank step (lordo/csrc/lowrank_cpu.cpp), built on first use.

    from lordo.kernels import lowrank_cpu
    ext = lowrank_cpu()          # the module, or None when it cannot be built here (`build_error()` says why)

`torch.utils.cpp_extension.load` compiles the source with the C++ compiler and ninja once per machine,
checkout and source version (about 40 s) into its cache (`TORCH_EXTENSIONS_DIR`, else
~/.cache/torch_extensions); later imports load the cached library. The kernels compute each rank-r product in
registers during their one pass over the full-size tensors, with AVX-512 or AVX2 where the CPU has them
(`ext.isas()`, `ext.set_isa(name)`). Their rounding is fixed by the order of the sums, not by the tiling or the
threads, so the results are the same at any thread count and with any of the instruction sets; they differ from
the optimizer's eager path (`LoRDO(..., fused=False)`, BLAS products) in the last bits (tests/test_kernels.py).

Whether they beat the eager path depends on the CPU (the plain C++ build on a CPU without FMA instructions
calls the C library per multiply-add), so `LoRDO(fused=None)` times both on each bucket's shape at first use and
keeps the faster (`calibrated`: the timings cached in calibration.json beside the built kernels).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

SOURCE = Path(__file__).with_name("csrc") / "lowrank_cpu.cpp"
# One build per checkout: torch keeps a build under its name, and ninja rebuilds it whenever the source's path
# changes, so two checkouts sharing the cache under one name would rebuild each other's on every switch.
NAME = "lordo_lowrank_cpu_" + hashlib.sha256(str(SOURCE.resolve()).encode()).hexdigest()[:10]
_lock = threading.Lock()
_built: dict[str, ModuleType | None] = {}
_error: list[str] = []


def _ninja_on_path() -> None:
    """`cpp_extension` runs `ninja` from PATH; the venv's own (the `ninja` wheel) is not on it unless the venv
    is activated."""
    venv_bin = os.path.dirname(sys.executable)
    if shutil.which("ninja") is None and os.path.exists(os.path.join(venv_bin, "ninja")):
        os.environ["PATH"] = venv_bin + os.pathsep + os.environ.get("PATH", "")


def lowrank_cpu() -> ModuleType | None:
    """The compiled kernels, or None (with one warning) when they cannot be built."""
    with _lock:
        if "lowrank_cpu" not in _built:
            try:
                _ninja_on_path()
                from torch.utils.cpp_extension import load
                # -ffp-contract=fast: the source writes each product as a * b + c, to be fused (see there);
                # -fno-math-errno: sqrt as an instruction
                _built["lowrank_cpu"] = load(NAME, [str(SOURCE)], verbose=False, extra_ldflags=["-fopenmp"],
                                             extra_cflags=["-O3", "-fopenmp", "-ffp-contract=fast", "-fno-math-errno"])
            except Exception as e:   # no compiler, no ninja, no Python headers: the eager path instead
                _built["lowrank_cpu"] = None
                _error.append(f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}")
                warnings.warn(f"lordo: the CPU kernels could not be built ({_error[-1]}); the low-rank step runs "
                              "its eager PyTorch path (the same math, slower). LoRDO(..., fused=False) skips "
                              "the build", stacklevel=3)
        return _built["lowrank_cpu"]


def build_error() -> str | None:
    """Why `lowrank_cpu()` returned None, if it did."""
    return _error[-1] if _error else None


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what `platform` knows."""
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine() or "unknown CPU"


def calibration_file() -> Path:
    """Where `calibrated` keeps its timings: beside the built kernels."""
    return Path(lowrank_cpu().__file__).with_name("calibration.json")


def calibrated(case: str, measure: Callable[[], dict[str, float]]) -> tuple[dict[str, float], bool]:
    """(seconds per path, cached): the timings recorded for `case` with this source, CPU and instruction set in
    `calibration_file()`, else `measure()`'s, recorded there. One process measures at a time (a file lock: the
    ranks of a run on one machine wait for the first and read its timings)."""
    ext, path = lowrank_cpu(), calibration_file()
    key = " | ".join((hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:10], cpu_model(), ext.set_isa(), case))
    try:
        lock = open(path.with_suffix(".lock"), "a")
    except OSError:   # a cache this user cannot write: measured in every process
        return measure(), False
    with lock:
        try:
            import fcntl
            fcntl.flock(lock, fcntl.LOCK_EX)
        except ImportError:   # Windows: no lock, at worst two processes measure at once
            pass
        try:
            table = json.loads(path.read_text())
        except (OSError, ValueError):   # none yet, or unreadable: measured again
            table = {}
        if key in table:
            return table[key], True
        table[key] = measure()
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
        os.replace(tmp, path)
        return table[key], False
