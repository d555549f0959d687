"""Issue 16, item 3: which inputs let a learned optimizer carry over to problems it was
not trained on? L2O-PA-MR trained on the LASSO mixture (``torch_l2o.problems.LassoMixture``)
with the papers' raw inputs ``[g, y]`` and with the scale-free ``[s g, y] / sigma``
(``inputs="scaled"``), with ``pretrained/train.py``'s settings and seed (validated on
one held batch), then every variant, the shipped single-family weights and the shipped
mixture weights on the LASSO sets of the out-of-distribution suite, on the training
family, on it rescaled (``b`` and ``lam`` times 100) and on held mixture batches.

    python benchmarks/feature_study.py --train --steps 100        # both variants (CPU: ~20-30 min each)
    python benchmarks/feature_study.py --evaluate --report benchmarks/results/feature_study.md
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "pretrained"))

import torch_l2o  # noqa: E402
from torch_l2o.registry import get_architecture  # noqa: E402

VARIANTS = {"raw": {}, "scaled": {"inputs": "scaled"}}


def checkpoint_path(ck_dir: Path, arch: str, variant: str, seed: int) -> Path:
    name = "lasso-mix" + ("" if variant == "raw" else f"-{variant}")
    return ck_dir / f"{arch}-{name}-seed{seed}.pt"


def train(args) -> None:
    import train as recipe  # pretrained/train.py: the shipped settings

    family = recipe.FAMILIES["lasso-mix"]()
    spec = get_architecture(args.arch)
    settings = {**recipe.TRAIN, **spec.training, "steps": args.steps, "seed": args.seed}
    ck_dir = Path(args.checkpoints)
    ck_dir.mkdir(parents=True, exist_ok=True)
    for variant in args.variants:
        ck = checkpoint_path(ck_dir, args.arch, variant, args.seed)
        t0 = time.perf_counter()
        best, hist = torch_l2o.meta_train(args.arch, family, checkpoint=str(ck), resume=str(ck), checkpoint_every=10,
                                          **{**settings, "val_batches": 1}, **spec.network_options,
                                          **VARIANTS[variant])
        print(json.dumps({"variant": variant, "checkpoint": str(ck), "best_step": hist.best_step,
                          "best_val": hist.best, "seconds": round(time.perf_counter() - t0, 1)}), flush=True)


def _study_sets(cfg):
    """The out-of-distribution suite's LASSO sets (but 4000 x 8000), the training family
    of the shipped weights, and two held batches of the mixture."""
    from suites import ood
    from torch_l2o.problems import Lasso, LassoMixture

    out = [(name, build) for name, _, _, build in ood.sets(cfg) if name.startswith("lasso_") and "8000" not in name]
    train = lambda lam=0.1: Lasso(lam=lam).sample(cfg.instances, generator=torch.Generator().manual_seed(  # noqa: E731
        cfg.seed + 7), dtype=torch.float64)
    out.append(("lasso_training_family", train))
    # the same instances in other units: b and lam times 100 (the solution times 100)
    out.append(("lasso_training_family_b_x100", lambda: replace(p := train(10.0), b=100 * p.b, x_true=100 * p.x_true)))
    for k in (1, 2):
        out.append((f"mixture_held_{k}", lambda k=k: LassoMixture().sample(
            cfg.instances, generator=torch.Generator().manual_seed(cfg.seed + 900 + k), dtype=torch.float64)))
    return out


def _candidates(args) -> list[tuple[str, object, dict]]:
    """``(label, weights, network options)``: the shipped single-family weights, then each
    trained study variant (its best validated weights)."""
    from torch_l2o.weights import available_weights

    name = get_architecture(args.arch).display_name
    out = [(f"{name} {w} (shipped)", w, {}) for w in ("lasso", "lasso-mix") if w in available_weights(args.arch)]
    for variant in args.variants:
        ck = checkpoint_path(Path(args.checkpoints), args.arch, variant, args.seed)
        if not ck.exists():
            print(f"no checkpoint for {variant} ({ck}): train it first (--train)", flush=True)
            continue
        c = torch.load(ck, weights_only=True)
        out.append((f"mix {variant} ({c['step']} steps)", c["best"], VARIANTS[variant]))
    return out


def evaluate(args) -> dict:
    from types import SimpleNamespace

    from suites import ood
    from bench_lib import format_table
    from torch_l2o.problems import reference_solve

    cfg = SimpleNamespace(instances=args.instances, full=False, seed=0, data_dir=os.environ.get("TORCH_L2O_DATA"),
                          iters=args.iters, device="cpu")
    cls = get_architecture(args.arch).optimizer
    cands = _candidates(args)
    tables, ratios = {}, {label: [] for label, _, _ in cands}
    for name, build in _study_sets(cfg):
        prob = build()
        F = reference_solve(prob).F
        lam, s = prob.prox_params["lam"], prob.step_size().to(torch.float32)
        rows = []
        base, _ = ood._run(ood.BASELINE, prob, F, lambda ps: torch_l2o.FISTA(ps, prox="l1", lam=lam, lr=s,
                                                                             restart=True), False, cfg)
        rows.append(base)
        b6 = base["it@1e-06"]
        for label, w, opts in cands:
            row, _ = ood._run(label, prob, F, lambda ps, w=w, opts=opts: cls(ps, prox="l1", lam=lam, lr=s, weights=w,
                                                                            instance_dims=1, **opts), False, cfg)
            it = row["it@1e-06"]
            row["x FISTA-restart"] = None if b6 is None else (round(it / b6, 2) if it is not None else "never")
            if b6 is not None:
                ratios[label].append(it / b6 if it is not None else float("inf"))
            rows.append(row)
        tables[name] = rows
        print(f"## {name} ({prob.batch} instances)\n" + format_table(rows, [
            "method", "it@1e-04", "it@1e-06", "x FISTA-restart", "s@1e-06", "err@stop", "watchdog"]), flush=True)
    summary = []
    for label, r in ratios.items():
        r = sorted(r)
        summary.append({"method": label, "sets": len(r), "median x FISTA-restart": r[len(r) // 2] if r else None,
                        "worst": r[-1] if r else None, "at most 1x": sum(v <= 1 for v in r)})
    text = format_table(summary)
    print("## summary: iterations to 1e-6 over FISTA-restart's\n" + text, flush=True)
    if args.report:
        with open(args.report, "w") as f:
            f.write(f"# Feature study ({args.arch}, {args.iters} iterations, {args.instances} instances per set)\n\n"
                    f"Command: `python benchmarks/feature_study.py --evaluate --report {args.report}`\n\n")
            f.write("## Summary: iterations to 1e-6 over FISTA-restart's (median over the sets it reached)\n\n"
                    + text + "\n\n")
            for name, rows in tables.items():
                f.write(f"## {name}\n\n" + format_table(rows, ["method", "it@1e-04", "it@1e-06", "x FISTA-restart",
                                                                 "s@1e-06", "err@stop", "watchdog"]) + "\n\n")
    return {"tables": tables, "summary": summary}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", action="store_true")
    ap.add_argument("--evaluate", action="store_true")
    ap.add_argument("--arch", default="pamr")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--checkpoints", default=str(HERE.parent / "pretrained" / "checkpoints" / "study"))
    ap.add_argument("--instances", type=int, default=32)
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--report")
    args = ap.parse_args(argv)
    if args.train:
        train(args)
    if args.evaluate:
        evaluate(args)


if __name__ == "__main__":
    main()
