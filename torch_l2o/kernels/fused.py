"""Fused learned steps: one dispatcher, the update functions' PyTorch code as the reference.

A learned update (:mod:`torch_l2o.optim.functional`) run in place may be served whole
by a *fused step backend*: features, network, prox-gradient step and extrapolation in
one pass that reads each coordinate's state, ``g``, ``y`` and ``x`` once and writes
them once (the Triton kernels of :mod:`torch_l2o.kernels.triton_learned` on CUDA, a
compiled path on CPU). Backends are tried in order; each may decline a call (return
``None``: a network, device, dtype, prox or shape it does not handle), and the update
function's own PyTorch code, which defines the result, runs it then. Out of place
(meta-training, the safeguard's proposals) the reference always runs: backends serve
``inplace=True`` only, without autograd.

A backend is ``fn(kind, net, state, ys, gs, xs, *, lr, prox, params, step) -> state | None``
with ``kind`` the update's name (``"pa"``, ``"dm"``, ``"rnnprop"``): it writes ``x_{k+1}``
into ``xs`` and ``y_{k+1}`` into ``ys`` (for ``"dm"`` and ``"rnnprop"``, whose ``xs`` are
the ``ys``, the new iterate into ``ys``) and returns the new network state, which may
reuse the storage of ``state``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["fused_step", "register_step_backend", "step_backends", "use_fused", "requested"]

State = dict[str, Tensor]
StepBackend = Callable[..., Optional[State]]

_BACKENDS: list[tuple[str, StepBackend]] = []
_ENABLED = True


def register_step_backend(name: str, fn: StepBackend | None) -> None:
    """Add (or with ``fn=None`` remove) a backend, tried before those registered earlier."""
    _BACKENDS[:] = [(n, f) for n, f in _BACKENDS if n != name]
    if fn is not None:
        _BACKENDS.insert(0, (name, fn))


def step_backends() -> list[str]:
    """Registered backends, in the order they are tried (the reference comes last)."""
    return [n for n, _ in _BACKENDS] + ["reference"]


class use_fused:
    """``with use_fused(False):`` runs every learned step through the PyTorch reference
    (parity tests, benchmarks of the unfused path); ``use_fused("triton")`` tries only
    that backend, and lets the Triton one take CPU tensors under ``TRITON_INTERPRET=1``
    (tests: the interpreter is far too slow to be picked by default). Also a plain
    call that sets the default and returns the previous one (``.prev``)."""

    def __init__(self, enabled: bool | str = True) -> None:
        global _ENABLED
        if not isinstance(enabled, (bool, str)):
            raise TypeError(f"use_fused takes True, False or a backend's name, got {enabled!r}")
        if isinstance(enabled, str) and enabled not in step_backends():
            raise ValueError(f"unknown fused-step backend {enabled!r}; registered: {step_backends()}")
        self.prev, _ENABLED = _ENABLED, enabled

    def __enter__(self) -> "use_fused":
        return self

    def __exit__(self, *exc) -> None:
        global _ENABLED
        _ENABLED = self.prev


def requested() -> str | None:
    """The backend named by :class:`use_fused`, if one is."""
    return _ENABLED if isinstance(_ENABLED, str) else None


def fused_step(kind: str, net, state: State, ys: Sequence[Tensor], gs: Sequence[Tensor], xs: Sequence[Tensor], *,
               lr: Any, prox: str, params: Mapping[str, Any] | None, step: int) -> State | None:
    """The new state if a backend took the in-place step, else ``None`` (run the reference)."""
    if _ENABLED is False or _ENABLED == "reference" or not _BACKENDS:
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in (*ys, *gs, *xs)):
        return None
    for name, fn in _BACKENDS:
        if isinstance(_ENABLED, str) and name != _ENABLED:
            continue
        out = fn(kind, net, state, ys, gs, xs, lr=lr, prox=prox, params=params, step=step)
        if out is not None:
            return out
    return None
