"""ComputeProjection and the subspace measures, batched over stacks of same-shape matrices.

Every function takes a stack X of shape (n, p, q) and works on the left side: the projection
of an oriented matrix is its top-r left singular vectors, Q of shape (n, p, r), orthonormal
columns. The optimizer orients each weight so that p <= q (GaLore's rule), so Q is always the
small side.

Determinism is what lets every replica hold the same Q without sending it: the same input
bits give the same output bits (randomized sketches draw from a generator seeded by the
caller), and `canonical_signs` fixes the one freedom every method leaves, a column's sign.
"""

from __future__ import annotations

import torch

PROJ_METHODS = ("svd", "randomized", "power")
GESVDA_TOLERANCE = 1000   # gesvda's |U^T U - I| accepted, in units of the dtype's eps (float32: 1.2e-4)


def is_transposed(shape: tuple[int, ...] | torch.Size) -> bool:
    """Whether a matrix is stored q x p with p < q: its projected (smaller) side is its second (GaLore's rule)."""
    return shape[-2] > shape[-1]


def oriented(t: torch.Tensor, transposed: bool) -> torch.Tensor:
    """A matrix (or a stack) as p x q, the projected side first: t itself, or t.mT if it is stored transposed."""
    return t.mT if transposed else t


def canonical_signs(Q: torch.Tensor) -> torch.Tensor:
    """Flip each column so that its largest-magnitude entry is positive."""
    idx = Q.abs().argmax(dim=-2, keepdim=True)
    signs = torch.sign(torch.gather(Q, -2, idx))
    return Q * torch.where(signs == 0, torch.ones_like(signs), signs)


def _top_left_singular(W: torch.Tensor, rank: int) -> torch.Tensor:
    """Top-`rank` left singular vectors of a tall, thin stack W (n, p, l). Where it applies, a faster
    factorization first (benchmarks/projection_refresh.py): on CUDA cuSOLVER's batched tall-and-thin SVD
    (gesvda), since torch's batched QR and SVD loop over the matrices there (50-90 times slower than gesvda on
    an H200); on a CPU, for a float32 W, the eigenvectors of W^T W in float64 (0.4-0.7x QR and SVD's time at
    two threads, the same at one, and closer to the exact subspace). Else, or where either declines for one
    matrix of the stack, `_qr_svd` for the whole stack."""
    U = None
    if W.is_cuda and torch.version.hip is None:
        U = _gesvda(W, rank)
    elif W.device.type == "cpu" and W.dtype == torch.float32:
        U = _gram_eigh(W, rank)
    return _qr_svd(W, rank) if U is None else U


def _qr_svd(W: torch.Tensor, rank: int) -> torch.Tensor:
    """QR of W, then the l x l SVD of R: any W, in W's precision."""
    Qw, R = torch.linalg.qr(W)
    return Qw @ torch.linalg.svd(R)[0][..., :rank]


def _gram_eigh(W: torch.Tensor, rank: int, floor: float = 1e-10) -> torch.Tensor | None:
    """U = W V / sigma from the top eigenpairs (V, sigma^2) of W^T W, computed in float64 (float32's products
    are exact there; only the sums round). Squaring the spectrum costs accuracy below sigma_1 sqrt(floor), so
    where a matrix's rank-th eigenvalue is under `floor` times its largest (a zero or rank-deficient matrix) it
    gives None."""
    W64 = W.double()
    eigenvalues, V = torch.linalg.eigh(W64.mT @ W64)        # ascending
    top, V = eigenvalues[..., -rank:].flip(-1), V[..., -rank:].flip(-1)
    if not bool((top[..., -1] > floor * top[..., 0]).all()):
        return None
    return (W64 @ (V / top.sqrt().unsqueeze(-2))).to(W.dtype)


def _gesvda(W: torch.Tensor, rank: int) -> torch.Tensor | None:
    """gesvda's top-`rank` left singular vectors, or None where it cannot give them. It works from W^T W, so on
    a (nearly) rank-deficient W (a zero matrix in the stack, a matrix of rank below l) it fails to converge or
    returns columns that are not orthonormal (both seen on an H200). Orthonormal columns U = W V / sigma, with
    V orthogonal, are W's singular vectors, so orthonormality (one (n, r, r) product) is the check."""
    if W.numel() == 0:
        return None
    try:
        U = torch.linalg.svd(W, full_matrices=False, driver="gesvda")[0][..., :rank]
    except torch.linalg.LinAlgError:
        return None
    defect = (U.mT @ U - torch.eye(rank, dtype=U.dtype, device=U.device)).abs().amax()
    return U if bool(defect <= GESVDA_TOLERANCE * torch.finfo(U.dtype).eps) else None


def compute_projection(X: torch.Tensor, rank: int, method: str = "power", *, prev: torch.Tensor | None = None,
                       seed: int = 0, iters: int = 1, oversample: int = 8) -> torch.Tensor:
    """Top-`rank` left singular vectors of each matrix in X (n, p, q), as (n, p, rank).

    svd        exact, `torch.linalg.svd` (seconds for large matrices on a CPU)
    randomized subspace iteration (Halko-Martinsson-Tropp) from rank + `oversample` Gaussian columns
               (seeded by `seed`): `iters` + 1 products W = X X^T Y, the first being the sketch
    power      the same, warm-started: the start is `prev` (the last Q) plus `oversample` Gaussian
               columns, so `iters` products track a slowly moving subspace (as PowerSGD does) while
               the extra columns let new directions in; without `prev` it is `randomized`
    Each product reads X twice and costs as much as an optimizer step's matmuls, so nothing else does:
    the last W's own SVD (`_top_left_singular`) gives the basis, ordered by sigma^2,
    instead of a Rayleigh-Ritz product with X. Computed in float32 at least; returned in X's dtype.
    """
    if method not in PROJ_METHODS:
        raise ValueError(f"proj_method={method!r} is not one of {PROJ_METHODS}")
    if iters < 1:
        raise ValueError(f"iters={iters} must be >= 1")
    n, p, q = X.shape
    if not 1 <= rank <= min(p, q):
        raise ValueError(f"rank={rank} must be in [1, {min(p, q)}] for {p}x{q} matrices")
    dtype = X.dtype
    X = X.float() if dtype in (torch.float16, torch.bfloat16) else X
    if method == "svd":
        return canonical_signs(torch.linalg.svd(X, full_matrices=False)[0][..., :rank]).to(dtype)
    warm = method == "power" and prev is not None
    width = min(rank + oversample, p, q) - (rank if warm else 0)
    gen = torch.Generator(device=X.device).manual_seed(seed)
    Y = torch.randn(n, p, width, generator=gen, device=X.device, dtype=X.dtype) / p**0.5
    if warm:
        Y = torch.cat([prev.to(X.dtype), Y], dim=-1)
    for i in range(iters + (0 if warm else 1)):
        if i:
            Y = torch.linalg.qr(Y)[0]
        Y = X @ (X.mT @ Y)
    return canonical_signs(_top_left_singular(Y, rank)).to(dtype)


def basis_similarity(Q_new: torch.Tensor, Q_old: torch.Tensor) -> torch.Tensor:
    """mean(sigma^2(Q_new^T Q_old)) per matrix: 1 for the same subspace, r/p for random ones."""
    return ((Q_new.mT @ Q_old).square().sum(dim=(-2, -1)) / Q_new.shape[-1]).clamp(0, 1)


def energy_outside(Q: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """Fraction of ||X||_F^2 outside span(Q), per matrix (0 where X is zero).

    From the residual itself: 1 - inside/total would lose small fractions to cancellation.
    """
    total = X.square().sum(dim=(-2, -1))
    outside = (X - Q @ (Q.mT @ X)).square().sum(dim=(-2, -1))
    return torch.where(total > 0, outside / total.clamp_min(torch.finfo(X.dtype).tiny), torch.zeros_like(total))


def projection_distance(Q_a: torch.Tensor, Q_b: torch.Tensor) -> torch.Tensor:
    """||Q_a Q_a^T - Q_b Q_b^T||_F / sqrt(2r): 0 for the same subspace, 1 for orthogonal ones."""
    r = Q_a.shape[-1]
    return (2 * r - 2 * (Q_a.mT @ Q_b).square().sum(dim=(-2, -1))).clamp_min(0).sqrt() / (2 * r) ** 0.5


def extend_basis(basis: torch.Tensor | None, Q: torch.Tensor, tol: float = 1e-3) -> torch.Tensor:
    """Orthonormal basis of span(basis) + span(Q) for one matrix (p, k) and (p, r).

    Directions of Q whose component outside `basis` has singular value below `tol` are taken
    as already explored. Used for the dimension of the union of subspaces visited.
    """
    if basis is None:
        return Q.clone()
    if basis.shape[-1] >= basis.shape[-2]:
        return basis
    residual = Q - basis @ (basis.mT @ Q)
    U, S, _ = torch.linalg.svd(residual, full_matrices=False)
    new = U[:, S > tol][:, : basis.shape[-2] - basis.shape[-1]]
    return torch.cat([basis, new], dim=-1)


def visited_rank(visits: torch.Tensor) -> torch.Tensor:
    """Energy-weighted dimension of the subspaces visited: the participation ratio tr(V)^2 / ||V||_F^2 of
    V = sum of Q Q^T over refreshes, per matrix (n, p, p). r when every Q spans one subspace, p when the
    visits cover every direction equally; unlike `extend_basis`'s count, a direction visited once, faintly,
    weighs little."""
    trace = visits.diagonal(dim1=-2, dim2=-1).sum(-1)
    return trace.square() / visits.square().sum(dim=(-2, -1)).clamp_min(torch.finfo(visits.dtype).tiny)
