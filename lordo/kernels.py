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
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
import warnings
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
