"""Multi-block problems: several variable blocks, one global loss (GSO, seed 003).

A :class:`BlockProblem` is a :class:`~torch_l2o.problems.ProblemBase` with several blocks:
a batch of ``B`` instances of ``min F(x_1, ..., x_m)`` with ``F = f(x_1, ..., x_m) +
sum_b r_b(x_b)``, ``f`` smooth but non-convex jointly, each ``r_b`` named by a registered
prox. Blocks are tensors ``(B, *shape_b)``. Their families are plain
:class:`~torch_l2o.problems.ProblemFamily` objects.

* :class:`MatrixCompletion`: ``f(U, V) = 1/2 |P_Omega(R - U V^T)|^2 + lam/2 (|U|^2 + |V|^2)``,
  ``R`` rank-``r`` ``n x n``, factors of rank ``k_m``.
* :class:`GaussianMixture`: mean negative log-likelihood in the means and the mixing
  weights (``r`` = the simplex), covariances fixed and known (identity).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .base import ProblemBase, ProblemFamily

__all__ = ["BlockProblem", "BlockFamily", "MatrixCompletion", "MatrixCompletionProblem",
           "GaussianMixture", "GaussianMixtureProblem"]


@dataclass
class BlockProblem(ProblemBase):
    """Base: subclasses define ``blocks`` (names), :meth:`smooth`, :meth:`x0` and, where
    some ``r_b`` is not zero, :meth:`block_prox`."""

    def x0(self) -> list[Tensor]:
        """The starting point, one tensor ``(B, ...)`` per block."""
        raise NotImplementedError

    def starts(self) -> list[Tensor]:
        return self.x0()

    def metric(self, *xs: Tensor) -> Tensor:
        """The figure a benchmark reports, per instance (default: the objective)."""
        return self.objective(*xs)


class BlockFamily(ProblemFamily):
    """A family of :class:`BlockProblem`; kept so that existing subclasses and
    ``isinstance`` checks work (any :class:`ProblemFamily` may sample block problems)."""


@dataclass
class MatrixCompletionProblem(BlockProblem):
    R: Tensor = None        # (B, n, n) ground truth (never seen by the optimizers)
    mask: Tensor = None     # (B, n, n) 1 where observed
    U0: Tensor = None       # (B, n, k) starting factors
    V0: Tensor = None
    lam: float = 1e-3
    blocks = ("U", "V")

    def smooth(self, U: Tensor, V: Tensor) -> Tensor:
        res = self.mask * (self.R - U @ V.transpose(1, 2))
        return 0.5 * res.square().sum((1, 2)) + 0.5 * self.lam * (U.square().sum((1, 2)) + V.square().sum((1, 2)))

    def x0(self) -> list[Tensor]:
        return [self.U0.clone(), self.V0.clone()]

    def metric(self, U: Tensor, V: Tensor) -> Tensor:
        """RMSE = |R - U V^T|_F / |R|_F (the paper's "relative mean square error")."""
        return self.rmse(U @ V.transpose(1, 2))

    def rmse(self, X: Tensor) -> Tensor:
        return torch.linalg.matrix_norm(self.R - X) / torch.linalg.matrix_norm(self.R)

    @torch.no_grad()
    def als(self, ridge: float | None = None, rounds: int = 100) -> tuple[Tensor, Tensor]:
        """Alternating least squares from ``(U0, V0)``: each round solves every row of ``U``
        then of ``V`` exactly, ``min |P_Omega(R - U V^T)|^2 + ridge (|U|^2 + |V|^2)`` (the
        objective's own ``lam`` when ``ridge`` is None)."""
        ridge = self.lam if ridge is None else ridge
        U, V = self.U0.clone(), self.V0.clone()
        eye = torch.eye(U.shape[-1], dtype=U.dtype, device=U.device)

        def solve(M, R, W):  # rows of the factor multiplying W: (sum_j m_ij w_j w_j^T + ridge I)^-1 sum_j m_ij r_ij w_j
            G = torch.einsum("bij,bjk,bjl->bikl", M, W, W) + ridge * eye
            rhs = torch.einsum("bij,bjk->bik", M * R, W)
            return torch.linalg.solve(G, rhs.unsqueeze(-1)).squeeze(-1)

        Mt, Rt = self.mask.transpose(1, 2), self.R.transpose(1, 2)
        for _ in range(rounds):
            U = solve(self.mask, self.R, V)
            V = solve(Mt, Rt, U)
        return U, V


@dataclass
class MatrixCompletion(BlockFamily):
    """Rank-``rank`` ``n x n`` matrices ``R = A B^T / sqrt(rank)`` (entries of unit variance),
    each entry observed with probability ``observe``; factors ``U, V`` of ``k`` columns
    (``k = rank`` by default: the rank known) started at N(0, k^-1/2) entries, so ``U V^T``
    starts with entries of unit variance. Seed 003's Table 1 setting: n 100, rank 5, 20%."""

    n: int = 100
    rank: int = 5
    observe: float = 0.2
    k: int | None = None
    lam: float = 1e-3

    def sample(self, batch, *, generator=None, dtype=torch.float32, device=None) -> MatrixCompletionProblem:
        n, r, k = self.n, self.rank, self.k or self.rank
        A = torch.randn(batch, n, r, generator=generator, dtype=torch.float64)
        Bm = torch.randn(batch, n, r, generator=generator, dtype=torch.float64)
        R = A @ Bm.transpose(1, 2) / math.sqrt(r)
        mask = (torch.rand(batch, n, n, generator=generator, dtype=torch.float64) < self.observe).to(torch.float64)
        s = k ** -0.25
        U0 = s * torch.randn(batch, n, k, generator=generator, dtype=torch.float64)
        V0 = s * torch.randn(batch, n, k, generator=generator, dtype=torch.float64)
        prob = MatrixCompletionProblem(R=R, mask=mask, U0=U0, V0=V0, lam=self.lam)
        return prob.to(device=device, dtype=dtype)


def _random_means(X: Tensor, K: int, generator=None) -> Tensor:
    """K distinct samples of each instance ``X`` (B, G, D) as starting means."""
    B, G, D = X.shape
    start = torch.rand(B, G, generator=generator).argsort(1)[:, :K].to(X.device)
    return X.gather(1, start.unsqueeze(-1).expand(-1, -1, D))


@dataclass
class GaussianMixtureProblem(BlockProblem):
    X: Tensor = None        # (B, G, D) samples
    M0: Tensor = None       # (B, K, D) starting means
    w0: Tensor = None       # (B, K) starting weights (on the simplex)
    sigma: float = 1.0      # fixed isotropic standard deviation of every component
    blocks = ("means", "weights")

    def block_prox(self):
        return [("none", {}), ("simplex", {"dim": -1})]

    def log_components(self, M: Tensor) -> Tensor:
        """``log N(x_g | mu_k, sigma^2 I)``, shape ``(B, G, K)``."""
        D = self.X.shape[-1]
        d2 = torch.cdist(self.X, M).square() if self.X.dtype != torch.float16 else (
            (self.X.unsqueeze(2) - M.unsqueeze(1)).square().sum(-1))
        return -0.5 * d2 / self.sigma**2 - 0.5 * D * math.log(2 * math.pi * self.sigma**2)

    def smooth(self, M: Tensor, w: Tensor) -> Tensor:
        """Mean negative log-likelihood; written as log(sum_k w_k e^(c_k - c_max)) + c_max so a
        weight at exactly 0 keeps a finite gradient."""
        c = self.log_components(M)
        cmax = c.amax(-1, keepdim=True).detach()
        p = (w.unsqueeze(1) * torch.exp(c - cmax)).sum(-1).clamp(min=torch.finfo(c.dtype).tiny)
        return -(torch.log(p) + cmax.squeeze(-1)).mean(-1)

    def x0(self) -> list[Tensor]:
        return [self.M0.clone(), self.w0.clone()]

    def restart(self, generator=None) -> GaussianMixtureProblem:
        """The same data from a new start drawn as the family draws its own (means at K
        random samples, uniform weights): for EM with restarts."""
        K = self.M0.shape[1]
        return replace(self, M0=_random_means(self.X, K, generator), w0=torch.full_like(self.w0, 1.0 / K))

    @torch.no_grad()
    def em(self, iters: int = 100, tol: float = 1e-4) -> tuple[Tensor, Tensor, Tensor]:
        """EM in the means and weights with the covariances held fixed (the model optimized
        here), from ``(M0, w0)``; stops an instance when its NLL changes by less than ``tol``
        (seed 003's criterion). Returns means, weights and the iterations each took."""
        M, w = self.M0.clone(), self.w0.clone()
        its = torch.zeros(M.shape[0], dtype=torch.long, device=M.device)
        prev = self.smooth(M, w)
        active = torch.ones_like(its, dtype=torch.bool)
        for _ in range(iters):
            logr = torch.log(w.clamp(min=1e-300)).unsqueeze(1) + self.log_components(M)
            r = torch.softmax(logr, -1)  # (B, G, K) responsibilities
            Nk = r.sum(1)
            M_new = (r.transpose(1, 2) @ self.X) / Nk.clamp(min=1e-12).unsqueeze(-1)
            M_new = torch.where(Nk.unsqueeze(-1) > 1e-12, M_new, M)
            w_new = Nk / self.X.shape[1]
            a = active.view(-1, 1, 1)
            M, w = torch.where(a, M_new, M), torch.where(active.view(-1, 1), w_new, w)
            cur = self.smooth(M, w)
            its += active.long()
            active = active & ((prev - cur).abs() >= tol)
            prev = cur
            if not bool(active.any()):
                break
        return M, w, its


@dataclass
class GaussianMixture(BlockFamily):
    """``K`` isotropic unit-variance Gaussians in ``D`` dimensions, means N(0, spread^2 I),
    weights from a flat Dirichlet; ``G`` samples. The optimizers start from means at ``K``
    random samples and uniform weights (as EM commonly does). Seed 003's setting: 2-D,
    K = 4, G = 500; Table 5 varies D from 4 to 64."""

    K: int = 4
    D: int = 2
    G: int = 500
    spread: float = 3.0

    def sample(self, batch, *, generator=None, dtype=torch.float32, device=None) -> GaussianMixtureProblem:
        K, D, G = self.K, self.D, self.G
        mu = self.spread * torch.randn(batch, K, D, generator=generator, dtype=torch.float64)
        pi = -torch.log(torch.rand(batch, K, generator=generator, dtype=torch.float64))
        pi = pi / pi.sum(-1, keepdim=True)
        comp = torch.multinomial(pi, G, replacement=True, generator=generator)  # (B, G)
        X = mu.gather(1, comp.unsqueeze(-1).expand(-1, -1, D)) + torch.randn(batch, G, D, generator=generator,
                                                                          dtype=torch.float64)
        M0 = _random_means(X, K, generator)
        w0 = torch.full((batch, K), 1.0 / K, dtype=torch.float64)
        return GaussianMixtureProblem(X=X, M0=M0, w0=w0).to(device=device, dtype=dtype)
