"""The fused step: Triton kernel (interpreter on CPU) against the PyTorch reference."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from torch_l2o.kernels import HAVE_TRITON, interpret_mode, kernel_supports, prox_grad_step
from torch_l2o.kernels.reference import prox_grad_step_reference
from torch_l2o.kernels.triton_step import broadcast_divisor
from torch_l2o.prox import KERNEL_CODES, KERNEL_PROX, available_prox, get_prox

needs_kernel = pytest.mark.skipif(
    not HAVE_TRITON or not (torch.cuda.is_available() or interpret_mode()),
    reason="needs triton, and CUDA or TRITON_INTERPRET=1",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# A value for every strength the kernel reads, distinct so that swapped slots show, and
# such that every entry's prox differs from the identity on randn data.
STRENGTHS = {"lam": 0.3, "lam2": 0.7, "lo": -0.4, "hi": 0.6}
KERNEL_PARAMS = {name: {k: STRENGTHS[k] for k in slots} for name, slots in KERNEL_PROX.items()}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _operand(kind, shape, k, g, low, high):
    """A scalar, a per-instance tensor (first k dims, then ones) or a per-coordinate one."""
    if kind == "scalar":
        return float(torch.empty(()).uniform_(low, high, generator=g))
    if kind == "instance":
        return torch.empty(tuple(shape[:k]) + (1,) * (len(shape) - k)).uniform_(low, high, generator=g)
    return torch.empty(shape).uniform_(low, high, generator=g)


def _ulps(a, b, dtype):
    """Largest difference in units of the storage dtype's spacing at b."""
    a, b = a.double(), b.double()
    spacing = torch.finfo(dtype).eps * torch.clamp(b.abs(), min=torch.finfo(dtype).tiny)
    return float(((a - b).abs() / spacing).max()) if a.numel() else 0.0


def _assert_matches_reference(got, ref, y, grad, x, lr, p, a):
    """The kernel's ``(x+, y+)`` against the reference's, as strictly as the device allows."""
    (xk, yk), (xr, yr), dt = got, ref, y.dtype
    if DEVICE == "cuda":
        # A GPU fuses multiply-adds (y - t g, x+ + a (x+ - x)) that the reference rounds
        # in two steps: they differ by ulps of the operands, not of the result, which
        # can cancel to ~0 (1e-7 apart there is thousands of its ulps). So the unit is
        # an ulp of S = max(|y|, |t g|, |x|, |x+|, |y+|), elementwise. x+: z is within
        # 2.5 of them (|z| <= 2 S), passed on by the 1-Lipschitz prox (whose products
        # may fuse too): 4. y+: (1 + |a|) times that, plus |a| + 1 for the fused
        # a (x+ - x) (|x+ - x| <= 2 S): 5 (1 + |a|). Half-precision storage adds an ulp
        # of the result, at most one of S. A wrong formula is off by a strength times
        # the operands, orders of magnitude more.
        d = lambda v: torch.as_tensor(v, dtype=torch.float64, device=DEVICE)
        parts = (d(y).abs(), (d(lr) * d(p) * d(grad)).abs(), d(x).abs(), d(xr).abs(), d(yr).abs())
        scale = torch.stack(torch.broadcast_tensors(*parts)).amax(0)
        ulp = torch.finfo(dt).eps * torch.clamp(scale, min=torch.finfo(dt).tiny)
        assert ((d(xk) - d(xr)).abs() <= 4 * ulp).all()
        assert ((d(yk) - d(yr)).abs() <= 5 * (1 + d(a).abs()) * ulp).all()
    elif dt is torch.bfloat16:
        # Triton's interpreter rounds float32 -> bfloat16 by truncation: an ulp of the
        # result apart, two for y+ (built on x+).
        assert _ulps(xk, xr, dt) <= 1.0 + 1e-9 and _ulps(yk, yr, dt) <= 2.0 + 1e-9
    else:  # the interpreter computes as the reference does, rounding for rounding
        assert torch.equal(xk, xr) and torch.equal(yk, yr)


@needs_kernel
@given(
    shape=st.lists(st.integers(1, 37), min_size=1, max_size=3).filter(lambda s: math.prod(s) > 0)
    | st.sampled_from([(3, 1500), (2050,), (1024,), (4, 3, 257)]),
    prox=st.sampled_from(sorted(KERNEL_PARAMS)),
    dtype=st.sampled_from(sorted(DTYPES)),
    kinds=st.tuples(*[st.sampled_from(["scalar", "instance", "coord"])] * 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_kernel_matches_reference(shape, prox, dtype, kinds, seed):
    dt = DTYPES[dtype]
    g = torch.Generator().manual_seed(seed)
    k = min(1, len(shape) - 1) if len(shape) > 1 else 0
    y = torch.randn(shape, generator=g).to(dt)
    grad = torch.randn(shape, generator=g).to(dt)
    x = torch.randn(shape, generator=g).to(dt)
    lr = _operand(kinds[0], shape, k, g, 0.05, 1.0)
    p = _operand(kinds[1], shape, k, g, 0.0, 2.0)
    a = _operand(kinds[2], shape, k, g, 0.0, 2.0)
    params = KERNEL_PARAMS[prox]
    to_dev = lambda v: v.to(DEVICE) if isinstance(v, torch.Tensor) else v  # noqa: E731
    y, grad, x, lr, p, a = map(to_dev, (y, grad, x, lr, p, a))
    assert kernel_supports(y, grad, x, lr, p, a, prox, params)

    x_ref, y_ref = prox_grad_step(y, grad, x, lr=lr, p=p, a=a, prox=prox, params=params)
    xk, yk = x.clone(), y.clone()
    out = prox_grad_step(yk, grad, xk, lr=lr, p=p, a=a, prox=prox, params=params, inplace=True, backend="triton")
    assert out[0] is xk and out[1] is yk
    _assert_matches_reference((xk, yk), (x_ref, y_ref), y, grad, x, lr, p, a)


@needs_kernel
@pytest.mark.parametrize("prox", list(KERNEL_PROX))
def test_every_kernel_code_has_a_branch(prox):
    """Each declared entry runs its own branch, reading its strengths from the slots in
    the table's order: a missing branch falls through to the identity ("none")."""
    gen = torch.Generator().manual_seed(0)
    y, grad, x = (torch.randn(2000, generator=gen).to(DEVICE) for _ in range(3))
    lr, p, a = 0.5, 1.0, 0.3
    params = KERNEL_PARAMS[prox]
    ref = prox_grad_step_reference(y, grad, x, lr, p, a, prox, params)
    identity = prox_grad_step_reference(y, grad, x, lr, p, a, "none")
    assert (prox == "none") == torch.equal(ref[0], identity[0])
    xk, yk = x.clone(), y.clone()
    prox_grad_step(yk, grad, xk, lr=lr, p=p, a=a, prox=prox, params=params, inplace=True, backend="triton")
    _assert_matches_reference((xk, yk), ref, y, grad, x, lr, p, a)


def test_kernel_codes_follow_the_table():
    """``ProxSpec.kernel`` is set exactly for the table's entries, to their position,
    and each entry declares exactly the strengths its prox takes."""
    codes = {n: get_prox(n).kernel for n in available_prox() if get_prox(n).kernel is not None}
    assert codes == dict(KERNEL_CODES) == {n: i for i, n in enumerate(KERNEL_PROX)}
    for name, slots in KERNEL_PROX.items():
        assert sorted(slots) == sorted(get_prox(name).defaults), name


def test_op_fallback_reads_the_slots_in_table_order():
    """Where the kernel cannot run (float64) the op maps its slots back to named strengths."""
    op = torch.ops.torch_l2o.fused_prox_step
    gen = torch.Generator().manual_seed(0)
    y, grad, x = (torch.randn(50, dtype=torch.float64, generator=gen) for _ in range(3))
    for prox, slots in KERNEL_PROX.items():
        xr, yr = prox_grad_step_reference(y, grad, x, 0.5, 1.0, 0.3, prox, KERNEL_PARAMS[prox])
        xo, yo = x.clone(), y.clone()
        op(xo, yo, grad, None, None, None, 0.5, 0.3, KERNEL_CODES[prox], [STRENGTHS[k] for k in slots])
        assert torch.equal(xo, xr) and torch.equal(yo, yr), prox
    with pytest.raises(ValueError, match="takes strengths"):
        op(xo, yo, grad, None, None, None, 0.5, 0.3, KERNEL_CODES["box"], [0.0])
    with pytest.raises(ValueError, match="unknown kernel prox code"):
        op(xo, yo, grad, None, None, None, 0.5, 0.3, len(KERNEL_PROX), [])


@needs_kernel
def test_kernel_propagates_nan_like_reference():
    y = torch.tensor([math.nan, 1.0, -2.0, math.inf], device=DEVICE)
    g = torch.zeros(4, device=DEVICE)
    x = torch.zeros(4, device=DEVICE)
    for prox, params in KERNEL_PARAMS.items():
        xr, _ = prox_grad_step(y, g, x, lr=0.1, prox=prox, params=params)
        xk, yk = x.clone(), y.clone()
        prox_grad_step(yk, g, xk, lr=0.1, prox=prox, params=params, inplace=True, backend="triton")
        assert torch.equal(torch.isnan(xk), torch.isnan(xr)), prox
        assert torch.isnan(xk[0]), prox


def test_textbook_values():
    """x+ = soft(y - t g, t lam), y+ = x+ + a (x+ - x), written out by hand."""
    y = torch.tensor([1.0, -1.0, 0.2], dtype=torch.float64)
    g = torch.tensor([-1.0, 2.0, 0.0], dtype=torch.float64)
    x = torch.tensor([0.5, 0.0, 1.0], dtype=torch.float64)
    xn, yn = prox_grad_step(y, g, x, lr=0.5, p=2.0, a=0.5, prox="l1", params={"lam": 0.25})
    # t = 1: z = [2, -3, 0.2]; threshold 0.25 -> [1.75, -2.75, 0]
    assert torch.equal(xn, torch.tensor([1.75, -2.75, 0.0], dtype=torch.float64))
    assert torch.equal(yn, xn + 0.5 * (xn - x))


def test_reference_is_differentiable():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(6, dtype=torch.float64, generator=g, requires_grad=True)
    grad = torch.randn(6, dtype=torch.float64, generator=g)
    x = torch.randn(6, dtype=torch.float64, generator=g)
    p = (torch.rand(6, dtype=torch.float64, generator=g) + 0.5).requires_grad_(True)
    a = torch.rand(6, dtype=torch.float64, generator=g).requires_grad_(True)

    def f(y, p, a):
        return prox_grad_step(y, grad, x, lr=0.3, p=p, a=a, prox="l1", params={"lam": 0.1})

    assert torch.autograd.gradcheck(f, (y, p, a))


def test_inplace_reference_path_and_fallbacks():
    """CPU tensors, float64, non-contiguous tensors and non-elementwise proxes run the
    reference in place, with the same result as out of place."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(8, 6, dtype=torch.float64, generator=g)
    for y in (base.clone(), base.clone().T):  # contiguous and not
        grad = torch.randn(y.shape, dtype=torch.float64, generator=g)
        x = torch.randn(y.shape, dtype=torch.float64, generator=g)
        for prox, params in (("l1", {"lam": 0.2}), ("group_l1", {"lam": 0.5, "dim": 0})):
            xr, yr = prox_grad_step(y, grad, x, lr=0.4, a=0.3, prox=prox, params=params)
            xi, yi = x.clone(), y.clone()
            prox_grad_step(yi, grad, xi, lr=0.4, a=0.3, prox=prox, params=params, inplace=True)
            assert torch.equal(xi, xr) and torch.equal(yi, yr)


def test_backend_errors():
    y = torch.zeros(4)
    with pytest.raises(ValueError, match="kernel cannot run this step"):
        prox_grad_step(y, y, y.clone(), lr=0.1, prox="group_l1", params={"lam": 0.1, "dim": -1},
                       inplace=True, backend="triton")
    with pytest.raises(ValueError, match="in place only"):
        prox_grad_step(y, y, y, lr=0.1, backend="triton")
    with pytest.raises(ValueError, match="backend must be"):
        prox_grad_step(y, y, y, lr=0.1, backend="cuda")


def test_broadcast_divisor():
    like = torch.empty(4, 5, 6)
    assert broadcast_divisor(torch.empty(4, 5, 6), like) == 1
    assert broadcast_divisor(torch.empty(4, 1, 1), like) == 30
    assert broadcast_divisor(torch.empty(4, 5, 1), like) == 6
    assert broadcast_divisor(torch.empty(()), like) == 120
    assert broadcast_divisor(torch.empty(1, 5, 6), like) is None  # broadcasts over dim 0
    assert broadcast_divisor(torch.empty(5, 6), like) is None
    assert broadcast_divisor(torch.empty(6, 4).T, torch.empty(4, 6)) is None  # not contiguous


def test_op_is_registered_and_runs():
    op = torch.ops.torch_l2o.fused_prox_step
    y = torch.tensor([1.0, -1.0])
    g = torch.tensor([1.0, 1.0])
    x = torch.zeros(2)
    op(x, y, g, None, None, None, 0.5, 0.0, KERNEL_CODES["l1"], [0.1])
    # t = 0.5: z = [0.5, -1.5], threshold 0.05
    assert torch.allclose(x, torch.tensor([0.45, -1.45])) and torch.equal(x, y)


def test_torch_compile_traces_the_step():
    def step(y, g, x, p):
        return prox_grad_step(y, g, x, lr=0.5, p=p, a=0.25, prox="l1", params={"lam": 0.1}, inplace=True)

    def op_step(y, g, x, p):
        torch.ops.torch_l2o.fused_prox_step(x, y, g, None, p, None, 0.5, 0.25, KERNEL_CODES["l1"], [0.1])
        return x, y

    gen = torch.Generator().manual_seed(0)
    args = [torch.randn(64, generator=gen) for _ in range(3)] + [torch.rand(64, generator=gen) * 2]
    for fn in (step, op_step):
        eager = [a.clone() for a in args]
        fn(*eager)
        compiled = [a.clone() for a in args]
        torch._dynamo.reset()
        torch.compile(fn, backend="aot_eager", fullgraph=True)(*compiled)
        assert torch.allclose(compiled[0], eager[0]) and torch.allclose(compiled[2], eager[2])


def test_compile_backend_matches_reference():
    """backend='compile' is the same reference through torch.compile (Inductor)."""
    from torch_l2o.kernels import set_cpu_backend

    gen = torch.Generator().manual_seed(0)
    for n in (100, 1000):  # dynamic shapes: one compilation serves both sizes
        y, g, x = (torch.randn(n, generator=gen) for _ in range(3))
        p, a = torch.rand(n, generator=gen) * 2, torch.rand(n, generator=gen)
        xr, yr = prox_grad_step(y, g, x, lr=0.3, p=p, a=a, prox="l1", params={"lam": 0.2})
        xc, yc = x.clone(), y.clone()
        prev = set_cpu_backend("compile")
        try:
            prox_grad_step(yc, g, xc, lr=0.3, p=p, a=a, prox="l1", params={"lam": 0.2}, inplace=True)
        finally:
            set_cpu_backend(prev)
        assert torch.allclose(xc, xr, rtol=1e-6, atol=1e-7) and torch.allclose(yc, yr, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="cpu backend must be"):
        set_cpu_backend("triton")
