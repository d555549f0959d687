"""LASSO and L1-regularised logistic regression, as in MS4L2O (Liu et al., ICML 2023)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Problem, ProblemFamily

__all__ = ["Lasso", "LassoProblem", "LogisticL1", "LogisticProblem"]


def _sparse_vectors(batch: int, n: int, k: int, g: torch.Generator | None, dtype) -> Tensor:
    """``batch`` vectors with ``k`` N(0, 1) entries at uniformly random places."""
    x = torch.zeros(batch, n, dtype=dtype)
    idx = torch.rand(batch, n, generator=g).argsort(dim=1)[:, :k]
    x.scatter_(1, idx, torch.randn(batch, k, generator=g, dtype=dtype))
    return x


def _spectral_norm(M: Tensor) -> Tensor:
    """Largest singular value per matrix; half precision is computed in float32."""
    return torch.linalg.matrix_norm(M.to(torch.promote_types(M.dtype, torch.float32)), ord=2)


@dataclass
class LassoProblem(Problem):
    """``f(x) = 1/2 |A x - b|^2``, ``r = lam |x|_1``; ``A`` is ``(B, m, n)``, ``b`` is ``(B, m)``."""

    A: Tensor = None
    b: Tensor = None
    x_true: Tensor | None = None

    def smooth(self, x: Tensor) -> Tensor:
        r = torch.einsum("bmn,bn->bm", self.A, x) - self.b
        return 0.5 * r.square().sum(-1)

    def grad(self, x: Tensor) -> Tensor:
        r = torch.einsum("bmn,bn->bm", self.A, x) - self.b
        return torch.einsum("bmn,bm->bn", self.A, r)

    def hessian(self, x: Tensor, i: int, idx: Tensor) -> Tensor:
        """Instance ``i``'s Hessian ``A^T A`` restricted to the coordinates ``idx``."""
        As = self.A[i][:, idx]
        return As.T @ As

    @property
    def lipschitz(self) -> Tensor:
        return _spectral_norm(self.A).square()

    @property
    def dim(self) -> int:
        return self.A.shape[-1]


@dataclass
class Lasso(ProblemFamily):
    """LASSO: ``A`` ``m x n`` with N(0, 1) entries and unit-norm columns, a new ``A`` per
    instance; ``x*`` with ``sparsity`` N(0, 1) entries at random places; ``b = A x*``;
    ``r = lam |x|_1``. Defaults: 250 x 500, 50 nonzeros, ``lam = 0.1`` (``L ~ 5.8``)."""

    m: int = 250
    n: int = 500
    sparsity: int = 50
    lam: float = 0.1

    def sample(self, batch, *, generator=None, dtype=torch.float32, device=None) -> LassoProblem:
        A = torch.randn(batch, self.m, self.n, generator=generator, dtype=torch.float64)
        A = A / torch.linalg.vector_norm(A, dim=1, keepdim=True)
        x = _sparse_vectors(batch, self.n, self.sparsity, generator, torch.float64)
        b = torch.einsum("bmn,bn->bm", A, x)
        prob = LassoProblem(A=A, b=b, x_true=x, prox="l1", prox_params={"lam": self.lam})
        return prob.to(device=device, dtype=dtype)


@dataclass
class LogisticProblem(Problem):
    """``f(x) = mean_i [softplus(w_i^T x) - y_i w_i^T x]`` (binary cross-entropy),
    ``r = lam |x|_1``; ``W`` is ``(B, N, n)``, labels ``y`` in {0, 1} are ``(B, N)``."""

    W: Tensor = None
    y: Tensor = None
    x_true: Tensor | None = None

    def smooth(self, x: Tensor) -> Tensor:
        z = torch.einsum("bNn,bn->bN", self.W, x)
        return (F.softplus(z) - self.y * z).mean(-1)

    def grad(self, x: Tensor) -> Tensor:
        z = torch.einsum("bNn,bn->bN", self.W, x)
        return torch.einsum("bNn,bN->bn", self.W, torch.sigmoid(z) - self.y) / self.W.shape[1]

    def hessian(self, x: Tensor, i: int, idx: Tensor) -> Tensor:
        """Instance ``i``'s Hessian ``W^T diag(s (1 - s)) W / N`` restricted to ``idx``."""
        W = self.W[i]
        s = torch.sigmoid(W @ x[i])
        Ws = W[:, idx]
        return (Ws.T * (s * (1 - s))) @ Ws / W.shape[0]

    @property
    def lipschitz(self) -> Tensor:
        """``|W|_2^2 / (4 N)``: the true constant (the reference code's ``|W|_2`` is wrong)."""
        return _spectral_norm(self.W).square() / (4 * self.W.shape[1])

    @property
    def dim(self) -> int:
        return self.W.shape[-1]


@dataclass
class LogisticL1(ProblemFamily):
    """Sparse logistic regression: ``W`` ``N x n`` with N(0, 1) entries (not normalised),
    ``x*`` ``sparsity``-sparse, labels ``1[W x* >= 0]``, mean binary cross-entropy,
    ``r = lam |x|_1``. Defaults: 1000 x 50, 20 nonzeros, ``lam = 0.1``."""

    N: int = 1000
    n: int = 50
    sparsity: int = 20
    lam: float = 0.1

    def sample(self, batch, *, generator=None, dtype=torch.float32, device=None) -> LogisticProblem:
        W = torch.randn(batch, self.N, self.n, generator=generator, dtype=torch.float64)
        x = _sparse_vectors(batch, self.n, self.sparsity, generator, torch.float64)
        y = (torch.einsum("bNn,bn->bN", W, x) >= 0).to(torch.float64)
        prob = LogisticProblem(W=W, y=y, x_true=x, prox="l1", prox_params={"lam": self.lam})
        return prob.to(device=device, dtype=dtype)
