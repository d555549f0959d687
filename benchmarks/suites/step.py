"""The step itself: what one optimizer step costs per element, against the memory roofline.

**optimizer cost** (the main table): ``opt.step()`` on one float32 parameter of ``n``
elements whose gradient is given (no backward in the timing), for every optimizer
(Adam, ISTA, FISTA, FISTA with restart, FISTA with ``lr=None``, L2O-DM, RNNProp,
L2O-PA, L2O-PA-GRU, L2O-PA-MR). Every optimizer takes 3 steps before the timer starts
(the first creates the state and triggers any compilation). Reported: ns per element
per step, the time relative to Adam's step at the same size, and the achieved
bandwidth against the least memory traffic the step must move:

    min bytes = 2 * state bytes (every tensor in ``opt.state[p]``, read and written)
              + g bytes (read once)
              + 2 * p bytes (the parameter, read and written)

with ``state bytes = sum(v.numel() * v.element_size() for v in opt.state[p].values())``
over the tensors actually held after the warm-up steps (so FISTA's ``x`` and the learned
optimizers' recurrent state are counted; scalars such as Adam's ``step`` and FISTA's ``t``
count their few bytes). Not counted: the
networks' weights (a few thousand numbers shared by every element, read once per step)
and any temporaries: a step that materialises features or network activations in memory
moves more than this, which is what "% of roofline" shows. Adam, for example, must move
28 bytes per element (``p, g, m, v`` read, ``p, m, v`` written).

GB/s = min bytes / seconds per step; "% of roofline" = that over the roofline, the
bandwidth of ``dst.copy_(src)`` (bytes ``2 * numel * 4``, float32) measured in the same
run at the largest size of the run, and on CUDA at 1e8 elements if larger (1e7 float32,
80 MB moved, may sit partly in a GPU's L2). Table **copy roofline** lists the copy at every
size: small sizes sit in cache and may beat the DRAM figure (over 100%). On CUDA the copy
is device-to-device, and every timing synchronizes (``torch.utils.benchmark``).

The L2O-PA family runs with ``watchdog=False``: on this fixed random gradient (no
problem behind it) the watchdog would see a stall within ~30 steps and add its FISTA
fallback part-way through a measurement. In distribution it costs one more elementwise
prox-gradient pass, a per-instance norm and the copy ``wd_best`` (4 more state bytes)
per step: ~5-8% of L2O-PA's step on a 2-core CPU at 1e5 elements.

A learned step may be served whole by a fused step backend
(:mod:`torch_l2o.kernels.fused`). When one is registered, every learned optimizer gets
two rows: ``default`` (the dispatcher: a backend if one takes the call) and
``reference`` (``use_fused(False)``: the PyTorch reference); the ``path`` column says
what served the warm-up steps (``fused``, ``reference`` or ``mixed``: a backend declined
some calls); ``-`` for optimizers without a learned step. Sizes: 1e4, 1e5, 1e6 elements;
1e7 as well with ``--full`` or on CUDA. Every row is also printed to stderr as soon as it
is measured.

**step**: the fused prox-gradient step alone, ``x+ = soft(y - t g, t lam)``,
``y+ = x+ + a (x+ - x)`` with ``t = lr * p``, in place, float32, for scalar ``p, a``
(FISTA) and per-coordinate ``p, a`` (learned optimizers); it must move ``y, g, x`` read
(and ``p, a`` when tensors), ``x, y`` written. Implementations: the unfused eager
expression a user would write; torch_l2o's dispatcher (the PyTorch reference on CPU,
the Triton kernel on CUDA); its ``backend="compile"`` (the reference through
``torch.compile``, one fused loop on a CPU; on CUDA only with ``--full``: Inductor's
compilations would take about a minute of a GPU session); and, on CUDA, the Triton
kernel called directly.

**optimizer cost, many tensors**: one step over the 50 parameters of an nn MLP and over
200 vectors of 256 elements, where per-tensor overheads show.
"""

from __future__ import annotations

import contextlib
import sys

import torch
from torch.utils import benchmark

from torch_l2o.kernels import prox_grad_step

LAM = 0.1
WARMUP = 3  # steps before any timer: state creation, compilation, caches


def _min_run_time(cfg) -> float:
    """Seconds per timed measurement: short in the quick run, which must fit 5 minutes."""
    return 1.0 if cfg.full else 0.1


def _seconds(fn, cfg) -> float:
    """Median seconds of ``fn()``; ``torch.utils.benchmark`` synchronizes CUDA around its timer."""
    return benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=_min_run_time(cfg)).median


def unfused(y, g, x, lr, p, a):
    t = lr * p
    z = y - t * g
    xn = torch.sign(z) * torch.clamp(z.abs() - t * LAM, min=0)
    yn = xn + a * (xn - x)
    x.copy_(xn)
    y.copy_(yn)


def dispatcher(y, g, x, lr, p, a):
    prox_grad_step(y, g, x, lr=lr, p=p, a=a, prox="l1", params={"lam": LAM}, inplace=True)


def compiled(y, g, x, lr, p, a):
    prox_grad_step(y, g, x, lr=lr, p=p, a=a, prox="l1", params={"lam": LAM}, inplace=True, backend="compile")


def triton_direct(y, g, x, lr, p, a):
    prox_grad_step(y, g, x, lr=lr, p=p, a=a, prox="l1", params={"lam": LAM}, inplace=True, backend="triton")


def _optimizers(full: bool = True):
    import torch_l2o

    # watchdog off: on a fixed random gradient it would trip (stall) within ~30 steps and
    # add the FISTA fallback's passes to the timing part-way through a measurement
    learned = {"prox": "l1", "lam": LAM, "lr": 0.1, "weights": "untrained", "watchdog": False}
    out = {
        "Adam": lambda ps: torch.optim.Adam(ps, lr=1e-3),
        "ISTA": lambda ps: torch_l2o.ISTA(ps, prox="l1", lam=LAM, lr=0.1),
        "FISTA": lambda ps: torch_l2o.FISTA(ps, prox="l1", lam=LAM, lr=0.1),
        "FISTA-restart": lambda ps: torch_l2o.FISTA(ps, prox="l1", lam=LAM, lr=0.1, restart=True),
        "FISTA lr=None": lambda ps: torch_l2o.FISTA(ps, prox="l1", lam=LAM),
        "L2O-DM": lambda ps: torch_l2o.L2ODM(ps, weights="untrained"),
        "RNNProp": lambda ps: torch_l2o.RNNProp(ps, weights="untrained"),
        "L2O-PA": lambda ps: torch_l2o.PA(ps, **learned),
        "L2O-PA-GRU": lambda ps: torch_l2o.PAGRU(ps, **learned),
        "L2O-PA-MR": lambda ps: torch_l2o.PAMR(ps, **learned),
    }
    if full:
        out["L2O-PA-MR W=1"] = lambda ps: torch_l2o.PAMR(ps, window=1, **learned)
    return out


def _fused_backends() -> list[str]:
    """Registered fused step backends (without the reference); [] without the module."""
    try:
        from torch_l2o.kernels.fused import step_backends
    except ImportError:
        return []
    return [b for b in step_backends() if b != "reference"]


def _reference_only():
    """``use_fused(False)``, or nothing where the fused dispatcher does not exist."""
    try:
        from torch_l2o.kernels.fused import use_fused
    except ImportError:
        return contextlib.nullcontext()
    return use_fused(False)


@contextlib.contextmanager
def _fused_calls():
    """Counts the learned updates' calls of the fused dispatcher and those a backend
    served (wraps ``torch_l2o.optim.functional.fused_update`` for the duration)."""
    counts = {"calls": 0, "served": 0}
    try:
        from torch_l2o.optim import functional
        orig = functional.fused_update
    except (ImportError, AttributeError):
        yield counts
        return

    def counted(*args, **kwargs):
        out = orig(*args, **kwargs)
        counts["calls"] += 1
        counts["served"] += out is not None
        return out

    functional.fused_update = counted
    try:
        yield counts
    finally:
        functional.fused_update = orig


def _path(counts) -> str:
    if not counts["calls"]:
        return "-"
    return {0: "reference", counts["calls"]: "fused"}.get(counts["served"], "mixed")


def _progress(table: str, row: dict) -> None:
    """One line per row on stderr as it is measured: a run cut short keeps what it measured."""
    print(f"step/{table}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                        for k, v in row.items()), file=sys.stderr, flush=True)


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"


def _free(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _tensor_bytes(values) -> int:
    return sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor))


def copy_bandwidth(n: int, device, cfg) -> float:
    """Bytes/s of ``dst.copy_(src)``, float32, ``n`` elements: ``2 * n * 4`` bytes moved."""
    src = torch.randn(n, generator=torch.Generator().manual_seed(0)).to(device)
    dst = torch.empty_like(src)
    for _ in range(WARMUP):
        dst.copy_(src)
    return 2 * n * 4 / _seconds(lambda: dst.copy_(src), cfg)


def optimizer_costs(cfg, roofline: float, sizes) -> list[dict]:
    """Seconds per step per element (gradient given), min bytes moved, % of the roofline."""
    device = cfg.device
    fused = bool(_fused_backends())
    learned_cls = _learned_base()
    rows = []
    for n in sizes:
        adam = None
        for name, make in _optimizers(full=cfg.full).items():
            variants = [("default", contextlib.nullcontext)]
            x = torch.zeros(n, device=device, requires_grad=True)
            x.grad = torch.randn(n, generator=torch.Generator().manual_seed(0)).to(device)
            opt = make([x])
            if fused and isinstance(opt, learned_cls):
                variants.append(("reference", _reference_only))
            for variant, ctx in variants:
                if variant != "default":  # a fresh optimizer: nothing carried over from the other path
                    x = torch.zeros(n, device=device, requires_grad=True)
                    x.grad = torch.randn(n, generator=torch.Generator().manual_seed(0)).to(device)
                    opt = make([x])
                try:
                    with ctx():
                        with _fused_calls() as counts:
                            for _ in range(WARMUP):  # creates the state, compiles, warms caches
                                opt.step()
                        sec = _seconds(opt.step, cfg)
                except RuntimeError as e:  # out of memory, a library limit: the row says so, the run goes on
                    rows.append({"elements": n, "optimizer": name, "variant": variant, "path": f"failed: {_short(e)}",
                                 **dict.fromkeys(("state bytes/element", "min bytes/element", "ns/element/step",
                                                  "time vs Adam", "GB/s", "% of roofline"))})
                    _progress("optimizer cost", rows[-1])
                    _free(device)
                    continue
                state_bytes = _tensor_bytes(opt.state[x].values())
                min_bytes = 2 * state_bytes + x.grad.numel() * x.grad.element_size() + 2 * x.numel() * x.element_size()
                adam = adam or sec  # Adam runs first
                rows.append({"elements": n, "optimizer": name, "variant": variant, "path": _path(counts),
                             "state bytes/element": state_bytes / n, "min bytes/element": min_bytes / n,
                             "ns/element/step": sec / n * 1e9, "time vs Adam": sec / adam,
                             "GB/s": min_bytes / sec / 1e9, "% of roofline": 100 * min_bytes / sec / roofline})
                _progress("optimizer cost", rows[-1])
            del opt, x
    return rows


def _learned_base():
    import torch_l2o

    return torch_l2o.LearnedOptimizer


def mlp_params(tensors: int = 50, width: int = 64) -> list[torch.Tensor]:
    """The parameters of a ``torch.nn`` MLP of ``tensors // 2`` linear layers (a weight and
    a bias each), with gradients: many small tensors, as in a real model."""
    net = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(tensors // 2)])
    ps = list(net.parameters())
    gen = torch.Generator().manual_seed(0)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen)
    return ps


def many_tensors(cfg) -> list[dict]:
    """One step over many parameter tensors: the 50 of an nn MLP (25 x Linear(64, 64)), and
    200 vectors of 256 (norm layers' parameters). Per-tensor overheads (one network call
    per tensor, or per batch of a group's tensors) show here, not at 10^6 elements in one."""
    rows = []
    models = {"nn MLP, 25 x Linear(64, 64)": mlp_params, "200 vectors of 256": lambda: [torch.zeros(256)] * 200}
    for model, params in models.items():
        for name, make in _optimizers(full=cfg.full).items():
            ps = [p.detach().clone().to(cfg.device).requires_grad_(True) for p in params()]
            gen = torch.Generator().manual_seed(0)
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen).to(cfg.device)
            opt = make(ps)
            n = sum(p.numel() for p in ps)
            try:
                for _ in range(WARMUP):  # creates the state, compiles
                    opt.step()
                sec = _seconds(opt.step, cfg)
            except RuntimeError as e:
                rows.append({"model": model, "tensors": len(ps), "elements": n, "optimizer": f"{name}: failed: {_short(e)}",
                             "ms/step": None, "ns/element/step": None})
                _free(cfg.device)
                continue
            rows.append({"model": model, "tensors": len(ps), "elements": n, "optimizer": name, "ms/step": sec * 1e3,
                         "ns/element/step": sec / n * 1e9})
    return rows


def prox_step(cfg, roofline: float, sizes) -> list[dict]:
    """The prox-gradient step alone, by implementation."""
    device = cfg.device
    on_cuda = torch.device(device).type == "cuda"
    rows = []
    for mode in ("scalar p, a", "tensor p, a"):
        for n in sizes:
            impls = {"unfused eager": unfused, "torch_l2o (dispatcher)": dispatcher}
            if cfg.full or not on_cuda:  # Inductor compiles per mode and shape: ~a minute of a GPU session
                impls["torch_l2o backend='compile'"] = compiled
            if on_cuda:
                impls["triton kernel"] = triton_direct
            gen = torch.Generator().manual_seed(0)
            y, g, x = (torch.randn(n, generator=gen).to(device) for _ in range(3))
            if mode == "scalar p, a":
                p, a, n_bytes = 1.0, 0.3, 5 * 4 * n
            else:
                p = (torch.rand(n, generator=gen) * 2).to(device)
                a = torch.rand(n, generator=gen).to(device)
                n_bytes = 7 * 4 * n
            base = None
            for name, fn in impls.items():
                try:
                    for _ in range(WARMUP):  # compilation, caches
                        fn(y, g, x, 0.1, p, a)
                    sec = _seconds(lambda fn=fn, y=y, g=g, x=x, p=p, a=a: fn(y, g, x, 0.1, p, a), cfg)
                except Exception as e:  # noqa: BLE001  (an Inductor compilation error, say: the row says so)
                    rows.append({"operands": mode, "elements": n, "impl": f"{name}: failed: {_short(e)}",
                                 **dict.fromkeys(("ns/element", "GB/s", "% of roofline", "speedup vs unfused"))})
                    _progress("step", rows[-1])
                    continue
                base = base or sec
                rows.append({"operands": mode, "elements": n, "impl": name, "ns/element": sec / n * 1e9,
                             "GB/s": n_bytes / sec / 1e9, "% of roofline": 100 * n_bytes / sec / roofline,
                             "speedup vs unfused": base / sec})
                _progress("step", rows[-1])
    return rows


def run(cfg) -> dict:
    device = cfg.device
    on_cuda = torch.device(device).type == "cuda"
    step_sizes = [10**4, 10**5, 10**6, 10**7] if not cfg.full else [10**3, 10**4, 10**5, 10**6, 10**7, 3 * 10**7]
    opt_sizes = [10**4, 10**5, 10**6] + ([10**7] if cfg.full or on_cuda else [])
    # on CUDA also 1e8 (800 MB moved): 1e7 (80 MB) may sit partly in a large L2
    copy_sizes = sorted(set(step_sizes) | set(opt_sizes) | ({10**8} if on_cuda else set()))
    copies = {n: copy_bandwidth(n, device, cfg) for n in copy_sizes}
    roofline = copies[max(copy_sizes)]
    print(f"step: copy roofline {roofline / 1e9:.4g} GB/s at {max(copy_sizes):.0e} elements", file=sys.stderr, flush=True)
    backends = _fused_backends()
    notes = [(f"roofline: dst.copy_(src) at {max(copy_sizes):.0e} float32 elements on {device}, "
              f"{roofline / 1e9:.3g} GB/s (bytes = 2 * numel * 4)"),
             "fused step backends registered: " + (", ".join(backends) if backends else
                                                  "none (learned steps run the PyTorch reference; one row each)")]
    return {"tables": {"optimizer cost": optimizer_costs(cfg, roofline, opt_sizes),
                       "copy roofline": [{"elements": n, "copy GB/s": b / 1e9, "% of roofline": 100 * b / roofline}
                                         for n, b in copies.items()],
                       "step": prox_step(cfg, roofline, step_sizes),
                       "optimizer cost, many tensors": many_tensors(cfg)},
            "notes": notes, "plots": []}
