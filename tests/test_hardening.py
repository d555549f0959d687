"""Defects a new user found on a clean clone: compile, half precision, corrupt weights,
backtracking on NaN, missing strengths, schedulers with lr=None, weight names, backends."""

import math
import pathlib
import shutil

import pytest
import torch

import torch_l2o
from torch_l2o.kernels import set_cpu_backend
from torch_l2o.weights import build_network, pretrained_dir


def _lasso(m=40, n=80, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(m, n, generator=g) / m**0.5
    x_true = torch.zeros(n)
    x_true[:8] = torch.randn(8, generator=g)
    return A, A @ x_true + 0.01 * torch.randn(m, generator=g)


# ---------------------------------------------------------------- 1. torch.compile


@pytest.mark.parametrize("make", [
    lambda ps: torch_l2o.FISTA(ps, prox="l1", lam=0.5),
    lambda ps: torch_l2o.PA(ps, prox="l1", lam=0.5, weights="untrained"),
], ids=["FISTA", "PA"])
def test_compiled_step_matches_eager_with_automatic_step(make):
    """lr=None under torch.compile(opt.step): the secant state must hold the previous point,
    not an alias of the parameter the compiled step then overwrites."""
    torch._dynamo.reset()
    A, b = _lasso(100, 200)
    runs = []
    for compiled in (False, True):
        x = torch.zeros(200, requires_grad=True)
        opt = make([x])
        step = torch.compile(opt.step) if compiled else opt.step
        xs = []
        for _ in range(30):
            opt.zero_grad()
            (0.5 * (A @ x - b).square().sum()).backward()
            step()
            xs.append(opt.solution(x).clone())
        runs.append(torch.stack(xs))
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- 2. half precision, lr=None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("make,closure", [
    (lambda ps: torch_l2o.FISTA(ps, prox="l1", lam=0.1), False),
    (lambda ps: torch_l2o.PA(ps, prox="l1", lam=0.1, weights="untrained"), False),
    (lambda ps: torch_l2o.FISTA(ps, prox="l1", lam=0.1), True),
], ids=["FISTA", "PA", "FISTA-backtracking"])
@pytest.mark.filterwarnings("ignore:.*the learned step diverged or stalled:RuntimeWarning")  # untrained PA diverges: the watchdog takes over
def test_half_precision_automatic_step_converges(make, closure, dtype):
    A, b = _lasso()

    def run(dt):
        x = torch.zeros(80, dtype=dt, requires_grad=True)
        opt = make([x])

        def f():
            opt.zero_grad()
            loss = 0.5 * (A.to(dt) @ x - b.to(dt)).square().sum()
            loss.backward()
            return loss

        biggest = 0.0
        for _ in range(200):
            if closure:
                opt.step(f)
            else:
                f()
                opt.step()
            biggest = max(biggest, float(x.detach().abs().max()))
        z = opt.solution(x).float()
        return float(0.5 * (A @ z - b).square().sum() + 0.1 * z.abs().sum()), biggest

    F32, big32 = run(torch.float32)
    F, big = run(dtype)
    assert F <= 1.01 * F32
    assert big <= 1.5 * big32


# ---------------------------------------------------------------- 3. non-finite weights


def test_corrupt_weight_file_without_card_is_refused(tmp_path):
    path = tmp_path / "pamr-lasso.safetensors"
    shutil.copy(pretrained_dir() / "pamr-lasso.safetensors", path)  # no card beside it
    data = bytearray(path.read_bytes())
    data[-100:] = b"\xff" * 100
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"pamr-lasso\.safetensors holds NaN or Inf in .*corrupt.*retrain"):
        torch_l2o.PAMR([torch.zeros(3, requires_grad=True)], lr=0.1, weights=str(path))


def test_non_finite_state_dict_is_refused():
    sd = build_network("pa", "untrained")[0].state_dict()
    sd["heads.p.weight"] = torch.full_like(sd["heads.p.weight"], math.nan)
    with pytest.raises(ValueError, match=r"the given state dict holds NaN in heads\.p\.weight; .*retrain"):
        torch_l2o.PA([torch.zeros(3, requires_grad=True)], lr=0.1, weights=sd)
    sd["heads.p.weight"] = [[0.0] * 5]
    with pytest.raises(ValueError, match=r"not tensors \(heads\.p\.weight\)"):
        torch_l2o.PA([torch.zeros(3, requires_grad=True)], lr=0.1, weights=sd)


# ---------------------------------------------------------------- 4. backtracking on NaN


@pytest.mark.parametrize("where", ["every trial point", "the current point"])
def test_backtracking_on_nan_losses_raises_and_writes_nothing(where):
    x = torch.ones(5, requires_grad=True)
    opt = torch_l2o.FISTA([x], prox="l1", lam=0.1)
    calls = []

    def closure():
        opt.zero_grad()
        f = (x - 2).square().sum()
        f.backward()
        calls.append(1)
        nan = where == "the current point" or len(calls) > 1
        return f.detach() * math.nan if nan else f

    with pytest.raises(FloatingPointError, match=f"NaN or Inf at {where}.*nothing was updated"):
        opt.step(closure)
    assert torch.equal(x, torch.ones(5)) and "lipschitz" not in opt.state[x]
    if where == "the current point":
        assert len(calls) == 1  # refused at once, not after 60 trial points


def test_backtracking_on_nan_losses_skips_when_asked():
    x = torch.ones(5, requires_grad=True)
    opt = torch_l2o.FISTA([x], prox="l1", lam=0.1, nonfinite="skip")

    def closure():
        opt.zero_grad()
        f = (x - 2).square().sum()
        f.backward()
        return f.detach() * math.nan

    opt.step(closure)
    assert torch.equal(x, torch.ones(5)) and opt.state[x]["skipped_steps"] == 1


def test_backtracking_failure_in_a_later_group_writes_nothing():
    x, z = torch.ones(3, requires_grad=True), torch.ones(3, requires_grad=True)
    opt = torch_l2o.FISTA([{"params": [x]}, {"params": [z]}])

    def closure():
        opt.zero_grad()
        f = (x - 2).square().sum() + (z - 2).square().sum()
        f.backward()
        bad = bool((z != 1).any())  # finite unless z moves: only the second group fails
        return f.detach() * math.nan if bad else f

    with pytest.raises(FloatingPointError, match="group 1"):
        opt.step(closure)
    assert torch.equal(x, torch.ones(3)) and torch.equal(z, torch.ones(3))
    assert "lipschitz" not in opt.state[x]


def test_backtracking_without_an_acceptable_step_raises():
    x = torch.ones(5, requires_grad=True)
    opt = torch_l2o.FISTA([x])
    calls = []

    def closure():  # a loss that does not match its gradient: 100 higher after the first call
        opt.zero_grad()
        f = (x - 2).square().sum()
        f.backward()
        calls.append(1)
        return f + 100 * (len(calls) > 1)

    with pytest.raises(RuntimeError, match="no step satisfying the descent lemma.*nothing was updated"):
        opt.step(closure)
    assert torch.equal(x, torch.ones(5)) and "lipschitz" not in opt.state[x]


# ---------------------------------------------------------------- 5. missing strengths


def test_prox_with_a_strength_needs_it():
    x = torch.zeros(4, requires_grad=True)
    for cls in (torch_l2o.ISTA, torch_l2o.FISTA):
        with pytest.raises(ValueError, match=r"prox 'l1' needs its strength: pass lam=\.\.\."):
            cls([x], prox="l1", lr=0.1)
    with pytest.raises(ValueError, match="prox 'nuclear' needs its strength"):
        torch_l2o.FISTA([torch.zeros(3, 3, requires_grad=True)], prox="nuclear", lr=0.1)
    opt = torch_l2o.FISTA([x], prox="l1", prox_params={"lam": 0.2}, lr=0.1)
    assert opt.prox_params(opt.param_groups[0])["lam"] == 0.2
    assert torch_l2o.FISTA([x], prox="l1", lam=0.0, lr=0.1).param_groups[0]["lam"] == 0.0
    for prox, pp in (("none", None), ("nonneg", None), ("box", {"lo": -1.0, "hi": 1.0}), ("simplex", None)):
        torch_l2o.FISTA([x], prox=prox, prox_params=pp, lr=0.1)
    opt = torch_l2o.FISTA([x], lr=0.1)
    with pytest.raises(ValueError, match="needs its strength"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "prox": "l2sq"})


# ---------------------------------------------------------------- 6. schedulers with lr=None


def test_scheduler_scales_the_automatic_step():
    """f = c/2 |x|^2: after the probe the secant is exactly c, so a step m / c leaves (1 - m) x."""
    c = 4.0
    x = torch.tensor([3.0, -3.0], dtype=torch.float64, requires_grad=True)
    opt = torch_l2o.ISTA([x])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    lrs, xs = [], []
    for _ in range(3):
        opt.zero_grad()
        (0.5 * c * x.square().sum()).backward()
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        xs.append(x.detach().clone())
        sched.step()
    assert lrs == [1.0, 0.5, 0.25] and opt.param_groups[0]["lr_auto"]
    torch.testing.assert_close(xs[2], xs[0] * 0.5 * 0.75)


# ---------------------------------------------------------------- 7. file names as weights


def test_weights_by_file_name():
    x = torch.zeros(3, requires_grad=True)
    a = torch_l2o.PAMR([x], lr=0.1, weights="pamr-lasso").net.state_dict()
    b = torch_l2o.PAMR([x], lr=0.1, weights="lasso").net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="holds L2O-PA-MR weights, not L2O-PA.*torch_l2o.PAMR.*lasso"):
        torch_l2o.PA([x], lr=0.1, weights="pamr-lasso")


# ---------------------------------------------------------------- 8. the CPU backend's way back


def test_cpu_backend_eager_is_the_reference():
    prev = set_cpu_backend("compile")
    try:
        assert set_cpu_backend("eager") == "compile"
        assert set_cpu_backend("eager") == "reference"
    finally:
        set_cpu_backend(prev)


# ---------------------------------------------------------------- 9. no torch.jit of our own


def test_no_torch_jit_in_the_package():
    """The torch.jit deprecation warnings under compile come from torch itself
    (torch/utils/mkldnn.py, imported by Inductor); none of our code uses torch.jit."""
    root = pathlib.Path(torch_l2o.__file__).parent
    users = [str(p.relative_to(root)) for p in root.rglob("*.py") if "torch.jit" in p.read_text()]
    assert users == []


@pytest.mark.parametrize("cls", [torch_l2o.PA, torch_l2o.PAMR, torch_l2o.RNNProp])
def test_bfloat16_state(cls):
    """``state_dtype=torch.bfloat16`` stores the recurrent state in bfloat16 (computed in
    float32), round-trips through ``state_dict``, and a wrong dtype names the choices."""
    kw = dict(prox="l1", lam=0.1, lr=0.05, instance_dims=1) if cls is not torch_l2o.RNNProp else {}
    x = torch.randn(3, 40, requires_grad=True)
    opt = cls([x], state_dtype=torch.bfloat16, **kw)
    for _ in range(3):
        opt.zero_grad()
        (x * x).sum().backward()
        opt.step()
    rec = {k for k in opt.net.init_state(1)}
    assert rec and all(opt.state[x][k].dtype == torch.bfloat16 for k in rec if opt.state[x][k].is_floating_point())
    assert opt.state[x]["h"].abs().sum() > 0
    x2 = x.detach().clone().requires_grad_(True)
    opt2 = cls([x2], state_dtype=torch.bfloat16, **kw)
    opt2.load_state_dict(opt.state_dict())
    assert all(torch.equal(opt2.state[x2][k], opt.state[x][k]) for k in rec)
    with pytest.raises(ValueError, match="state_dtype must be one of"):
        cls([x], state_dtype=torch.float64, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_finite_check_agrees_with_isfinite(dtype):
    """The step's non-finite check (a float64 sum below float64) says exactly what
    isfinite().all() says: extreme finite values do not overflow it, and NaN, +Inf, -Inf
    (also +Inf and -Inf together, which sum to NaN) are caught."""
    from hypothesis import given
    from hypothesis import strategies as st

    from torch_l2o.optim.base import _all_finite

    big = torch.finfo(dtype).max
    specials = st.sampled_from([0.0, 1.0, -1.0, big, -big, math.nan, math.inf, -math.inf])

    @given(st.lists(st.one_of(st.floats(-1e4, 1e4), specials), min_size=0, max_size=300))
    def check(vals):
        g = torch.tensor(vals, dtype=torch.float64).to(dtype)
        assert bool(_all_finite(g)) == bool(torch.isfinite(g).all())

    check()
    assert bool(_all_finite(torch.full((10_000,), big, dtype=dtype)))  # n * max: finite in float64
    g = torch.zeros(5, dtype=dtype)
    g[1], g[3] = math.inf, -math.inf
    assert not bool(_all_finite(g))


# ---------------------------------------------------------------- a second new user's review

_ALL = [torch_l2o.FISTA, torch_l2o.ISTA, torch_l2o.PA, torch_l2o.PAGRU, torch_l2o.PAMR, torch_l2o.L2ODM,
        torch_l2o.RNNProp]


def _make(cls, ps, **kw):
    if cls not in (torch_l2o.L2ODM, torch_l2o.RNNProp):
        kw = dict(prox="l1", lam=0.1, **kw)
    if cls not in (torch_l2o.FISTA, torch_l2o.ISTA):
        kw["weights"] = "untrained"
    return cls(ps, **kw)


@pytest.mark.parametrize("cls", _ALL)
def test_instance_dims_must_leave_coordinates(cls):
    """A 1-D parameter with instance_dims=1 made every coordinate its own problem (its own
    step and restarts) and ran on silently to a worse answer; now it is refused, naming the fix."""
    with pytest.raises(ValueError, match="instance_dims=0"):
        _make(cls, [torch.zeros(40, requires_grad=True)], instance_dims=1)
    _make(cls, [torch.zeros(40, 1, requires_grad=True)], instance_dims=1)  # 40 scalar problems: fine


@pytest.mark.parametrize("cls", _ALL)
def test_step_on_meta_tensors(cls):
    """As torch.optim does, a step on meta tensors (shape-only runs) works and keeps shapes
    (it raised 'Cannot copy out of meta tensor' from the finiteness check and the watchdog)."""
    x = torch.zeros(3, 20, device="meta", requires_grad=True)
    opt = _make(cls, [x], instance_dims=1)
    for _ in range(3):
        x.grad = torch.ones(3, 20, device="meta")
        opt.step()
    assert x.device.type == "meta" and x.shape == (3, 20)


def test_strength_of_the_wrong_shape_is_refused_at_construction():
    x = torch.zeros(2, 40, requires_grad=True)
    with pytest.raises(ValueError, match=r"'lam' of shape \(3, 1\).*shaped \(2, 1\)"):
        torch_l2o.FISTA([x], prox="l1", lam=torch.full((3, 1), 0.1), lr=0.1, instance_dims=1)
    for lam in (torch.full((2, 1), 0.1), torch.full((40,), 0.1), torch.tensor(0.1)):  # per instance / coordinate
        torch_l2o.PAMR([x], prox="l1", lam=lam, instance_dims=1, weights="untrained")


def test_misspelt_keyword_names_the_close_one():
    x = torch.zeros(40, requires_grad=True)
    with pytest.raises(TypeError, match=r"'lamda' \(did you mean 'lam'\?\); its keywords: lr, prox, lam"):
        torch_l2o.PAMR([x], prox="l1", lamda=0.1, weights="untrained")
    with pytest.raises(TypeError, match=r"did you mean 'hidden'"):
        torch_l2o.PAGRU([x], prox="l1", lam=0.1, hiden=8, weights="untrained")
