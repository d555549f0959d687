"""Train the shipped weights and write their cards.

    python pretrained/train.py --family lasso --arch pa pamr      # or: python -m torch_l2o.pretrained.train
    python pretrained/train.py --family all --arch all             # everything (hours on a 2-core CPU)
    python pretrained/train.py --family lasso --arch pa --card-only   # re-measure a shipped file

Each run writes ``pretrained/<arch>-<family>.safetensors`` and ``<arch>-<family>.json``:
architecture, family and its settings, training settings, CPU time, and validation
figures against FISTA with the true Lipschitz constant (against tuned Adam for the MLP
family) on held instances, float32 as users run it, ``F*`` in float64. Checkpoints go
to ``--checkpoints`` (default ``pretrained/checkpoints``, not shipped); an interrupted
run resumes from its checkpoint when started again with the same arguments.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if __package__ in (None, ""):  # run as a script from a checkout
    sys.path.insert(0, str(HERE.parent))

import torch_l2o  # noqa: E402
from torch_l2o.baselines import soft_impute  # noqa: E402
from torch_l2o.meta import LOSSES, rollout  # noqa: E402
from torch_l2o.problems import (GaussianMixture, Lasso, LassoMixture, LeastSquares, LogisticL1,  # noqa: E402
                                LogisticMixture, MatrixCompletion, MLPFamily, reference_solve,
                                relative_gap)
from torch_l2o.registry import available_architectures, get_architecture  # noqa: E402
from torch_l2o.weights import build_network, save_weights  # noqa: E402

# The families the shipped weights train on, and what each trains on (from the registry:
# every architecture lists its families).
FAMILIES = {
    "lasso": lambda: Lasso(m=250, n=500, sparsity=50, lam=0.1),
    "lasso-mix": lambda: LassoMixture(),  # a broad mixture (designs, m/n, lam / lam_max, noise): issue 16
    "logistic": lambda: LogisticL1(N=1000, n=50, sparsity=20, lam=0.1),
    "logistic-mix": lambda: LogisticMixture(),  # designs, N/n, separability, positives, lam / lam_max
    "mlp": lambda: MLPFamily(dataset="digits", hidden=20, samples=128),
    "mc": lambda: MatrixCompletion(n=100, rank=5, observe=0.2),
    "gmm": lambda: GaussianMixture(K=4, D=2, G=500),
    "qp": lambda: LeastSquares(m=400, n=512),
}
COMPOSITE = ("lasso", "lasso-mix", "logistic", "logistic-mix")
# Training settings: the MS4L2O protocol (horizon 100 in segments of 20, fresh batches,
# Adam, clipping) scaled to a 2-core CPU: batch 32 and 300 steps instead of 64 and 500,
# and the scale-free log-objective meta-loss (see torch_l2o.meta_train). An architecture's
# registered `training` settings override these (GSO, Math-L2O: their papers' protocols).
TRAIN = dict(steps=300, batch=32, horizon=100, unroll=20, loss="log", lr=3e-3, clip=1.0,
             val_every=20, val_batch=128, step_scale=None, auto_step=0.0)
# Small MLPs (L2O-DM, RNNProp papers): 1,510 weights per network, so batch 8 (12k coordinates,
# fewer than LASSO's 32 x 500 = 16k) and 150 steps keep a run near 15 CPU minutes.
FAMILY_TRAIN = {"mlp": dict(steps=150, batch=8, val_batch=32),
                # a mixture draws a shape per batch: validate on four held batches
                "lasso-mix": dict(val_batch=64, val_batches=4),
                # log F barely moves once a logistic instance is within 1e-3 of F* (F* ~ 0.3-0.7), so
                # the log loss never rewards the last digits: log(F - F*) does, over 300 iterations
                # (the mixture's instances take hundreds); benchmarks/RESULTS.md has the comparison
                "logistic-mix": dict(val_batch=64, val_batches=4, loss="log_gap", horizon=300, steps=100)}
MIXTURE_BATCHES = 4  # held batches of a mixture family in selection and on its card
# Network options per family: the mixtures' weights take the PA family's scale-free inputs
# (benchmarks/feature_study.py compares them with the raw ones).
FAMILY_OPTIONS = {"lasso-mix": {"inputs": "scaled"}, "logistic-mix": {"inputs": "scaled"}}
EVAL = dict(instances=256, iters=1000, seed=12345)


def archs_of(family_name, shipped_only=False):
    """The architectures trained on ``family_name``; ``shipped_only``: those with shipped
    weights (``--arch all``), not a study such as L2O-PA-FR, which is trained by name."""
    return [a for a in available_architectures() if family_name in get_architecture(a).families
            and not (shipped_only and get_architecture(a).default_weights is None)]


def _trace(problem, make, iters, composite=False, metric=None):
    """Run an optimizer on every instance; the error (or loss) after each iteration."""
    x = problem.x0().requires_grad_(True)
    opt = make([x])
    loss_fn = problem.objective if composite else problem.smooth
    out = [metric(x.detach())]
    for _ in range(iters):
        opt.zero_grad()
        loss_fn(x).sum().backward()
        try:
            opt.step()
        except FloatingPointError:  # diverged: a non-finite gradient; record it, do not crash
            inf = torch.full_like(out[0], math.inf) if isinstance(out[0], torch.Tensor) else math.inf
            return out + [inf] * (iters + 1 - len(out))
        sol = opt.solution(x) if hasattr(opt, "solution") else x.detach()
        out.append(metric(sol))
    return out


def _first(errs, tol):
    return next((k for k, e in enumerate(errs) if e <= tol), None)


def held_batches(family, instances, seed):
    """Held instances: one seeded batch, or for a mixture family (a shape per batch)
    ``MIXTURE_BATCHES`` batches that share the instances, seeds ``seed, seed + 1, ...``."""
    k = MIXTURE_BATCHES if hasattr(family, "shapes") else 1
    return [family.sample(instances // k, generator=torch.Generator().manual_seed(seed + i), dtype=torch.float64)
            for i in range(k)]


def evaluate_composite(arch, net_sd, config, family_name, family, only=None, auto_lr_scales=(), seed=None,
                       handoffs=(), auto_lr_scale=None):
    """Figures for a LASSO / logistic card: learned vs FISTA and FISTA with adaptive
    restart (the headline baseline; true L) on held instances; the learned optimizer
    also with ``lr=None`` and with its recurrent state stored in bfloat16. ``only``:
    compute just these runs (``--add-figures``). ``auto_lr_scales``: also the runs
    ``learned_lr_none_x{c}``, ``lr=None`` with the estimated step's multiplier ``c``
    (``--calibrate-step``). ``handoffs``: also the runs ``learned_handoff_{h}`` and
    ``learned_lr_none_handoff_{h}`` (at ``auto_lr_scale``), with the handoff threshold ``h``
    (``--calibrate-handoff``). ``seed``: of the held instances (default the card's). A
    mixture's figures are over its held batches: the mean relative error over all their
    instances."""
    batches = held_batches(family, EVAL["instances"], EVAL["seed"] if seed is None else seed)
    per = [_composite_runs(arch, net_sd, config, prob64, only, auto_lr_scales, handoffs, auto_lr_scale)
           for prob64 in batches]
    # (iterations + 1, instances) relative errors, the held batches' instances side by side
    runs = {name: torch.cat([r[name][:min(len(q[name]) for q in per)] for r in per], dim=1) for name in per[0]}
    return _figures(arch, family_name, runs, only)


def _composite_runs(arch, net_sd, config, prob64, only, auto_lr_scales=(), handoffs=(), auto_lr_scale=None):
    F_star = reference_solve(prob64).F
    prob = prob64.to(torch.float32)
    lam = prob.prox_params["lam"]
    s = prob.step_size()

    def metric(x):  # per instance: the card's figures are read off their mean, and per instance
        return torch.nan_to_num(relative_gap(prob64.objective(x.double()), F_star), nan=math.inf, posinf=math.inf)

    spec = get_architecture(arch)
    cls = spec.optimizer
    plan = {"fista": lambda: _trace(prob, lambda ps: torch_l2o.FISTA(ps, prox="l1", lam=lam, lr=s), EVAL["iters"],
                                    metric=metric),
            "fista_restart": lambda: _trace(prob, lambda ps: torch_l2o.FISTA(ps, prox="l1", lam=lam, lr=s,
                                                                             restart=True, instance_dims=1),
                                            EVAL["iters"], metric=metric)}
    if spec.applies_prox:
        def learned(ps, c=None, **kw):  # lr=None unless kw says; c: the automatic step's multiplier
            opt = cls(ps, prox="l1", lam=lam, weights=net_sd, instance_dims=1, **kw, **config)
            if c is not None:
                opt.auto_lr_scale = c
            return opt

        plan["learned"] = lambda: _trace(prob, lambda ps: learned(ps, lr=s), EVAL["iters"], metric=metric)
        plan["learned_lr_none"] = lambda: _trace(prob, learned, 300, metric=metric)
        for c in auto_lr_scales:
            plan[f"learned_lr_none_x{c}"] = lambda c=c: _trace(prob, lambda ps: learned(ps, c), 300, metric=metric)
        for h in handoffs:
            plan[f"learned_handoff_{h:g}"] = lambda h=h: _trace(
                prob, lambda ps: learned(ps, lr=s, handoff=h), EVAL["iters"], metric=metric)
            plan[f"learned_lr_none_handoff_{h:g}"] = lambda h=h: _trace(
                prob, lambda ps: learned(ps, auto_lr_scale, handoff=h), 300, metric=metric)
        plan["learned_bf16_state"] = lambda: _trace(
            prob, lambda ps: cls(ps, prox="l1", lam=lam, lr=s, weights=net_sd, instance_dims=1,
                                 state_dtype=torch.bfloat16, **config), 300, metric=metric)
    else:
        plan["learned"] = lambda: _trace(prob, lambda ps: cls(ps, weights=net_sd, **config), EVAL["iters"],
                                         composite=True, metric=metric)
        plan["learned_bf16_state"] = lambda: _trace(
            prob, lambda ps: cls(ps, weights=net_sd, state_dtype=torch.bfloat16, **config), 300, composite=True,
            metric=metric)
    return {name: torch.stack(run()) for name, run in plan.items() if only is None or name in only}


def _per_instance(errs: torch.Tensor, tol: float) -> dict:
    """Iterations for each instance's own relative error to reach ``tol``: median, 90th
    percentile (of the instances that reach it) and the share that reaches it. The mean
    error's crossing can be set by one slow instance of hundreds; these cannot."""
    hit = errs <= tol
    reached = hit.any(0)
    first = hit.double().argmax(0)[reached].double()
    if not len(first):
        return {"median": None, "p90": None, "reached": 0.0}
    return {"median": round(float(torch.quantile(first, 0.5)), 1), "p90": round(float(torch.quantile(first, 0.9)), 1),
            "reached": round(float(reached.double().mean()), 4)}


def _figures(arch, family_name, runs, only):
    figs = {}
    for name, per in runs.items():
        errs = per.mean(1).tolist()
        figs[name] = {f"iterations_to_{t:.0e}": _first(errs, t) for t in (1e-2, 1e-4, 1e-6)}
        figs[name].update({f"error_at_{k}": errs[k] for k in (20, 100, 300, 1000) if k < len(errs)})
        figs[name]["per_instance_iterations_to_1e-06"] = _per_instance(per, 1e-6)
    if only is not None:
        return figs
    runs = {name: per.mean(1).tolist() for name, per in runs.items()}
    fl, ff = runs["learned"], runs["fista"]
    floor = 1e-7  # float32 rounding of the objective
    figs["learned"]["worst_ratio_to_fista_after_100"] = max(
        max(fl[k], floor) / max(ff[k], floor) for k in range(100, len(fl)))
    figs["learned"]["diverged"] = not all(math.isfinite(e) for e in fl)
    for name, f in figs.items():
        if name.startswith("learned"):
            _vs_fista_restart(figs, f)
    figs["targets"] = _targets(arch, family_name, figs)
    return figs


def _vs_fista_restart(figs: dict, f: dict) -> None:
    """Set ``f``'s ratio FISTA-restart's iterations to 1e-6 (from the card figures ``figs``)
    over its own, where both reached 1e-6."""
    base = figs.get("fista_restart", {}).get("iterations_to_1e-06")
    if base and f.get("iterations_to_1e-06"):
        f["fewer_iterations_than_fista_restart_to_1e-06"] = round(base / f["iterations_to_1e-06"], 3)


def _save_added(card: dict, card_path: Path, runs, t0: float, command: str) -> None:
    """Record on the card what a later command added (runs, seconds, machine) and write it."""
    card["validation"].setdefault("added", []).append({
        "runs": runs, "seconds": round(time.perf_counter() - t0, 1),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
        "command": f"python pretrained/train.py {command}"})
    card_path.write_text(json.dumps(card, indent=1, sort_keys=False) + "\n")


def _ratio(fista, learned):
    if fista is None:
        return None
    if learned is None:
        return 0.0
    return fista / max(learned, 1)


LASSO_TARGETS = ("pa", "pamr")  # the architectures the LASSO targets were set for


def _targets(arch, family_name, figs):
    """The issue's targets, met or missed, with the figures behind them."""
    f, l = figs["fista"], figs["learned"]
    out = {}
    stall_ok = l["worst_ratio_to_fista_after_100"] <= 1.0 and not l["diverged"]
    if family_name == "lasso" and arch in LASSO_TARGETS:
        r4 = _ratio(f["iterations_to_1e-04"], l["iterations_to_1e-04"])
        r6 = _ratio(f["iterations_to_1e-06"], l["iterations_to_1e-06"])
        out["2x fewer iterations than FISTA to 1e-4"] = {"ratio": r4, "met": bool(r4 and r4 >= 2)}
        out["3x fewer iterations than FISTA to 1e-6"] = {"ratio": r6, "met": bool(r6 and r6 >= 3)}
        out["no divergence or stall above FISTA to 1000 iterations"] = {"met": stall_ok}
    if family_name == "logistic" and get_architecture(arch).extrapolates:
        r6 = _ratio(f["iterations_to_1e-06"], l["iterations_to_1e-06"])
        out["2x fewer iterations than FISTA to 1e-6"] = {"ratio": r6, "met": bool(r6 and r6 >= 2)}
    return out


def evaluate_mlp(arch, net_sd, config, family):
    """Figures for an MLP card: training loss and accuracy against Adam with a tuned step."""
    prob = family.sample(EVAL["instances"] // 4, generator=torch.Generator().manual_seed(EVAL["seed"]))
    metric = lambda x: float(prob.smooth(x).mean())  # noqa: E731
    iters = 300
    adam = {}
    for lr in (1e-3, 3e-3, 1e-2, 3e-2, 1e-1):
        adam[lr] = _trace(prob, lambda ps, lr=lr: torch.optim.Adam(ps, lr=lr), iters, metric=metric)
    best_lr = min(adam, key=lambda lr: adam[lr][100])
    learned = _trace(prob, lambda ps: get_architecture(arch).optimizer(ps, weights=net_sd, **config), iters,
                     metric=metric)
    sgd = _trace(prob, lambda ps: torch.optim.SGD(ps, lr=1.0), iters, metric=metric)
    pick = lambda tr: {f"loss_at_{k}": tr[k] for k in (20, 100, 300)}  # noqa: E731
    return {"learned": pick(learned), f"adam_lr_{best_lr:g}": pick(adam[best_lr]), "sgd_lr_1": pick(sgd),
            "diverged": not all(math.isfinite(v) for v in learned)}


def evaluate_blocks(arch, family_name, net_sd, config, family):
    """Figures for a GSO card: 32 held instances, 100 rounds, against the classical solvers."""
    prob64 = family.sample(32, generator=torch.Generator().manual_seed(EVAL["seed"]), dtype=torch.float64)
    prob = prob64.to(torch.float32)
    net, _ = build_network(arch, net_sd, **config)
    with torch.no_grad():
        F, carry = rollout(arch, net, prob, None, 100, inner_steps=10)
    xs = carry["xs"]
    figs = {"instances": 32, "rounds": 100,
            "objective_after_rounds": {r: float(F[r - 1].mean()) for r in (10, 50, 100)}}
    if family_name == "mc":
        # the mean hides a split between recovered matrices and bad local minima: report both
        rmse = {"GSO": prob64.metric(*[x.double() for x in xs]), "ALS, ridge 0.1": prob64.metric(*prob64.als(0.1)),
                "ALS, ridge 1e-3 (the paper's)": prob64.metric(*prob64.als(1e-3)),
                "soft-impute, tau 0.3": prob64.rmse(soft_impute(prob64, 0.3))}
        figs["rmse"] = {k: float(v.mean()) for k, v in rmse.items()}
        figs["rmse_median"] = {k: float(v.median()) for k, v in rmse.items()}
        figs["recovered_rmse_below_0.1"] = {k: int((v < 0.1).sum()) for k, v in rmse.items()}
    else:
        M, w, _ = prob64.em()
        # float32 iterates, the likelihood in float64 for both (compared to four digits)
        figs["nll"] = {"GSO": float(prob64.smooth(*[x.double() for x in xs]).mean()),
                       "EM, covariances fixed": float(prob64.smooth(M, w).mean()),
                       "start": float(prob64.smooth(*prob64.x0()).mean())}
    return figs


def evaluate_qp(arch, net_sd, config, family):
    """Figures for a Math-L2O card: objective at T = 100 against GD, Nesterov and Adam."""
    prob = family.sample(64, generator=torch.Generator().manual_seed(EVAL["seed"]))
    s = prob.step_size()
    metric = lambda x: float(prob.smooth(x).mean())  # noqa: E731
    runs = {"gd": _trace(prob, lambda ps: torch_l2o.ISTA(ps, lr=s), 100, metric=metric),
            "nesterov": _trace(prob, lambda ps: torch_l2o.FISTA(ps, lr=s), 100, metric=metric),
            "learned": _trace(prob, lambda ps: get_architecture(arch).optimizer(ps, lr=s, weights=net_sd, **config), 100,
                              metric=metric)}
    for lr in (1e-3, 3e-3, 1e-2, 3e-2, 1e-1):
        runs[f"adam_lr_{lr:g}"] = _trace(prob, lambda ps, lr=lr: torch.optim.Adam(ps, lr=lr), 100, metric=metric)
    best_adam = min((k for k in runs if k.startswith("adam")), key=lambda k: runs[k][100])
    gd = runs["gd"][100]
    return {"objective_at_100": {k: runs[k][100] for k in ("gd", "nesterov", "learned", best_adam)},
            "gain_over_gd": (gd - runs["learned"][100]) / gd,
            "targets": {"> 50% lower objective than GD at T = 100 (the paper)":
                        {"gain": (gd - runs["learned"][100]) / gd, "met": (gd - runs["learned"][100]) / gd > 0.5}}}


# name: (architectures, network options). PA-MR attending across coordinates (the seed's
# ablation); the PA networks on scale-free inputs (torch_l2o.optim.functional.pa_features).
VARIANTS = {"coordinates": (("pamr",), {"attend": "coordinates"}),
            "scaled": (("pa", "pagru", "pamr"), {"inputs": "scaled"}),
            # GRU 2 x 8: about a third of the default network's work per coordinate, for
            # problems whose gradient is cheap beside the learned step
            "small": (("pagru",), {"hidden": 8}),
            # the scaled inputs and the prox-gradient step: the threshold the network cannot see otherwise
            "prox": (("pa", "pagru", "pamr"), {"inputs": "prox"})}


SELECT = dict(instances=512, iters=300, seed=4242)


def select(arch, candidates, config, family):
    """Choose among weight candidates on a selection set distinct from validation and from
    the card's instances: fewest instances diverged (error above 1e-3 after 3x the training
    horizon), then the lowest mean log10 error. The mean-speed validation score can prefer
    weights that diverge on a rare instance (it did for L2O-PA: 2 in 256)."""
    batches = held_batches(family, SELECT["instances"], SELECT["seed"])
    cls = get_architecture(arch).optimizer
    report = {name: {"diverged": 0, "mean_log10_error": 0.0} for name in candidates}
    for prob64 in batches:
        F_star = reference_solve(prob64).F
        prob = prob64.to(torch.float32)
        lam = prob.prox_params["lam"]
        for name, sd in candidates.items():
            x = prob.x0().requires_grad_(True)
            opt = cls([x], prox="l1", lam=lam, lr=prob.step_size(), weights=sd, instance_dims=1, nonfinite="skip",
                      **config)
            logs = []
            for _ in range(SELECT["iters"]):
                opt.zero_grad()
                prob.smooth(x).sum().backward()
                opt.step()
                e = (prob64.objective(opt.solution(x).double()) - F_star) / F_star
                logs.append(float(torch.log10(torch.nan_to_num(e.mean(), nan=1e6, posinf=1e6).clamp(1e-12, 1e6))))
            e = torch.nan_to_num(e, nan=float("inf"))
            report[name]["diverged"] += int((e > 1e-3).sum())
            report[name]["mean_log10_error"] += sum(logs) / len(logs) / len(batches)
    choice = min(report, key=lambda n: (report[n]["diverged"], report[n]["mean_log10_error"]))
    return choice, {"instances": SELECT["instances"], "iterations": SELECT["iters"], "seed": SELECT["seed"],
                    "candidates": report, "chosen": choice}


def train_one(arch, family_name, args):
    family = FAMILIES[family_name]()
    name = family_name + (f"-{args.variant}" if args.variant else "")
    out = Path(args.out) / f"{arch}-{name}.safetensors"
    ck_dir = Path(args.checkpoints)
    spec = get_architecture(arch)
    base = {**TRAIN, **FAMILY_TRAIN.get(family_name, {}), **spec.training}
    settings = {**base, "steps": args.steps or base["steps"], "seed": args.seed}
    overrides = dict(args.set or [])
    if args.loss:
        overrides["loss"] = args.loss
    unknown = sorted(set(overrides) - set(settings))
    if unknown:
        raise SystemExit(f"--set {', '.join(unknown)}: not a training setting; known: {', '.join(sorted(settings))}")
    settings.update(overrides)
    options = dict(spec.network_options)
    if "inputs" in inspect.signature(spec.network.__init__).parameters:
        options.update(FAMILY_OPTIONS.get(family_name, {}))
    if args.variant:
        variant_archs, variant_options = VARIANTS[args.variant]
        if arch not in variant_archs:
            raise SystemExit(f"--variant {args.variant} applies to {', '.join(variant_archs)} only")
        options.update(variant_options)
    if args.add_figures:
        return add_figures(arch, out, family_name, family, args.add_figures)
    if args.calibrate_step:
        return calibrate_step(arch, out, family_name, family)
    if args.calibrate_handoff:
        return calibrate_handoff(arch, out, family_name, family)
    if args.card_only:
        net, info = build_network(arch, str(out))
        best, hist_d, seconds = net.state_dict(), (info["card"] or {}).get("training_history", {}), None
        card_old = info["card"] or {}
        settings = card_old.get("training", settings)
        seconds = card_old.get("training_cpu_seconds")
        config = net.config()
        # an update option added after these weights were trained (the network's
        # inference_options: hold_fixed) ran as it did then: say so beside the figures
        trained_with = dict(card_old.get("trained_with") or {})
        for k in spec.network.inference_options:
            if k not in card_old.get("config", {}) and k not in trained_with:
                trained_with[k] = False
    else:
        # other settings or another start make another run: it must not resume this one's checkpoint
        tag = "".join(f"-{k}{v}" for k, v in sorted(overrides.items())) + (
            f"-from-{Path(args.init).stem}" if args.init else "")
        ck = ck_dir / f"{arch}-{name}{tag}-seed{args.seed}.pt"
        ck_dir.mkdir(parents=True, exist_ok=True)
        init = {"init": args.init} if args.init else {}
        best, hist = torch_l2o.meta_train(arch, family, checkpoint=str(ck), resume=str(ck),
                                           checkpoint_every=10, **settings, **options, **init)
        selection = None
        if spec.extrapolates and family_name in COMPOSITE:
            final = torch.load(ck, weights_only=True)["net"]
            cfg = build_network(arch, best, **options)[0].config()
            chosen, selection = select(arch, {f"best validated (step {hist.best_step})": best,
                                              f"final (step {settings['steps']})": final}, cfg, family)
            best = best if chosen.startswith("best") else final
        net, _ = build_network(arch, best, **options)
        config = net.config()
        trained_with = {}
        hist_d = {"val_step": hist.val_step, "val_score": hist.val_score, "loss": hist.loss,
                  "skipped_segments": hist.skipped, "best_step": hist.best_step, "selection": selection}
        seconds = hist.seconds
    sd = {k: v for k, v in net.state_dict().items()}
    t0 = time.perf_counter()
    if family_name == "mlp":
        figures = evaluate_mlp(arch, sd, config, family)
    elif family_name in ("mc", "gmm"):
        figures = evaluate_blocks(arch, family_name, sd, config, family)
    elif family_name == "qp":
        figures = evaluate_qp(arch, sd, config, family)
    else:
        figures = evaluate_composite(arch, sd, config, family_name, family)
    card = {
        "family": family_name, "family_settings": dict(family.__dict__),
        "training": {**settings, **({"init": args.init, "init_sha256": _init_sha(arch, args.init)} if args.init else {})},
        **({"trained_with": trained_with} if trained_with else {}),
        "selection": hist_d.get("selection") if isinstance(hist_d, dict) else None,
        "meta_loss": _meta_loss_text(settings, family_name),
        "training_cpu_seconds": seconds,
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}",
        "validation": {"instances": figures.pop("instances", EVAL["instances"]), "seed": EVAL["seed"], "float": "float32 iterates, float64 F*",
                       "figures": figures, "evaluation_seconds": round(time.perf_counter() - t0, 1)},
        "training_history": hist_d,
        "reproduce": (f"python pretrained/train.py --family {family_name} --arch {arch} --seed {args.seed}"
                      + (f" --steps {args.steps}" if args.steps else "")
                      + (f" --variant {args.variant}" if args.variant else "")
                      + (f" --loss {args.loss}" if args.loss else "")
                      + "".join(f" --set {shlex.quote(f'{k}={v}')}" for k, v in (args.set or []))
                      + (f" --init {args.init}" if args.init else "")),
    }
    save_weights(out, net, arch, card)
    print(json.dumps({"file": str(out), "figures": figures}, indent=1))
    if family_name in COMPOSITE and spec.lr_is_step and spec.applies_prox:
        calibrate_step(arch, out, family_name, family)  # the card's lr=None figures at the chosen multiplier
        if spec.extrapolates:
            calibrate_handoff(arch, out, family_name, family)


def _init_sha(arch, init):
    """sha256 of the weights a fine-tune started from: a shipped name may be replaced by
    the run's own result, and git history keeps the file with this hash."""
    from torch_l2o.weights import _resolve_path, sha256
    return sha256(_resolve_path(arch, init))


def add_figures(arch, out, family_name, family, names):
    """Measure the runs ``names`` on a shipped card's instances and add them to its
    figures (the weights, their sha256 and the other figures stay as they are)."""
    if family_name not in COMPOSITE:
        raise SystemExit("--add-figures measures the LASSO and logistic cards")
    net, info = build_network(arch, str(out))
    card_path = out.with_suffix(".json")
    card = json.loads(card_path.read_text())
    t0 = time.perf_counter()
    figs = evaluate_composite(arch, net.state_dict(), net.config(), family_name, family, only=set(names))
    for name, f in figs.items():  # merged: a run's figures that only the full evaluation computes stay
        card["validation"]["figures"].setdefault(name, {}).update(f)
    card_figs = card["validation"]["figures"]
    for name, f in figs.items():
        if name.startswith("learned"):
            _vs_fista_restart(card_figs, f)
    _vs_fista_restart(card_figs, card_figs.get("learned", {}))
    _save_added(card, card_path, sorted(figs), t0,
                f"--family {family_name} --arch {arch} --add-figures {' '.join(names)}")
    print(json.dumps({"file": str(card_path), "added": figs}, indent=1), flush=True)


AUTO_LR_SCALES = (0.5, 0.6, 0.7, 0.85, 1.0)  # multipliers of the estimated 1/L that --calibrate-step tries
# It stops at 1.0 on purpose: on the LASSO mixtures' held instances 1.2 beat 1.0 (1e-4 in
# 236 / 215 iterations against 250 / 260, PA-GRU / PA-MR) and 1.4 missed 1e-4, but with
# 1.2 the ood_auto suite got worse (PA-GRU mix median 1.06 -> 1.13 of FISTA-restart, worst
# 1.44 -> 1.79): past 1.0 the step sits at the edge of stability (benchmarks/RESULTS.md).
CALIBRATION_SEED = 777  # its own held instances: the card's then measure the chosen multiplier unbiased


def calibrate_step(arch, out, family_name, family):
    """With ``lr=None`` a PA-family optimizer steps at ``auto_lr_scale / L_k``; measure the
    weights at each multiplier in ``AUTO_LR_SCALES`` on held instances of their family
    other than the card's (``CALIBRATION_SEED``), record the best on the card (fewest
    iterations to 1e-6, then to 1e-4; a tie goes to the smaller step), which the optimizer
    then reads, and measure it on the card's instances. The weights stay as they are."""
    spec = get_architecture(arch)
    if family_name not in COMPOSITE or not (spec.lr_is_step and spec.applies_prox):
        raise SystemExit("--calibrate-step measures the LASSO and logistic cards of architectures whose lr is the step")
    net, _ = build_network(arch, str(out))
    card_path = out.with_suffix(".json")
    card = json.loads(card_path.read_text())
    t0 = time.perf_counter()
    names = {f"learned_lr_none_x{c}": c for c in AUTO_LR_SCALES}
    figs = evaluate_composite(arch, net.state_dict(), net.config(), family_name, family, only=set(names),
                              auto_lr_scales=AUTO_LR_SCALES, seed=CALIBRATION_SEED)
    runs = {c: figs[name] for name, c in names.items()}
    for c, f in runs.items():
        print(f"  auto_lr_scale {c}: {f['iterations_to_1e-04']} / {f['iterations_to_1e-06']} "
              "iterations to 1e-4 / 1e-6", flush=True)

    def key(c):
        f = runs[c]
        return (f["iterations_to_1e-06"] or math.inf, f["iterations_to_1e-04"] or math.inf, c)

    best = min(AUTO_LR_SCALES, key=key)
    measured = evaluate_composite(arch, net.state_dict(), net.config(), family_name, family,
                                  only={f"learned_lr_none_x{best}"}, auto_lr_scales=(best,))[f"learned_lr_none_x{best}"]
    figs = card["validation"]["figures"]
    figs["learned_lr_none"] = measured
    _vs_fista_restart(figs, measured)
    card["auto_lr_scale"] = best
    card["validation"]["auto_lr_scale_calibration"] = {
        "seed": CALIBRATION_SEED, "instances": EVAL["instances"],
        **{str(c): {k: runs[c][k] for k in ("iterations_to_1e-04", "iterations_to_1e-06")} for c in AUTO_LR_SCALES}}
    _save_added(card, card_path, ["learned_lr_none", "auto_lr_scale_calibration"], t0,
                f"--family {family_name} --arch {arch} --calibrate-step")
    print(json.dumps({"file": str(card_path), "auto_lr_scale": best}), flush=True)


# The thresholds --calibrate-handoff tries, besides none. Tried and not kept: the grid
# extended upwards (0.3, 0.1, 0.03, 0.01, 0.003, 0.001). On the calibration instances it
# chose 0.3 / 0.1 / 0.3 / 0.01 (PA-GRU, PA-MR on the LASSO, then the logistic mixture) by
# 1-2 iterations of 450 to 1e-6. On the cards' own instances those came out at 728 / 751 / 557
# against 1e-2's 673 / 664 / 601: the mean crossing of 256 instances is set by a few slow
# ones, and it cannot rank thresholds between 0.01 and 0.3 (benchmarks/RESULTS.md).
HANDOFFS = (1e-2, 1e-3, 1e-4)


def calibrate_handoff(arch, out, family_name, family):
    """Measure the weights with the watchdog's handoff to FISTA-restart at each threshold
    of ``HANDOFFS`` and without, at ``1/L`` on held instances of their family other than
    the card's (``CALIBRATION_SEED``); record the best on the card (fewest iterations to
    1e-6, then to 1e-4; a tie goes to no handoff, then to the smaller threshold), which the
    optimizer then reads (``handoff="calibrated"``), and measure it on the card's instances
    at ``1/L`` and with ``lr=None``. The weights and their other figures stay as they are:
    ``learned`` is the learned step alone."""
    spec = get_architecture(arch)
    if family_name not in COMPOSITE or not (spec.lr_is_step and spec.applies_prox and spec.extrapolates):
        raise SystemExit("--calibrate-handoff measures the LASSO and logistic cards of the PA family")
    net, _ = build_network(arch, str(out))
    card_path = out.with_suffix(".json")
    card = json.loads(card_path.read_text())
    t0 = time.perf_counter()
    names = {"learned": None, **{f"learned_handoff_{h:g}": h for h in HANDOFFS}}
    figs = evaluate_composite(arch, net.state_dict(), net.config(), family_name, family, only=set(names),
                              handoffs=HANDOFFS, seed=CALIBRATION_SEED)
    runs = {h: figs[name] for name, h in names.items()}
    for h, f in runs.items():
        print(f"  handoff {h}: {f['iterations_to_1e-04']} / {f['iterations_to_1e-06']} iterations to 1e-4 / 1e-6, "
              f"per-instance median {f['per_instance_iterations_to_1e-06']['median']}", flush=True)

    def key(h):
        f = runs[h]
        return (f["iterations_to_1e-06"] or math.inf, f["iterations_to_1e-04"] or math.inf, h is not None, h or 0)

    best = min(runs, key=key)
    card["handoff"] = best
    card["validation"]["handoff_calibration"] = {
        "seed": CALIBRATION_SEED, "instances": EVAL["instances"],
        **{str(h): {k: runs[h][k] for k in ("iterations_to_1e-04", "iterations_to_1e-06")}
           | {"per_instance_median_to_1e-06": runs[h]["per_instance_iterations_to_1e-06"]["median"]}
           for h in runs}}
    added = ["handoff_calibration"]
    for short in ("learned_handoff", "learned_lr_none_handoff"):  # an earlier calibration's figures
        card["validation"]["figures"].pop(short, None)
    if best is not None:
        measured = evaluate_composite(arch, net.state_dict(), net.config(), family_name, family,
                                      only={f"learned_handoff_{best:g}", f"learned_lr_none_handoff_{best:g}"},
                                      handoffs=(best,), auto_lr_scale=card.get("auto_lr_scale"))
        for name, f in measured.items():
            _vs_fista_restart(card["validation"]["figures"], f)
            short = name.replace(f"_{best:g}", "")  # learned_handoff, learned_lr_none_handoff
            card["validation"]["figures"][short] = f
            added.append(short)
    _save_added(card, card_path, added, t0, f"--family {family_name} --arch {arch} --calibrate-handoff")
    print(json.dumps({"file": str(card_path), "handoff": best}), flush=True)


def _meta_loss_text(settings, family_name):
    if settings["loss"] == "last":
        return f"batch-mean F at the last of T = {settings['horizon']} steps, full backpropagation"
    if family_name in ("mc", "gmm"):
        return "mean over a segment's rounds and instances of log F after each round"
    if settings["loss"] == "log_mean_gap":
        return ("mean over a segment's iterations of log of the batch-mean relative gap (F(x_k) - F*) / |F*| + 1e-7, "
                "F* from a float64 solve of each training batch")
    if settings["loss"] == "log_gap":
        return ("mean over a segment's iterations and instances of log(F(x_k) - F* + 1e-7 |F*|), "
                "F* from a float64 solve of each training batch")
    return "mean over a segment's iterations and instances of log F(x_k)"


def _setting(text):
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE, e.g. horizon=300")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", nargs="+", default=["lasso"], help="lasso, logistic, mlp, mc, gmm, qp or all")
    ap.add_argument("--arch", nargs="+", default=["all"], help=f"{', '.join(available_architectures())} or all")
    ap.add_argument("--steps", type=int, help=f"meta-training steps (default {TRAIN['steps']})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(HERE))
    ap.add_argument("--checkpoints", default=str(HERE / "checkpoints"))
    ap.add_argument("--card-only", action="store_true", help="re-evaluate a shipped file and rewrite its card")
    ap.add_argument("--add-figures", nargs="+", metavar="RUN",
                    help="measure these runs (fista_restart, learned_bf16_state, ...) on a shipped card's "
                         "instances and add them to its figures")
    ap.add_argument("--calibrate-step", action="store_true",
                    help="measure a shipped LASSO / logistic file with lr=None at several multipliers of the "
                         "estimated 1/L and record the best on its card (the optimizer reads it)")
    ap.add_argument("--calibrate-handoff", action="store_true",
                    help="measure a shipped LASSO / logistic file of the PA family with the watchdog's handoff to "
                         "FISTA-restart at several thresholds and record the best on its card (the optimizer "
                         "reads it)")
    ap.add_argument("--loss", choices=LOSSES, help="the meta-loss (default: the family's; see torch_l2o.meta_train)")
    ap.add_argument("--set", action="append", type=_setting, metavar="KEY=VALUE",
                    help="override a training setting (horizon=300, lr=1e-3, ...); repeatable")
    ap.add_argument("--init", help="start from these weights (a shipped name such as pamr-lasso, or a path): fine-tuning")
    ap.add_argument("--variant", choices=sorted(VARIANTS), help="a variant of the network (pamr: coordinates; pa, pagru, pamr: scaled, prox; pagru: small, GRU 2 x 8)")
    args = ap.parse_args(argv)
    families = list(FAMILIES) if "all" in args.family else args.family
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        ap.error(f"unknown family {', '.join(unknown)}; known: {', '.join(FAMILIES)} or all")
    if "all" not in args.arch:
        for a in args.arch:
            try:
                get_architecture(a)
            except ValueError as e:
                ap.error(str(e))
            if not any(f in get_architecture(a).families for f in families):
                ap.error(f"{a} is not trained on {', '.join(families)}; its families: "
                         f"{', '.join(get_architecture(a).families) or 'none'}")
    for fam in families:
        archs = archs_of(fam, shipped_only=True) if "all" in args.arch else [a for a in args.arch if a in archs_of(fam)]
        for arch in archs:
            print(f"== {get_architecture(arch).display_name} on {fam}", flush=True)
            train_one(arch, fam, args)


if __name__ == "__main__":
    main()
