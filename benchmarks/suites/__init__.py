"""Benchmark suites: each ``run(cfg) -> dict`` with ``tables`` (name -> rows) and ``plots``."""

from . import composite, step

SUITES = {
    "lasso": composite.lasso,
    "logistic": composite.logistic,
    "step": step.run,
}
