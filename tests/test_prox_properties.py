"""Properties of every registered prox (hypothesis), and an independent check against
pyproximal: optimality, firm non-expansiveness, the Moreau identity."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from torch_l2o.prox import get_prox

D = torch.float64
LAM = 0.7

# name -> (strengths, projection onto lam * (unit ball of the dual norm) or the conjugate's prox
#          prox_{r*/t}(v) as a function (v, t) -> ..., None when not known in closed form)
CASES = {
    "none": ({}, lambda v, t: torch.zeros_like(v)),
    "l1": ({"lam": LAM}, lambda v, t: v.clamp(-LAM, LAM)),
    "nonneg": ({}, lambda v, t: v.clamp(max=0)),
    "nonneg_l1": ({"lam": LAM}, lambda v, t: v.clamp(max=LAM)),
    "l2sq": ({"lam": LAM}, lambda v, t: v * (t * LAM) / (1 + t * LAM)),
    "box": ({"lo": -0.5, "hi": 0.8}, None),
    "elastic_net": ({"lam": LAM, "lam2": 0.3}, None),
    "group_l1": ({"lam": LAM, "dim": -1},
                 lambda v, t: v / torch.clamp(v.norm(dim=-1, keepdim=True) / LAM, min=1.0)),
    "nuclear": ({"lam": LAM}, None),
    "simplex": ({"dim": -1}, None),
}

arrays = st.integers(0, 2**31 - 1).map(lambda s: torch.Generator().manual_seed(s))


def _rand(g, *shape, scale=2.0):
    return torch.randn(*shape, generator=g, dtype=D) * scale


def _subgradient_ok(name, params, x, v, t):
    """Is v = (z - x)/t in the subdifferential of r at x (elementwise or per group)?"""
    tol = 1e-9
    lam = params.get("lam", 0.0)
    if name == "none":
        return bool((v.abs() <= tol).all())
    if name == "l1":
        on = (x != 0)
        return bool(((v - lam * torch.sign(x)).abs()[on] <= tol).all() and (v.abs()[~on] <= lam + tol).all())
    if name == "nonneg":
        return bool((x >= 0).all() and (v[x > 0].abs() <= tol).all() and (v[x == 0] <= tol).all())
    if name == "nonneg_l1":
        return bool((x >= 0).all() and ((v - lam)[x > 0].abs() <= tol).all() and (v[x == 0] <= lam + tol).all())
    if name == "l2sq":
        return bool(((v - lam * x).abs() <= tol).all())
    if name == "elastic_net":
        w = v - params["lam2"] * x
        on = x != 0
        return bool(((w - lam * torch.sign(x)).abs()[on] <= tol).all() and (w.abs()[~on] <= lam + tol).all())
    if name == "box":
        lo, hi = params["lo"], params["hi"]
        inside = (x > lo) & (x < hi)
        return bool((x >= lo).all() and (x <= hi).all() and (v[inside].abs() <= tol).all()
                    and (v[x == lo] <= tol).all() and (v[x == hi] >= -tol).all())
    if name == "group_l1":
        n = x.norm(dim=-1)
        on = n > 0
        ok_on = ((v - lam * x / n.clamp(min=1e-300).unsqueeze(-1)).abs().amax(-1) <= 1e-7)[on]
        ok_off = (v.norm(dim=-1) <= lam + 1e-9)[~on]
        return bool(ok_on.all() and ok_off.all())
    if name == "simplex":  # v = theta 1 + (normal cone of x >= 0): constant on the support, <= it off
        on = x > 0
        theta = torch.where(on, v, torch.nan).nanmean(-1, keepdim=True)
        return bool(((v - theta).abs()[on] <= 1e-9).all() and ((v - theta) <= 1e-9)[~on].all()
                    and torch.allclose(x.sum(-1), torch.ones(x.shape[0], dtype=x.dtype)))
    if name == "nuclear":  # v in lam d|X|_*  <=>  |v|_2 <= lam and <v, X> = lam |X|_*
        nuc = float(torch.linalg.matrix_norm(x, ord="nuc"))
        return bool(torch.linalg.matrix_norm(v, ord=2) <= lam * (1 + 1e-9)) and abs(
            float((v * x).sum()) - lam * nuc) <= 1e-9 * max(1.0, nuc)
    raise AssertionError(name)


@pytest.mark.parametrize("name", sorted(CASES))
@given(g=arrays)
def test_optimality_condition(name, g):
    params, _ = CASES[name]
    shape = (5, 4)
    z = _rand(g, *shape)
    if name == "nuclear":
        t = float(torch.rand((), generator=g, dtype=D)) + 0.1
    elif name in ("group_l1", "simplex"):
        t = torch.rand(5, 1, generator=g, dtype=D) + 0.1  # uniform within each group (a row)
    else:
        t = torch.rand(*shape, generator=g, dtype=D) + 0.1  # per coordinate
    x = get_prox(name)(z, t, **params)
    assert _subgradient_ok(name, params, x, (z - x) / t, t)


@pytest.mark.parametrize("name", sorted(CASES))
@given(g=arrays)
def test_firmly_nonexpansive(name, g):
    """|P z1 - P z2|^2 <= <P z1 - P z2, z1 - z2> for a scalar step."""
    params, _ = CASES[name]
    t = float(torch.rand((), generator=g, dtype=D)) + 0.1
    z1, z2 = _rand(g, 5, 4), _rand(g, 5, 4)
    p = get_prox(name)
    d = p(z1, t, **params) - p(z2, t, **params)
    assert float((d * d).sum()) <= float((d * (z1 - z2)).sum()) + 1e-10


@pytest.mark.parametrize("name", sorted(n for n, (_, conj) in CASES.items() if conj is not None))
@given(g=arrays)
def test_moreau_identity(name, g):
    """z = prox_{t r}(z) + t prox_{r*/t}(z/t)."""
    params, conj = CASES[name]
    t = float(torch.rand((), generator=g, dtype=D)) + 0.1
    z = _rand(g, 5, 4)
    x = get_prox(name)(z, t, **params)
    assert torch.allclose(x + t * conj(z / t, t), z, atol=1e-12)


# ---------------------------------------------------------------- pyproximal

pyproximal = pytest.importorskip("pyproximal")


@given(g=arrays)
def test_against_pyproximal(g):
    t = float(torch.rand((), generator=g, dtype=D)) + 0.1
    z = _rand(g, 6, 5)
    zn = z.numpy()
    ours = get_prox("l1")(z, t, lam=LAM).numpy()
    assert np.allclose(ours, pyproximal.L1(sigma=LAM).prox(zn.ravel(), t).reshape(zn.shape), atol=1e-12)
    ours = get_prox("box")(z, t, lo=-0.5, hi=0.8).numpy()
    assert np.allclose(ours, pyproximal.Box(lower=-0.5, upper=0.8).prox(zn.ravel(), t).reshape(zn.shape))
    # pyproximal's L21 groups the columns of an (ndim, N) array: our group_l1 over dim 0
    ours = get_prox("group_l1")(z, t, lam=LAM, dim=0).numpy()
    assert np.allclose(ours, pyproximal.L21(ndim=6, sigma=LAM).prox(zn.ravel(), t).reshape(zn.shape), atol=1e-12)
    ours = get_prox("nuclear")(z, t, lam=LAM).numpy()
    assert np.allclose(ours, pyproximal.Nuclear(dim=zn.shape, sigma=LAM).prox(zn.ravel(), t).reshape(zn.shape),
                       atol=1e-10)
