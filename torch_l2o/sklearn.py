r"""scikit-learn estimators on top of :func:`torch_l2o.solve`.

::

    from torch_l2o.sklearn import Lasso, LogisticRegression
    Lasso(alpha=0.1).fit(X, y).coef_
    LogisticRegression(C=0.5, method="pamr").fit(X, labels).predict(X)

They follow scikit-learn's parameterization (the same objective as
:class:`sklearn.linear_model.Lasso` and ``LogisticRegression(l1_ratio=1, solver="saga")``),
fit several targets / classes as one batch of problems, and stop on the certified
relative duality gap of :func:`torch_l2o.solve` (``tol``), with any torch_l2o optimizer
(``method``) on any torch device. Requires scikit-learn.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np
import torch
from scipy.special import expit
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.exceptions import ConvergenceWarning as SkConvergenceWarning
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from .problems.families import LassoProblem, LogisticProblem
from .registry import available_architectures
from .solver import ConvergenceWarning, SolveResult, solve

__all__ = ["Lasso", "LogisticRegression"]


@dataclass
class _TorchL2OEstimator(BaseEstimator):
    """What both estimators share: checked settings, the solve, the convergence report."""

    def _check_params(self) -> None:
        name = type(self).__name__
        if isinstance(self.tol, bool) or not isinstance(self.tol, Real) or not self.tol > 0:
            raise ValueError(f"{name}: tol must be a number > 0, got {self.tol!r}")
        if isinstance(self.max_iter, bool) or not isinstance(self.max_iter, Integral) or self.max_iter < 1:
            raise ValueError(f"{name}: max_iter must be an int >= 1, got {self.max_iter!r}")
        if isinstance(self.check_every, bool) or not isinstance(self.check_every, Integral) or self.check_every < 1:
            raise ValueError(f"{name}: check_every must be an int >= 1, got {self.check_every!r}")

    def _torch_dtype(self) -> torch.dtype:
        dt = getattr(torch, self.dtype, None) if isinstance(self.dtype, str) else self.dtype
        if dt not in (torch.float64, torch.float32):
            raise ValueError(f"{type(self).__name__}: dtype must be 'float64' or 'float32', got {self.dtype!r}")
        return dt

    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(a), dtype=self._torch_dtype(), device=torch.device(self.device))

    def _solve(self, problem) -> SolveResult:
        options = {}
        if self.weights is not None:
            if not (isinstance(self.method, str) and self.method in available_architectures()):
                raise ValueError(f"{type(self).__name__}: weights={self.weights!r} selects a learned optimizer's "
                                 f"weights; method={self.method!r} has none (give method='pamr', 'pagru', ...)")
            options["weights"] = self.weights
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # reported below in scikit-learn's terms
            res = solve(problem, self.method, tol=float(self.tol), max_iter=int(self.max_iter),
                        check_every=int(self.check_every), progress=bool(self.verbose), **options)
        if not bool(res.converged.all()):
            warnings.warn(
                f"{type(self).__name__}: {int((~res.converged).sum())} of {len(res.converged)} problems did not "
                f"reach the relative {res.criterion} tol={self.tol:g} in max_iter={self.max_iter} iterations "
                f"(worst {float(res.history[-1].max()):.3g}); increase max_iter or tol, or scale the features",
                SkConvergenceWarning, stacklevel=3)
        return res


class Lasso(RegressorMixin, _TorchL2OEstimator):
    r"""Linear regression with an ``l1`` penalty, scikit-learn's objective

    .. math::
        \min_{w, b}\ \frac{1}{2 N} \|y - X w - b\|_2^2 + \alpha \|w\|_1

    (``N`` samples), solved by :func:`torch_l2o.solve` as the LASSO
    :math:`\tfrac12|A w - y_c|^2 + \lambda |w|_1` with :math:`\lambda = \alpha N`, on the
    centered data ``A = X - mean(X)``, ``y_c = y - mean(y)`` when ``fit_intercept`` (then
    :math:`b = \bar y - \bar X^\top w`, exactly as scikit-learn). A 2-D ``y`` of ``T`` targets
    fits ``T`` problems as one batch.

    Args:
        alpha: the ``l1`` strength, ``>= 0``.
        fit_intercept: fit the unpenalized intercept ``b``.
        method: the optimizer (see :func:`torch_l2o.solve`): ``"fista"``, ``"ista"``,
            a learned architecture (``"pamr"``, ...), a class or a factory.
        weights: a learned architecture's weights (``"lasso-mix"``, a file, ...; default:
            the architecture's own default). The mixture weights were trained on broad
            families of problems and do better than the papers' single-family weights on
            data unlike those families (``benchmarks/RESULTS.md``).
        tol: the relative duality gap to stop at: ``gap / F(w) <= tol`` certifies
            ``F(w) - F* <= tol F(w)``.
        max_iter: the most iterations per target.
        check_every: test ``tol`` after every ``check_every``-th iteration (the test costs
            about two gradients; a target then stops at most ``check_every - 1`` iterations
            late).
        device, dtype: where and in which precision to solve (``"float64"`` or ``"float32"``).
        verbose: show a progress bar.

    Attributes:
        coef_: ``(n_features,)``, or ``(n_targets, n_features)`` for a 2-D ``y``.
        intercept_: a float, or ``(n_targets,)``.
        n_iter_: iterations (an int, or a list per target).
        n_features_in_, feature_names_in_: as in scikit-learn.
    """

    def __init__(self, alpha=1.0, *, fit_intercept=True, method="fista", weights=None, tol=1e-6, max_iter=10_000,
                 check_every=1, device="cpu", dtype="float64", verbose=False):
        self.alpha = alpha
        self.fit_intercept = fit_intercept
        self.method = method
        self.weights = weights
        self.tol = tol
        self.max_iter = max_iter
        self.check_every = check_every
        self.device = device
        self.dtype = dtype
        self.verbose = verbose

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags

    def fit(self, X, y):
        """Fit on ``X`` ``(N, n_features)`` and ``y`` ``(N,)`` or ``(N, n_targets)``; returns ``self``."""
        self._check_params()
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, Real) or not self.alpha >= 0:
            raise ValueError(f"Lasso: alpha must be a number >= 0, got {self.alpha!r}")
        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32], y_numeric=True, multi_output=True)
        X, y = X.astype(np.float64), y.astype(np.float64)
        Y = y.reshape(len(y), -1)  # (N, T)
        X_mean = X.mean(0) if self.fit_intercept else np.zeros(X.shape[1])
        Y_mean = Y.mean(0) if self.fit_intercept else np.zeros(Y.shape[1])
        A = self._tensor(X - X_mean)
        T = Y.shape[1]
        problem = LassoProblem(A=A.expand(T, -1, -1), b=self._tensor((Y - Y_mean).T), prox="l1",
                               prox_params={"lam": float(self.alpha) * X.shape[0]})
        res = self._solve(problem)
        coef = res.x.double().cpu().numpy()  # (T, n)
        intercept = Y_mean - coef @ X_mean
        if y.ndim == 1:
            self.coef_, self.intercept_, self.n_iter_ = coef[0], float(intercept[0]), int(res.iterations[0])
        else:
            self.coef_, self.intercept_, self.n_iter_ = coef, intercept, res.iterations.tolist()
        return self

    def predict(self, X):
        """``X w + b``: ``(N,)``, or ``(N, n_targets)`` for a model fit on a 2-D ``y``."""
        check_is_fitted(self)
        X = validate_data(self, X, dtype=[np.float64, np.float32], reset=False)
        return X.astype(np.float64) @ self.coef_.T + self.intercept_


class LogisticRegression(ClassifierMixin, _TorchL2OEstimator):
    r"""Logistic regression with an ``l1`` penalty and an unpenalized intercept,
    scikit-learn's objective (``LogisticRegression(l1_ratio=1)``; before 1.8 ``penalty="l1"``)

    .. math::
        \min_{w, b}\ C \sum_{i=1}^N \big[\log(1 + e^{z_i}) - y_i z_i\big] + \|w\|_1,
        \qquad z_i = x_i^\top w + b,\ y_i \in \{0, 1\},

    solved by :func:`torch_l2o.solve` as the mean-loss problem (the objective divided by
    ``C N``), :math:`\tfrac1N\sum_i \ell_i + \lambda |w|_1` with :math:`\lambda = 1 / (C N)`;
    the intercept is one more coordinate with a constant feature and no penalty. Labels may
    be any scikit-learn class labels (strings, ...). With ``K > 2`` classes it fits ``K``
    one-vs-rest problems as one batch (scikit-learn's ``LogisticRegression`` fits the
    multinomial loss instead); ``predict_proba`` then normalises the ``K`` sigmoids.

    Args:
        penalty: ``"l1"`` (the only one).
        C: the inverse strength, ``> 0`` (``np.inf``: no penalty).
        fit_intercept, method, weights, tol, max_iter, check_every, device, dtype, verbose: as for :class:`Lasso`
            (``weights="logistic-mix"``: the logistic mixture weights).

    Attributes:
        classes_: the labels; coef_: ``(1, n_features)`` (binary) or ``(K, n_features)``;
        intercept_: ``(1,)`` or ``(K,)``; n_iter_: ``(1,)`` or ``(K,)`` iterations.
    """

    def __init__(self, penalty="l1", C=1.0, *, fit_intercept=True, method="fista", weights=None, tol=1e-6,
                 max_iter=10_000, check_every=1, device="cpu", dtype="float64", verbose=False):
        self.penalty = penalty
        self.C = C
        self.fit_intercept = fit_intercept
        self.method = method
        self.weights = weights
        self.tol = tol
        self.max_iter = max_iter
        self.check_every = check_every
        self.device = device
        self.dtype = dtype
        self.verbose = verbose

    def fit(self, X, y):
        """Fit on ``X`` ``(N, n_features)`` and class labels ``y`` ``(N,)``; returns ``self``."""
        self._check_params()
        if self.penalty != "l1":
            raise ValueError(f"LogisticRegression: penalty={self.penalty!r} is not supported, only 'l1'; for "
                             "'l2' or 'elasticnet' use sklearn.linear_model.LogisticRegression")
        if isinstance(self.C, bool) or not isinstance(self.C, Real) or not self.C > 0:
            raise ValueError(f"LogisticRegression: C must be a number > 0 (np.inf: no penalty), got {self.C!r}")
        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32])
        check_classification_targets(y)
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        K = len(self.classes_)
        if K < 2:
            raise ValueError("LogisticRegression needs samples of at least 2 classes in the data, but the data "
                             f"contains only one class: {self.classes_[0]!r}")
        N, n = X.shape
        # one binary problem (the second class is positive), or K one-vs-rest problems
        Y = (y_idx == 1)[None] if K == 2 else (y_idx[None, :] == np.arange(K)[:, None])
        # With an intercept the features are centered: z = (x - mu)^T w + b' with b = b' - mu^T w is
        # the same model and the same objective (b is not penalized), far better conditioned.
        mu = X.mean(0) if self.fit_intercept else np.zeros(n)
        feats = np.hstack([X - mu, np.ones((N, 1))]) if self.fit_intercept else X
        lam = np.full(feats.shape[1], 1.0 / (self.C * N))
        if self.fit_intercept:
            lam[-1] = 0.0  # the intercept is not penalized
        W = self._tensor(feats)
        # a uniform strength as a number, else one per problem and coordinate (the intercept's
        # 0): both shapes the fused steps serve
        strength = float(lam[0]) if not self.fit_intercept else self._tensor(np.broadcast_to(lam, (len(Y), len(lam))))
        problem = LogisticProblem(W=W.expand(len(Y), -1, -1), y=self._tensor(Y.astype(np.float64)),
                                      prox="l1", prox_params={"lam": strength})
        res = self._solve(problem)
        sol = res.x.double().cpu().numpy()
        self.coef_ = sol[:, :n]
        self.intercept_ = sol[:, n] - self.coef_ @ mu if self.fit_intercept else np.zeros(len(sol))
        self.n_iter_ = res.iterations.numpy()
        return self

    def decision_function(self, X):
        """``X w + b`` per problem: ``(N,)`` for two classes (positive: ``classes_[1]``), else ``(N, K)``."""
        check_is_fitted(self)
        X = validate_data(self, X, dtype=[np.float64, np.float32], reset=False)
        scores = X.astype(np.float64) @ self.coef_.T + self.intercept_
        return scores[:, 0] if scores.shape[1] == 1 else scores

    def predict(self, X):
        """The most likely class label per sample."""
        scores = self.decision_function(X)
        return self.classes_[(scores > 0).astype(int) if scores.ndim == 1 else scores.argmax(1)]

    def predict_proba(self, X):
        """``(N, K)`` class probabilities: the sigmoid of the decision for two classes; with
        one-vs-rest, the ``K`` sigmoids normalised to sum to 1."""
        scores = self.decision_function(X)
        p = expit(scores)
        if scores.ndim == 1:
            return np.column_stack([1 - p, p])
        return p / p.sum(1, keepdims=True)

    def predict_log_proba(self, X):
        """``log`` of :meth:`predict_proba`."""
        return np.log(self.predict_proba(X))
