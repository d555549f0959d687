"""LASSO and L1-regularised logistic regression, as in MS4L2O (Liu et al., ICML 2023)."""

from __future__ import annotations

from dataclasses import dataclass

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Problem, ProblemFamily, matvec, rmatvec

__all__ = ["Lasso", "LassoProblem", "LogisticL1", "LogisticProblem", "MLPFamily", "MLPProblem", "LeastSquares",
           "LeastSquaresProblem"]


def _sparse_vectors(batch: int, n: int, k: int, g: torch.Generator | None, dtype) -> Tensor:
    """``batch`` vectors with ``k`` N(0, 1) entries at uniformly random places."""
    x = torch.zeros(batch, n, dtype=dtype)
    idx = torch.rand(batch, n, generator=g).argsort(dim=1)[:, :k]
    x.scatter_(1, idx, torch.randn(batch, k, generator=g, dtype=dtype))
    return x


GRAM_ABOVE = 512  # smaller side beyond which the spectral norm comes from the Gram matrix


def _spectral_norm(M: Tensor) -> Tensor:
    """Largest singular value per matrix; half precision is computed in float32.

    Up to ``GRAM_ABOVE`` on the smaller side, a singular-value decomposition (what every
    shipped card was measured with, so their figures stay bit-for-bit). Beyond it the SVD
    dominates a benchmark's set-up (5 s for one 2000 x 4000 matrix on a CPU core), so the
    value is the square root of the top eigenvalue of the smaller Gram matrix, formed in
    float64: the same number to float64 rounding (the top eigenvalue is perfectly
    conditioned), 5-8x faster.
    """
    dtype = torch.promote_types(M.dtype, torch.float32)
    if min(M.shape[-2:]) <= GRAM_ABOVE:
        return torch.linalg.matrix_norm(M.to(dtype), ord=2)
    M64 = M.to(torch.float64)
    G = M64 @ M64.mT if M.shape[-2] <= M.shape[-1] else M64.mT @ M64
    return torch.linalg.eigvalsh(G)[..., -1].clamp_min(0).sqrt().to(dtype)


@dataclass
class LassoProblem(Problem):
    """``f(x) = 1/2 |A x - b|^2``, ``r = lam |x|_1``; ``A`` is ``(B, m, n)``, ``b`` is ``(B, m)``."""

    A: Tensor = None
    b: Tensor = None
    x_true: Tensor | None = None

    def smooth(self, x: Tensor) -> Tensor:
        r = matvec(self.A, x) - self.b
        return 0.5 * r.square().sum(-1)

    def grad(self, x: Tensor) -> Tensor:
        return rmatvec(self.A, matvec(self.A, x) - self.b)

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
        z = matvec(self.W, x)
        return (F.softplus(z) - self.y * z).mean(-1)

    def grad(self, x: Tensor) -> Tensor:
        return rmatvec(self.W, torch.sigmoid(matvec(self.W, x)) - self.y) / self.W.shape[1]

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


@dataclass
class MLPProblem(Problem):
    """Training a one-hidden-layer MLP classifier: ``f`` = mean cross-entropy on the
    instance's examples, the iterate the flattened weights ``(W1, b1, W2, b2)``,
    started from the instance's random initialisation; no ``r``."""

    X: Tensor = None        # (B, S, d) inputs
    Y: Tensor = None        # (B, S) class indices
    init: Tensor = None     # (B, n) initial weights
    hidden: int = 20
    classes: int = 10
    activation: str = "sigmoid"

    def unpack(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        d, h, c = self.X.shape[-1], self.hidden, self.classes
        sizes = [d * h, h, h * c, c]
        w1, b1, w2, b2 = x.split(sizes, dim=-1)
        return w1.reshape(-1, d, h), b1, w2.reshape(-1, h, c), b2

    def logits(self, x: Tensor) -> Tensor:
        w1, b1, w2, b2 = self.unpack(x)
        z = torch.bmm(self.X, w1) + b1.unsqueeze(1)
        z = torch.sigmoid(z) if self.activation == "sigmoid" else torch.relu(z)
        return torch.bmm(z, w2) + b2.unsqueeze(1)

    def smooth(self, x: Tensor) -> Tensor:
        lg = self.logits(x)
        return F.cross_entropy(lg.transpose(1, 2), self.Y, reduction="none").mean(-1)

    def accuracy(self, x: Tensor) -> Tensor:
        return (self.logits(x).argmax(-1) == self.Y).to(x.dtype).mean(-1)

    def x0(self) -> Tensor:
        return self.init.clone()

    @property
    def dim(self) -> int:
        return self.init.shape[-1]

    @property
    def lipschitz(self) -> Tensor:
        """An estimate: the largest Hessian eigenvalue at the start, by 20 power iterations."""
        x = self.init.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(self.smooth(x).sum(), x, create_graph=True)
            v = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=x.dtype).to(x.device)
            lam = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
            for _ in range(20):
                v = v / v.norm(dim=-1, keepdim=True)
                (hv,) = torch.autograd.grad(g, x, v, retain_graph=True)
                lam = (hv * v).sum(-1).abs()
                v = hv
        return lam.detach()


@dataclass
class MLPFamily(ProblemFamily):
    """Training an MLP (``hidden`` sigmoid units, as in L2O-DM's MNIST experiment) on
    ``samples`` random examples of a data set that ships with scikit-learn (``"digits"``:
    8x8 images, 10 classes); each instance its own examples and random initialisation."""

    dataset: str = "digits"
    hidden: int = 20
    samples: int = 128
    activation: str = "sigmoid"

    def _data(self) -> tuple[Tensor, Tensor]:
        from sklearn import datasets

        if self.dataset != "digits":
            raise ValueError(f"unknown dataset {self.dataset!r}; built in: 'digits'")
        X, y = datasets.load_digits(return_X_y=True)
        return torch.from_numpy(X / 16.0), torch.from_numpy(y)

    def sample(self, batch, *, generator=None, dtype=torch.float32, device=None) -> MLPProblem:
        X, y = self._data()
        classes = int(y.max()) + 1
        idx = torch.rand(batch, X.shape[0], generator=generator).argsort(dim=1)[:, : self.samples]
        d, h = X.shape[1], self.hidden
        parts = []
        for fan_in, size in ((d, d * h), (d, h), (h, h * classes), (h, classes)):
            bound = 1 / math.sqrt(fan_in)  # nn.Linear's default initialisation
            parts.append((torch.rand(batch, size, generator=generator, dtype=torch.float64) * 2 - 1) * bound)
        prob = MLPProblem(X=X[idx], Y=y[idx], init=torch.cat(parts, 1), hidden=h, classes=classes,
                          activation=self.activation)
        return prob.to(device=device, dtype=dtype)


@dataclass
class LeastSquaresProblem(Problem):
    """``f(x) = 1/2 |W x - y|^2`` with ``y = W x_true`` (consistent: ``F* = 0``), no ``r``."""

    W: Tensor = None
    y: Tensor = None
    x_true: Tensor | None = None

    def smooth(self, x: Tensor) -> Tensor:
        return 0.5 * (matvec(self.W, x) - self.y).square().sum(-1)

    def grad(self, x: Tensor) -> Tensor:
        return rmatvec(self.W, matvec(self.W, x) - self.y)

    @property
    def lipschitz(self) -> Tensor:
        return _spectral_norm(self.W).square()

    @property
    def dim(self) -> int:
        return self.W.shape[-1]

    def optimal_value(self) -> Tensor:
        return torch.zeros(self.W.shape[0], dtype=self.W.dtype, device=self.W.device)


@dataclass
class LeastSquares(ProblemFamily):
    """The quadratic programs of Math-L2O (seed 004): ``min 1/2 |W x - y|^2``, ``W`` ``m x n``
    Gaussian with unit-norm columns, ``y = W x_true`` with ``x_true`` N(0, I), ``x0 = 0``.
    The paper's size is 400 x 512."""

    m: int = 400
    n: int = 512

    def sample(self, batch, *, generator=None, dtype=torch.float32, device=None) -> LeastSquaresProblem:
        W = torch.randn(batch, self.m, self.n, generator=generator, dtype=torch.float64)
        W = W / torch.linalg.vector_norm(W, dim=1, keepdim=True)
        x = torch.randn(batch, self.n, generator=generator, dtype=torch.float64)
        prob = LeastSquaresProblem(W=W, y=torch.einsum("bmn,bn->bm", W, x), x_true=x)
        return prob.to(device=device, dtype=dtype)
