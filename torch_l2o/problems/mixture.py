"""Broad LASSO and L1 logistic family mixtures: what users meet, for training learned
optimizers that carry over to problems they were not trained on.

:class:`LassoMixture`
---------------------

Every batch has one shape ``m x n`` (a batch is one tensor), drawn per call from
:attr:`LassoMixture.shapes` (``m / n`` from 0.2 to 2); everything else is drawn per
instance: the design, the sparsity of the code, the noise level, and ``lam`` relative to
``lam_max = |A^T b|_inf``. The designs:

* ``"gaussian"``: N(0, 1) entries, unit-norm columns (the papers' recipe);
* ``"factor"``: rows ``z + F w`` with an ``n x 5`` loading ``F`` per instance: columns
  correlated through five shared factors that carry a share ``rho`` in [0.3, 0.9] of
  each column's variance (a few large eigenvalues), then unit-norm columns;
* ``"scaled"``: Gaussian columns scaled by log-uniform factors over two decades and the
  whole matrix by a log-uniform factor in [0.1, 10] (unstandardised data);
* ``"dictionary"``: a dictionary of ``n`` unit-norm atoms learned with scikit-learn on
  ``sqrt(m) x sqrt(m)`` patches of its bundled photographs (``load_sample_images``), and
  ``b`` an image patch of those photographs (mean removed), not a sparse code.

The out-of-distribution suite (:mod:`torch_l2o.problems.ood`) uses none of these
designs: its correlation is Toeplitz, its dictionary is learned on handwritten digits.

``lam``: one number for the batch (``lam``, default 0.1), and each instance's ``b`` (and
code) rescaled so that ``lam / lam_max`` is its drawn ratio (log-uniform in
``lam_ratio``): for a LASSO, rescaling ``b`` and ``lam`` together rescales the solution and
changes nothing else, so this is the same as a per-instance ``lam`` at the instance's
own scale.

:class:`LogisticMixture`
------------------------
Every batch has one shape ``N x n`` (``N / n`` from 2 to 50) and one ``lam``: a ratio
drawn log-uniform in ``lam_ratio`` times the batch's median ``lam_max`` (``|W^T (y -
1/2)|_inf / N``, where ``x = 0`` stops being optimal); per instance the design, the
code's sparsity, the labels' separability and noise, and the share of positives:

* ``"gaussian"``: N(0, 1) features (the papers' recipe);
* ``"factor"``: rows ``z + F w`` as in the LASSO mixture (correlated features);
* ``"heavy"``: log-normal features, z-scored per column (skewed real-valued data);
* ``"binary"``: 0/1 features with rates in [0.05, 0.5], z-scored (one-hot-like data).

Labels ``1[kappa u + e >= q]`` with ``u = W x* / std``, a separability ``kappa``
log-uniform in [1, 30], logistic noise ``e`` and ``q`` the quantile that leaves a share of
positives drawn in [0.05, 0.5]. The out-of-distribution suite's logistic sets (real
data, Toeplitz correlation, 10 % positives with an intercept column) are none of these.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .base import ProblemFamily
from .families import LassoProblem, LogisticProblem

__all__ = ["LassoMixture", "LogisticMixture", "image_dictionary"]

DESIGNS = ("gaussian", "factor", "scaled", "dictionary")
LOGISTIC_DESIGNS = ("gaussian", "factor", "heavy", "binary")


def _log_uniform(lo: float, hi: float, size, g: torch.Generator | None) -> Tensor:
    u = torch.rand(size, generator=g, dtype=torch.float64)
    return torch.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))


def _factor_loadings(batch: int, rows: int, n: int, g: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """``(F, W)``: the factor design's per-instance ``n x 5`` loadings (a share ``rho`` in
    [0.3, 0.9] of each column's variance) and ``rows x 5`` factor scores; add ``W F^T``."""
    rho = 0.3 + 0.6 * torch.rand(batch, 1, 1, generator=g, dtype=torch.float64)
    F = torch.randn(batch, n, 5, generator=g, dtype=torch.float64) * torch.sqrt(rho / (1 - rho) / 5)
    return F, torch.randn(batch, rows, 5, generator=g, dtype=torch.float64)


def _sparse_codes(batch: int, n: int, k: Tensor, g: torch.Generator | None) -> Tensor:
    """``batch`` vectors, instance ``i`` with ``k[i]`` N(0, 1) entries at random places."""
    idx = torch.rand(batch, n, generator=g).argsort(1)
    vals = torch.randn(batch, n, generator=g, dtype=torch.float64)
    x = torch.where(torch.arange(n) < k[:, None], vals, torch.zeros_like(vals))
    return torch.zeros_like(x).scatter_(1, idx, x)


@functools.lru_cache(maxsize=16)
def _image_patches(side: int) -> np.ndarray:
    """All ``side x side`` patches (stride ``side // 2``) of scikit-learn's two sample
    photographs in grey levels [0, 1], mean removed per patch: ``(P, side^2)``."""
    from sklearn.datasets import load_sample_images

    try:
        images = load_sample_images().images
    except ImportError as e:  # scikit-learn reads its JPEG samples with pillow
        raise ImportError("LassoMixture's 'dictionary' design learns its dictionaries on scikit-learn's sample "
                          "photographs, which need pillow: pip install pillow (or leave 'dictionary' out of "
                          "designs=)") from e
    out = []
    for img in images:
        grey = img.astype(np.float64).mean(-1) / 255.0
        win = np.lib.stride_tricks.sliding_window_view(grey, (side, side))[::side // 2, ::side // 2]
        out.append(win.reshape(-1, side * side))
    P = np.concatenate(out)
    return P - P.mean(1, keepdims=True)


@functools.lru_cache(maxsize=16)
def image_dictionary(side: int, atoms: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A ``side^2 x atoms`` dictionary with unit-norm atoms, learned by scikit-learn's
    ``MiniBatchDictionaryLearning`` on half of the photographs' patches (fixed ``seed``),
    and the other half as held patches ``(P, side^2)`` to code. Cached per process."""
    from sklearn.decomposition import MiniBatchDictionaryLearning

    P = _image_patches(side)
    P = P[np.linalg.norm(P, axis=1) > 1e-3 * side]  # flat patches code to zero: not a problem worth solving
    order = np.random.default_rng(seed).permutation(len(P))
    train, held = P[order[: len(P) // 2]], P[order[len(P) // 2:]]
    dl = MiniBatchDictionaryLearning(n_components=atoms, alpha=0.1, batch_size=256, max_iter=2,
                                     fit_algorithm="cd", transform_algorithm="lasso_cd", random_state=seed)
    with warnings.catch_warnings():  # per-batch ConvergenceWarnings of coordinate descent
        warnings.simplefilter("ignore")
        D = dl.fit(train[:4096]).components_.T
    D = D / np.maximum(np.linalg.norm(D, axis=0, keepdims=True), 1e-12)
    return D, held


@dataclass
class LassoMixture(ProblemFamily):
    """LASSO instances from a broad mixture (the module docstring says which); ``f, r`` as
    :class:`~torch_l2o.problems.LassoProblem`. ``designs``: the subset to draw from."""

    shapes: tuple = ((81, 405), (144, 500), (256, 512), (400, 400), (576, 288), (784, 392))
    designs: tuple = DESIGNS
    lam: float = 0.1
    lam_ratio: tuple = (0.01, 0.5)
    sparsity: tuple = (0.02, 0.3)  # nonzeros of the code, as a fraction of min(m, n)
    noise: tuple = (1e-3, 0.3)     # relative to |A x*| / sqrt(m); zero for a third of the instances

    def __post_init__(self) -> None:
        bad = [d for d in self.designs if d not in DESIGNS]
        if bad or not self.designs:
            raise ValueError(f"unknown designs {bad}; known: {', '.join(DESIGNS)}")
        for m, n in self.shapes:
            if "dictionary" in self.designs and math.isqrt(m) ** 2 != m:
                raise ValueError(f"shape {m} x {n}: dictionary designs need m a square (patches sqrt(m) x sqrt(m))")

    def sample(self, batch, *, generator=None, dtype=torch.float32, device=None) -> LassoProblem:
        g = generator
        m, n = self.shapes[int(torch.randint(len(self.shapes), (1,), generator=g))]
        design = torch.randint(len(self.designs), (batch,), generator=g)
        A = torch.randn(batch, m, n, generator=g, dtype=torch.float64)
        F, W = _factor_loadings(batch, m, n, g)
        cols = _log_uniform(0.1, 10.0, (batch, 1, n), g)
        scale = _log_uniform(0.1, 10.0, (batch, 1, 1), g)
        k = torch.clamp((_log_uniform(*self.sparsity, batch, g) * min(m, n)).round().long(), min=1)
        x = _sparse_codes(batch, n, k, g)
        eta = torch.where(torch.rand(batch, generator=g) < 1 / 3, torch.zeros(batch, dtype=torch.float64),
                          _log_uniform(*self.noise, batch, g))
        e = torch.randn(batch, m, generator=g, dtype=torch.float64)
        ratio = _log_uniform(*self.lam_ratio, batch, g)
        patch_pick = torch.rand(batch, generator=g, dtype=torch.float64)

        kinds = [self.designs[int(i)] for i in design]
        unit = lambda M: M / torch.linalg.vector_norm(M, dim=-2, keepdim=True)  # noqa: E731
        b = torch.empty(batch, m, dtype=torch.float64)
        has_code = torch.ones(batch, dtype=torch.bool)
        for i, kind in enumerate(kinds):
            if kind == "gaussian":
                A[i] = unit(A[i])
            elif kind == "factor":
                A[i] = unit(A[i] + W[i] @ F[i].T)
            elif kind == "scaled":
                A[i] = A[i] * cols[i] * scale[i]
            else:
                D, held = image_dictionary(math.isqrt(m), n)
                A[i] = torch.from_numpy(D)
                b[i] = torch.from_numpy(held[int(patch_pick[i] * len(held))])
                has_code[i] = False
        clean = torch.einsum("bmn,bn->bm", A, x)
        noisy = clean + eta[:, None] * clean.norm(dim=-1, keepdim=True) / math.sqrt(m) * e
        b = torch.where(has_code[:, None], noisy, b)
        lam_max = torch.einsum("bmn,bm->bn", A, b).abs().amax(-1)
        c = self.lam / (ratio * lam_max)
        prob = LassoProblem(A=A, b=b * c[:, None], x_true=torch.where(has_code[:, None], x * c[:, None], float("nan")),
                            prox="l1", prox_params={"lam": self.lam})
        return prob.to(device=device, dtype=dtype)


def _zscore_columns(W: Tensor) -> Tensor:
    std = W.std(-2, keepdim=True)
    return (W - W.mean(-2, keepdim=True)) / torch.where(std > 0, std, torch.ones_like(std))


@dataclass
class LogisticMixture(ProblemFamily):
    """L1 logistic regression instances from a broad mixture (the module docstring says
    which); ``f, r`` as :class:`~torch_l2o.problems.LogisticProblem`."""

    shapes: tuple = ((200, 100), (400, 200), (500, 50), (1000, 50), (1000, 100), (2000, 40))
    designs: tuple = LOGISTIC_DESIGNS
    lam_ratio: tuple = (0.01, 0.5)
    sparsity: tuple = (0.05, 0.5)   # nonzeros of the code, as a fraction of n
    positives: tuple = (0.05, 0.5)

    def __post_init__(self) -> None:
        bad = [d for d in self.designs if d not in LOGISTIC_DESIGNS]
        if bad or not self.designs:
            raise ValueError(f"unknown designs {bad}; known: {', '.join(LOGISTIC_DESIGNS)}")

    def sample(self, batch, *, generator=None, dtype=torch.float32, device=None) -> LogisticProblem:
        g = generator
        N, n = self.shapes[int(torch.randint(len(self.shapes), (1,), generator=g))]
        design = torch.randint(len(self.designs), (batch,), generator=g)
        Z = torch.randn(batch, N, n, generator=g, dtype=torch.float64)
        F, Wf = _factor_loadings(batch, N, n, g)
        rates = 0.05 + 0.45 * torch.rand(batch, 1, n, generator=g, dtype=torch.float64)
        U = torch.rand(batch, N, n, generator=g, dtype=torch.float64)
        k = torch.clamp((_log_uniform(*self.sparsity, batch, g) * n).round().long(), min=1)
        x = _sparse_codes(batch, n, k, g)
        kappa = _log_uniform(1.0, 30.0, (batch, 1), g)
        e = torch.rand(batch, N, generator=g, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
        pos = self.positives[0] + (self.positives[1] - self.positives[0]) * torch.rand(batch, 1, generator=g,
                                                                                         dtype=torch.float64)
        ratio = float(_log_uniform(*self.lam_ratio, 1, g))

        W = torch.empty_like(Z)
        for i, d in enumerate(design.tolist()):
            kind = self.designs[d]
            if kind == "gaussian":
                W[i] = Z[i]
            elif kind == "factor":
                W[i] = Z[i] + Wf[i] @ F[i].T
            elif kind == "heavy":
                W[i] = _zscore_columns(torch.exp(Z[i]))
            else:
                W[i] = _zscore_columns((U[i] < rates[i]).to(torch.float64))
        u = torch.einsum("bNn,bn->bN", W, x)
        u = u / u.std(-1, keepdim=True).clamp_min(1e-12)
        s = kappa * u + torch.log(e / (1 - e))  # logistic noise
        q = torch.stack([torch.quantile(s[i], 1 - float(pos[i])) for i in range(batch)])[:, None]
        y = (s >= q).to(torch.float64)
        lam_max = torch.einsum("bNn,bN->bn", W, y - 0.5).abs().amax(-1) / N
        lam = ratio * float(lam_max.median())
        prob = LogisticProblem(W=W, y=y, x_true=x, prox="l1", prox_params={"lam": lam})
        return prob.to(device=device, dtype=dtype)
