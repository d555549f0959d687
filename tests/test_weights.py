"""Weight files: safetensors round trips, cards, and clear errors for bad files."""

import json

import pytest
import torch

import torch_l2o
from torch_l2o.nets import PAMRNet, PANet
from torch_l2o.weights import available_weights, build_network, pretrained_dir, read_weights, save_weights


def _saved(tmp_path, arch="pamr", **options):
    net, _ = build_network(arch, "untrained", **options)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01)
    path = save_weights(tmp_path / f"{arch}-test.safetensors", net, arch, card={"family": "test"})
    return net, path


def test_round_trip_with_card(tmp_path):
    net, path = _saved(tmp_path, window=3, heads=2)
    card = json.loads(path.with_suffix(".json").read_text())
    assert card["arch"] == "pamr" and card["config"]["window"] == 3 and len(card["sha256"]) == 64
    assert card["parameters"] == sum(p.numel() for p in net.parameters())
    x = torch.zeros(4, requires_grad=True)
    opt = torch_l2o.PAMR([x], prox="l1", lam=0.1, lr=0.1, weights=str(path))  # config comes from the file
    assert opt.net.config() == net.config()
    assert all(torch.equal(a, b) for a, b in zip(opt.net.state_dict().values(), net.state_dict().values()))
    assert opt.weights_info["card"]["family"] == "test"


def test_card_sets_the_multiplier_of_the_automatic_step(tmp_path):
    """A card's auto_lr_scale (train.py --calibrate-step) is what lr=None steps with:
    the same iterates as setting it by hand, other iterates than the default 0.5."""
    net, _ = build_network("pagru", "untrained")
    path = save_weights(tmp_path / "pagru-test.safetensors", net, "pagru", card={"family": "test", "auto_lr_scale": 0.8})
    prob = torch_l2o.problems.Lasso(m=8, n=12, sparsity=2, lam=0.1).sample(3, generator=torch.Generator().manual_seed(0))

    def run(weights, scale=None):
        x = prob.x0().requires_grad_(True)
        opt = torch_l2o.PAGRU([x], prox="l1", lam=0.1, weights=weights, instance_dims=1, watchdog=False)
        if scale is not None:
            opt.auto_lr_scale = scale
        for _ in range(6):
            opt.zero_grad()
            prob.smooth(x).sum().backward()
            opt.step()
        return opt, opt.solution(x)

    opt, x_card = run(str(path))
    assert opt.auto_lr_scale == 0.8
    plain, x_default = run(net.state_dict())
    assert plain.auto_lr_scale == 0.5  # no card: the architecture's default
    _, x_hand = run(net.state_dict(), 0.8)
    assert torch.equal(x_card, x_hand) and not torch.allclose(x_card, x_default)


@pytest.mark.parametrize("safeguard", [False, True])
def test_backtracking_caps_the_multiplier_at_one(safeguard):
    """With a closure (backtracking) ``1/L_k`` passed the descent lemma, so a calibrated
    multiplier above 1 (the LASSO mixture cards: 1.2) steps as 1.0 and one below 1 as
    itself; without a closure (the secant estimate) the multiplier is used as it is."""
    net, _ = build_network("pagru", "untrained")
    prob = torch_l2o.problems.Lasso(m=8, n=12, sparsity=2, lam=0.1).sample(3, generator=torch.Generator().manual_seed(0))

    def run(scale, with_closure):
        x = prob.x0().requires_grad_(True)
        opt = torch_l2o.PAGRU([x], prox="l1", lam=0.1, weights=net.state_dict(), instance_dims=1,
                              watchdog=False, safeguard=safeguard and with_closure)
        opt.auto_lr_scale = scale

        def closure():
            opt.zero_grad()
            f = prob.smooth(x)
            f.sum().backward()
            return f

        for _ in range(6):
            if with_closure:
                opt.step(closure)
            else:
                closure()
                opt.step()
        return opt.solution(x)

    assert torch.equal(run(1.2, True), run(1.0, True))
    assert not torch.allclose(run(0.8, True), run(1.0, True))
    if not safeguard:
        assert not torch.allclose(run(1.2, False), run(1.0, False))


def test_state_dict_weights(tmp_path):
    sd = PANet().state_dict()
    opt = torch_l2o.PA([torch.zeros(3, requires_grad=True)], lr=0.1, weights=sd)
    assert torch.equal(opt.net.heads.p.weight, sd["heads.p.weight"])


def test_truncated_file_is_a_clear_error(tmp_path):
    _, path = _saved(tmp_path)
    path.with_suffix(".json").unlink()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors weight file.*truncated or corrupt"):
        build_network("pamr", str(path))


def test_tampered_file_fails_its_card(tmp_path):
    _, path = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match its card.*sha256"):
        build_network("pamr", str(path))


def test_architecture_mismatch_says_what_was_expected(tmp_path):
    _, path = _saved(tmp_path, arch="pa")
    with pytest.raises(ValueError, match="holds L2O-PA weights, not L2O-PA-MR"):
        build_network("pamr", str(path))
    with pytest.raises(ValueError, match=r"do not fit a L2O-PA-MR network with config .*heads.*shape mismatch"):
        build_network("pamr", PAMRNet(heads=2, hidden=8).state_dict())
    with pytest.raises(ValueError, match="missing"):
        build_network("pa", {"rnn.weight_ih_l0": torch.zeros(80, 2)})


def test_option_clash_with_file(tmp_path):
    _, path = _saved(tmp_path, window=3)
    with pytest.raises(ValueError, match="trained with window=3; you asked for window=5"):
        build_network("pamr", str(path), window=5)


def test_unknown_name_lists_shipped(tmp_path):
    with pytest.raises(FileNotFoundError, match="no pretrained weights 'imagenet' for L2O-PA; shipped:"):
        build_network("pa", "imagenet")
    with pytest.raises(TypeError, match="weights must be"):
        build_network("pa", 3.5)


def test_no_pickle_on_the_load_path(tmp_path, monkeypatch):
    """Loading weights never unpickles: torch.load and pickle are not called."""
    _, path = _saved(tmp_path)
    import pickle

    def boom(*a, **k):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(torch, "load", boom)
    tensors, meta, card = read_weights(path)
    assert meta["arch"] == "pamr" and tensors


def test_shipped_weights_load_and_match_their_cards():
    """Every file in pretrained/ loads into its optimizer and matches its card's sha256."""
    names = {arch: available_weights(arch) for arch in ("pa", "pagru", "pamr", "l2odm", "rnnprop", "gso", "mathgd")}
    if not any(names.values()):
        pytest.skip("no pretrained weights shipped yet")
    for arch, have in names.items():
        for name in have:
            net, info = build_network(arch, name)
            assert info["card"]["sha256"] and info["card"]["arch"] == arch
            assert (pretrained_dir() / f"{arch}-{name}.json").is_file()


def test_card_figures_per_instance_are_robust_to_one_slow_instance(monkeypatch):
    """train.py's card figures: the mean error's crossing of 1e-6 is set by the slowest
    instances; the per-instance figures (median, 90th percentile, share reached) are not.
    On real runs (a tiny LASSO batch) they are each instance's own first crossing."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("train_script", Path(__file__).resolve().parent.parent /
                                                  "pretrained" / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    firsts = [None, 1, 1, 2, 2, 9]  # each instance's first iteration at 1e-6 or below (one never)
    errs = torch.ones(10, 6)
    for i, k in enumerate(firsts):
        if k is not None:
            errs[k:, i] = 1e-7
    fig = train._per_instance(errs, 1e-6)
    assert fig == {"median": 2.0, "p90": pytest.approx(6.2), "reached": round(5 / 6, 4)}
    assert train._first(errs.mean(1).tolist(), 1e-6) is None  # the mean never crosses
    assert train._per_instance(torch.ones(4, 3), 1e-6) == {"median": None, "p90": None, "reached": 0.0}

    monkeypatch.setitem(train.EVAL, "instances", 4)
    monkeypatch.setitem(train.EVAL, "iters", 300)
    fam = torch_l2o.problems.Lasso(m=10, n=20, sparsity=3, lam=0.1)
    net, _ = build_network("pa", "untrained")
    figs = train.evaluate_composite("pa", net.state_dict(), net.config(), "lasso", fam, only={"fista_restart"})
    per, mean = figs["fista_restart"]["per_instance_iterations_to_1e-06"], figs["fista_restart"]["iterations_to_1e-06"]
    # every instance reached 1e-6, so the mean did by the last of them (not necessarily by the 90th percentile)
    assert per["reached"] == 1.0 and per["median"] <= per["p90"] and mean is not None
