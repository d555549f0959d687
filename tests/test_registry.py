"""The architecture registry: a new learned optimizer is a network, an update function and
one registration; nothing else in the library changes."""

import copy

import pytest
import torch
from torch import nn

import torch_l2o
from torch_l2o.kernels.recurrent import cell_backends, register_cell_backend, rnn_step, rnn_step_reference
from torch_l2o.meta import rollout
from torch_l2o.nets import CoordinateNet, run_network
from torch_l2o.optim.functional import pa_update
from torch_l2o.problems import Lasso
from torch_l2o.weights import build_network, save_weights

FAM = Lasso(m=8, n=12, sparsity=2, lam=0.1)


class TinyNet(CoordinateNet):
    """A one-layer GRU of ``hidden`` units on ``[g, y]``, one linear head for ``(p, a)``."""

    def __init__(self, hidden: int = 4) -> None:
        super().__init__()
        self.rnn = nn.GRU(2, hidden, 1)
        self.head = nn.Linear(hidden, 2)

    def init_state(self, n, device=None):
        return {"h": torch.zeros(1, n, self.rnn.hidden_size, device=device)}

    def forward(self, feats, state, instances=1):
        o, state = rnn_step(self.rnn, feats, state)
        p, a = (2 * torch.sigmoid(self.head(o))).unbind(-1)
        return (p, a), state

    def config(self):
        return {"hidden": self.rnn.hidden_size}


@pytest.fixture
def tiny():
    spec = torch_l2o.register_architecture("tiny", network=TinyNet, update=pa_update, display_name="Tiny-PA")
    yield spec
    torch_l2o.unregister_architecture("tiny")


def test_a_new_architecture_trains_saves_loads_and_steps(tiny, tmp_path):
    weights, hist = torch_l2o.meta_train("tiny", FAM, steps=4, batch=4, horizon=6, unroll=3, val_every=2, val_batch=6,
                                         progress=False, hidden=3)
    assert hist.skipped == 0 and len(hist.val_score) == 3
    net, _ = build_network("tiny", weights, hidden=3)
    path = save_weights(tmp_path / "tiny-lasso.safetensors", net, "tiny", card={"family": "lasso"})
    prob = FAM.sample(5, generator=torch.Generator().manual_seed(7))
    x = prob.x0().requires_grad_(True)
    opt = tiny.optimizer([x], prox="l1", lam=0.1, lr=prob.step_size(), weights=str(path))
    assert isinstance(opt, torch_l2o.ProxLearnedOptimizer) and opt.net.config() == {"hidden": 3}
    assert opt.weights_info["card"]["architecture"] == "Tiny-PA"
    assert repr(opt).startswith("Tiny-PA")
    F0 = prob.objective(x.detach())
    for _ in range(30):
        opt.zero_grad()
        prob.smooth(x).sum().backward()
        opt.step()
    assert bool((prob.objective(opt.solution(x)) < F0).all())
    # the optimizer's step and meta-training's unroll are one function
    with torch.no_grad():
        _, carry = rollout("tiny", opt.net, prob, None, 30)
    assert torch.allclose(opt.solution(x), carry["xs"][0], rtol=1e-5, atol=1e-6)
    # a state_dict round trip repeats the run
    x2 = x.detach().clone().requires_grad_(True)
    opt2 = tiny.optimizer([x2], prox="l1", lam=0.1, lr=prob.step_size(), weights=str(path))
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for o, q in ((opt, x), (opt2, x2)):
        for _ in range(3):
            o.zero_grad()
            prob.smooth(q).sum().backward()
            o.step()
    assert torch.equal(x, x2)


def test_registry_errors_name_the_fix(tiny):
    with pytest.raises(ValueError, match="unknown architecture 'tinny'; known: pa, .*tiny"):
        torch_l2o.get_architecture("tinny")
    with pytest.raises(TypeError, match="named by a string"):
        torch_l2o.get_architecture(FAM)
    with pytest.raises(ValueError, match="already registered; pass replace=True"):
        torch_l2o.register_architecture("tiny", network=TinyNet, update=pa_update)
    with pytest.raises(TypeError, match="CoordinateNet subclass"):
        torch_l2o.register_architecture("bad", network=nn.Linear, update=pa_update)
    with pytest.raises(TypeError, match=r"Tiny-PA has no option 'hiden' \(did you mean 'hidden'\?\); its network options: hidden"):
        build_network("tiny", "untrained", hiden=3)
    with pytest.raises(FileNotFoundError, match="no pretrained weights 'lasso' for Tiny-PA"):
        build_network("tiny", "lasso")
    assert "tiny" not in [a for a in torch_l2o.available_architectures() if torch_l2o.get_architecture(a).families]


def test_every_architecture_is_wired():
    """Each registered architecture's optimizer drives it, and its default weights load (a
    study without shipped weights, L2O-PA-FR: the untrained network, with a warning)."""
    for name in torch_l2o.available_architectures():
        spec = torch_l2o.get_architecture(name)
        assert spec.optimizer.arch == name and issubclass(spec.optimizer, torch_l2o.LearnedOptimizer)
        if spec.default_weights is None:
            with pytest.warns(UserWarning, match="no pretrained weights are shipped"):
                net, info = build_network(name, None, **spec.network_options)
            assert isinstance(net, spec.network) and info["weights"] == "untrained"
            continue
        net, info = build_network(name, None, **spec.network_options)
        assert isinstance(net, spec.network) and info["weights"].endswith(f"{name}-{spec.default_weights}.safetensors")


@pytest.mark.parametrize("name", ["pa", "pagru", "pamr", "l2odm", "rnnprop", "gso", "mathgd"])
def test_network_runs_in_slices_without_autograd(name):
    """``run_network`` slices a coordinate-wise network's call (bounded memory at 1e7
    coordinates): outputs and state equal one call's to float32 rounding (the slices'
    matrix products block differently), shared entries (PA-MR's counter) included; under
    autograd, or for PA-MR's attention across coordinates, it is one call."""
    net, _ = build_network(name, "untrained")
    net = net.block(0).eval()
    n, gen = 50, torch.Generator().manual_seed(0)
    feats = torch.randn(n, net.n_features, generator=gen)
    state = {k: torch.randn(v.shape, generator=gen) if v.is_floating_point() else v + 3
             for k, v in net.init_state(n).items()}
    with torch.no_grad():
        ref, ref_state = net(feats, state)
        out, new = run_network(net, feats, state, chunk=7)
    for a, b in zip(ref if isinstance(ref, tuple) else [ref],
                    out if isinstance(out, tuple) else [out]):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert new.keys() == ref_state.keys()
    for k in ref_state:
        assert new[k].shape == ref_state[k].shape and torch.allclose(new[k], ref_state[k], rtol=1e-5, atol=1e-6), k

    calls = []
    hook = net.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        run_network(net, feats, state, chunk=7)
    assert len(calls) == 8  # ceil(50 / 7)
    calls.clear()
    run_network(net, feats, state, chunk=7)  # nothing to differentiate: sliced as well
    assert len(calls) == 8
    calls.clear()
    net.requires_grad_(True)
    run_network(net, feats, state, chunk=7)  # the meta-training unroll: one graph over every coordinate
    assert len(calls) == 1
    hook.remove()
    if name == "pamr":
        across, _ = build_network("pamr", "untrained", attend="coordinates")
        calls.clear()
        across.register_forward_hook(lambda *a: calls.append(1))
        with torch.no_grad():
            run_network(across, feats, across.init_state(n), instances=2, chunk=7)
        assert len(calls) == 1


def test_cells_run_through_the_dispatcher():
    """A registered cell backend serves the networks' recurrent cells; declining falls back
    to the reference, and the result is the reference's."""
    seen = []

    def declining(rnn, inp, state):
        seen.append("declined")
        return None

    def serving(rnn, inp, state):
        seen.append("served")
        return rnn_step_reference(rnn, inp, state)

    x = torch.randn(6, requires_grad=True)
    try:
        register_cell_backend("declining", declining)
        register_cell_backend("serving", serving)
        assert cell_backends() == ["serving", "declining", "reference"]
        opt = torch_l2o.PAGRU([x], prox="l1", lam=0.1, lr=0.1, weights="untrained")
        x.grad = torch.randn(6)
        opt.step()
        assert seen == ["served"]
        register_cell_backend("serving", None)
        x.grad = torch.randn(6)
        opt.step()
        assert seen == ["served", "declined"]
    finally:
        register_cell_backend("serving", None)
        register_cell_backend("declining", None)
    assert cell_backends() == ["reference"]


def test_small_defects_stay_fixed(capsys):
    """Docstrings hold no control characters (MathGD's held a backspace where \\big was
    meant); every registered update is exported; train.py refuses an unknown --arch or --set."""
    import importlib.util
    from pathlib import Path

    from torch_l2o.optim import functional

    for name in torch_l2o.__all__:
        doc = getattr(getattr(torch_l2o, name), "__doc__", None) or ""
        assert not any(ord(c) < 32 and c not in "\n\t" for c in doc), name
    assert r"\nabla" in torch_l2o.MathGD.__doc__ and r"\big" in torch_l2o.MathGD.__doc__
    for a in torch_l2o.available_architectures():
        assert torch_l2o.get_architecture(a).update.__name__ in functional.__all__
    path = Path(__file__).resolve().parent.parent / "pretrained" / "train.py"
    spec = importlib.util.spec_from_file_location("train_script", path)
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    with pytest.raises(SystemExit):
        train.main(["--arch", "foo"])
    assert "unknown architecture 'foo'; known: pa, pagru, pamr" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(["--family", "mc", "--arch", "pa"])
    assert "pa is not trained on mc; its families: lasso, logistic" in capsys.readouterr().err
    # --arch all trains what is shipped; a study without shipped weights only by name
    assert "pafr" in train.archs_of("lasso-mix") and "pafr" not in train.archs_of("lasso-mix", shipped_only=True)
    assert train.archs_of("lasso-mix", shipped_only=True) == ["pagru", "pamr"]
    with pytest.raises(SystemExit, match="horizn: not a training setting; known: auto_step, batch, clip, horizon"):
        train.main(["--family", "lasso", "--arch", "pa", "--set", "horizn=300", "--out", "/nonexistent"])
    with pytest.raises(SystemExit):
        train.main(["--set", "horizon"])
    assert "expected KEY=VALUE" in capsys.readouterr().err
    assert train._setting("lr=1e-3") == ("lr", 1e-3) and train._setting("loss=log_gap") == ("loss", "log_gap")
