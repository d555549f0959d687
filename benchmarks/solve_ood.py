"""Which shipped weights should ``torch_l2o.solve`` use? The ood suite's twelve sets under
solve's own stopping rule (certified relative duality gap, float32 iterates).

    python benchmarks/solve_ood.py [--tol 1e-5] [--data-dir DIR]     # ~3 minutes on a 2-core CPU

Prints, per set, the mean over instances of the iterations each method needed (``*``:
some instance stopped unconverged at the float32 floor or at ``--max-iter``).
"""

import argparse
import os
import sys
import warnings
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import torch_l2o  # noqa: E402
from suites import ood  # noqa: E402

RUNS = (("FISTA-restart", "fista", {}), ("PA-MR lasso", "pamr", {"weights": "lasso"}),
        ("PA-MR mix", "pamr", "mix"), ("PA-GRU mix", "pagru", "mix"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("--max-iter", type=int, default=3000)
    ap.add_argument("--data-dir", default=os.environ.get("TORCH_L2O_DATA"))
    a = ap.parse_args()
    cfg = SimpleNamespace(instances=32, iters=2000, seed=0, device="cpu", data_dir=a.data_dir, full=False,
                          iters_given=False)
    warnings.simplefilter("ignore")  # unconverged instances are marked with *
    print("| set | " + " | ".join(r[0] for r in RUNS) + " |\n|---|" + "---|" * len(RUNS))
    for key, kind, _, build in ood.sets(cfg):
        P = build().to(torch.float32)
        cells = []
        for _, method, kw in RUNS:
            if kw == "mix":
                kw = {"weights": f"{kind}-mix"}
            r = torch_l2o.solve(P, method, tol=a.tol, max_iter=a.max_iter, **kw)
            cells.append(f"{float(r.iterations.double().mean()):.0f}{'' if bool(r.converged.all()) else '*'}")
        print(f"| {key} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
