"""Optimizer-step benchmark: LoRDO's local step, sync and state against AdamW and GaLore.

    python benchmarks/optimizer_step.py [--shapes 30m,125m] [--ranks d/8,d/16] [--repeats N]
                                        [--device cpu|cuda] [--dtype float32|bfloat16]

No model and no data: each shape set is a plain list of parameters with the shapes of a
Llama-style decoder (`SHAPES`) and random gradients, so only the optimizer is timed.

1. Local step (no sync): `lordo` with its defaults (omega 0.7, error feedback, clip 1.0; on CPU in float32
   the compiled kernels of `lordo.kernels`), with `state_dtype="bfloat16"`, and on CPU with `fused=False`
   (the eager PyTorch path, the same math) and `fused=True` with each instruction set the kernels have on
   this CPU (`lordo kernels avx512/avx2/generic`; `lordo` itself takes, per shape, the faster of the kernels
   and the eager path, timed at its first step: the lines under the table say which), against
   `torch.optim.AdamW` (foreach and fused) and GaLore's `GaLoreAdamW` at the same rank. GaLore's
   steady step reuses its projection; its refresh step (an SVD of every matrix, every 200 steps)
   is timed separately and amortized: (199 steady + 1 refresh) / 200.
2. Sync: `LoRDO.sync()` per `proj_method` on the same optimizer, the projection part of it
   (`projection_seconds`), and the refresh amortized over K_x = 16 local steps as a share of
   16 local steps + 1 sync. One process (M = 1): the sync's all-reduce is a no-op here.
3. Optimizer-state bytes per parameter for every method in `METHODS` and for lordo with each memory
   option (`memory_stats(accelerator=True)`: kinds, and what a GPU would hold against host memory).

Timing: warmup steps first; the optimizers of one table take turns within every repeat (the
order rotates), so they see the same machine load; the table gives the median and the IQR in
ms, and each ratio is the median over repeats of (time / AdamW foreach time in that repeat).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import platform
import re
import statistics
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing

from lordo.kernels import build_error, cpu_model, lowrank_cpu  # noqa: E402
from lordo.model import PRESETS, swiglu_width  # noqa: E402
from lordo.optim import MEMORY_OPTIONS, METHODS, make_optimizer  # noqa: E402

K_X = 16              # local steps per sync for the amortized share
GALORE_GAP = 200      # GaLore's update_proj_gap
PROJ_METHODS = ("svd", "randomized", "power")
MEMORY_KINDS = ("moments", "projection", "error_feedback", "anchor", "outer_momentum")


_125M = PRESETS["125m"]
SHAPES = {   # name -> (d_model, n_layers, d_ff, vocab); tied embedding, no biases
    "30m": (512, 8, swiglu_width(512), 8192),
    "125m": (_125M["d_model"], _125M["n_layers"], _125M["d_ff"], _125M["vocab_size"]),
}


def galore_adamw() -> type:
    """`GaLoreAdamW` without running `galore_torch/__init__.py`.

    The package init also imports the 8-bit optimizer, which needs bitsandbytes (not installed).
    A bare module object with the package's `__path__` stands in for the package, so
    `importlib.import_module("galore_torch.adamw")` loads only adamw.py and its projector.
    """
    if "galore_torch" not in sys.modules:
        spec = importlib.util.find_spec("galore_torch")    # locates the package without executing it
        if spec is None:
            raise SystemExit("galore-torch is not installed (requirements-nodeps.txt)")
        stub = types.ModuleType("galore_torch")
        stub.__path__ = list(spec.submodule_search_locations)
        sys.modules["galore_torch"] = stub
    return importlib.import_module("galore_torch.adamw").AdamW


def make_params(shape: str, device: torch.device, dtype: torch.dtype) -> tuple[list, list]:
    """(matrices, rest) as leaf tensors with random gradients, global gradient norm 0.5.

    The norm stays under lordo's clip (1.0), so its in-place clipping multiplies by 1 and the
    gradients shared by every optimizer stay the same from step to step.
    """
    d, layers, ff, vocab = SHAPES[shape]
    gen = torch.Generator().manual_seed(0)
    mats = [(d, d)] * 4 + [(ff, d), (ff, d), (d, ff)]          # q k v o, gate up down
    mat_shapes = mats * layers
    rest_shapes = [(vocab, d)] + [(d,)] * (2 * layers + 1)       # embedding, 2 norms a layer, final norm
    numel = sum(torch.Size(s).numel() for s in mat_shapes + rest_shapes)

    def leaf(s: tuple[int, ...]) -> torch.Tensor:
        p = (torch.randn(s, generator=gen) * 0.02 if len(s) == 2 else torch.ones(s)).to(device, dtype)
        p.requires_grad_(True)
        p.grad = (torch.randn(s, generator=gen) * (0.5 / numel**0.5)).to(device, dtype)
        return p

    return [leaf(s) for s in mat_shapes], [leaf(s) for s in rest_shapes]


def describe(shape: str, mats: list, rest: list) -> str:
    d, layers, ff, vocab = SHAPES[shape]
    nm, nr = sum(p.numel() for p in mats), sum(p.numel() for p in rest)
    return (f"{shape}: d {d}, {layers} layers, d_ff {ff}, vocab {vocab} (tied): {len(mats)} matrices "
            f"{nm / 1e6:.1f}M + {len(rest)} others {nr / 1e6:.1f}M = {(nm + nr) / 1e6:.1f}M parameters")


class Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> float:
        """Seconds for fn(), with the device idle before and after."""
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def stats(xs: list[float]) -> tuple[float, float]:
    """(median, IQR) of xs."""
    if len(xs) < 2:
        return xs[0], 0.0
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q2, q3 - q1


def ms(xs: list[float]) -> str:
    """Median and IQR in ms (no IQR for a single sample)."""
    med, iqr = stats(xs)
    return f"{1e3 * med:10.1f} " + (f"{1e3 * iqr:8.1f}" if len(xs) > 1 else f"{'-':>8}")


class OnIsa:
    """An optimizer whose steps run the compiled kernels with one instruction set (`set_isa`), switched back after."""

    def __init__(self, opt, isa: str):
        self.opt, self.isa = opt, isa

    def step(self) -> None:
        before = lowrank_cpu().set_isa(self.isa)
        try:
            self.opt.step()
        finally:
            lowrank_cpu().set_isa(before)


def optimizers(mats: list, rest: list, rank: int, ablations: bool) -> dict:
    """Every optimizer of table 1 on the same (shared) parameters and gradients."""
    common = dict(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    galore_groups = [dict(params=mats, rank=rank, update_proj_gap=GALORE_GAP, scale=1.0, proj_type="std"),
                     dict(params=rest)]
    lordo = lambda **hp: make_optimizer("lordo", [dict(params=mats, lowrank=True), dict(params=rest, lowrank=False)],
                                        rank=rank, lr=1e-3, sync_every=10**9, **hp)   # no sync in the steps
    opts = {
        "AdamW foreach": torch.optim.AdamW(mats + rest, foreach=True, **common),
        "AdamW fused": torch.optim.AdamW(mats + rest, fused=True, **common),
        "GaLoreAdamW steady": galore_adamw()(galore_groups, eps=1e-8, no_deprecation_warning=True, **common),
        "lordo": lordo(),
        "lordo state_dtype=bfloat16": lordo(state_dtype="bfloat16"),
    }
    if mats[0].device.type == "cpu" and mats[0].dtype == torch.float32:   # where the compiled kernels apply
        opts["lordo fused=False"] = lordo(fused=False)
        for isa in lowrank_cpu().isas() if lowrank_cpu() is not None else ():
            opts[f"lordo kernels {isa}"] = OnIsa(lordo(fused=True), isa)
    if ablations:   # what the parts of lordo's step cost (GaLore neither clips nor keeps error feedback)
        opts |= {"lordo clip=None": lordo(clip=None, nonfinite="off"),
                 "lordo error_feedback=False": lordo(error_feedback=False),
                 "lordo omega=1": lordo(omega=1.0)}
    return opts


def bench_steps(opts: dict, timer: Timer, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Interleaved step times; the first warmup steps (GaLore's and lordo's first projection) untimed."""
    for opt in opts.values():
        for _ in range(warmup):
            opt.step()
    names = list(opts)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(repeats):
        for name in names[i % len(names):] + names[:i % len(names)]:
            times[name].append(timer(opts[name].step))
    return times


def bench_galore_refresh(opt, mats: list, timer: Timer, repeats: int) -> list[float]:
    """GaLore steps that recompute the projection: each matrix's step counter set to a multiple of 200."""
    times = []
    for i in range(repeats):
        for p in mats:
            opt.state[p]["step"] = GALORE_GAP * (i + 1)
        times.append(timer(opt.step))
    return times


def bench_sync(opt, timer: Timer, repeats: dict[str, int]) -> dict[str, tuple[list, list]]:
    """(sync seconds, projection seconds) per proj_method, each after one untimed local step.

    proj_method is switched on the one optimizer through `opt.hparams` (read at every refresh),
    so "power" is warm-started from the previous projection as in training.
    """
    default = opt.hparams["proj_method"]
    out = {}
    for method in PROJ_METHODS:
        opt.hparams["proj_method"] = method
        sync_s, proj_s = [], []
        for _ in range(repeats[method]):
            opt.step()
            before = opt.projection_seconds
            sync_s.append(timer(opt.sync))
            proj_s.append(opt.projection_seconds - before)
        out[method] = (sync_s, proj_s)
    opt.hparams["proj_method"] = default
    return out


def state_bytes(opt) -> int:
    """Bytes of every tensor in a torch optimizer's state (GaLore: moments and projector)."""
    total = 0
    for s in opt.state.values():
        for v in s.values():
            v = getattr(v, "ortho_matrix", v)
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
    return total


def memory_table(shape: str, mats: list, rest: list, rank: int, measured: dict[str, int]) -> str:
    """Table 3 for one rank; returns the verdict on the memory targets (lordo with both options)."""
    n = sum(p.numel() for p in mats + rest)
    cols = (*MEMORY_KINDS, "total", "device", "host")
    print(f"\n[3] optimizer state, bytes per parameter ({n / 1e6:.1f}M parameters, rank {rank}, "
          f"{mats[0].dtype}; from memory_stats(accelerator=True), before any step: device = on a GPU)")
    print(f"  {'method':<32}" + "".join(f"{k[:14]:>15}" for k in cols))
    rows = {m: (m, {}) for m in METHODS} | {f"lordo {name}": ("lordo", hp) for name, hp in MEMORY_OPTIONS.items()
                                              if hp}
    mem = {}
    for name, (method, hp) in rows.items():
        groups = [dict(params=mats, lowrank=True), dict(params=rest, lowrank=False)]
        opt = make_optimizer(method, groups, rank=rank, **hp)
        mem[name] = opt.memory_stats(accelerator=True)
        print(f"  {name:<32}" + "".join(f"{mem[name][k] / n:15.2f}" for k in cols))
    for name, b in measured.items():    # reference optimizers, from their allocated state
        print(f"  {name:<32}{'':>75}{b / n:15.2f}")
    best, adam = mem["lordo bf16 state + host anchor"], mem["ddp"]["total"]
    device, total = best["device"] / adam, best["total"] / adam
    return (f"{shape} rank {rank}: lordo with bf16 state + host anchor, on a GPU: device state {device:.2f}x "
            f"AdamW's (target <= 0.5): {'MET' if device <= 0.5 else 'NOT MET'}; total {total:.2f}x "
            f"(target <= 1.0): {'MET' if total <= 1.0 else 'NOT MET'}")


def step_table(shape: str, rank: int, opts: dict, mats: list, args, timer: Timer) -> tuple[float, str]:
    """Table 1 for one rank; returns lordo's median step (s) and the verdict on the target."""
    t0 = time.perf_counter()
    times = bench_steps(opts, timer, args.repeats, args.warmup)
    refresh = bench_galore_refresh(opts["GaLoreAdamW steady"], mats, timer, args.refresh_repeats)
    base, steady = stats(times["AdamW foreach"])[0], stats(times["GaLoreAdamW steady"])[0]
    amortized = ((GALORE_GAP - 1) * steady + stats(refresh)[0]) / GALORE_GAP
    print(f"\n[1] local step, {shape}, rank {rank} ({time.perf_counter() - t0:.0f} s): ms; ratio = median "
          f"over repeats of time / AdamW foreach time (GaLore rows below: of medians)")
    print(f"  {'optimizer':<30}{'median':>10} {'IQR':>8} {'ratio':>7}")
    for name, ts in times.items():
        paired = statistics.median(t / b for t, b in zip(ts, times["AdamW foreach"]))
        print(f"  {name:<30}{ms(ts)} {paired:7.2f}")
    print(f"  {'GaLoreAdamW refresh (SVD)':<30}{ms(refresh)} {stats(refresh)[0] / base:7.2f}")
    print(f"  {'GaLoreAdamW amortized /200':<30}{1e3 * amortized:10.1f} {'':>8} {amortized / base:7.2f}")
    for row in opts["lordo"].step_paths():   # the path lordo's default took per shape, and why
        timed = (f": kernels {row['kernels_ms']:.1f} ms, eager {row['eager_ms']:.1f} ms a step of "
                 f"{min(row['matrices'], 4)}" if "kernels_ms" in row else "")
        print(f"  lordo {row['matrices']} x {row['stored_shape'][0]}x{row['stored_shape'][1]}: {row['path']} "
              f"({row['why']}{timed})")
    lordo = stats(times["lordo"])[0]
    vs = statistics.median(a / b for a, b in zip(times["lordo"], times["GaLoreAdamW steady"]))
    fused = statistics.median(a / b for a, b in zip(times["lordo"], times["AdamW fused"]))
    d16 = rank == SHAPES[shape][0] // 16      # the target for fused AdamW is at rank d/16
    verdict = (f"{shape} rank {rank}: lordo local step / GaLoreAdamW steady step = {vs:.2f} (target <= 1): "
               f"{'MET' if vs <= 1 else 'NOT MET'}; / GaLore amortized = {lordo / amortized:.2f}; "
               f"/ AdamW fused = {fused:.2f}" + (f" (target <= 2.0 at d/16): {'MET' if fused <= 2 else 'NOT MET'}"
                                                 if d16 else ""))
    if "lordo fused=False" in times:
        eager = statistics.median(a / b for a, b in zip(times["lordo fused=False"], times["AdamW fused"]))
        verdict += f"; eager path (fused=False) / AdamW fused = {eager:.2f}"
        paired = lambda name: statistics.median(a / b for a, b in zip(times[name], times["lordo fused=False"]))
        verdict += (f"; lordo (default) / eager = {paired('lordo'):.2f} (target <= 1): "
                    f"{'MET' if paired('lordo') <= 1 else 'NOT MET'}; kernels / eager per instruction set: "
                    + ", ".join(f"{n.split()[-1]} {paired(n):.2f}" for n in times if n.startswith("lordo kernels ")))
    return lordo, verdict


def sync_table(shape: str, rank: int, opt, step_s: float, args, timer: Timer) -> str:
    """Table 2 for one rank; returns the verdict on the target (for the default proj_method)."""
    t0 = time.perf_counter()
    reps = {m: args.svd_repeats if m == "svd" else args.sync_repeats for m in PROJ_METHODS}
    syncs = bench_sync(opt, timer, reps)
    print(f"\n[2] sync, {shape}, rank {rank} ({time.perf_counter() - t0:.0f} s): ms; share = time / "
          f"({K_X} local steps of {1e3 * step_s:.1f} ms + 1 sync)")
    print(f"  {'proj_method':<14}{'sync':>10} {'IQR':>8}{'projection':>12} {'IQR':>8}"
          f"{'proj share':>12}{'sync share':>12}")
    verdict = ""
    for method, (sync_s, proj_s) in syncs.items():
        s, p = stats(sync_s)[0], stats(proj_s)[0]
        window = K_X * step_s + s
        print(f"  {method:<14}{ms(sync_s)}  {ms(proj_s)}{100 * p / window:11.1f}%{100 * s / window:11.1f}%")
        if method == opt.hparams["proj_method"]:
            met = "MET" if p < 0.1 * window else "NOT MET"
            verdict = (f"{shape} rank {rank}: projection refresh ({method}, the default) amortized over "
                       f"K_x={K_X}: {100 * p / window:.1f}% (target < 10%): {met}")
    return verdict


def resolve_ranks(ranks: list[str], shape: str) -> list[int]:
    """Ranks as given ("32") or as a fraction of the shape's d_model ("d/16")."""
    d = SHAPES[shape][0]
    return [d // int(r[2:]) if r.startswith("d/") else int(r) for r in ranks]


def run_shape(shape: str, args, device: torch.device, dtype: torch.dtype, timer: Timer) -> list[str]:
    mats, rest = make_params(shape, device, dtype)
    print(f"\n=== {describe(shape, mats, rest)}")
    verdicts = []
    for rank in resolve_ranks(args.ranks, shape):
        measured: dict[str, int] = {}
        if {"step", "sync"} & set(args.sections):
            opts = optimizers(mats, rest, rank, args.ablations)
            step_s, verdict = step_table(shape, rank, opts, mats, args, timer)
            verdicts.append(verdict)
            measured = {"AdamW (measured)": state_bytes(opts["AdamW fused"]),
                        "GaLoreAdamW (measured)": state_bytes(opts["GaLoreAdamW steady"])}
            if "sync" in args.sections:
                verdicts.append(sync_table(shape, rank, opts["lordo"], step_s, args, timer))
            del opts
        if "memory" in args.sections:
            verdicts.append(memory_table(shape, mats, rest, rank, measured))
    return verdicts


def environment(device: torch.device, dtype: torch.dtype) -> str:
    ext = lowrank_cpu() if device.type == "cpu" and dtype == torch.float32 else None
    isas = (f"; CPU kernels' instruction sets: {', '.join(ext.isas())} ({ext.set_isa()} by default)" if ext
            else f"; CPU kernels: not built ({build_error()})" if device.type == "cpu" and dtype == torch.float32
            else "")
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    lines = [f"torch {torch.__version__}, python {platform.python_version()}, {dtype}, device {device}",
             f"CPU {cpu_model()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}{isas}; transparent "
             f"huge pages {thp.read_text().strip() if thp.exists() else 'n/a'}, "
             f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}"]
    if device.type == "cuda":
        lines.append(f"GPU {torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="30m,125m", help=f"comma-separated, from {sorted(SHAPES)}")
    ap.add_argument("--ranks", default="d/8,d/16",
                    help="comma-separated ranks, GaLore and lordo alike: integers, or d/N (d_model / N)")
    ap.add_argument("--repeats", type=int, default=7, help="timed local steps per optimizer")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per optimizer first")
    ap.add_argument("--refresh-repeats", type=int, default=1, help="timed GaLore refresh (SVD) steps")
    ap.add_argument("--sync-repeats", type=int, default=3, help="timed syncs, randomized and power")
    ap.add_argument("--svd-repeats", type=int, default=1, help="timed syncs with exact SVD")
    ap.add_argument("--sections", default="step,sync,memory", help="step,sync,memory (sync needs step)")
    ap.add_argument("--ablations", action="store_true", help="lordo without clip / error feedback / QH too")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args(argv)
    args.shapes = args.shapes.split(",")
    args.ranks = args.ranks.split(",")
    args.sections = args.sections.split(",")
    bad = [s for s in args.shapes if s not in SHAPES] + [s for s in args.sections
                                                        if s not in ("step", "sync", "memory")]
    bad += [r for r in args.ranks if not re.fullmatch(r"[1-9][0-9]*|d/[1-9][0-9]*", r)]
    if bad or min(args.repeats, args.sync_repeats, args.svd_repeats, args.refresh_repeats) < 1:
        ap.error(f"invalid --shapes/--sections/--ranks {bad} or a repeat count < 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    print(environment(device, dtype))
    print(f"repeats {args.repeats} (warmup {args.warmup}), GaLore refresh {args.refresh_repeats}, sync "
          f"{args.sync_repeats} (svd {args.svd_repeats}); ranks {args.ranks}")
    t0 = time.perf_counter()
    verdicts = []
    for shape in args.shapes:
        verdicts += run_shape(shape, args, device, dtype, Timer(device))
    if verdicts:
        print("\nTargets (issue; measured on this machine):")
        print("\n".join(f"  {v}" for v in verdicts))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
