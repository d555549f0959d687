"""Benchmark suites: each ``run(cfg) -> dict`` with ``tables`` (name -> rows) and ``plots``."""

from . import ablation, composite, gso, mathl2o, nn, safeguard, step, walltime

SUITES = {
    "lasso": composite.lasso,
    "lasso_ood": composite.lasso_ood,
    "logistic": composite.logistic,
    "logistic_ood": composite.logistic_ood,
    "ablation": ablation.run,
    "nn": nn.run,
    "walltime": walltime.run,
    "safeguard": safeguard.run,
    "gso": gso.run,
    "mathl2o": mathl2o.run,
    "step": step.run,
}
