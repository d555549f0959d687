"""Benchmark suites: each ``run(cfg) -> dict`` with ``tables`` (name -> rows) and ``plots``."""

from . import ablation, composite, gso, mathl2o, nn, ood, safeguard, step, walltime

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
    "ood": ood.run,
    "ood_auto": ood.run_auto,
}

# The quick default (``python benchmarks/run.py``, under 10 minutes on a 2-core CPU); the
# safeguard, GSO and Math-L2O suites train or sweep more and run with --all or --suite.
DEFAULT = ["lasso", "lasso_ood", "logistic", "logistic_ood", "ablation", "nn", "walltime", "step"]
