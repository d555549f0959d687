"""The fused CPU learned step (:mod:`torch_l2o.kernels.cpu_step`) against the PyTorch reference.

The reference is the update function's own PyTorch code (``use_fused(False)``). Both
run the network in float32 but not bit for bit alike: Cephes-style ``exp``/``tanh``
against MKL's (about 1 ulp each), fused multiply-adds and other summation orders in
dot products of at most 40 terms (a few ``K * eps`` of the terms' magnitudes), and
PA-MR's attention re-associated. Measured per step: 1e-7 to 2e-6 of each tensor's
largest magnitude. We allow ``RTOL = 2e-5`` of it: 10x the largest measured, far
below what a wrong weight, gate, bias or prox moves (1e-2 and up).

The backend declines under ``TRITON_INTERPRET=1`` (set by conftest on a CPU-only
machine) unless named, so the tests name it: ``use_fused("cpu")``.
"""

import copy
import platform

import pytest
import torch
from cases import STRENGTHS, pafr_net, tensor_strengths

import torch_l2o
from torch_l2o.kernels import cpu_step
from torch_l2o.kernels.cpu_step import cpu_learned_step, set_cpu_step_backend
from torch_l2o.kernels.fused import fused_step, use_fused
from torch_l2o.nets import DMNet, PAGRUNet, PAMRNet, PANet, RNNPropNet
from torch_l2o.optim.functional import dm_update, pa_update, rnnprop_update
from torch_l2o.weights import build_network

pytestmark = pytest.mark.skipif(cpu_step._compiler() is None, reason="needs a C++ compiler")
RTOL = 2e-5

# kind, update, network factory: the shipped networks and configurations that exercise
# the kernel's shape parameters (odd hidden size and three layers, a window of one,
# three heads of four, L2O-DM on raw [g, x])
NETS = {
    "pa": ("pa", pa_update, lambda: build_network("pa", "lasso")[0]),
    "pagru": ("pa", pa_update, lambda: build_network("pagru", "lasso")[0]),
    "pamr": ("pa", pa_update, lambda: build_network("pamr", "lasso")[0]),
    "l2odm": ("dm", dm_update, lambda: build_network("l2odm", "lasso")[0]),
    "rnnprop": ("rnnprop", rnnprop_update, lambda: build_network("rnnprop", "lasso")[0]),
    "pa-h5-3layers": ("pa", pa_update, lambda: PANet(hidden=5, layers=3)),
    "pamr-window1": ("pa", pa_update, lambda: PAMRNet(window=1).eval()),
    "pamr-h12-w3": ("pa", pa_update, lambda: PAMRNet(hidden=12, heads=3, window=3).eval()),
    "l2odm-grad_x": ("dm", dm_update, lambda: DMNet(inputs="grad_x")),
    # scale-free inputs: 1 / sigma per instance (instance_dims=1) from the reference's reduction
    "pa-scaled": ("pa", pa_update, lambda: PANet(inputs="scaled")),
    "pagru-scaled": ("pa", pa_update, lambda: PAGRUNet(inputs="scaled")),
    "pamr-scaled": ("pa", pa_update, lambda: PAMRNet(inputs="scaled").eval()),
    # L2O-PA-FR's step: the network scales FISTA's momentum, t in the state
    "pafr": ("pa", pa_update, pafr_net),
}
PROX = {"l1": {"lam": 0.1}, "box": {"lo": -0.5, "hi": 0.8}, "elastic_net": {"lam": 0.1, "lam2": 0.3},
        "nonneg_l1": {"lam": 0.05}, "none": {}}


def _close(got, ref, what):
    scale = ref.double().abs().max().clamp(min=1e-30)
    err = (got.double() - ref.double()).abs().max()
    assert err <= RTOL * scale, f"{what}: max error {err:.3g} > {RTOL:.3g} x {scale:.3g}"


def _compare(got_state, ref_state, ys, ref_ys, xs, ref_xs, kind):
    for i in range(len(ys)):
        _close(ys[i], ref_ys[i], f"y[{i}]")
        if kind == "pa":
            _close(xs[i], ref_xs[i], f"x[{i}]")
    assert set(got_state) == set(ref_state)
    for k in ref_state:
        assert got_state[k].dtype == ref_state[k].dtype and got_state[k].shape == ref_state[k].shape
        if ref_state[k].is_floating_point():
            _close(got_state[k], ref_state[k], f"state[{k!r}]")
        else:
            assert torch.equal(got_state[k], ref_state[k])


def _problem(shapes, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mk = lambda s, scale=1.0: (scale * torch.randn(s, generator=gen)).to(dtype)  # noqa: E731
    return [mk(s) for s in shapes], [mk(s, 0.5) for s in shapes], [mk(s) for s in shapes]


def _state(net, shapes, kind, update, lrs, prox, params, steps=3):
    """A state after a few reference steps (window partly filled, moments nonzero)."""
    state = net.init_state(sum(torch.Size(s).numel() for s in shapes))
    ys, gs, xs = _problem(shapes, torch.float32, seed=1)
    xs = xs if kind == "pa" else ys
    with use_fused(False), torch.no_grad():
        for k in range(steps):
            xs, ys, state = update(net, state, ys, gs, xs, lr=lrs, prox=prox, params=params, step=k, inplace=False,
                                   instance_dims=1)
    return state


def _step_both(kind, update, net, state, ys, gs, xs, lrs, prox, params, step):
    """One in-place step by the reference and by the backend, each on its own copies."""
    ref_ys = [y.clone() for y in ys]
    ref_xs = [x.clone() for x in xs] if kind == "pa" else ref_ys
    with use_fused(False), torch.no_grad():
        _, _, ref_state = update(net, copy.deepcopy(state), ref_ys, gs, ref_xs, lr=lrs, prox=prox, params=params,
                                 step=step, inplace=True, instance_dims=1)
    got_ys = [y.clone() for y in ys]
    got_xs = [x.clone() for x in xs] if kind == "pa" else got_ys
    with use_fused("cpu"), torch.no_grad():
        got_state = cpu_learned_step(kind, net, copy.deepcopy(state), got_ys, gs, got_xs, lr=lrs, prox=prox,
                                     params=params, step=step, instance_dims=1)
    assert got_state is not None, "the backend declined a step it serves"
    _compare(got_state, ref_state, got_ys, ref_ys, got_xs, ref_xs, kind)
    return ref_ys, ref_xs, ref_state


@pytest.mark.parametrize("name", sorted(NETS))
@pytest.mark.parametrize("variant", ["l1, scalar lr", "box, per-instance lr, two tensors",
                                     "elastic_net, float64", "nonneg_l1, per-coordinate lr"])
def test_one_step_matches_reference(name, variant):
    kind, update, make = NETS[name]
    net = make()
    prox = variant.split(",")[0] if kind != "rnnprop" else "none"  # RNNProp applies no prox
    params = PROX[prox]
    dtype = torch.float64 if "float64" in variant else torch.float32
    shapes = [(3, 50), (3, 20)] if "two" in variant else [(4, 40)]
    if "per-instance" in variant:
        lrs = [torch.tensor([[0.05], [0.1], [0.02]]) for _ in shapes]
    elif "per-coordinate" in variant:
        lrs = [0.01 + 0.1 * torch.rand(s, generator=torch.Generator().manual_seed(3)) for s in shapes]
    else:
        lrs = [0.05] * len(shapes)
    state = _state(net, shapes, kind, update, lrs, prox, params)
    ys, gs, xs = _problem(shapes, dtype, seed=2)
    _step_both(kind, update, net, state, ys, gs, xs if kind == "pa" else ys, lrs, prox, params, step=3)


@pytest.mark.parametrize("name", ["pa", "pagru", "pamr", "l2odm"])
@pytest.mark.parametrize("variant", STRENGTHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tensor_strengths_match_reference(name, variant, dtype):
    """Strengths given as tensors of the iterates' dtype, one per instance ``(B, 1)`` or one
    per coordinate (a LASSO path's ``lam`` per instance; an unpenalized intercept): the loop
    steps as the reference does, held coordinates included."""
    kind, update, make = NETS[name]
    net = make()
    shapes = [(4, 40)]
    prox, params = tensor_strengths(variant, shapes[0], dtype)
    lrs = [torch.tensor([[0.05], [0.1], [0.02], [0.2]], dtype=dtype)]
    state = _state(net, shapes, kind, update, lrs, prox, params)
    ys, gs, xs = _problem(shapes, dtype, seed=2)
    ys[0][:, ::4], gs[0][:, ::4] = 0.0, 0.001  # fixed points of l1 and elastic_net: held where hold_fixed
    if kind == "pa":
        xs[0][:, ::4] = 0.0
    _step_both(kind, update, net, state, ys, gs, xs if kind == "pa" else ys, lrs, prox, params, step=3)


@pytest.mark.parametrize("variant", STRENGTHS)
def test_watchdog_with_tensor_strengths_matches_reference(variant):
    """The watchdog's residual with tensor strengths, from the loop, against the PyTorch
    expression."""
    from torch_l2o.kernels.cpu_step import prox_residuals
    from torch_l2o.kernels.reference import prox_point_reference

    prox, params = tensor_strengths(variant, (4, 40), torch.float32)
    ys, gs, _ = _problem([(4, 40)], torch.float32, seed=6)
    lrs = [torch.tensor([[0.05], [0.1], [0.02], [0.2]])]
    with use_fused("cpu"):
        got = prox_residuals(ys, gs, lrs, prox, params, 1)
    assert got is not None
    ref = torch.linalg.vector_norm(prox_point_reference(ys[0], gs[0], lrs[0], 1.0, prox, params) - ys[0], dim=1,
                                   dtype=torch.float64).square()
    assert torch.allclose(got, ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", ["pa", "pagru", "pamr", "l2odm", "rnnprop"])
def test_fifty_steps_of_a_lasso_run_match_reference(name):
    """Step by step along 50 reference steps on a LASSO batch (B = 8, n = 64): from the
    reference's state and iterates at each step the backend's step agrees with the
    reference's to RTOL, the window filling up and the moments building as in a run."""
    kind, update, make = NETS[name]
    net = make()
    prob = torch_l2o.problems.Lasso(m=48, n=64, sparsity=6, lam=0.1).sample(8, generator=torch.Generator().manual_seed(0))
    if kind == "pa":
        lr, prox, params = 0.9999 / prob.lipschitz[:, None], "l1", {"lam": 0.1}
    else:
        lr, prox, params = 0.05, "none", {}
    y = torch.zeros(8, 64)
    x = y.clone()
    state = net.init_state(y.numel())
    for k in range(50):
        g = prob.grad(y)
        ys, xs, state = _step_both(kind, update, net, state, [y], [g], [x] if kind == "pa" else [y], [lr], prox,
                                   params, step=k)
        y, x = ys[0], xs[0]


@pytest.mark.parametrize("name", ["pa", "pagru", "pamr", "pamr-scaled", "l2odm", "rnnprop"])
def test_extreme_inputs_match_reference(name):
    """Gradients and iterates from 1e-30 to 1e6 in one tensor (and exact zeros): gates
    saturate, ``exp`` over- and underflows inside sigmoid and tanh, denormals appear. The
    step stays finite and agrees with the reference (a NaN fails the comparison)."""
    kind, update, make = NETS[name]
    net = make()
    prox = "l1" if kind != "rnnprop" else "none"
    gen = torch.Generator().manual_seed(5)
    shape = (3, 70)  # a partial last tile

    def wild():
        v = torch.randn(shape, generator=gen) * 10.0 ** torch.empty(shape).uniform_(-30, 6, generator=gen)
        v[:, ::9] = 0.0
        return v

    lrs = [0.05]
    state = _state(net, [shape], kind, update, lrs, prox, PROX[prox])
    ys, gs, xs = [wild()], [wild()], [wild()]
    ref_ys, _, _ = _step_both(kind, update, net, state, ys, gs, xs if kind == "pa" else ys, lrs, prox, PROX[prox],
                              step=3)
    assert torch.isfinite(ref_ys[0]).all()


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 vector widths")
@pytest.mark.parametrize("march, lanes", [("x86-64-v3", 8), ("x86-64", 4)])
@pytest.mark.parametrize("name", ["pa", "pagru", "pamr-scaled"])
def test_narrower_vectors_match_reference(name, march, lanes, monkeypatch):
    """The loop built for AVX2 (8 lanes a tile) and for SSE2 (4), as on machines without
    AVX-512, and the transposes without it: the same step as the reference."""
    monkeypatch.setattr(cpu_step, "MARCH", march)
    monkeypatch.setattr(cpu_step, "_LIBS", {})
    kind, update, make = NETS[name]
    net = make()
    shapes = [(3, 50), (3, 21)]  # tiles across instances, partial tiles
    lrs = [torch.tensor([[0.05], [0.1], [0.02]]) for _ in shapes]
    state = _state(net, shapes, kind, update, lrs, "l1", PROX["l1"])
    ys, gs, xs = _problem(shapes, torch.float32, seed=2)
    _step_both(kind, update, net, state, ys, gs, xs, lrs, "l1", PROX["l1"], step=3)
    lib = next(iter(cpu_step._LIBS.values()))
    assert lib is not None and lib.l2o_lanes() == lanes  # built for this width (and it served the step)


@pytest.fixture
def backend_calls(monkeypatch):
    """The CPU backend as the only fused backend, spied: the list records, per call,
    whether it served the step."""
    from torch_l2o.kernels import fused

    calls = []

    def spy(*a, **k):
        out = cpu_learned_step(*a, **k)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(fused, "_BACKENDS", [("cpu", spy)])
    return calls


@pytest.mark.parametrize("arch", ["pa", "pagru", "pamr"])
def test_optimizer_runs_stay_together_for_50_steps(arch, backend_calls):
    """``opt.step()`` run through the backend and through the reference from the same
    start: after 50 steps the iterates agree to RTOL (measured: 1.4e-7 of max |x|). The
    PA family's steps contract on LASSO, so rounding differences do not accumulate.
    (L2O-DM's and RNNProp's features normalise the gradient, log|g| and sign g, g /
    sqrt(v): near the minimiser the reference itself, started 1e-7 away, moves by 1e-3
    in 50 steps; their 50 steps are compared step by step above.)"""
    prob = torch_l2o.problems.Lasso(m=48, n=64, sparsity=6, lam=0.1).sample(8, generator=torch.Generator().manual_seed(0))
    runs = []
    for backend in ("cpu", False):
        x = torch.zeros(8, 64, requires_grad=True)
        opt = torch_l2o.get_architecture(arch).optimizer([x], prox="l1", lam=0.1, lr=0.9999 / prob.lipschitz[:, None],
                                                         weights="lasso", instance_dims=1, watchdog=False)
        with use_fused(backend):
            for _ in range(50):
                opt.zero_grad()
                prob.smooth(x).sum().backward()
                opt.step()
        runs.append((x.detach().clone(), opt.solution(x).clone()))
    assert backend_calls == [True] * 50
    for got, ref in zip(*runs):
        _close(got, ref, "x")


@pytest.mark.parametrize("trained", [False, True])
def test_pafr_runs_match_reference(trained, backend_calls):
    """L2O-PA-FR through the loop (its step) and the restart after it, against the
    reference, step by step over 40 steps in which instances restart; untrained (p = a =
    1) both are FISTA-restart's iterates."""
    prob = torch_l2o.problems.Lasso(m=40, n=80, sparsity=8).sample(4, generator=torch.Generator().manual_seed(1))
    s = 0.9999 / prob.lipschitz[:, None]
    weights = pafr_net().state_dict() if trained else "untrained"
    runs = []
    for backend in ("cpu", False):
        x = torch.zeros(4, 80, requires_grad=True)
        opt = torch_l2o.get_architecture("pafr").optimizer([x], prox="l1", lam=0.1, lr=s, weights=weights,
                                                          instance_dims=1, watchdog=False)
        ys, ts = [], []
        with use_fused(backend):
            for _ in range(40):
                opt.zero_grad()
                prob.smooth(x).sum().backward()
                opt.step()
                ys.append(x.detach().clone())  # y_k: the momentum shows here first
                ts.append(opt.state[x]["t"].reshape(4, -1)[:, 0].clone())
        runs.append((torch.stack(ys), torch.stack(ts)))
    assert backend_calls == [True] * 40
    (y_cpu, t_cpu), (y_ref, t_ref) = runs
    assert (t_ref == 1).sum() >= 2, "no instance restarted: the restart is not tested"
    torch.testing.assert_close(t_cpu, t_ref)
    for k in range(40):
        _close(y_cpu[k], y_ref[k], f"y at step {k}")
    if not trained:
        x = torch.zeros(4, 80, requires_grad=True)
        fr = torch_l2o.FISTA([x], prox="l1", lam=0.1, lr=s, restart=True, instance_dims=1)
        for k in range(40):
            fr.zero_grad()
            prob.smooth(x).sum().backward()
            fr.step()
            _close(y_cpu[k], x.detach(), f"FISTA-restart's y at step {k}")


def test_threads_match_reference(monkeypatch):
    """Several OpenMP threads (a call large enough to share) compute the same step."""
    monkeypatch.setattr(cpu_step, "_THREAD_CHUNK", 256)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        n = 2 * 256 + 37  # and a partial last tile
        kind, update, make = NETS["pamr"]
        net = make()
        state = _state(net, [(n,)], kind, update, [0.05], "l1", PROX["l1"], steps=2)
        ys, gs, xs = _problem([(n,)], torch.float32, seed=2)
        _step_both(kind, update, net, state, ys, gs, xs, [0.05], "l1", PROX["l1"], step=2)
    finally:
        torch.set_num_threads(threads)


def test_declines_what_it_does_not_serve(monkeypatch):
    shapes = [(2, 30)]
    ys, gs, xs = _problem(shapes, torch.float32)
    common = {"lr": 0.1, "prox": "l1", "params": {"lam": 0.1}, "step": 0}
    pa = PANet().requires_grad_(False)
    st = pa.init_state(60)
    with use_fused("cpu"):
        assert cpu_learned_step("pa", pa, st, [y.clone() for y in ys], gs, [x.clone() for x in xs], **common) is not None
        # dropout active (training mode), attention across coordinates, a subclass
        pamr = PAMRNet()
        assert cpu_learned_step("pa", pamr.train(), pamr.init_state(60), ys, gs, xs, **common) is None
        coords = PAMRNet(attend="coordinates").eval()
        assert cpu_learned_step("pa", coords, coords.init_state(60), ys, gs, xs, **common) is None

        class MyNet(PANet):
            pass

        mine = MyNet()
        assert cpu_learned_step("pa", mine, mine.init_state(60), ys, gs, xs, **common) is None
        assert cpu_learned_step("dm", pa, st, ys, gs, ys, **common) is None  # a network of another kind
        # half-precision iterates, mixed dtypes, another device (meta stands in for CUDA)
        bf = [t.to(torch.bfloat16) for t in ys]
        assert cpu_learned_step("pa", pa, st, bf, [t.to(torch.bfloat16) for t in gs], bf, **common) is None
        assert cpu_learned_step("pa", pa, st, ys, [g.double() for g in gs], xs, **common) is None
        meta = [torch.empty(2, 30, device="meta")]
        assert cpu_learned_step("pa", pa, st, meta, meta, meta, **common) is None
        # proxes: not elementwise, a tensor strength of another dtype (the reference would compute
        # in the promoted dtype) or of a shape that is no prefix, an unknown strength; RNNProp applies none
        assert cpu_learned_step("pa", pa, st, ys, gs, xs, lr=0.1, prox="group_l1", params={"lam": 0.1},
                                step=0) is None
        lam64 = torch.tensor(0.1, dtype=torch.float64)
        assert cpu_learned_step("pa", pa, st, ys, gs, xs, lr=0.1, prox="l1", params={"lam": lam64}, step=0) is None
        lam_suffix = torch.full((ys[0].shape[-1],), 0.1)
        assert cpu_learned_step("pa", pa, st, ys, gs, xs, lr=0.1, prox="l1", params={"lam": lam_suffix},
                                step=0) is None
        assert cpu_learned_step("pa", pa, st, ys, gs, xs, lr=0.1, prox="l1", params={"mu": 0.1}, step=0) is None
        rp = RNNPropNet()
        assert cpu_learned_step("rnnprop", rp, rp.init_state(60), ys, gs, ys, **common) is None
        # an lr that does not broadcast as the kernel indexes it; a state of the wrong size
        assert cpu_learned_step("pa", pa, st, ys, gs, xs, lr=torch.full((30,), 0.1), prox="l1",
                                params={"lam": 0.1}, step=0) is None
        assert cpu_learned_step("pa", PAGRUNet(), {}, ys, gs, xs, **common) is None
        assert cpu_learned_step("pa", pa, pa.init_state(61), ys, gs, xs, **common) is None
        bf_state = {k: v.to(torch.bfloat16) for k, v in st.items()}  # state_dtype=torch.bfloat16
        assert cpu_learned_step("pa", pa, bf_state, ys, gs, xs, **common) is None
        # autograd through the inputs (the dispatcher) or the network
        yg = [ys[0].clone().requires_grad_(True)]
        assert fused_step("pa", pa, st, yg, gs, xs, **common) is None
        grad_net = PANet()
        assert cpu_learned_step("pa", grad_net, st, ys, gs, xs, **common) is None
    # switched off
    prev = set_cpu_step_backend("reference")
    try:
        with use_fused("cpu"):
            assert cpu_learned_step("pa", pa, st, ys, gs, xs, **common) is None
    finally:
        set_cpu_step_backend(prev)
    # not named: declines under the Triton interpreter, serves any size without it
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert cpu_learned_step("pa", pa, st, ys, gs, xs, **common) is None
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert cpu_learned_step("pa", pa, st, [y.clone() for y in ys], gs, [x.clone() for x in xs], **common) is not None


def test_default_dispatch_without_the_interpreter(monkeypatch):
    """Unnamed (``use_fused(True)``, what users run) the backend takes a CPU step of any size."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    n = 7  # a toy problem is served too
    net = build_network("pa", "lasso")[0]
    ys, gs, xs = _problem([(n,)], torch.float32)
    with use_fused(True), torch.no_grad():
        assert fused_step("pa", net, net.init_state(n), ys, gs, xs, lr=0.1, prox="l1", params={"lam": 0.1},
                          step=0) is not None


def test_switch_and_missing_compiler(monkeypatch):
    prev = set_cpu_step_backend("eager")
    try:
        assert set_cpu_step_backend("compile") == "reference"
        with pytest.raises(ValueError, match="cpu step backend"):
            set_cpu_step_backend("triton")
    finally:
        set_cpu_step_backend(prev)
    monkeypatch.setattr(cpu_step, "_compiler", lambda: None)
    monkeypatch.setattr(cpu_step, "_WARNED", False)
    with pytest.warns(RuntimeWarning, match="could not be compiled"):
        assert cpu_step._build({"KIND": 0, "LSTM": 1, "LAYERS": 1, "HID": 3, "MR": 0, "WIN": 1, "HEADS": 1, "GRADX": 0}) is None


@pytest.mark.parametrize("arch", ["pagru", "pamr"])
def test_safeguarded_proposals_take_the_backend_on_copies(arch, backend_calls):
    """``safeguard=True`` proposes the learned step out of place: the backend steps copies
    (the parameters are written only once the safeguard has decided), and the safeguarded
    run follows the reference's. Its accept test can tip either way on a near tie (the
    two candidates then have the same objective to ~1e-7), so the runs are compared by
    their objective at every step (measured: 7e-8 apart at most)."""
    prob = torch_l2o.problems.Lasso(m=48, n=64, sparsity=6, lam=0.1).sample(8, generator=torch.Generator().manual_seed(0))
    p64 = prob.to(dtype=torch.float64)
    runs = []
    for backend in ("cpu", False):
        x = torch.zeros(8, 64, requires_grad=True)
        opt = torch_l2o.get_architecture(arch).optimizer([x], prox="l1", lam=0.1, lr=0.9999 / prob.lipschitz[:, None],
                                                         instance_dims=1, safeguard=True)

        def closure():
            opt.zero_grad()
            loss = prob.smooth(x)
            loss.sum().backward()
            return loss

        F = []
        with use_fused(backend):
            for _ in range(30):
                opt.step(closure)
                F.append(p64.objective(opt.solution(x).double()))
        runs.append(torch.stack(F))
    assert backend_calls == [True] * 30  # one proposal per step, stepped by the backend
    got, ref = runs
    assert float(((got - ref).abs() / ref).max()) <= 1e-6
    assert float(ref[-1].mean()) < 0.5 * float(ref[0].mean())  # the runs went somewhere


@pytest.mark.parametrize("arch", ["pa", "pamr", "l2odm", "rnnprop"])
def test_out_of_place_rollouts_match_the_reference(arch, backend_calls):
    """Out of place and without autograd (meta-training's validation, ``evaluate``), the
    backend steps copies; a rollout's first step passes ``x_0`` and ``y_0`` as one tensor,
    which the copies must not alias."""
    from torch_l2o.meta import evaluate
    from torch_l2o.problems import reference_solve

    p64 = torch_l2o.problems.Lasso(m=48, n=64, sparsity=6, lam=0.1).sample(4, generator=torch.Generator().manual_seed(0),
                                                                          dtype=torch.float64)
    F_star = reference_solve(p64).F
    net = build_network(arch, "lasso")[0].eval()
    errs = []
    for backend in ("cpu", False):
        with use_fused(backend):
            errs.append(evaluate(arch, net, p64.to(dtype=torch.float32), F_star, 20))
    assert backend_calls == [True] * 20
    # relative errors agree (to the float32 floor: below 1e-6 both are rounding). The first
    # steps, where an aliased x_0 / y_0 would show, agree closely for every architecture.
    # Later, L2O-DM and RNNProp step on the subgradient of |x|: where a coordinate crosses 0 a
    # rounding difference (vector widths differ between CPUs: AVX2 vs AVX-512) flips its sign
    # term, and the runs drift apart by up to ~1 % by step 20 (measured 0.6 % for L2O-DM on
    # an AVX-512 CPU), so those get rtol 2e-2 there.
    assert torch.allclose(errs[0][:6], errs[1][:6], rtol=1e-4, atol=1e-6), (errs[0], errs[1])
    rtol = 1e-3 if torch_l2o.get_architecture(arch).applies_prox else 2e-2
    assert torch.allclose(errs[0], errs[1], rtol=rtol, atol=1e-6), (errs[0], errs[1])


def test_scaled_inputs_optimizer_run_matches_reference(backend_calls):
    """PA-MR on the scale-free inputs (the mixture weights' networks): five ``opt.step()``
    through the backend (one per-instance reduction, then the loop) and through the
    reference agree."""
    prob = torch_l2o.problems.Lasso(m=200, n=1200, sparsity=20).sample(2, generator=torch.Generator().manual_seed(1))
    s = prob.step_size()
    runs = []
    for backend in ("cpu", False):
        x = torch.zeros(2, 1200, requires_grad=True)
        opt = torch_l2o.PAMR([x], prox="l1", lam=0.1, lr=s, weights="lasso-mix", instance_dims=1)
        assert opt.net.inputs == "scaled"
        with use_fused(backend):
            for _ in range(5):
                opt.zero_grad()
                prob.smooth(x).sum().backward()
                opt.step()
        runs.append(x.detach().clone())
    assert backend_calls == [True] * 5
    _close(runs[0], runs[1], "x")


@pytest.mark.parametrize("prox", ["l1", "box", "elastic_net", "nonneg_l1", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_watchdog_residuals_match_reference(prox, dtype):
    """``prox_residuals`` (the watchdog's per-instance ``|prox_{s r}(y - s g) - y|^2``, one
    pass of the loop's prox) against the watchdog's PyTorch expression: two tensors of one
    group, a per-instance ``lr``, exact fixed points (residual 0) among the coordinates."""
    from torch_l2o.kernels.cpu_step import prox_residuals
    from torch_l2o.kernels.reference import prox_point_reference

    ys, gs, _ = _problem([(3, 50), (3, 4, 5)], dtype, seed=4)
    ys[0][:, ::3] = 0.0
    gs[0][:, ::3] = 0.01  # |g| < lam: fixed points of every prox but "none" and box
    lrs = [torch.tensor([[0.05], [0.2], [0.01]], dtype=dtype), torch.tensor([[0.05], [0.2], [0.01]],
                                                                             dtype=dtype).reshape(3, 1, 1)]
    with use_fused("cpu"):
        got = prox_residuals(ys, gs, lrs, prox, PROX[prox], 1)
    assert got is not None and got.dtype == torch.float64 and got.shape == (3,)
    ref = sum(torch.linalg.vector_norm(prox_point_reference(y, g, s, 1.0, prox, PROX[prox]) - y,
                                       dim=tuple(range(1, y.dim())), dtype=torch.float64).square()
              for y, g, s in zip(ys, gs, lrs))
    assert torch.allclose(got, ref, rtol=1e-12 if dtype == torch.float64 else 1e-6, atol=0)
    with use_fused("cpu"):  # what it does not serve, it declines: the watchdog computes it in PyTorch
        assert prox_residuals(ys, gs, lrs, "group_l1", {"lam": 0.1}, 1) is None
        assert prox_residuals([y.to(torch.bfloat16) for y in ys], [g.to(torch.bfloat16) for g in gs], lrs,
                              prox, PROX[prox], 1) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("per_instance_lr", [False, True])
@pytest.mark.parametrize("handoff", [0.0, 0.3])
def test_watchdog_records_in_one_call_match_the_numpy_rule(dtype, per_instance_lr, handoff):
    """``watch_records`` (residual, records, best point and verdict in one call of the loop's
    library) against the rule's definition (``watchdog._records`` in numpy on
    ``prox_residuals``), over 45 steps in which instances behave, jump 100x, turn NaN or
    stall, with and without a handoff threshold: every record (the handoffs included), the
    best points and the verdicts agree exactly."""
    import numpy as np

    from torch_l2o.kernels.cpu_step import prox_residuals, watch_records
    from torch_l2o.optim import watchdog as W

    B, n = 6, 37
    gen = torch.Generator().manual_seed(3)
    lr = torch.tensor([0.05, 0.2, 0.01, 0.1, 0.3, 0.07], dtype=dtype).reshape(B, 1) if per_instance_lr else 0.05
    eps = torch.finfo(dtype).eps
    y0, g0 = torch.randn(B, n, generator=gen, dtype=dtype), torch.randn(B, n, generator=gen, dtype=dtype)
    with use_fused("cpu"):
        G0 = W._residual(torch, prox_residuals([y0], [g0], [lr], "l1", PROX["l1"], 1), lr, (B,))
    recs = [dict(wd_G0=G0.clone(), wd_min=G0.clone(), wd_mark=G0.clone(),
                 wd_since=torch.zeros(B, dtype=torch.int64), watchdog=torch.zeros(B, dtype=torch.bool),
                 handoff=torch.zeros(B, dtype=torch.bool)) for _ in "ab"]
    bests = [y0.clone(), y0.clone()]
    fallen = []
    for k in range(45):
        y = torch.randn(B, n, generator=gen, dtype=dtype)
        shrink = torch.tensor([0.8 ** k, 0.9 ** k, 1.0, 0.7 ** k, 0.8 ** k, 0.95 ** k], dtype=dtype).reshape(B, 1)
        y, g = y * shrink, torch.randn(B, n, generator=gen, dtype=dtype) * shrink  # instance 2 stalls
        if k == 12:
            g[1] *= 1e3  # a jump
        if k == 20:
            g[4, 3] = float("nan")
        with use_fused("cpu"):
            count, new = watch_records(y, g, lr, "l1", PROX["l1"], 1, recs[0], bests[0], W._rule(eps), handoff)
            G2 = prox_residuals([y], [g], [lr], "l1", PROX["l1"], 1)
        rec = {key: W._host(v) for key, v in recs[1].items()}
        better, new_ref = W._records(np, W._residual(np, W._host(G2), lr, (B,)), rec, eps, handoff or None)
        bests[1] = torch.where(torch.as_tensor(better).reshape(B, 1), y, bests[1])
        assert torch.equal(new, torch.as_tensor(new_ref))
        assert count == int((recs[1]["watchdog"] | recs[1]["handoff"] | new).sum())
        for key in recs[0]:
            assert torch.equal(recs[0][key], recs[1][key]), (k, key)
        assert torch.equal(bests[0], bests[1])
        for r in recs:
            r["watchdog"] |= new  # as the fallback marks them
        fallen.append(new)
    fell = torch.stack(fallen).any(0)
    handed = recs[0]["handoff"].tolist()
    if handoff:  # the shrinking instances hand off (4 before its NaN, which then changes nothing); 1 jumped first
        assert handed == [True, False, False, True, True, True] and fell.tolist() == [False, True, True] + [False] * 3
    else:
        assert fell.tolist() == [False, True, True, False, True, False]  # the jump, the stall, the NaN
        assert not any(handed)


def test_watchdog_records_decline_what_they_do_not_serve():
    """Records cast by a state_dict round trip, a best point of another dtype, a step of
    another shape, a prox without a kernel code: declined, nothing written."""
    from torch_l2o.kernels.cpu_step import watch_records
    from torch_l2o.optim import watchdog as W

    y, g = torch.randn(3, 8), torch.randn(3, 8)
    rec = dict(wd_G0=torch.ones(3, dtype=torch.float64), wd_min=torch.full((3,), 1e9, dtype=torch.float64),
               wd_mark=torch.ones(3, dtype=torch.float64), wd_since=torch.zeros(3, dtype=torch.int64),
               watchdog=torch.zeros(3, dtype=torch.bool), handoff=torch.zeros(3, dtype=torch.bool))
    best = y.clone()
    rule = W._rule(torch.finfo(torch.float32).eps)
    with use_fused("cpu"):
        cast = dict(rec, wd_min=rec["wd_min"].float())
        assert watch_records(y, g, 0.1, "l1", PROX["l1"], 1, cast, best, rule) is None
        assert watch_records(y, g, 0.1, "l1", PROX["l1"], 1, rec, best.double(), rule) is None
        assert watch_records(y, g, torch.full((2, 1), 0.1), "l1", PROX["l1"], 1, rec, best, rule) is None
        assert watch_records(y, g, 0.1, "group_l1", {"lam": 0.1}, 1, rec, best, rule) is None
        assert torch.equal(rec["wd_min"], torch.full((3,), 1e9, dtype=torch.float64))
    with use_fused(False):
        assert watch_records(y, g, 0.1, "l1", PROX["l1"], 1, rec, best, rule) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_secant_step_on_the_loop_matches_pytorch(dtype):
    """``lr=None``'s secant estimate with its sums from the loop's library (and the rule in
    numpy) against the PyTorch expressions: two tensors of one group, three instances (one
    of which stops moving, one whose gradient change drowns in rounding), 12 steps: the
    same steps, estimates and probes to summation order, and ``y_prev``, ``g_prev`` exact."""
    from torch_l2o.optim import stepsize

    gen = torch.Generator().manual_seed(5)
    seq = [([torch.randn(3, 40, generator=gen, dtype=dtype), torch.randn(3, 2, 5, generator=gen, dtype=dtype)],
            [torch.randn(3, 40, generator=gen, dtype=dtype), torch.randn(3, 2, 5, generator=gen, dtype=dtype)])
           for _ in range(12)]
    for ys, gs in seq[1:]:
        ys[0][1], ys[1][1] = seq[0][0][0][1], seq[0][0][1][1]  # instance 1 never moves
        gs[0][2], gs[1][2] = seq[0][1][0][2], seq[0][1][1][2]  # instance 2's gradient never changes
    runs = []
    for backend in ("cpu", False):
        states, out = [{}, {}], []
        with use_fused(backend):
            for ys, gs in seq:
                lr = stepsize.online_lipschitz(states, ys, gs, 1)
                out.append((lr, states[0]["lipschitz"], states[0]["probe_lr"]))
                assert all(torch.equal(s["prev_y"], y) and torch.equal(s["prev_g"], g)
                           and s["prev_y"].data_ptr() != y.data_ptr() for s, y, g in zip(states, ys, gs))
        runs.append(out)
    for (a, b) in zip(*runs):
        for u, v in zip(a, b):
            assert u.dtype == v.dtype == torch.float64 and u.shape == v.shape == (3, 1)
            assert torch.allclose(u, v, rtol=1e-13, atol=0, equal_nan=True)
    lr, L, probe = runs[0][-1]
    assert L[0] > 0 and L[1] == 0 and L[2] == 0  # a secant; none for the still and the constant-gradient instances
    assert probe[2] > 1e3 * probe[1]  # the moving probe was lengthened, the still one was not
    with use_fused("cpu"):
        g = seq[1][1][0].clone().requires_grad_(True)
        with torch.enable_grad():
            assert cpu_step.secant_sums([seq[1][0][0]], [g], [seq[0][0][0]], [seq[0][1][0]], 1) is None
        half = [t.to(torch.bfloat16) for t in (seq[1][0][0], seq[1][1][0], seq[0][0][0], seq[0][1][0])]
        assert cpu_step.secant_sums(*[[t] for t in half], 1) is None
        assert cpu_step.secant_sums([seq[1][0][0].T], [seq[1][1][0].T], [seq[0][0][0].T], [seq[0][1][0].T], 1) is None


def test_the_watchdog_on_the_loop_catches_what_it_catches_on_the_reference():
    """The issue's lam / 5 case (PA, LASSO 250 x 500 at lam 0.02): the watchdog, its
    residual computed by the loop, flags the same instances as with the PyTorch reference
    (at the same step, up to rounding near a threshold), and the runs end
    at the same point."""
    prob = torch_l2o.problems.Lasso(lam=0.02).sample(8, generator=torch.Generator().manual_seed(1))
    runs = []
    for backend in ("cpu", False):
        x = prob.x0().requires_grad_(True)
        opt = torch_l2o.PA([x], prox="l1", lam=0.02, lr=prob.step_size(), instance_dims=1)
        flags = []
        with use_fused(backend), pytest.warns(RuntimeWarning, match="diverged or stalled"):
            for _ in range(150):
                opt.zero_grad()
                prob.smooth(x).sum().backward()
                opt.step()
                flags.append(opt.state[x]["watchdog"].clone())
        runs.append((torch.stack(flags), opt.solution(x)))
    (loop, x_loop), (ref, x_ref) = runs
    assert torch.equal(loop[-1], ref[-1]) and bool(ref[-1].any())
    # the step each instance fell back at: the same, up to rounding near a threshold
    first = [torch.where(f.any(0), f.float().argmax(0), -1) for f in (loop, ref)]
    assert (first[0] - first[1]).abs().max() <= 3
    assert (x_loop - x_ref).abs().max() <= 1e-3 * x_ref.abs().max()
