"""torch_l2o.sklearn: scikit-learn's estimator checks, and scikit-learn's objective reached on
its bundled data sets."""

import warnings

import numpy as np
import pytest
import torch
from scipy.special import log_expit
from sklearn import linear_model as sk
from sklearn.datasets import load_breast_cancer, load_diabetes, load_iris
from sklearn.exceptions import ConvergenceWarning
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from torch_l2o.sklearn import Lasso, LogisticRegression

# Every check applies and passes: no expected failures. Two are skipped by scikit-learn itself
# where pandas or SCIPY_ARRAY_API are missing (check_*_data_not_an_array, check_array_api_input).
EXPECTED_FAILED_CHECKS: dict[str, str] = {}


@parametrize_with_checks([Lasso(), LogisticRegression()], expected_failed_checks=lambda est: EXPECTED_FAILED_CHECKS)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


# ---------------------------------------------------------------- scikit-learn's objective


@pytest.fixture(scope="module")
def diabetes():
    return load_diabetes(return_X_y=True)


@pytest.fixture(scope="module")
def breast_cancer():
    X, y = load_breast_cancer(return_X_y=True)
    return StandardScaler().fit_transform(X), y


def lasso_objective(X, y, coef, intercept, alpha):
    """scikit-learn's Lasso: 1/(2 N) |y - X w - b|^2 + alpha |w|_1."""
    r = y - X @ coef - intercept
    return r @ r / (2 * len(y)) + alpha * np.abs(coef).sum()


def logistic_objective(X, y, coef, intercept, C):
    """scikit-learn's l1 LogisticRegression with an unpenalized intercept: C sum_i logloss_i + |w|_1."""
    z = X @ coef.ravel() + intercept
    return C * -log_expit((2 * y - 1) * z).sum() + np.abs(coef).sum()


@pytest.mark.parametrize("alpha", [0.001, 0.01, 0.1, 1.0])
def test_lasso_matches_sklearn_objective(diabetes, alpha):
    X, y = diabetes
    ours = Lasso(alpha=alpha).fit(X, y)
    ref = sk.Lasso(alpha=alpha, tol=1e-14, max_iter=1_000_000).fit(X, y)
    F, F_sk = (lasso_objective(X, y, m.coef_, m.intercept_, alpha) for m in (ours, ref))
    assert abs(F - F_sk) <= 1e-6 * F_sk
    assert F <= F_sk * (1 + 1e-9)  # and not worse: ours is certified, F - F* <= tol F
    np.testing.assert_allclose(ours.predict(X), ref.predict(X), rtol=1e-4)


@pytest.mark.parametrize("C", [0.01, 0.1, 1.0])
def test_logistic_matches_sklearn_objective(breast_cancer, C):
    X, y = breast_cancer
    ours = LogisticRegression(C=C).fit(X, y)
    # liblinear reaches ~1e-11 here in milliseconds (saga needs minutes for 1e-6 at C = 1). It
    # penalizes its intercept: a synthetic feature of 1e6 makes that negligible (|b| / 1e6). Its
    # shuffling is seeded: at some seeds tol=1e-12 never stops (rounding), hence 1e-10.
    ref = sk.LogisticRegression(l1_ratio=1.0, C=C, solver="liblinear", intercept_scaling=1e6, tol=1e-10,
                                max_iter=10_000, random_state=0).fit(X, y)
    F, F_sk = (logistic_objective(X, y, m.coef_, m.intercept_[0], C) for m in (ours, ref))
    assert abs(F - F_sk) <= 1e-6 * F_sk
    assert F <= F_sk * (1 + 1e-9)
    assert (ours.predict(X) == ref.predict(X)).mean() >= 0.99


def test_lasso_many_targets_are_one_batch(diabetes):
    X, y = diabetes
    Y = np.column_stack([y, -2 * y + 30, y**0.5])
    ours = Lasso(alpha=0.05).fit(X, Y)
    assert ours.coef_.shape == (3, X.shape[1]) and ours.intercept_.shape == (3,) and len(ours.n_iter_) == 3
    assert ours.predict(X).shape == (len(y), 3)
    for t in range(3):
        ref = sk.Lasso(alpha=0.05, tol=1e-14, max_iter=1_000_000).fit(X, Y[:, t])
        F = lasso_objective(X, Y[:, t], ours.coef_[t], ours.intercept_[t], 0.05)
        F_sk = lasso_objective(X, Y[:, t], ref.coef_, ref.intercept_, 0.05)
        assert abs(F - F_sk) <= 1e-6 * F_sk


def test_logistic_multiclass_is_one_vs_rest_with_any_labels():
    X, y = load_iris(return_X_y=True)
    X = StandardScaler().fit_transform(X)
    names = np.array(["setosa", "versicolor", "virginica"])[y]
    clf = LogisticRegression(C=0.5).fit(X, names)
    assert list(clf.classes_) == ["setosa", "versicolor", "virginica"]
    assert clf.coef_.shape == (3, 4) and clf.intercept_.shape == (3,) and clf.n_iter_.shape == (3,)
    assert clf.score(X, names) > 0.9 and set(clf.predict(X)) <= set(names)
    np.testing.assert_allclose(clf.predict_proba(X).sum(1), 1.0)
    for k, name in enumerate(clf.classes_):  # each row is the binary fit of "k versus the rest"
        binary = LogisticRegression(C=0.5).fit(X, names == name)
        np.testing.assert_allclose(clf.coef_[k], binary.coef_[0], atol=1e-5)
        np.testing.assert_allclose(clf.intercept_[k], binary.intercept_[0], atol=1e-5)


# ---------------------------------------------------------------- a learned optimizer


@pytest.mark.filterwarnings("ignore:.*the learned step diverged or stalled:RuntimeWarning")  # PA-MR falls back on diabetes at alpha 0.01
def test_learned_optimizer_reaches_the_same_objective(diabetes, breast_cancer):
    X, y = diabetes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the watchdog may take over a diverging learned step
        ours = Lasso(alpha=0.1, method="pamr").fit(X, y)
    ref = sk.Lasso(alpha=0.1, tol=1e-14, max_iter=1_000_000).fit(X, y)
    F, F_sk = (lasso_objective(X, y, m.coef_, m.intercept_, 0.1) for m in (ours, ref))
    assert abs(F - F_sk) <= 1e-5 * F_sk

    X, y = breast_cancer
    ours = LogisticRegression(C=0.01, method="pamr", max_iter=3000).fit(X, y)
    fista = LogisticRegression(C=0.01).fit(X, y)
    F, F_ref = (logistic_objective(X, y, m.coef_, m.intercept_[0], 0.01) for m in (ours, fista))
    assert abs(F - F_ref) <= 1e-5 * F_ref


@pytest.mark.filterwarnings("ignore:.*the learned step diverged or stalled:RuntimeWarning")  # near 1e-6 the watchdog takes over
def test_learned_weights_option(breast_cancer):
    """``weights=`` reaches the learned optimizer (the mixture weights: another run than the
    default weights, the same objective), and is refused with a method that has none."""
    X, y = breast_cancer
    runs = {w: LogisticRegression(C=0.01, method="pagru", weights=w, fit_intercept=False, max_iter=3000).fit(X, y)
            for w in (None, "logistic-mix")}
    ref = LogisticRegression(C=0.01, fit_intercept=False).fit(X, y)
    F = {w: logistic_objective(X, y, m.coef_, 0.0, 0.01) for w, m in runs.items()}
    F_ref = logistic_objective(X, y, ref.coef_, 0.0, 0.01)
    assert all(abs(f - F_ref) <= 1e-5 * F_ref for f in F.values())
    assert runs[None].n_iter_[0] != runs["logistic-mix"].n_iter_[0]
    assert runs["logistic-mix"].get_params()["weights"] == "logistic-mix"
    with pytest.raises(ValueError, match="weights='lasso-mix' selects a learned optimizer's weights; "
                                         "method='fista' has none"):
        Lasso(weights="lasso-mix").fit(X, y)


# ---------------------------------------------------------------- bad input and non-convergence


def test_errors_name_the_fix(diabetes):
    X, y = diabetes
    with pytest.raises(ValueError, match="penalty='l2' is not supported, only 'l1'.*sklearn.linear_model"):
        LogisticRegression(penalty="l2").fit(X, y > 150)
    with pytest.raises(ValueError, match="C must be a number > 0"):
        LogisticRegression(C=0).fit(X, y > 150)
    with pytest.raises(ValueError, match="alpha must be a number >= 0"):
        Lasso(alpha=-1).fit(X, y)
    with pytest.raises(ValueError, match="tol must be a number > 0"):
        Lasso(tol=0).fit(X, y)
    with pytest.raises(ValueError, match="dtype must be 'float64' or 'float32'"):
        Lasso(dtype="int8").fit(X, y)
    with pytest.raises(ValueError, match="unknown method 'cd'; known: fista, ista"):
        Lasso(method="cd").fit(X, y)
    with pytest.raises(ValueError, match="at least 2 classes"):
        LogisticRegression().fit(X, np.zeros(len(y)))


def test_not_converging_warns_in_sklearn_terms(diabetes):
    X, y = diabetes
    with pytest.warns(ConvergenceWarning, match="did not reach the relative gap tol=1e-06 in max_iter=3"):
        est = Lasso(alpha=0.01, max_iter=3).fit(X, y)
    assert est.n_iter_ == 3


def test_check_every_stops_at_the_next_check(diabetes):
    """``check_every=k``: the same fit, stopped at the first multiple of k at or after the
    iteration that checking every iteration stops at; a bad k names the fix."""
    X, y = diabetes
    every = Lasso(alpha=0.01).fit(X, y)
    est = Lasso(alpha=0.01, check_every=8).fit(X, y)
    assert est.n_iter_ == -(-every.n_iter_ // 8) * 8
    F, F_every = (lasso_objective(X, y, m.coef_, m.intercept_, 0.01) for m in (est, every))
    assert abs(F - F_every) <= 1e-6 * F_every  # both certified to tol=1e-6
    with pytest.raises(ValueError, match="check_every must be an int >= 1, got 0"):
        LogisticRegression(check_every=0).fit(X, (y > np.median(y)).astype(int))


def test_float32_and_device_options(diabetes):
    X, y = diabetes
    est = Lasso(alpha=0.1, dtype="float32", tol=1e-5, device=torch.device("cpu")).fit(X, y)
    ref = Lasso(alpha=0.1).fit(X, y)
    F, F_ref = (lasso_objective(X, y, m.coef_, m.intercept_, 0.1) for m in (est, ref))
    assert abs(F - F_ref) <= 1e-4 * F_ref
