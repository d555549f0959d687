"""Out-of-distribution LASSO and L1 logistic problems for the shipped learned optimizers.

The shipped weights were trained on one LASSO family (``A`` 250 x 500 Gaussian with
unit-norm columns, ``b = A x*`` with ``x*`` 50-sparse, ``lam = 0.1``) and one L1 logistic
family (``W`` 1000 x 50 Gaussian, labels ``1[W x* >= 0]``, ``x*`` 20-sparse,
``lam = 0.1``). Every constructor here moves away from them in a named way:

* :func:`correlated_lasso`: rows of ``A`` drawn with a Toeplitz covariance ``rho^|i-j|``.
* :func:`gaussian_lasso`: ``A`` and ``b`` both N(0, 1) (``b`` from no sparse ``x``).
* :func:`large_lasso`: the training recipe at a larger size, ``L`` by Lanczos.
* :func:`dictionary_lasso`: handwritten digits (scikit-learn's ``load_digits``) coded
  over a 64 x 256 dictionary learned on other digits.
* :func:`regression_lasso`: a real regression set (``load_diabetes``), z-scored, with
  ``lam`` relative to ``lam_max = |A^T b|_inf``.
* :func:`imbalanced_logistic`: labels ``1[W x* >= q]`` with ``q`` the 90 % quantile
  (10 % positives) and an intercept column.
* :func:`correlated_logistic`: feature rows with a Toeplitz covariance.

Every constructor is deterministic given its ``seed``; nothing is cached on disk.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .families import LassoProblem, LogisticProblem, _sparse_vectors

__all__ = ["KnownLLassoProblem", "lanczos_lipschitz", "correlated_lasso", "gaussian_lasso", "large_lasso",
           "dictionary_lasso", "regression_lasso", "imbalanced_logistic", "correlated_logistic"]

# Lanczos gives the top eigenvalue of A^T A from below to ``tol`` relative; the stored L is
# raised by LANCZOS_MARGIN so that it stays a valid (upper) Lipschitz constant.
LANCZOS_TOL = 1e-10
LANCZOS_MARGIN = 1e-8
DIGITS_HELD_OUT = 512  # of scikit-learn's 1,797 digits; the dictionary learns on the other 1,285


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def lanczos_lipschitz(A: Tensor) -> Tensor:
    """``|A_i|_2^2`` per instance of a ``(B, m, n)`` batch by Lanczos (scipy's ``eigsh`` on
    the smaller Gram operator), times ``1 + LANCZOS_MARGIN``; float64, shape ``(B,)``.
    For matrices where a dense SVD would take tens of seconds (4000 x 8000)."""
    from scipy.sparse.linalg import LinearOperator, eigsh

    out = []
    for Ai in A.detach().double().cpu().numpy():
        m, n = Ai.shape
        if m <= n:
            op = LinearOperator((m, m), matvec=lambda v, Ai=Ai: Ai @ (Ai.T @ v), dtype=np.float64)
        else:
            op = LinearOperator((n, n), matvec=lambda v, Ai=Ai: Ai.T @ (Ai @ v), dtype=np.float64)
        v0 = np.ones(op.shape[0])
        (ev,) = eigsh(op, k=1, which="LA", tol=LANCZOS_TOL, ncv=min(op.shape[0], 40), v0=v0,
                      return_eigenvectors=False)
        out.append(float(ev) * (1 + LANCZOS_MARGIN))
    return torch.tensor(out, dtype=torch.float64)


@dataclass
class KnownLLassoProblem(LassoProblem):
    """A :class:`LassoProblem` whose Lipschitz constant ``L`` (shape ``(B,)``) was computed
    once, at construction, and travels with it through ``.to()`` and slicing."""

    L: Tensor = None

    @property
    def lipschitz(self) -> Tensor:
        return self.L


def _toeplitz_rows(batch: int, rows: int, n: int, rho: float, g: torch.Generator) -> Tensor:
    """``(batch, rows, n)``: rows i.i.d. N(0, S), ``S_ij = rho^|i-j|``."""
    idx = torch.arange(n, dtype=torch.float64)
    S = rho ** (idx[:, None] - idx[None, :]).abs()
    C = torch.linalg.cholesky(S)
    Z = torch.randn(batch, rows, n, generator=g, dtype=torch.float64)
    return Z @ C.T


def correlated_lasso(batch: int, *, m: int = 250, n: int = 500, sparsity: int = 50, rho: float = 0.8,
                     lam: float = 0.1, seed: int = 0, dtype: torch.dtype = torch.float64) -> LassoProblem:
    """The training LASSO recipe with a correlated design: rows of ``A`` N(0, S) with the
    Toeplitz covariance ``S_ij = rho^|i-j|``, then unit-norm columns; ``b = A x*``."""
    g = _gen(seed)
    A = _toeplitz_rows(batch, m, n, rho, g)
    A = A / torch.linalg.vector_norm(A, dim=1, keepdim=True)
    x = _sparse_vectors(batch, n, sparsity, g, torch.float64)
    b = torch.einsum("bmn,bn->bm", A, x)
    return LassoProblem(A=A, b=b, x_true=x, prox="l1", prox_params={"lam": lam}).to(dtype=dtype)


def gaussian_lasso(batch: int, *, m: int = 50, n: int = 100, lam: float = 0.1, seed: int = 0,
                   dtype: torch.dtype = torch.float64) -> LassoProblem:
    """``A`` (``m x n``) and ``b`` with i.i.d. N(0, 1) entries: ``b`` is no sparse code and
    ``A``'s columns are not normalised (``L`` about ``(sqrt m + sqrt n)^2``)."""
    g = _gen(seed)
    A = torch.randn(batch, m, n, generator=g, dtype=torch.float64)
    b = torch.randn(batch, m, generator=g, dtype=torch.float64)
    return LassoProblem(A=A, b=b, prox="l1", prox_params={"lam": lam}).to(dtype=dtype)


def large_lasso(batch: int, *, m: int = 1000, n: int = 2000, sparsity: int | None = None, lam: float = 0.1,
                seed: int = 0, dtype: torch.dtype = torch.float64) -> KnownLLassoProblem:
    """The training LASSO recipe (Gaussian ``A``, unit-norm columns, ``b = A x*``) at a
    larger size; ``sparsity`` defaults to ``n / 10`` as in training. ``L`` by Lanczos."""
    g = _gen(seed)
    A = torch.randn(batch, m, n, generator=g, dtype=torch.float64)
    A = A / torch.linalg.vector_norm(A, dim=1, keepdim=True)
    x = _sparse_vectors(batch, n, sparsity or n // 10, g, torch.float64)
    b = torch.einsum("bmn,bn->bm", A, x)
    return KnownLLassoProblem(A=A, b=b, x_true=x, L=lanczos_lipschitz(A), prox="l1",
                              prox_params={"lam": lam}).to(dtype=dtype)


def dictionary_lasso(patches: int, *, atoms: int = 256, lam: float = 0.1, seed: int = 0, epochs: int = 5,
                     dtype: torch.dtype = torch.float64) -> LassoProblem:
    """Sparse coding of 8 x 8 handwritten digits (scikit-learn's ``load_digits``, scaled to
    [0, 1], mean removed): ``patches`` (at most 512) held-out digits as ``b`` over a shared ``64 x atoms``
    dictionary with unit-norm atoms, learned by ``MiniBatchDictionaryLearning`` on the
    other digits (``epochs`` passes, coordinate descent, fixed ``seed``): a dictionary
    and an image domain that no training used."""
    from sklearn.datasets import load_digits
    from sklearn.decomposition import MiniBatchDictionaryLearning

    X = load_digits().data / 16.0
    X = X - X.mean(1, keepdims=True)
    order = np.random.default_rng(seed).permutation(len(X))
    if patches > DIGITS_HELD_OUT:
        raise ValueError(f"at most {DIGITS_HELD_OUT} held-out digits (asked for {patches})")
    # the dictionary is learned on the same digits whatever ``patches`` is
    test, train = X[order[:patches]], X[order[DIGITS_HELD_OUT:]]
    dl = MiniBatchDictionaryLearning(n_components=atoms, alpha=lam, batch_size=256, max_iter=epochs,
                                     fit_algorithm="cd", random_state=seed)
    with warnings.catch_warnings():  # coordinate descent's per-batch ConvergenceWarnings
        warnings.simplefilter("ignore")
        D = dl.fit(train).components_.T
    D = D / np.maximum(np.linalg.norm(D, axis=0, keepdims=True), 1e-12)
    A = torch.from_numpy(D).expand(patches, -1, -1)
    return LassoProblem(A=A, b=torch.from_numpy(test), prox="l1", prox_params={"lam": lam}).to(dtype=dtype)


def _zscore(X: np.ndarray) -> np.ndarray:
    std = X.std(0)
    return (X - X.mean(0)) / np.where(std > 0, std, 1.0)


def regression_lasso(name: str = "diabetes", *, lam_ratio: float = 0.05,
                     dtype: torch.dtype = torch.float64) -> LassoProblem:
    """LASSO on a real regression set that ships with scikit-learn (``"diabetes"``: 442 x
    10): features and target z-scored (column norms ``sqrt N``, not 1), one instance,
    ``lam = lam_ratio * |A^T b|_inf`` (``lam_max``, where the solution becomes 0)."""
    from sklearn import datasets

    loaders = {"diabetes": datasets.load_diabetes}
    if name not in loaders:
        raise ValueError(f"unknown data set {name!r}; built in: {', '.join(loaders)}")
    X, y = loaders[name](return_X_y=True, scaled=False)
    A = torch.from_numpy(_zscore(X.astype(np.float64)))[None]
    b = torch.from_numpy(_zscore(y.astype(np.float64)[:, None])[:, 0])[None]
    lam_max = float(torch.einsum("bmn,bm->bn", A, b).abs().max())
    return LassoProblem(A=A, b=b, prox="l1", prox_params={"lam": lam_ratio * lam_max}).to(dtype=dtype)


def imbalanced_logistic(batch: int, *, N: int = 1000, n: int = 50, sparsity: int = 20, positives: float = 0.1,
                        lam: float = 0.02, seed: int = 0, dtype: torch.dtype = torch.float64) -> LogisticProblem:
    """Class-imbalanced L1 logistic regression: ``n - 1`` N(0, 1) features and a column of
    ones (an intercept, penalised like the rest), labels ``1[W x* >= q]`` with ``q`` each
    instance's ``1 - positives`` quantile of ``W x*`` (10 % positives by default). ``lam``
    0.02: at the training 0.1 nearly every feature is zero at the optimum."""
    g = _gen(seed)
    Wf = torch.randn(batch, N, n - 1, generator=g, dtype=torch.float64)
    W = torch.cat([Wf, torch.ones(batch, N, 1, dtype=torch.float64)], -1)
    x = _sparse_vectors(batch, n - 1, sparsity, g, torch.float64)
    z = torch.einsum("bNn,bn->bN", Wf, x)
    q = torch.quantile(z, 1 - positives, dim=1, keepdim=True)
    y = (z >= q).to(torch.float64)
    x_true = torch.cat([x, torch.zeros(batch, 1, dtype=torch.float64)], -1)
    return LogisticProblem(W=W, y=y, x_true=x_true, prox="l1", prox_params={"lam": lam}).to(dtype=dtype)


def correlated_logistic(batch: int, *, N: int = 1000, n: int = 50, sparsity: int = 20, rho: float = 0.8,
                        lam: float = 0.1, seed: int = 0, dtype: torch.dtype = torch.float64) -> LogisticProblem:
    """The training L1 logistic recipe with correlated features: rows of ``W`` N(0, S),
    ``S_ij = rho^|i-j|``; labels ``1[W x* >= 0]``."""
    g = _gen(seed)
    W = _toeplitz_rows(batch, N, n, rho, g)
    x = _sparse_vectors(batch, n, sparsity, g, torch.float64)
    y = (torch.einsum("bNn,bn->bN", W, x) >= 0).to(torch.float64)
    return LogisticProblem(W=W, y=y, x_true=x, prox="l1", prox_params={"lam": lam}).to(dtype=dtype)
