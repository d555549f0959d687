"""The built-in learned-optimizer architectures, each registered once (:mod:`torch_l2o.registry`).

``training`` holds the ``meta_train`` settings each architecture's shipped weights were
trained with, over the training script's defaults (``pretrained/train.py``: the MS4L2O
protocol scaled to a 2-core CPU).
"""

from __future__ import annotations

from .nets import DMNet, GSONet, MathGDNet, PAFRNet, PAGRUNet, PAMRNet, PANet, RNNPropNet
from .optim.functional import dm_update, mathgd_update, pa_update, pafr_update, rnnprop_update
from .optim.gso import GSO
from .optim.learned import L2ODM, PA, PAGRU, PAMR, MathGD, RNNProp
from .registry import register_architecture

__all__: list[str] = []

_COMPOSITE = ("lasso", "logistic")
_MIXTURES = ("lasso-mix", "logistic-mix")  # the broad mixtures (torch_l2o.problems.mixture), scaled inputs
# the networks without a prox (L2O-DM, RNNProp) are also trained on small MLPs, as in their papers
_BLACK_BOX = dict(applies_prox=False, lr_is_step=False, extrapolates=False, families=_COMPOSITE + ("mlp",),
                  default_weights="mlp")

register_architecture("pa", network=PANet, update=pa_update, optimizer=PA, display_name="L2O-PA",
                      default_weights="lasso", families=_COMPOSITE, paper="Liu et al., ICML 2023 (MS4L2O)")
register_architecture("pagru", network=PAGRUNet, update=pa_update, optimizer=PAGRU, display_name="L2O-PA-GRU",
                      default_weights="lasso", families=_COMPOSITE + _MIXTURES, paper="Liu 2026 (seed 000), ablation")
register_architecture("pamr", network=PAMRNet, update=pa_update, optimizer=PAMR, display_name="L2O-PA-MR",
                      default_weights="lasso", families=_COMPOSITE + _MIXTURES,
                      paper="Liu 2026 (seed 000)")
# a study: FISTA-restart whose step and momentum the PA-GRU network scales (untrained: FISTA-restart)
register_architecture("pafr", network=PAFRNet, update=pafr_update, display_name="L2O-PA-FR", families=_MIXTURES,
                      paper="this project (a study)")
register_architecture("l2odm", network=DMNet, update=dm_update, optimizer=L2ODM, display_name="L2O-DM",
                      paper="Andrychowicz et al., NeurIPS 2016", **_BLACK_BOX)
register_architecture("rnnprop", network=RNNPropNet, update=rnnprop_update, optimizer=RNNProp,
                      display_name="RNNProp", paper="Lv, Jiang, Li, ICML 2017", **_BLACK_BOX)
# GSO (seed 003, Algorithm 2): horizon and unroll count rounds (T and t_u), each round
# t_l = 10 learned steps per block; T = 50 rounds per batch instead of 100 to fit a CPU.
register_architecture(
    "gso", network=GSONet, update=dm_update, optimizer=GSO, display_name="GSO", lr_is_step=False,
    extrapolates=False, default_weights="mc", families=("mc", "gmm"), paper="Xiong et al. (seed 003)",
    training=dict(steps=100, batch=8, horizon=50, unroll=10, inner_steps=10, loss="log", lr=3e-3, clip=1.0,
                  val_every=10, val_batch=16))
# Math-L2O (seed 004): SGD on the last-step objective, full backpropagation through T = 100
# steps, batch 10, 400 x 512 problems, e = 100. H = 512 instead of 5120: storing H
# activations per coordinate for 100 steps takes 10 GB at H = 5120.
register_architecture(
    "mathgd", network=MathGDNet, update=mathgd_update, optimizer=MathGD, display_name="Math-L2O GD",
    extrapolates=False, default_weights="qp", families=("qp",), paper="Song, Lin, Xu, NeurIPS 2025 (seed 004)",
    training=dict(steps=300, batch=10, horizon=100, unroll=100, loss="last", meta_optimizer="sgd", lr=1e-5,
                  clip=None, val_every=20, val_batch=32),
    network_options=dict(hidden=512, init_scale=100.0))
