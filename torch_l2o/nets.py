"""The learned optimizers' networks: small, coordinate-wise, weights shared by all coordinates.

Each network maps per-coordinate features ``(N, F)`` and a recurrent state (a dict
of tensors, zeros at the start) to per-coordinate outputs and the next state. ``N``
is the number of coordinates (all parameters' elements, all instances); the networks
never mix coordinates, except PA-MR's optional attention across the coordinates of
one instance. Recurrent state is float32 whatever the parameters' dtype.

Parameter counts (``sum(p.numel() for p in net.parameters())``) are in each
docstring and checked by the tests.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .kernels.recurrent import rnn_step

__all__ = ["CoordinateNet", "run_network", "DMNet", "RNNPropNet", "PANet", "PAGRUNet", "PAFRNet", "PAMRNet", "GSONet", "MathGDNet"]

State = dict[str, Tensor]


class CoordinateNet(nn.Module):
    """Base: ``forward(features, state, instances) -> (outputs, new_state)``."""

    n_features: int = 2
    #: constructor options that choose how the update runs, not what the weights are: they
    #: may differ from those the weights were trained with
    inference_options: tuple[str, ...] = ()

    def init_state(self, n: int, device=None) -> State:
        """Zero recurrent state for ``n`` coordinates."""
        raise NotImplementedError

    def config(self) -> dict:
        """The constructor arguments: what a weight file must match."""
        return {}

    @property
    def coordinatewise(self) -> bool:
        """Whether coordinates never interact, so that any set of them (several
        parameter tensors) can run as one batch."""
        return True

    def coordinate_dims(self) -> dict[str, int | None]:
        """Per state entry, the dim that indexes coordinates; ``None`` for an entry shared
        by all coordinates (a counter). Read off :meth:`init_state` once: the constructor's
        choices fix it, and the update functions ask at every step."""
        dims = self.__dict__.get("_coordinate_dims")
        if dims is None:
            one, two = self.init_state(1), self.init_state(2)
            dims = {k: next((d for d, (i, j) in enumerate(zip(one[k].shape, two[k].shape)) if i != j), None)
                    for k in one}
            self.__dict__["_coordinate_dims"] = dims
        return dict(dims)

    def block(self, b: int) -> "CoordinateNet":
        """The network that moves variable block ``b`` (one shared network: itself)."""
        return self


#: Coordinates per network call in a step that records no gradient. The reference path's
#: temporaries are per coordinate (PA-MR's window attention about 4 KB each): 1e7
#: coordinates in one call need tens of GB; slices of 2^16 need about 250 MB.
CHUNK = 1 << 16


def run_network(net: CoordinateNet, feats: Tensor, state: State, instances: int = 1,
                chunk: int | None = None):
    """``net(feats, state, instances=instances)``, in slices of ``chunk`` coordinates
    (default :data:`CHUNK`) when no gradient is recorded and ``net`` is coordinate-wise:
    the same outputs and state, with the temporaries of one slice at a time. Under
    autograd (the meta-training unroll) it is one call, as the graph needs all of it."""
    chunk = CHUNK if chunk is None else chunk
    n = feats.shape[0]
    if n <= chunk or not net.coordinatewise or (torch.is_grad_enabled() and (
            feats.requires_grad or any(t.requires_grad for t in state.values())
            or any(p.requires_grad for p in net.parameters()))):
        return net(feats, state, instances=instances)
    dims = net.coordinate_dims()
    outs, new = [], {}
    for lo in range(0, n, chunk):
        w = min(chunk, n - lo)
        part = {k: t.narrow(dims[k], lo, w) if dims.get(k) is not None else t for k, t in state.items()}
        out, nxt = net(feats.narrow(0, lo, w), part, instances=instances)
        outs.append(out)
        for k, t in nxt.items():
            d = dims.get(k)
            if d is None:  # shared by all coordinates (a counter): every slice computes the same
                new[k] = t
                continue
            if k not in new:
                shape = list(t.shape)
                shape[d] = n
                new[k] = t.new_empty(shape)
            new[k].narrow(d, lo, w).copy_(t)
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(o) for o in zip(*outs)), new
    return torch.cat(outs), new


def _rnn_state(rnn: nn.RNNBase, n: int, device) -> State:
    z = torch.zeros(rnn.num_layers, n, rnn.hidden_size, device=device)
    return {"h": z, "c": z.clone()} if isinstance(rnn, nn.LSTM) else {"h": z}


class _PAHeads(nn.Module):
    """``z = ReLU(Linear(d, d)(o))``; ``p = 2 sigmoid(Linear(d, 1)(z))``, ``a = 2 sigmoid(Linear(d, 1)(z))``."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(d, d)
        self.p = nn.Linear(d, 1)
        self.a = nn.Linear(d, 1)

    def forward(self, o: Tensor) -> tuple[Tensor, Tensor]:
        z = F.relu(self.hidden(o))
        return 2 * torch.sigmoid(self.p(z)).squeeze(-1), 2 * torch.sigmoid(self.a(z)).squeeze(-1)


def _check_inputs(inputs: str) -> str:
    if inputs not in PA_INPUTS:
        raise ValueError(f"inputs must be one of {', '.join(map(repr, PA_INPUTS))}, got {inputs!r}")
    return inputs


# The PA networks' inputs (torch_l2o.optim.functional.pa_features): "raw" [g, y] as in the
# papers, "scaled" [s g / sigma, y / sigma] with a per-instance scale sigma, or "prox" the
# scaled pair and the prox-gradient step (prox_{s r}(y - s g) - y) / sigma.
PA_INPUTS = ("raw", "scaled", "prox")


def _pa_rnn(cell, inputs: str, hidden: int, layers: int) -> nn.RNNBase:
    return cell(3 if inputs == "prox" else 2, hidden, layers)


class PANet(CoordinateNet):
    """L2O-PA (Liu et al., ICML 2023): LSTM 2 x 20 on ``[g, y]`` (``inputs="raw"``) or on
    the scale-free ``[s g, y] / sigma`` (``"scaled"``), a ReLU layer, bounded heads ``p, a``
    in (0, 2). 5,742 parameters.

    ``hold_fixed`` (default ``True``): a coordinate at a fixed point of the prox-gradient
    map, ``x_k = y_k = prox_{s r}(y_k - s g_k)``, keeps its recurrent state for the step
    (:func:`torch_l2o.optim.functional.pa_update`); ``False``: the papers' recurrence."""

    # options of the update, not of the weights: free to differ from the ones they were trained with
    inference_options = ("hold_fixed",)

    def __init__(self, hidden: int = 20, layers: int = 2, inputs: str = "raw", hold_fixed: bool = True) -> None:
        super().__init__()
        self.inputs = _check_inputs(inputs)
        self.rnn = _pa_rnn(nn.LSTM, inputs, hidden, layers)
        self.heads = _PAHeads(hidden)
        self.hold_fixed = bool(hold_fixed)

    def init_state(self, n, device=None):
        return _rnn_state(self.rnn, n, device)

    def forward(self, feats: Tensor, state: State, instances: int = 1):
        o, state = rnn_step(self.rnn, feats, state)
        return self.heads(o), state

    def config(self):
        return {"hidden": self.rnn.hidden_size, "layers": self.rnn.num_layers, "inputs": self.inputs,
                "hold_fixed": self.hold_fixed}


class PAGRUNet(PANet):
    """L2O-PA-GRU (ablation of seed 000): L2O-PA with a GRU 2 x 16. 2,898 parameters.
    ``inputs``, ``hold_fixed``: as for :class:`PANet`."""

    def __init__(self, hidden: int = 16, layers: int = 2, inputs: str = "raw", hold_fixed: bool = True) -> None:
        CoordinateNet.__init__(self)
        self.inputs = _check_inputs(inputs)
        self.rnn = _pa_rnn(nn.GRU, inputs, hidden, layers)
        self.heads = _PAHeads(hidden)
        self.hold_fixed = bool(hold_fixed)


class PAFRNet(PAGRUNet):
    """L2O-PA-FR (a study): the PA-GRU network scaling FISTA-restart's step and momentum per
    coordinate (:func:`torch_l2o.optim.functional.pafr_update`). Its output layers start
    at zero, so ``p = a = 1``: untrained, it is FISTA with adaptive restart. State: the
    GRU's, and FISTA's ``t_k`` (one per coordinate, equal over an instance's). 2,898
    parameters."""

    def __init__(self, hidden: int = 16, layers: int = 2, inputs: str = "scaled", hold_fixed: bool = True) -> None:
        super().__init__(hidden, layers, inputs, hold_fixed)
        for lin in (self.heads.p, self.heads.a):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def init_state(self, n, device=None):
        return {**super().init_state(n, device), "t": torch.ones(n, device=device)}

    def forward(self, feats: Tensor, state: State, instances: int = 1):
        o, new = rnn_step(self.rnn, feats, {k: v for k, v in state.items() if k != "t"})
        from .optim.functional import fista_momentum  # the update rules import this module

        p, a = self.heads(o)
        new["t"], beta = fista_momentum(state["t"])
        return (p, a * beta), new


class PAMRNet(CoordinateNet):
    """L2O-PA-MR (Liu, 2026, seed 000): GRU 2 x 16, multi-head attention, two FFN blocks
    (Linear-ReLU-Dropout, residual add, LayerNorm), the L2O-PA heads. 4,594 parameters
    with the defaults (fewer than L2O-PA's 5,742, as the paper claims).

    ``inputs``, ``hold_fixed``: as for :class:`PANet`.

    ``attend="window"`` (default): each coordinate's current GRU output attends to its own
    last ``window`` outputs (this one included): coordinate-wise, linear in the number of
    coordinates, the window kept in the optimizer state. ``attend="coordinates"``: the
    outputs of all coordinates of one instance attend to each other (quadratic in the
    instance's size; for small problems).
    """

    inference_options = PANet.inference_options

    def __init__(self, hidden: int = 16, layers: int = 2, heads: int = 4, window: int = 8,
                 attend: str = "window", dropout: float = 0.1, inputs: str = "raw", hold_fixed: bool = True) -> None:
        super().__init__()
        self.inputs = _check_inputs(inputs)
        self.hold_fixed = bool(hold_fixed)
        if attend not in ("window", "coordinates"):
            raise ValueError(f"attend must be 'window' or 'coordinates', got {attend!r}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.rnn = _pa_rnn(nn.GRU, inputs, hidden, layers)
        self.attn = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.ffn = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(2))
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(2))
        self.drop = nn.Dropout(dropout)
        self.heads = _PAHeads(hidden)
        self.window, self.attend, self.dropout = window, attend, dropout

    @property
    def coordinatewise(self) -> bool:
        return self.attend != "coordinates"

    def init_state(self, n, device=None):
        state = _rnn_state(self.rnn, n, device)
        if self.attend == "window" and self.window > 1:
            state["window"] = torch.zeros(n, self.window - 1, self.rnn.hidden_size, device=device)
            state["filled"] = torch.zeros((), dtype=torch.int64, device=device)
        return state

    def forward(self, feats: Tensor, state: State, instances: int = 1):
        o, new = rnn_step(self.rnn, feats, state)
        if self.attend == "coordinates":
            q = o.reshape(instances, -1, o.shape[-1])
            u = self.attn(q, q, q, need_weights=False)[0].reshape(o.shape)
        elif self.window > 1:
            keys = torch.cat([state["window"].to(o.dtype), o.unsqueeze(1)], 1)  # (N, W, d): oldest first, current last
            filled = state["filled"]
            # slot j holds an output iff it is the current one or one of the `filled` previous
            ignore = torch.arange(self.window, device=o.device) < (self.window - 1 - filled)
            u = self._window_attention(o, keys, ignore)
            new["window"] = keys[:, 1:].to(state["window"].dtype)
            new["filled"] = torch.clamp(filled + 1, max=self.window - 1)
        else:
            u = self._window_attention(o, o.unsqueeze(1), None)
        v = u
        for lin, norm in zip(self.ffn, self.norms):
            v = norm(v + self.drop(F.relu(lin(v))))
        return self.heads(v), new

    def _window_attention(self, o: Tensor, keys: Tensor, ignore: Tensor | None) -> Tensor:
        """``self.attn(o, keys, keys)`` for one query per coordinate, written out: with
        tiny sequences, elementwise products beat the batched matmuls of
        ``nn.MultiheadAttention`` (2.7x on a CPU, forward and backward). Same parameters."""
        n, w, d = keys.shape
        h = self.attn.num_heads
        dh = d // h
        wq, wkv = self.attn.in_proj_weight.split([d, 2 * d])
        bq, bkv = self.attn.in_proj_bias.split([d, 2 * d])
        q = F.linear(o, wq, bq).view(n, 1, h, dh)
        k, v = F.linear(keys, wkv, bkv).view(n, w, 2, h, dh).unbind(2)
        s = (q * k).sum(-1) / math.sqrt(dh)  # (n, w, h)
        if ignore is not None:
            s = s.masked_fill(ignore.view(1, w, 1), float("-inf"))
        a = torch.softmax(s, dim=1)
        return self.attn.out_proj((a.unsqueeze(-1) * v).sum(1).reshape(n, d))

    def config(self):
        return {"hidden": self.rnn.hidden_size, "layers": self.rnn.num_layers, "heads": self.attn.num_heads,
                "window": self.window, "attend": self.attend, "dropout": self.dropout, "inputs": self.inputs,
                "hold_fixed": self.hold_fixed}


class DMNet(CoordinateNet):
    """L2O-DM (Andrychowicz et al., NeurIPS 2016): LSTM 2 x 20 on the preprocessed gradient
    ``(log|g| / p, sign g)`` if ``|g| >= e^-p`` else ``(-1, e^p g)``, ``p = 10``; a linear
    output times 0.1. 5,301 parameters. ``inputs="grad_x"``: MS4L2O's raw ``[g, x]``."""

    def __init__(self, hidden: int = 20, layers: int = 2, preprocess: float = 10.0, inputs: str = "grad") -> None:
        super().__init__()
        if inputs not in ("grad", "grad_x"):
            raise ValueError(f"inputs must be 'grad' or 'grad_x', got {inputs!r}")
        self.rnn = nn.LSTM(2, hidden, layers)
        self.out = nn.Linear(hidden, 1)
        self.preprocess, self.inputs = preprocess, inputs

    def init_state(self, n, device=None):
        return _rnn_state(self.rnn, n, device)

    def features(self, g: Tensor, x: Tensor) -> Tensor:
        if self.inputs == "grad_x":
            return torch.stack([g, x], -1)
        p = self.preprocess
        big = g.abs() >= math.exp(-p)
        logg = torch.log(torch.clamp(g.abs(), min=math.exp(-p))) / p
        return torch.stack([torch.where(big, logg, -torch.ones_like(g)),
                            torch.where(big, torch.sign(g), math.exp(p) * g)], -1)

    def forward(self, feats: Tensor, state: State, instances: int = 1):
        o, state = rnn_step(self.rnn, feats, state)
        return 0.1 * self.out(o).squeeze(-1), state

    def config(self):
        return {"hidden": self.rnn.hidden_size, "layers": self.rnn.num_layers,
                "preprocess": self.preprocess, "inputs": self.inputs}


class RNNPropNet(CoordinateNet):
    """RNNProp (Lv et al., ICML 2017): ``Linear(2, 20) + ELU``, LSTM 2 x 20, ``Linear(20, 1)``,
    tanh. Inputs: ``g / (sqrt(v) + eps)`` and ``m / (sqrt(v) + eps)`` from bias-corrected
    moments. 6,801 parameters. Its state holds the moments ``m, v`` beside the LSTM's."""

    def __init__(self, hidden: int = 20, layers: int = 2) -> None:
        super().__init__()
        self.inp = nn.Linear(2, hidden)
        self.rnn = nn.LSTM(hidden, hidden, layers)
        self.out = nn.Linear(hidden, 1)

    def init_state(self, n, device=None):
        return {**_rnn_state(self.rnn, n, device), "m": torch.zeros(n, device=device),
                "v": torch.zeros(n, device=device)}

    def forward(self, feats: Tensor, state: State, instances: int = 1):
        o, state = rnn_step(self.rnn, F.elu(self.inp(feats)), state)
        return torch.tanh(self.out(o)).squeeze(-1), state

    def config(self):
        return {"hidden": self.rnn.hidden_size, "layers": self.rnn.num_layers}


class GSONet(CoordinateNet):
    """GSO (Xiong, Hospedales et al., seed 003): one coordinate-wise LSTM meta-learner per
    variable block, each an L2O-DM network (LSTM 2 x 20 on the preprocessed gradient of
    the global loss). The paper's LSTMs have 500 hidden units; 20 keeps the per-step cost
    of a coordinate-wise network on a CPU. 5,301 parameters per block."""

    def __init__(self, blocks: int = 2, hidden: int = 20, layers: int = 2, preprocess: float = 10.0) -> None:
        super().__init__()
        if blocks < 1:
            raise ValueError(f"blocks must be >= 1, got {blocks}")
        self.nets = nn.ModuleList(DMNet(hidden, layers, preprocess) for _ in range(blocks))

    def init_state(self, n, device=None):
        return self.nets[0].init_state(n, device)

    def block(self, b: int) -> DMNet:
        return self.nets[b]

    def config(self):
        c = self.nets[0].config()
        return {"blocks": len(self.nets), "hidden": c["hidden"], "layers": c["layers"], "preprocess": c["preprocess"]}


class MathGDNet(CoordinateNet):
    """Math-L2O learned gradient descent (Song, Lin, Xu, NeurIPS 2025, seed 004): a
    coordinate-wise MLP without biases on ``[g, x]``, ``2 -> 2 (ReLU) -> H (ReLU) -> 1``,
    output ``P = 2 sigmoid`` in (0, 2). The deterministic initialisation (hidden weights
    orthogonal times ``init_scale`` from a fixed seed, last layer zero) gives ``P = 1``:
    before any training the optimizer *is* gradient descent. ``3 H + 4`` parameters
    (15,364 with the paper's ``H = 5120``)."""

    def __init__(self, hidden: int = 5120, init_scale: float = 100.0) -> None:
        super().__init__()
        self.l1 = nn.Linear(2, 2, bias=False)
        self.l2 = nn.Linear(2, hidden, bias=False)
        self.out = nn.Linear(hidden, 1, bias=False)
        self.init_scale = init_scale
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for lin in (self.l1, self.l2):
                q, r = torch.linalg.qr(torch.randn(max(lin.weight.shape), min(lin.weight.shape), generator=g))
                q = q * torch.sign(torch.diagonal(r))  # the orthogonal_ recipe, from a fixed seed
                lin.weight.copy_((q if lin.weight.shape[0] >= lin.weight.shape[1] else q.T) * init_scale)
            self.out.weight.zero_()

    def init_state(self, n, device=None):
        return {}

    def forward(self, feats: Tensor, state: State, instances: int = 1):
        z = F.relu(self.l2(F.relu(self.l1(feats))))
        return 2 * torch.sigmoid(self.out(z)).squeeze(-1), state

    def config(self):
        return {"hidden": self.l2.out_features, "init_scale": self.init_scale}

