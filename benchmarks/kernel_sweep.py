"""The fused learned-step kernels on a GPU: time per element against the memory roofline,
over launch configurations, each checked against the PyTorch reference first.

    python benchmarks/kernel_sweep.py [--sizes 1e6 1e7] [--out sweep.json]

Per optimizer and configuration (coordinates per program, warps, matrix-product
precision): the largest relative difference of one step from the reference (the
parity test's tolerance is 2e-5), nanoseconds per element per step of the kernel
alone (``learned_step_triton``, no watchdog), and of ``opt.step()`` with its defaults,
the bytes a step must move per element (state read and written, ``g`` read, ``x`` and
``y`` read and written) and the share of the device-to-device copy bandwidth measured
in the same run. Needs CUDA.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import time

import torch

import torch_l2o
from torch_l2o.kernels import triton_learned
from torch_l2o.kernels.fused import use_fused
from torch_l2o.optim.functional import dm_update, pa_update, rnnprop_update

OPTS = {
    "L2O-PA": ("pa", pa_update, lambda ps, **k: torch_l2o.PA(ps, prox="l1", lam=0.1, lr=0.01, **k)),
    "L2O-PA-GRU": ("pa", pa_update, lambda ps, **k: torch_l2o.PAGRU(ps, prox="l1", lam=0.1, lr=0.01, **k)),
    "L2O-PA-MR": ("pa", pa_update, lambda ps, **k: torch_l2o.PAMR(ps, prox="l1", lam=0.1, lr=0.01, **k)),
    "L2O-DM": ("dm", dm_update, lambda ps, **k: torch_l2o.L2ODM(ps, **k)),
    "RNNProp": ("rnnprop", rnnprop_update, lambda ps, **k: torch_l2o.RNNProp(ps, **k)),
}


def _time(fn, reps=20) -> float:
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def copy_bandwidth(n: int) -> float:
    src = torch.empty(n, device="cuda")
    dst = torch.empty_like(src)
    return 2 * 4 * n / _time(lambda: dst.copy_(src))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", type=float, nargs="+", default=[1e6, 1e7])
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="the default configuration only")
    args = ap.parse_args(argv)
    assert torch.cuda.is_available(), "the sweep needs CUDA"
    rows = []
    bw = copy_bandwidth(int(max(args.sizes)) * 4)
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, copy {bw / 1e12:.2f} TB/s", flush=True)
    configs = [dict(triton_learned.CONFIG)] if args.quick else [
        {"BLOCK": b, "num_warps": w, "precision": p}
        for b, w, p in itertools.product((32, 64, 128), (4, 8), ("ieee", "tf32x3"))]
    default = dict(triton_learned.CONFIG)
    for name, (kind, update, make) in OPTS.items():
        for n in map(int, args.sizes):
            x = torch.randn(n, device="cuda", requires_grad=True)
            x.grad = torch.randn(n, device="cuda")
            opt = make([x])
            opt.step()
            opt.step()
            st = opt.state[x]
            net = opt._net_on(x.device)
            state = {k: v for k, v in st.items() if k in net.init_state(1)}
            state_bytes = sum(v.numel() * v.element_size() for v in state.values() if v.dim() > 0) / n
            moved = 2 * state_bytes + 4 + 2 * 4 + (2 * 4 if kind == "pa" else 0)
            y, g = x.detach(), x.grad
            xs = [st["x"]] if kind == "pa" else [y]
            prox, params = ("none", {}) if kind == "rnnprop" else ("l1", {"lam": 0.1})
            t_step = _time(opt.step, reps=5)
            with use_fused(False):
                t_ref = _time(opt.step, reps=3)
            for cfg in configs:
                triton_learned.CONFIG.update(cfg)
                # parity of one step from the same state, on a copy
                ys_k, xs_k, st_k = [y.clone()], [v.clone() for v in xs], copy.deepcopy(state)
                ys_r = [y.clone()]
                xs_r = [v.clone() for v in xs] if kind == "pa" else ys_r
                xs_k = xs_k if kind == "pa" else ys_k
                new_k = triton_learned.learned_step_triton(kind, net, st_k, ys_k, [g], xs_k, lr=[0.01], prox=prox,
                                                           params=params, step=2)
                with use_fused(False), torch.no_grad():
                    _, _, new_r = update(net, copy.deepcopy(state), ys_r, [g], xs_r, lr=[0.01], prox=prox,
                                         params=params, step=2, inplace=True)
                err = max(float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-30))
                          for a, b in [(ys_k[0], ys_r[0])] + [(new_k[k], new_r[k]) for k in new_r
                                                               if new_r[k].is_floating_point()])
                work = copy.deepcopy(state)
                t = _time(lambda: triton_learned.learned_step_triton(
                    kind, net, work, [y], [g], xs, lr=[0.01], prox=prox, params=params, step=2))
                row = {"optimizer": name, "elements": n, **cfg, "parity_max_rel_err": err,
                       "kernel ns/element": t / n * 1e9, "opt.step() ns/element": t_step / n * 1e9,
                       "reference opt.step() ns/element": t_ref / n * 1e9, "bytes/element": moved,
                       "kernel GB/s": moved * n / t / 1e9, "% of copy roofline": 100 * moved * n / t / bw}
                rows.append(row)
                print(json.dumps(row), flush=True)
            triton_learned.CONFIG.update(default)
            del opt, x
            torch.cuda.empty_cache()
    adam_x = torch.randn(int(max(args.sizes)), device="cuda", requires_grad=True)
    adam_x.grad = torch.randn_like(adam_x)
    adam = torch.optim.Adam([adam_x], fused=True)
    t_adam = _time(lambda: adam.step())
    summary = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "triton": __import__("triton").__version__, "copy_bandwidth_TB/s": bw / 1e12,
               "adam_fused ns/element": t_adam / adam_x.numel() * 1e9, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}))


if __name__ == "__main__":
    main()
