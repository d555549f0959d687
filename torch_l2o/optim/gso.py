"""GSO: an alternating learned optimizer for multi-block problems (seed 003)."""

from __future__ import annotations

from typing import Any, Iterable

import torch

from .learned import LearnedOptimizer, OutputLearnedOptimizer

__all__ = ["GSO"]


class GSO(OutputLearnedOptimizer):
    r"""Global Scope Optimization (Xiong et al., seed 003): alternate learned steps over the
    variable blocks, each block with its own coordinate-wise LSTM meta-learner, all
    meta-trained on the *global* loss.

    Param groups are the blocks, in order. Each ``step()`` moves only the active block,
    by its own network and prox:

    .. math::
        x_b \leftarrow \operatorname{prox}_{\mathrm{lr}_b\, r_b}\big(x_b + \mathrm{lr}_b\,
        m_b(\nabla_{x_b} F,\ h_b)\big),

    and after ``inner_steps`` (``t_l``, per group) steps the next block becomes active,
    cyclically. The schedule (round, active block, steps taken in it) is in the optimizer
    state and survives ``state_dict``; :attr:`active_block` tells which group the next step
    moves, so a loop may compute only that block's gradient. Each block's recurrent state
    is kept across rounds.

    Example (matrix completion)::

        opt = torch_l2o.GSO([{"params": [U]}, {"params": [V]}], inner_steps=10, weights="mc")
        for t in range(100 * 2 * 10):
            opt.zero_grad(); F(U, V).backward(); opt.step()

    Args:
        params: one param group per block.
        lr: scale of the networks' output (default 1).
        inner_steps: ``t_l``, the steps a block takes before the next block's turn.
        weights: a shipped name (``"mc"``, ``"gmm"``), a path, a state dict, ``"untrained"``.
        prox, lam, prox_params: per group, the block's non-smooth term (e.g. ``"simplex"``
            for mixture weights).
        instance_dims: leading dims of each parameter that index independent instances.
        nonfinite: ``"raise"`` (default) or ``"skip"`` for a NaN or Inf gradient; nothing is
            written either way.
        **options: the network's constructor arguments; they must match the weights'.
    """

    arch = "gso"

    def __init__(self, params: Iterable, lr: float = 1.0, *, inner_steps: int = 10, prox: str = "none",
                 lam: float | None = None, prox_params: dict | None = None, weights: Any = None,
                 instance_dims: int | None = None, nonfinite: str = "raise", **options: Any) -> None:
        params = list(params)
        if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 1:
            raise ValueError(f"inner_steps must be an int >= 1, got {inner_steps!r}")
        blocks = len(params) if params and isinstance(params[0], dict) else 1
        options.setdefault("blocks", blocks)
        LearnedOptimizer.__init__(self, params, dict(lr=lr, prox=prox, lam=lam, prox_params=prox_params,
                                                     inner_steps=inner_steps, instance_dims=instance_dims,
                                                     nonfinite=nonfinite), weights, **options)
        if len(self.param_groups) != len(self.net.nets):
            raise ValueError(f"GSO has {len(self.net.nets)} block networks but {len(self.param_groups)} param groups; "
                             "give one param group per block")
        self._moved = False

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if hasattr(self, "_moved"):
            raise RuntimeError("GSO's blocks are fixed at construction: one param group per block network")
        super().add_param_group(param_group)

    # ------------------------------------------------------------ schedule

    def _schedule(self) -> dict:
        first = self.param_groups[0]["params"][0]
        return self.state[first].setdefault("schedule", {"round": 0, "block": 0, "inner": 0})

    @property
    def active_block(self) -> int:
        """Index of the param group (block) the next step moves."""
        return self._schedule()["block"]

    def _update(self, group, ps, gs, states, lrs, prox_params, ctx) -> None:
        if self._group_index(group) != self.active_block:
            return
        super()._update(group, ps, gs, states, lrs, prox_params, ctx)  # the active block's own network
        self._moved = True

    @torch.no_grad()
    def step(self, closure=None):
        self._schedule()
        self._moved = False
        loss = super().step(closure)
        if self._moved:
            sch = self._schedule()
            sch["inner"] += 1
            if sch["inner"] >= self.param_groups[sch["block"]]["inner_steps"]:
                sch["inner"] = 0
                sch["block"] = (sch["block"] + 1) % len(self.param_groups)
                if sch["block"] == 0:
                    sch["round"] += 1
        return loss
