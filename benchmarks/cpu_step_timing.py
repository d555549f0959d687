"""Time the in-place learned step on the CPU: the PyTorch reference against the fused
CPU backend (:mod:`torch_l2o.kernels.cpu_step`), with Adam for scale.

``python benchmarks/cpu_step_timing.py [--sizes 1e4,1e5,1e6] [--archs pa,...] [--threads 1] [--against REV]
[--held 0.85]``

Prints microseconds per element and step (the best of ``--reps`` steps; wall clock and
this thread's CPU time, which is less disturbed by other jobs on the machine), the
largest difference between the two paths after one step from the same state (relative
to the largest magnitude), and each configuration's first-call compile latency: cold
(``g++`` into an empty cache) and from the disk cache.

``--against REV`` also times the loop as it was at git revision ``REV`` (its C++ source,
built the same way), in the same process and alternated with this checkout's: a
before/after ratio within one run, which timings from different sessions (another host,
another clock) cannot give.

``--held F``: a fraction ``F`` of the coordinates (scattered at random) at fixed points of
the prox-gradient map (``x = y = 0``, ``|g| < lam``), as in a sparse run late: the PA
family's ``hold_fixed`` (the default) keeps them and the CPU loop skips their network.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from torch_l2o.kernels import cpu_step  # noqa: E402
from torch_l2o.kernels.fused import use_fused  # noqa: E402
from torch_l2o.registry import get_architecture  # noqa: E402
from torch_l2o.weights import build_network  # noqa: E402

ARCHS = ("pa", "pagru", "pamr", "l2odm", "rnnprop")
KIND = {"pa": "pa", "pagru": "pa", "pamr": "pa", "l2odm": "dm", "rnnprop": "rnnprop"}


def _problem(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen), 0.5 * torch.randn(n, generator=gen)


def _step_fn(arch: str, net, n: int, held: float = 0.0):
    """A closure running one in-place step on its own copy of a warmed-up state."""
    update = get_architecture(arch).update
    kind = KIND[arch]
    kw = {"lr": 0.01, "prox": "l1" if kind == "pa" else "none", "params": {"lam": 0.1} if kind == "pa" else {}}
    y, g = _problem(n)
    if held and kind == "pa":  # fixed points of the l1 prox-gradient map at any step: they stay put
        fixed = torch.rand(n, generator=torch.Generator().manual_seed(1)) < held
        y[fixed], g[fixed] = 0.0, 0.05 * torch.tanh(g[fixed])
    x = y.clone()
    state = net.init_state(n)
    with torch.no_grad(), use_fused(False):  # a few steps: moments nonzero, PA-MR's window partly filled
        for k in range(2):
            _, _, state = update(net, state, [y], [g], [x if kind == "pa" else y], step=k, inplace=True, **kw)
    box = {"state": state, "step": 2}

    def run():
        with torch.no_grad():
            _, _, box["state"] = update(net, box["state"], [y], [g], [x if kind == "pa" else y], step=box["step"],
                                        inplace=True, **kw)
        box["step"] += 1

    return run, (y, x, box)


def _best(fn, reps: int) -> tuple[float, float]:
    wall = cpu = float("inf")
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.thread_time()
        fn()
        wall, cpu = min(wall, time.perf_counter() - t0), min(cpu, time.thread_time() - c0)
    return wall, cpu


def _source_at(rev: str) -> str:
    """The C++ source of the CPU step at git revision ``rev``."""
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    text = subprocess.run(["git", "show", f"{rev}:torch_l2o/kernels/cpu_step.py"], cwd=root, check=True,
                          capture_output=True, text=True).stdout
    for node in ast.parse(text).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_SOURCE" for t in node.targets):
            return ast.literal_eval(node.value)
    raise SystemExit(f"no _SOURCE in torch_l2o/kernels/cpu_step.py at {rev}")


_LOADED: dict[str, dict] = {}  # per source, its loaded libraries (switching reloads nothing)


@contextlib.contextmanager
def _source(src: str | None):
    """Build and run the step from ``src`` (None: this checkout's) inside the block."""
    if src is None:
        yield
        return
    saved = cpu_step._SOURCE, cpu_step._LIBS
    cpu_step._SOURCE, cpu_step._LIBS = src, _LOADED.setdefault(src, {})
    try:
        yield
    finally:
        cpu_step._SOURCE, cpu_step._LIBS = saved


def _parity(arch: str, net, n: int) -> float:
    """Largest relative difference of y (and x) after one step from the same state."""
    out = []
    for fused in (False, "cpu"):
        run, (y, x, box) = _step_fn(arch, net, n)
        with use_fused(fused):
            run()
        out.append((y.clone(), x.clone(), box["state"]))
    (y0, x0, s0), (y1, x1, s1) = out
    rel = lambda a, b: float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))  # noqa: E731
    return max([rel(y1, y0), rel(x1, x0)] + [rel(s1[k], s0[k]) for k in s0 if s0[k].is_floating_point()])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1e4,1e5,1e6")
    ap.add_argument("--archs", default=",".join(ARCHS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5, help="timed steps per path (3 at 1e6 and above)")
    ap.add_argument("--against", metavar="REV", help="also time the loop of this git revision")
    ap.add_argument("--held", type=float, default=0.0, metavar="F",
                    help="fraction of the coordinates at fixed points (the PA family holds them)")
    a = ap.parse_args(argv)
    old_src = _source_at(a.against) if a.against else None
    torch.set_num_threads(a.threads)
    sizes = [int(float(s)) for s in a.sizes.split(",")]
    archs = a.archs.split(",")
    print(f"torch {torch.__version__}, {a.threads} thread(s), {os.cpu_count()} CPUs, held fraction {a.held}; "
          f"fused-step backends: {', '.join(__import__('torch_l2o').kernels.fused.step_backends())}")

    print("\nfirst-call compile latency (seconds): cold = g++ into an empty cache; cached = loading it back")
    with tempfile.TemporaryDirectory() as tmp:
        old = os.environ.get("TORCH_L2O_CACHE")
        os.environ["TORCH_L2O_CACHE"] = tmp
        try:
            for arch in archs:
                net, _ = build_network(arch, None)
                cfg = cpu_step._config(KIND[arch], net)
                cpu_step._LIBS.clear()
                t0 = time.perf_counter()
                lib = cpu_step.compile_library(cfg)
                cold = time.perf_counter() - t0
                cpu_step._LIBS.clear()
                t0 = time.perf_counter()
                cpu_step.compile_library(cfg)
                warm = time.perf_counter() - t0
                print(f"  {arch:8s} cold {cold:5.2f}  cached {warm:6.3f}" + ("" if lib else "  (NOT AVAILABLE)"))
        finally:
            if old is None:
                del os.environ["TORCH_L2O_CACHE"]
            else:
                os.environ["TORCH_L2O_CACHE"] = old
            cpu_step._LIBS.clear()

    print("\nus per element and step, best of the timed steps: wall (cpu)")
    before = f"{'at ' + a.against:>18s} " if a.against else ""
    print(f"{'arch':8s} {'n':>8s} {'reference':>18s} {before}{'cpu backend':>18s} {'speedup':>8s} {'max rel diff':>13s}"
          + (f" {'vs ' + a.against:>12s}" if a.against else ""))
    print(f"{'':8s} {'':8s} {'':>18s} {'':>18s} {'(cpu)':>8s}")
    for n in sizes:
        reps = a.reps if n < 10**6 else min(a.reps, 3)
        for arch in archs:
            net, _ = build_network(arch, None)
            paths = [(False, None)] + ([("cpu", old_src)] if old_src else []) + [("cpu", None)]
            runs = []
            for fused, src in paths:
                run, _ = _step_fn(arch, net, n, a.held)
                with _source(src), use_fused(fused):
                    run()  # the first call compiles or loads the library
                    if fused and cpu_step.compile_library(cpu_step._config(KIND[arch], net)) is None:
                        raise SystemExit(f"the CPU loop{' at ' + a.against if src else ''} could not be built or "
                                         "loaded (an argument layout older than this checkout's?)")
                runs.append(run)
            best = [(float("inf"), float("inf"))] * len(paths)
            for _ in range(reps):  # alternated: a slow spell of the machine hits every path alike
                for i, ((fused, src), run) in enumerate(zip(paths, runs)):
                    with _source(src), use_fused(fused):
                        w, c = _best(run, 1)
                    best[i] = (min(best[i][0], w), min(best[i][1], c))
            (rw, rc), (fw, fc) = best[0], best[-1]
            diff = _parity(arch, net, min(n, 10**5))
            mid = "".join(f"{w / n * 1e6:8.3f} ({c / n * 1e6:6.3f}) " for w, c in best[1:-1])
            print(f"{arch:8s} {n:8d} {rw / n * 1e6:8.3f} ({rc / n * 1e6:6.3f}) {mid}{fw / n * 1e6:8.3f} "
                  f"({fc / n * 1e6:6.3f}) {rc / fc:7.1f}x {diff:13.1e}"
                  + (f" {best[1][1] / fc:11.2f}x" if old_src else ""))
        p = torch.zeros(n, requires_grad=True)
        p.grad = _problem(n)[1]
        adam = torch.optim.Adam([p], lr=1e-3)
        adam.step()
        w, c = _best(adam.step, max(reps, 5))
        print(f"{'adam':8s} {n:8d} {w / n * 1e6:8.3f} ({c / n * 1e6:6.3f})")


if __name__ == "__main__":
    main()
