"""The recurrent cells' forward: one dispatcher, with the PyTorch modules as the reference.

Every learned optimizer's network, when it runs as PyTorch modules (the reference of the
fused steps, :mod:`torch_l2o.kernels.fused`; meta-training), runs its LSTM or GRU through
:func:`rnn_step`: a step that a fused step backend serves whole never reaches it. A
faster implementation (a fused Triton cell, a compiled one) plugs in with
:func:`register_cell_backend`: it is tried first and may decline a call (return
``None``: a device, dtype or shape it does not handle, or autograd it cannot serve), in
which case the next backend, and finally the reference, runs it. The reference
defines the result; a backend must match it (tested parity).
"""

from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor, nn

__all__ = ["rnn_step", "rnn_step_reference", "register_cell_backend", "cell_backends"]

State = dict[str, Tensor]
CellBackend = Callable[[nn.RNNBase, Tensor, State], Optional[tuple[Tensor, State]]]

_BACKENDS: list[tuple[str, CellBackend]] = []


def rnn_step_reference(rnn: nn.RNNBase, inp: Tensor, state: State) -> tuple[Tensor, State]:
    """One time step of a multi-layer ``nn.LSTM`` / ``nn.GRU`` over ``N`` independent
    coordinates: ``inp`` is ``(N, F)``, ``state["h"]`` (and ``["c"]``) ``(layers, N, hidden)``.
    A state stored in lower precision is computed in ``inp``'s dtype and stored back rounded."""
    dt = state["h"].dtype
    cast = (lambda t: t.to(inp.dtype)) if dt != inp.dtype else (lambda t: t)  # noqa: E731
    if isinstance(rnn, nn.LSTM):
        out, (h, c) = rnn(inp.unsqueeze(0), (cast(state["h"]), cast(state["c"])))
        return out.squeeze(0), {"h": h.to(dt), "c": c.to(dt)}
    out, h = rnn(inp.unsqueeze(0), cast(state["h"]))
    return out.squeeze(0), {"h": h.to(dt)}


def register_cell_backend(name: str, fn: CellBackend | None) -> None:
    """Add (or with ``fn=None`` remove) a backend, tried before those registered earlier."""
    _BACKENDS[:] = [(n, f) for n, f in _BACKENDS if n != name]
    if fn is not None:
        _BACKENDS.insert(0, (name, fn))


def cell_backends() -> list[str]:
    """Registered backends, in the order they are tried (the reference comes last)."""
    return [n for n, _ in _BACKENDS] + ["reference"]


def rnn_step(rnn: nn.RNNBase, inp: Tensor, state: State) -> tuple[Tensor, State]:
    """One step of ``rnn`` on ``inp`` from ``state``: the first backend that takes the call."""
    for _, fn in _BACKENDS:
        out = fn(rnn, inp, state)
        if out is not None:
            return out
    return rnn_step_reference(rnn, inp, state)
