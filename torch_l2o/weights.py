"""Network weights: safetensors files with a JSON card, loaded without pickle.

A weight file ``<arch>-<name>.safetensors`` stores the tensors and, in its header
metadata, the architecture and the network's constructor arguments; the card
``<arch>-<name>.json`` beside it records the training family and settings, the
validation figures, the library version and the file's sha256. Pretrained files live
in the ``pretrained/`` folder at the top of the repository, installed as the package
``torch_l2o.pretrained``.
"""

from __future__ import annotations

import difflib
import hashlib
import inspect
import json
import os
import warnings
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from .nets import CoordinateNet
from .registry import get_architecture

__all__ = ["build_network", "save_weights", "read_weights", "pretrained_dir", "available_weights"]


def _display(arch: str) -> str:
    try:
        return get_architecture(arch).display_name
    except ValueError:
        return arch


def _optimizer_name(arch: str) -> str:
    """How a user reaches ``arch``'s optimizer: ``torch_l2o.PAMR``, or through the registry."""
    import torch_l2o  # not at the top: torch_l2o imports this module

    try:
        cls = get_architecture(arch).optimizer
    except ValueError:
        return f"the optimizer of architecture {arch!r}"
    if getattr(torch_l2o, cls.__name__, None) is cls:
        return f"torch_l2o.{cls.__name__}"
    return f"torch_l2o.get_architecture({arch!r}).optimizer"


def pretrained_dir() -> Path:
    """Where the shipped weights are (the repository's ``pretrained/``)."""
    env = os.environ.get("TORCH_L2O_PRETRAINED")
    if env:
        return Path(env)
    try:
        return Path(str(resources.files("torch_l2o.pretrained")))
    except ModuleNotFoundError:  # running from a checkout without installing
        return Path(__file__).resolve().parent.parent / "pretrained"


def available_weights(arch: str) -> list[str]:
    """Names of the pretrained weights shipped for ``arch``."""
    d = pretrained_dir()
    return sorted(p.name[len(arch) + 1 : -len(".safetensors")] for p in d.glob(f"{arch}-*.safetensors"))


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_weights(path: str | Path, net: CoordinateNet, arch: str, card: Mapping[str, Any] | None = None) -> Path:
    """Write ``net``'s weights as safetensors (architecture and config in the header) and,
    with ``card``, the JSON card beside it (with the file's sha256)."""
    from safetensors.torch import save_file

    from . import __version__

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    # the header holds what the weights must be loaded with; an inference option (hold_fixed)
    # is the loader's choice, and left out a file loads in versions without the option
    config = {k: v for k, v in net.config().items() if k not in getattr(net, "inference_options", ())}
    meta = {"arch": arch, "config": json.dumps(config, sort_keys=True), "torch_l2o": __version__}
    save_file(tensors, str(path), metadata=meta)
    if card is not None:
        full = {"arch": arch, "architecture": get_architecture(arch).display_name, "config": net.config(),
                "parameters": sum(p.numel() for p in net.parameters()), "torch_l2o": __version__,
                **card, "file": path.name, "sha256": sha256(path)}
        path.with_suffix(".json").write_text(json.dumps(full, indent=1, sort_keys=False) + "\n")
    return path


def read_weights(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str], dict | None]:
    """Tensors, header metadata and card (``None`` if absent) of a weight file.

    A card's sha256 that does not match the file, or a file that safetensors cannot
    parse (truncated, tampered, not safetensors), is a ``ValueError``.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weight file at {path}")
    card = None
    card_path = path.with_suffix(".json")
    if card_path.is_file():
        card = json.loads(card_path.read_text())
        if card.get("sha256") and card["sha256"] != sha256(path):
            raise ValueError(
                f"{path} does not match its card {card_path.name} (sha256 differs): the file was "
                "modified or truncated; restore it (git checkout pretrained/) or retrain it"
            )
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors weight file ({e}); it may be truncated or corrupt") from e
    return tensors, meta, card


def _resolve_path(arch: str, name: str) -> Path:
    """A path, a shipped name (``"lasso"``), or a shipped file's name (``"pamr-lasso"``, as
    in ``pretrained/``; another architecture's is refused by its header)."""
    p = Path(name)
    if p.suffix == ".safetensors" or p.is_file():
        return p
    cand = pretrained_dir() / f"{arch}-{name}.safetensors"
    if not cand.is_file():
        cand = pretrained_dir() / f"{name}.safetensors"
    if not cand.is_file():
        have = available_weights(arch)
        raise FileNotFoundError(
            f"no pretrained weights {name!r} for {_display(arch)}; shipped: "
            f"{', '.join(have) or 'none'}. Pass a path to a .safetensors file, a state dict, "
            "or weights='untrained'"
        )
    return cand


def _load_strict(net: CoordinateNet, tensors: Mapping[str, Tensor], arch: str, source: str,
                 from_file: bool) -> None:
    """Load ``tensors`` into ``net``: every key, of the network's shapes, finite (a state
    dict may hold an Inf)."""
    own = net.state_dict()
    odd = sorted(k for k, v in tensors.items() if not isinstance(v, Tensor))
    if odd:
        raise ValueError(f"weights from {source} hold values that are not tensors ({', '.join(odd[:4])}); "
                         "pass a network's state_dict(), a weight file or a shipped name")
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    shapes = [f"{k}: file {tuple(tensors[k].shape)} vs network {tuple(own[k].shape)}"
              for k in own if k in tensors and tuple(tensors[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:4]}{' ...' if len(missing) > 4 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}")
        if shapes:
            parts.append("shape mismatch " + "; ".join(shapes[:3]))
        raise ValueError(
            f"weights from {source} do not fit a {_display(arch)} network with config {net.config()}: "
            + ", ".join(parts)
        )
    cast = {k: v.to(own[k].dtype) for k, v in tensors.items()}
    # A corrupt file without its card (no sha256 to check) parses: its NaNs would reach the
    # parameters. Training never makes an Inf either; a state dict may hold one on purpose
    # (a bias of -inf saturates a sigmoid to exactly 0).
    bad = sorted(k for k, v in cast.items() if bool((~torch.isfinite(v) if from_file else v.isnan()).any()))
    if bad:
        fix = ("the file is corrupt: restore it (git checkout pretrained/, or reinstall torch_l2o) or "
               "retrain it" if from_file else "check the training run that made it, or retrain it")
        raise ValueError(f"{source} holds {'NaN or Inf' if from_file else 'NaN'} in {', '.join(bad[:4])}"
                         f"{' ...' if len(bad) > 4 else ''}; {fix}")
    net.load_state_dict(cast)


def _check_options(spec, options: Mapping[str, Any], keywords: Sequence[str] = ()) -> None:
    """Unknown network options are an error that lists the known ones (and ``keywords``,
    an optimizer's own, with the closest name to a misspelt one)."""
    known = [n for n in inspect.signature(spec.network.__init__).parameters if n != "self"]
    unknown = sorted(set(options) - set(known))
    if unknown:
        close = difflib.get_close_matches(unknown[0], [*keywords, *known], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        own = f"its keywords: {', '.join(keywords)}; " if keywords else ""
        raise TypeError(f"{spec.display_name} has no option {', '.join(map(repr, unknown))}{hint}; "
                        f"{own}its network options: {', '.join(known) or 'none'}")


def build_network(arch: str, weights: Any = None, **options: Any) -> tuple[CoordinateNet, dict]:
    """The ``arch`` network with ``weights``: a pretrained name (``"lasso"``, or the file's
    ``"pamr-lasso"``), a path, a state dict, ``"untrained"`` (a seeded default
    initialisation), or ``None`` (the default pretrained weights, the architecture's
    ``default_weights``; untrained with a warning if they are missing). Weights that do not
    fit the network or hold NaN are a ``ValueError``. Returns ``(net, info)``."""
    spec = get_architecture(arch)
    Net = spec.network
    _check_options(spec, options)
    info: dict[str, Any] = {"arch": arch}
    if weights is None:
        try:
            if spec.default_weights is None:
                raise FileNotFoundError
            return build_network(arch, spec.default_weights, **options)
        except FileNotFoundError:
            warnings.warn(
                f"no pretrained weights are shipped for {spec.display_name} yet: using an untrained "
                "network (weights='untrained' to silence this; train with torch_l2o.meta_train)",
                UserWarning, stacklevel=3,
            )
            weights = "untrained"
    if isinstance(weights, str) and weights == "untrained":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net = Net(**options)
        info["weights"] = "untrained"
    elif isinstance(weights, Mapping):
        net = Net(**options)
        _load_strict(net, weights, arch, "the given state dict", from_file=False)
        info["weights"] = "state dict"
    elif isinstance(weights, (str, os.PathLike)):
        path = _resolve_path(arch, str(weights))
        tensors, meta, card = read_weights(path)
        if meta.get("arch", arch) != arch:
            raise ValueError(f"{path} holds {_display(meta['arch'])} weights, not {spec.display_name}: "
                             f"load it with {_optimizer_name(meta['arch'])}, or give {spec.display_name} its "
                             f"own ({', '.join(available_weights(arch)) or 'none shipped'})")
        config = json.loads(meta.get("config", "{}"))
        # an option the file does not name was trained at its default (files predate the option)
        trained = {**{k: p.default for k, p in inspect.signature(Net.__init__).parameters.items()
                      if k != "self" and p.default is not inspect.Parameter.empty}, **config}
        clash = {k: (v, trained[k]) for k, v in options.items()
                 if k in trained and trained[k] != v and k not in Net.inference_options}
        if clash:
            raise ValueError(f"{path} was trained with {', '.join(f'{k}={b!r}' for k, (a, b) in clash.items())}; "
                             f"you asked for {', '.join(f'{k}={a!r}' for k, (a, b) in clash.items())}")
        net = Net(**{**config, **options})
        _load_strict(net, tensors, arch, str(path), from_file=True)
        info.update(weights=str(path), card=card)
    else:
        raise TypeError(f"weights must be a name, a path, a state dict, 'untrained' or None; got {type(weights).__name__}")
    net.eval()
    for q in net.parameters():
        q.requires_grad_(False)
    return net, info
