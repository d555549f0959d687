"""The registry of learned-optimizer architectures: every place that needs one looks it up here.

An :class:`Architecture` bundles what makes a learned optimizer: its coordinate-wise
network (:mod:`torch_l2o.nets`), its update function (:mod:`torch_l2o.optim.functional`,
one signature for all), how it treats the step size and the prox, its shipped weights
and the settings they were trained with, and the ``torch.optim`` class that drives it.
The optimizer classes, :func:`~torch_l2o.weights.build_network`,
:func:`~torch_l2o.meta_train`, the training script and the benchmarks read it; none of
them switches on a name.

A new architecture is one :func:`register_architecture` call::

    torch_l2o.register_architecture("tiny", network=TinyNet, update=pa_update)
    opt = torch_l2o.get_architecture("tiny").optimizer([x], prox="l1", lam=0.1, lr=1 / L,
                                                        weights="untrained")
    weights, history = torch_l2o.meta_train("tiny", family)

The update function's signature (see :func:`torch_l2o.optim.functional.pa_update`)::

    update(net, state, ys, gs, xs, *, lr, prox, params, step, instance_dims, inplace)
        -> (xs_new, ys_new, state_new)

over the lists of tensors of one batch of coordinates (a param group's tensors that
share device and dtype), with one network call for the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

__all__ = ["Architecture", "register_architecture", "unregister_architecture", "get_architecture",
           "available_architectures"]


@dataclass(frozen=True)
class Architecture:
    """One learned-optimizer architecture.

    Attributes:
        name: the key (``"pamr"``), used in weight file names and by ``meta_train``.
        network: the :class:`~torch_l2o.nets.CoordinateNet` subclass.
        update: the pure update function (module docstring for its signature).
        optimizer: the ``torch.optim`` class; generated from ``lr_is_step`` when not given.
        display_name: for tables and messages (``"L2O-PA-MR"``).
        applies_prox: the update applies the prox of ``r``; otherwise the optimizer is
            given the subgradient of ``F = f + r`` (L2O-DM, RNNProp).
        lr_is_step: ``lr`` is the base step ``s = 1/L`` (``None``: estimated); otherwise it
            scales the network's output (default 1, never estimated).
        extrapolates: the update keeps a prox iterate ``x`` apart from the gradient point
            ``y`` (the PA family); otherwise ``x = y``.
        default_weights: the shipped weights ``weights=None`` loads (``"lasso"``).
        families: the families the shipped weights were trained on.
        training: ``meta_train`` settings of the shipped weights (over the training
            script's defaults).
        network_options: the network's constructor arguments for the shipped weights.
        paper: where the architecture comes from.
    """

    name: str
    network: type
    update: Callable[..., Any]
    optimizer: type | None = None
    display_name: str = ""
    applies_prox: bool = True
    lr_is_step: bool = True
    extrapolates: bool = True
    default_weights: str | None = None
    families: tuple[str, ...] = ()
    training: Mapping[str, Any] = field(default_factory=dict)
    network_options: Mapping[str, Any] = field(default_factory=dict)
    paper: str = ""


_REGISTRY: dict[str, Architecture] = {}


def available_architectures() -> list[str]:
    """Names of every registered architecture, in registration order."""
    return list(_REGISTRY)


def get_architecture(name: str) -> Architecture:
    """The registered architecture ``name``; an unknown name lists the known ones."""
    if not isinstance(name, str):
        raise TypeError(
            f"an architecture is named by a string ({', '.join(map(repr, _REGISTRY))}), got "
            f"{type(name).__name__}"
        )
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown architecture {name!r}; known: {', '.join(_REGISTRY)}. "
            "Add your own with torch_l2o.register_architecture(name, network=..., update=...)."
        ) from None


def register_architecture(name: str, *, network: type, update: Callable[..., Any], optimizer: type | None = None,
                          replace: bool = False, **fields: Any) -> Architecture:
    """Register a learned-optimizer architecture (see :class:`Architecture` for ``fields``).

    Without ``optimizer`` a ``torch.optim`` class is made for it: a
    :class:`~torch_l2o.optim.ProxLearnedOptimizer` when ``lr_is_step`` (the default),
    else a :class:`~torch_l2o.optim.OutputLearnedOptimizer`. Registering a taken name is
    an error unless ``replace=True``.
    """
    from .nets import CoordinateNet

    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"an architecture name must be an identifier-like string, got {name!r}")
    if name in _REGISTRY and not replace:
        raise ValueError(f"architecture {name!r} is already registered; pass replace=True to redefine it")
    if not (isinstance(network, type) and issubclass(network, CoordinateNet)):
        raise TypeError(f"network must be a torch_l2o.nets.CoordinateNet subclass, got {network!r}")
    if not callable(update):
        raise TypeError(f"update must be a function, got {update!r}")
    unknown = sorted(set(fields) - {f for f in Architecture.__dataclass_fields__} - {"name"})
    if unknown:
        raise TypeError(f"register_architecture got unknown fields {unknown}")
    fields.setdefault("display_name", name)
    if optimizer is None:
        from .optim.learned import OutputLearnedOptimizer, ProxLearnedOptimizer

        base = ProxLearnedOptimizer if fields.get("lr_is_step", True) else OutputLearnedOptimizer
        optimizer = type(fields["display_name"].replace("-", "_"), (base,),
                         {"arch": name, "__doc__": f"The learned optimizer {fields['display_name']!r}."})
    elif getattr(optimizer, "arch", "") not in ("", name):
        raise ValueError(f"optimizer {optimizer.__name__} drives architecture {optimizer.arch!r}, not {name!r}")
    optimizer.arch = name
    arch = Architecture(name=name, network=network, update=update, optimizer=optimizer, **fields)
    _REGISTRY[name] = arch
    return arch


def unregister_architecture(name: str) -> Architecture:
    """Remove ``name`` from the registry (for tests and experiments); returns its entry."""
    get_architecture(name)  # an unknown name is the usual error
    return _REGISTRY.pop(name)
