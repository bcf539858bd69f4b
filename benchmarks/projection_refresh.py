"""The projection refresh's factorization: where its time goes, and the alternatives, on this device.

    python benchmarks/projection_refresh.py [--device cpu|cuda] [--shapes 30m,125m]

The power refresh (`lordo.projection.compute_projection`, proj_method="power") multiplies each stack X of
same-shape matrices twice, Y = X (X^T [Q_prev, 8 Gaussian columns]), and then takes the top-r left singular
vectors of the tall, thin Y (n x p x (r + 8)). This times, per shape set and rank, summed over its stacks
(`optimizer_step.SHAPES`, oriented p <= q):

  refresh        compute_projection itself (what lordo runs: its factorization is `_top_left_singular`)
  products       the two products with X
  qr + svd       QR of Y, then the SVD of R (`projection._qr_svd`): the fallback, and a float64 Y's on a CPU
  gesvda         cuSOLVER's batched tall-and-thin SVD of Y with its check (`projection._gesvda`): the CUDA path
  gesvdj         cuSOLVER's batched Jacobi SVD of Y (CUDA only)
  host qr + svd  Y copied to the CPU, QR + SVD there, back (CUDA only)
  gram eigh f64  eigenvectors of Y^T Y in float64, U = Y V / sigma (`projection._gram_eigh`): the CPU path

and each factorization's error: the larger of |U^T U - I| and the share of Y's top-r energy it misses,
1 - ||U^T Y||^2 / ||U*^T Y||^2 with U* from Y's float64 SVD. The stacks have a 1/i spectrum (like gradients:
no gap at r, so the top-r subspace itself is ill-defined and an energy, not a distance, is the fair measure).
Times are medians of `--repeats` after two warm-up calls; ratios are against "qr + svd" in the same process.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing

from optimizer_step import SHAPES  # noqa: E402

from lordo import projection  # noqa: E402
from lordo.projection import canonical_signs, compute_projection  # noqa: E402


def stacks(shape: str) -> list[tuple[int, int, int]]:
    """(n, p, q) of each bucket of same-shape matrices, oriented p <= q."""
    d, layers, d_ff, _ = SHAPES[shape]
    return [(4 * layers, d, d), (3 * layers, d, d_ff)]


def spectrum_stack(n: int, p: int, q: int, device: torch.device, seed: int) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    U = torch.linalg.qr(torch.randn(n, p, p, device=device, generator=gen))[0]
    V = torch.linalg.qr(torch.randn(n, q, p, device=device, generator=gen))[0]
    return (U / torch.arange(1, p + 1, device=device)) @ V.mT


def power_products(X: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    return X @ (X.mT @ start)


def cusolver(driver: str):
    return lambda Y, r: torch.linalg.svd(Y, full_matrices=False, driver=driver)[0][..., :r]


def host_qr_svd(Y: torch.Tensor, r: int) -> torch.Tensor:
    return projection._qr_svd(Y.cpu(), r).to(Y.device)


FACTORIZATIONS = {"qr + svd": projection._qr_svd, "gesvda": projection._gesvda, "gesvdj": cusolver("gesvdj"),
                  "host qr + svd": host_qr_svd, "gram eigh f64": projection._gram_eigh}
CUDA_ONLY = ("gesvda", "gesvdj", "host qr + svd")


def median_ms(device: torch.device, repeats: int, fn, *args, **kwargs) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        fn(*args, **kwargs)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn(*args, **kwargs)
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def error(U: torch.Tensor, Y: torch.Tensor, r: int) -> float:
    Y, U = Y.double(), U.double()
    exact = torch.linalg.svd(Y, full_matrices=False)[0][..., :r]
    missed = 1 - (U.mT @ Y).square().sum(dim=(-2, -1)) / (exact.mT @ Y).square().sum(dim=(-2, -1))
    orthonormal = (U.mT @ U - torch.eye(r, dtype=U.dtype, device=U.device)).abs().max().item()
    return max(missed.abs().max().item(), orthonormal)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    ap.add_argument("--shapes", default="30m,125m", help=f"comma-separated, from {sorted(SHAPES)}")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    for shape in args.shapes.split(","):
        if shape not in SHAPES:
            ap.error(f"--shapes: {shape!r} is not one of {sorted(SHAPES)}")
    names = [k for k in FACTORIZATIONS if device.type == "cuda" or k not in CUDA_ONLY]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}; float32, median of {args.repeats}; ms summed over the stacks; "
          "error: max(|U^T U - I|, top-r energy missed)")
    for shape in args.shapes.split(","):
        d = SHAPES[shape][0]
        for r in (d // 8, d // 16):
            ms = dict.fromkeys(["refresh", "products", *names], 0.0)
            worst = dict.fromkeys(names, 0.0)
            for seed, (n, p, q) in enumerate(stacks(shape)):
                X = spectrum_stack(n, p, q, device, seed)
                prev = canonical_signs(torch.linalg.svd(X + 0.01 * torch.randn_like(X))[0][..., :r])
                gen = torch.Generator(device=device).manual_seed(1)
                start = torch.cat([prev, torch.randn(n, p, 8, device=device, generator=gen) / p**0.5], dim=-1)
                ms["refresh"] += median_ms(device, args.repeats, compute_projection, X, r, "power", prev=prev, seed=1)
                ms["products"] += median_ms(device, args.repeats, power_products, X, start)
                Y = power_products(X, start)
                for name in names:
                    factor = FACTORIZATIONS[name]
                    ms[name] += median_ms(device, args.repeats, factor, Y, r)
                    U = factor(Y, r)     # None: the library's check declined (then the refresh falls back)
                    worst[name] = max(worst[name], float("inf") if U is None else error(U, Y, r))
            base = ms["qr + svd"]
            print(f"\n{shape}, rank {r}, stacks {stacks(shape)}:")
            print(f"  {'':<16}{'ms':>9}{'vs qr + svd':>13}{'error':>10}")
            for name, t in ms.items():
                err = f"{worst[name]:>10.1e}" if name in worst else ""
                print(f"  {name:<16}{t:>9.1f}{t / base:>12.2f}x{err}")


if __name__ == "__main__":
    main()
